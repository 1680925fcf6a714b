// Package bindtest is an in-memory UDP network and relay for testing the
// bind (agent/bind) without sockets or TLS, in the manner of wireguard-go's
// conn/bindtest: sockets with the addresses a test chooses, links it can cut
// or slow down, and relays that forward by key and answer "peer not here".
//
// Everything here uses only channels, mutexes and the time package, so a
// test can run it inside a testing/synctest bubble and let the fake clock
// drive the bind's timers.
package bindtest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// Network is an in-memory UDP network. Close it when done: it owns one
// delivery goroutine per socket address.
type Network struct {
	done chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex // guards the fields below
	queues map[netip.AddrPort]chan datagram
	socks  map[netip.AddrPort]*Socket
	down   map[netip.AddrPort]bool
	delay  map[netip.AddrPort]time.Duration
	tap    func(src, dst netip.AddrPort, pkt []byte)
	sent   func(src, dst netip.AddrPort, pkt []byte)
	closed bool
}

type datagram struct {
	src, dst netip.AddrPort
	pkt      []byte
	at       time.Time // when it arrives
}

// NewNetwork returns an empty network.
func NewNetwork() *Network {
	return &Network{
		done:   make(chan struct{}),
		queues: map[netip.AddrPort]chan datagram{},
		socks:  map[netip.AddrPort]*Socket{},
		down:   map[netip.AddrPort]bool{},
		delay:  map[netip.AddrPort]time.Duration{},
	}
}

// Close stops delivery and waits for the network's goroutines.
func (n *Network) Close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	close(n.done)
	n.wg.Wait()
}

// SetDown cuts (true) or restores every packet to or from addr.
func (n *Network) SetDown(addr netip.AddrPort, down bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.down[addr] = down
}

// SetDelay makes packets to addr arrive d after they are sent (in order).
func (n *Network) SetDelay(addr netip.AddrPort, d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.delay[addr] = d
}

// Tap, if f is not nil, is called with every packet the network hands to a
// socket, before the socket's receive function sees it: a capture of the
// wire. pkt is valid only during the call.
func (n *Network) Tap(f func(src, dst netip.AddrPort, pkt []byte)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.tap = f
}

// TapSent, if f is not nil, is called with every packet any socket sends,
// whether or not anyone has its destination, before it is queued: what a
// host put on the wire. f may call Inject. pkt is valid only during the
// call.
func (n *Network) TapSent(f func(src, dst netip.AddrPort, pkt []byte)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sent = f
}

// Inject sends pkt to dst as if from src, whoever has src (or nobody): a
// spoofed source address, as an attacker on the path or off it can send.
func (n *Network) Inject(src, dst netip.AddrPort, pkt []byte) {
	n.send(src, dst, pkt)
}

// NewSocket returns a socket (a conn.Bind) reached at each of addrs. A
// packet it sends leaves from its address of the destination's family;
// with none, Send fails as an IPv4-only host's would to an IPv6 address.
func (n *Network) NewSocket(addrs ...netip.AddrPort) *Socket {
	s := &Socket{net: n, addrs: slices.Clone(addrs), rx: make(chan datagram, 1024)}
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, a := range addrs {
		if n.socks[a] != nil {
			panic(fmt.Sprintf("bindtest: address %v taken", a))
		}
		n.socks[a] = s
		q := make(chan datagram, 1024)
		n.queues[a] = q
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.deliver(q)
		}()
	}
	return s
}

// deliver hands the datagrams of one destination address over in order,
// each at its arrival time.
func (n *Network) deliver(q chan datagram) {
	for {
		var d datagram
		select {
		case d = <-q:
		case <-n.done:
			return
		}
		if wait := time.Until(d.at); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-n.done:
				t.Stop()
				return
			}
		}
		n.mu.Lock()
		s := n.socks[d.dst]
		lost := n.down[d.src] || n.down[d.dst]
		tap := n.tap
		n.mu.Unlock()
		if lost || s == nil {
			continue
		}
		if s.push(d) && tap != nil {
			tap(d.src, d.dst, d.pkt)
		}
	}
}

// send routes pkt from src to dst: lost (silently, as UDP) when either end
// is down or nobody has dst.
func (n *Network) send(src, dst netip.AddrPort, pkt []byte) {
	n.mu.Lock()
	q := n.queues[dst]
	lost := n.down[src] || n.down[dst] || n.closed
	at := time.Now().Add(n.delay[dst])
	sent := n.sent
	n.mu.Unlock()
	if sent != nil {
		sent(src, dst, pkt)
	}
	if lost || q == nil {
		return
	}
	select {
	case q <- datagram{src: src, dst: dst, pkt: slices.Clone(pkt), at: at}:
	default: // a full queue drops, like a full socket buffer
	}
}

// Socket is one host's UDP socket on a Network. It implements conn.Bind with
// *conn.StdNetEndpoint endpoints, as the standard bind does.
type Socket struct {
	net   *Network
	addrs []netip.AddrPort
	rx    chan datagram

	mu     sync.Mutex    // guards the field below
	closed chan struct{} // nil while not open; closed by Close
}

var _ conn.Bind = (*Socket)(nil)

// push queues d for the receive function; false when the socket is not
// open or its buffer is full (the datagram is lost).
func (s *Socket) push(d datagram) bool {
	s.mu.Lock()
	open := s.closed != nil
	s.mu.Unlock()
	if !open {
		return false
	}
	select {
	case s.rx <- d:
		return true
	default:
		return false
	}
}

// Open implements conn.Bind; the port is that of the socket's first
// address, whatever is asked.
func (s *Socket) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	closed := make(chan struct{})
	s.closed = closed
	recv := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		select {
		case d := <-s.rx:
			sizes[0] = copy(packets[0], d.pkt)
			eps[0] = &conn.StdNetEndpoint{AddrPort: d.src}
			return 1, nil
		case <-closed:
			return 0, net.ErrClosed
		}
	}
	var actual uint16
	if len(s.addrs) > 0 {
		actual = s.addrs[0].Port()
	}
	return []conn.ReceiveFunc{recv}, actual, nil
}

// Close implements conn.Bind: the receive functions return net.ErrClosed.
func (s *Socket) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed != nil {
		close(s.closed)
		s.closed = nil
	}
	return nil
}

// Send implements conn.Bind.
func (s *Socket) Send(bufs [][]byte, ep conn.Endpoint) error {
	var dst netip.AddrPort
	if se, ok := ep.(*conn.StdNetEndpoint); ok {
		dst = se.AddrPort
	} else {
		var err error
		if dst, err = netip.ParseAddrPort(ep.DstToString()); err != nil {
			return fmt.Errorf("bindtest: endpoint %q: %w", ep.DstToString(), err)
		}
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	s.mu.Lock()
	open := s.closed != nil
	s.mu.Unlock()
	if !open {
		return net.ErrClosed
	}
	src, ok := s.source(dst)
	if !ok {
		return errNoRoute
	}
	for _, b := range bufs {
		s.net.send(src, dst, b)
	}
	return nil
}

var errNoRoute = errors.New("bindtest: no address of the destination's family")

func (s *Socket) source(dst netip.AddrPort) (netip.AddrPort, bool) {
	for _, a := range s.addrs {
		if a.Addr().Is4() == dst.Addr().Is4() {
			return a, true
		}
	}
	return netip.AddrPort{}, false
}

// ParseEndpoint implements conn.Bind.
func (s *Socket) ParseEndpoint(str string) (conn.Endpoint, error) {
	a, err := netip.ParseAddrPort(str)
	if err != nil {
		return nil, err
	}
	return &conn.StdNetEndpoint{AddrPort: a}, nil
}

// SetMark implements conn.Bind.
func (s *Socket) SetMark(uint32) error { return nil }

// BatchSize implements conn.Bind.
func (s *Socket) BatchSize() int { return 1 }
