// Package agent is the meshlink agent: one per site. It joins the
// coordinator, follows the network map, runs WireGuard over the project's
// userspace netstack, serves DNS, consumes services through local proxies,
// provides the services the site exports, and answers the local API.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/device"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/httpauth"
	"github.com/meshlink/meshlink/agent/httpmesh"
	"github.com/meshlink/meshlink/agent/httpobs"
	"github.com/meshlink/meshlink/agent/localproxy"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/dns"
	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/wire"
)

// Defaults for Config fields left zero.
const (
	// DefaultProxyRange holds the local addresses of consumed services:
	// VIP 100.100.X.Y is served at 127.100.X.Y.
	DefaultProxyRange = "127.100.0.0/16"
	// DefaultPipelinePackets is how many packets each direction of
	// wireguard-go's pipeline may hold: a few of its 128-packet batches,
	// each packet in a 64 KiB buffer
	// (see docs/netstack-tuning.md#pipeline-gate).
	DefaultPipelinePackets = 256
)

// Config configures an Agent. Zero values take the documented defaults.
type Config struct {
	// StateDir holds keys, credentials, exports and the last network map.
	StateDir string
	// Join is a join token; needed only the first time.
	Join string
	// JoinFile is the file Join was read from (--join-file), if any. A
	// token file inside StateDir is removed once it has been spent, so the
	// state directory keeps no token.
	JoinFile string
	// Name of the node; default the host name.
	Name string
	// ListenPort is WireGuard's UDP port; 0 picks a free one.
	ListenPort uint16
	// DNS is the DNS listen address; "" or "off" disables it.
	DNS string
	// DNSFallback lets the agent pick another port when DNS's address is
	// taken or needs privileges (true when the user did not choose --dns).
	DNSFallback bool
	// Upstreams for non-mesh DNS names; nil reads /etc/resolv.conf.
	Upstreams []string
	// DNSAllow lists the networks allowed to query DNS besides loopback;
	// a DNS address that is not loopback needs it (see dns.Config.Allow).
	DNSAllow []netip.Prefix
	// Expose lists the services to export that the configuration itself
	// names (--expose): the whole of them, so one dropped from it is no
	// longer exported at the next start. Those added at runtime (Expose)
	// are saved in StateDir and come back at each start, but one of the
	// same name here takes its place.
	Expose []Export
	// ProxyRange is where consumed services listen; default 127.100.0.0/16.
	ProxyRange netip.Prefix
	// Hostname reported to the coordinator; default os.Hostname.
	Hostname string
	Logger   *slog.Logger
	// MapIdle is how long the map stream may be silent before the agent
	// reconnects; default 120s. The coordinator is told (it keeps its
	// keep-alives within half of it), and a coordinator that names a
	// shorter keep-alive interval makes the wait shorter (streamMap).
	MapIdle time.Duration
	// RetryMin and RetryMax bound the coordinator reconnect backoff;
	// defaults 1s and 30s.
	RetryMin, RetryMax time.Duration
	// DialTimeout bounds one attempt to reach one provider; default
	// proxy.DefaultDialTimeout (1 s).
	DialTimeout time.Duration
	// LastDialTimeout bounds the attempt at the last provider left to
	// try, when it has not failed lately; default
	// proxy.DefaultLastDialTimeout (10 s).
	LastDialTimeout time.Duration
	// KeyExpirySkew is how long after a peer's key expiry (as the map
	// says) this site drops the peer itself, should the coordinator not
	// have removed it (out of reach): the margin for clocks that differ.
	// Default 1 minute.
	KeyExpirySkew time.Duration
	// Region labels the node for services whose policy prefers providers
	// in the consumer's region (locality: prefer-same-region).
	Region string
	// HealthInterval is how often each export's target is checked;
	// default proxy.DefaultHealthInterval.
	HealthInterval time.Duration
	// RelayOnly never uses direct UDP paths (diagnosis, relay benchmarks).
	RelayOnly bool
	// Metrics is where Prometheus metrics are served over plain HTTP at
	// /metrics, "127.0.0.1:9091"; "" or "off" disables them.
	Metrics string
	// Coordinator is the coordinator's URL for a join by web login (no
	// token): the agent prints a URL where a person approves the node.
	Coordinator string
	// Fingerprint pins the coordinator's certificate for a web-login join;
	// empty trusts the system's CAs.
	Fingerprint string
	// Out receives what a person must read (the approval URL); nil
	// discards (the logger still gets it).
	Out io.Writer
	// StatsEvery is how often counters are reported to the coordinator
	// for its console; default 10s.
	StatsEvery time.Duration
	// PipelinePackets bounds the packets inside each direction of
	// wireguard-go's pipeline, and with them the agent's memory under load
	// (netstack.Gate); DefaultPipelinePackets when 0 or less. A knob for
	// measurements.
	PipelinePackets int
	// SOCKS5 and HTTPProxy are where the local SOCKS5 and HTTP proxies
	// listen ("127.0.0.1:1080", "127.0.0.1:3128"); "" or "off" is off.
	// Mesh names go through the mesh, other names direct.
	SOCKS5, HTTPProxy string
	// ProxyMeshOnly makes those proxies refuse names outside the mesh.
	ProxyMeshOnly bool
	// HealthListen is where /healthz and /readyz are served over plain
	// HTTP, "127.0.0.1:9099"; "" or "off" disables them (sidecar.go).
	HealthListen string
	// ExposeFile is a YAML list of services to export, read at start and
	// again whenever it changes (exposefile.go); "" for none.
	ExposeFile string
	// ExposeFileEvery is how often ExposeFile is read again; default 2s.
	ExposeFileEvery time.Duration
	// Tracing exports OpenTelemetry spans of HTTP requests over OTLP
	// (--otlp-endpoint); off without an endpoint. Tracing.Node defaults
	// to Name.
	Tracing httpobs.TraceConfig
	// AccessLog is where one JSON line per HTTP request goes: a file
	// (appended to, created 0600), "-" for standard output, "" for none.
	AccessLog string
}

// pipelineWait is the longest a full pipeline holds a reader back before
// its count is assumed to have leaked (netstack.Gate).
const pipelineWait = 50 * time.Millisecond

// Agent is a running site. Create with New, then Start; Close stops it.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	state stateDir
	key   key.Private
	token *wire.JoinToken

	stack    *netstack.Stack
	bind     *bind.Bind
	dev      *device.Device
	dns      *dns.Server
	consumer *proxy.Consumer
	provider *proxy.Provider
	// httpIn and httpOut serve HTTP services request by request (the
	// provider's and the consumer's end); httpMetrics counts them.
	httpIn      *httpmesh.Provider
	httpOut     *httpmesh.Consumer
	httpMetrics *httpmesh.Metrics
	// httpAuth decides the requests of the HTTP services this node
	// provides (end-user JWT, the policy's request rules).
	httpAuth   *httpauth.Set
	authorized map[string]*httpauth.Authorizer // by service, as last given to httpIn; guarded by mu
	selfName   atomic.Pointer[string]          // the map's name of this node
	local      *localproxy.Server              // nil when neither local proxy is on
	api        *apiServer
	metrics    *metricsServer // nil when metrics are off
	health     *healthServer  // nil when health endpoints are off; set under mu
	httpObs    *httpObs       // set by Start before the data path
	// draining refuses new inbound mesh connections (Shutdown).
	draining atomic.Bool
	cc       *controlClient
	// denials counts and logs the provider's refusals by policy, and
	// feeds StatsReport.Denials.
	denials *denials
	// gateIn and gateOut bound the packets inside wireguard-go's pipeline,
	// and with them the agent's memory under load (netstack.Gate).
	gateIn, gateOut *netstack.Gate

	ctx    context.Context
	cancel context.CancelFunc
	// retry asks retryLoop to apply the desired state again after a part
	// failed to apply (buffered: one request pending is enough).
	retry chan struct{}
	// healthDirty asks healthLoop to report the exports' health
	// (buffered: one request pending is enough).
	healthDirty chan struct{}

	goMu     sync.Mutex     // guards goClosed and wg.Add (see goroutine)
	goClosed bool           // Close has begun: no new goroutines
	wg       sync.WaitGroup // every goroutine started by goroutine

	mu         sync.Mutex // guards the fields below
	node       nodeState
	nm         wire.NetworkMap
	haveMap    bool
	exports    []Export
	fromConfig map[string]bool  // exports that Config.Expose set (not saved)
	fromFile   map[string]bool  // exports that Config.ExposeFile set (not saved)
	exposeLast []byte           // the expose file as last applied
	announced  map[string]bool  // exports the coordinator has confirmed
	applier    *applier         // nil before Start has the parts up
	stun       []netip.AddrPort // the coordinator's STUN address, resolved at Start
	applyErr   string           // the last failure to apply, logged once
	listenPort uint16
	connected  bool
	lastErr    string
	lastMap    time.Time
	joinURL    string    // the coordinator being joined, before node.URL is known
	retryAt    time.Time // when the next attempt to reach the coordinator is due
	closed     bool
	// expiryTimer recomputes the desired state when the next peer key
	// expires; expiredPeers are those left out (logged once each).
	expiryTimer  *time.Timer
	expiredPeers map[string]bool
	left         bool          // Leave removed the node: nothing more is saved
	leftCh       chan struct{} // closed by Leave
	// rekey is a key rotation waiting for controlLoop (RotateKey);
	// streamCancel ends the map stream open now.
	rekey        *rekey
	streamCancel context.CancelFunc
	// mapFilter, when set, edits a copy of every map before it is applied
	// (SetMapFilter).
	mapFilter func(*wire.NetworkMap)

	// keyExpired: the coordinator refused the node because its key
	// expired (wire.ErrCodeKeyExpired); it must join again.
	keyExpired bool
	// removed: the coordinator said this node was removed (an admin, or
	// a newer ephemeral node of the same name replaced it).
	removed bool

	// expiryChanged wakes rotateLoop when the map's key expiry changed.
	expiryChanged chan struct{}

	syncMu  sync.Mutex // serialises export announcements
	leaveMu sync.Mutex // serialises Leave
	rotMu   sync.Mutex // serialises key rotations
}

// New checks the configuration and state directory. It opens nothing on
// the network.
func New(cfg Config) (*Agent, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !cfg.ProxyRange.IsValid() {
		cfg.ProxyRange = netip.MustParsePrefix(DefaultProxyRange)
	}
	if !cfg.ProxyRange.Addr().Is4() || cfg.ProxyRange.Bits() > 16 || !cfg.ProxyRange.Addr().IsLoopback() {
		return nil, fmt.Errorf("agent: --proxy-range %s must be an IPv4 loopback prefix of /16 or larger, e.g. 127.101.0.0/16", cfg.ProxyRange)
	}
	cfg.ProxyRange = cfg.ProxyRange.Masked()
	if cfg.DNS != "" && cfg.DNS != "off" {
		if err := dns.CheckListen(cfg.DNS, cfg.DNSAllow); err != nil {
			return nil, fmt.Errorf("agent: --dns: %w", err)
		}
	}
	if cfg.MapIdle == 0 {
		cfg.MapIdle = 120 * time.Second
	}
	// The coordinator keeps keep-alives at least 5s apart (half its 10s
	// floor): waiting less would reconnect between any two of them.
	cfg.MapIdle = max(cfg.MapIdle, 10*time.Second)
	if cfg.RetryMin == 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax == 0 {
		cfg.RetryMax = 30 * time.Second
	}
	if cfg.Hostname == "" {
		cfg.Hostname, _ = os.Hostname()
	}
	if cfg.Name == "" {
		cfg.Name = hostLabel(cfg.Hostname)
	}
	if cfg.StatsEvery == 0 {
		cfg.StatsEvery = 10 * time.Second
	}
	if cfg.PipelinePackets <= 0 {
		cfg.PipelinePackets = DefaultPipelinePackets
	}
	if cfg.Region != "" {
		if err := wire.ValidRegion(cfg.Region); err != nil {
			return nil, fmt.Errorf("agent: --region: %w", err)
		}
	}
	cfg.Name = wire.NormalizeName(cfg.Name)
	if err := wire.ValidName(cfg.Name); err != nil {
		return nil, fmt.Errorf("agent: --name: %w", err)
	}
	a := &Agent{cfg: cfg, log: log.With("subsystem", "agent"), announced: map[string]bool{}, fromConfig: map[string]bool{},
		retry: make(chan struct{}, 1), healthDirty: make(chan struct{}, 1), leftCh: make(chan struct{}), expiryChanged: make(chan struct{}, 1),
		denials: newDenials(log.With("subsystem", "provider"), time.Now),
		gateIn:  netstack.NewGate(cfg.PipelinePackets, pipelineWait), gateOut: netstack.NewGate(cfg.PipelinePackets, pipelineWait)}
	var err error
	if a.state, err = openStateDir(cfg.StateDir); err != nil {
		return nil, err
	}
	if a.key, err = a.state.loadOrCreateKey(); err != nil {
		return nil, err
	}
	joined, err := a.state.loadJSON(fileNode, &a.node)
	if err != nil {
		return nil, err
	}
	if a.rekey, err = a.state.loadPendingRekey(a.key); err != nil {
		return nil, err
	}
	if a.rekey != nil {
		if !joined {
			// No node, so the coordinator holds no key of it.
			os.Remove(a.state.path(fileKeyNext))
			a.rekey = nil
		} else {
			a.log.Info("resuming an interrupted key rotation: the coordinator may hold the new key already", "new_key", a.rekey.priv.Public().Short())
		}
	}
	if cfg.Join != "" {
		t, err := wire.ParseToken(cfg.Join)
		if err != nil {
			return nil, fmt.Errorf("agent: --join: %w", err)
		}
		a.token = &t
	}
	if !joined && a.token == nil && cfg.Coordinator == "" {
		return nil, fmt.Errorf("agent: this node has not joined a mesh yet (no credentials in %s): pass --join TOKEN (made with `meshlink token create`), or --coordinator URL to join by logging in", cfg.StateDir)
	}
	if _, err := a.state.loadJSON(fileServices, &a.exports); err != nil {
		return nil, err
	}
	for _, e := range cfg.Expose {
		// The command line says what this site exports now: it replaces
		// what an earlier run saved under the same name.
		if err := a.addExportLocked(e, true); err != nil {
			return nil, err
		}
		e, _ = checkExport(e)
		a.fromConfig[e.Name] = true
	}
	if cfg.ExposeFile != "" {
		b, es, err := readExposeFile(cfg.ExposeFile)
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		if err := a.setFileExports(es); err != nil {
			return nil, fmt.Errorf("agent: --expose-from-file %s: %w", cfg.ExposeFile, err)
		}
		a.exposeLast = b
	}
	if a.haveMap, err = a.state.loadJSON(fileNetmap, &a.nm); err != nil {
		a.log.Warn("ignoring cached network map", "err", err)
		a.haveMap = false
	}
	return a, nil
}

// hostLabel turns a host name into a valid node name.
func hostLabel(h string) string {
	h = strings.ToLower(strings.SplitN(h, ".", 2)[0])
	var b strings.Builder
	for _, c := range h {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' {
			b.WriteRune(c)
		}
	}
	s := strings.Trim(b.String(), "-")
	if s == "" {
		s = "node"
	}
	if len(s) > 63 {
		s = s[:63]
	}
	return s
}

// ParseExport parses NAME=HOST:PORT[/PROTO][;OPTION=VALUE…] as given to
// --expose and MESHLINK_EXPOSE. PROTO is tcp (the default), udp,
// tcp+udp or http. The options are port (the mesh port), priority,
// weight, version, health, udp-idle (a duration) and protocol (PROTO
// again), as the flags of `meshlink expose`:
// web=127.0.0.1:8000;weight=10;version=v2,
// dns=127.0.0.1:53/udp;udp-idle=30s, web=127.0.0.1:8000;protocol=http.
func ParseExport(s string) (Export, error) {
	const want = "want NAME=HOST:PORT[/udp|/tcp+udp|/http][;OPTION=VALUE...], e.g. web=127.0.0.1:8000, web=127.0.0.1:8000;weight=10;version=v2;protocol=http or dns=127.0.0.1:53/udp"
	if len(s) > 2048 {
		return Export{}, fmt.Errorf("--expose: %d bytes is too long; %s", len(s), want)
	}
	head, opts, _ := strings.Cut(s, ";")
	name, target, ok := strings.Cut(head, "=")
	if !ok {
		return Export{}, fmt.Errorf("--expose %q: %s", s, want)
	}
	e := Export{Name: name, Target: strings.TrimSpace(target)}
	if i := strings.LastIndexByte(e.Target, '/'); i >= 0 {
		proto, err := wire.ParseProtocol(e.Target[i+1:])
		if err != nil || e.Target[i+1:] == "" {
			return Export{}, fmt.Errorf("--expose %q: after the target's /, want tcp, udp, tcp+udp or http", s)
		}
		e.Target, e.Protocol = e.Target[:i], proto
	}
	seen := map[string]bool{}
	for opt := range strings.SplitSeq(opts, ";") {
		opt = strings.TrimSpace(opt)
		if opt == "" {
			continue
		}
		k, v, ok := strings.Cut(opt, "=")
		k, v = strings.ToLower(strings.TrimSpace(k)), strings.TrimSpace(v)
		if !ok || v == "" {
			return Export{}, fmt.Errorf("--expose %q: option %q: want OPTION=VALUE (port, priority, weight, version, health, udp-idle, protocol)", s, opt)
		}
		if seen[k] {
			return Export{}, fmt.Errorf("--expose %q: option %s given twice", s, k)
		}
		seen[k] = true
		num := func(max int) (int, error) {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > max {
				return 0, fmt.Errorf("--expose %q: %s=%s must be a number from 0 to %d", s, k, v, max)
			}
			return n, nil
		}
		var err error
		switch k {
		case "port":
			var p int
			if p, err = num(65535); err == nil {
				e.Port = uint16(p)
			}
		case "priority":
			e.Priority, err = num(wire.MaxPriority)
		case "weight":
			e.Weight, err = num(wire.MaxWeight)
		case "version":
			e.Version = v
		case "health":
			e.Health = v
		case "udp-idle":
			e.UDPIdle, err = parseUDPIdle(v)
			if err != nil {
				err = fmt.Errorf("--expose %q: %w", s, err)
			}
		case "protocol":
			var proto string
			if proto, err = wire.ParseProtocol(v); err != nil {
				err = fmt.Errorf("--expose %q: %w", s, err)
			} else if e.Protocol != "" && e.Protocol != proto {
				err = fmt.Errorf("--expose %q: the target says /%s and the option protocol=%s; give the protocol once", s, e.Protocol, v)
			}
			e.Protocol = proto
		default:
			err = fmt.Errorf("--expose %q: unknown option %q; the options are port, priority, weight, version, health, udp-idle and protocol", s, k)
		}
		if err != nil {
			return Export{}, err
		}
	}
	return checkExport(e)
}

// checkExport validates an export and fills in its port from the target.
func checkExport(e Export) (Export, error) {
	e.Name = wire.NormalizeName(e.Name)
	if err := wire.ValidName(e.Name); err != nil {
		return e, fmt.Errorf("service name: %w", err)
	}
	host, port, err := net.SplitHostPort(e.Target)
	if err != nil || host == "" {
		return e, fmt.Errorf("service %s: target %q must be HOST:PORT, e.g. 127.0.0.1:8000", e.Name, e.Target)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return e, fmt.Errorf("service %s: target port %q must be 1-65535", e.Name, port)
	}
	if e.Port == 0 {
		e.Port = uint16(p)
	}
	if err := wire.CheckTraffic(e.Priority, e.Weight, e.Version); err != nil {
		return e, fmt.Errorf("service %s: %w", e.Name, err)
	}
	if _, err := proxy.ParseHealth(e.Health); err != nil {
		return e, fmt.Errorf("service %s: %w", e.Name, err)
	}
	proto, err := wire.ParseProtocol(e.Protocol)
	if err != nil {
		return e, fmt.Errorf("service %s: %w", e.Name, err)
	}
	if e.Protocol = proto; proto == wire.ProtocolTCP {
		e.Protocol = "" // as every export saved before UDP
	}
	if e.UDPIdle < 0 || e.UDPIdle > wire.MaxUDPIdle {
		return e, fmt.Errorf("service %s: udp idle timeout %ds must be 0 to %d seconds", e.Name, e.UDPIdle, wire.MaxUDPIdle)
	}
	return e, nil
}

// parseUDPIdle parses a UDP flow idle timeout ("30s", "2m", or seconds)
// into whole seconds, at least one.
func parseUDPIdle(v string) (int, error) {
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.Atoi(v)
		if nerr != nil {
			return 0, fmt.Errorf("udp-idle=%s: want a duration such as 30s or 2m", v)
		}
		d = time.Duration(n) * time.Second
	}
	if d < time.Second || d > wire.MaxUDPIdle*time.Second {
		return 0, fmt.Errorf("udp-idle=%s must be from 1s to %ds", v, wire.MaxUDPIdle)
	}
	return int(d / time.Second), nil
}

// addExportLocked adds or replaces an export after checking it.
func (a *Agent) addExportLocked(e Export, replace bool) error {
	e, err := checkExport(e)
	if err != nil {
		return err
	}
	if i := slices.IndexFunc(a.exports, func(x Export) bool { return x.Name == e.Name }); i >= 0 && !replace && a.exports[i].Target != e.Target {
		return fmt.Errorf("service %s is already exported here to %s; pass --replace to send it to %s instead", e.Name, a.exports[i].Target, e.Target)
	}
	out := slices.DeleteFunc(slices.Clone(a.exports), func(x Export) bool { return x.Name == e.Name })
	for _, x := range out {
		if x.Port == e.Port && (wire.HasTCP(x.Protocol) && wire.HasTCP(e.Protocol) || wire.HasUDP(x.Protocol) && wire.HasUDP(e.Protocol)) {
			return fmt.Errorf("service %s: mesh port %d is already used by service %s on this site; choose another with --port", e.Name, e.Port, x.Name)
		}
	}
	a.exports = append(out, e)
	slices.SortFunc(a.exports, func(x, y Export) int { return strings.Compare(x.Name, y.Name) })
	return nil
}

// Start brings the site up. If the node has not joined yet it registers
// first, retrying while the coordinator is unreachable; errors that retrying
// cannot fix (a bad token, a port in use) are returned.
func (a *Agent) Start(ctx context.Context) (err error) {
	a.ctx, a.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	if err := a.state.saveJSON(fileServices, a.runtimeExports(a.exports)); err != nil {
		return err
	}
	var addrs []netip.Addr
	for _, p := range a.nm.Self.Addresses {
		addrs = append(addrs, p.Addr())
	}
	if err := a.startHTTPObs(); err != nil {
		return err
	}
	a.stack, err = netstack.New(netstack.Config{Addrs: addrs, Logger: a.cfg.Logger, Outbound: a.gateOut, Inbound: a.gateIn})
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if a.httpMetrics == nil {
		a.httpMetrics = httpmesh.NewMetrics()
	}
	if a.httpAuth == nil {
		a.httpAuth = httpauth.NewSet(httpauth.SetConfig{Logger: a.log.With("subsystem", "httpauth")})
	}
	inCfg := httpmesh.ProviderConfig{Logger: a.cfg.Logger, Metrics: a.httpMetrics, Peer: a.peerOf, Node: a.nodeName}
	outCfg := httpmesh.ConsumerConfig{Logger: a.cfg.Logger, Metrics: a.httpMetrics}
	a.httpObs.hook(&outCfg, &inCfg)
	a.httpIn = httpmesh.NewProvider(inCfg)
	a.provider = proxy.NewProvider(proxy.ProviderConfig{Logger: a.cfg.Logger, Policy: a.allow, Denied: a.denied, OnHealth: a.healthChanged,
		HealthInterval: a.cfg.HealthInterval, HTTP: a.httpIn})
	a.stack.SetTCPHandler(a.handleTCP)
	a.stack.SetUDPHandler(a.handleUDP)
	a.httpOut = httpmesh.NewConsumer(outCfg)
	a.consumer = proxy.NewConsumer(proxy.ConsumerConfig{Dialer: a.stack, Logger: a.cfg.Logger, DialTimeout: a.cfg.DialTimeout, LastDialTimeout: a.cfg.LastDialTimeout, HTTP: a.httpOut})
	a.httpOut.Attach(a.consumer)
	if err := a.startWireGuard(); err != nil {
		return err
	}
	// The local API after what its handlers read (the WireGuard device,
	// the proxies); status while joining works: the join comes later.
	a.api, err = startAPI(a, a.state.path(fileAPI))
	if err != nil {
		return err
	}
	if err := a.startLocalProxy(); err != nil {
		return err
	}
	if err := a.startDNS(); err != nil {
		return err
	}
	// After the data plane: a scrape reads its status.
	if err := a.startMetrics(); err != nil {
		return err
	}
	if err := a.startHealth(); err != nil {
		return err
	}

	if a.node.ID == 0 {
		register := a.register
		if a.token == nil {
			register = a.registerInteractive
		}
		if err := register(ctx); err != nil {
			return err
		}
	} else if a.token != nil {
		a.log.Info("already joined; not spending --join again", "name", a.node.Name, "node", a.node.ID)
	}
	cc := newControlClient(a.node.URL, a.node.Fingerprint, a.node.URLs...)
	cc.nodeID, cc.secret = a.node.ID, a.node.Secret
	stun := a.resolveSTUN()

	a.mu.Lock()
	a.cc = cc
	a.stun = stun
	a.applier = &applier{log: a.log, stack: a.stack, dev: a.dev, bind: a.bind, consumer: a.consumer, provider: a.provider}
	if a.dns != nil {
		a.applier.dns = a.dns
	}
	// With a cached map the data plane comes up from it: the coordinator
	// may be down. Without one, exports and STUN are set now, the rest
	// when the first map arrives.
	a.reconfigLocked()
	a.mu.Unlock()

	a.goroutine("retry", a.retryLoop)
	a.goroutine("control", a.controlLoop)
	a.goroutine("stats", a.statsLoop)
	a.goroutine("health-report", a.healthLoop)
	a.goroutine("rotate", a.rotateLoop)
	if a.cfg.ExposeFile != "" {
		a.goroutine("expose-file", func() { a.exposeFileLoop(a.exposeLast) })
	}
	a.log.Info("agent started", "name", a.node.Name, "node", a.node.ID, "listen_port", a.listenPort, "dns", a.DNSAddr())
	return nil
}

func (a *Agent) startWireGuard() error {
	wlog := a.log.With("subsystem", "wireguard")
	logger := &device.Logger{
		Verbosef: func(f string, args ...any) { wlog.Debug(fmt.Sprintf(f, args...)) },
		Errorf:   func(f string, args ...any) { wlog.Warn(fmt.Sprintf(f, args...)) },
	}
	a.bind = bind.New(bind.Config{PrivateKey: a.key, Logger: a.cfg.Logger, OnPublicAddr: a.onPublicAddr, RelayOnly: a.cfg.RelayOnly,
		Inbound: a.gateIn, Outbound: a.gateOut})
	a.dev = device.NewDevice(a.stack, a.bind, logger)
	bindErr := func(err error) error {
		if errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use") {
			return fmt.Errorf("agent: UDP port %d is in use; choose another --listen-port (0 picks a free one)", a.cfg.ListenPort)
		}
		return fmt.Errorf("agent: start WireGuard on UDP port %d: %w", a.cfg.ListenPort, err)
	}
	base := wgcfg.Config{PrivateKey: a.key, ListenPort: a.cfg.ListenPort}
	if err := a.dev.IpcSet(base.ToUAPI()); err != nil {
		return bindErr(err)
	}
	if err := a.dev.Up(); err != nil {
		return bindErr(err)
	}
	get, err := a.dev.IpcGet()
	if err == nil {
		var d wgcfg.Device
		d, err = wgcfg.Parse(get)
		a.listenPort = d.ListenPort
	}
	if err != nil {
		return fmt.Errorf("agent: read WireGuard state: %w", err)
	}
	if a.listenPort == 0 {
		return errors.New("agent: WireGuard did not report its UDP port")
	}
	return nil
}

func (a *Agent) startDNS() error {
	addr := a.cfg.DNS
	if addr == "" || addr == "off" {
		return nil
	}
	tries := []string{addr}
	if a.cfg.DNSFallback {
		host, _, _ := net.SplitHostPort(addr)
		tries = append(tries, net.JoinHostPort(host, "5353"), net.JoinHostPort(host, "0"))
	}
	var remembered []string
	if _, err := a.state.loadJSON(fileUpstreams, &remembered); err != nil {
		a.log.Debug("ignoring remembered DNS upstreams", "err", err)
	}
	var errs []error
	for _, t := range tries {
		s, err := dns.New(dns.Config{Addr: t, Logger: a.cfg.Logger, Upstreams: a.cfg.Upstreams, Domain: a.domain(), Allow: a.cfg.DNSAllow,
			Remembered: remembered})
		if errors.Is(err, dns.ErrOpenResolver) {
			return fmt.Errorf("agent: %w", err) // another port would not help
		}
		if err == nil {
			err = s.Start()
		}
		if err == nil {
			if t != addr {
				a.log.Warn("DNS address unavailable; serving elsewhere (set --dns to choose; `sudo meshlink dns install --state DIR` makes the system resolver send mesh names here)",
					"wanted", addr, "serving", s.Addr(), "err", errors.Join(errs...))
			}
			a.dns = s
			// Remembered for when this server becomes the system resolver
			// (`meshlink dns install`, or 127.0.0.1 in resolv.conf).
			if found := s.ResolvConfUpstreams(); len(found) > 0 && !slices.Equal(found, remembered) {
				if err := a.state.saveJSON(fileUpstreams, found); err != nil {
					a.log.Warn("cannot remember the DNS upstreams", "err", err)
				}
			}
			return nil
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("agent: DNS on %s: %w; choose another --dns address or --dns off", addr, errors.Join(errs...))
}

func (a *Agent) domain() string {
	if a.nm.Domain != "" {
		return a.nm.Domain
	}
	return wire.DefaultDomain
}

// dnsDomain is the domain the DNS server answers for, "" when DNS is off.
func (a *Agent) dnsDomain() string {
	if a.dns == nil {
		return ""
	}
	return a.dns.Domain()
}

// DNSAddr returns the DNS server's address, or "" when DNS is off.
func (a *Agent) DNSAddr() string {
	if a.dns == nil {
		return ""
	}
	return a.dns.Addr().String()
}

// ListenPort returns WireGuard's UDP port.
func (a *Agent) ListenPort() uint16 { return a.listenPort }

// localEndpoints lists this host's non-loopback addresses with the UDP port.
func (a *Agent) localEndpoints() []netip.AddrPort {
	var out []netip.AddrPort
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	for _, ad := range addrs {
		pfx, err := netip.ParsePrefix(ad.String())
		if err != nil {
			continue
		}
		ip := pfx.Addr().Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() {
			continue
		}
		out = append(out, netip.AddrPortFrom(ip, a.listenPort))
	}
	return out
}

// register joins the mesh with the token, retrying while the coordinator
// cannot be reached.
func (a *Agent) register(ctx context.Context) error {
	t := a.token
	cc := newControlClient(t.URL, t.Fingerprint, t.URLs...)
	// The map stream has a client of its own: the registration's
	// connection is closed, not left idle on the coordinator.
	defer cc.http.CloseIdleConnections()
	req := wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: t.ID, TokenSecret: t.Secret,
		Name: a.cfg.Name, Hostname: a.cfg.Hostname, NodeKey: a.key.Public(),
		ListenPort: a.listenPort, LocalEndpoints: a.localEndpoints(),
	}
	a.noteJoining(t.URL)
	bo := a.retryBackoff()
	for {
		var resp wire.RegisterResponse
		req.KeyProof = a.keyProof(ctx, cc)
		err := cc.call(ctx, wire.PathRegister, req, &resp)
		if err == nil {
			all := cc.all()
			if err := a.joined(resp, all[0], t.Fingerprint, t.ID, all[1:]...); err != nil {
				return err
			}
			a.removeSpentJoinFile()
			return nil
		}
		if ctx.Err() != nil {
			return errors.New("agent: join: interrupted")
		}
		if isPermanent(err) {
			return fmt.Errorf("agent: join: %w", err)
		}
		d := bo.Next()
		a.noteRetry(cc.base(), err, d)
		a.log.Warn("coordinator unreachable; will retry", "url", cc.base(), "in", d.Round(time.Millisecond), "err", err)
		if next, ok := cc.failover(); ok {
			a.log.Info("trying another coordinator of the mesh", "url", next)
		}
		if !backoff.Sleep(ctx, d) {
			return fmt.Errorf("agent: join: %w", err)
		}
	}
}

// removeSpentJoinFile removes the token file once the token is spent, if it
// lies in the state directory (a secret mounted from elsewhere is not ours
// to remove).
func (a *Agent) removeSpentJoinFile() {
	if a.cfg.JoinFile == "" {
		return
	}
	dir, err1 := filepath.Abs(a.cfg.StateDir)
	f, err2 := filepath.Abs(a.cfg.JoinFile)
	if err1 != nil || err2 != nil {
		return
	}
	if rel, err := filepath.Rel(dir, f); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return
	}
	if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("could not remove the spent join token file from the state directory; remove it", "file", f, "err", err)
	}
}

// joined saves the credentials of a fresh registration.
func (a *Agent) joined(resp wire.RegisterResponse, url, fingerprint, tokenID string, more ...string) error {
	a.node = nodeState{ID: resp.Node.ID, Name: resp.Node.Name, Secret: resp.NodeSecret, URL: url, URLs: more, Fingerprint: fingerprint, TokenID: tokenID}
	if err := a.state.saveJSON(fileNode, a.node); err != nil {
		return err
	}
	a.mu.Lock()
	a.nm.Self = resp.Node
	a.nm.Domain = resp.Domain
	a.mu.Unlock()
	a.wakeRotation()
	a.log.Info("joined the mesh", "name", resp.Node.Name, "node", resp.Node.ID, "addresses", resp.Node.Addresses)
	return nil
}

// controlLoop follows the map stream for the agent's lifetime, reconnecting
// with backoff. The data plane keeps the last map while disconnected.
func (a *Agent) controlLoop() {
	bo := a.retryBackoff()
	for a.ctx.Err() == nil {
		a.mu.Lock()
		cur, rk := a.key, a.rekey
		sctx, scancel := context.WithCancel(a.ctx)
		a.streamCancel = scancel
		a.mu.Unlock()
		mr := wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: a.listenPort, LocalEndpoints: a.endpointCandidates(), NodeKey: cur.Public(), Region: a.cfg.Region,
			MapIdle: int(a.cfg.MapIdle / time.Second)}
		var err error
		if rk != nil && rk.server.IsZero() {
			// A resumed rotation: proofs need the coordinator's key.
			var sk wire.ServerKey
			if err = a.cc.call(sctx, wire.PathServerKey, wire.ServerKeyRequest{Version: wire.ProtocolVersion}, &sk); err == nil && sk.Key.IsZero() {
				err = errors.New("the coordinator sent no key")
			}
			rk.server = sk.Key
		}
		if rk != nil {
			rk.mapRequest(&mr, cur, a.node.Name)
		}
		first := true
		if err == nil {
			err = a.cc.streamMap(sctx, mr, a.cfg.MapIdle, func(m *wire.MapResponse) error {
				if first {
					first = false
					if rk != nil {
						// Accepted: the coordinator holds the new key now
						// (it took it, or had already).
						err := a.switchKey(rk)
						a.mu.Lock()
						a.rekey = nil
						a.mu.Unlock()
						rk.done <- err
						rk = nil
					}
					bo.Reset()
					a.setConnected(true, nil)
					a.log.Info("connected to the coordinator", "url", a.cc.base())
					// STUN may have answered after the request was built: the
					// stream's request would then have replaced a fresher list.
					if !slices.Equal(mr.LocalEndpoints, a.endpointCandidates()) {
						a.publishEndpoints()
					}
				}
				if m.IsKeepAlive() {
					return nil
				}
				a.applyMap(m)
				if m.Full != nil && len(m.Full.Coordinators) > 0 {
					a.learnCoordinators(m.Full.Coordinators)
				}
				if m.Full != nil {
					a.goroutine("sync-exports", a.syncExports)
					a.healthChanged() // the coordinator forgot it when the last stream ended
				}
				return nil
			})
		}
		scancel()
		a.mu.Lock()
		pending := a.rekey
		refused := rk != nil && pending == rk && isPermanent(err)
		if refused {
			// Refused for good (not merely unanswered: then the
			// coordinator may hold the new key, and the next attempt
			// finds out): keep the old key, and try it at once.
			a.rekey = nil
		}
		a.mu.Unlock()
		if refused {
			a.dropRekey(rk, err)
		}
		if a.ctx.Err() != nil {
			return
		}
		if refused || pending != nil && pending != rk {
			continue // reconnect at once: with the old key, or RotateKey's new one
		}
		a.setConnected(false, err)
		var ae *apiError
		if errors.As(err, &ae) && ae.Code == wire.ErrCodeKeyExpired {
			a.expired(err)
		}
		if errors.As(err, &ae) && (ae.Code == wire.ErrCodeNodeRemoved || ae.Code == wire.ErrCodeUnauthorized) {
			a.log.Error("the coordinator no longer knows this node; remove the state directory and join again with a new token", "state", a.cfg.StateDir, "err", err)
		}
		if errors.As(err, &ae) && ae.Code == wire.ErrCodeNodeRemoved {
			a.mu.Lock()
			a.removed = true // Ready says so
			a.mu.Unlock()
			a.forgetMesh()
		}
		d := bo.Next()
		if !first {
			// The stream was up: the first retry is spread over a wider
			// window (reconnectDelay), later ones back off from there.
			d = a.reconnectDelay()
		}
		a.noteRetry("", err, d)
		a.log.Warn("lost the coordinator; the data plane keeps running; reconnecting", "in", d.Round(time.Millisecond), "err", err)
		if next, ok := a.cc.failover(); ok {
			a.log.Info("moving to another coordinator of the mesh", "url", next)
		}
		if !backoff.Sleep(a.ctx, d) {
			return
		}
	}
}

// learnCoordinators takes the mesh's coordinator list from a full map and
// keeps it in the node's state, for the next failover and restart.
func (a *Agent) learnCoordinators(urls []string) {
	if !a.cc.setURLs(urls) {
		return
	}
	all := a.cc.all()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.node.ID == 0 || a.left {
		return
	}
	a.node.URLs = slices.DeleteFunc(slices.Clone(all), func(u string) bool { return u == a.node.URL })
	if err := a.state.saveJSON(fileNode, a.node); err != nil {
		a.log.Warn("cannot save the mesh's coordinator list", "err", err)
	}
}

// expired handles the coordinator's word that the node's key expired: the
// peers have dropped the node already, so the agent drops them too
// (forgetMesh), and says once what to do.
func (a *Agent) expired(err error) {
	a.mu.Lock()
	was := a.keyExpired
	a.keyExpired = true
	a.mu.Unlock()
	if !was {
		a.log.Error("this node's key expired: the coordinator refuses it and its peers dropped it; join again", "state", a.cfg.StateDir, "err", err)
	}
	a.forgetMesh()
}

func (a *Agent) setConnected(ok bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ok {
		a.keyExpired = false
	}
	a.connected = ok
	if ok {
		a.retryAt = time.Time{}
	}
	if err != nil {
		a.lastErr = err.Error()
	} else {
		a.lastErr = ""
	}
}

// forgetMesh drops every peer, service and relay from the map once the
// coordinator said this node was removed: the peers have dropped it
// already, and what it still had open through the mesh is closed now
// (applier.closeLeft) rather than left to hang until TCP gives up. The
// cache is overwritten too, so a restart does not bring them back.
func (a *Agent) forgetMesh() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || !a.haveMap || len(a.nm.Peers)+len(a.nm.Services)+len(a.nm.Relays) == 0 {
		return
	}
	a.nm.Peers, a.nm.Services, a.nm.Relays = nil, nil, nil
	a.reconfigLocked()
	if err := a.state.saveJSON(fileNetmap, a.nm); err != nil {
		a.log.Warn("cannot cache the network map", "err", err)
	}
}

// applyMap folds one message into the network map and applies the result.
func (a *Agent) applyMap(m *wire.MapResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.left {
		return
	}
	expiry := a.nm.Self.KeyExpiry
	a.nm.Apply(m)
	if !a.nm.Self.KeyExpiry.Equal(expiry) {
		a.wakeRotation()
	}
	a.haveMap = true
	a.lastMap = time.Now()
	a.reconfigLocked()
	a.metrics.observeMap(m)
	if err := a.state.saveJSON(fileNetmap, a.nm); err != nil {
		a.log.Warn("cannot cache the network map", "err", err)
	}
}

// reconfigLocked turns the network map, the exports and the configuration
// into the whole desired state of every part and applies what changed.
// What failed is retried by the next reconfig, or by retryLoop if no map
// comes first. The error is the failure, if any (not errNoChanges).
// watchExpiryLocked logs the peers d leaves out for their expired keys
// (once each) and arms a timer that computes the desired state again
// when the next peer key expires, coordinator or not.
func (a *Agent) watchExpiryLocked(d Desired) {
	for _, name := range d.ExpiredPeers {
		if !a.expiredPeers[name] {
			a.log.Warn("peer's key expired; dropped it without waiting for the coordinator", "peer", name)
		}
	}
	a.expiredPeers = map[string]bool{}
	for _, name := range d.ExpiredPeers {
		a.expiredPeers[name] = true
	}
	if a.expiryTimer != nil {
		a.expiryTimer.Stop()
		a.expiryTimer = nil
	}
	if d.NextExpiry.IsZero() {
		return
	}
	a.expiryTimer = time.AfterFunc(time.Until(d.NextExpiry)+10*time.Millisecond, func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		a.reconfigLocked()
	})
}

func (a *Agent) reconfigLocked() error {
	if a.applier == nil || a.closed {
		return nil // before Start has the parts up, or after Close
	}
	in := desiredInput{Exports: a.exports, Config: a.cfg, Joined: a.node.ID != 0, STUN: a.stun,
		Now: time.Now(), ExpirySkew: a.cfg.KeyExpirySkew}
	if in.ExpirySkew <= 0 {
		in.ExpirySkew = time.Minute
	}
	if a.haveMap {
		in.Map = &a.nm
		if a.mapFilter != nil {
			nm := cloneMap(a.nm)
			a.mapFilter(&nm)
			in.Map = &nm
		}
	}
	d := desiredConfig(in)
	if name := a.nm.Self.Name; name != "" {
		a.selfName.Store(&name)
	}
	if in.Map != nil {
		a.authorizeLocked(in.Map)
	}
	a.watchExpiryLocked(d)
	for _, r := range d.SkippedRelays {
		a.log.Warn("relay in the network map has no valid key; skipped", "relay", r.Name, "url", r.URL)
	}
	err := a.applier.apply(d)
	if err == nil || errors.Is(err, errNoChanges) {
		if a.applyErr != "" {
			a.log.Info("configuration applied after earlier failures")
		}
		a.applyErr = ""
	}
	switch {
	case errors.Is(err, errNoChanges):
		a.log.Debug("reconfig: no changes")
		return nil
	case err != nil:
		// Once per distinct failure: a port taken by another program
		// fails every retry the same way.
		if msg := err.Error(); msg != a.applyErr {
			a.applyErr = msg
			a.log.Error("cannot apply the configuration; will retry", "err", err)
		} else {
			a.log.Debug("configuration still not applied; will retry", "err", err)
		}
		select {
		case a.retry <- struct{}{}:
		default:
		}
		return err
	}
	return nil
}

// retryLoop applies the desired state again, with backoff, after a part
// failed to apply and no new map has come to retry it.
func (a *Agent) retryLoop() {
	bo := a.retryBackoff()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-a.retry:
		}
		if !backoff.Sleep(a.ctx, bo.Next()) {
			return
		}
		a.mu.Lock()
		err := a.reconfigLocked() // asks for another retry if it fails
		a.mu.Unlock()
		if err == nil {
			bo.Reset()
		}
	}
}

// goroutine runs fn on a goroutine that Close waits for. Once Close has
// begun it starts nothing and reports false. It may be called with or
// without a.mu held.
func (a *Agent) goroutine(name string, fn func()) bool {
	a.goMu.Lock()
	defer a.goMu.Unlock()
	if a.goClosed {
		a.log.Debug("agent closing; not starting", "routine", name)
		return false
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		pprof.Do(context.Background(), pprof.Labels("meshlink", name), func(context.Context) { fn() })
	}()
	return true
}

// resolveSTUN finds the coordinator's STUN server: the same host and port
// number as its HTTPS, over UDP.
func (a *Agent) resolveSTUN() []netip.AddrPort {
	u, err := url.Parse(a.node.URL)
	if err != nil {
		return nil
	}
	ua, err := net.ResolveUDPAddr("udp", u.Host)
	if err != nil {
		a.log.Warn("cannot resolve the coordinator for STUN", "host", u.Host, "err", err)
		return nil
	}
	ap := ua.AddrPort()
	// ResolveUDPAddr gives IPv4 in its 16-byte form; the bind's IPv4 socket
	// wants the plain address.
	return []netip.AddrPort{netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
}

// onPublicAddr publishes the address STUN learned, so peers behind other
// NATs can punch through to it.
func (a *Agent) onPublicAddr(addr netip.AddrPort) { a.publishEndpoints() }

// publishEndpoints sends the current endpoint candidates to the coordinator.
func (a *Agent) publishEndpoints() {
	a.mu.Lock()
	cc := a.cc
	a.mu.Unlock()
	if cc == nil {
		return
	}
	a.goroutine("publish-endpoints", func() {
		req := wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: a.listenPort, LocalEndpoints: a.endpointCandidates()}
		if err := cc.call(a.ctx, wire.PathEndpoints, req, nil); err != nil {
			a.log.Debug("cannot publish endpoints now; will on reconnect", "err", err)
		}
	})
}

// endpointCandidates is what the node tells the coordinator it may be
// reached at: the STUN address first, then its own interfaces.
func (a *Agent) endpointCandidates() []netip.AddrPort {
	var out []netip.AddrPort
	if p := a.bind.PublicAddr(); p.IsValid() {
		out = append(out, p)
	}
	return append(out, a.localEndpoints()...)
}

// proxyAddr maps a service VIP into the agent's proxy range.
func (a *Agent) proxyAddr(vip netip.Addr) netip.Addr { return proxyAddr(a.cfg.ProxyRange, vip) }

// allow is the provider's policy check, against the policy last applied.
func (a *Agent) allow(src netip.Addr, service string) (string, bool) {
	a.mu.Lock()
	ap := a.applier
	a.mu.Unlock()
	if ap == nil {
		return "", false
	}
	return ap.policy.Load().allow(src, service)
}

// authorizeLocked gives the HTTP provider the authorizer of every service
// of nm this node provides with request-level authorization, and takes
// it from the others.
func (a *Agent) authorizeLocked(nm *wire.NetworkMap) {
	auths := a.httpAuth.Update(nm.Services, nm.Self.ID)
	for _, sv := range nm.Services {
		if z := auths[sv.Name]; z != nil {
			a.httpIn.SetAuthorizer(sv.Name, z.Authorize)
		} else {
			a.httpIn.SetAuthorizer(sv.Name, nil)
		}
	}
	for name := range a.authorized {
		if !slices.ContainsFunc(nm.Services, func(sv wire.Service) bool { return sv.Name == name }) {
			a.httpIn.SetAuthorizer(name, nil)
		}
	}
	a.authorized = auths
}

// peerOf names the node of a mesh source address by the policy in force.
func (a *Agent) peerOf(src netip.Addr) (wire.NodeID, string) {
	a.mu.Lock()
	ap := a.applier
	a.mu.Unlock()
	if ap == nil {
		return 0, ""
	}
	peer, _, _ := ap.policy.Load().decide(src, "")
	return peer.id, peer.name
}

// nodeName is this node's name in the mesh, read per HTTP request
// without the agent's lock.
func (a *Agent) nodeName() string {
	if n := a.selfName.Load(); n != nil {
		return *n
	}
	return a.cfg.Name
}

// denied is the provider's Config.Denied: it names the source by the
// policy in force and counts the denial.
func (a *Agent) denied(src netip.Addr, service string) {
	a.mu.Lock()
	ap := a.applier
	a.mu.Unlock()
	var pol *policy
	if ap != nil {
		pol = ap.policy.Load()
	}
	peer, known, _ := pol.decide(src, service)
	a.denials.add(service, peer, known, src)
}

// SetMapFilter makes the agent apply every network map as f edits it: f
// gets a copy of the map as the coordinator sent it, and may change it
// (for instance narrow a service's AllowedNodes, or drop a provider). The
// current map is applied again at once; nil removes the filter. It is for
// tests that need maps the coordinator does not make, and for diagnosis;
// the map cached on disk and shown in status stays the coordinator's.
func (a *Agent) SetMapFilter(f func(*wire.NetworkMap)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mapFilter = f
	a.reconfigLocked()
}

// cloneMap copies nm deeply enough for a filter to edit its peers,
// services and their lists without touching nm.
func cloneMap(nm wire.NetworkMap) wire.NetworkMap {
	nm.Peers = slices.Clone(nm.Peers)
	nm.Services = slices.Clone(nm.Services)
	for i := range nm.Services {
		nm.Services[i].Providers = slices.Clone(nm.Services[i].Providers)
		nm.Services[i].AllowedNodes = slices.Clone(nm.Services[i].AllowedNodes)
	}
	nm.Relays = slices.Clone(nm.Relays)
	return nm
}

// control returns the coordinator client; before the node has joined it is
// one whose calls fail with a retryable error.
func (a *Agent) control() *controlClient {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cc == nil {
		return &controlClient{}
	}
	return a.cc
}

// syncExports makes the coordinator's record of this node's services match
// the local exports: announce each, and withdraw any it lists that the site
// no longer exports.
func (a *Agent) syncExports() {
	a.syncMu.Lock()
	defer a.syncMu.Unlock()
	a.mu.Lock()
	exports := slices.Clone(a.exports)
	var stale []string
	for _, s := range a.nm.Services {
		for _, p := range s.Providers {
			if p.Node == a.nm.Self.ID && !slices.ContainsFunc(exports, func(e Export) bool { return e.Name == s.Name }) {
				stale = append(stale, s.Name)
			}
		}
	}
	a.mu.Unlock()
	for _, e := range exports {
		if err := a.announce(a.ctx, e); err != nil {
			a.log.Warn("cannot announce service; will retry on reconnect", "service", e.Name, "err", err)
		}
	}
	for _, name := range stale {
		err := a.control().call(a.ctx, wire.PathServices, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: name, Remove: true}, nil)
		if err != nil {
			a.log.Warn("cannot withdraw service", "service", name, "err", err)
		}
	}
}

func (a *Agent) announce(ctx context.Context, e Export) error {
	var resp wire.ServiceResponse
	err := a.control().call(ctx, wire.PathServices, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: e.Name, Port: e.Port,
		Priority: e.Priority, Weight: e.Weight, ServiceVersion: e.Version, Protocol: e.Protocol, UDPIdle: e.UDPIdle}, &resp)
	a.mu.Lock()
	a.announced[e.Name] = err == nil
	a.mu.Unlock()
	if err == nil {
		// The coordinator ignores reports on services a node does not
		// provide yet: a check that ran before this announce is sent again.
		a.healthChanged()
	}
	return err
}

// Expose exports a service now and saves it for later starts.
func (a *Agent) Expose(ctx context.Context, e Export) (Export, string, error) {
	return a.expose(ctx, e, false)
}

// Replace is Expose for a service this site may already export to another
// target: the new target replaces the old one.
func (a *Agent) Replace(ctx context.Context, e Export) (Export, string, error) {
	return a.expose(ctx, e, true)
}

func (a *Agent) expose(ctx context.Context, e Export, replace bool) (Export, string, error) {
	a.mu.Lock()
	if a.left {
		a.mu.Unlock()
		return e, "", errLeft
	}
	if err := a.addExportLocked(e, replace); err != nil {
		a.mu.Unlock()
		return e, "", err
	}
	e, _ = checkExport(e)
	delete(a.fromConfig, e.Name) // set at runtime now: saved for later starts
	exports := a.runtimeExports(a.exports)
	a.mu.Unlock()
	if err := a.state.saveJSON(fileServices, exports); err != nil {
		return e, "", err
	}
	a.mu.Lock()
	a.reconfigLocked()
	a.mu.Unlock()
	if err := a.announce(ctx, e); err != nil {
		if isPermanent(err) {
			return e, "", err
		}
		return e, "saved; it will be announced when the coordinator is reachable (" + err.Error() + ")", nil
	}
	return e, "", nil
}

// Unexpose stops exporting a service.
func (a *Agent) Unexpose(ctx context.Context, name string) error {
	name = wire.NormalizeName(name)
	a.mu.Lock()
	i := slices.IndexFunc(a.exports, func(e Export) bool { return e.Name == name })
	if i < 0 {
		a.mu.Unlock()
		return fmt.Errorf("this site does not export a service named %q; `meshlink services` lists them", name)
	}
	a.exports = slices.Delete(slices.Clone(a.exports), i, i+1)
	delete(a.fromConfig, name)
	exports := a.runtimeExports(a.exports)
	delete(a.announced, name)
	a.mu.Unlock()
	if err := a.state.saveJSON(fileServices, exports); err != nil {
		return err
	}
	a.mu.Lock()
	a.reconfigLocked()
	a.mu.Unlock()
	err := a.control().call(ctx, wire.PathServices, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: name, Remove: true}, nil)
	var ae *apiError
	if err != nil && !(errors.As(err, &ae) && ae.Code == wire.ErrCodeNotFound) && !isPermanent(err) {
		a.log.Warn("cannot withdraw service now; will on reconnect", "service", name, "err", err)
		return nil
	}
	if err != nil && !(errors.As(err, &ae) && ae.Code == wire.ErrCodeNotFound) {
		return err
	}
	return nil
}

// Close stops the agent and waits for everything it started. It is
// idempotent.
func (a *Agent) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	if a.expiryTimer != nil {
		a.expiryTimer.Stop()
	}
	a.mu.Unlock()
	a.goMu.Lock()
	a.goClosed = true
	a.goMu.Unlock()
	if a.cancel != nil {
		a.cancel()
	}
	a.metrics.close() // first: a scrape reads the parts closed below
	a.mu.Lock()
	hs := a.health
	a.mu.Unlock()
	hs.close()
	if a.api != nil {
		a.api.close()
	}
	a.mu.Lock()
	left := a.left
	a.mu.Unlock()
	if left {
		// Leave emptied the state directory; with the socket gone it
		// goes too, unless something else of the user's is in it.
		os.Remove(a.cfg.StateDir)
	}
	if a.local != nil {
		a.local.Close() // before the consumer it dials through
	}
	if a.consumer != nil {
		a.consumer.Close()
	}
	if a.httpOut != nil {
		a.httpOut.Close()
	}
	if a.provider != nil {
		a.provider.Close()
	}
	if a.httpIn != nil {
		a.httpIn.Close()
	}
	if a.dns != nil {
		a.dns.Close()
	}
	if a.dev != nil {
		a.dev.Close() // closes the stack (its tun.Device) and the bind
	} else if a.stack != nil {
		a.stack.Close()
	}
	if a.bind != nil {
		a.bind.Shutdown()
	}
	if a.consumer != nil {
		a.consumer.Wait()
	}
	a.wg.Wait()
	a.httpObs.shutdown() // last: the data path reports to it until closed
	return nil
}
