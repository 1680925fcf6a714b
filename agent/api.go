package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// apiServer serves the local API on a Unix socket.
type apiServer struct {
	ln   net.Listener
	srv  *http.Server
	done chan struct{}
}

func startAPI(a *Agent, path string) (*apiServer, error) {
	// A socket file left by a crashed agent is removed; one that answers
	// belongs to a running agent, and two agents must not share a state.
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("agent: another agent is already running with --state %s; stop it or choose another --state", a.cfg.StateDir)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("agent: local API socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("agent: local API socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+localapi.PathStatus, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.HandleFunc("GET "+localapi.PathServices, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Services())
	})
	mux.HandleFunc("POST "+localapi.PathExpose, func(w http.ResponseWriter, r *http.Request) {
		var req localapi.ExposeRequest
		if !readJSON(w, r, &req) {
			return
		}
		e, note, err := a.expose(r.Context(), Export{Name: req.Name, Target: req.Target, Port: req.Port,
			Priority: req.Priority, Weight: req.Weight, Version: req.Version, Health: req.Health, Protocol: req.Protocol, UDPIdle: req.UDPIdle}, req.Replace)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, localapi.Error{Message: err.Error()})
			return
		}
		warn := checkExportNow(r.Context(), e)
		if warn != "" {
			a.log.Warn("exposed service's target does not answer", "service", e.Name, "target", e.Target, "warning", warn)
		}
		writeJSON(w, http.StatusOK, localapi.ExposeResponse{Export: localapi.Export{Name: e.Name, Target: e.Target, Port: e.Port, Announced: note == "",
			Priority: e.Priority, Weight: e.Weight, Version: e.Version, HealthCheck: healthCheckOf(e), Protocol: protocolName(e.Protocol), UDPIdle: e.UDPIdle},
			Note: note, Warning: warn})
	})
	mux.HandleFunc("GET "+localapi.PathPing, func(w http.ResponseWriter, r *http.Request) {
		timeout, err := time.ParseDuration(r.URL.Query().Get("timeout"))
		if err != nil || timeout <= 0 || timeout > time.Minute {
			timeout = 2 * time.Second
		}
		res, err := a.Ping(r.Context(), r.URL.Query().Get("node"), timeout)
		if err != nil {
			e := localapi.Error{Message: err.Error()}
			var pe *pingError
			if errors.As(err, &pe) {
				e.Code = pe.code
			}
			writeJSON(w, http.StatusBadRequest, e)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST "+localapi.PathUnexpose, func(w http.ResponseWriter, r *http.Request) {
		var req localapi.UnexposeRequest
		if !readJSON(w, r, &req) {
			return
		}
		if err := a.Unexpose(r.Context(), req.Name); err != nil {
			writeJSON(w, http.StatusBadRequest, localapi.Error{Message: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	mux.HandleFunc("POST "+localapi.PathLeave, func(w http.ResponseWriter, r *http.Request) {
		var req localapi.LeaveRequest
		if !readJSON(w, r, &req) {
			return
		}
		res, err := a.Leave(r.Context(), req.Force)
		if err != nil {
			writeJSON(w, http.StatusBadGateway, localapi.Error{Message: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, localapi.LeaveResponse{Name: res.Name, Note: res.Note})
	})
	mux.HandleFunc("POST "+localapi.PathRotateKey, func(w http.ResponseWriter, r *http.Request) {
		k, err := a.RotateKey(r.Context())
		if err != nil {
			writeJSON(w, http.StatusBadGateway, localapi.Error{Message: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, localapi.RotateKeyResponse{Key: k.String()})
	})
	s := &apiServer{ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		s.srv.Serve(ln)
	}()
	return s, nil
}

func (s *apiServer) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.srv.Shutdown(ctx)
	s.srv.Close()
	<-s.done
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, localapi.Error{Message: "bad request: " + err.Error()})
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// peerStats is what WireGuard reports of each peer; empty if it cannot say.
func (a *Agent) peerStats() map[key.Public]wgcfg.PeerStatus {
	out := map[key.Public]wgcfg.PeerStatus{}
	get, err := a.dev.IpcGet()
	if err != nil {
		return out
	}
	d, err := wgcfg.Parse(get)
	if err != nil {
		a.log.Debug("cannot parse WireGuard state", "err", err)
	}
	for _, p := range d.Peers {
		out[p.PublicKey] = p
	}
	return out
}

// Status reports this node, the coordinator connection and every peer.
func (a *Agent) Status() localapi.Status {
	stats := a.peerStats()
	a.mu.Lock()
	defer a.mu.Unlock()
	st := localapi.Status{
		Self: localapi.Node{ID: uint64(a.nm.Self.ID), Name: a.nm.Self.Name, Addresses: a.nm.Self.Addresses,
			Endpoints: a.nm.Self.Endpoints, Key: shortKey(a.key.Public()),
			KeyExpiry: a.nm.Self.KeyExpiry, KeyExpired: a.keyExpired || a.nm.Self.KeyExpired(time.Now())},
		ListenPort: a.listenPort,
		DNS:        a.DNSAddr(),
		DNSDomain:  a.dnsDomain(),
		Coordinator: localapi.Coordinator{URL: a.coordinatorURL(), Connected: a.connected, LastError: a.lastErr, LastMap: a.lastMap,
			Joining: a.node.ID == 0, RetryAt: a.retryAt},
		Peers:  []localapi.Peer{},
		Relays: []localapi.Relay{},
	}
	for _, r := range a.bind.Relays() {
		st.Relays = append(st.Relays, localapi.Relay{Name: r.Name, URL: r.URL, Connected: r.Connected, LastError: r.Stats.LastError,
			TxBytes: r.Stats.BytesSent, RxBytes: r.Stats.BytesReceived})
	}
	if st.Self.Name == "" {
		st.Self.Name, st.Self.ID = a.node.Name, uint64(a.node.ID)
	}
	if st.Self.Name == "" {
		st.Self.Name = a.cfg.Name
	}
	if st.Coordinator.URL == "" {
		st.Coordinator.URL = a.joinURL
	}
	for _, p := range a.nm.Peers {
		if p.ID == a.nm.Self.ID || a.expiredPeers[p.Name] {
			continue // an expired peer is no peer any more, map or not
		}
		lp := localapi.Peer{ID: uint64(p.ID), Name: p.Name, Addresses: p.Addresses, Online: p.Online, Key: shortKey(p.Key), Path: bind.PathNone.String(),
			KeyExpiry: p.KeyExpiry}
		if s, ok := stats[p.Key]; ok {
			lp.LastHandshake, lp.RxBytes, lp.TxBytes = s.LastHandshake, s.RxBytes, s.TxBytes
		}
		if !p.Key.IsZero() {
			pp := a.bind.Path(p.Key)
			lp.Path, lp.RTT = pp.Path.String(), localapi.Duration(pp.RTT)
			lp.DirectBytes, lp.RelayedBytes = pp.TxDirect+pp.RxDirect, pp.TxRelay+pp.RxRelay
			for _, c := range pp.Candidates {
				lp.Candidates = append(lp.Candidates, c.String())
			}
			switch pp.Path {
			case bind.PathDirect:
				lp.Endpoint = pp.Addr.String()
			case bind.PathRelay:
				lp.Relay, lp.RelayURL = pp.Relay, pp.RelayURL
				lp.Endpoint = "relay " + pp.Relay + " " + pp.RelayURL
			}
		}
		st.Peers = append(st.Peers, lp)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Name < st.Peers[j].Name })
	return st
}

// shortKey is a key's fingerprint for display: enough to tell keys apart,
// and only ever of public keys.
func shortKey(k key.Public) string {
	if s := k.String(); len(s) > 12 {
		return s[:12] + "…"
	}
	return ""
}

// Services reports what the site consumes and exports.
func (a *Agent) Services() localapi.Services {
	out := localapi.Services{Consumed: []localapi.Service{}, Exported: []localapi.Export{}}
	a.mu.Lock()
	vips := map[string]wire.Service{}
	for _, s := range a.nm.Services {
		vips[s.Name] = s
	}
	announced := map[string]bool{}
	for k, v := range a.announced {
		announced[k] = v
	}
	source := map[string]string{}
	for _, e := range a.exports {
		source[e.Name] = localapi.SourceRuntime
		if a.fromConfig[e.Name] {
			source[e.Name] = localapi.SourceFlag
		}
		if a.fromFile[e.Name] {
			source[e.Name] = localapi.SourceFile
		}
	}
	a.mu.Unlock()
	for _, s := range a.consumer.Status() {
		ls := localapi.Service{Name: s.Name, VIP: vips[s.Name].VIP, Local: s.Listen, Listening: s.Listening, Error: s.Error,
			Open: s.Open, Total: s.Total, Failed: s.Failed, Sent: s.Sent, Received: s.Received, Providers: []localapi.Provider{},
			Port: s.Wanted.Port(), Refused: s.Refused, Refusing: s.Refusing, Split: s.Split, Locality: s.Locality, Affinity: s.Affinity,
			Protocol: protocolName(s.Protocol)}
		if wire.HasUDP(s.Protocol) {
			ls.UDP = udpStats(s.UDP)
		}
		if s.HTTP {
			ls.Protocol = wire.ProtocolHTTP
		}
		if s.Listening && s.Listen.Port() != s.Wanted.Port() {
			ls.FallbackPort = s.Listen.Port()
			ls.Note = fmt.Sprintf("port %d needs privileges the agent lacks: served on %d (port+10000) instead; for port %d run `%s` and restart the agent",
				s.Wanted.Port(), s.Listen.Port(), s.Wanted.Port(), proxy.SetcapHint)
		}
		for _, p := range s.Providers {
			addr := p.Addr.String()
			if p.Local {
				addr = "local"
			}
			ls.Providers = append(ls.Providers, localapi.Provider{Name: p.Name, Addr: addr, Local: p.Local, Online: p.Online, Healthy: p.Healthy, Open: p.Open, LastError: p.LastError,
				Health: p.Health, Priority: p.Priority, Weight: p.Weight, Version: p.Version, Region: p.Region, Selected: p.Selected, Share: p.Share})
		}
		out.Consumed = append(out.Consumed, ls)
	}
	for _, e := range a.provider.Status() {
		out.Exported = append(out.Exported, localapi.Export{Name: e.Name, Target: e.Target, Port: e.Port, Announced: announced[e.Name],
			Open: e.Open, Total: e.Total, Denied: e.Denied, Failed: e.Failed, Sent: e.Sent, Received: e.Received, LastError: e.LastError,
			Source: source[e.Name], Priority: e.Priority, Weight: e.Weight, Version: e.Version, HealthCheck: healthCheckOf(e.Export),
			Health: exportHealth(e.Health), Protocol: protocolName(e.Protocol), UDPIdle: e.UDPIdle})
		if e.IsHTTP() {
			out.Exported[len(out.Exported)-1].Protocol = wire.ProtocolHTTP
		}
		if wire.HasUDP(e.Protocol) {
			out.Exported[len(out.Exported)-1].UDP = udpStats(e.UDP)
		}
	}
	return out
}

// protocolName is a service's protocol as status shows it: "" is tcp.
func protocolName(p string) string {
	if p == "" {
		return wire.ProtocolTCP
	}
	return p
}

func udpStats(s proxy.UDPStats) *localapi.UDPStats {
	return &localapi.UDPStats{Flows: s.Flows, FlowsTotal: s.FlowsTotal, Sent: s.Sent, Received: s.Received, Dropped: s.Dropped, Evicted: s.Evicted}
}

// pingError is a Ping failure with its localapi code.
type pingError struct {
	code string
	msg  string
}

func (e *pingError) Error() string { return e.msg }

// findPeer finds the peer that target names: its node name, its name in
// the mesh's DNS domain (NAME.mesh.internal), or one of its mesh IPs.
// Called with a.mu held.
func (a *Agent) findPeerLocked(target string) (wire.Node, error) {
	t := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(target)), ".")
	ip, ipErr := netip.ParseAddr(t)
	name := wire.NormalizeName(strings.TrimSuffix(t, "."+strings.ToLower(a.domain())))
	for _, p := range a.nm.Peers {
		if ipErr == nil {
			for _, pfx := range p.Addresses {
				if pfx.Addr() == ip.Unmap() || pfx.Addr() == ip {
					return p, nil
				}
			}
			continue
		}
		if p.Name == name {
			return p, nil
		}
	}
	if ipErr == nil && slices.ContainsFunc(a.nm.Self.Addresses, func(p netip.Prefix) bool { return p.Addr() == ip }) ||
		ipErr != nil && name == a.nm.Self.Name && name != "" {
		return wire.Node{}, &pingError{localapi.CodeNoPeer, fmt.Sprintf("%s is this node; ping another (`meshlink status` lists the peers)", target)}
	}
	return wire.Node{}, &pingError{localapi.CodeNoPeer, fmt.Sprintf("no peer %q in this site's network map (give a node name, NAME.%s or a mesh IP; `meshlink status` lists them)", target, a.domain())}
}

// Ping sends one round of disco pings to the peer target names (node
// name, FQDN or mesh IP) over every path it has.
func (a *Agent) Ping(ctx context.Context, target string, timeout time.Duration) ([]localapi.PingResult, error) {
	a.mu.Lock()
	p, err := a.findPeerLocked(target)
	a.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if p.Key.IsZero() {
		return nil, &pingError{localapi.CodeNoReply, fmt.Sprintf("%s has no key in the network map yet; try again shortly", p.Name)}
	}
	ip := ""
	if len(p.Addresses) > 0 {
		ip = p.Addresses[0].Addr().String()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A direct pong is the answer: the path in use once it exists.
	res, err := a.bind.PingUntil(ctx, p.Key, func(rs []bind.PingResult) bool {
		return slices.ContainsFunc(rs, func(r bind.PingResult) bool { return !r.Relay })
	})
	noReply := func(why string) error {
		if !p.Online {
			seen := "never seen by the coordinator"
			if !p.LastSeen.IsZero() {
				seen = "last seen " + time.Since(p.LastSeen).Round(time.Second).String() + " ago"
			}
			return &pingError{localapi.CodeNoReply, fmt.Sprintf("%s is offline (%s); %s", p.Name, seen, why)}
		}
		return &pingError{localapi.CodeNoReply, fmt.Sprintf("%s: %s", p.Name, why)}
	}
	if err != nil {
		return nil, noReply(err.Error())
	}
	out := []localapi.PingResult{}
	for _, r := range res {
		path := "relay " + r.RelayName
		if !r.Relay {
			path = "direct " + r.Addr.String()
		}
		out = append(out, localapi.PingResult{Peer: p.Name, Path: path, RTT: localapi.Duration(r.RTT), Direct: !r.Relay, IP: ip})
	}
	if len(out) == 0 {
		return nil, noReply("no reply within " + timeout.String())
	}
	return out, nil
}

// healthCheckOf is how an export's target is checked, in words.
func healthCheckOf(e Export) string {
	if e.Health == "" && !wire.HasTCP(e.Protocol) {
		return proxy.HealthNone // UDP has no connect to check
	}
	h, err := proxy.ParseHealth(e.Health)
	if err != nil {
		return proxy.HealthTCP
	}
	return h.String()
}

// exportHealth is the last check of a target in words: "ok",
// "unhealthy (connection refused)", or "" before the first check.
func exportHealth(h proxy.ExportHealth) string {
	switch {
	case !h.Checked:
		return ""
	case h.Healthy:
		return "ok"
	}
	return "unhealthy (" + h.Error + ")"
}

// coordinatorURL is the coordinator in use: one of several, once joined to
// a mesh that has several.
func (a *Agent) coordinatorURL() string {
	if a.cc != nil {
		if u := a.cc.base(); u != "" {
			return u
		}
	}
	return a.node.URL
}
