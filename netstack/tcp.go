package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
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
	// the maxima (8 MiB) let one flow fill a high bandwidth-delay path:
	// 8 MiB covers ~1 Gbit/s at 64 ms RTT, the upper end for a mesh that
	// spans continents. gVisor's compile-time default max is 4 MiB.
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
// Numbers are from the impaired-tunnel benchmarks in impair_test.go
// (BenchmarkLossyTransfer, BenchmarkBlackout: two stacks over wireguard-go
// on loopback, sub-millisecond RTT unless a delay is added; "5% loss" drops
// 5% of packets at random each way; ranges are over 2-3 runs; each A/B
// comparison changed one setting, at the point of the tuning where it was
// decided).
//   - SACK: off by default in gVisor; without it one lost packet in a
//     multi-MB window costs a round trip per hole (go-back-N-ish recovery).
//   - Reno instead of CUBIC. gVisor's CUBIC grows the window in its
//     TCP-friendly region by elapsed time / SRTT with SRTT floored at 1 ms,
//     so at a sub-millisecond RTT under random loss the window stayed at 2-3
//     segments, too few for duplicate ACKs to reveal a loss, and nearly
//     every loss became a timeout (5% loss: ~230 timeouts per 4 MB vs
//     25-90 with Reno). It also ignores how much one ACK covers, so after an
//     outage (each backed-off timeout halves ssthresh, down to 2) it crawled
//     back: 0.35-0.45 MB/s in the 5 s after a 6 s outage on a 50 ms path,
//     Reno 14-28 MB/s. Reno was also ahead under random loss at 50 ms RTT
//     (1%: 0.38-0.46 vs 0.27-0.34 MB/s; 5%: 0.13-0.18 vs 0.09-0.11). What
//     CUBIC is for, regrowing the window quickly after congestion on long
//     fat paths, showed as ~15% (20 MB/s bottleneck, 50 ms RTT, 15 s:
//     average 14.4 vs 12.5 MB/s); that is the price of this choice.
//   - RACK-TLP off: plain SACK + duplicate-ACK recovery. RACK would detect
//     lost retransmissions and tail losses, but in this gVisor version when
//     RACK declares loss right after a retransmission timeout, it enters
//     recovery counting everything sent before the timeout as still in
//     flight, so nothing may be sent until the next timeout, which resends
//     one segment and repeats. After a 6 s outage about every other stream
//     crawled at 1-8 KB/s (until the whole pre-outage window had been
//     resent that way) instead of resuming at full speed.
//   - Minimum RTO 10 ms instead of 200 ms. Without RACK-TLP, a loss the
//     ACKs do not reveal (a lost retransmission or ACK, a loss in a tiny
//     window) costs a timeout, and at a sub-millisecond RTT 200 ms is
//     hundreds of RTTs. Above ~10 ms RTT the RTO is SRTT + 4·RTTVAR anyway,
//     so longer paths are unaffected (measured: no extra timeouts at 50 ms).
//   - Maximum RTO 2 s instead of 120 s. After an outage the stream waits
//     for the next backed-off retransmission: with the defaults a 6 s
//     outage happened to end 0.2 s before one, a 7 s outage left the stream
//     dead for over 5 more seconds (0 bytes in the 5 s measured); now the
//     wait is at most one 2 s interval (measured 0.2-2.1 s, either length). It also bounds
//     a runaway RTO (see timestamps). 2 s stays above any RTT a tunnel is
//     usable at; tcpMaxRetries keeps the give-up time at tcpGiveUp.
//   - No TCP timestamps (the link endpoint rewrites SYNs, see
//     stripSynTimestamp; gVisor has no option). gVisor takes an RTT sample
//     from every ACK's timestamp echo, and after a lost ACK and a timeout
//     the echo predates the timeout, so the sample includes it: under
//     random loss SRTT and RTO fed each other (SRTT 0.8 s on a 0.2 ms
//     path), and after an outage SRTT jumped to ~0.8 s. Without timestamps
//     gVisor samples one segment per RTT from its send time (5% loss, A/B:
//     1.1-3.5 vs 0.7-1.2 MB/s). Their other use, PAWS, guards against old
//     segments after a sequence-number wrap, which WireGuard's replay
//     protection and a tunnel's short queues make moot.
//   - The link endpoint also stops GRO from coalescing the segments that
//     follow a loss, which hid most duplicate ACKs (see linkEndpoint).
//   - Moderate receive buffer (auto-tuning): the window grows with the
//     measured BDP instead of sitting at the default, and idle connections
//     do not pin 8 MiB each.
//   - Large send/receive ranges (see tcpBufMax).
//   - Nagle off by default (TCPDelayEnabled false, re-asserted per endpoint):
//     request/response protocols carried by the mesh (databases, RPC) would
//     otherwise hit the Nagle × delayed-ACK stall of up to 200 ms. gVisor
//     acks at least every second full segment, so bulk flows are unaffected.
//
// Together, versus the previous settings (CUBIC, RTO 200 ms-120 s,
// timestamps, plain GRO): 20 MB at 5% loss and sub-ms RTT took 2.7-5 s
// instead of not finishing in 40 s (0.02-0.07 MB/s); at 50 ms RTT, 1% and
// 5% loss gave 0.35-0.40 and 0.15-0.16 MB/s instead of 0.28-0.31 and
// 0.08-0.10; in the 5 s after a 6 s outage a 50 ms path carried 20-27 MB/s
// instead of 0.2-0.34. Clean-path throughput did not change measurably.
// Kernel TCP is still far ahead at sub-ms RTT under random loss (0.26 s
// for the 20 MB in the namespace test), mostly thanks to RACK-TLP.
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
	fr *tcp.ForwarderRequest
}

// Accept completes the 3-way handshake and returns the connection. It fails
// if the request was already decided or the handshake fails.
func (r *TCPRequest) Accept() (net.Conn, error) {
	if !r.decide() {
		return nil, fmt.Errorf("netstack: accept tcp %v -> %v: %w", r.Src, r.Dst, ErrRequestDecided)
	}
	var wq waiter.Queue
	ep, terr := r.fr.CreateEndpoint(&wq)
	r.fr.Complete(false)
	if terr != nil {
		return nil, fmt.Errorf("netstack: accept tcp %v -> %v: %w", r.Src, r.Dst, translate(terr))
	}
	tuneEndpoint(ep)
	return gonet.NewTCPConn(&wq, ep), nil
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
		Src:      addrPort(id.RemoteAddress, id.RemotePort),
		Dst:      addrPort(id.LocalAddress, id.LocalPort),
		decision: newDecision(ctx),
		fr:       fr,
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
