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

// tuneTCP applies stack-wide TCP settings, chosen for throughput over a
// WireGuard tunnel:
//   - SACK: off by default in gVisor; without it one lost packet in a
//     multi-MB window costs a round trip per hole (go-back-N-ish recovery).
//   - CUBIC instead of gVisor's default Reno: window growth is independent of
//     RTT and recovers faster after a loss on high-BDP paths (Linux default).
//   - Moderate receive buffer (auto-tuning): the window grows with the
//     measured BDP instead of sitting at the default, and idle connections
//     do not pin 8 MiB each.
//   - Large send/receive ranges (see tcpBufMax).
//   - Nagle off by default (TCPDelayEnabled false, re-asserted per endpoint):
//     request/response protocols carried by the mesh (databases, RPC) would
//     otherwise hit the Nagle × delayed-ACK stall of up to 200 ms. gVisor
//     acks at least every second full segment, so bulk flows are unaffected.
func (s *Stack) tuneTCP() error {
	sack := tcpip.TCPSACKEnabled(true)
	cc := tcpip.CongestionControlOption("cubic")
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcpBufMin, Default: tcpBufDefault, Max: tcpBufMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcpBufMin, Default: tcpBufDefault, Max: tcpBufMax}
	delay := tcpip.TCPDelayEnabled(false)
	// RACK-TLP off: plain SACK + dupack recovery. Measured here in the
	// network-namespace tests: with RACK on (alone or with a static
	// reordering window), a stream whose direct path went dark for ~7 s
	// crawls at ~12 KB/s over the relay afterwards (gVisor keeps sending on
	// RTOs), while with RACK off it resumes at full speed. RACK is ~4x
	// better under 5-10% random loss (0.5 vs 0.12 MB/s), but surviving a
	// path change matters more; both numbers are far below kernel TCP, a
	// known gap.
	recovery := tcpip.TCPRecovery(0)
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
