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
}

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

	mu     sync.Mutex              // guards the fields below
	stats  map[string]*exportStats // by service name; survives SetExports
	conns  map[net.Conn]struct{}
	closed bool

	wg sync.WaitGroup
}

type export struct {
	Export
	st *exportStats
}

type exportStats struct {
	open, total, denied, failed atomic.Int64
	ctr                         Counters
	lastErr                     atomic.Pointer[string]
}

// NewProvider returns a Provider exporting nothing.
func NewProvider(cfg ProviderConfig) *Provider {
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Provider{cfg: cfg, log: log.With("subsystem", "provider"), ctx: ctx, cancel: cancel,
		stats: map[string]*exportStats{}, conns: map[net.Conn]struct{}{}}
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
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	var d net.Dialer
	target, err := d.DialContext(ctx, "tcp", e.Target)
	cancel()
	if err != nil {
		e.st.failed.Add(1)
		msg := err.Error()
		e.st.lastErr.Store(&msg)
		p.log.Warn("service target refused; connection refused to the consumer", "service", e.Name, "target", e.Target, "peer", peer, "err", err)
		req.Reject()
		return
	}
	conn, err := req.Accept()
	if err != nil {
		target.Close()
		p.log.Debug("accept failed", "service", e.Name, "err", err)
		return
	}
	if tc, ok := target.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	if !p.track(conn, target) {
		return
	}
	defer p.untrack(conn, target)
	e.st.total.Add(1)
	e.st.open.Add(1)
	defer e.st.open.Add(-1)
	p.log.Debug("connection", "service", e.Name, "peer", peer)
	Splice(conn, target, &e.st.ctr)
}

func (p *Provider) track(a, b net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		a.Close()
		b.Close()
		return false
	}
	p.conns[a] = struct{}{}
	p.conns[b] = struct{}{}
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

// ExportStatus describes one exported service.
type ExportStatus struct {
	Export
	Open, Total, Denied, Failed int64
	Sent, Received              int64
	LastError                   string
}

// Status reports the exported services sorted by name. Sent is bytes from
// consumers to the target.
func (p *Provider) Status() []ExportStatus {
	var out []ExportStatus
	for _, e := range *p.exports.Load() {
		s := ExportStatus{Export: e.Export, Open: e.st.open.Load(), Total: e.st.total.Load(),
			Denied: e.st.denied.Load(), Failed: e.st.failed.Load(),
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
