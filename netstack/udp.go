package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// DialUDP returns a connected UDP socket to dst from this node's address of
// the same family.
func (s *Stack) DialUDP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	wrap := func(err error) error { return fmt.Errorf("netstack: dial udp %v: %w", dst, err) }
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
	ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, protoOf(src), &wq)
	if terr != nil {
		return nil, wrap(translate(terr))
	}
	if terr := ep.Bind(tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(src.AsSlice())}); terr != nil {
		ep.Close()
		return nil, wrap(translate(terr))
	}
	if terr := ep.Connect(fullAddr(dst)); terr != nil {
		ep.Close()
		return nil, wrap(translate(terr))
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// UDPRequest is the first datagram of a new UDP flow to one of the stack's
// addresses. Accept turns the flow into a connected net.Conn (the first
// datagram is readable from it); Reject, or no decision, drops it. Later
// datagrams of the flow that arrive while the request is undecided are
// dropped.
type UDPRequest struct {
	Src, Dst netip.AddrPort // remote and local endpoints

	decision
	s   *Stack
	id  stack.TransportEndpointID
	pkt *stack.PacketBuffer // our reference to the first datagram
}

// Accept returns a connection for the flow.
func (r *UDPRequest) Accept() (net.Conn, error) {
	if !r.decide() {
		return nil, fmt.Errorf("netstack: accept udp %v -> %v: %w", r.Src, r.Dst, ErrRequestDecided)
	}
	defer r.finish()
	var wq waiter.Queue
	ep, terr := udp.NewForwarderRequest(r.s.stack, r.id, r.pkt).CreateEndpoint(&wq)
	if terr != nil {
		return nil, fmt.Errorf("netstack: accept udp %v -> %v: %w", r.Src, r.Dst, translate(terr))
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// Reject drops the flow's first datagram. A no-op once decided.
func (r *UDPRequest) Reject() {
	if r.decide() {
		r.finish()
	}
}

// finish releases the datagram and lets new datagrams of the flow start a
// new request.
func (r *UDPRequest) finish() {
	r.pkt.DecRef()
	r.s.mu.Lock()
	delete(r.s.udpPending, r.id)
	r.s.mu.Unlock()
}

// SetUDPHandler sets the function called, on its own goroutine, for the first
// datagram of each new UDP flow to one of the stack's addresses. With a nil
// handler such datagrams are dropped.
func (s *Stack) SetUDPHandler(h func(*UDPRequest)) {
	s.mu.Lock()
	s.udpHandler = h
	s.mu.Unlock()
}

// handleUDP is gVisor's hook for datagrams that match no endpoint. It runs
// on the inbound packet path, so it only starts a goroutine.
func (s *Stack) handleUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	if !s.isOwn(id.LocalAddress) {
		return true // broadcast or multicast: never ours to answer
	}
	s.mu.Lock()
	h := s.udpHandler
	if h == nil || s.closed {
		s.mu.Unlock()
		return true
	}
	if _, busy := s.udpPending[id]; busy {
		s.mu.Unlock()
		return true
	}
	s.udpPending[id] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()

	ctx, release := s.withStack(context.Background())
	req := &UDPRequest{
		Src:      addrPort(id.RemoteAddress, id.RemotePort),
		Dst:      addrPort(id.LocalAddress, id.LocalPort),
		decision: newDecision(ctx),
		s:        s,
		id:       id,
		pkt:      pkt.Clone(),
	}
	go func() {
		defer s.wg.Done()
		s.serve(&req.decision, release, func() { h(req) }, req.Reject, "udp", req.Src, req.Dst)
	}()
	return true
}
