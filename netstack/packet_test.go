package netstack

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	own4   = netip.MustParseAddr("100.96.0.1")
	own6   = netip.MustParseAddr("fd7a:6d65:7368::1")
	peer4  = netip.MustParseAddr("100.96.0.2")
	peer6  = netip.MustParseAddr("fd7a:6d65:7368::2")
	other4 = netip.MustParseAddr("100.96.0.77")
	other6 = netip.MustParseAddr("fd7a:6d65:7368::77")
)

func addr(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }

// ipPacket wraps a transport payload (with its checksum still to fill) in
// an IPv4 or IPv6 header. fill computes the transport checksum given the
// pseudo-header checksum.
func ipPacket(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, l4 []byte, fill func(l4 []byte, pseudo uint16)) []byte {
	if src.Is4() {
		b := make([]byte, header.IPv4MinimumSize+len(l4))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)),
			TTL:         64,
			Protocol:    uint8(proto),
			SrcAddr:     addr(src),
			DstAddr:     addr(dst),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(b[header.IPv4MinimumSize:], l4)
		if fill != nil {
			fill(b[header.IPv4MinimumSize:], header.PseudoHeaderChecksum(proto, addr(src), addr(dst), uint16(len(l4))))
		}
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+len(l4))
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength:     uint16(len(l4)),
		TransportProtocol: proto,
		HopLimit:          64,
		SrcAddr:           addr(src),
		DstAddr:           addr(dst),
	})
	copy(b[header.IPv6MinimumSize:], l4)
	if fill != nil {
		fill(b[header.IPv6MinimumSize:], header.PseudoHeaderChecksum(proto, addr(src), addr(dst), uint16(len(l4))))
	}
	return b
}

func tcpSYN(src, dst netip.Addr, dport uint16) []byte {
	l4 := make([]byte, header.TCPMinimumSize)
	header.TCP(l4).Encode(&header.TCPFields{
		SrcPort:    40000,
		DstPort:    dport,
		SeqNum:     1,
		DataOffset: header.TCPMinimumSize,
		Flags:      header.TCPFlagSyn,
		WindowSize: 65535,
	})
	return ipPacket(src, dst, header.TCPProtocolNumber, l4, func(b []byte, pseudo uint16) {
		t := header.TCP(b)
		t.SetChecksum(^t.CalculateChecksum(pseudo))
	})
}

func udpDatagram(src, dst netip.Addr, dport uint16, payload []byte) []byte {
	l4 := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(l4).Encode(&header.UDPFields{SrcPort: 40000, DstPort: dport, Length: uint16(len(l4))})
	copy(l4[header.UDPMinimumSize:], payload)
	return ipPacket(src, dst, header.UDPProtocolNumber, l4, func(b []byte, pseudo uint16) {
		u := header.UDP(b)
		u.SetChecksum(^u.CalculateChecksum(checksum.Checksum(b[header.UDPMinimumSize:], pseudo)))
	})
}

func echoRequest(src, dst netip.Addr, payload []byte) []byte {
	if src.Is4() {
		l4 := make([]byte, header.ICMPv4MinimumSize+len(payload))
		icmp := header.ICMPv4(l4)
		icmp.SetType(header.ICMPv4Echo)
		icmp.SetIdent(7)
		icmp.SetSequence(1)
		copy(icmp.Payload(), payload)
		icmp.SetChecksum(^checksum.Checksum(l4, 0))
		return ipPacket(src, dst, header.ICMPv4ProtocolNumber, l4, nil)
	}
	l4 := make([]byte, header.ICMPv6EchoMinimumSize+len(payload))
	icmp := header.ICMPv6(l4)
	icmp.SetType(header.ICMPv6EchoRequest)
	icmp.SetIdent(7)
	icmp.SetSequence(1)
	copy(icmp.Payload(), payload)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: addr(src), Dst: addr(dst)}))
	return ipPacket(src, dst, header.ICMPv6ProtocolNumber, l4, nil)
}

func newTestStack(t testing.TB) *Stack {
	t.Helper()
	s, err := New(Config{Addrs: []netip.Addr{own4, own6}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// readPacket reads one outbound packet, failing the test after a deadline.
func readPacket(t *testing.T, s *Stack) []byte {
	t.Helper()
	type res struct {
		b   []byte
		err error
	}
	c := make(chan res, 1)
	go func() {
		bufs := [][]byte{make([]byte, 16+1500)}
		sizes := make([]int, 1)
		_, err := s.Read(bufs, sizes, 16)
		c <- res{bufs[0][16 : 16+sizes[0]], err}
	}()
	select {
	case r := <-c:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r.b
	case <-time.After(10 * time.Second):
		t.Fatal("no outbound packet")
		return nil
	}
}

func TestICMPEcho(t *testing.T) {
	s := newTestStack(t)
	for _, tc := range []struct{ src, dst netip.Addr }{{peer4, own4}, {peer6, own6}} {
		t.Run(tc.dst.String(), func(t *testing.T) {
			payload := []byte("meshlink ping")
			if _, err := s.Write([][]byte{echoRequest(tc.src, tc.dst, payload)}, 0); err != nil {
				t.Fatal(err)
			}
			reply := readPacket(t, s)
			if tc.dst.Is4() {
				ip := header.IPv4(reply)
				icmp := header.ICMPv4(ip.Payload())
				if ip.SourceAddress() != addr(tc.dst) || ip.DestinationAddress() != addr(tc.src) || icmp.Type() != header.ICMPv4EchoReply || string(icmp.Payload()) != string(payload) {
					t.Fatalf("reply %x is not an echo reply from %v", reply, tc.dst)
				}
				return
			}
			ip := header.IPv6(reply)
			icmp := header.ICMPv6(ip.Payload())
			if ip.SourceAddress() != addr(tc.dst) || ip.DestinationAddress() != addr(tc.src) || icmp.Type() != header.ICMPv6EchoReply || string(icmp.Payload()) != string(payload) {
				t.Fatalf("reply %x is not an echo reply from %v", reply, tc.dst)
			}
		})
	}
}

// TestForeignDestinationIgnored checks that the stack never answers for an
// address that is not its own: a SYN to another address gets neither a
// handler call, nor a SYN-ACK, nor a RST; the first packet out is the
// answer to a later ping to our own address.
func TestForeignDestinationIgnored(t *testing.T) {
	s := newTestStack(t)
	called := make(chan netip.AddrPort, 16)
	s.SetTCPHandler(func(r *TCPRequest) {
		called <- r.Dst
		r.Reject()
	})
	s.SetUDPHandler(func(r *UDPRequest) {
		called <- r.Dst
		r.Reject()
	})
	for _, tc := range []struct{ src, dst, own netip.Addr }{{peer4, other4, own4}, {peer6, other6, own6}} {
		before := s.stack.Stats().IP.InvalidDestinationAddressesReceived.Value()
		if _, err := s.Write([][]byte{tcpSYN(tc.src, tc.dst, 80), udpDatagram(tc.src, tc.dst, 53, []byte("q"))}, 0); err != nil {
			t.Fatal(err)
		}
		if got := s.stack.Stats().IP.InvalidDestinationAddressesReceived.Value() - before; got != 2 {
			t.Errorf("%v: %d packets dropped as foreign, want 2", tc.dst, got)
		}
		s.Write([][]byte{echoRequest(tc.src, tc.own, nil)}, 0)
		reply := readPacket(t, s)
		if reply[0]>>4 == 4 && header.IPv4(reply).Protocol() != uint8(header.ICMPv4ProtocolNumber) ||
			reply[0]>>4 == 6 && header.IPv6(reply).TransportProtocol() != header.ICMPv6ProtocolNumber {
			t.Fatalf("%v: first outbound packet is not the echo reply: %x", tc.dst, reply)
		}
	}
	select {
	case dst := <-called:
		t.Fatalf("handler called for %v", dst)
	default:
	}
}

// TestInboundSYNReachesHandler checks the forwarding path without
// WireGuard: a SYN to our address reaches the handler with the right
// addresses, and Reject answers with a RST.
func TestInboundSYNReachesHandler(t *testing.T) {
	s := newTestStack(t)
	got := make(chan *TCPRequest, 1)
	s.SetTCPHandler(func(r *TCPRequest) {
		got <- r
		r.Reject()
	})
	s.Write([][]byte{tcpSYN(peer4, own4, 5432)}, 0)
	r := <-got
	if r.Src != netip.AddrPortFrom(peer4, 40000) || r.Dst != netip.AddrPortFrom(own4, 5432) {
		t.Fatalf("request %v -> %v", r.Src, r.Dst)
	}
	rst := header.TCP(header.IPv4(readPacket(t, s)).Payload())
	if !rst.Flags().Contains(header.TCPFlagRst) {
		t.Fatalf("reply flags %v, want RST", rst.Flags())
	}
}

func TestWriteGarbageCounted(t *testing.T) {
	s := newTestStack(t)
	bufs := [][]byte{nil, {0x45}, make([]byte, 19), {0x60, 1, 2}, {0x10, 0, 0, 0}, make([]byte, 100)}
	n, err := s.Write(bufs, 0)
	if err != nil || n != len(bufs) {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(bufs))
	}
	if got := s.Stats().InboundInvalid; got != uint64(len(bufs)) {
		t.Errorf("InboundInvalid = %d, want %d", got, len(bufs))
	}
}

func TestOutboundQueueBounded(t *testing.T) {
	s := newTestStack(t)
	// Nobody reads: flood pings and check the queue stops growing and
	// counts drops.
	ping := echoRequest(peer4, own4, make([]byte, 64))
	batch := make([][]byte, 64)
	for i := range batch {
		batch[i] = ping
	}
	for range outboundQueueLen/len(batch) + 4 {
		s.Write(batch, 0)
	}
	if s.Stats().OutboundDropped == 0 {
		t.Fatal("no outbound drops counted with a full queue")
	}
	// A batched read returns many packets at once.
	bufs := make([][]byte, maxBatch)
	for i := range bufs {
		bufs[i] = make([]byte, 1500)
	}
	n, err := s.Read(bufs, make([]int, maxBatch), 0)
	if err != nil || n != maxBatch {
		t.Fatalf("Read = %d, %v; want a full batch of %d", n, err, maxBatch)
	}
}

func TestDialRefusedBySYNRST(t *testing.T) {
	// Drive a dial by hand: read our SYN, answer RST|ACK, expect refusal.
	s := newTestStack(t)
	errc := make(chan error, 1)
	go func() {
		_, err := s.DialTCP(context.Background(), netip.AddrPortFrom(peer4, 80))
		errc <- err
	}()
	syn := header.IPv4(readPacket(t, s))
	tcp := header.TCP(syn.Payload())
	l4 := make([]byte, header.TCPMinimumSize)
	header.TCP(l4).Encode(&header.TCPFields{
		SrcPort: 80, DstPort: tcp.SourcePort(), AckNum: tcp.SequenceNumber() + 1,
		DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagRst | header.TCPFlagAck,
	})
	rst := ipPacket(peer4, own4, header.TCPProtocolNumber, l4, func(b []byte, pseudo uint16) {
		h := header.TCP(b)
		h.SetChecksum(^h.CalculateChecksum(pseudo))
	})
	s.Write([][]byte{rst}, 0)
	select {
	case err := <-errc:
		if err == nil || !isRefused(err) {
			t.Fatalf("dial: %v, want ErrConnRefused", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("dial not refused")
	}
}

// TestAcceptAbortsUnfinishedHandshake performs the half-open attack on
// Accept: a SYN whose SYN-ACK is never ACKed. Accept must give up after
// HandshakeTimeout (gVisor alone retransmits for about two minutes), so a
// handler holding a connection to a real target for it lets go.
func TestAcceptAbortsUnfinishedHandshake(t *testing.T) {
	const timeout = 300 * time.Millisecond
	s, err := New(Config{Addrs: []netip.Addr{own4, own6}, HandshakeTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	errc := make(chan error, 1)
	s.SetTCPHandler(func(r *TCPRequest) {
		c, err := r.Accept()
		if c != nil {
			c.Close()
		}
		errc <- err
	})
	start := time.Now()
	s.Write([][]byte{tcpSYN(peer4, own4, 5432)}, 0)
	select {
	case err := <-errc:
		took := time.Since(start)
		if err == nil {
			t.Fatal("Accept succeeded without the final ACK")
		}
		if took < timeout {
			t.Fatalf("Accept gave up after %v, before the %v timeout: %v", took, timeout, err)
		}
		if !strings.Contains(err.Error(), "did not complete the handshake") {
			t.Fatalf("error %q does not say the handshake was not completed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still waiting for the final ACK after 10s")
	}
}
