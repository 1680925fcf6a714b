package netstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gsoCase describes a GSO packet as gVisor's TCP hands it to a host-GSO
// link: headers pushed in front of the payload, the TCP checksum field
// holding only the pseudo-header sum.
type gsoCase struct {
	v6      bool
	payload []byte
	mss     uint16
	flags   header.TCPFlags
	seq     uint32
	id      uint16
	optLen  int // TCP options, a multiple of 4
	chunks  int // views the payload is split into
}

// build makes the PacketBuffer for c (the caller DecRefs it).
func (c gsoCase) build() *stack.PacketBuffer {
	var payload buffer.Buffer
	rest := c.payload
	for i := c.chunks; i > 1 && len(rest) > 0; i-- {
		n := len(rest) / i
		payload.Append(buffer.NewViewWithData(rest[:n]))
		rest = rest[n:]
	}
	if len(rest) > 0 {
		payload.Append(buffer.NewViewWithData(rest))
	}
	ipLen := header.IPv4MinimumSize
	if c.v6 {
		ipLen = header.IPv6MinimumSize
	}
	tcpLen := header.TCPMinimumSize + c.optLen
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: ipLen + tcpLen + 8, Payload: payload})
	tcp := header.TCP(pkt.TransportHeader().Push(tcpLen))
	tcp.Encode(&header.TCPFields{
		SrcPort: 40000, DstPort: 5201, SeqNum: c.seq, AckNum: 77,
		DataOffset: uint8(tcpLen), Flags: c.flags, WindowSize: 4096,
	})
	for i := header.TCPMinimumSize; i < tcpLen; i++ {
		tcp[i] = header.TCPOptionNOP
	}
	total := ipLen + tcpLen + len(c.payload)
	src, dst := addr(own4), addr(peer4)
	if c.v6 {
		src, dst = addr(own6), addr(peer6)
	}
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen+len(c.payload))))
	if c.v6 {
		header.IPv6(pkt.NetworkHeader().Push(ipLen)).Encode(&header.IPv6Fields{
			PayloadLength: uint16(total - ipLen), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
		pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv6, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: c.mss, L3HdrLen: uint16(ipLen)}
	} else {
		ip := header.IPv4(pkt.NetworkHeader().Push(ipLen))
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(total), ID: c.id, Flags: header.IPv4FlagDontFragment, TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: c.mss, L3HdrLen: uint16(ipLen)}
	}
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	if c.v6 {
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	}
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	return pkt
}

// checkSegments verifies, with gVisor's own header code, that segs are
// what a NIC's TSO would make of c: each a valid packet (IP length, IPv4
// header checksum and consecutive IDs, TCP checksum), sequence numbers
// consecutive from c.seq, no segment over the MSS, FIN and PSH on the last
// segment only, CWR on the first only, everything else as in c, and the
// payloads together c's payload.
func checkSegments(c gsoCase, segs [][]byte) error {
	wantN := 1
	if mss := int(c.mss); mss > 0 && len(c.payload) > mss {
		wantN = (len(c.payload) + mss - 1) / mss
	}
	if len(segs) != wantN {
		return fmt.Errorf("%d segments, want %d", len(segs), wantN)
	}
	var got []byte
	seq := c.seq
	for i, b := range segs {
		var tcp header.TCP
		var src, dst tcpip.Address
		if c.v6 {
			ip := header.IPv6(b)
			if !ip.IsValid(len(b)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(b) || ip.TransportProtocol() != header.TCPProtocolNumber {
				return fmt.Errorf("segment %d: bad IPv6 header", i)
			}
			tcp, src, dst = header.TCP(ip.Payload()), ip.SourceAddress(), ip.DestinationAddress()
		} else {
			ip := header.IPv4(b)
			if !ip.IsValid(len(b)) || int(ip.TotalLength()) != len(b) || !ip.IsChecksumValid() {
				return fmt.Errorf("segment %d: bad IPv4 header or checksum", i)
			}
			if ip.ID() != c.id+uint16(i) || ip.Flags() != header.IPv4FlagDontFragment || ip.TTL() != 64 {
				return fmt.Errorf("segment %d: IPv4 ID %d flags %d, want ID %d", i, ip.ID(), ip.Flags(), c.id+uint16(i))
			}
			tcp, src, dst = header.TCP(ip.Payload()), ip.SourceAddress(), ip.DestinationAddress()
		}
		hl := int(tcp.DataOffset())
		if hl != header.TCPMinimumSize+c.optLen || hl > len(tcp) {
			return fmt.Errorf("segment %d: TCP header length %d", i, hl)
		}
		data := tcp[hl:]
		if !tcp.IsChecksumValid(src, dst, checksum.Checksum(data, 0), uint16(len(data))) {
			return fmt.Errorf("segment %d: bad TCP checksum", i)
		}
		if tcp.SequenceNumber() != seq {
			return fmt.Errorf("segment %d: seq %d, want %d", i, tcp.SequenceNumber(), seq)
		}
		if c.mss > 0 && len(data) > int(c.mss) && wantN > 1 {
			return fmt.Errorf("segment %d: %d bytes over MSS %d", i, len(data), c.mss)
		}
		want := c.flags
		if i < wantN-1 {
			want &^= header.TCPFlagFin | header.TCPFlagPsh
		}
		if i > 0 {
			want &^= header.TCPFlagCwr
		}
		if tcp.Flags() != want {
			return fmt.Errorf("segment %d: flags %v, want %v", i, tcp.Flags(), want)
		}
		if tcp.SourcePort() != 40000 || tcp.DestinationPort() != 5201 || tcp.AckNumber() != 77 || tcp.WindowSize() != 4096 {
			return fmt.Errorf("segment %d: ports, ack or window changed", i)
		}
		seq += uint32(len(data))
		got = append(got, data...)
	}
	if !bytes.Equal(got, c.payload) {
		return errors.New("payloads differ from the original")
	}
	return nil
}

// runSegment segments c through drain's path and returns the segments.
func runSegment(t testing.TB, c gsoCase, offset int) ([][]byte, error) {
	pkt := c.build()
	defer pkt.DecRef()
	if !needsSegment(pkt) {
		t.Fatal("a host-GSO TCP packet not taken for segmentation")
	}
	bufs := make([][]byte, maxBatch)
	for i := range bufs {
		bufs[i] = make([]byte, offset+2048)
	}
	sizes := make([]int, maxBatch)
	n, err := segment(bufs, sizes, offset, pkt)
	if err != nil {
		return nil, err
	}
	if n != segmentCount(pkt) {
		t.Fatalf("segment filled %d buffers, segmentCount said %d", n, segmentCount(pkt))
	}
	out := make([][]byte, n)
	for i := range out {
		out[i] = bufs[i][offset : offset+sizes[i]]
	}
	return out, nil
}

func TestSegment(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	payload := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		return b
	}
	all := header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin | header.TCPFlagCwr | header.TCPFlagEce
	for _, tc := range []struct {
		name string
		c    gsoCase
	}{
		{"v4 full GSO packet", gsoCase{payload: payload(44 * 1380), mss: 1380, flags: header.TCPFlagAck | header.TCPFlagPsh, seq: 1000, id: 7, chunks: 3}},
		{"v4 short last segment, all flags", gsoCase{payload: payload(10*1380 + 17), mss: 1380, flags: all, seq: 5, id: 1, chunks: 7}},
		{"v4 seq and ID wrap", gsoCase{payload: payload(5 * 1000), mss: 1000, flags: header.TCPFlagAck, seq: 0xffffffff - 1500, id: 0xfffe, chunks: 2}},
		{"v4 TCP options", gsoCase{payload: payload(3*1368 + 1), mss: 1368, flags: header.TCPFlagAck | header.TCPFlagFin, optLen: 12, chunks: 1}},
		{"v4 one segment", gsoCase{payload: payload(100), mss: 1380, flags: header.TCPFlagAck | header.TCPFlagPsh, chunks: 1}},
		{"v4 exactly one MSS", gsoCase{payload: payload(1380), mss: 1380, flags: all, chunks: 2}},
		{"v4 pure ACK", gsoCase{mss: 1380, flags: header.TCPFlagAck}},
		{"v4 SYN", gsoCase{mss: 1380, flags: header.TCPFlagSyn, optLen: 8}},
		{"v6 full GSO packet", gsoCase{v6: true, payload: payload(44 * 1360), mss: 1360, flags: header.TCPFlagAck | header.TCPFlagPsh, seq: 3, chunks: 5}},
		{"v6 short last, all flags", gsoCase{v6: true, payload: payload(2*1360 + 999), mss: 1360, flags: all, seq: 0xfffffff0, chunks: 4}},
		{"v6 pure ACK", gsoCase{v6: true, mss: 1360, flags: header.TCPFlagAck}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, off := range []int{0, 16} {
				segs, err := runSegment(t, tc.c, off)
				if err != nil {
					t.Fatal(err)
				}
				if err := checkSegments(tc.c, segs); err != nil {
					t.Fatalf("offset %d: %v", off, err)
				}
			}
		})
	}
}

// TestSegmentRejects checks that what cannot be segmented into the buffers
// is refused, not half-written or overflowed.
func TestSegmentRejects(t *testing.T) {
	c := gsoCase{payload: make([]byte, 200*100), mss: 100, flags: header.TCPFlagAck}
	if _, err := runSegment(t, c, 0); !errors.Is(err, errGSOTooManySeg) {
		t.Fatalf("200 segments into %d buffers: %v, want errGSOTooManySeg", maxBatch, err)
	}
	c = gsoCase{payload: make([]byte, 3*4000), mss: 4000, flags: header.TCPFlagAck}
	if _, err := runSegment(t, c, 0); !errors.Is(err, errGSOSegTooBig) {
		t.Fatalf("4000-byte segments into 2048-byte buffers: %v, want errGSOSegTooBig", err)
	}
	// A UDP packet marked for TCP GSO.
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(udpDatagram(own4, peer4, 53, []byte("x")))})
	defer pkt.DecRef()
	pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, MSS: 1380}
	bufs, sizes := [][]byte{make([]byte, 2048)}, []int{0}
	if _, err := segment(bufs, sizes, 0, pkt); !errors.Is(err, errGSONotTCP) {
		t.Fatalf("UDP packet: %v, want errGSONotTCP", err)
	}
}

// FuzzSegment segments TCP packets of every size, MSS, flag set, option
// length, family and view layout, and checks each result as
// TestSegment does.
func FuzzSegment(f *testing.F) {
	f.Add(uint16(44*1380), uint16(1380), uint8(header.TCPFlagAck|header.TCPFlagPsh), uint32(1), uint16(0), uint8(0), uint8(3), false)
	f.Add(uint16(1381), uint16(1380), uint8(0xff), uint32(0xffffffff), uint16(0xffff), uint8(3), uint8(1), true)
	f.Add(uint16(0), uint16(0), uint8(header.TCPFlagSyn), uint32(0), uint16(0), uint8(10), uint8(0), false)
	f.Fuzz(func(t *testing.T, size, mss uint16, flags uint8, seq uint32, id uint16, opt, chunks uint8, v6 bool) {
		c := gsoCase{
			v6: v6, mss: mss, flags: header.TCPFlags(flags), seq: seq, id: id,
			optLen: int(opt%11) * 4, chunks: int(chunks%8) + 1,
		}
		c.payload = make([]byte, int(size)%(maxBatch*1500))
		for i := range c.payload {
			c.payload[i] = byte(i*7 + int(seq))
		}
		segs, err := runSegment(t, c, int(chunks%3)*8)
		if err != nil {
			// Refusals are fine when they are right.
			segLen := len(c.payload)
			if mss > 0 && segLen > int(mss) {
				segLen = int(mss)
			}
			n := 1
			if mss > 0 && len(c.payload) > int(mss) {
				n = (len(c.payload) + int(mss) - 1) / int(mss)
			}
			if (errors.Is(err, errGSOTooManySeg) && n > maxBatch) || (errors.Is(err, errGSOSegTooBig) && segLen+120 > 2048-16) {
				return
			}
			t.Fatalf("segment: %v (payload %d, mss %d)", err, len(c.payload), mss)
		}
		if err := checkSegments(c, segs); err != nil {
			t.Fatal(err)
		}
	})
}

// TestHostGSOOnTheWire joins two stacks by a pump that checks every
// packet one hands the other, the way wireguard-go would carry them: while
// a 4 MiB stream and its echo cross, each packet must be a valid TCP/IP
// packet (lengths, IPv4 header checksum, TCP checksum) no larger than the
// MTU, and at least one Read must have carried several segments of one
// segment (consecutive sequence numbers of one flow) and both stacks must
// have split GSO packets, or host GSO is not what moved the data.
func TestHostGSOOnTheWire(t *testing.T) {
	a, err := New(Config{Addrs: []netip.Addr{own4, own6}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := New(Config{Addrs: []netip.Addr{peer4, peer6}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	type verdict struct {
		bad     error
		batched bool
	}
	pump := func(from, to *Stack, done chan<- verdict) {
		var v verdict
		defer func() { done <- v }()
		bufs := make([][]byte, maxBatch)
		for i := range bufs {
			bufs[i] = make([]byte, 16+65535)
		}
		sizes := make([]int, maxBatch)
		for {
			n, err := from.Read(bufs, sizes, 16)
			if err != nil {
				return
			}
			out := make([][]byte, 0, n)
			var prevEnd uint32
			var prevFlow uint32
			for i := 0; i < n; i++ {
				p := bufs[i][16 : 16+sizes[i]]
				if err := validTCPIP(p, DefaultMTU); err != nil && v.bad == nil {
					v.bad = fmt.Errorf("read %d of %d: %w", i, n, err)
				}
				if seq, end, flow, ok := tcpSpan(p); ok {
					if i > 0 && flow == prevFlow && seq == prevEnd && end != seq {
						v.batched = true
					}
					prevEnd, prevFlow = end, flow
				}
				out = append(out, bufs[i][:16+sizes[i]])
			}
			to.Write(out, 16)
		}
	}
	ab, ba := make(chan verdict, 1), make(chan verdict, 1)
	go pump(a, b, ab)
	go pump(b, a, ba)

	b.SetTCPHandler(func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	})
	for _, dst := range []netip.Addr{peer4, peer6} {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		c, err := a.DialTCP(ctx, netip.AddrPortFrom(dst, 7))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(60 * time.Second))
		data := make([]byte, 4<<20)
		for i := range data {
			data[i] = byte(i * 131)
		}
		go func() {
			c.Write(data)
			c.(interface{ CloseWrite() error }).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%v: echo of %d bytes: got %d, intact %v, err %v", dst, len(data), len(got), bytes.Equal(got, data), err)
		}
	}
	if a.Stats().OutboundGSO == 0 || b.Stats().OutboundGSO == 0 {
		t.Errorf("GSO packets split: %d at A, %d at B; want some at each", a.Stats().OutboundGSO, b.Stats().OutboundGSO)
	}
	a.Close()
	b.Close()
	for _, ch := range []chan verdict{ab, ba} {
		v := <-ch
		if v.bad != nil {
			t.Error(v.bad)
		}
		if !v.batched {
			t.Error("no Read carried consecutive segments of one flow: host GSO not in use")
		}
	}
}

// validTCPIP checks a packet the link endpoint handed out: IPv4 or IPv6,
// lengths consistent, no larger than mtu, IPv4 header checksum and (for
// TCP) the TCP checksum valid.
func validTCPIP(p []byte, mtu int) error {
	if len(p) > mtu {
		return fmt.Errorf("%d-byte packet over the MTU %d", len(p), mtu)
	}
	var l4 []byte
	var src, dst tcpip.Address
	var proto tcpip.TransportProtocolNumber
	switch {
	case len(p) >= header.IPv4MinimumSize && p[0]>>4 == 4:
		ip := header.IPv4(p)
		if !ip.IsValid(len(p)) || int(ip.TotalLength()) != len(p) || !ip.IsChecksumValid() {
			return errors.New("bad IPv4 header")
		}
		l4, src, dst, proto = ip.Payload(), ip.SourceAddress(), ip.DestinationAddress(), ip.TransportProtocol()
	case len(p) >= header.IPv6MinimumSize && p[0]>>4 == 6:
		ip := header.IPv6(p)
		if !ip.IsValid(len(p)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(p) {
			return errors.New("bad IPv6 header")
		}
		l4, src, dst, proto = ip.Payload(), ip.SourceAddress(), ip.DestinationAddress(), ip.TransportProtocol()
	default:
		return errors.New("not an IP packet")
	}
	if proto != header.TCPProtocolNumber {
		return nil
	}
	tcp := header.TCP(l4)
	if len(tcp) < header.TCPMinimumSize || int(tcp.DataOffset()) > len(tcp) {
		return errors.New("short TCP header")
	}
	data := tcp[tcp.DataOffset():]
	if !tcp.IsChecksumValid(src, dst, checksum.Checksum(data, 0), uint16(len(data))) {
		return fmt.Errorf("bad TCP checksum (flags %v, seq %d, %d bytes)", tcp.Flags(), tcp.SequenceNumber(), len(data))
	}
	return nil
}

// tcpSpan returns a TCP packet's sequence range and a hash of its flow.
func tcpSpan(p []byte) (seq, end, flow uint32, ok bool) {
	var tcp header.TCP
	var addrs []byte
	switch {
	case len(p) >= header.IPv4MinimumSize && p[0]>>4 == 4 && header.IPv4(p).TransportProtocol() == header.TCPProtocolNumber:
		tcp, addrs = header.IPv4(p).Payload(), p[12:20]
	case len(p) >= header.IPv6MinimumSize && p[0]>>4 == 6 && header.IPv6(p).TransportProtocol() == header.TCPProtocolNumber:
		tcp, addrs = header.IPv6(p).Payload(), p[8:40]
	default:
		return 0, 0, 0, false
	}
	if len(tcp) < header.TCPMinimumSize || int(tcp.DataOffset()) > len(tcp) {
		return 0, 0, 0, false
	}
	flow = uint32(checksum.Checksum(addrs, 0))<<16 | uint32(tcp.SourcePort()^tcp.DestinationPort())
	seq = tcp.SequenceNumber()
	return seq, seq + uint32(len(tcp)-int(tcp.DataOffset())), flow, true
}
