package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/coordinator/web"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/wire"
)

// apiError is a wire.Error with its HTTP status.
type apiError struct {
	status int
	wire.Error
}

func apiErr(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, Error: wire.Error{Code: code, Message: fmt.Sprintf(format, args...)}}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, e *apiError) { writeJSON(w, e.status, e.Error) }

// handlerFunc is an API handler that answers errors by returning them.
type handlerFunc func(w http.ResponseWriter, r *http.Request) *apiError

func (s *Server) handle(f handlerFunc) http.Handler {
	return s.track(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeError(w, apiErr(http.StatusMethodNotAllowed, wire.ErrCodeBadRequest, "%s takes POST", r.URL.Path))
			return
		}
		if e := f(w, r); e != nil {
			if e.status >= 500 {
				s.log.Error("request failed", "path", r.URL.Path, "code", e.Code, "err", e.Message)
				e = apiErr(e.status, e.Code, "internal error; see the coordinator's log")
			} else {
				s.log.Debug("request refused", "path", r.URL.Path, "code", e.Code, "msg", e.Message, "remote", r.RemoteAddr)
			}
			writeError(w, e)
		}
	}))
}

func (s *Server) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(wire.PathRegister, s.handle(s.metrics.countRegistrations(s.recordRegisterFailures(s.serveRegister))))
	mux.Handle(wire.PathRegisterPoll, s.handle(s.serveRegisterPoll))
	mux.Handle(wire.PathServerKey, s.handle(s.serveServerKey))
	mux.Handle(wire.PathStats, s.handle(s.serveStats))
	mux.Handle(wire.PathMap, s.handle(s.serveMap))
	mux.Handle(wire.PathServices, s.handle(s.serveServices))
	mux.Handle(wire.PathEndpoints, s.handle(s.serveEndpoints))
	mux.Handle(wire.PathHealth, s.handle(s.serveHealth))
	mux.Handle(wire.PathLeave, s.handle(s.serveLeave))
	mux.Handle(wire.PathTokenInspect, s.handle(s.serveTokenInspect))
	mux.Handle(wire.PathRelayRegister, s.handle(s.serveRelayRegister))
	mux.Handle(wire.PathRelayNodes, s.handle(s.serveRelayNodes))
	// The embedded relay upgrades to its own protocol; it checks method and
	// headers itself and blocks for the connection's life, tracked like a
	// request.
	if s.cfg.NoEmbeddedRelay {
		mux.HandleFunc(relay.Path, func(w http.ResponseWriter, r *http.Request) {
			writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "this coordinator's embedded relay is off (--relay=false); use a relay from the network map"))
		})
	} else {
		mux.Handle(relay.Path, s.track(s.relay))
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok"))
	})
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no such API path %q; is the agent newer than this coordinator?", r.URL.Path))
	})
	// Everything else is the web login and console (coordinator/web).
	mux.Handle("/", s.track(s.console))
	return mux
}

// decode reads a JSON body of at most maxBodyBytes into v.
func decode(w http.ResponseWriter, r *http.Request, v any, what string) *apiError {
	body := http.MaxBytesReader(w, r.Body, maxBodyBytes)
	dec := json.NewDecoder(body)
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return apiErr(http.StatusRequestEntityTooLarge, wire.ErrCodeBadRequest, "%s body is larger than %d bytes", what, maxBodyBytes)
		}
		if isDeadline(err) {
			return apiErr(http.StatusRequestTimeout, wire.ErrCodeBadRequest, "%s body did not arrive in time; check the network and retry", what)
		}
		if errors.Is(err, key.ErrInvalid) {
			return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%s body: %v", what, err)
		}
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%s body is not valid JSON: %v", what, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		if isDeadline(err) {
			return apiErr(http.StatusRequestTimeout, wire.ErrCodeBadRequest, "%s body did not arrive in time; check the network and retry", what)
		}
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%s body has data after the JSON object", what)
	}
	return nil
}

func checkVersion(v int) *apiError {
	if v <= 0 || v > wire.ProtocolVersion {
		return apiErr(http.StatusUpgradeRequired, wire.ErrCodeVersion,
			"protocol version %d is not supported by this coordinator (it speaks 1 to %d); upgrade the coordinator or use a matching meshlink agent", v, wire.ProtocolVersion)
	}
	return nil
}

func validKey(k key.Public) *apiError {
	if k.IsZero() {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "node_key must be a WireGuard public key (32 bytes, standard base64)")
	}
	return nil
}

// validName normalizes and checks the name of what ("node", "service",
// "relay": only the error message names it).
func validName(what, raw string) (string, *apiError) {
	name := wire.NormalizeName(raw)
	if err := wire.ValidName(name); err != nil {
		return "", apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%s name: %v", what, err)
	}
	return name, nil
}

// endpoints lists where a node may be reached: the address the coordinator
// saw it from (on its WireGuard port), then what it reported, deduplicated,
// without addresses others cannot reach it by (publishable), at most
// maxNodeEndpoints.
func (s *Server) endpoints(r *http.Request, listenPort uint16, local []netip.AddrPort) []netip.AddrPort {
	var out []netip.AddrPort
	seen := map[netip.AddrPort]bool{}
	add := func(ap netip.AddrPort) {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if !ap.IsValid() || ap.Port() == 0 || !publishable(ap.Addr(), s.cfg.AllowLoopbackEndpoints) || seen[ap] || len(out) >= maxNodeEndpoints {
			return
		}
		seen[ap] = true
		out = append(out, ap)
	}
	if remote, err := netip.ParseAddrPort(r.RemoteAddr); err == nil && listenPort != 0 {
		add(netip.AddrPortFrom(remote.Addr(), listenPort))
	}
	for _, ap := range local {
		add(ap)
	}
	return out
}

// recordRegisterFailures puts refused registrations into the console's
// event log, coalesced per source (recordJoinFailure): rejected tokens
// (401) and a name or key already taken (409), not malformed requests.
func (s *Server) recordRegisterFailures(f handlerFunc) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) *apiError {
		e := f(w, r)
		if e != nil && (e.status == http.StatusUnauthorized || e.status == http.StatusConflict) {
			s.recordJoinFailure(r.RemoteAddr, e.Message)
		}
		return e
	}
}

func (s *Server) serveRegister(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.RegisterRequest
	if e := decodeVersioned(w, r, &req, &req.Version, "register"); e != nil {
		return e
	}
	if req.TokenID == "" && req.TokenSecret == "" && req.Interactive {
		return s.registerInteractive(w, r, req)
	}
	if req.TokenID == "" || req.TokenSecret == "" || len(req.TokenID) > 64 || len(req.TokenSecret) > 128 {
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "the join token is missing or malformed; pass the whole token printed by `meshlink token create`")
	}
	reg, e := s.registration(r, req)
	if e != nil {
		return e
	}
	reg.TokenID, reg.TokenSecret = req.TokenID, req.TokenSecret
	// A name held by an ephemeral node that is offline is free: a sidecar
	// or a CI job is back with a new key. So is the name of a node whose
	// key expired, for a token of the node's owner: the machine joins
	// again. (An approval never replaces.)
	// An ephemeral node is replaced even while it looks online by a
	// registration with the very token that made it: a pod recreated
	// under the same name whose predecessor's stream has not timed out
	// yet (its network vanished with the pod). The newest wins; the old
	// one's stream ends with node_removed.
	tokOwner, sameToken := int64(-1), false
	if tok, err := s.store.GetToken(r.Context(), req.TokenID); err == nil && store.HashMatches(tok.SecretHash, req.TokenSecret) {
		tokOwner, sameToken = tok.OwnerID, tok.Ephemeral
		// tagOwners holds when the token is used, not only when it was
		// minted: a minter who no longer owns a tag gives it no more. (A
		// revoked token, the removed users' too, the store refuses.)
		if !tok.Relay && !tok.Revoked {
			var te *TagError
			if err := s.checkTags(r.Context(), tok.OwnerID, tok.Tags); errors.As(err, &te) {
				s.console.Record(store.Event{Kind: store.EventTokenRefused, Actor: "node " + reg.Name, Node: reg.Name, OwnerID: tok.OwnerID,
					Message: fmt.Sprintf("refused %s joining with token %s carrying tag:%s: %s", reg.Name, tok.ID, te.Tag, te.Why)})
				return apiErr(http.StatusForbidden, wire.ErrCodeTokenInvalid, "token %s carries tag:%s, which its minter may no longer give: %s; mint a new token", tok.ID, te.Tag, te.Why)
			} else if err != nil {
				return storeErr("register", err)
			}
		}
	}
	now := time.Now()
	reg.CanReplace = func(n store.Node) bool {
		return n.Ephemeral && (!s.nodeOnline(n) || sameToken && n.TokenID == req.TokenID) ||
			n.KeyExpired(now) && n.OwnerID == tokOwner
	}
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	resp, e := s.registerNode(r.Context(), nodeRegistration{Registration: reg, remoteIP: host})
	if e != nil {
		return e
	}
	writeJSON(w, http.StatusOK, resp)
	return nil
}

// registerInteractive answers a registration without a token: the node
// waits (PathRegisterPoll) until a person approves it in the console,
// which registers it through consoleMesh.RegisterNode.
func (s *Server) registerInteractive(w http.ResponseWriter, r *http.Request, req wire.RegisterRequest) *apiError {
	reg, e := s.registration(r, req)
	if e != nil {
		return e
	}
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	p, err := s.console.StartPending(web.PendingRequest{Name: reg.Name, Hostname: reg.Hostname, Key: reg.Key, ListenPort: reg.ListenPort,
		Endpoints: reg.Endpoints, RemoteIP: host, KeyProven: reg.KeyProven})
	if err != nil {
		return apiErr(http.StatusTooManyRequests, wire.ErrCodeConflict, "%v", err)
	}
	writeJSON(w, http.StatusAccepted, p)
	return nil
}

func (s *Server) serveRegisterPoll(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.RegisterPollRequest
	if e := decodeVersioned(w, r, &req, &req.Version, "register poll"); e != nil {
		return e
	}
	if req.PollID == "" || len(req.PollID) > 128 {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "poll_id is missing or malformed; pass the poll_id of the register answer")
	}
	status, body := s.console.Poll(r.Context(), req.PollID)
	if status == http.StatusOK {
		if rr, ok := body.(wire.RegisterResponse); ok {
			s.log.Info("node registered by approval", "node_id", rr.Node.ID, "name", rr.Node.Name)
		}
	}
	writeJSON(w, status, body)
	return nil
}

// authDecode authenticates the calling node and decodes its versioned
// request body into v (version points at v's Version field).
func (s *Server) authDecode(w http.ResponseWriter, r *http.Request, v any, version *int, what string) (store.Node, *apiError) {
	node, e := s.authNode(r)
	if e != nil {
		return node, e
	}
	return node, decodeVersioned(w, r, v, version, what)
}

// decodeVersioned decodes a request body into v and checks the protocol
// version it carries (version points at v's Version field).
func decodeVersioned(w http.ResponseWriter, r *http.Request, v any, version *int, what string) *apiError {
	if e := decode(w, r, v, what); e != nil {
		return e
	}
	return checkVersion(*version)
}

func (s *Server) serveStats(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.StatsReport
	node, e := s.authDecode(w, r, &req, &req.Version, "stats")
	if e != nil {
		return e
	}
	if node.KeyExpired(time.Now()) {
		return keyExpired(node) // its counters would feed the console as if it were on the mesh
	}
	// An honest agent sends at most wire.MaxDenials: a report with more
	// is refused whole, so nothing of it is stored.
	if len(req.Denials) > wire.MaxDenials {
		s.log.Warn("refused a stats report with too many denials", "node", node.Name, "denials", len(req.Denials), "max", wire.MaxDenials)
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "stats report carries %d denials, more than %d; upgrade the agent", len(req.Denials), wire.MaxDenials)
	}
	// HTTP figures (version 12) are bounded and must add up, like the
	// denials: a report that breaks either is refused whole.
	if len(req.HTTP) > wire.MaxHTTPStats {
		s.log.Warn("refused a stats report with too many HTTP edges", "node", node.Name, "edges", len(req.HTTP), "max", wire.MaxHTTPStats)
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "stats report carries %d HTTP edges, more than %d; upgrade the agent", len(req.HTTP), wire.MaxHTTPStats)
	}
	for i := range req.HTTP {
		if err := req.HTTP[i].Check(); err != nil {
			s.log.Warn("refused a stats report with bad HTTP figures", "node", node.Name, "err", err)
			return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "stats report: %v", err)
		}
	}
	if len(req.Denials) > 0 || len(req.Peers) > 0 || len(req.HTTP) > 0 {
		gen, _ := s.hub.woken()
		snap, err := s.recent(r.Context(), gen)
		if err != nil {
			return storeErr("stats", err)
		}
		if len(req.Denials) > 0 {
			s.recordDenials(node, snap, req.Denials)
		}
		// The console names each path's peer to the node's owner: only
		// peers of the node's map, which it knows already.
		req.Peers = slices.DeleteFunc(req.Peers, func(p wire.PeerStats) bool { return p.Node == node.ID || !snap.peerOf(node.ID, p.Node) })
		if n := len(req.HTTP); n > 0 {
			req.HTTP = httpEdgesOf(node.ID, snap, req.HTTP)
			if dropped := n - len(req.HTTP); dropped > 0 {
				s.log.Debug("dropped HTTP edges that are not the node's", "node", node.Name, "dropped", dropped)
			}
		}
	}
	// Counters feed the console only: map streams are not woken.
	req.Denials = nil
	s.console.ReportStats(node.ID, req)
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

// httpEdgesOf keeps the HTTP edges that node id can have carried in snap:
// to a peer that provides the service (consumer), or from a peer to a
// service the node provides (provider). Another node's traffic, or a
// service the node has nothing to do with, must not show in the console
// on its word.
func httpEdgesOf(id wire.NodeID, snap *snapshot, edges []wire.HTTPStats) []wire.HTTPStats {
	services := map[string]wire.Service{}
	provides := func(name string, n wire.NodeID) bool {
		sv, ok := services[name]
		if !ok {
			sv, _ = snap.service(name)
			services[name] = sv
		}
		return slices.ContainsFunc(sv.Providers, func(p wire.Provider) bool { return p.Node == n })
	}
	return slices.DeleteFunc(edges, func(h wire.HTTPStats) bool {
		if _, known := snap.byID[h.Peer]; !known || h.Peer == id || !snap.peerOf(id, h.Peer) {
			return true
		}
		if h.Role == wire.RoleConsumer {
			return !provides(h.Service, h.Peer)
		}
		return !provides(h.Service, id)
	})
}

// authNode authenticates a call by its node credentials.
func (s *Server) authNode(r *http.Request) (store.Node, *apiError) {
	idStr, secret := r.Header.Get(wire.HeaderNodeID), r.Header.Get(wire.HeaderNodeSecret)
	unauth := apiErr(http.StatusUnauthorized, wire.ErrCodeUnauthorized, "node credentials are missing or wrong; re-join with a new token")
	id, err := strconv.ParseUint(idStr, 10, 64)
	if err != nil || secret == "" {
		return store.Node{}, unauth
	}
	n, err := s.store.GetNode(r.Context(), wire.NodeID(id))
	if errors.Is(err, store.ErrNotFound) {
		if h, err := s.store.RemovedNodeSecretHash(r.Context(), wire.NodeID(id)); err == nil && store.HashMatches(h, secret) {
			return n, apiErr(http.StatusUnauthorized, wire.ErrCodeNodeRemoved, "this node was removed from the mesh; join again with a new token")
		}
		return n, unauth
	} else if err != nil {
		return n, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "look up node %d: %v", id, err)
	}
	if !store.HashMatches(n.SecretHash, secret) {
		return n, unauth
	}
	return n, nil
}

func storeErr(what string, err error) *apiError {
	if errors.Is(err, store.ErrNotFound) {
		return apiErr(http.StatusUnauthorized, wire.ErrCodeNodeRemoved, "this node was removed from the mesh; join again with a new token")
	}
	if errors.Is(err, context.Canceled) {
		return apiErr(http.StatusServiceUnavailable, wire.ErrCodeInternal, "request canceled")
	}
	return apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%s: %v", what, err)
}

func (s *Server) serveServices(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.ServiceRequest
	node, e := s.authDecode(w, r, &req, &req.Version, "services")
	if e != nil {
		return e
	}
	if node.KeyExpired(time.Now()) && !req.Remove {
		return keyExpired(node)
	}
	name, e := validName("service", req.Name)
	if e != nil {
		return e
	}
	ctx := r.Context()
	if req.Remove {
		if err := s.store.UnexposeService(ctx, name, node.ID); errors.Is(err, store.ErrNotFound) {
			return apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "node %q does not provide service %q", node.Name, name)
		} else if err != nil {
			return storeErr("unexpose", err)
		}
		s.commit(change{log: "service unexposed", attrs: []any{"service", name, "node", node.Name},
			event: store.Event{Kind: store.EventUnexpose, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID, Message: fmt.Sprintf("%s stopped providing %s", node.Name, name)}})
		writeJSON(w, http.StatusOK, wire.ServiceResponse{})
		return nil
	}
	if req.Port == 0 {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "service %q needs a port from 1 to 65535", name)
	}
	if err := wire.CheckTraffic(req.Priority, req.Weight, req.ServiceVersion); err != nil {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "service %q: %v", name, err)
	}
	proto, err := wire.ParseProtocol(req.Protocol)
	if err != nil {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "service %q: %v", name, err)
	}
	if proto == wire.ProtocolTCP {
		proto = "" // what every provider before version 10 has
	}
	if req.UDPIdle < 0 || req.UDPIdle > wire.MaxUDPIdle {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "service %q: udp idle timeout %ds must be 0 to %d seconds", name, req.UDPIdle, wire.MaxUDPIdle)
	}
	listed, refused := s.checkProvide(ctx, node, name)
	if refused != nil {
		return refused
	}
	if _, err := s.store.ExposeServiceAs(ctx, name, node.ID, req.Port, listed); err != nil {
		var notOwner *store.NotOwnerError
		if errors.As(err, &notOwner) {
			s.console.Record(store.Event{Kind: store.EventExposeRefused, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID,
				Message: fmt.Sprintf("%s may not provide %s: it belongs to %s", node.Name, name, s.userName(ctx, notOwner.OwnerID))})
			return apiErr(http.StatusForbidden, wire.ErrCodeNotOwner, "service %q belongs to %s; only their nodes may provide it: choose another name", name, s.userName(ctx, notOwner.OwnerID))
		}
		var quota *store.QuotaError
		if errors.As(err, &quota) {
			s.console.Record(store.Event{Kind: store.EventExposeRefused, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID,
				Message: fmt.Sprintf("%s may not provide %s: it provides %d services, the limit", node.Name, name, quota.Limit)})
			return apiErr(http.StatusConflict, wire.ErrCodeConflict, "node %s provides %d services, the limit; unexpose one or ask the admin to raise --max-services-per-node", node.Name, quota.Limit)
		}
		if errors.Is(err, store.ErrExhausted) {
			return apiErr(http.StatusConflict, wire.ErrCodeConflict, "no service VIP is left in %s; unexpose unused services (a service without providers is deleted after --service-grace)", wire.ServicePrefix)
		}
		return storeErr("expose", err)
	}
	if err := s.store.SetProviderTraffic(ctx, name, node.ID, store.Traffic{Priority: req.Priority, Weight: req.Weight, Version: req.ServiceVersion,
		Protocol: proto, UDPIdle: req.UDPIdle, AgentProtocol: req.Version}); err != nil {
		return storeErr("expose", err)
	}
	s.commit(change{log: "service exposed", attrs: []any{"service", name, "node", node.Name, "port", req.Port},
		event: store.Event{Kind: store.EventExpose, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID, Message: fmt.Sprintf("%s provides %s on port %d", node.Name, name, req.Port)}})
	snap, err := s.current(ctx)
	if err != nil {
		return storeErr("expose", err)
	}
	sv, _ := snap.service(name)
	writeJSON(w, http.StatusOK, wire.ServiceResponse{Service: sv})
	return nil
}

func (s *Server) serveEndpoints(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.EndpointsRequest
	node, e := s.authDecode(w, r, &req, &req.Version, "endpoints")
	if e != nil {
		return e
	}
	if node.KeyExpired(time.Now()) {
		return keyExpired(node)
	}
	eps := s.endpoints(r, req.ListenPort, req.LocalEndpoints)
	if req.ListenPort == node.ListenPort && slices.Equal(eps, node.Endpoints) {
		writeJSON(w, http.StatusOK, struct{}{}) // no change: costs nothing
		return nil
	}
	if !s.endpointLimit.allow(node.ID, time.Now()) {
		return apiErr(http.StatusTooManyRequests, wire.ErrCodeConflict,
			"node %s changed its endpoints too often (at most %d at once, then one per %v); they are republished when its map stream reconnects", node.Name, endpointBurst, endpointEvery)
	}
	if err := s.store.UpdateNodeNetwork(r.Context(), node.ID, key.Public{}, req.ListenPort, eps); err != nil {
		return storeErr("endpoints", err)
	}
	s.commit(change{})
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

func (s *Server) serveLeave(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.LeaveRequest
	node, e := s.authDecode(w, r, &req, &req.Version, "leave")
	if e != nil {
		return e
	}
	if err := s.removeNode(r.Context(), node.ID, change{log: "node left", attrs: []any{"node_id", node.ID, "name", node.Name},
		event: store.Event{Kind: store.EventLeave, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID, Message: node.Name + " left the mesh"}}); err != nil {
		return storeErr("leave", err)
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}

// removeNode deletes a node and commits c; its map stream notices and
// ends, and its relay connection is closed.
func (s *Server) removeNode(ctx context.Context, id wire.NodeID, c change) error {
	old, getErr := s.store.GetNode(ctx, id)
	if err := s.store.DeleteNode(ctx, id); err != nil {
		return err
	}
	s.commit(c)
	if getErr == nil {
		s.disconnectRelay(old.Key)
	}
	return nil
}

// disconnectRelay closes the relay connection authenticated with key k, if
// any: the node was removed or changed its key.
func (s *Server) disconnectRelay(k key.Public) { s.relay.Disconnect(k) }

func (s *Server) serveTokenInspect(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.TokenInspectRequest
	if e := decode(w, r, &req, "token inspect"); e != nil {
		return e
	}
	tok, err := s.store.GetToken(r.Context(), req.TokenID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return storeErr("token inspect", err)
	}
	if err != nil || !store.HashMatches(tok.SecretHash, req.TokenSecret) {
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "the join token is not known to this coordinator; create one with `meshlink token create`")
	}
	writeJSON(w, http.StatusOK, tokenInfo(tok))
	return nil
}

func tokenInfo(tok store.Token) wire.TokenInfo {
	info := wire.TokenInfo{ID: tok.ID, Reusable: tok.Reusable, Ephemeral: tok.Ephemeral, Tags: tok.Tags, Expires: tok.Expires, Revoked: tok.Revoked, UsesLeft: -1, Relay: tok.Relay}
	if !tok.Reusable {
		info.UsesLeft = max(0, 1-tok.Uses)
	}
	if len(info.Tags) == 0 {
		info.Tags = nil
	}
	return info
}

// serveMap updates the node's network details and streams its map until
// the client goes away, a newer stream replaces this one, the node is
// removed, or the server closes.
func (s *Server) serveMap(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.MapRequest
	node, e := s.authDecode(w, r, &req, &req.Version, "map")
	if e != nil {
		return e
	}
	if node.KeyExpired(time.Now()) {
		// Refused before a rekey: an expired key may not vouch for a new one.
		return keyExpired(node)
	}
	rekey := !req.NodeKey.IsZero() && req.NodeKey != node.Key
	if rekey {
		if e := s.checkRekey(node, req); e != nil {
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			s.console.Record(store.Event{Kind: store.EventRekeyRefused, Actor: host, Node: node.Name, OwnerID: node.OwnerID,
				Message: fmt.Sprintf("refused a key change of %s from %s: %s", node.Name, host, e.Message)})
			return e
		}
	}
	if req.Region != "" {
		if err := wire.ValidRegion(req.Region); err != nil {
			return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "--region %q: %v", req.Region, err)
		}
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if req.Region != node.Region {
		if err := s.store.SetNodeRegion(ctx, node.ID, req.Region); err != nil {
			return storeErr("map", err)
		}
	}
	if rekey {
		// The key and its new expiry at once: a rotation whose answer is
		// lost is one the agent finds done when it reconnects.
		if err := s.store.UpdateNodeKey(ctx, node.ID, req.NodeKey, s.keyExpiryFrom(node, time.Now())); err != nil {
			if errors.Is(err, store.ErrKeyInUse) {
				return apiErr(http.StatusConflict, wire.ErrCodeConflict, "node key is already used by another node")
			}
			return storeErr("map", err)
		}
		s.wakeExpiry()
	}
	if err := s.store.UpdateNodeNetwork(ctx, node.ID, key.Public{}, req.ListenPort, s.endpoints(r, req.ListenPort, req.LocalEndpoints)); err != nil {
		return storeErr("map", err)
	}
	if rekey {
		s.disconnectRelay(node.Key) // it re-authenticates with the new key
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		s.commit(change{log: "node key rotated", attrs: []any{"node_id", node.ID, "name", node.Name, "old_key", node.Key.Short(), "new_key", req.NodeKey.Short(), "remote", host},
			event: store.Event{Kind: store.EventRekey, Actor: "node " + node.Name, Node: node.Name, OwnerID: node.OwnerID,
				Message: fmt.Sprintf("%s proved its old and new key and rotated to %s from %s", node.Name, req.NodeKey.Short(), host)}})
	}
	if err := s.store.SetLastSeen(ctx, node.ID, time.Now()); err != nil {
		return storeErr("map", err)
	}
	st := newMapStream(node.ID, cancel)
	s.hub.attach(st)
	s.commit(change{log: "map stream opened", attrs: []any{"node_id", node.ID, "name", node.Name, "remote", r.RemoteAddr}})
	openedGen, _ := s.hub.changed()
	log := s.log.With("node_id", node.ID, "name", node.Name)
	defer func() {
		if s.hub.detach(st) {
			// Offline says more than a health report from before.
			s.health.forget(node.ID)
			// Use a fresh context: the request's is done, the store is
			// still open (Close waits for this handler).
			dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
			seen := time.Now()
			s.store.SetLastSeen(dctx, node.ID, seen)
			if s.shared() {
				s.store.SetHeartbeat(dctx, node.ID, time.Time{})
			}
			dcancel()
			s.commit(change{log: "map stream closed; node offline", attrs: []any{"node_id", node.ID, "name", node.Name}})
			if node.Ephemeral {
				s.scheduleReap(node.ID, seen)
			}
		} else {
			log.Info("map stream replaced by a newer one")
		}
	}()

	ka := s.keepAliveFor(req.MapIdle)
	w.Header().Set(wire.HeaderKeepAlive, strconv.Itoa(int((ka+time.Second-1)/time.Second)))
	sw := newStreamWriter(w)
	// A keep-alive leaves its deadline armed; on HTTP/1.1 it is the
	// connection's, which a next request on it must not inherit.
	defer sw.rc.SetWriteDeadline(time.Time{})
	// The first map waits for the wake-up that tells every other stream
	// about this node (at most a debounce interval): a node must not reach
	// peers that do not know it yet.
	if !s.waitSwept(ctx, openedGen) {
		return nil
	}
	keepAlive := time.NewTimer(jitter(ka))
	defer keepAlive.Stop()
	ss := st.state
	// With replicas, the stream's heartbeat tells the others that the
	// node is online (here): their maps show it so, and they do not reap
	// it (an ephemeral node they saw leave, or every one after a restart).
	var beat <-chan time.Time
	if s.shared() {
		if err := s.store.SetHeartbeat(ctx, node.ID, time.Now()); err != nil {
			log.Warn("map stream: heartbeat", "err", err)
		}
		t := time.NewTicker(s.heartbeat)
		defer t.Stop()
		beat = t.C
	}
	for {
		release, ok := s.sends.acquire(ctx.Done())
		if !ok {
			return nil
		}
		// The sweep looks at ss only while the stream does not (TryLock),
		// and wakes it when it cannot look.
		ss.mu.Lock()
		gen, _ := s.hub.woken()
		snap, err := s.recent(ctx, gen)
		if err != nil {
			ss.mu.Unlock()
			release()
			if ctx.Err() == nil {
				log.Error("map stream: build map", "err", err)
			}
			return nil
		}
		if snap.expired[node.ID] {
			ss.mu.Unlock()
			release()
			// The agent reconnects and is told why (keyExpired).
			log.Info("map stream: node key expired")
			return nil
		}
		if _, ok := snap.byID[node.ID]; !ok {
			ss.mu.Unlock()
			release()
			log.Info("map stream: node removed")
			return nil
		}
		sent, err := s.send(sw, ss, snap, time.Now())
		ss.mu.Unlock()
		release()
		if err != nil {
			log.Debug("map stream: write", "err", err)
			return nil
		}
		if sent {
			s.metrics.mapSent(snap.at)
			keepAlive.Reset(jitter(ka))
		}
		// Keep-alives wait here too, and cost no map. Only a wake-up that
		// brings this stream something reaches it (Server.sweep).
		for wait := true; wait; {
			select {
			case <-st.poke:
				wait = false
			case <-keepAlive.C:
				// The next write comes within a keep-alive interval, unless
				// the stream waits for a send slot; the write deadline stays
				// past the agent's own patience (twice the interval and
				// 15s), after which it gives up on the stream anyway.
				if err := sw.keepAlive(frame(keepAliveBody, ss.seq, time.Now()), ka); err != nil {
					log.Debug("map stream: keep-alive", "err", err)
					return nil
				}
				keepAlive.Reset(jitter(ka))
			case <-beat:
				if err := s.store.SetHeartbeat(ctx, node.ID, time.Now()); err != nil && ctx.Err() == nil {
					log.Warn("map stream: heartbeat", "err", err)
				}
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// minMapIdle is the shortest wait on a silent stream a node may ask for:
// below it, a node would have its stream's keep-alives sent every few
// hundred milliseconds, the coordinator's CPU spent at its word.
const minMapIdle = 10 * time.Second

// keepAliveFor is the keep-alive interval of a stream whose agent waits
// idle seconds on a silent stream (wire.MapRequest.MapIdle; 0 before
// protocol version 15): at most half of that, and at most
// Config.KeepAlive.
func (s *Server) keepAliveFor(idle int) time.Duration {
	wait := wire.DefaultMapIdle
	if idle > 0 {
		wait = time.Duration(min(idle, 24*3600)) * time.Second
	}
	return min(s.cfg.KeepAlive, max(wait, minMapIdle)/2)
}

// startStream answers 200 with a newline-delimited JSON stream and returns
// the function that writes (and flushes) one message of it.
func startStream(w http.ResponseWriter) func(v any) error {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush() // the headers now: the client waits for them first
	enc := json.NewEncoder(w)
	return func(v any) error {
		rc.SetWriteDeadline(time.Now().Add(15 * time.Second))
		if err := enc.Encode(v); err != nil {
			return err
		}
		if err := rc.Flush(); err != nil {
			return err
		}
		// The deadline guards one write only: left in place, it would
		// reset an idle HTTP/2 stream when it passed (every 15 s).
		return rc.SetWriteDeadline(time.Time{})
	}
}

// scheduleReap removes ephemeral node id once it has been offline for the
// grace period, unless it reconnects meanwhile: here, or to any
// coordinator sharing the store (its last-seen time then moved past seen,
// the one known when the reap was scheduled, or its heartbeat is fresh).
func (s *Server) scheduleReap(id wire.NodeID, seen time.Time) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	epoch := s.hub.epoch(id)
	go func() {
		defer s.wg.Done()
		t := time.NewTimer(s.cfg.EphemeralGrace)
		defer t.Stop()
		select {
		case <-t.C:
		case <-s.ctx.Done():
			return
		}
		if s.hub.online(id) || s.hub.epoch(id) != epoch {
			return // came back; a later disconnect schedules again
		}
		n, err := s.store.GetNode(s.ctx, id)
		if err != nil || !n.Ephemeral || n.LastSeen.After(seen) || s.nodeOnline(n) {
			return
		}
		if err := s.removeNode(s.ctx, id, change{log: "ephemeral node removed after grace period", attrs: []any{"node_id", id, "name", n.Name, "grace", s.cfg.EphemeralGrace},
			event: store.Event{Kind: store.EventLeave, Actor: "coordinator", Node: n.Name, OwnerID: n.OwnerID, Message: fmt.Sprintf("ephemeral %s removed after %v offline", n.Name, s.cfg.EphemeralGrace)}}); err != nil {
			s.log.Error("remove ephemeral node", "node_id", id, "err", err)
			return
		}
	}()
}

// userName is how errors and events name a user: "user NAME", or the ID
// when the user is gone.
func (s *Server) userName(ctx context.Context, id int64) string {
	users, err := s.store.ListUsers(ctx)
	if err == nil {
		for _, u := range users {
			if u.ID == id {
				return "user " + u.Username
			}
		}
	}
	return fmt.Sprintf("user #%d", id)
}
