package proxy

import (
	"context"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/wire"
)

// Export is a service this site provides on the mesh.
type Export struct {
	Name   string `json:"name"`
	Target string `json:"target"` // host:port dialed for each inbound connection
	Port   uint16 `json:"port"`   // port on this node's mesh addresses
	// Priority, Weight and Version are announced with the export
	// (wire.Provider): how consumers choose between its providers.
	Priority int    `json:"priority,omitempty"`
	Weight   int    `json:"weight,omitempty"`
	Version  string `json:"version,omitempty"`
	// Health is how the target is checked (ParseHealth); "" is a TCP
	// connect every DefaultHealthInterval, or no check for a UDP-only
	// export (UDP has no connect to check).
	Health string `json:"health,omitempty"`
	// Protocol is what the export carries: "" (TCP), wire.ProtocolUDP
	// or wire.ProtocolTCPUDP. UDPIdle is the seconds a UDP flow may go
	// without a datagram; 0 is wire.DefaultUDPIdle.
	Protocol string `json:"protocol,omitempty"`
	UDPIdle  int    `json:"udp_idle,omitempty"`
	// HTTP is the service's HTTP configuration from the network map
	// (wire.Service.HTTP), set when the map makes it HTTP; an export
	// with Protocol wire.ProtocolHTTP is HTTP without it too.
	HTTP *wire.ServiceHTTP `json:"-"`
}

// IsHTTP reports whether inbound connections of e are parsed as HTTP and
// served request by request (ProviderConfig.HTTP).
func (e *Export) IsHTTP() bool { return e.Protocol == wire.ProtocolHTTP || e.HTTP != nil }

// HTTPExporter serves the inbound mesh connections of HTTP exports
// request by request; httpmesh.Provider is one.
type HTTPExporter interface {
	// ServeConn serves conn, from mesh address src and allowed by policy,
	// until it ends; the Provider closes conn when policy stops allowing
	// it or the Provider closes.
	ServeConn(e Export, src netip.Addr, conn net.Conn)
}

// PolicyFunc decides whether the mesh address src may reach service. It
// returns the name of the peer for logs, and ok. It is where the service
// lives that access is decided: the network map only hides services.
type PolicyFunc func(src netip.Addr, service string) (peer string, ok bool)

// ProviderConfig configures a Provider.
type ProviderConfig struct {
	Logger *slog.Logger
	// Policy is consulted for every inbound connection; nil denies all.
	Policy PolicyFunc
	// DialTimeout bounds the dial of the real target; default 5s.
	DialTimeout time.Duration
	// MaxPendingPerPeer bounds the inbound connections from one mesh
	// address that are between their SYN and a completed handshake (the
	// target being dialed, or the final ACK awaited): each holds a
	// connection to the real target, so a peer sending SYNs it never
	// completes would otherwise open one per SYN. A SYN beyond it is
	// refused with a RST. Default DefaultMaxPendingPerPeer.
	MaxPendingPerPeer int
	// MaxPendingPerExport is the same bound for all peers together, per
	// exported service. Default DefaultMaxPendingPerExport.
	MaxPendingPerExport int
	// MaxOpenPerExport bounds the open connections of one exported
	// service, and with them the table CloseIf walks; a SYN beyond it is
	// refused with a RST and counted as busy. Default
	// DefaultMaxOpenPerExport.
	MaxOpenPerExport int
	// MaxUDPFlowsPerExport bounds the UDP flows of one exported service:
	// the first datagram of a flow beyond it is dropped and counted.
	// Default DefaultMaxUDPFlows.
	MaxUDPFlowsPerExport int
	// Denied, if set, is told of every connection Policy refused (after
	// it was counted); it logs and reports them, rate-limited. Without
	// it denials are logged at debug level only: a peer may cause any
	// number of them.
	Denied func(src netip.Addr, service string)
	// HealthInterval and HealthTimeout pace the checks of each export's
	// target; defaults DefaultHealthInterval, DefaultHealthTimeout.
	HealthInterval, HealthTimeout time.Duration
	// OnHealth is called, on a checker's goroutine, whenever the health
	// of an export changes; Health then reports it.
	OnHealth func()
	// HTTP serves the connections of HTTP exports (Export.IsHTTP); nil
	// splices them to the target as TCP.
	HTTP HTTPExporter
}

// Default bounds on half-open inbound connections (ProviderConfig).
const (
	DefaultMaxPendingPerPeer   = 64
	DefaultMaxPendingPerExport = 256
	DefaultMaxOpenPerExport    = 16384
)

// Provider accepts connections that arrive over the mesh for exported
// services, checks them against policy and splices them to the target.
// Only ports of exported services are ever accepted: nothing else on the
// host becomes reachable from the mesh.
type Provider struct {
	cfg     ProviderConfig
	log     *slog.Logger
	exports atomic.Pointer[map[uint16]*export] // TCP, by mesh port
	udp     atomic.Pointer[map[uint16]*export] // UDP, by mesh port
	// ctx is the context of every dial to a target; Close cancels it, so
	// a provider going away does not wait out dials to slow targets.
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex              // guards the fields below
	stats map[string]*exportStats // by service name; survives SetExports
	// conns holds every open connection (CloseIf); at most
	// MaxOpenPerExport (plus those half-open) per export.
	conns  map[*inbound]struct{}
	closed bool
	// checkers run the health checks, by service name; health holds
	// their last results.
	checkers map[string]*checker
	health   map[string]ExportHealth

	pendMu sync.Mutex // guards the fields below
	// pending counts half-open connections by source address; an entry
	// is deleted at zero, so it holds at most the stack's in-flight SYNs.
	pending map[netip.Addr]int

	wg  sync.WaitGroup
	hwg sync.WaitGroup // health checkers
}

// inbound is one open connection as CloseIf sees it.
type inbound struct {
	mesh, target net.Conn   // target is nil for HTTP (pooled per request)
	src          netip.Addr // the mesh source address, unmapped
	service      string
	peer         string // the peer's name when it was accepted, for logs
}

type export struct {
	Export
	st *exportStats
}

type exportStats struct {
	open, total, denied, failed, busy atomic.Int64
	pending                           int // guarded by Provider.pendMu
	ctr                               Counters
	lastErr                           atomic.Pointer[string]
	udp                               UDPCounters
}

// NewProvider returns a Provider exporting nothing.
func NewProvider(cfg ProviderConfig) *Provider {
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.MaxPendingPerPeer <= 0 {
		cfg.MaxPendingPerPeer = DefaultMaxPendingPerPeer
	}
	if cfg.HealthInterval <= 0 {
		cfg.HealthInterval = DefaultHealthInterval
	}
	if cfg.HealthTimeout <= 0 {
		cfg.HealthTimeout = DefaultHealthTimeout
	}
	if cfg.MaxPendingPerExport <= 0 {
		cfg.MaxPendingPerExport = DefaultMaxPendingPerExport
	}
	if cfg.MaxOpenPerExport <= 0 {
		cfg.MaxOpenPerExport = DefaultMaxOpenPerExport
	}
	if cfg.MaxUDPFlowsPerExport <= 0 {
		cfg.MaxUDPFlowsPerExport = DefaultMaxUDPFlows
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Provider{cfg: cfg, log: log.With("subsystem", "provider"), ctx: ctx, cancel: cancel,
		stats: map[string]*exportStats{}, conns: map[*inbound]struct{}{}, pending: map[netip.Addr]int{},
		checkers: map[string]*checker{}, health: map[string]ExportHealth{}}
	empty, emptyUDP := map[uint16]*export{}, map[uint16]*export{}
	p.exports.Store(&empty)
	p.udp.Store(&emptyUDP)
	return p
}

// SetExports replaces the exported services whole.
func (p *Provider) SetExports(es []Export) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[uint16]*export, len(es))
	mu := map[uint16]*export{}
	for _, e := range es {
		st := p.stats[e.Name]
		if st == nil {
			st = &exportStats{}
			p.stats[e.Name] = st
		}
		if wire.HasTCP(e.Protocol) {
			m[e.Port] = &export{Export: e, st: st}
		}
		if wire.HasUDP(e.Protocol) {
			mu[e.Port] = &export{Export: e, st: st}
		}
	}
	p.exports.Store(&m)
	p.udp.Store(&mu)
	if !p.closed {
		p.setCheckersLocked(es)
	}
}

// HandleTCP is the netstack's handler for inbound TCP. It runs on its own
// goroutine and completes or refuses the handshake only after the real
// target answered, so a refusing target shows up at the consumer as a
// refused connection at once.
func (p *Provider) HandleTCP(req *netstack.TCPRequest) {
	e := (*p.exports.Load())[req.Dst.Port()]
	if e == nil {
		req.Reject()
		return
	}
	peer, ok := "", false
	if p.cfg.Policy != nil {
		peer, ok = p.cfg.Policy(req.Src.Addr(), e.Name)
	}
	src := req.Src.Addr()
	if !ok {
		e.st.denied.Add(1)
		if p.cfg.Denied != nil {
			p.cfg.Denied(src, e.Name)
		} else {
			p.log.Debug("connection denied by policy", "service", e.Name, "from", src, "peer", peer)
		}
		req.Reject()
		return
	}
	// The bound is checked before the connection is counted open, so up
	// to MaxPendingPerExport more may pass it at once: still bounded.
	if e.st.open.Load() >= int64(p.cfg.MaxOpenPerExport) || !p.startPending(src, e) {
		e.st.busy.Add(1)
		p.log.Debug("too many open or half-open connections; refused", "service", e.Name, "from", src, "peer", peer)
		req.Reject()
		return
	}
	if e.IsHTTP() && p.cfg.HTTP != nil {
		// Requests are forwarded one by one over pooled connections to
		// the target: the handshake completes at once, and a dead target
		// is a 502 per request.
		conn, err := req.Accept()
		p.endPending(src, e)
		if err != nil {
			p.log.Debug("accept failed", "service", e.Name, "peer", peer, "err", err)
			return
		}
		p.serveTracked(&inbound{mesh: conn, src: src.Unmap(), service: e.Name, peer: peer}, e, func() {
			p.cfg.HTTP.ServeConn(e.Export, src, conn)
		})
		return
	}
	target, conn, err := p.open(req, e)
	p.endPending(src, e)
	if err != nil {
		p.log.Debug("accept failed", "service", e.Name, "peer", peer, "err", err)
		return
	}
	if tc, ok := target.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	p.serveTracked(&inbound{mesh: conn, target: target, src: src.Unmap(), service: e.Name, peer: peer}, e, func() {
		p.log.Debug("connection", "service", e.Name, "peer", peer)
		Splice(conn, target, &e.st.ctr)
	})
}

// serveTracked counts and tracks the open connection in while serve runs.
func (p *Provider) serveTracked(in *inbound, e *export, serve func()) {
	if !p.track(in) {
		return
	}
	defer p.untrack(in)
	e.st.total.Add(1)
	e.st.open.Add(1)
	defer e.st.open.Add(-1)
	// The policy or the exports may have changed while the target was
	// dialed, after CloseIf last looked at the table: asked again now that
	// the connection is in it, every change is seen by one of the two.
	if why := p.stillAllowed(in); why != "" {
		p.closeLogged(in, why)
		return
	}
	serve()
}

// exported reports whether service is exported now.
func (p *Provider) exported(service string) bool {
	for _, m := range []map[uint16]*export{*p.exports.Load(), *p.udp.Load()} {
		for _, e := range m {
			if e.Name == service {
				return true
			}
		}
	}
	return false
}

// stillAllowed returns why the open connection in may not go on under the
// policy and exports in force now, or "".
func (p *Provider) stillAllowed(in *inbound) string {
	if !p.exported(in.service) {
		return "the service is no longer exported here"
	}
	if p.cfg.Policy == nil {
		return "no policy"
	}
	if _, ok := p.cfg.Policy(in.src, in.service); !ok {
		return "no longer allowed by policy"
	}
	return ""
}

// open dials the target and then completes the handshake; it refuses the
// request if the target does not answer. On error nothing is left open.
func (p *Provider) open(req *netstack.TCPRequest, e *export) (target, conn net.Conn, err error) {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	var d net.Dialer
	target, err = d.DialContext(ctx, "tcp", e.Target)
	cancel()
	if err != nil {
		e.st.failed.Add(1)
		msg := err.Error()
		e.st.lastErr.Store(&msg)
		p.log.Warn("service target refused; connection refused to the consumer", "service", e.Name, "target", e.Target, "from", req.Src.Addr(), "err", err)
		req.Reject()
		return nil, nil, err
	}
	conn, err = req.Accept()
	if err != nil {
		target.Close()
		return nil, nil, err
	}
	return target, conn, nil
}

// startPending counts a half-open connection from src to e, unless either
// bound is reached. Not a semaphore like the consumer's dial slots
// (health.acquireDial): it never waits, both bounds are taken together or
// not at all under one lock, and the per-source count, keyed by address,
// is dropped at zero.
func (p *Provider) startPending(src netip.Addr, e *export) bool {
	p.pendMu.Lock()
	defer p.pendMu.Unlock()
	if p.pending[src] >= p.cfg.MaxPendingPerPeer || e.st.pending >= p.cfg.MaxPendingPerExport {
		return false
	}
	p.pending[src]++
	e.st.pending++
	return true
}

func (p *Provider) endPending(src netip.Addr, e *export) {
	p.pendMu.Lock()
	defer p.pendMu.Unlock()
	if p.pending[src]--; p.pending[src] <= 0 {
		delete(p.pending, src)
	}
	e.st.pending--
}

func (p *Provider) track(in *inbound) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		in.close()
		return false
	}
	p.conns[in] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *Provider) untrack(in *inbound) {
	p.mu.Lock()
	delete(p.conns, in)
	p.mu.Unlock()
	p.wg.Done()
}

// close closes both sides of in (an HTTP connection has no target side).
func (in *inbound) close() {
	in.mesh.Close()
	if in.target != nil {
		in.target.Close()
	}
}

// closeLogged closes both sides of in and says why.
func (p *Provider) closeLogged(in *inbound, why string) {
	in.close()
	p.log.Info("closed a connection that is no longer allowed", "service", in.service, "node", in.peer, "from", in.src, "reason", why)
}

// CloseIf closes every open connection for which why returns a reason
// (not ""), both its mesh side (the consumer sees it end) and its side to
// the target, logs each with its service, peer and reason, and reports how
// many it closed. The agent calls it when a new network map changes who
// may reach what: a connection is checked when it is accepted, and again
// whenever the answer may have changed, so what policy no longer allows
// does not go on until the peers close it.
func (p *Provider) CloseIf(why func(src netip.Addr, service string) string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for in := range p.conns {
		if r := why(in.src, in.service); r != "" {
			p.closeLogged(in, r)
			delete(p.conns, in) // untrack finds it gone; a second CloseIf skips it
			n++
		}
	}
	return n
}

// CloseFrom closes every open connection whose mesh source address keep
// rejects, as CloseIf does, and reports how many it closed: a node removed
// from the mesh is cut off at once, since WireGuard forgetting a peer
// stops its packets but leaves the netstack's TCP connections (and the
// target's) open until they time out.
func (p *Provider) CloseFrom(keep func(src netip.Addr) bool) int {
	return p.CloseIf(func(src netip.Addr, _ string) string {
		if keep(src) {
			return ""
		}
		return "the peer left the network map"
	})
}

// ExportStatus describes one exported service.
type ExportStatus struct {
	Export
	Open, Total, Denied, Failed int64
	// Busy counts SYNs refused because too many connections were
	// half-open (ProviderConfig.MaxPendingPerPeer, MaxPendingPerExport).
	Busy           int64
	Sent, Received int64
	LastError      string
	// UDP counts the export's UDP flows and datagrams.
	UDP UDPStats
	// Health is the last check of the target (Checked false with checks
	// off or before the first).
	Health ExportHealth
}

// Status reports the exported services sorted by name. Sent is bytes from
// consumers to the target.
func (p *Provider) Status() []ExportStatus {
	p.mu.Lock()
	health := make(map[string]ExportHealth, len(p.health))
	for k, v := range p.health {
		health[k] = v
	}
	p.mu.Unlock()
	var out []ExportStatus
	all := maps.Clone(*p.exports.Load())
	for port, e := range *p.udp.Load() {
		all[port] = e // the same export when it carries both
	}
	for _, e := range all {
		s := ExportStatus{Export: e.Export, Open: e.st.open.Load(), Total: e.st.total.Load(),
			Denied: e.st.denied.Load(), Failed: e.st.failed.Load(), Busy: e.st.busy.Load(),
			Sent: e.st.ctr.Sent.Load(), Received: e.st.ctr.Received.Load(), Health: health[e.Name],
			UDP: e.st.udp.snapshot()}
		if le := e.st.lastErr.Load(); le != nil {
			s.LastError = *le
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Close cancels dials in flight, closes every open connection and waits
// for them. It is idempotent.
func (p *Provider) Close() {
	p.cancel()
	p.mu.Lock()
	p.closed = true
	for in := range p.conns {
		in.close()
	}
	for name := range p.checkers {
		p.stopCheckerLocked(name)
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.hwg.Wait()
}
