package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/netstack"
)

// Export is a service this site provides on the mesh.
type Export struct {
	Name   string `json:"name"`
	Target string `json:"target"` // host:port dialed for each inbound connection
	Port   uint16 `json:"port"`   // port on this node's mesh addresses
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
}

// Default bounds on half-open inbound connections (ProviderConfig).
const (
	DefaultMaxPendingPerPeer   = 64
	DefaultMaxPendingPerExport = 256
)

// Provider accepts connections that arrive over the mesh for exported
// services, checks them against policy and splices them to the target.
// Only ports of exported services are ever accepted: nothing else on the
// host becomes reachable from the mesh.
type Provider struct {
	cfg     ProviderConfig
	log     *slog.Logger
	exports atomic.Pointer[map[uint16]*export]
	// ctx is the context of every dial to a target; Close cancels it, so
	// a provider going away does not wait out dials to slow targets.
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex              // guards the fields below
	stats map[string]*exportStats // by service name; survives SetExports
	// conns holds both sides of every open connection, each with the mesh
	// address the connection came from (CloseFrom).
	conns  map[net.Conn]netip.Addr
	closed bool

	pendMu sync.Mutex // guards the fields below
	// pending counts half-open connections by source address; an entry
	// is deleted at zero, so it holds at most the stack's in-flight SYNs.
	pending map[netip.Addr]int

	wg sync.WaitGroup
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
}

// NewProvider returns a Provider exporting nothing.
func NewProvider(cfg ProviderConfig) *Provider {
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.MaxPendingPerPeer <= 0 {
		cfg.MaxPendingPerPeer = DefaultMaxPendingPerPeer
	}
	if cfg.MaxPendingPerExport <= 0 {
		cfg.MaxPendingPerExport = DefaultMaxPendingPerExport
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Provider{cfg: cfg, log: log.With("subsystem", "provider"), ctx: ctx, cancel: cancel,
		stats: map[string]*exportStats{}, conns: map[net.Conn]netip.Addr{}, pending: map[netip.Addr]int{}}
	empty := map[uint16]*export{}
	p.exports.Store(&empty)
	return p
}

// SetExports replaces the exported services whole.
func (p *Provider) SetExports(es []Export) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[uint16]*export, len(es))
	for _, e := range es {
		st := p.stats[e.Name]
		if st == nil {
			st = &exportStats{}
			p.stats[e.Name] = st
		}
		m[e.Port] = &export{Export: e, st: st}
	}
	p.exports.Store(&m)
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
	if !ok {
		e.st.denied.Add(1)
		p.log.Warn("connection denied by policy", "service", e.Name, "from", req.Src.Addr(), "peer", peer)
		req.Reject()
		return
	}
	src := req.Src.Addr()
	if !p.startPending(src, e) {
		e.st.busy.Add(1)
		p.log.Debug("too many half-open connections; refused", "service", e.Name, "from", src, "peer", peer)
		req.Reject()
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
	if !p.track(src, conn, target) {
		return
	}
	defer p.untrack(conn, target)
	e.st.total.Add(1)
	e.st.open.Add(1)
	defer e.st.open.Add(-1)
	p.log.Debug("connection", "service", e.Name, "peer", peer)
	Splice(conn, target, &e.st.ctr)
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
// bound is reached.
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

func (p *Provider) track(src netip.Addr, a, b net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		a.Close()
		b.Close()
		return false
	}
	src = src.Unmap()
	p.conns[a] = src
	p.conns[b] = src
	p.wg.Add(1)
	return true
}

func (p *Provider) untrack(a, b net.Conn) {
	p.mu.Lock()
	delete(p.conns, a)
	delete(p.conns, b)
	p.mu.Unlock()
	p.wg.Done()
}

// CloseFrom closes every open connection whose mesh source address keep
// rejects, both its mesh side and its side to the target, and reports how
// many connections it closed. The agent calls it when peers leave the
// network map: WireGuard forgetting a peer stops its packets but leaves
// the netstack's TCP connections (and the target's) open until they time
// out, so a removed node would otherwise keep what it had open.
func (p *Provider) CloseFrom(keep func(src netip.Addr) bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c, src := range p.conns {
		if !keep(src) {
			c.Close()
			n++
		}
	}
	// Both sides of each connection are tracked: count connections.
	return n / 2
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
}

// Status reports the exported services sorted by name. Sent is bytes from
// consumers to the target.
func (p *Provider) Status() []ExportStatus {
	var out []ExportStatus
	for _, e := range *p.exports.Load() {
		s := ExportStatus{Export: e.Export, Open: e.st.open.Load(), Total: e.st.total.Load(),
			Denied: e.st.denied.Load(), Failed: e.st.failed.Load(), Busy: e.st.busy.Load(),
			Sent: e.st.ctr.Sent.Load(), Received: e.st.ctr.Received.Load()}
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
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
