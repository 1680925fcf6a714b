package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/wire"
)

// Standalone relays (`meshlink relay`) register with a relay token, then
// hold a PathRelayNodes stream open: it tells them which node keys may use
// them, and while it is open they are listed in every network map after the
// embedded relay. A relay never receives node credentials: nodes prove
// their WireGuard keys to it (relay.checkProof).

// EmbeddedRelayName is the name of the coordinator's own relay in maps.
const EmbeddedRelayName = "coordinator"

// relayStream is one standalone relay's open PathRelayNodes stream.
type relayStream struct {
	id     int64
	cancel context.CancelFunc
}

// attachRelay makes st the relay's stream, ending any previous one.
func (h *hub) attachRelay(st *relayStream) {
	h.mu.Lock()
	old := h.relays[st.id]
	h.relays[st.id] = st
	h.mu.Unlock()
	if old != nil {
		old.cancel()
	}
}

// detachRelay removes st if it is still the relay's stream.
func (h *hub) detachRelay(st *relayStream) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.relays[st.id] != st {
		return false
	}
	delete(h.relays, st.id)
	return true
}

func (h *hub) relaysOnline() map[int64]bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := make(map[int64]bool, len(h.relays))
	for id := range h.relays {
		m[id] = true
	}
	return m
}

// removeRelay deletes a standalone relay and ends its node-key stream, so
// that maps drop it at once.
func (s *Server) removeRelay(ctx context.Context, name string) error {
	rs, err := s.store.ListRelays(ctx)
	if err != nil {
		return err
	}
	for _, r := range rs {
		if r.Name != name {
			continue
		}
		if err := s.store.DeleteRelay(ctx, name); err != nil {
			return err
		}
		s.hub.mu.Lock()
		st := s.hub.relays[r.ID]
		s.hub.mu.Unlock()
		if st != nil {
			st.cancel()
		}
		s.commit(change{log: "relay removed", attrs: []any{"relay", name},
			event: store.Event{Kind: store.EventRelay, Actor: "admin", Message: "relay " + name + " removed"}})
		return nil
	}
	return fmt.Errorf("relay %s: %w", name, store.ErrNotFound)
}

// relayList is the Relays of every network map: the embedded relay unless
// disabled, then the standalone relays online now, by ID.
func (s *Server) relayList(ctx context.Context) ([]wire.Relay, error) {
	var out []wire.Relay
	if !s.cfg.NoEmbeddedRelay {
		out = append(out, wire.Relay{Name: EmbeddedRelayName, URL: s.URL(), Fingerprint: s.fingerprint, Key: s.relayPub})
		// The replicas' embedded relays too (they share this one's
		// certificate and key): nodes on different replicas then meet
		// on a relay they both hold.
		if all := s.coordinatorURLs(); len(all) > 1 {
			for _, r := range all[1:] {
				name := r
				if u, err := url.Parse(r); err == nil {
					name = u.Host
				}
				out = append(out, wire.Relay{Name: EmbeddedRelayName + "@" + name, URL: r, Fingerprint: s.fingerprint, Key: s.relayPub})
			}
		}
	}
	online := s.hub.relaysOnline()
	if len(online) == 0 {
		return out, nil
	}
	rs, err := s.store.ListRelays(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range rs {
		if online[r.ID] {
			out = append(out, wire.Relay{Name: r.Name, URL: r.URL, Fingerprint: r.Fingerprint, Key: r.Key})
		}
	}
	return out, nil
}

// relayVerify lets a node key use the embedded relay if it belongs to a node
// of the mesh now.
func (s *Server) relayVerify(k key.Public) error {
	snap, err := s.current(s.ctx)
	if err != nil {
		return &relay.AuthError{Status: http.StatusServiceUnavailable, Body: wire.Error{Code: wire.ErrCodeInternal, Message: "the coordinator cannot read its store; retry shortly"}}
	}
	if _, found := slices.BinarySearchFunc(snap.keys, k, key.Public.Compare); !found {
		return &relay.AuthError{Status: http.StatusForbidden, Body: wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: "this key is not a node of this mesh (removed, or re-keyed); restart the agent or join again"}}
	}
	return nil
}

// tokenRefusal turns a store error about a join token into the answer a
// person can act on; ok is false for other errors.
func tokenRefusal(err error, create string) (e *apiError, ok bool) {
	switch {
	case errors.Is(err, store.ErrTokenInvalid):
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "the join token is not known to this coordinator; create one with `%s`", create), true
	case errors.Is(err, store.ErrTokenRevoked):
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "the join token was revoked; create a new one with `%s`", create), true
	case errors.Is(err, store.ErrTokenExpired):
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenExpired, "the join token has expired; create a new one with `%s`", create), true
	case errors.Is(err, store.ErrTokenUsed):
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenUsed, "the join token was single-use and has been used; create a new one, or a reusable one with `%s --reusable`", create), true
	case errors.Is(err, store.ErrTokenKind):
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "this join token is of the wrong kind: nodes join with `meshlink token create`, relays register with `meshlink token create --relay`"), true
	}
	return nil, false
}

// authRelay authenticates a call by relay credentials.
func (s *Server) authRelay(r *http.Request) (store.Relay, *apiError) {
	unauth := apiErr(http.StatusUnauthorized, wire.ErrCodeUnauthorized,
		"relay credentials are missing or wrong (was the relay removed?); register again with a token from `meshlink token create --relay`")
	id, err := strconv.ParseInt(r.Header.Get(wire.HeaderRelayID), 10, 64)
	secret := r.Header.Get(wire.HeaderRelaySecret)
	if err != nil || secret == "" {
		return store.Relay{}, unauth
	}
	rl, err := s.store.GetRelay(r.Context(), id)
	if errors.Is(err, store.ErrNotFound) {
		return rl, unauth
	} else if err != nil {
		return rl, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "look up relay %d: %v", id, err)
	}
	if !store.HashMatches(rl.SecretHash, secret) {
		return rl, unauth
	}
	return rl, nil
}

func validRelayURL(raw string) *apiError {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.Port() == "" || (u.Path != "" && u.Path != "/") {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "relay url %q must be https://host:port, reachable by the agents (set the relay's --url)", raw)
	}
	return nil
}

func (s *Server) serveRelayRegister(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.RelayRegisterRequest
	if e := decodeVersioned(w, r, &req, &req.Version, "relay register"); e != nil {
		return e
	}
	name, e := validName("relay", req.Name)
	if e != nil {
		return e
	}
	if name == EmbeddedRelayName {
		return apiErr(http.StatusConflict, wire.ErrCodeNameInUse, "the relay name %q is the coordinator's own relay; choose another --name", name)
	}
	if e := validRelayURL(req.URL); e != nil {
		return e
	}
	if req.Key.IsZero() {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "relay key must be a Curve25519 public key (32 bytes, standard base64)")
	}
	if len(req.Fingerprint) != 64 {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "relay fingerprint must be the SHA-256 of its certificate (64 hex digits)")
	}
	if r.Header.Get(wire.HeaderRelayID) != "" {
		// A known relay refreshing what agents need to reach it.
		rl, e := s.authRelay(r)
		if e != nil {
			return e
		}
		if rl.Name != name {
			return apiErr(http.StatusConflict, wire.ErrCodeConflict, "this relay registered as %q; keep that --name or register anew with a fresh --state", rl.Name)
		}
		if err := s.store.UpdateRelay(r.Context(), rl.ID, req.URL, req.Fingerprint, req.Key); err != nil {
			return apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "update relay %s: %v", name, err)
		}
		s.commit(change{})
		writeJSON(w, http.StatusOK, wire.RelayRegisterResponse{ID: uint64(rl.ID)})
		return nil
	}
	if req.TokenID == "" || req.TokenSecret == "" || len(req.TokenID) > 64 || len(req.TokenSecret) > 128 {
		return apiErr(http.StatusUnauthorized, wire.ErrCodeTokenInvalid, "the relay token is missing or malformed; pass the whole token printed by `meshlink token create --relay`")
	}
	secret := randomSecret(32)
	rl, err := s.store.RegisterRelay(r.Context(), store.RelayRegistration{
		TokenID: req.TokenID, TokenSecret: req.TokenSecret, Now: time.Now(),
		Name: name, URL: req.URL, Fingerprint: req.Fingerprint, Key: req.Key, SecretHash: store.HashSecret(secret),
	})
	if e, ok := tokenRefusal(err, "meshlink token create --relay"); ok {
		return e
	}
	switch {
	case err == nil:
	case errors.Is(err, store.ErrNameInUse):
		return apiErr(http.StatusConflict, wire.ErrCodeNameInUse, "the relay name %q is taken by another relay; choose another --name", name)
	default:
		return apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "register relay %q: %v", name, err)
	}
	s.commit(change{log: "relay registered", attrs: []any{"relay_id", rl.ID, "name", name, "url", req.URL},
		event: store.Event{Kind: store.EventRelay, Actor: "relay " + name, Message: fmt.Sprintf("relay %s registered at %s", name, req.URL)}})
	writeJSON(w, http.StatusOK, wire.RelayRegisterResponse{ID: uint64(rl.ID), Secret: secret})
	return nil
}

// serveRelayNodes streams the mesh's node keys to a standalone relay; the
// relay is listed in network maps while the stream is open.
func (s *Server) serveRelayNodes(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.RelayNodesRequest
	if e := decodeVersioned(w, r, &req, &req.Version, "relay nodes"); e != nil {
		return e
	}
	rl, e := s.authRelay(r)
	if e != nil {
		return e
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	st := &relayStream{id: rl.ID, cancel: cancel}
	s.hub.attachRelay(st)
	s.commit(change{log: "relay online", attrs: []any{"relay", rl.Name, "url", rl.URL}})
	defer func() {
		if s.hub.detachRelay(st) {
			s.commit(change{log: "relay offline", attrs: []any{"relay", rl.Name}})
		}
	}()

	send := startStream(w)
	// Relays give up on a stream silent for 60s (relayd's streamIdle).
	relayKeepAlive := min(s.cfg.KeepAlive, 30*time.Second)
	keepAlive := time.NewTicker(relayKeepAlive)
	defer keepAlive.Stop()
	var last []key.Public
	for first := true; ; first = false {
		gen, wake := s.hub.woken()
		snap, err := s.recent(ctx, gen)
		if err != nil {
			return nil
		}
		if first || !slices.Equal(last, snap.keys) {
			last = snap.keys
			if err := send(&wire.RelayNodes{Keys: append([]key.Public{}, last...)}); err != nil {
				return nil
			}
			keepAlive.Reset(relayKeepAlive)
		}
		select {
		case <-wake:
		case <-keepAlive.C:
			if err := send(&wire.RelayNodes{}); err != nil {
				return nil
			}
		case <-ctx.Done():
			return nil
		}
	}
}
