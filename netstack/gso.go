package netstack

import (
	"encoding/binary"
	"errors"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Host GSO: the link endpoint tells gVisor it segments TCP itself
// (stack.HostGSOSupported), so TCP hands over one packet of up to
// GSOMaxSize bytes per send, with the checksum left to the link
// (CHECKSUM_PARTIAL), and drain splits it into MSS-sized segments straight
// into wireguard-go's buffers: one copy, no per-segment PacketBuffer
// (see docs/netstack-tuning.md#send-host-gso-split-into-wireguard-gos-buffers).

// gsoSegments is how many MSS-sized segments one GSO packet may carry: 44
// sealed segments of a 1420-byte MTU make 63,888 bytes, one UDP GSO message
// under the bind's 64,000-byte cap.
const gsoSegments = 44

// gsoMaxSize is the GSOMaxSize for an MTU: room for gsoSegments segments of
// an option-less IPv4 MSS, and never more than a 16-bit IP length can say.
// gVisor's sender puts at most GSOMaxSize minus 61 bytes
// (header.TCPTotalHeaderMaximumSize + 1) of payload in a GSO packet.
func gsoMaxSize(mtu uint32) uint32 {
	if mtu <= header.IPv4MinimumSize+header.TCPMinimumSize {
		return 0
	}
	payload := gsoSegments * (mtu - header.IPv4MinimumSize - header.TCPMinimumSize)
	// IPv4 header with options and TCP header with options: 60 each.
	payload = min(payload, 0xffff-2*60)
	return payload + header.TCPTotalHeaderMaximumSize + 1
}

// maxHeaders is the longest IP+TCP header a GSO packet can have: an IPv4
// header with options (60) or an IPv6 header (40), and a TCP header with
// options (60).
const maxHeaders = 60 + 60

var (
	errGSONotTCP     = errors.New("netstack: GSO packet is not an option-less TCP/IP packet")
	errGSOTooManySeg = errors.New("netstack: GSO packet needs more buffers than the read has")
	errGSOSegTooBig  = errors.New("netstack: GSO segment larger than the read buffer")
)

// needsSegment reports whether pkt must go through segment: a TCP packet of
// a host-GSO connection, whatever its size, carries only the pseudo-header
// sum in its checksum field.
func needsSegment(pkt *stack.PacketBuffer) bool {
	t := pkt.GSOOptions.Type
	return (t == stack.GSOTCPv4 || t == stack.GSOTCPv6) && pkt.GSOOptions.NeedsCsum
}

// segmentCount is how many segments (read buffers) pkt takes in drain.
func segmentCount(pkt *stack.PacketBuffer) int {
	if !needsSegment(pkt) {
		return 1
	}
	mss := int(pkt.GSOOptions.MSS)
	payload := pkt.Data().Size()
	if mss <= 0 || payload <= mss {
		return 1
	}
	return (payload + mss - 1) / mss
}

// packetReader copies a PacketBuffer's bytes (headers, then payload) out in
// order by walking its view list, without allocating.
type packetReader struct {
	v    *buffer.View
	off  int // into v's slice
	left int // bytes of the packet not yet read
}

func newPacketReader(pkt *stack.PacketBuffer) packetReader {
	vl, skip := pkt.AsViewList()
	r := packetReader{v: vl.Front(), left: pkt.Size()}
	for r.v != nil && skip >= r.v.Size() {
		skip -= r.v.Size()
		r.v = r.v.Next()
	}
	r.off = skip
	return r
}

// read fills dst with the next len(dst) bytes; false if the packet ends
// first.
func (r *packetReader) read(dst []byte) bool {
	if len(dst) > r.left {
		return false
	}
	for n := 0; n < len(dst); {
		if r.v == nil {
			return false
		}
		b := r.v.AsSlice()[r.off:]
		c := copy(dst[n:], b)
		n += c
		r.off += c
		if r.off == len(r.v.AsSlice()) {
			r.v, r.off = r.v.Next(), 0
		}
	}
	r.left -= len(dst)
	return true
}

// segment writes pkt, a TCP/IPv4 or TCP/IPv6 packet of a host-GSO
// connection, into bufs[i][offset:] as MSS-sized segments (one if it is no
// longer than the MSS), each a complete packet with its own IP length, ID
// and header checksum (IPv4) or payload length (IPv6), TCP sequence number
// and checksum; FIN and PSH stay on the last segment, CWR on the first
// only, as a NIC's TSO does. It returns how many buffers it filled.
func segment(bufs [][]byte, sizes []int, offset int, pkt *stack.PacketBuffer) (int, error) {
	r := newPacketReader(pkt)
	var hdr [maxHeaders]byte
	if !r.read(hdr[:1]) {
		return 0, errGSONotTCP
	}
	var ipLen int
	switch hdr[0] >> 4 {
	case 4:
		ipLen = int(hdr[0]&0xf) * 4
		if ipLen < header.IPv4MinimumSize || !r.read(hdr[1:ipLen]) {
			return 0, errGSONotTCP
		}
		ip := header.IPv4(hdr[:ipLen])
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 {
			return 0, errGSONotTCP
		}
	case 6:
		ipLen = header.IPv6MinimumSize
		if !r.read(hdr[1:ipLen]) || header.IPv6(hdr[:ipLen]).NextHeader() != uint8(header.TCPProtocolNumber) {
			return 0, errGSONotTCP
		}
	default:
		return 0, errGSONotTCP
	}
	if !r.read(hdr[ipLen : ipLen+header.TCPMinimumSize]) {
		return 0, errGSONotTCP
	}
	tcpLen := int(header.TCP(hdr[ipLen:]).DataOffset())
	if tcpLen < header.TCPMinimumSize || !r.read(hdr[ipLen+header.TCPMinimumSize:ipLen+tcpLen]) {
		return 0, errGSONotTCP
	}
	hlen := ipLen + tcpLen
	payload := r.left
	mss := int(pkt.GSOOptions.MSS)
	if mss <= 0 || payload <= mss {
		mss = max(payload, 1)
	}
	n := max((payload+mss-1)/mss, 1)
	if n > len(bufs) || n > len(sizes) {
		return 0, errGSOTooManySeg
	}
	if offset < 0 || hlen+min(mss, payload) > len(bufs[0])-offset {
		return 0, errGSOSegTooBig
	}

	// The parts of the checksums that are the same for every segment.
	v4 := hdr[0]>>4 == 4
	var addrSum uint16
	if v4 {
		addrSum = checksum.Checksum(hdr[12:20], 0)
	} else {
		addrSum = checksum.Checksum(hdr[8:40], 0)
	}
	addrSum = checksum.Combine(addrSum, uint16(header.TCPProtocolNumber))
	tcpHdr := header.TCP(hdr[ipLen:hlen])
	seq := tcpHdr.SequenceNumber()
	flags := tcpHdr.Flags()
	id := binary.BigEndian.Uint16(hdr[4:6]) // IPv4 only

	for i := 0; i < n; i++ {
		segLen := min(mss, payload-i*mss)
		total := hlen + segLen
		out := bufs[i]
		if len(out) < offset+total {
			return i, errGSOSegTooBig
		}
		out = out[offset : offset+total]
		copy(out, hdr[:hlen])
		if !r.read(out[hlen:]) {
			return i, errGSONotTCP
		}
		if v4 {
			ip := header.IPv4(out)
			ip.SetTotalLength(uint16(total))
			ip.SetID(id + uint16(i))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		} else {
			header.IPv6(out).SetPayloadLength(uint16(total - ipLen))
		}
		tcp := header.TCP(out[ipLen:])
		tcp.SetSequenceNumber(seq + uint32(i*mss))
		f := flags
		if i < n-1 {
			f &^= header.TCPFlagFin | header.TCPFlagPsh
		}
		if i > 0 {
			f &^= header.TCPFlagCwr
		}
		tcp.SetFlags(uint8(f))
		tcp.SetChecksum(0)
		xsum := checksum.Combine(addrSum, uint16(tcpLen+segLen))
		tcp.SetChecksum(^checksum.Checksum(out[ipLen:], xsum))
		sizes[i] = total
	}
	return n, nil
}
