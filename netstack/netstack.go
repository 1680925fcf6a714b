// Package netstack is meshlink's userspace TCP/IP stack: a gVisor network
// stack presented to wireguard-go as a tun.Device. wireguard-go reads the
// stack's outbound IP packets from it (Read) and writes decrypted inbound IP
// packets to it (Write); the agent dials TCP and UDP to peers' mesh IPs
// (DialTCP, DialUDP) and accepts inbound flows for the services it exports
// (SetTCPHandler, SetUDPHandler). No TUN device or privilege is needed.
//
// The stack only ever terminates traffic for its own addresses (Config.Addrs,
// SetAddrs): the NIC is neither promiscuous nor spoofing, so a packet for
// any other destination is dropped by the IP layer.
package netstack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

const (
	// DefaultMTU is the MTU used when Config.MTU is 0: the WireGuard default
	// (1500 minus the worst-case IPv6+UDP+WireGuard overhead of 80 bytes).
	DefaultMTU = 1420

	// maxBatch is the tun.Device batch size: how many packets wireguard-go
	// reads or writes per call. 128 matches wireguard-go's own maximum
	// (conn.IdealBatchSize) so one Read can fill one whole encryption batch.
	maxBatch = 128

	// outboundQueueLen bounds the packets waiting for wireguard-go. It must
	// hold a few batches of bursts from several connections; it is smaller
	// than a full 8 MiB window on purpose, so a stalled reader shows up as
	// loss to TCP (which backs off) rather than as unbounded memory.
	outboundQueueLen = 4096

	nicID tcpip.NICID = 1

	// defaultHandlerTimeout bounds how long an inbound TCP or UDP request
	// may stay undecided before it is rejected on the handler's behalf.
	defaultHandlerTimeout = 30 * time.Second

	// defaultHandshakeTimeout bounds how long an accepted TCP request may
	// wait for the dialer's final ACK. gVisor alone would retransmit the
	// SYN-ACK for about two minutes, and a provider holds its connection to
	// the real target all that time; a few seconds still cover two lost
	// SYN-ACKs (retransmitted after 1s and 3s).
	defaultHandshakeTimeout = 5 * time.Second
)

var (
	// ErrClosed is returned by operations on a closed Stack. It wraps
	// os.ErrClosed so wireguard-go (and errors.Is(err, net.ErrClosed)
	// users) see a normal end of the device.
	ErrClosed = fmt.Errorf("netstack: stack closed: %w", os.ErrClosed)
	// ErrRequestDecided is returned by Accept when the request was
	// already accepted, rejected, or timed out.
	ErrRequestDecided = errors.New("netstack: request already decided")
)

// Config configures a Stack.
type Config struct {
	// Addrs are this node's mesh IPs (normally one IPv4 and one IPv6).
	// They may be replaced later with SetAddrs.
	Addrs []netip.Addr
	// MTU of the device; DefaultMTU when 0.
	MTU int
	// Logger receives structured logs (attribute subsystem=netstack); nil
	// discards.
	Logger *slog.Logger
	// HandlerTimeout bounds how long a TCP or UDP handler may take to call
	// Accept or Reject before the request is rejected for it; 30s when 0.
	HandlerTimeout time.Duration
	// HandshakeTimeout bounds how long TCPRequest.Accept waits for the
	// dialer to complete the 3-way handshake before it aborts it and
	// fails; 5s when 0. A peer that sends SYNs and never ACKs holds
	// nothing longer than this.
	HandshakeTimeout time.Duration
	// Outbound, if set, is entered by the packets Read hands to
	// wireguard-go (Read waits while it is full); Inbound is left by the
	// packets Write takes from it. See Gate.
	Outbound, Inbound *Gate
}

// Stats counts what crossed the device. All fields are cumulative.
type Stats struct {
	OutboundPackets atomic.Uint64 // packets handed to wireguard-go
	OutboundDropped atomic.Uint64 // outbound packets dropped: queue full
	OutboundTooBig  atomic.Uint64 // outbound packets larger than the read buffer
	OutboundGSO     atomic.Uint64 // outbound GSO packets split into several segments
	InboundPackets  atomic.Uint64 // inbound packets delivered to gVisor
	InboundInvalid  atomic.Uint64 // inbound packets dropped as garbage
	// InboundBadChecksum counts inbound packets dropped for an IPv4
	// header, TCP or UDP checksum that does not add up (validRX).
	InboundBadChecksum atomic.Uint64
}

// StatsSnapshot is a point-in-time copy of Stats.
type StatsSnapshot struct {
	OutboundPackets, OutboundDropped, OutboundTooBig, OutboundGSO uint64
	InboundPackets, InboundInvalid, InboundBadChecksum            uint64
}

// Stack is a userspace TCP/IP stack that implements tun.Device.
type Stack struct {
	log            *slog.Logger
	mtu            int
	handlerTimeout time.Duration
	// handshakeTimeout is Config.HandshakeTimeout with its default.
	handshakeTimeout time.Duration

	stack *stack.Stack
	link  *linkEndpoint
	stats Stats
	// out and in gate wireguard-go's pipeline (Config.Outbound, Inbound).
	out, in *Gate

	events chan tun.Event
	// ctx is cancelled by Close; it cancels handlers and pending dials.
	ctx       context.Context
	cancel    context.CancelFunc
	closeOnce sync.Once

	mu sync.Mutex // guards the fields below
	// addrs are the stack's own addresses, as last set.
	addrs      []netip.Addr
	tcpHandler func(*TCPRequest)
	udpHandler func(*UDPRequest)
	// udpPending holds flows whose UDPRequest is not decided yet, so later
	// datagrams of the same flow do not start another request.
	udpPending map[stack.TransportEndpointID]struct{}
	closed     bool
	// wg tracks the goroutines this package starts (request handlers).
	// Add is only called with mu held and closed false, so Close's Wait
	// never races an Add.
	wg sync.WaitGroup
}

var _ tun.Device = (*Stack)(nil)

// New creates a Stack with the given addresses.
func New(cfg Config) (*Stack, error) {
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < 1280 || mtu > 65535 {
		// 1280 is the IPv6 minimum; below it IPv6 cannot work at all.
		return nil, fmt.Errorf("netstack: MTU %d out of range [1280, 65535]", mtu)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("subsystem", "netstack")
	timeout := cfg.HandlerTimeout
	if timeout <= 0 {
		timeout = defaultHandlerTimeout
	}
	handshake := cfg.HandshakeTimeout
	if handshake <= 0 {
		handshake = defaultHandshakeTimeout
	}

	s := &Stack{
		log:              log,
		mtu:              mtu,
		handlerTimeout:   timeout,
		handshakeTimeout: handshake,
		out:              cfg.Outbound,
		in:               cfg.Inbound,
		events:           make(chan tun.Event, 1),
		udpPending:       make(map[stack.TransportEndpointID]struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.link = newLinkEndpoint(uint32(mtu), outboundQueueLen, &s.stats)
	s.stack = stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		// icmp endpoints are registered so ping sockets could exist; echo
		// requests to our own addresses are answered by the IP layer.
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		// A dial to one of our own addresses loops back inside the stack
		// instead of being sent to WireGuard (which would drop it).
		HandleLocal: true,
	})
	if err := s.tuneTCP(); err != nil {
		s.cancel()
		s.stack.Close()
		s.stack.Wait()
		return nil, err
	}
	if err := s.stack.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "meshlink"}); err != nil {
		s.cancel()
		s.stack.Close()
		s.stack.Wait()
		return nil, fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Everything not local goes to WireGuard, which routes by allowed IPs.
	s.stack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	s.stack.SetTransportProtocolHandler(tcp.ProtocolNumber, s.newTCPForwarder().HandlePacket)
	s.stack.SetTransportProtocolHandler(udp.ProtocolNumber, s.handleUDP)
	if err := s.SetAddrs(cfg.Addrs); err != nil {
		s.Close()
		return nil, err
	}
	s.events <- tun.EventUp
	return s, nil
}

// SetAddrs replaces the stack's own addresses. Connections bound to a removed
// address stop receiving packets; new ones use the new addresses.
func (s *Stack) SetAddrs(addrs []netip.Addr) error {
	want := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() {
			return fmt.Errorf("netstack: set addresses: invalid address %v", a)
		}
		want[a.Unmap().WithZone("")] = true
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	have := make(map[netip.Addr]bool, len(s.addrs))
	for _, a := range s.addrs {
		have[a] = true
	}
	for a := range have {
		if !want[a] {
			if err := s.stack.RemoveAddress(nicID, tcpip.AddrFromSlice(a.AsSlice())); err != nil {
				return fmt.Errorf("netstack: remove address %v: %s", a, err)
			}
		}
	}
	next := make([]netip.Addr, 0, len(want))
	for a := range have {
		if want[a] {
			next = append(next, a)
		}
	}
	for a := range want {
		if have[a] {
			continue
		}
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix(),
		}
		if err := s.stack.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			s.addrs = next
			return fmt.Errorf("netstack: add address %v: %s", a, err)
		}
		next = append(next, a)
	}
	s.addrs = next
	s.log.Debug("addresses set", "addrs", next)
	return nil
}

// Addrs returns the stack's current own addresses.
func (s *Stack) Addrs() []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.Addr(nil), s.addrs...)
}

// localAddr picks the own address of dst's family.
func (s *Stack) localAddr(dst netip.Addr) (netip.Addr, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return netip.Addr{}, ErrClosed
	}
	for _, a := range s.addrs {
		if a.Is4() == dst.Is4() {
			return a, nil
		}
	}
	fam := "IPv6"
	if dst.Is4() {
		fam = "IPv4"
	}
	return netip.Addr{}, fmt.Errorf("netstack: no local %s address to reach %v", fam, dst)
}

// isOwn reports whether a is one of the stack's own addresses.
func (s *Stack) isOwn(a tcpip.Address) bool {
	ip, ok := netip.AddrFromSlice(a.AsSlice())
	if !ok {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, own := range s.addrs {
		if own == ip {
			return true
		}
	}
	return false
}

// Stats returns a snapshot of the device counters.
func (s *Stack) Stats() StatsSnapshot {
	return StatsSnapshot{
		OutboundPackets:    s.stats.OutboundPackets.Load(),
		OutboundDropped:    s.stats.OutboundDropped.Load(),
		OutboundTooBig:     s.stats.OutboundTooBig.Load(),
		OutboundGSO:        s.stats.OutboundGSO.Load(),
		InboundPackets:     s.stats.InboundPackets.Load(),
		InboundInvalid:     s.stats.InboundInvalid.Load(),
		InboundBadChecksum: s.stats.InboundBadChecksum.Load(),
	}
}

// File implements tun.Device; there is no file descriptor.
func (*Stack) File() *os.File { return nil }

// Read implements tun.Device: it blocks until at least one outbound packet is
// ready, then returns up to len(bufs) packets. After Close it returns
// os.ErrClosed.
func (s *Stack) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if offset < 0 {
		return 0, fmt.Errorf("netstack: read: negative offset %d", offset)
	}
	for _, b := range bufs {
		if offset > len(b) {
			return 0, fmt.Errorf("netstack: read: offset %d beyond buffer of %d bytes", offset, len(b))
		}
	}
	s.out.Wait()
	n, err := s.link.drain(bufs, sizes, offset)
	s.out.Add(n)
	return n, err
}

// Write implements tun.Device: each bufs[i][offset:] is one inbound IP
// packet. Malformed packets are dropped and counted, never reported as an
// error (one bad packet must not make wireguard-go drop the whole batch).
func (s *Stack) Write(bufs [][]byte, offset int) (int, error) {
	s.in.Leave(len(bufs))
	return s.link.write(bufs, offset)
}

// MTU implements tun.Device.
func (s *Stack) MTU() (int, error) { return s.mtu, nil }

// Name implements tun.Device.
func (*Stack) Name() (string, error) { return "meshlink", nil }

// Events implements tun.Device: EventUp once, closed by Close.
func (s *Stack) Events() <-chan tun.Event { return s.events }

// BatchSize implements tun.Device.
func (*Stack) BatchSize() int { return maxBatch }

// Close shuts the stack down: blocked Reads return os.ErrClosed, pending
// dials fail, connections are aborted, handlers' contexts are cancelled, and
// Close waits for every goroutine the Stack started. Idempotent.
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.link.close()
		s.stack.Close()
		s.wg.Wait()
		s.stack.Wait()
		s.stack.Destroy()
		close(s.events)
		s.log.Debug("closed")
	})
	return nil
}

// track starts f on a goroutine owned by the Stack; it returns false (and
// does not run f) when the stack is closed.
func (s *Stack) track(f func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
	return true
}

// withStack returns a context that is cancelled when parent is done or the
// Stack closes, and a func to release it.
func (s *Stack) withStack(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	// AfterFunc's goroutine only exists once the Stack is closing and just
	// calls cancel; stop unregisters it otherwise.
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}
