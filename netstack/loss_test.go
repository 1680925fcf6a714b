package netstack

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// synWithOptions is a TCP SYN (or SYN-ACK) from src to dst carrying opts and
// a valid checksum.
func synWithOptions(src, dst netip.Addr, flags header.TCPFlags, opts []byte) []byte {
	l4 := make([]byte, header.TCPMinimumSize+len(opts))
	header.TCP(l4).Encode(&header.TCPFields{
		SrcPort:    40000,
		DstPort:    443,
		SeqNum:     1,
		DataOffset: uint8(len(l4)),
		Flags:      flags,
		WindowSize: 65535,
	})
	copy(l4[header.TCPMinimumSize:], opts)
	return ipPacket(src, dst, header.TCPProtocolNumber, l4, func(b []byte, pseudo uint16) {
		t := header.TCP(b)
		t.SetChecksum(^t.CalculateChecksum(pseudo))
	})
}

// tcpOf returns the TCP header of an IPv4 or IPv6 packet and whether its
// checksum is valid.
func tcpOf(t *testing.T, b []byte) (header.TCP, bool) {
	t.Helper()
	var tcp header.TCP
	var xsum uint16
	if b[0]>>4 == 4 {
		ip := header.IPv4(b)
		tcp = header.TCP(ip.Payload())
		xsum = header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(tcp)))
	} else {
		ip := header.IPv6(b)
		tcp = header.TCP(ip.Payload())
		xsum = header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(tcp)))
	}
	return tcp, checksum.Checksum(tcp, xsum) == 0xffff
}

// synOpts is what Linux sends: MSS, SACK permitted, timestamps, NOP, window
// scale. The timestamp option starts at an odd offset in the header.
var synOpts = []byte{
	2, 4, 0x05, 0x8c, // MSS 1420
	4, 2, // SACK permitted
	8, 10, 1, 2, 3, 4, 0, 0, 0, 0, // timestamps
	1,       // NOP
	3, 3, 7, // window scale 7
}

func TestStripSynTimestamp(t *testing.T) {
	for _, src := range []netip.Addr{peer4, peer6} {
		dst := own4
		if src.Is6() {
			dst = own6
		}
		b := synWithOptions(src, dst, header.TCPFlagSyn, synOpts)
		stripSynTimestamp(b)
		tcp, ok := tcpOf(t, b)
		if !ok {
			t.Fatalf("%v: checksum invalid after stripping", src)
		}
		got := header.ParseSynOptions(tcp.Options(), false)
		if got.TS || got.MSS != 1420 || !got.SACKPermitted || got.WS != 7 {
			t.Errorf("%v: options after stripping %+v, want MSS, SACK and WS but no TS", src, got)
		}

		// A SYN-ACK is left alone.
		b = synWithOptions(src, dst, header.TCPFlagSyn|header.TCPFlagAck, synOpts)
		stripSynTimestamp(b)
		if tcp, _ := tcpOf(t, b); !header.ParseSynOptions(tcp.Options(), true).TS {
			t.Errorf("%v: timestamps stripped from a SYN-ACK", src)
		}

		// A bad checksum stays bad.
		b = synWithOptions(src, dst, header.TCPFlagSyn, synOpts)
		tcp, _ = tcpOf(t, b)
		tcp.SetChecksum(tcp.Checksum() + 1)
		stripSynTimestamp(b)
		if _, ok := tcpOf(t, b); ok {
			t.Errorf("%v: corrupt SYN got a valid checksum", src)
		}
	}
	// Truncated and malformed packets must not panic.
	b := synWithOptions(peer4, own4, header.TCPFlagSyn, []byte{8, 40, 0, 0})
	stripSynTimestamp(b)
	for i := range b {
		stripSynTimestamp(b[:i])
	}
}

// TestNoTimestamps checks that the stack's SYNs offer no timestamps and
// that it does not accept them from a peer's SYN.
func TestNoTimestamps(t *testing.T) {
	s := newTestStack(t)
	go s.DialTCP(context.Background(), netip.AddrPortFrom(peer4, 80))
	syn, ok := tcpOf(t, readPacket(t, s))
	if !ok || !syn.Flags().Contains(header.TCPFlagSyn) {
		t.Fatalf("not a valid SYN: %v", syn.Flags())
	}
	if opts := header.ParseSynOptions(syn.Options(), false); opts.TS || !opts.SACKPermitted {
		t.Errorf("our SYN offers %+v, want SACK and no timestamps", opts)
	}

	// Accept returns once the handshake completes, which it never does
	// here; closing the stack ends it.
	s.SetTCPHandler(func(r *TCPRequest) {
		if c, err := r.Accept(); err == nil {
			c.Close()
		}
	})
	s.Write([][]byte{synWithOptions(peer4, own4, header.TCPFlagSyn, synOpts)}, 0)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		tcp, _ := tcpOf(t, readPacket(t, s))
		if tcp.DestinationPort() != 40000 {
			continue // the dial's SYN retransmission
		}
		if !tcp.Flags().Contains(header.TCPFlagSyn | header.TCPFlagAck) {
			t.Fatalf("reply flags %v, want SYN-ACK", tcp.Flags())
		}
		if opts := header.ParseSynOptions(tcp.Options(), true); opts.TS {
			t.Errorf("SYN-ACK echoes timestamps: %+v", opts)
		}
		return
	}
	t.Fatal("no SYN-ACK")
}

func TestFlowSeqsGap(t *testing.T) {
	seg := func(src netip.Addr, sport uint16, seq uint32, n int) []byte {
		l4 := make([]byte, header.TCPMinimumSize+n)
		header.TCP(l4).Encode(&header.TCPFields{SrcPort: sport, DstPort: 9000, SeqNum: seq, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck})
		return ipPacket(src, own4, header.TCPProtocolNumber, l4, nil)
	}
	var f flowSeqs
	steps := []struct {
		pkt  []byte
		want bool
	}{
		{seg(peer4, 1, 1000, 100), false}, // new flow
		{seg(peer4, 1, 1100, 100), false}, // in order
		{seg(peer4, 2, 5000, 100), false}, // another flow
		{seg(peer4, 1, 1300, 100), true},  // 1200 lost
		{seg(peer4, 1, 1400, 100), false}, // in order after the hole
		{seg(peer4, 1, 1200, 100), true},  // retransmission
		{seg(peer4, 1, 1300, 0), false},   // pure ACK: ignored
		{seg(peer4, 2, 5100, 100), false},
		{echoRequest(peer4, own4, nil), false},
		{seg(peer6, 1, 1, 100), false}, // IPv6 bypasses GRO anyway
	}
	for i, s := range steps {
		if got := f.gap(s.pkt); got != s.want {
			t.Errorf("step %d: gap = %v, want %v", i, got, s.want)
		}
	}
}

// TestBadChecksumDropped: the endpoint claims RX checksum offload, so the
// checksums it validates where packets enter (validRX) are the only ones:
// a SYN with a bad TCP checksum, or (IPv4) a bad header checksum, must not
// be answered, and is counted; a valid SYN after it is.
func TestBadChecksumDropped(t *testing.T) {
	s := newTestStack(t)
	s.SetTCPHandler(func(r *TCPRequest) {
		if c, err := r.Accept(); err == nil {
			c.Close()
		}
	})
	corrupt := map[string]func(b []byte){
		// A new source port under the old checksum.
		"tcp checksum": func(b []byte) {
			hl := header.IPv6MinimumSize
			if b[0]>>4 == 4 {
				hl = int(header.IPv4(b).HeaderLength())
			}
			header.TCP(b[hl:]).SetSourcePort(40001)
		},
		// The new port under a valid TCP checksum, and a bad header one.
		"ipv4 header checksum": func(b []byte) {
			ip := header.IPv4(b)
			tcp := header.TCP(ip.Payload())
			tcp.SetSourcePort(40001)
			tcp.SetChecksum(0)
			tcp.SetChecksum(^tcp.CalculateChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(tcp)))))
			ip.SetChecksum(ip.Checksum() + 1)
		},
	}
	var dropped uint64
	for _, src := range []netip.Addr{peer4, peer6} {
		dst := own4
		if src.Is6() {
			dst = own6
		}
		for name, fn := range corrupt {
			if src.Is6() && name == "ipv4 header checksum" {
				continue
			}
			bad := synWithOptions(src, dst, header.TCPFlagSyn, nil)
			fn(bad)
			good := synWithOptions(src, dst, header.TCPFlagSyn, nil)
			if _, ok := tcpOf(t, good); !ok {
				t.Fatal("the valid SYN is not valid")
			}
			s.Write([][]byte{bad, good}, 0)
			dropped++
			for {
				tcp, _ := tcpOf(t, readPacket(t, s))
				if tcp.Flags().Contains(header.TCPFlagRst) {
					continue // the previous case's connection going away
				}
				if tcp.DestinationPort() == 40001 {
					t.Fatalf("%v, %s: the corrupt SYN was answered (%v)", src, name, tcp.Flags())
				}
				if tcp.DestinationPort() == 40000 && tcp.Flags().Contains(header.TCPFlagSyn|header.TCPFlagAck) {
					break
				}
			}
			if got := s.Stats().InboundBadChecksum; got != dropped {
				t.Errorf("%v, %s: InboundBadChecksum = %d, want %d", src, name, got, dropped)
			}
			// Let the next case's SYN be a new connection: reset this one.
			rst := synWithOptions(src, dst, header.TCPFlagRst, nil)
			s.Write([][]byte{rst}, 0)
		}
	}
}
