package netstack

import (
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

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

const (
	// Buffer ranges. The defaults (1 MiB) keep an idle connection cheap;
	// the maxima (8 MiB) let one flow fill a high bandwidth-delay path,
	// ~1 Gbit/s at 64 ms RTT (see docs/netstack-tuning.md#buffer-sizes).
	tcpBufMin     = tcp.MinBufferSize
	tcpBufDefault = 1 << 20
	tcpBufMax     = 8 << 20

	// tcpMaxInFlight bounds handshakes waiting for a handler decision; a
	// SYN flood beyond it is dropped rather than spawning goroutines.
	tcpMaxInFlight = 1024

	keepaliveIdle     = 60 * time.Second
	keepaliveInterval = 15 * time.Second
)

// Loss recovery settings; see tuneTCP.
const (
	tcpMinRTO = 10 * time.Millisecond
	tcpMaxRTO = 2 * time.Second
	// tcpGiveUp is roughly how long a connection with unacknowledged data
	// survives a dead path before it is reset (Linux's default is ~15
	// minutes); tcpMaxRetries is derived from it.
	tcpGiveUp = 15 * time.Minute
)

// tcpMaxRetries is how many retransmission timeouts in a row, backing off
// from tcpMinRTO and capped at tcpMaxRTO, add up to tcpGiveUp.
var tcpMaxRetries = func() int {
	n, rto := 0, tcpMinRTO
	for total := time.Duration(0); total < tcpGiveUp; n++ {
		total += rto
		rto = min(2*rto, tcpMaxRTO)
	}
	return n
}()

// tuneTCP applies stack-wide TCP settings, chosen for throughput over a
// WireGuard tunnel and for recovering from random loss and path outages.
// What was measured for each is in docs/netstack-tuning.md.
//   - SACK on (gVisor's default is off): without it every hole in a large
//     window costs a round trip (see docs/netstack-tuning.md#sack-on).
//   - Reno, not CUBIC: at a sub-millisecond RTT gVisor's CUBIC keeps the
//     window too small for duplicate ACKs to reveal a loss, and regrows it
//     slowly after an outage; the price is slower regrowth after congestion
//     on long fat paths (see docs/netstack-tuning.md#reno-instead-of-cubic).
//   - RACK-TLP off: in this gVisor version it stalls streams after an
//     outage (see docs/netstack-tuning.md#rack-tlp-off).
//   - Minimum RTO 10 ms, not 200 ms: without RACK-TLP a loss the ACKs do not
//     reveal costs a timeout, and 200 ms is hundreds of sub-millisecond RTTs
//     (see docs/netstack-tuning.md#minimum-rto).
//   - Maximum RTO 2 s, not 120 s: after an outage a stream waits for the
//     next backed-off retransmission; tcpMaxRetries keeps the give-up time
//     (see docs/netstack-tuning.md#maximum-rto-and-retries).
//   - No TCP timestamps (the link endpoint rewrites SYNs, see
//     stripSynTimestamp; gVisor has no option): gVisor's RTT samples from
//     timestamp echoes include timeouts, so SRTT and RTO feed each other
//     (see docs/netstack-tuning.md#no-tcp-timestamps).
//   - The link endpoint also stops GRO from coalescing the segments that
//     follow a loss, which hid most duplicate ACKs
//     (see docs/netstack-tuning.md#no-gro-after-a-gap-in-a-flow).
//   - Moderate receive buffer (auto-tuning): the window follows the
//     measured BDP, and idle connections do not pin tcpBufMax each
//     (see docs/netstack-tuning.md#buffer-sizes).
//   - Nagle off (TCPDelayEnabled false, re-asserted per endpoint):
//     request/response traffic would hit the Nagle × delayed-ACK stall
//     (see docs/netstack-tuning.md#nagle-off).
func (s *Stack) tuneTCP() error {
	sack := tcpip.TCPSACKEnabled(true)
	cc := tcpip.CongestionControlOption("reno")
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcpBufMin, Default: tcpBufDefault, Max: tcpBufMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcpBufMin, Default: tcpBufDefault, Max: tcpBufMax}
	delay := tcpip.TCPDelayEnabled(false)
	recovery := tcpip.TCPRecovery(0)
	minRTO := tcpip.TCPMinRTOOption(tcpMinRTO)
	maxRTO := tcpip.TCPMaxRTOOption(tcpMaxRTO)
	retries := tcpip.TCPMaxRetriesOption(tcpMaxRetries)
	opts := []struct {
		name string
		opt  tcpip.SettableTransportProtocolOption
	}{
		{"SACK", &sack},
		{"congestion control", &cc},
		{"moderate receive buffer", &moderate},
		{"receive buffer range", &rcv},
		{"send buffer range", &snd},
		{"delay", &delay},
		{"recovery", &recovery},
		{"min RTO", &minRTO},
		{"max RTO", &maxRTO},
		{"max retries", &retries},
	}
	for _, o := range opts {
		if err := s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("netstack: set TCP %s: %s", o.name, err)
		}
	}
	return nil
}

// tuneEndpoint applies per-connection options.
func tuneEndpoint(ep tcpip.Endpoint) {
	so := ep.SocketOptions()
	so.SetDelayOption(false)
	// Keepalives find peers that vanished (key rotated, site died) on
	// otherwise idle proxied connections.
	so.SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepaliveIdle)
	intvl := tcpip.KeepaliveIntervalOption(keepaliveInterval)
	_ = ep.SetSockOpt(&idle)
	_ = ep.SetSockOpt(&intvl)
}

// errnoError is a gVisor error translated for Go callers: errors.Is matches
// both the package sentinel (if any) and the syscall errno.
type errnoError struct {
	msg      string
	errno    syscall.Errno
	sentinel error
}

func (e *errnoError) Error() string { return e.msg }
func (e *errnoError) Unwrap() []error {
	errs := []error{e.errno}
	if e.sentinel != nil {
		errs = append(errs, e.sentinel)
	}
	return errs
}

// ErrConnRefused is what a dial wraps when the far side answered with a
// RST (or refused a UDP flow). errors.Is(err, syscall.ECONNREFUSED) holds
// as well.
var ErrConnRefused = errors.New("netstack: connection refused")

// translate maps a gVisor error to a Go error.
func translate(err tcpip.Error) error {
	switch err.(type) {
	case *tcpip.ErrConnectionRefused:
		return &errnoError{"connection refused", syscall.ECONNREFUSED, ErrConnRefused}
	case *tcpip.ErrConnectionReset:
		return &errnoError{"connection reset by peer", syscall.ECONNRESET, nil}
	case *tcpip.ErrConnectionAborted:
		return &errnoError{"connection aborted", syscall.ECONNABORTED, nil}
	case *tcpip.ErrTimeout:
		return &errnoError{"connection timed out", syscall.ETIMEDOUT, os.ErrDeadlineExceeded}
	case *tcpip.ErrHostUnreachable, *tcpip.ErrHostDown:
		return &errnoError{"no route to host", syscall.EHOSTUNREACH, nil}
	case *tcpip.ErrNetworkUnreachable:
		return &errnoError{"network is unreachable", syscall.ENETUNREACH, nil}
	case *tcpip.ErrAborted, *tcpip.ErrClosedForSend, *tcpip.ErrClosedForReceive:
		return ErrClosed
	}
	return errors.New(err.String())
}

func protoOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func fullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip.Unmap(), port)
}

// DialTCP opens a TCP connection to dst from this node's address of the same
// family. It returns when the handshake completes, ctx is done, the far side
// refuses (errors.Is(err, ErrConnRefused)), or the Stack closes.
func (s *Stack) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	wrap := func(err error) error { return fmt.Errorf("netstack: dial tcp %v: %w", dst, err) }
	if !dst.IsValid() || dst.Port() == 0 {
		return nil, wrap(errors.New("invalid destination"))
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap(err)
	}
	src, err := s.localAddr(dst.Addr())
	if err != nil {
		return nil, err
	}

	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, protoOf(src), &wq)
	if terr != nil {
		return nil, wrap(translate(terr))
	}
	tuneEndpoint(ep)
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)

	if terr := ep.Bind(tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(src.AsSlice())}); terr != nil {
		ep.Close()
		return nil, wrap(translate(terr))
	}
	terr = ep.Connect(fullAddr(dst))
	if _, started := terr.(*tcpip.ErrConnectStarted); started {
		select {
		case <-notify:
			terr = ep.LastError()
		case <-ctx.Done():
			ep.Close()
			return nil, wrap(ctx.Err())
		case <-s.ctx.Done():
			ep.Close()
			return nil, wrap(ErrClosed)
		}
	}
	if terr != nil {
		ep.Close()
		return nil, wrap(translate(terr))
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// TCPRequest is an inbound TCP connection attempt (a SYN) to one of the
// stack's addresses, not yet answered. Exactly one of Accept or Reject takes
// effect; if the handler returns without either, or takes longer than
// Config.HandlerTimeout to decide, the request is rejected.
type TCPRequest struct {
	Src, Dst netip.AddrPort // remote (dialer) and local (our) endpoints

	decision
	fr               *tcp.ForwarderRequest
	handshakeTimeout time.Duration
}

// Accept completes the 3-way handshake and returns the connection. It fails
// if the request was already decided, the handshake fails, or the dialer
// does not complete it within Config.HandshakeTimeout (the handshake is then
// aborted), or the Stack closes meanwhile.
func (r *TCPRequest) Accept() (net.Conn, error) {
	if !r.decide() {
		return nil, fmt.Errorf("netstack: accept tcp %v -> %v: %w", r.Src, r.Dst, ErrRequestDecided)
	}
	var wq waiter.Queue
	// CreateEndpoint blocks until the handshake succeeds or fails, and
	// gVisor retransmits the SYN-ACK for minutes to a dialer that never
	// ACKs. It waits on wq's writable event, so notifying wq wakes it
	// early: it then finds the endpoint unconnected, closes it (aborting
	// the handshake) and fails. The notification is repeated, in case the
	// first came before CreateEndpoint registered its waiter.
	w := watchHandshake(&wq, r.handshakeTimeout)
	unhook := context.AfterFunc(r.ctx, func() { wq.Notify(waiter.WritableEvents) })
	ep, terr := r.fr.CreateEndpoint(&wq)
	timedOut := w.stop()
	unhook()
	r.fr.Complete(false)
	if terr != nil {
		err := translate(terr)
		switch {
		case r.ctx.Err() != nil:
			err = ErrClosed
		case timedOut:
			// gVisor reports our abort as ErrAborted, which reads as a
			// closed stack; say what happened instead.
			err = fmt.Errorf("dialer did not complete the handshake within %v: %w", r.handshakeTimeout, os.ErrDeadlineExceeded)
		}
		return nil, fmt.Errorf("netstack: accept tcp %v -> %v: %w", r.Src, r.Dst, err)
	}
	tuneEndpoint(ep)
	return gonet.NewTCPConn(&wq, ep), nil
}

// handshakeWatch wakes a CreateEndpoint waiting on wq once timeout passes,
// and every 100ms after that until stopped.
type handshakeWatch struct {
	mu       sync.Mutex // guards the fields below
	t        *time.Timer
	fired    bool
	finished bool
}

func watchHandshake(wq *waiter.Queue, timeout time.Duration) *handshakeWatch {
	w := &handshakeWatch{}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t = time.AfterFunc(timeout, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.finished {
			return
		}
		w.fired = true
		wq.Notify(waiter.WritableEvents)
		w.t.Reset(100 * time.Millisecond)
	})
	return w
}

// stop ends the watch and reports whether the timeout had passed.
func (w *handshakeWatch) stop() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.finished = true
	w.t.Stop()
	return w.fired
}

// Reject answers the SYN with a RST: the dialer sees "connection refused" at
// once. A no-op if the request was already decided.
func (r *TCPRequest) Reject() {
	if r.decide() {
		r.fr.Complete(true)
	}
}

// SetTCPHandler sets the function called, on its own goroutine, for each
// inbound connection attempt to one of the stack's addresses, before the
// handshake completes. With a nil handler every attempt is refused.
func (s *Stack) SetTCPHandler(h func(*TCPRequest)) {
	s.mu.Lock()
	s.tcpHandler = h
	s.mu.Unlock()
}

func (s *Stack) newTCPForwarder() *tcp.Forwarder {
	return tcp.NewForwarder(s.stack, 0, tcpMaxInFlight, s.forwardTCP)
}

// forwardTCP runs on a goroutine gVisor starts per SYN; it joins the Stack's
// WaitGroup for the rest of its life.
func (s *Stack) forwardTCP(fr *tcp.ForwarderRequest) {
	id := fr.ID()
	s.mu.Lock()
	h := s.tcpHandler
	if s.closed {
		s.mu.Unlock()
		fr.Complete(true)
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	// The NIC is not promiscuous, so only our addresses reach here; check
	// anyway so that a later stack option can never turn this into an open
	// relay for arbitrary destinations.
	if h == nil || !s.isOwn(id.LocalAddress) {
		fr.Complete(true)
		return
	}
	ctx, release := s.withStack(context.Background())
	req := &TCPRequest{
		Src:              addrPort(id.RemoteAddress, id.RemotePort),
		Dst:              addrPort(id.LocalAddress, id.LocalPort),
		decision:         newDecision(ctx),
		fr:               fr,
		handshakeTimeout: s.handshakeTimeout,
	}
	s.serve(&req.decision, release, func() { h(req) }, req.Reject, "tcp", req.Src, req.Dst)
}

// decision is the accept/reject state shared by TCP and UDP requests.
type decision struct {
	ctx     context.Context
	made    atomic.Bool
	decided chan struct{} // closed by the first decide
}

func newDecision(ctx context.Context) decision {
	return decision{ctx: ctx, decided: make(chan struct{})}
}

// decide reports whether this call made the decision (the first one wins).
func (d *decision) decide() bool {
	if !d.made.CompareAndSwap(false, true) {
		return false
	}
	close(d.decided)
	return true
}

// Context is cancelled when the Stack closes; a handler that dials the real
// target on the request's behalf should use it.
func (d *decision) Context() context.Context { return d.ctx }

// serve runs handler on an owned goroutine and rejects the request if the
// handler returns undecided, the timeout passes, or the Stack closes.
// release is called when the handler returns.
func (s *Stack) serve(d *decision, release func(), handler func(), reject func(), proto string, src, dst netip.AddrPort) {
	done := make(chan struct{})
	if !s.track(func() {
		defer release()
		defer close(done)
		handler()
	}) {
		release()
		reject()
		return
	}
	t := time.NewTimer(s.handlerTimeout)
	defer t.Stop()
	select {
	case <-d.decided:
		return
	case <-done:
	case <-t.C:
		s.log.Warn("handler did not decide in time; rejecting", "proto", proto, "src", src, "dst", dst, "timeout", s.handlerTimeout)
	case <-d.ctx.Done():
	}
	reject()
}
