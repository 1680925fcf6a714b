// Package relayd runs a relay on its own (`meshlink relay`): a relay.Server
// behind its own TLS listener, registered with a coordinator by a relay
// token, following the coordinator's list of node keys so that only nodes of
// the mesh may use it. Agents find it in their network maps.
//
// The relay never receives node credentials: nodes prove their WireGuard
// keys to its key (see package relay). Its own credentials (an ID and a
// secret the coordinator keeps hashed), its key and its certificate live in
// its state directory; the last node-key list is kept there too, so a relay
// restarted while the coordinator is down still serves the mesh.
package relayd

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlink/meshlink/internal/atomicfile"
	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/metricsserver"
	"github.com/meshlink/meshlink/internal/tlscert"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/wire"
)

// Config configures a Relay.
type Config struct {
	// Join is a relay token (`meshlink token create --relay`); needed the
	// first time only.
	Join string
	// StateDir holds the relay's key, certificate, credentials and the
	// last node-key list; created 0700.
	StateDir string
	// Name identifies the relay in network maps; default the host name.
	Name string
	// Listen is the HTTPS address, "0.0.0.0:8444".
	Listen string
	// URL is what agents dial, https://host:port; default https://LISTEN
	// (an unspecified address is replaced by the host's first address).
	URL string
	// TLSCert and TLSKey serve a real certificate instead of the
	// self-signed one kept in StateDir.
	TLSCert, TLSKey string
	// MetricsListen serves Prometheus metrics at /metrics; "" or "off"
	// disables them.
	MetricsListen string
	Logger        *slog.Logger
	// RetryMin and RetryMax bound the backoff towards the coordinator;
	// defaults 500ms and 30s.
	RetryMin, RetryMax time.Duration
}

// streamIdle is how long the node-key stream may stay silent.
const streamIdle = time.Minute

const (
	keyFile   = "relay.key"
	credsFile = "relay.json"
	nodesFile = "nodes.json"
)

// creds is what the relay keeps of its registration.
type creds struct {
	Coordinator string `json:"coordinator"`
	Fingerprint string `json:"fingerprint"`
	ID          uint64 `json:"id"`
	Secret      string `json:"secret"`
	Name        string `json:"name"`
}

// Relay is a standalone relay.
type Relay struct {
	cfg   Config
	log   *slog.Logger
	cert  tls.Certificate
	fp    string
	pub   key.Public
	srv   *relay.Server
	token *wire.JoinToken

	mu        sync.Mutex // guards the fields below
	creds     creds
	keys      map[key.Public]bool
	connected bool // the node-key stream is open
	lastErr   string
	url       string
	addr      netip.AddrPort

	http    *http.Server
	metrics *metricsserver.Server // nil when metrics are off
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// New checks the configuration and loads (or creates) the relay's state.
// Nothing listens until Start.
func New(cfg Config) (*Relay, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("relay: no state directory; pass --state DIR")
	}
	if cfg.Listen == "" {
		cfg.Listen = ":8444"
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 500 * time.Millisecond
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 30 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Relay{cfg: cfg, log: log.With("subsystem", "relay"), keys: map[key.Public]bool{}}
	if cfg.Join != "" {
		jt, err := wire.ParseToken(cfg.Join)
		if err != nil {
			return nil, fmt.Errorf("relay: --join: %w", err)
		}
		r.token = &jt
	}
	dir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	r.cfg.StateDir = dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("relay: cannot create state directory %s: %w; choose another --state", dir, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, credsFile)); err == nil {
		if err := json.Unmarshal(b, &r.creds); err != nil {
			return nil, fmt.Errorf("relay: %s is damaged (%v); move it away and register again with a new token", filepath.Join(dir, credsFile), err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("relay: %w", err)
	}
	if r.creds.ID == 0 && r.token == nil {
		return nil, errors.New("relay: not registered yet; pass --join with a token from `meshlink token create --relay`")
	}
	if r.creds.ID != 0 && r.token != nil && r.token.URL != r.creds.Coordinator {
		return nil, fmt.Errorf("relay: the state in %s belongs to the coordinator %s, the token to %s; use another --state", dir, r.creds.Coordinator, r.token.URL)
	}
	if cfg.Name == "" {
		cfg.Name = r.creds.Name
	}
	if cfg.Name == "" {
		h, _ := os.Hostname()
		cfg.Name = wire.NormalizeName(h)
	}
	r.cfg.Name = wire.NormalizeName(cfg.Name)
	if err := wire.ValidName(r.cfg.Name); err != nil {
		return nil, fmt.Errorf("relay: --name: %w", err)
	}
	if r.creds.ID != 0 && r.creds.Name != "" && r.creds.Name != r.cfg.Name {
		return nil, fmt.Errorf("relay: registered as %q; keep that --name or use a fresh --state", r.creds.Name)
	}

	priv, err := relay.LoadOrCreateKey(filepath.Join(dir, keyFile))
	if err != nil {
		return nil, err
	}
	r.pub = priv.Public()
	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("relay: --listen %q: %w; use HOST:PORT such as 0.0.0.0:8444", cfg.Listen, err)
	}
	if cfg.TLSCert != "" || cfg.TLSKey != "" {
		r.cert, err = tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("relay: --tls-cert/--tls-key: %w", err)
		}
	} else {
		hosts := []string{host, "localhost", "127.0.0.1", "::1", tlscert.DefaultHostIP().String()}
		if u, err := url.Parse(cfg.URL); err == nil && u.Hostname() != "" {
			hosts = append(hosts, u.Hostname())
		}
		if r.cert, err = tlscert.LoadOrCreate(dir, "meshlink relay "+r.cfg.Name, hosts); err != nil {
			return nil, fmt.Errorf("relay: %w", err)
		}
	}
	r.fp = wire.CertFingerprint(r.cert.Certificate[0])
	if b, err := os.ReadFile(filepath.Join(dir, nodesFile)); err == nil {
		var ks []key.Public
		if json.Unmarshal(b, &ks) == nil {
			r.setKeys(ks)
		}
	}
	r.srv = relay.NewServer(relay.ServerConfig{Logger: cfg.Logger, PrivateKey: priv, Verify: r.verify})
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r, nil
}

// verify lets a proven key in if the coordinator lists it.
func (r *Relay) verify(k key.Public) error {
	r.mu.Lock()
	ok := r.keys[k]
	r.mu.Unlock()
	if !ok {
		return &relay.AuthError{Status: http.StatusForbidden, Body: wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: "this key is not a node of this mesh (or the relay has not heard of it from the coordinator yet)"}}
	}
	return nil
}

// setKeys replaces the node-key set and drops connections of keys that left.
func (r *Relay) setKeys(ks []key.Public) {
	next := make(map[key.Public]bool, len(ks))
	for _, k := range ks {
		next[k] = true
	}
	r.mu.Lock()
	prev := r.keys
	r.keys = next
	r.mu.Unlock()
	if r.srv == nil {
		return
	}
	for k := range prev {
		if !next[k] {
			r.srv.Disconnect(k)
		}
	}
}

// Start listens and starts following the coordinator. It returns once the
// listeners are up; registration and the node-key stream retry in the
// background, with their progress in the log.
func (r *Relay) Start() error {
	ln, err := net.Listen("tcp", r.cfg.Listen)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("relay: listen %s: address already in use; choose another --listen", r.cfg.Listen)
		}
		return fmt.Errorf("relay: listen %s: %w; choose another --listen", r.cfg.Listen, err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	u := r.cfg.URL
	if u == "" {
		host := ap.Addr()
		if host.IsUnspecified() {
			host = tlscert.DefaultHostIP()
		}
		u = "https://" + netip.AddrPortFrom(host, ap.Port()).String()
	}
	if pu, err := url.Parse(u); err != nil || pu.Scheme != "https" || pu.Port() == "" {
		ln.Close()
		return fmt.Errorf("relay: --url %q must look like https://host:port", u)
	}
	if err := r.startMetrics(); err != nil {
		ln.Close()
		return err
	}
	r.mu.Lock()
	r.url, r.addr = u, ap
	r.mu.Unlock()
	mux := http.NewServeMux()
	mux.Handle(relay.Path, r.srv)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	r.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// The relay protocol is HTTP/1.1 upgrade only, and TLS 1.3 only, like
		// the coordinator: nothing older needs to reach a relay.
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{r.cert}, NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS13},
		ErrorLog:  slog.NewLogLogger(r.log.Handler(), slog.LevelDebug),
	}
	r.wg.Add(2)
	go func() {
		defer r.wg.Done()
		if err := r.http.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			r.log.Error("relay listener failed", "err", err)
		}
	}()
	go func() {
		defer r.wg.Done()
		r.follow()
	}()
	r.log.Info("relay listening", "addr", ap, "url", u, "fingerprint", r.fp, "name", r.cfg.Name)
	return nil
}

// startMetrics serves /metrics until Close, unless metrics are off.
func (r *Relay) startMetrics() error {
	if metricsserver.Off(r.cfg.MetricsListen) {
		return nil
	}
	reg := prometheus.NewRegistry()
	up := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshlink_relay_coordinator_connected",
		Help: "1 while the relay follows the coordinator's node keys, else 0."}, func() float64 {
		if r.Status().Connected {
			return 1
		}
		return 0
	})
	keys := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshlink_relay_known_nodes",
		Help: "Node keys the relay accepts."}, func() float64 { return float64(r.Status().Nodes) })
	reg.MustRegister(relay.NewCollector("meshlink_relay", r.srv), up, keys,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m, err := metricsserver.Start(r.ctx, metricsserver.Config{
		Addr: r.cfg.MetricsListen, Gatherer: reg, Logger: r.log,
		Subsystem: "relay", Flag: "--metrics-listen",
	})
	if err != nil {
		return err
	}
	r.metrics = m
	return nil
}

// MetricsAddr is where metrics are served, if they are.
func (r *Relay) MetricsAddr() netip.AddrPort { return r.metrics.Addr() }

// Status is what the relay knows of itself.
type Status struct {
	URL, Fingerprint, Name string
	Key                    key.Public
	Connected              bool // following the coordinator now
	LastError              string
	Nodes                  int // node keys accepted
	Relay                  relay.ServerStats
}

// Status reports the relay's state.
func (r *Relay) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Status{URL: r.url, Fingerprint: r.fp, Name: r.cfg.Name, Key: r.pub, Connected: r.connected,
		LastError: r.lastErr, Nodes: len(r.keys), Relay: r.srv.Stats()}
}

// Close stops the relay.
func (r *Relay) Close() error {
	r.cancel()
	if r.http != nil {
		r.http.Close()
	}
	r.metrics.Close()
	r.srv.Close()
	r.wg.Wait()
	return nil
}

// follow registers (or refreshes the registration), then holds the
// node-key stream open, reconnecting with backoff, until Close.
func (r *Relay) follow() {
	// Jitter spreads the reconnects of many relays after a coordinator restart.
	bo := backoff.Backoff{Min: r.cfg.RetryMin, Max: r.cfg.RetryMax, Jitter: backoff.EqualJitter}
	registered := false
	for {
		start := time.Now()
		var err error
		if !registered {
			err = r.register()
			registered = err == nil
		}
		if err == nil {
			err = r.stream()
		}
		if r.ctx.Err() != nil {
			return
		}
		r.mu.Lock()
		r.connected = false
		r.lastErr = err.Error()
		r.mu.Unlock()
		var ae *apiError
		if errors.As(err, &ae) && ae.status == http.StatusUnauthorized {
			// Credentials refused: the relay was removed, or the token is
			// bad. Keep serving the last keys, and keep asking.
			registered = false
		}
		if time.Since(start) > 10*time.Second {
			bo.Reset()
		}
		wait := bo.Next()
		r.log.Warn("coordinator unreachable or refusing; relaying for the last known nodes meanwhile", "err", err, "retry_in", wait.Round(time.Millisecond))
		if !backoff.Sleep(r.ctx, wait) {
			return
		}
	}
}

type apiError struct {
	status int
	body   wire.Error
}

func (e *apiError) Error() string {
	return fmt.Sprintf("coordinator answered %d %s: %s", e.status, e.body.Code, e.body.Message)
}

// client returns an HTTP client pinned to the coordinator's certificate.
func (r *Relay) client(fp string) *http.Client {
	conf := wire.PinnedTLSConfig(fp)
	conf.MinVersion = tls.VersionTLS13 // what the coordinator requires
	return &http.Client{Transport: &http.Transport{TLSClientConfig: conf, ForceAttemptHTTP2: true,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout: 10 * time.Second, ResponseHeaderTimeout: 30 * time.Second}}
}

func (r *Relay) post(ctx context.Context, cl *http.Client, base, path string, withCreds bool, body any) (*http.Response, error) {
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	if withCreds {
		r.mu.Lock()
		req.Header.Set(wire.HeaderRelayID, strconv.FormatUint(r.creds.ID, 10))
		req.Header.Set(wire.HeaderRelaySecret, r.creds.Secret)
		r.mu.Unlock()
	}
	resp, err := cl.Do(req)
	if err != nil {
		if errors.Is(err, wire.ErrFingerprint) {
			return nil, fmt.Errorf("the coordinator at %s presents another certificate than the token pins: %w", base, err)
		}
		return nil, fmt.Errorf("coordinator %s unreachable: %w", base, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		ae := &apiError{status: resp.StatusCode}
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		json.Unmarshal(raw, &ae.body)
		return nil, ae
	}
	return resp, nil
}

// register registers with the token, or refreshes the URL, fingerprint
// and key the coordinator lists for this relay.
func (r *Relay) register() error {
	r.mu.Lock()
	c := r.creds
	u := r.url
	r.mu.Unlock()
	req := wire.RelayRegisterRequest{Version: wire.ProtocolVersion, Name: r.cfg.Name, URL: u, Fingerprint: r.fp, Key: r.pub}
	base, fp := c.Coordinator, c.Fingerprint
	withCreds := c.ID != 0
	if !withCreds {
		base, fp = r.token.URL, r.token.Fingerprint
		req.TokenID, req.TokenSecret = r.token.ID, r.token.Secret
	}
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	resp, err := r.post(ctx, r.client(fp), base, wire.PathRelayRegister, withCreds, req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var rr wire.RelayRegisterResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&rr); err != nil {
		return fmt.Errorf("register: bad answer: %w", err)
	}
	if withCreds {
		r.log.Info("registration refreshed", "coordinator", base, "relay_id", c.ID)
		return nil
	}
	c = creds{Coordinator: base, Fingerprint: fp, ID: rr.ID, Secret: rr.Secret, Name: r.cfg.Name}
	b, _ := json.MarshalIndent(c, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(r.cfg.StateDir, credsFile), b, 0o600); err != nil {
		return fmt.Errorf("save relay credentials: %w", err)
	}
	r.mu.Lock()
	r.creds = c
	r.mu.Unlock()
	r.log.Info("registered with the coordinator", "coordinator", base, "relay_id", rr.ID)
	return nil
}

// stream follows the coordinator's node keys until the stream ends.
func (r *Relay) stream() error {
	r.mu.Lock()
	c := r.creds
	r.mu.Unlock()
	resp, err := r.post(r.ctx, r.client(c.Fingerprint), c.Coordinator, wire.PathRelayNodes, true, wire.RelayNodesRequest{Version: wire.ProtocolVersion})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	r.mu.Lock()
	r.connected, r.lastErr = true, ""
	r.mu.Unlock()
	r.log.Info("following the coordinator's node keys", "coordinator", c.Coordinator)
	// The coordinator speaks at least every 15 s; a stream silent for much
	// longer is a dead connection the kernel has not noticed yet.
	idle := time.AfterFunc(streamIdle, func() { resp.Body.Close() })
	defer idle.Stop()
	dec := json.NewDecoder(resp.Body)
	for {
		var m wire.RelayNodes
		if err := dec.Decode(&m); err != nil {
			return fmt.Errorf("node-key stream ended: %w", err)
		}
		idle.Reset(streamIdle)
		if m.Keys == nil {
			continue // keep-alive
		}
		r.setKeys(m.Keys)
		b, _ := json.Marshal(m.Keys)
		if err := atomicfile.WriteFile(filepath.Join(r.cfg.StateDir, nodesFile), b, 0o600); err != nil {
			r.log.Warn("cannot save the node keys; a restart while the coordinator is down would refuse nodes", "err", err)
		}
		r.log.Debug("node keys updated", "nodes", len(m.Keys))
	}
}
