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
// WireGuard tunnel and for recovering from random loss and path blackouts.
// The numbers quoted are from the impaired-tunnel benchmarks in
// impair_test.go (BenchmarkLossyTransfer, BenchmarkBlackout; 5% loss means
// 5% of packets dropped at random in each direction).
//   - SACK: off by default in gVisor; without it one lost packet in a
//     multi-MB window costs a round trip per hole (go-back-N-ish recovery).
//   - Reno instead of CUBIC. gVisor's CUBIC grows the window in its
//     TCP-friendly region by elapsed time / SRTT, and SRTT is floored at
//     1 ms, so on a sub-millisecond path (a LAN, the namespace tests) the
//     window stayed at 2-3 segments under random loss, too small for
//     duplicate ACKs to detect a loss: every loss became a timeout (~240
//     timeouts per 4 MB at 5% loss, vs ~40 with Reno). Its window also
//     ignores ACKs that cover much data at once, so after a blackout (every
//     backed-off timeout halves ssthresh, down to 2) it crawled back at
//     ~0.4 MB/s on a 50 ms path where Reno is back at 6-22 MB/s within 5 s.
//     Reno is also ahead under random loss on a 50 ms path (1%: ~0.38 vs
//     ~0.3 MB/s; 5%: ~0.15 vs ~0.06-0.1). CUBIC's real advantage, regrowing
//     the window faster after congestion on long fat paths, measured ~10-15%
//     here (20 MB/s bottleneck, 50 ms RTT, 15 s: ~12-14 vs ~14 MB/s).
//   - RACK-TLP off: plain SACK + duplicate-ACK recovery. RACK detects lost
//     retransmissions and tail losses (better under random loss), but in
//     this gVisor version, when RACK declares loss right after a
//     retransmission timeout it enters recovery counting everything sent
//     before the timeout as still in flight, so the window is "full" and
//     nothing is sent until the next timeout, which resends one segment and
//     repeats: after a 6 s blackout a stream crawled at 1-10 KB/s for as
//     long as the pre-blackout window took to resend that way (about every
//     other run), vs full speed with RACK off.
//   - Minimum RTO 10 ms instead of 200 ms. With RACK (and so TLP) off, a
//     loss the ACKs cannot reveal (a lost retransmission, a loss in a tiny
//     window, a lost ACK) costs a timeout; at a sub-millisecond RTT, 200 ms
//     is hundreds of RTTs. On longer paths the RTO is SRTT + 4 RTTVAR
//     anyway, so this floor only matters below ~10 ms RTT.
//   - Maximum RTO 2 s instead of 120 s: after an outage the first
//     retransmission that gets through comes at most 2 s after the path
//     returns (with exponential backoff from 10 ms a 6 s outage could
//     leave the stream idle for another 4 s), and a runaway RTO (see
//     stripSynTimestamp) is bounded. 2 s stays above any RTT a tunnel is
//     usable at; tcpMaxRetries keeps the give-up time at tcpGiveUp.
//   - No TCP timestamps (stripSynTimestamp in the link endpoint; gVisor
//     has no option for it). gVisor takes an RTT sample from every ACK's
//     timestamp echo, and the ACK that follows a lost ACK and a timeout
//     echoes a timestamp from before the timeout, so the sample includes
//     the timeout: SRTT and the RTO fed each other up to seconds under
//     random loss (SRTT 800 ms on a 0.2 ms path), and after a blackout
//     SRTT jumped to ~0.8 s. Without timestamps gVisor samples one segment
//     per RTT from the send time. Timestamps' other use, PAWS, guards
//     against old segments after a sequence wrap, which WireGuard's replay
//     protection and the tunnel's short queues make moot.
//   - The link endpoint stops GRO from coalescing segments that follow a
//     hole (see linkEndpoint), which otherwise hid most duplicate ACKs.
//   - Moderate receive buffer (auto-tuning): the window grows with the
//     measured BDP instead of sitting at the default, and idle connections
//     do not pin 8 MiB each.
//   - Large send/receive ranges (see tcpBufMax).
//   - Nagle off by default (TCPDelayEnabled false, re-asserted per endpoint):
//     request/response protocols carried by the mesh (databases, RPC) would
//     otherwise hit the Nagle × delayed-ACK stall of up to 200 ms. gVisor
//     acks at least every second full segment, so bulk flows are unaffected.
//
// Together, at 5% random loss each way on a sub-millisecond path, a 20 MB
// transfer went from ~0.07 MB/s (would take ~5 min) to ~10 MB/s (~2 s);
// kernel TCP does ~77 MB/s there, the gap being mostly RACK-TLP.
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
