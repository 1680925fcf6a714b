package netstack

import (
	"encoding/binary"
	"os"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// linkEndpoint is the bridge between gVisor and wireguard-go: gVisor hands it
// outbound IP packets (WritePackets), which wait in a bounded FIFO until
// tun.Device.Read drains them; tun.Device.Write injects inbound packets
// straight into the network dispatcher.
//
// For a userspace stack per-packet work, not copying, bounds throughput, so:
//   - The queue is a ring under a mutex, not link/channel, which clones and
//     signals per packet: a reader is woken only when the queue becomes
//     non-empty and drains a whole batch per Read
//     (see docs/netstack-tuning.md#outbound-queue-a-ring-not-linkchannel).
//   - Send: host GSO, so TCP hands over one large packet per send and
//     drain splits it straight into wireguard-go's buffers (gso.go; see
//     docs/netstack-tuning.md#send-host-gso-split-into-wireguard-gos-buffers).
//   - Receive: each packet's checksums are validated once, where it
//     enters (validRX), and the endpoint claims RX checksum offload, so
//     neither gVisor's GRO nor its IP and TCP layers sum the bytes again;
//     batches then go through GRO, which coalesces in-order segments
//     (see docs/netstack-tuning.md#receive-checksums-validated-once-then-gro).
//   - From the first segment of a batch that does not continue its flow,
//     write stops coalescing: GRO would merge the duplicate ACKs that
//     signal the loss into one, leaving it to a timeout
//     (see docs/netstack-tuning.md#no-gro-after-a-gap-in-a-flow).
//
// The endpoint also keeps TCP timestamps off every connection by rewriting
// the SYNs that cross it (stripSynTimestamp; why: tuneTCP).
type linkEndpoint struct {
	mtu atomic.Uint32

	// signal has capacity 1; a send means "the queue became non-empty".
	signal chan struct{}
	// closed is closed when the endpoint is closed; readers blocked in drain
	// return os.ErrClosed.
	closed chan struct{}

	mu sync.Mutex // guards the fields below
	// ring is the bounded outbound queue; head is the oldest entry, n the
	// number of queued packets.
	ring     []*stack.PacketBuffer
	head, n  int
	isClosed bool
	// dispatcher is where inbound packets go; nil until Attach.
	dispatcher stack.NetworkDispatcher

	stats *Stats

	// gros holds *gro.GRO engines. wireguard-go calls Write concurrently
	// (one goroutine per peer), and a GRO engine is single-threaded state,
	// so each Write borrows one for the duration of its batch.
	gros sync.Pool

	// seqs decides when write stops coalescing (see linkEndpoint).
	seqs flowSeqs
}

func newLinkEndpoint(mtu uint32, queueLen int, stats *Stats) *linkEndpoint {
	e := &linkEndpoint{
		signal: make(chan struct{}, 1),
		closed: make(chan struct{}),
		ring:   make([]*stack.PacketBuffer, queueLen),
		stats:  stats,
	}
	e.mtu.Store(mtu)
	e.gros.New = func() any {
		g := new(gro.GRO)
		g.Init(groEnabled)
		return g
	}
	return e
}

// groEnabled turns on receive coalescing (see linkEndpoint); false is for
// comparing against a receive path without GRO.
const groEnabled = true

var _ stack.GSOEndpoint = (*linkEndpoint)(nil)

// GSOMaxSize implements stack.GSOEndpoint: one GSO packet is at most
// gsoSegments segments (gso.go).
func (e *linkEndpoint) GSOMaxSize() uint32 { return gsoMaxSize(e.mtu.Load()) }

// SupportedGSO implements stack.GSOEndpoint: TCP hands over large packets,
// which drain segments (gso.go).
func (*linkEndpoint) SupportedGSO() stack.SupportedGSO { return stack.HostGSOSupported }

// flowSeqs remembers, for recently seen inbound TCP/IPv4 flows, where each
// flow's next segment should start, so that write can tell when a segment
// does not follow its predecessor (see linkEndpoint). It is a small
// direct-mapped table: a collision costs at most one needless GRO flush.
type flowSeqs struct {
	mu    sync.Mutex
	flows [64]struct {
		addrs, ports uint64
		next         uint32
	}
}

// gap records the TCP/IPv4 segment b (if it is one, with payload) and
// reports whether it does not start where the previous segment of its flow
// ended: a segment after a loss, or a retransmission.
func (t *flowSeqs) gap(b []byte) bool {
	if len(b) < header.IPv4MinimumSize || b[0]>>4 != 4 {
		return false
	}
	ip := header.IPv4(b)
	hl, total := int(ip.HeaderLength()), int(ip.TotalLength())
	if ip.TransportProtocol() != header.TCPProtocolNumber || hl < header.IPv4MinimumSize || total > len(b) || total < hl+header.TCPMinimumSize {
		return false
	}
	tcp := header.TCP(b[hl:total])
	payload := len(tcp) - int(tcp.DataOffset())
	if payload <= 0 {
		return false
	}
	addrs := uint64(binary.BigEndian.Uint32(b[12:16]))<<32 | uint64(binary.BigEndian.Uint32(b[16:20]))
	ports := uint64(tcp.SourcePort())<<16 | uint64(tcp.DestinationPort())
	seq := tcp.SequenceNumber()
	h := (addrs ^ addrs>>29 ^ ports) * 0x9e3779b97f4a7c15
	f := &t.flows[h>>58] // top 6 bits: len(t.flows) == 64
	t.mu.Lock()
	defer t.mu.Unlock()
	gap := f.addrs == addrs && f.ports == ports && f.next != seq
	f.addrs, f.ports, f.next = addrs, ports, seq+uint32(payload)
	return gap
}

// stripSynTimestamp turns the timestamp option of a TCP SYN (not SYN-ACK)
// into NOPs, updating the TCP checksum incrementally (a bad checksum stays
// bad), so that no connection through the stack negotiates timestamps: our
// SYNs (drain) do not offer them, and gVisor does not echo them to a peer's
// SYN (write) that did. See tuneTCP for why. Anything else is left alone.
func stripSynTimestamp(b []byte) {
	var off, end int
	switch {
	case len(b) >= header.IPv4MinimumSize && b[0]>>4 == 4:
		ip := header.IPv4(b)
		if ip.TransportProtocol() != header.TCPProtocolNumber || ip.FragmentOffset() != 0 || ip.More() {
			return
		}
		off, end = int(ip.HeaderLength()), int(ip.TotalLength())
	case len(b) >= header.IPv6MinimumSize && b[0]>>4 == 6:
		ip := header.IPv6(b)
		if ip.TransportProtocol() != header.TCPProtocolNumber { // no extension headers
			return
		}
		off, end = header.IPv6MinimumSize, header.IPv6MinimumSize+int(ip.PayloadLength())
	default:
		return
	}
	if off < 0 || end > len(b) || end < off+header.TCPMinimumSize {
		return
	}
	tcp := header.TCP(b[off:end])
	if tcp.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
		return
	}
	hlen := int(tcp.DataOffset())
	if hlen < header.TCPMinimumSize || hlen > len(tcp) {
		return
	}
	for i := header.TCPMinimumSize; i < hlen; {
		switch tcp[i] {
		case header.TCPOptionEOL:
			return
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+1 >= hlen || tcp[i+1] < 2 || i+int(tcp[i+1]) > hlen {
			return // malformed: leave it to gVisor
		}
		l := int(tcp[i+1])
		if tcp[i] == header.TCPOptionTS && l == header.TCPOptionTSLength {
			// RFC 1624: HC' = ~(~HC + ~m + m') over the 16-bit words
			// that change. The TCP header starts at an even offset
			// and hlen is a multiple of 4, so [lo, hi) stays inside it.
			lo, hi := i&^1, (i+l+1)&^1
			old := checksum.Checksum(tcp[lo:hi], 0)
			for j := i; j < i+l; j++ {
				tcp[j] = header.TCPOptionNOP
			}
			xsum := checksum.Combine(^tcp.Checksum(), ^old)
			tcp.SetChecksum(^checksum.Combine(xsum, checksum.Checksum(tcp[lo:hi], 0)))
			return
		}
		i += l
	}
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

// WritePackets implements stack.LinkWriter. It enqueues as many packets as
// fit; the rest are dropped and counted (gVisor's TCP treats them as losses
// and recovers, which is what a real, full NIC queue would cause too).
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	e.mu.Lock()
	if e.isClosed {
		e.mu.Unlock()
		return 0, &tcpip.ErrClosedForSend{}
	}
	wasEmpty := e.n == 0
	queued := 0
	for _, pkt := range pkts.AsSlice() {
		if e.n == len(e.ring) {
			break
		}
		// IncRef rather than Clone: we only read the bytes and gVisor never
		// mutates a packet after handing it to the link layer.
		e.ring[(e.head+e.n)%len(e.ring)] = pkt.IncRef()
		e.n++
		queued++
	}
	e.mu.Unlock()

	if dropped := pkts.Len() - queued; dropped > 0 {
		e.stats.OutboundDropped.Add(uint64(dropped))
	}
	if queued > 0 && wasEmpty {
		select {
		case e.signal <- struct{}{}:
		default:
		}
	}
	if queued == 0 {
		return 0, &tcpip.ErrNoBufferSpace{}
	}
	return queued, nil
}

// drain blocks until at least one outbound packet is queued (or the endpoint
// is closed), then copies queued packets into bufs[i][offset:], a GSO
// packet as its segments (segment), as many as fill at most len(bufs)
// buffers, without blocking again. It implements tun.Device.Read.
func (e *linkEndpoint) drain(bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	// Pop under the lock into a small stack array, copy outside the lock so
	// that gVisor's writers are not stalled behind memmoves.
	var batch [maxBatch]*stack.PacketBuffer
	want := min(len(bufs), len(sizes), maxBatch)
	for {
		e.mu.Lock()
		if e.isClosed {
			e.mu.Unlock()
			return 0, os.ErrClosed
		}
		// Pop packets while their segments fit in the buffers; a GSO
		// packet that would not waits for the next Read, unless it is
		// first (then it can never fit: segment drops and counts it).
		k, segs := 0, 0
		for k < e.n && k < want {
			pkt := e.ring[e.head]
			c := segmentCount(pkt)
			if k > 0 && segs+c > want {
				break
			}
			segs += c
			batch[k] = pkt
			k++
			e.ring[e.head] = nil
			e.head = (e.head + 1) % len(e.ring)
		}
		e.n -= k
		e.mu.Unlock()

		if k > 0 {
			n := 0
			for i := 0; i < k; i++ {
				pkt := batch[i]
				batch[i] = nil
				if needsSegment(pkt) {
					c, err := segment(bufs[n:want], sizes[n:want], offset, pkt)
					if err != nil {
						e.stats.OutboundTooBig.Add(1)
						c = 0 // a partly written packet is not sent
					} else if c > 1 {
						e.stats.OutboundGSO.Add(1)
					}
					for j := n; j < n+c; j++ {
						stripSynTimestamp(bufs[j][offset : offset+sizes[j]])
					}
					n += c
				} else if sz, ok := copyPacket(bufs[n][offset:], pkt); ok {
					stripSynTimestamp(bufs[n][offset : offset+sz])
					sizes[n] = sz
					n++
				} else {
					e.stats.OutboundTooBig.Add(1)
				}
				pkt.DecRef()
			}
			e.stats.OutboundPackets.Add(uint64(n))
			if n > 0 {
				return n, nil
			}
			continue
		}
		select {
		case <-e.signal:
		case <-e.closed:
		}
	}
}

// copyPacket copies the packet's bytes (headers and payload) into dst
// without allocating: it walks the packet's view list directly instead of
// AsSlices (which allocates a [][]byte) or ToView (which allocates and
// copies twice).
func copyPacket(dst []byte, pkt *stack.PacketBuffer) (int, bool) {
	size := pkt.Size()
	if size > len(dst) {
		return 0, false
	}
	vl, skip := pkt.AsViewList()
	n := 0
	for v := vl.Front(); v != nil && n < size; v = v.Next() {
		b := v.AsSlice()
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		b = b[skip:]
		skip = 0
		n += copy(dst[n:size], b)
	}
	return n, n == size
}

// inject delivers one inbound IP packet to gVisor, through g unless bypass
// is set. Anything that is not plausibly an IPv4 or IPv6 packet is dropped
// and counted; gVisor validates the rest (checksums, lengths, options) and
// never panics on what it accepts past these checks (FuzzWrite exercises
// this).
func (e *linkEndpoint) inject(b []byte, g *gro.GRO, bypass bool) {
	var proto tcpip.NetworkProtocolNumber
	switch {
	case len(b) >= header.IPv4MinimumSize && b[0]>>4 == 4:
		proto = header.IPv4ProtocolNumber
	case len(b) >= header.IPv6MinimumSize && b[0]>>4 == 6:
		proto = header.IPv6ProtocolNumber
	default:
		e.stats.InboundInvalid.Add(1)
		return
	}
	n, ok := validRX(b, proto)
	if !ok {
		e.stats.InboundBadChecksum.Add(1)
		return
	}
	// Only the IP packet: GRO, trusting RXChecksumValidated, would take
	// bytes past its length as payload when it coalesces (wireguard-go
	// trims packets itself today; this does not depend on it).
	b = b[:n]
	// MakeWithData copies into gVisor's pooled chunks: wireguard-go reuses
	// bufs as soon as Write returns, so the bytes must be copied once; the
	// PacketBuffer itself comes from gVisor's pool.
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(b),
	})
	pkt.NetworkProtocolNumber = proto
	// validRX checked it: GRO, which would validate both checksums of
	// every packet, and gVisor's IP and TCP layers (told by Capabilities)
	// take it as it is, a coalesced packet's stale checksums included.
	pkt.RXChecksumValidated = true
	// IPv6 bypasses GRO: gap, which stops coalescing after a loss, reads
	// IPv4 flows only.
	if proto == header.IPv4ProtocolNumber && !bypass {
		g.Enqueue(pkt)
	} else {
		g.Dispatcher.DeliverNetworkPacket(proto, pkt)
	}
	pkt.DecRef()
	e.stats.InboundPackets.Add(1)
}

// write implements tun.Device.Write.
func (e *linkEndpoint) write(bufs [][]byte, offset int) (int, error) {
	e.mu.Lock()
	closed, d := e.isClosed, e.dispatcher
	e.mu.Unlock()
	if closed {
		return 0, os.ErrClosed
	}
	if d == nil {
		// Not attached yet: nothing can consume packets; drop them.
		e.stats.InboundInvalid.Add(uint64(len(bufs)))
		return len(bufs), nil
	}
	g := e.gros.Get().(*gro.GRO)
	g.Dispatcher = d
	bypass := !groEnabled
	for _, buf := range bufs {
		if offset < 0 || offset > len(buf) {
			e.stats.InboundInvalid.Add(1)
			continue
		}
		b := buf[offset:]
		stripSynTimestamp(b)
		if e.seqs.gap(b) && !bypass {
			// Deliver what GRO holds, then the rest of the batch
			// uncoalesced (see linkEndpoint).
			g.Flush()
			bypass = true
		}
		e.inject(b, g, bypass)
	}
	g.Flush()
	g.Dispatcher = nil
	e.gros.Put(g)
	return len(bufs), nil
}

// close closes the queue, wakes any blocked reader and releases queued
// packets. Idempotent.
func (e *linkEndpoint) close() {
	e.mu.Lock()
	if e.isClosed {
		e.mu.Unlock()
		return
	}
	e.isClosed = true
	for e.n > 0 {
		e.ring[e.head].DecRef()
		e.ring[e.head] = nil
		e.head = (e.head + 1) % len(e.ring)
		e.n--
	}
	e.mu.Unlock()
	close(e.closed)
}

// MTU implements stack.LinkEndpoint.
func (e *linkEndpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.
func (e *linkEndpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint: IP packets, no link header.
func (*linkEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint: a point-to-point tunnel has none.
func (*linkEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.LinkEndpoint.
func (*linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint: RX checksum offload, since
// inject has validated each packet's checksums (validRX) before gVisor
// sees it; a packet with a bad one never enters. Checksums of outbound
// packets are computed by gVisor and by the GSO split (gso.go).
func (*linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// validRX reports whether inbound packet b (an IPv4 or IPv6 packet, by
// proto) has valid checksums: the IPv4 header's, and the TCP or UDP
// checksum over the pseudo-header, one pass over the bytes; n is the
// packet's length by its IP header (len(b) when the header is malformed,
// which gVisor refuses). WireGuard has authenticated the packet already,
// so a bad checksum is a peer's bug, not the network's, and it is dropped.
//
// Since the endpoint claims RX checksum offload, what is not checked here
// is checked nowhere, except ICMP, which gVisor always verifies: fragments
// (the transport checksum covers the reassembled datagram; meshlink's TCP
// never fragments, but a UDP datagram larger than the MTU arrives in
// fragments) and IPv6 packets with extension headers go through
// unchecked, authenticated by WireGuard alone.
func validRX(b []byte, proto tcpip.NetworkProtocolNumber) (n int, ok bool) {
	var (
		transport      tcpip.TransportProtocolNumber
		src, dst       tcpip.Address
		payload        []byte
		udpZeroAllowed bool
	)
	switch proto {
	case header.IPv4ProtocolNumber:
		ip := header.IPv4(b)
		hl, total := int(ip.HeaderLength()), int(ip.TotalLength())
		if hl < header.IPv4MinimumSize || hl > len(b) || total < hl || total > len(b) {
			return len(b), true // malformed: gVisor refuses it
		}
		if !header.IPv4(b[:hl]).IsChecksumValid() {
			return total, false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return total, true
		}
		n, transport, src, dst, payload = total, ip.TransportProtocol(), ip.SourceAddress(), ip.DestinationAddress(), b[hl:total]
		udpZeroAllowed = true // RFC 768: no checksum
	case header.IPv6ProtocolNumber:
		ip := header.IPv6(b)
		total := header.IPv6MinimumSize + int(ip.PayloadLength())
		if total > len(b) {
			return len(b), true
		}
		n, transport, src, dst, payload = total, ip.TransportProtocol(), ip.SourceAddress(), ip.DestinationAddress(), b[header.IPv6MinimumSize:total]
	default:
		return len(b), true
	}
	switch transport {
	case header.TCPProtocolNumber:
		if len(payload) < header.TCPMinimumSize {
			return n, true
		}
	case header.UDPProtocolNumber:
		if len(payload) < header.UDPMinimumSize {
			return n, true
		}
		udp := header.UDP(payload)
		l := int(udp.Length())
		if l < header.UDPMinimumSize || l > len(payload) {
			return n, true // malformed: gVisor refuses it
		}
		payload = payload[:l] // the checksum covers the UDP length
		if udpZeroAllowed && udp.Checksum() == 0 {
			return n, true
		}
	default:
		return n, true
	}
	sum := header.PseudoHeaderChecksum(transport, src, dst, uint16(len(payload)))
	return n, checksum.Checksum(payload, sum) == 0xffff
}

// Attach implements stack.LinkEndpoint.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

// IsAttached implements stack.LinkEndpoint.
func (e *linkEndpoint) IsAttached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint: the endpoint runs no goroutines.
func (*linkEndpoint) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.
func (*linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint.
func (*linkEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.
func (*linkEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.LinkEndpoint.
func (e *linkEndpoint) Close() { e.close() }

// SetOnCloseAction implements stack.LinkEndpoint.
func (*linkEndpoint) SetOnCloseAction(func()) {}
