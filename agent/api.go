package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
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
		e, note, err := a.expose(r.Context(), Export{Name: req.Name, Target: req.Target, Port: req.Port}, req.Replace)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, localapi.Error{Message: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, localapi.ExposeResponse{Export: localapi.Export{Name: e.Name, Target: e.Target, Port: e.Port, Announced: note == ""}, Note: note})
	})
	mux.HandleFunc("GET "+localapi.PathPing, func(w http.ResponseWriter, r *http.Request) {
		timeout, err := time.ParseDuration(r.URL.Query().Get("timeout"))
		if err != nil || timeout <= 0 || timeout > time.Minute {
			timeout = 2 * time.Second
		}
		res, err := a.Ping(r.Context(), r.URL.Query().Get("node"), timeout)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, localapi.Error{Message: err.Error()})
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
			Endpoints: a.nm.Self.Endpoints, Key: shortKey(a.key.Public())},
		ListenPort:  a.listenPort,
		DNS:         a.DNSAddr(),
		DNSDomain:   a.dnsDomain(),
		Coordinator: localapi.Coordinator{URL: a.node.URL, Connected: a.connected, LastError: a.lastErr, LastMap: a.lastMap},
		Peers:       []localapi.Peer{},
		Relays:      []localapi.Relay{},
	}
	for _, r := range a.bind.Relays() {
		st.Relays = append(st.Relays, localapi.Relay{Name: r.Name, URL: r.URL, Connected: r.Connected, LastError: r.Stats.LastError,
			TxBytes: r.Stats.BytesSent, RxBytes: r.Stats.BytesReceived})
	}
	if st.Self.Name == "" {
		st.Self.Name, st.Self.ID = a.node.Name, uint64(a.node.ID)
	}
	for _, p := range a.nm.Peers {
		if p.ID == a.nm.Self.ID {
			continue
		}
		lp := localapi.Peer{ID: uint64(p.ID), Name: p.Name, Addresses: p.Addresses, Online: p.Online, Key: shortKey(p.Key), Path: bind.PathNone.String()}
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
	a.mu.Unlock()
	for _, s := range a.consumer.Status() {
		ls := localapi.Service{Name: s.Name, VIP: vips[s.Name].VIP, Local: s.Listen, Listening: s.Listening, Error: s.Error,
			Open: s.Open, Total: s.Total, Failed: s.Failed, Sent: s.Sent, Received: s.Received, Providers: []localapi.Provider{},
			Port: s.Wanted.Port()}
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
			ls.Providers = append(ls.Providers, localapi.Provider{Name: p.Name, Addr: addr, Local: p.Local, Online: p.Online, Healthy: p.Healthy, Open: p.Open, LastError: p.LastError})
		}
		out.Consumed = append(out.Consumed, ls)
	}
	for _, e := range a.provider.Status() {
		out.Exported = append(out.Exported, localapi.Export{Name: e.Name, Target: e.Target, Port: e.Port, Announced: announced[e.Name],
			Open: e.Open, Total: e.Total, Denied: e.Denied, Failed: e.Failed, Sent: e.Sent, Received: e.Received, LastError: e.LastError})
	}
	return out
}

// Ping sends disco pings to the named peer over every path it has.
func (a *Agent) Ping(ctx context.Context, node string, timeout time.Duration) ([]localapi.PingResult, error) {
	node = wire.NormalizeName(node)
	a.mu.Lock()
	var k key.Public
	for _, p := range a.nm.Peers {
		if p.Name == node {
			k = p.Key
		}
	}
	a.mu.Unlock()
	if k.IsZero() {
		return nil, fmt.Errorf("no peer named %q; `meshlink status` lists them", node)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	res, err := a.bind.Ping(ctx, k)
	if err != nil {
		return nil, err
	}
	out := []localapi.PingResult{}
	for _, r := range res {
		path := "relay " + r.RelayName
		if !r.Relay {
			path = "direct " + r.Addr.String()
		}
		out = append(out, localapi.PingResult{Peer: node, Path: path, RTT: localapi.Duration(r.RTT)})
	}
	if len(out) == 0 {
		return nil, errors.New("no reply within " + timeout.String())
	}
	return out, nil
}
