package proxy

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/wire"
)

// UDP services. A consumer listens on UDP at the service's local address
// and keeps a flow per client address: the client's datagrams go to one
// provider, chosen when the flow starts, over a UDP socket of the
// netstack, and that socket's datagrams go back to the client. The
// provider sees each flow as one netstack.UDPRequest, checks policy once
// for it, and relays it to its target over a connected UDP socket. Both
// ends forget a flow after its idle timeout (wire.Provider.UDPIdle).

// UDPDialer opens UDP sockets across the mesh; *netstack.Stack is one.
// A ConsumerConfig.Dialer that is not one serves no UDP.
type UDPDialer interface {
	DialUDP(ctx context.Context, dst netip.AddrPort) (net.Conn, error)
}

// Default bounds of UDP flow tables.
const (
	// DefaultMaxUDPFlows bounds the flows of one service at a consumer
	// (the oldest is evicted for a new one) and of one export at a
	// provider (a new flow beyond it is dropped).
	DefaultMaxUDPFlows = 4096
	// maxDatagram is the largest datagram carried: the largest UDP
	// payload of IPv4.
	maxDatagram = 65507
)

// UDPCounters accumulate a UDP service's flows and datagrams; safe for
// concurrent use.
type UDPCounters struct {
	Flows      atomic.Int64 // open now
	FlowsTotal atomic.Int64
	// Sent counts datagrams toward the target, Received the replies.
	Sent, Received atomic.Int64
	// Dropped counts datagrams not carried: no provider, refused by
	// policy, a flow over the bound, a send that failed.
	Dropped atomic.Int64
	// Evicted counts flows closed to make room for a new one.
	Evicted atomic.Int64
}

// UDPStats is a snapshot of UDPCounters.
type UDPStats struct {
	Flows, FlowsTotal, Sent, Received, Dropped, Evicted int64
}

func (c *UDPCounters) snapshot() UDPStats {
	return UDPStats{Flows: c.Flows.Load(), FlowsTotal: c.FlowsTotal.Load(), Sent: c.Sent.Load(), Received: c.Received.Load(),
		Dropped: c.Dropped.Load(), Evicted: c.Evicted.Load()}
}

// udpFlow is one client address's flow at a consumer.
type udpFlow struct {
	client netip.AddrPort
	remote net.Conn // to the provider (the netstack), or to the local target
	target Target
	idle   time.Duration
	last   atomic.Int64 // unix nanoseconds of the last datagram either way
	elem   *list.Element
	once   sync.Once
	done   func() // gives back the flow's counts; run once by close
}

func (f *udpFlow) touch(now time.Time) { f.last.Store(now.UnixNano()) }

// close closes the flow's socket (its reply loop ends) and gives back
// its counts, once.
func (f *udpFlow) close() {
	f.once.Do(func() {
		f.remote.Close()
		if f.done != nil {
			f.done()
		}
	})
}

// flowTable holds one service's flows by client address, bounded: a new
// flow beyond max evicts the one whose client sent least recently. The
// caller passes the time, so tests drive it with a fake clock.
type flowTable struct {
	max int

	mu     sync.Mutex // guards the fields below
	flows  map[netip.AddrPort]*udpFlow
	order  *list.List // of *udpFlow, least recently used by its client first
	closed bool       // closeAll ran: add refuses
}

func newFlowTable(max int) *flowTable {
	if max <= 0 {
		max = DefaultMaxUDPFlows
	}
	return &flowTable{max: max, flows: map[netip.AddrPort]*udpFlow{}, order: list.New()}
}

// get returns the flow of client, marking it used at now, or nil.
func (t *flowTable) get(client netip.AddrPort, now time.Time) *udpFlow {
	t.mu.Lock()
	defer t.mu.Unlock()
	f := t.flows[client]
	if f != nil {
		f.touch(now)
		t.order.MoveToBack(f.elem)
	}
	return f
}

// add puts f in the table, used at now, and returns the flow it evicted
// to stay within max (for the caller to close), or nil. A flow of the
// same client already there is returned as evicted too; f itself once
// the table is closed.
func (t *flowTable) add(f *udpFlow, now time.Time) (evicted *udpFlow) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return f
	}
	f.touch(now)
	if old := t.flows[f.client]; old != nil {
		t.removeLocked(old)
		evicted = old
	} else if len(t.flows) >= t.max {
		evicted = t.order.Front().Value.(*udpFlow)
		t.removeLocked(evicted)
	}
	f.elem = t.order.PushBack(f)
	t.flows[f.client] = f
	return evicted
}

// remove takes f out of the table; false if it was not there.
func (t *flowTable) remove(f *udpFlow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.flows[f.client] != f {
		return false
	}
	t.removeLocked(f)
	return true
}

func (t *flowTable) removeLocked(f *udpFlow) {
	delete(t.flows, f.client)
	t.order.Remove(f.elem)
}

// expire takes out and returns the flows idle at now: no datagram either
// way for their idle timeout.
func (t *flowTable) expire(now time.Time) []*udpFlow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*udpFlow
	for _, f := range t.flows {
		if now.Sub(time.Unix(0, f.last.Load())) >= f.idle {
			out = append(out, f)
		}
	}
	for _, f := range out {
		t.removeLocked(f)
	}
	return out
}

// removeIf takes out and returns the flows drop selects.
func (t *flowTable) removeIf(drop func(*udpFlow) bool) []*udpFlow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*udpFlow
	for _, f := range t.flows {
		if drop(f) {
			out = append(out, f)
		}
	}
	for _, f := range out {
		t.removeLocked(f)
	}
	return out
}

// closeAll takes out and returns every flow; add refuses from now on.
func (t *flowTable) closeAll() []*udpFlow {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	return t.removeIf(func(*udpFlow) bool { return true })
}

func (t *flowTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.flows)
}

// udpService is the UDP side of a consumed service.
type udpService struct {
	pc    *net.UDPConn
	bound netip.AddrPort
	flows *flowTable
}

// listenUDP opens the UDP socket of a service at addr or, as listen does
// for TCP, at FallbackPort when the port needs privileges.
func (c *Consumer) listenUDP(name string, addr netip.AddrPort) (*net.UDPConn, error) {
	pc, err := c.cfg.ListenUDP(addr)
	if err == nil {
		return pc, nil
	}
	if !errors.Is(err, syscall.EACCES) || FallbackPort(addr.Port()) == addr.Port() {
		return nil, listenError(addr, err)
	}
	alt := netip.AddrPortFrom(addr.Addr(), FallbackPort(addr.Port()))
	pc, err2 := c.cfg.ListenUDP(alt)
	if err2 != nil {
		return nil, fmt.Errorf("udp port %d needs privileges and the fallback port %d is not free either (%w); free %s, or let meshlink bind low ports: %s",
			addr.Port(), alt.Port(), err2, alt, SetcapHint)
	}
	c.log.Warn("service port needs privileges; serving its UDP on the fallback port instead", "service", name, "port", addr.Port(), "serving", alt.String(), "for_the_real_port", SetcapHint)
	return pc, nil
}

// startUDPLocked opens the service's UDP socket and starts its read loop.
func (c *Consumer) startUDPLocked(s *service) error {
	pc, err := c.listenUDP(s.name, s.listen)
	if err != nil {
		return err
	}
	bound := s.listen
	if ua, ok := pc.LocalAddr().(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		bound = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	u := &udpService{pc: pc, bound: bound, flows: newFlowTable(c.cfg.MaxUDPFlows)}
	s.udp = u
	c.wg.Add(1)
	go c.readUDP(s, u)
	c.log.Debug("consuming UDP service", "service", s.name, "addr", bound)
	return nil
}

// stopUDPLocked closes the service's UDP socket and every flow.
func (c *Consumer) stopUDPLocked(s *service) {
	if s.udp == nil {
		return
	}
	s.udp.pc.Close()
	for _, f := range s.udp.flows.closeAll() {
		f.close()
	}
	s.udp = nil
}

// readUDP reads the clients' datagrams of one service and sends each on
// its flow, starting flows as new clients appear.
func (c *Consumer) readUDP(s *service, u *udpService) {
	defer c.wg.Done()
	bo := backoff.Backoff{Min: 5 * time.Millisecond, Max: time.Second}
	buf := make([]byte, maxDatagram)
	for {
		n, client, err := u.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			c.log.Debug("udp read failed", "service", s.name, "err", err)
			time.Sleep(bo.Next()) // Close closes pc: at most a second later the loop ends
			continue
		}
		bo.Reset()
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		now := c.cfg.Now()
		f := u.flows.get(client, now)
		if f == nil {
			if f, err = c.startFlow(s, u, client); err != nil {
				s.udpCtr.Dropped.Add(1)
				s.logDrop(c, err)
				continue
			}
		}
		if _, err := f.remote.Write(buf[:n]); err != nil {
			s.udpCtr.Dropped.Add(1)
			continue
		}
		s.udpCtr.Sent.Add(1)
		s.ctr.Sent.Add(int64(n))
	}
}

// logDrop logs a datagram dropped for want of a provider, at most once a
// second per service: any client may cause any number of them.
func (s *service) logDrop(c *Consumer, err error) {
	s.selMu.Lock()
	now := c.cfg.Now()
	log := now.Sub(s.lastLog) >= time.Second
	if log {
		s.lastLog = now
	}
	s.selMu.Unlock()
	if log {
		c.log.Warn("udp datagram dropped: no provider took the flow; see `meshlink services`", "service", s.name, "err", err, "dropped", s.udpCtr.Dropped.Load())
	}
}

// startFlow chooses a provider for a new client, opens the flow's socket
// and starts its reply loop.
func (c *Consumer) startFlow(s *service, u *udpService, client netip.AddrPort) (*udpFlow, error) {
	targets, err := c.order(s, client.Addr(), true)
	if err != nil {
		s.refused.Add(1)
		return nil, err
	}
	var errs []error
	for _, t := range targets {
		remote, err := c.dialUDP(t)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", t.Name, err))
			continue
		}
		h := c.healthOf(t.Node)
		h.open.Add(1)
		s.noteSelected(t.Node)
		s.udpCtr.Flows.Add(1)
		s.udpCtr.FlowsTotal.Add(1)
		f := &udpFlow{client: client, remote: remote, target: t, idle: wire.UDPIdleOf(t.UDPIdle),
			done: func() { h.open.Add(-1); s.udpCtr.Flows.Add(-1) }}
		if old := u.flows.add(f, c.cfg.Now()); old == f {
			f.close()
			return nil, net.ErrClosed
		} else if old != nil {
			old.close()
			s.udpCtr.Evicted.Add(1)
		}
		c.wg.Add(1)
		go c.replies(s, u, f)
		return f, nil
	}
	return nil, errors.Join(errs...)
}

// dialUDP opens a flow's socket to t: through the mesh, or straight to
// the target when this node provides the service itself.
func (c *Consumer) dialUDP(t Target) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.DialTimeout)
	defer cancel()
	if t.Local != "" {
		var d net.Dialer
		return d.DialContext(ctx, "udp", t.Local)
	}
	ud, ok := c.cfg.Dialer.(UDPDialer)
	if !ok {
		return nil, errors.New("this consumer's dialer carries no UDP")
	}
	return ud.DialUDP(ctx, t.Addr)
}

// replies sends the flow's datagrams from the provider back to its
// client until the flow is closed.
func (c *Consumer) replies(s *service, u *udpService, f *udpFlow) {
	defer c.wg.Done()
	defer func() {
		u.flows.remove(f)
		f.close()
	}()
	buf := make([]byte, maxDatagram)
	for {
		n, err := f.remote.Read(buf)
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				// A local target's ICMP port unreachable: the flow
				// goes on, as the client's own socket would.
				s.udpCtr.Dropped.Add(1)
				continue
			}
			return
		}
		f.touch(c.cfg.Now())
		if _, err := u.pc.WriteToUDPAddrPort(buf[:n], f.client); err != nil {
			s.udpCtr.Dropped.Add(1)
			continue
		}
		s.udpCtr.Received.Add(1)
		s.ctr.Received.Add(int64(n))
	}
}

// sweepUDP closes idle flows of every service until the consumer closes.
func (c *Consumer) sweepUDP() {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.UDPSweep)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		c.expireUDP()
	}
}

// expireUDP closes the flows idle now.
func (c *Consumer) expireUDP() {
	now := c.cfg.Now()
	c.mu.Lock()
	var idle []*udpFlow
	for _, s := range c.services {
		if s.udp != nil {
			idle = append(idle, s.udp.flows.expire(now)...)
		}
	}
	c.mu.Unlock()
	for _, f := range idle {
		f.close()
	}
}

// closeUDPFlowsLocked closes the UDP flows drop selects, and reports how
// many; the log says why.
func (c *Consumer) closeUDPFlowsLocked(drop func(s *service, f *udpFlow) string) int {
	n := 0
	for _, s := range c.services {
		if s.udp == nil {
			continue
		}
		reasons := map[*udpFlow]string{}
		for _, f := range s.udp.flows.removeIf(func(f *udpFlow) bool {
			r := drop(s, f)
			reasons[f] = r
			return r != ""
		}) {
			f.close()
			n++
			c.log.Info("closed a udp flow to a provider that is gone", "service", s.name, "provider", f.target.Name, "node", f.target.Node, "reason", reasons[f])
		}
	}
	return n
}

// HandleUDP is the netstack's handler for the first datagram of a new
// UDP flow. It checks the flow against policy, as HandleTCP does a
// connection, and relays it to the export's target until it is idle for
// the export's UDPIdle, the provider closes, or policy changes (CloseIf).
func (p *Provider) HandleUDP(req *netstack.UDPRequest) {
	e := (*p.udp.Load())[req.Dst.Port()]
	if e == nil {
		req.Reject()
		return
	}
	src := req.Src.Addr()
	peer, ok := "", false
	if p.cfg.Policy != nil {
		peer, ok = p.cfg.Policy(src, e.Name)
	}
	if !ok {
		e.st.denied.Add(1)
		e.st.udp.Dropped.Add(1)
		if p.cfg.Denied != nil {
			p.cfg.Denied(src, e.Name)
		} else {
			p.log.Debug("udp flow denied by policy", "service", e.Name, "from", src, "peer", peer)
		}
		req.Reject()
		return
	}
	if e.st.udp.Flows.Load() >= int64(p.cfg.MaxUDPFlowsPerExport) {
		e.st.busy.Add(1)
		e.st.udp.Dropped.Add(1)
		p.log.Debug("too many udp flows; datagram dropped", "service", e.Name, "from", src, "peer", peer)
		req.Reject()
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	var d net.Dialer
	target, err := d.DialContext(ctx, "udp", e.Target)
	cancel()
	if err != nil {
		e.st.failed.Add(1)
		e.st.udp.Dropped.Add(1)
		msg := err.Error()
		e.st.lastErr.Store(&msg)
		p.log.Warn("cannot open udp to the service target; datagram dropped", "service", e.Name, "target", e.Target, "err", err)
		req.Reject()
		return
	}
	conn, err := req.Accept()
	if err != nil {
		target.Close()
		e.st.udp.Dropped.Add(1)
		return
	}
	in := &inbound{mesh: conn, target: target, src: src.Unmap(), service: e.Name, peer: peer}
	if !p.track(in) {
		return
	}
	defer p.untrack(in)
	e.st.udp.FlowsTotal.Add(1)
	e.st.udp.Flows.Add(1)
	defer e.st.udp.Flows.Add(-1)
	if why := p.stillAllowed(in); why != "" {
		p.closeLogged(in, why)
		return
	}
	p.log.Debug("udp flow", "service", e.Name, "peer", peer)
	relayUDP(conn, target, wire.UDPIdleOf(e.UDPIdle), &e.st.udp, &e.st.ctr)
}

// relayUDP carries datagrams between two connected sockets both ways
// until neither carried one for idle, or either is closed; then it
// closes both. mesh is the originating side for the counters.
func relayUDP(mesh, target net.Conn, idle time.Duration, uc *UDPCounters, bc *Counters) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var wg sync.WaitGroup
	var once sync.Once
	stop := func() {
		once.Do(func() {
			mesh.Close()
			target.Close()
		})
	}
	pump := func(dst, src net.Conn, dgrams, bytes *atomic.Int64) {
		defer wg.Done()
		defer stop()
		buf := make([]byte, maxDatagram)
		for {
			src.SetReadDeadline(time.Unix(0, last.Load()).Add(idle))
			n, err := src.Read(buf)
			if err != nil {
				switch {
				case errors.Is(err, os.ErrDeadlineExceeded):
					if time.Since(time.Unix(0, last.Load())) >= idle {
						return
					}
					continue // the other direction kept the flow alive
				case errors.Is(err, syscall.ECONNREFUSED):
					uc.Dropped.Add(1) // the target's port is closed; it may open
					continue
				}
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				uc.Dropped.Add(1)
				continue
			}
			dgrams.Add(1)
			bytes.Add(int64(n))
		}
	}
	wg.Add(2)
	go pump(target, mesh, &uc.Sent, &bc.Sent)
	go pump(mesh, target, &uc.Received, &bc.Received)
	wg.Wait()
}
