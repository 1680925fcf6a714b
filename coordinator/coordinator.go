// Package coordinator is meshlink's control plane: it registers nodes (with
// a join token, or approved in the web console), keeps nodes, services and
// their VIPs in a store, and streams each connected agent its network map
// as a full map followed by deltas.
//
// Server is embeddable: cmd/meshlink and tests build a Config, call New and
// Start, and Close when done.
package coordinator

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
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
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/internal/atomicfile"
	"github.com/meshlink/meshlink/internal/key"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/oidclogin"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/coordinator/web"
	"github.com/meshlink/meshlink/internal/metricsserver"
	"github.com/meshlink/meshlink/internal/tlscert"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/stun"
	"github.com/meshlink/meshlink/wire"
)

// Config configures a Server.
type Config struct {
	// Listen is the HTTPS address, "10.0.0.1:8443"; "127.0.0.1:0" picks a
	// free port. Default ":8443".
	Listen string
	// DataDir holds the database, the certificate, the relay's and the
	// OIDC cookies' keys and the admin socket; created 0700 if missing.
	DataDir string
	// Store names the database (--store): "" is the SQLite file in
	// DataDir, "sqlite:PATH" another one, "postgres://…" a PostgreSQL
	// database, which several coordinators may share to serve one mesh
	// (they should then share DataDir's certificate and keys too).
	Store string
	// ReplicaURLs (--replica-urls) are the public URLs of the other
	// coordinators on the same database: join tokens and network maps
	// list them, and agents move to one when theirs cannot be reached.
	// They must present the same certificate (a copy of DataDir, or the
	// same TLSCert).
	ReplicaURLs []string
	// URL is the public base URL put into tokens. Default
	// https://<listen address> (an unspecified listen address is replaced by
	// the first non-loopback interface address, else 127.0.0.1).
	URL string
	// Domain is the DNS suffix of the mesh; default wire.DefaultDomain.
	Domain string
	// Logger receives structured logs; nil discards.
	Logger *slog.Logger
	// KeepAlive is the longest map-stream keep-alive interval, and with
	// replicas the heartbeat's; default 55s for keep-alives and 15s for
	// the heartbeat. A stream's interval is also at most half of what its
	// agent waits on a silent stream (wire.MapRequest.MapIdle: 120s by
	// default, 60s for agents before protocol version 15), and a relay's
	// at most 30s (relays wait 60s).
	KeepAlive time.Duration
	// MapDebounce bounds the time between two wake-ups of the map
	// streams (the changes within one travel together), which grows with
	// the streams: 25µs each, at least 5ms, at most this; default 250ms.
	MapDebounce time.Duration
	// MapSendSlots bounds the woken map streams that build and write a
	// message at once (sendGate); 0: 8 per CPU (GOMAXPROCS).
	MapSendSlots int
	// EphemeralGrace is how long an ephemeral node may be offline before it
	// is removed; default 30s.
	EphemeralGrace time.Duration
	// TLSCert and TLSKey are PEM files of a certificate to serve instead of
	// the self-signed one kept in DataDir.
	TLSCert, TLSKey string
	// Out receives the messages a person starting the coordinator must see
	// (URL, where the first admin password is); nil discards.
	Out io.Writer
	// MetricsListen is where Prometheus metrics are served over plain HTTP
	// at /metrics, "127.0.0.1:9090"; "127.0.0.1:0" picks a free port. ""
	// or "off" disables them.
	MetricsListen string
	// RegisterPollWait is how long PathRegisterPoll holds an agent waiting
	// for its approval; default 30s.
	RegisterPollWait time.Duration

	// OIDCIssuer enables console sign-in with this OpenID provider
	// (--oidc-issuer); the provider is discovered at Start, which fails if
	// it cannot be. OIDCClientID and OIDCClientSecret are the coordinator's
	// client registration there.
	OIDCIssuer, OIDCClientID, OIDCClientSecret string
	// OIDCRedirectURL is the callback registered with the provider; default
	// <URL>/login/oidc/callback.
	OIDCRedirectURL string
	// OIDCHTTPClient makes the calls to the provider; nil is
	// http.DefaultClient.
	OIDCHTTPClient *http.Client
	// OIDCAllowedDomains (--oidc-allowed-domains) admits only identities
	// whose verified email is at one of these domains; OIDCAllowedGroups
	// (--oidc-allowed-groups) only those whose "groups" claim holds one
	// of these. Empty admits all. Both are checked at every sign-in.
	OIDCAllowedDomains, OIDCAllowedGroups []string
	// OIDCNewUsersPending (--oidc-new-users=pending) creates the account
	// of a first OIDC sign-in as pending: it cannot sign in until an admin
	// approves it (Users page, `meshlink users approve`).
	OIDCNewUsersPending bool
	// NoEmbeddedRelay turns the coordinator's own relay off (--relay=false):
	// agents then use only standalone relays (`meshlink relay`).
	NoEmbeddedRelay bool

	// BodyTimeout is how long a request has to send its body once its
	// headers are in; default 10s. Streams are bounded only while their
	// request body arrives.
	BodyTimeout time.Duration
	// MaxConns caps the HTTPS connections open at once; default 8192.
	// MaxConnsPerSource caps those from one IPv4 address or IPv6 /64;
	// default 256. A connection over a cap is closed as it is accepted.
	MaxConns, MaxConnsPerSource int
	// AllowLoopbackEndpoints keeps loopback addresses among the endpoints
	// nodes publish (hidden flag --allow-loopback-endpoints): only for a
	// whole mesh on one host, the demo and the in-process tests. Otherwise
	// they are dropped with the other addresses no peer can reach a node by.
	AllowLoopbackEndpoints bool

	// MaxServicesPerNode bounds the services one node provides
	// (--max-services-per-node); default 64, at most the number of VIPs.
	MaxServicesPerNode int
	// ServiceGrace is how long a service without providers keeps its name
	// and VIP before it is deleted and the VIP may go to a new service
	// (--service-grace); default 24h.
	ServiceGrace time.Duration
	// NodeAddressQuarantine is how long the addresses of a removed node
	// stay unused (--node-address-quarantine), so that a new node never
	// gets an address an old peer may still route to the removed one;
	// default 24h.
	NodeAddressQuarantine time.Duration
	// NodeKeyExpiry is how long a node's key is accepted after its
	// registration or its last rotation (--node-key-expiry); agents
	// rotate well before. Default DefaultNodeKeyExpiry; negative: keys
	// never expire (--node-key-expiry 0). A token may set a shorter one.
	NodeKeyExpiry time.Duration
	// nodePoolSize, when set, bounds the node addresses (tests).
	nodePoolSize int64
	// MembersCannotMintTokens leaves minting join tokens in the console to
	// admins (--members-can-mint-tokens=false); members then join sites
	// with tokens an admin gives them, or by approval.
	MembersCannotMintTokens bool
}

// TokenOptions describes a join token to create.
type TokenOptions struct {
	Reusable  bool          `json:"reusable,omitempty"`
	Ephemeral bool          `json:"ephemeral,omitempty"`
	Expires   time.Duration `json:"expires,omitempty"` // 0: never
	Tags      []string      `json:"tags,omitempty"`
	// Owner is the user owning the token and the nodes it joins; 0 (the
	// admin socket and CLI) means the first admin. Never taken from JSON.
	Owner int64 `json:"-"`
	// Relay makes a token that registers a standalone relay instead of
	// joining a node.
	Relay bool `json:"relay,omitempty"`
	// User names the owner on the admin socket (`token create --user`);
	// "" is the first admin. An unknown name is refused.
	User string `json:"user,omitempty"`
	// KeyExpiry is the key lifetime of the nodes the token joins
	// (`token create --key-expiry`); 0 is the coordinator's
	// --node-key-expiry, which also caps a longer one.
	KeyExpiry time.Duration `json:"key_expiry,omitempty"`
}

// DefaultNodeKeyExpiry is the default Config.NodeKeyExpiry: 180 days.
const DefaultNodeKeyExpiry = 180 * 24 * time.Hour

const (
	dbFile       = store.DefaultSQLiteFile
	oidcKeyFile  = "oidc-cookie.key"
	relayKeyFile = "relay.key"
	adminSocket  = "admin.sock"
	maxBodyBytes = 1 << 20
)

// AdminPasswordFile is the file in the data directory (mode 0600) that
// holds the first admin's one-time password, from the first start until
// the admin replaces it at first sign-in. The password is never printed:
// output and logs are read by more people than the data directory.
const AdminPasswordFile = "admin-password.txt"

// Server is a running (or ready to run) coordinator.
type Server struct {
	cfg         Config
	log         *slog.Logger
	out         io.Writer
	store       store.Store
	cert        tls.Certificate
	fingerprint string
	hub         hub
	relay       *relay.Server
	relayPub    key.Public  // the embedded relay's public key, also the coordinator's (wire.ServerKey)
	serverKey   key.Private // its private half: opens registration key proofs
	metrics     *metrics
	console     *web.Console
	joinFails   joinFailures
	denials     denialEvents // reported denials, coalesced into events
	// tooOldSaid holds "service/node/protocol" of the providers withheld
	// for being too old (Server.tooOld), each logged once.
	tooOldSaid sync.Map
	// endpointLimit bounds how often a node changes its endpoints.
	endpointLimit endpointLimiter
	// health is what providers report of their targets; healthLimit
	// bounds how often a node reports.
	health      healthTable
	healthLimit endpointLimiter

	ctx    context.Context // canceled by Close; the base of every request
	cancel context.CancelFunc

	// wg counts request handlers and timers started by the server, so that
	// Close can wait for them before closing the store.
	wg sync.WaitGroup

	mu         sync.Mutex // guards the fields below
	started    bool
	closed     bool
	ln         net.Listener
	adminLn    net.Listener
	httpSrv    *http.Server
	adminSrv   *http.Server
	metricsSrv *metricsserver.Server // nil when metrics are off
	url        string
	addr       netip.AddrPort
	stun       *stun.Server // nil when its UDP port could not be bound

	snapMu sync.Mutex // held while building a snapshot; guards snap and snapLog for writing
	// logMu guards snap and snapLog too (writers hold both), so that
	// reading the log (mergeLog) never waits for a snapshot being built.
	logMu sync.Mutex
	// latest is snap, readable without a lock: a woken stream whose
	// wake-up the newest snapshot covers takes it without queueing behind
	// the build of the next one.
	latest atomic.Pointer[snapshot]
	// sends bounds the map streams that work on a message at once
	// (mapstream.go, sendGate).
	sends sendGate
	snap  *snapshot
	// snapLog holds the deltas of the last snapshots built, the newest
	// last (snap.delta), at most maxSnapLog: a map stream further behind
	// gets a full map.
	snapLog []*snapDelta

	verdicts verdictDir // for the rule named in denial events

	// policy is the access policy in force; SetPolicy replaces it whole.
	policy   atomic.Pointer[activePolicy]
	policyMu sync.Mutex // serialises SetPolicy

	// expiryWake wakes expireKeys (buffered: one pending is enough).
	expiryWake chan struct{}
	// sweptGen is the generation of the last wake-up Server.sweep has
	// gone through.
	sweptGen atomic.Uint64
	// sweepDone is closed and replaced at the end of every sweep.
	sweepMu   sync.Mutex
	sweepDone chan struct{}
	// notifyWake wakes notifyReplicas (buffered: one pending is enough).
	notifyWake chan struct{}
	expiryMu   sync.Mutex // guards expiryAnnounced and expiryNext
	// expiryNext is when expireKeys looks next (zero: it is looking
	// now), so that a registration whose key expires later need not wake it.
	expiryNext time.Time
	// expiryAnnounced holds, per node whose key expiry was announced (an
	// event, a new map), the expiry it was announced at.
	expiryAnnounced map[wire.NodeID]time.Time
	// heartbeat is how often a map stream tells the replicas its node is
	// online here (Config.KeepAlive).
	heartbeat time.Duration
}

// New opens the store in cfg.DataDir and loads or creates the certificate.
// Nothing listens until Start.
func New(cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("coordinator: no data directory; pass --data DIR")
	}
	if cfg.Listen == "" {
		cfg.Listen = ":8443"
	}
	if cfg.Domain == "" {
		cfg.Domain = wire.DefaultDomain
	}
	// Keep-alives are most of an idle coordinator's CPU (one write per
	// stream per interval: 11% of a core at 10,000 streams every 15s, 6%
	// every 30s); 55s, less up to a quarter of jitter, is what Tailscale's
	// and Headscale's map streams do, leaves the agents' watchdog (120s)
	// twice the interval, and stays under the 60s idle timeout of common
	// load balancers. Older agents (a 60s watchdog) get 30s (keepAliveFor).
	// The replicas' heartbeat keeps 15s: how soon a dead replica's nodes
	// show offline (three missed) rides on it.
	heartbeat := cfg.KeepAlive
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive, heartbeat = 55*time.Second, 15*time.Second
	}
	if cfg.MapDebounce <= 0 {
		cfg.MapDebounce = 250 * time.Millisecond
	}
	if cfg.EphemeralGrace <= 0 {
		cfg.EphemeralGrace = 30 * time.Second
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = defaultBodyTimeout
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = defaultMaxConns
	}
	if cfg.MaxConnsPerSource <= 0 {
		cfg.MaxConnsPerSource = defaultMaxConnsPerSource
	}
	if cfg.MaxServicesPerNode < 0 || cfg.MaxServicesPerNode > maxServicesPerNode {
		return nil, fmt.Errorf("coordinator: --max-services-per-node %d is out of range; choose 1 to %d", cfg.MaxServicesPerNode, maxServicesPerNode)
	}
	if cfg.MaxServicesPerNode == 0 {
		cfg.MaxServicesPerNode = defaultMaxServicesPerNode
	}
	if cfg.ServiceGrace < 0 {
		return nil, fmt.Errorf("coordinator: --service-grace %v is negative; use a duration such as 24h", cfg.ServiceGrace)
	}
	if cfg.ServiceGrace == 0 {
		cfg.ServiceGrace = defaultServiceGrace
	}
	if cfg.NodeAddressQuarantine < 0 {
		return nil, fmt.Errorf("coordinator: --node-address-quarantine %v is negative; use a duration such as 24h", cfg.NodeAddressQuarantine)
	}
	if cfg.NodeAddressQuarantine == 0 {
		cfg.NodeAddressQuarantine = store.DefaultNodeQuarantine
	}
	if cfg.NodeKeyExpiry == 0 {
		cfg.NodeKeyExpiry = DefaultNodeKeyExpiry
	}
	cfg.URL = strings.TrimRight(cfg.URL, "/")
	var urlHost string
	if cfg.URL != "" {
		u, err := url.Parse(cfg.URL)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("coordinator: URL %q must look like https://host:port", cfg.URL)
		}
		urlHost = u.Hostname()
	}
	for i, r := range cfg.ReplicaURLs {
		r = strings.TrimRight(r, "/")
		u, err := url.Parse(r)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("coordinator: --replica-urls: %q must look like https://host:port", r)
		}
		cfg.ReplicaURLs[i] = r
	}
	listenHost, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("coordinator: listen address %q: %w; use HOST:PORT such as 0.0.0.0:8443", cfg.Listen, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("subsystem", "coordinator")
	out := cfg.Out
	if out == nil {
		out = io.Discard
	}

	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("coordinator: data directory %s: %w", cfg.DataDir, err)
	}
	cfg.DataDir = dir
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return nil, fmt.Errorf("coordinator: data directory %s: %w; or choose another --data", dir, err)
	}
	if probe, err := os.CreateTemp(dir, ".write-probe-"); err != nil {
		return nil, fmt.Errorf("coordinator: data directory %s is not writable: %w; choose another --data or fix its permissions", dir, err)
	} else {
		probe.Close()
		os.Remove(probe.Name())
	}

	hosts := []string{listenHost, urlHost, "localhost", "127.0.0.1", "::1"}
	if ip := net.ParseIP(listenHost); listenHost == "" || ip != nil && ip.IsUnspecified() {
		hosts = append(hosts, tlscert.DefaultHostIP().String())
	}
	var cert tls.Certificate
	if cfg.TLSCert != "" || cfg.TLSKey != "" {
		// A real certificate (for example from a public CA): agents can
		// then join by web login without --fingerprint; tokens still pin it.
		cert, err = tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("coordinator: --tls-cert/--tls-key: %w", err)
		}
	} else {
		cert, err = tlscert.LoadOrCreate(dir, "meshlink coordinator", hosts)
	}
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	relayKey, err := relay.LoadOrCreateKey(filepath.Join(dir, relayKeyFile))
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	relayPub := relayKey.Public()
	st, err := store.Open(context.Background(), cfg.Store, filepath.Join(dir, dbFile), store.Options{
		MaxServicesPerNode: cfg.MaxServicesPerNode, NodeQuarantine: cfg.NodeAddressQuarantine, NodePoolSize: cfg.nodePoolSize})
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		healthLimit: endpointLimiter{burst: healthBurst, every: healthEvery},
		cfg:         cfg,
		log:         log,
		out:         out,
		store:       st,
		cert:        cert,
		fingerprint: wire.CertFingerprint(cert.Certificate[0]),
		relayPub:    relayPub,
		serverKey:   relayKey,
		ctx:         ctx,
		cancel:      cancel,

		expiryWake:      make(chan struct{}, 1),
		notifyWake:      make(chan struct{}, 1),
		sweepDone:       make(chan struct{}),
		expiryAnnounced: map[wire.NodeID]time.Time{},
		heartbeat:       heartbeat,
	}
	s.hub.init(cfg.MapDebounce)
	slots := cfg.MapSendSlots
	if slots <= 0 {
		slots = 8 * runtime.GOMAXPROCS(0)
	}
	s.sends.init(slots)
	if err := s.loadPolicy(ctx); err != nil {
		st.Close()
		cancel()
		return nil, err
	}
	s.relay = relay.NewServer(relay.ServerConfig{Logger: cfg.Logger, PrivateKey: relayKey, Verify: s.relayVerify})
	s.metrics = newMetrics(s)
	s.console = web.New(web.Config{Store: st, Mesh: consoleMesh{s}, URL: s.URL, Logger: cfg.Logger, PollWait: cfg.RegisterPollWait,
		PasswordChanged: s.passwordChanged, MembersCannotMintTokens: cfg.MembersCannotMintTokens,
		OIDC: web.OIDCPolicy{AllowedDomains: cfg.OIDCAllowedDomains, AllowedGroups: cfg.OIDCAllowedGroups, NewUsersPending: cfg.OIDCNewUsersPending}})
	return s, nil
}

// Fingerprint is the pinned fingerprint of the coordinator's certificate.
func (s *Server) Fingerprint() string { return s.fingerprint }

// URL is the base URL put into tokens; known after Start unless Config.URL
// was set.
func (s *Server) URL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.url != "" {
		return s.url
	}
	return s.cfg.URL
}

// Addr is the address the HTTPS API listens on, valid after Start.
func (s *Server) Addr() netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// STUNAddr is the address of the STUN responder, valid after Start; zero
// when it could not be started.
func (s *Server) STUNAddr() netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stun == nil {
		return netip.AddrPort{}
	}
	return s.stun.Addr()
}

// Relay exposes the embedded relay, for its statistics.
func (s *Server) Relay() *relay.Server { return s.relay }

// Store exposes the server's store to tests and embedding programs.
func (s *Server) Store() store.Store { return s.store }

// Start listens on the HTTPS address and the admin socket and serves both
// until Close.
func (s *Server) Start(ctx context.Context) (err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("coordinator: Start after Close")
	}
	if s.started {
		s.mu.Unlock()
		return errors.New("coordinator: already started")
	}
	s.started = true
	s.mu.Unlock()

	sockPath := filepath.Join(s.cfg.DataDir, adminSocket)
	if err := clearStaleSocket(ctx, sockPath, s.cfg.DataDir); err != nil {
		return err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("coordinator: listen %s: address already in use; choose another --listen", s.cfg.Listen)
		}
		return fmt.Errorf("coordinator: listen %s: %w; choose another --listen", s.cfg.Listen, err)
	}
	defer func() {
		if err != nil {
			ln.Close()
		}
	}()
	if len(sockPath) > 100 {
		return fmt.Errorf("coordinator: admin socket path %s is too long for a Unix socket; use a shorter --data", sockPath)
	}
	adminLn, err := lc.Listen(ctx, "unix", sockPath)
	if err != nil {
		return fmt.Errorf("coordinator: admin socket %s: %w", sockPath, err)
	}
	defer func() {
		if err != nil {
			adminLn.Close()
		}
	}()
	if err := os.Chmod(sockPath, 0o600); err != nil {
		return fmt.Errorf("coordinator: admin socket %s: %w", sockPath, err)
	}
	metricsSrv, err := s.startMetrics()
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			metricsSrv.Close()
		}
	}()

	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	u := s.cfg.URL
	if u == "" {
		host := addr.Addr()
		if host.IsUnspecified() {
			host = tlscert.DefaultHostIP()
		}
		u = "https://" + netip.AddrPortFrom(host, addr.Port()).String()
	}

	if s.cfg.OIDCIssuer != "" {
		p, err := s.newOIDC(ctx, u)
		if err != nil {
			return err
		}
		s.console.SetOIDC(p)
	}

	errLog := slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
	httpSrv := &http.Server{
		Handler:           limitBody(s.cfg.BodyTimeout, s.apiHandler()),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          errLog,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}
	tlsCfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{s.cert},
		NextProtos:   []string{"h2", "http/1.1"},
	}
	adminSrv := &http.Server{
		Handler:           s.adminHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          errLog,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}

	// The first admin account is created once the URL is known, so that
	// where to use its one-time password is printed next to where it is.
	if err := s.firstStart(ctx, u); err != nil {
		return err
	}

	// STUN answers on the UDP port matching the HTTPS one, so that agents
	// find it from the URL alone. It is an optimisation: without it agents
	// still reach each other through the relay.
	stunSrv, err := stun.Listen(ln.Addr().String(), s.cfg.Logger)
	if err != nil {
		s.log.Warn("STUN responder not started; agents behind NAT will rely more on the relay", "err", err)
		stunSrv, err = nil, nil
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if stunSrv != nil {
			stunSrv.Close()
		}
		return errors.New("coordinator: closed during Start")
	}
	s.ln, s.adminLn, s.httpSrv, s.adminSrv, s.url, s.addr, s.stun = ln, adminLn, httpSrv, adminSrv, u, addr, stunSrv
	s.metricsSrv = metricsSrv
	s.wg.Add(6)
	s.mu.Unlock()
	if n, ok := s.store.(store.Notifier); ok {
		s.wg.Add(2)
		go func() {
			defer s.wg.Done()
			s.notifyReplicas(n)
		}()
		go func() {
			defer s.wg.Done()
			n.WatchChanges(s.ctx, s.replicaChanged)
		}()
	}
	go s.summarizeJoinFailures()
	go func() {
		defer s.wg.Done()
		s.sweep()
	}()
	go func() {
		defer s.wg.Done()
		s.expireKeys()
	}()
	go func() {
		defer s.wg.Done()
		s.deleteIdleServices()
	}()
	go func() {
		defer s.wg.Done()
		// The handshake's timeout is the server's ReadHeaderTimeout, as
		// net/http's own would be.
		hl := newHandshakeListener(newLimitListener(ln, s.cfg.MaxConns, s.cfg.MaxConnsPerSource, s.log), tlsCfg, httpSrv.ReadHeaderTimeout, errLog.Printf)
		if err := httpSrv.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("https server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if err := adminSrv.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin server stopped", "err", err)
		}
	}()

	// Ephemeral nodes are all offline after a restart: give each the grace
	// period to come back.
	if nodes, err := s.store.ListNodes(ctx); err == nil {
		for _, n := range nodes {
			if n.Ephemeral {
				s.scheduleReap(n.ID, n.LastSeen)
			}
		}
	}
	fmt.Fprintf(s.out, "meshlink coordinator listening on %s (fingerprint %s)\n", u, s.fingerprint)
	s.log.Info("listening", "url", u, "addr", addr.String(), "fingerprint", s.fingerprint, "admin_socket", sockPath)
	return nil
}

// newOIDC discovers the configured OpenID provider; base is the
// coordinator's URL. Its errors come from oidclogin.New and name the flag to
// fix.
func (s *Server) newOIDC(ctx context.Context, base string) (*oidclogin.Provider, error) {
	key, err := loadOrCreateKey(filepath.Join(s.cfg.DataDir, oidcKeyFile))
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	redirect := s.cfg.OIDCRedirectURL
	if redirect == "" {
		redirect = base + "/login/oidc/callback"
	}
	p, err := oidclogin.New(ctx, oidclogin.Config{
		Issuer:       s.cfg.OIDCIssuer,
		ClientID:     s.cfg.OIDCClientID,
		ClientSecret: s.cfg.OIDCClientSecret,
		RedirectURL:  redirect,
		HTTPClient:   s.cfg.OIDCHTTPClient,
		CookieKey:    key,
		Logger:       s.cfg.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	s.log.Info("console sign-in with OIDC enabled", "issuer", s.cfg.OIDCIssuer, "redirect_url", redirect)
	return p, nil
}

// loadOrCreateKey reads the 32-byte key sealing OIDC login cookies, or
// creates it (0600). Keeping it across restarts keeps sign-ins that were in
// flight working.
func loadOrCreateKey(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err == nil && len(key) == 32 {
		return key, nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	// Missing or damaged: a new key only fails logins in flight.
	key = make([]byte, 32)
	rand.Read(key)
	if err := atomicfile.WriteFile(path, key, 0o600); err != nil {
		return nil, err
	}
	return key, nil
}

// deleteIdleServices deletes, until the server closes, the services that
// have had no provider for ServiceGrace, checking a few times per grace
// period (at most every minute), so a service lives at most a quarter
// grace beyond it.
func (s *Server) deleteIdleServices() {
	every := max(min(s.cfg.ServiceGrace/4, time.Minute), time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		gone, err := s.store.DeleteIdleServices(s.ctx, s.cfg.ServiceGrace)
		if err != nil && s.ctx.Err() == nil {
			s.log.Warn("deleting idle services", "err", err)
		}
		for _, name := range gone {
			s.commit(change{log: "service deleted: no provider within the grace period", attrs: []any{"service", name, "grace", s.cfg.ServiceGrace},
				event: store.Event{Kind: store.EventUnexpose, Actor: "coordinator", Message: fmt.Sprintf("%s deleted after %v without a provider; its VIP may go to a new service", name, s.cfg.ServiceGrace)}})
		}
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close stops serving, ends every map stream, waits for the server's
// goroutines and closes the store. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	httpSrv, adminSrv, metricsSrv, stunSrv := s.httpSrv, s.adminSrv, s.metricsSrv, s.stun
	s.mu.Unlock()

	s.cancel() // ends map streams and pending timers
	// Relay connections are hijacked: http.Server.Shutdown neither sees
	// nor waits for them.
	s.relay.Close()
	if stunSrv != nil {
		stunSrv.Close()
	}
	for _, srv := range []*http.Server{httpSrv, adminSrv} {
		if srv == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := srv.Shutdown(ctx); err != nil {
			srv.Close()
		}
		cancel()
	}
	metricsSrv.Close()
	s.wg.Wait()
	return s.store.Close()
}

// track runs h as a request the server waits for on Close.
func (s *Server) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			writeError(w, apiErr(http.StatusServiceUnavailable, wire.ErrCodeInternal, "the coordinator is shutting down; retry shortly"))
			return
		}
		s.wg.Add(1)
		s.mu.Unlock()
		defer s.wg.Done()
		h.ServeHTTP(w, r)
	})
}

// CreateToken mints a join token.
func (s *Server) CreateToken(ctx context.Context, o TokenOptions) (string, error) {
	u := s.URL()
	if u == "" {
		return "", errors.New("coordinator: the coordinator's URL is not known before Start; set Config.URL or start it first")
	}
	if o.Expires < 0 {
		return "", errors.New("coordinator: token expiry must not be negative")
	}
	if o.KeyExpiry < 0 || o.KeyExpiry > 0 && o.KeyExpiry < time.Second {
		return "", fmt.Errorf("coordinator: node key expiry %v must be at least 1s, or 0 for the coordinator's (%v)", o.KeyExpiry, s.keyLifetime(0))
	}
	if o.Relay && o.KeyExpiry != 0 {
		return "", errors.New("coordinator: a relay token joins no node: it takes no node key expiry")
	}
	tags := make([]string, 0, len(o.Tags))
	for _, t := range o.Tags {
		t = strings.TrimSpace(t)
		if t == "" {
			continue
		}
		if len(t) > 128 {
			return "", fmt.Errorf("coordinator: tag %q is longer than 128 characters", t)
		}
		tags = append(tags, t)
	}
	var idb [8]byte
	rand.Read(idb[:])
	tok := store.Token{
		ID:        hex.EncodeToString(idb[:]),
		Reusable:  o.Reusable,
		Ephemeral: o.Ephemeral,
		Relay:     o.Relay,
		Tags:      tags,
		Created:   time.Now(),
		KeyExpiry: o.KeyExpiry,
	}
	// No owner: the caller has no console session (the admin socket, an
	// embedding program). The console records its own event.
	viaAdminSocket := o.Owner == 0
	if o.Owner == 0 {
		owner, err := s.firstAdmin(ctx)
		if err != nil {
			return "", fmt.Errorf("coordinator: %w", err)
		}
		o.Owner = owner
	}
	tok.OwnerID = o.Owner
	if !o.Relay {
		if err := s.checkTags(ctx, o.Owner, tags); err != nil {
			var te *TagError
			if errors.As(err, &te) {
				actor := "admin socket"
				if !viaAdminSocket {
					actor = s.userName(ctx, o.Owner)
				}
				s.console.Record(store.Event{Kind: store.EventTokenRefused, Actor: actor, OwnerID: o.Owner,
					Message: fmt.Sprintf("refused a token with tag:%s for %s: %s", te.Tag, s.userName(ctx, o.Owner), te.Why)})
			}
			return "", fmt.Errorf("coordinator: %w", err)
		}
	}
	secret := randomSecret(32)
	tok.SecretHash = store.HashSecret(secret)
	jt := wire.JoinToken{URL: u, Fingerprint: s.fingerprint, ID: tok.ID, Secret: secret}
	if all := s.coordinatorURLs(); len(all) > 1 {
		jt.URLs = all[1:]
	}
	if o.Expires > 0 {
		tok.Expires = tok.Created.Add(o.Expires)
		jt.Expires = tok.Expires.Unix()
	}
	if err := s.store.CreateToken(ctx, tok); err != nil {
		return "", fmt.Errorf("coordinator: %w", err)
	}
	s.log.Info("token created", "token_id", tok.ID, "reusable", tok.Reusable, "ephemeral", tok.Ephemeral, "expires", tok.Expires, "node_key_expiry", s.keyLifetime(tok.KeyExpiry))
	if viaAdminSocket {
		s.console.Record(store.Event{Kind: store.EventTokenCreated, Actor: "admin socket", Message: "minted token " + tok.ID, OwnerID: tok.OwnerID})
	}
	return jt.String(), nil
}

// firstStart creates the first admin, with a one-time password in
// AdminPasswordFile that must be changed at first sign-in, when there is no
// account yet; otherwise it removes a password file left behind by an
// admin who has changed the password.
func (s *Server) firstStart(ctx context.Context, u string) error {
	pwFile := filepath.Join(s.cfg.DataDir, AdminPasswordFile)
	n, err := s.store.CountUsers(ctx)
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	if n > 0 {
		if _, err := os.Stat(pwFile); err == nil {
			if id, err := s.firstAdmin(ctx); err == nil && id != 0 {
				if a, err := s.store.GetUserByID(ctx, id); err == nil && !a.MustChangePassword {
					s.removeAdminPasswordFile()
				}
			}
		}
		return nil
	}
	pw := randomSecret(18)
	hash, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
	if err != nil {
		return fmt.Errorf("coordinator: hash admin password: %w", err)
	}
	// The file first: an account whose password nobody can read would
	// need a new data directory.
	if err := atomicfile.WriteFile(pwFile, []byte(pw+"\n"), 0o600); err != nil {
		return fmt.Errorf("coordinator: admin password: %w; check that --data %s is writable", err, s.cfg.DataDir)
	}
	if _, err := s.store.CreateUser(ctx, store.User{Username: "admin", PasswordHash: string(hash), Admin: true, MustChangePassword: true}); err != nil {
		os.Remove(pwFile)
		if errors.Is(err, store.ErrExists) {
			// Another coordinator on the same database started at the
			// same moment and made the first admin: its data directory
			// has the password.
			return nil
		}
		return fmt.Errorf("coordinator: %w", err)
	}
	fmt.Fprintf(s.out, "meshlink coordinator: first start in %s\n  admin account: username admin, password in %s\n  (sign in at %s and choose a new password; the file is removed then)\n", s.cfg.DataDir, pwFile, u)
	return nil
}

// passwordChanged is the console's Config.PasswordChanged: once the first
// admin has replaced the one-time password, its file goes.
func (s *Server) passwordChanged(ctx context.Context, u store.User) {
	if id, err := s.firstAdmin(ctx); err == nil && id == u.ID {
		s.removeAdminPasswordFile()
	}
}

func (s *Server) removeAdminPasswordFile() {
	pwFile := filepath.Join(s.cfg.DataDir, AdminPasswordFile)
	if err := os.Remove(pwFile); err == nil {
		s.log.Info("removed the first admin's one-time password file", "path", pwFile)
	} else if !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("remove the first admin's one-time password file; delete it by hand", "path", pwFile, "err", err)
	}
}

// firstAdmin is the owner of what the admin socket creates: the oldest
// admin account (0 before the first start created one).
func (s *Server) firstAdmin(ctx context.Context) (int64, error) {
	users, err := s.store.ListUsers(ctx)
	if err != nil {
		return 0, err
	}
	for _, u := range users {
		if u.Admin {
			return u.ID, nil
		}
	}
	return 0, nil
}

// consoleMesh is the server as the web console sees it.
type consoleMesh struct{ s *Server }

func (m consoleMesh) State(ctx context.Context) ([]wire.Node, []wire.Service, error) {
	snap, err := m.s.current(ctx)
	if err != nil {
		return nil, nil, err
	}
	return snap.nodes, snap.services, nil
}

func (m consoleMesh) Policy(ctx context.Context) (web.PolicyView, error) {
	pi := m.s.Policy()
	acc, err := m.s.AccessMatrix(ctx, nil)
	if err != nil {
		return web.PolicyView{}, err
	}
	pv := web.PolicyView{Text: pi.Text, Updated: pi.Updated, UpdatedBy: pi.UpdatedBy, Default: pi.Default, Services: acc.Services}
	for _, row := range acc.Rows {
		pv.Rows = append(pv.Rows, web.PolicyRow{Node: row.Node, Owner: row.Owner, OwnerID: row.OwnerID, Allow: row.Allow})
	}
	return pv, nil
}

func (m consoleMesh) SetPolicy(ctx context.Context, text, by string) (web.PolicyChange, error) {
	pc, err := m.s.SetPolicy(ctx, "policy", text, by)
	var pe *PolicyError
	if errors.As(err, &pe) {
		return web.PolicyChange{}, &web.PolicyRejected{Problems: pe.Error()}
	}
	return web.PolicyChange{Granted: pc.Granted, Revoked: pc.Revoked}, err
}

func (m consoleMesh) RemoveUser(ctx context.Context, id int64, actor string) (web.RemovedUser, error) {
	u, err := m.s.store.GetUserByID(ctx, id)
	if err != nil {
		return web.RemovedUser{}, err
	}
	ru, err := m.s.removeUser(ctx, u.Username, actor)
	return web.RemovedUser{Name: u.Username, TokensRevoked: ru.TokensRevoked, NodesRemoved: ru.NodesRemoved}, err
}

func (m consoleMesh) Changed() <-chan struct{} {
	_, ch := m.s.hub.watch()
	return ch
}

func (m consoleMesh) RemoveNode(ctx context.Context, id wire.NodeID, ev store.Event) error {
	return m.s.removeNode(ctx, id, change{event: ev})
}

func (m consoleMesh) CreateToken(ctx context.Context, o web.TokenRequest) (string, error) {
	return m.s.CreateToken(ctx, TokenOptions{Owner: o.OwnerID, Reusable: o.Reusable, Ephemeral: o.Ephemeral, Expires: o.Expires, Tags: o.Tags, KeyExpiry: o.KeyExpiry})
}

// Relays lists the relays of the current maps; the embedded one, first
// when enabled, carries its live counters.
func (m consoleMesh) Relays(ctx context.Context) ([]web.RelayInfo, error) {
	snap, err := m.s.current(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]web.RelayInfo, 0, len(snap.relays))
	for i, r := range snap.relays {
		ri := web.RelayInfo{Name: r.Name, URL: r.URL, Fingerprint: r.Fingerprint, Key: r.Key}
		// relayList puts the embedded relay first, when it is on; a
		// standalone relay may have registered under the same name.
		if i == 0 && !m.s.cfg.NoEmbeddedRelay {
			st := m.s.relay.Stats()
			ri.Embedded = true
			ri.Counters = &web.RelayCounters{Clients: st.Clients, Accepted: st.Accepted, PacketsRelayed: st.PacketsRelayed,
				BytesRelayed: st.BytesRelayed, Dropped: st.Dropped}
		}
		out = append(out, ri)
	}
	return out, nil
}

func (m consoleMesh) RegisterNode(ctx context.Context, a web.Approved) (wire.RegisterResponse, error) {
	resp, e := m.s.registerNode(ctx, nodeRegistration{
		Registration: store.Registration{Name: a.Name, Hostname: a.Hostname, Key: a.Key, ListenPort: a.ListenPort, Endpoints: a.Endpoints,
			KeyProven: a.KeyProven, Approval: &store.Approval{OwnerID: a.ByID, Admin: a.ByAdmin}},
		approver: a.By, remoteIP: a.RemoteIP,
	})
	switch {
	case e == nil:
		return resp, nil
	case e.status == http.StatusConflict:
		return resp, &e.Error // the agent's to fix: web.Mesh's contract
	default:
		return resp, errors.New(e.Message) // not a *wire.Error: internal
	}
}

// randomSecret returns n random bytes, base64url without padding.
func randomSecret(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// clearStaleSocket removes an admin socket nobody answers on, and refuses
// to start when another coordinator answers there.
func clearStaleSocket(ctx context.Context, path, dataDir string) error {
	if _, err := os.Lstat(path); err != nil {
		return nil
	}
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("coordinator: another coordinator is already running with --data %s (its admin socket %s answers); stop it or choose another --data", dataDir, path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("coordinator: remove stale admin socket %s: %w", path, err)
	}
	return nil
}
