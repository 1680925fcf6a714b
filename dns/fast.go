package dns

import (
	"log/slog"
	"net"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// The fast path: replies to the questions applications ask most (a
// service's or node's A/AAAA, a service's SRV, a mesh address's PTR) are
// packed whole when the zone changes, by the same code that answers every
// other query, and a plain UDP query for one of them is answered from the
// reading goroutine by copying the prepared bytes and patching in what
// comes from the query: its ID, its RD and CD bits, the case of its name,
// and an OPT record when it sent one. Anything the fast path does not
// recognise byte for byte goes the ordinary way (miekg/dns unpacks it and
// ServeDNS answers it).

// maxFast bounds the prepared replies of one zone (memory, and the work of
// each SetZone); services come first, then nodes, then reverse names.
const maxFast = 8192

// fastEntry is one prepared reply: ID 0, RD, CD and RA clear, the question
// in lowercase, no OPT.
type fastEntry struct {
	msg []byte
	// echo are the offsets in msg where the ordinary path writes the
	// question's name as the client spelled it (the question itself, the
	// answers' owner names); nil if that could not be worked out, and then
	// only a query in lowercase takes the fast path.
	echo []int
}

// optRR is the OPT record the ordinary path adds when the query had one:
// root owner, UDP size ednsSize, no extended rcode, version 0, no flags, no
// options.
var optRR = []byte{0, 0, byte(mdns.TypeOPT), byte(ednsSize >> 8), byte(ednsSize & 0xff), 0, 0, 0, 0, 0, 0}

// fastKey is the lookup key of a question: the name in wire form,
// lowercase, then the type.
func fastKey(wireName []byte, qtype uint16) string {
	return string(append(wireName, byte(qtype>>8), byte(qtype)))
}

// prepare fills idx.fast with the replies of idx's common questions.
func (s *Server) prepare(idx *zoneIndex) {
	idx.fast = make(map[string]fastEntry)
	add := func(name string, qtypes ...uint16) {
		for _, qt := range qtypes {
			if len(idx.fast) >= maxFast {
				return
			}
			if e, ok := s.prepareOne(idx, name, qt); ok {
				wire := make([]byte, 256)
				n, err := mdns.PackDomainName(name, wire, 0, nil, false)
				if err != nil {
					return
				}
				idx.fast[fastKey(wire[:n], qt)] = e
			}
		}
	}
	for key, svc := range idx.services {
		add(key+"."+s.domain, mdns.TypeA, mdns.TypeAAAA, mdns.TypeANY)
		for _, p := range []string{"_tcp", "_udp"} {
			if svc.carries(p) {
				add("_"+key+"."+p+"."+s.domain, mdns.TypeSRV)
			}
		}
	}
	for key := range idx.nodes {
		add(key+"."+nodeLabel+"."+s.domain, mdns.TypeA, mdns.TypeAAAA)
	}
	for a := range idx.ptr {
		if rev, err := mdns.ReverseAddr(a.String()); err == nil {
			add(rev, mdns.TypePTR)
		}
	}
}

// prepareOne packs the ordinary path's reply to (name, qtype) for zone idx,
// if it is answered here and small enough for any UDP client with an OPT
// record added.
func (s *Server) prepareOne(idx *zoneIndex, name string, qtype uint16) (fastEntry, bool) {
	pack := func(name string) ([]byte, bool) {
		req := new(mdns.Msg)
		req.Question = []mdns.Question{{Name: name, Qtype: qtype, Qclass: mdns.ClassINET}}
		resp, via, done := s.answerHere(req, idx)
		if !done || (via != "mesh" && via != "mesh-reverse") {
			return nil, false
		}
		s.finish(resp, req, true)
		resp.RecursionAvailable = false
		b, err := resp.Pack()
		if err != nil || resp.Truncated || len(b)+len(optRR) > mdns.MinMsgSize {
			return nil, false
		}
		return b, true
	}
	lower, ok := pack(name)
	if !ok || int(lower[10])<<8|int(lower[11]) == 0xffff {
		return fastEntry{}, false
	}
	e := fastEntry{msg: lower}
	// Names here are letters, digits, '-', '_' and dots, so the uppercase
	// spelling packs to the same length and differs exactly where the
	// client's spelling is echoed. Replies this small are never compressed
	// (Truncate packs a message that fits uncompressed), so every echo is
	// the whole name.
	upper, ok := pack(strings.ToUpper(name))
	if !ok || len(upper) != len(lower) {
		return e, true
	}
	lname, uname := lower[12:12+len(name)+1], upper[12:12+len(name)+1]
	var echo []int
	for i := 0; i < len(lower); {
		if i+len(lname) <= len(lower) && string(lower[i:i+len(lname)]) == string(lname) &&
			string(upper[i:i+len(uname)]) == string(uname) && string(lname) != string(uname) {
			echo = append(echo, i)
			i += len(lname)
			continue
		}
		if lower[i] != upper[i] {
			return e, true // a difference that is not the echoed name
		}
		i++
	}
	e.echo = echo
	return e, true
}

// fastReply writes into out the reply to the UDP query q from zone z, if
// it has one prepared, with the RA bit ra; ok is false when q must go the
// ordinary way.
func fastReply(z *zoneIndex, q, out []byte, ra bool) (reply []byte, ok bool) {
	// Header: a query (QR 0, opcode 0) with one question, no answer or
	// authority records, and at most one additional (an OPT).
	if len(q) < 12 || q[2]&0xf8 != 0 || q[4] != 0 || q[5] != 1 ||
		q[6]|q[7]|q[8]|q[9]|q[10] != 0 || q[11] > 1 {
		return nil, false
	}
	var key [255 + 2]byte
	n, off, mixed := 0, 12, false
	for {
		if off >= len(q) {
			return nil, false
		}
		l := int(q[off])
		if l == 0 {
			break
		}
		// A longer label, a compression pointer or a name over 255 bytes
		// is the ordinary path's to judge.
		if l > 63 || off+1+l > len(q) || n+1+l+1 > 255 {
			return nil, false
		}
		key[n] = byte(l)
		for i := 1; i <= l; i++ {
			c := q[off+i]
			if c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
				mixed = true
			}
			key[n+i] = c
		}
		n += 1 + l
		off += 1 + l
	}
	key[n] = 0
	n++
	off++
	nameEnd := off
	if off+4 > len(q) || q[off+2] != 0 || q[off+3] != byte(mdns.ClassINET) {
		return nil, false
	}
	key[n], key[n+1] = q[off], q[off+1]
	n += 2
	off += 4
	edns := q[11] == 1
	if edns {
		// OPT: root owner, type 41, any UDP size, version 0, any flags,
		// and options only of kinds the ordinary path cannot fail to read.
		if off+11 > len(q) || q[off] != 0 || q[off+1] != 0 || q[off+2] != byte(mdns.TypeOPT) || q[off+6] != 0 {
			return nil, false
		}
		rdlen := int(q[off+9])<<8 | int(q[off+10])
		off += 11
		if off+rdlen != len(q) {
			return nil, false
		}
		for off < len(q) {
			if off+4 > len(q) {
				return nil, false
			}
			code := uint16(q[off])<<8 | uint16(q[off+1])
			olen := int(q[off+2])<<8 | int(q[off+3])
			if code != mdns.EDNS0COOKIE && code != mdns.EDNS0PADDING || off+4+olen > len(q) {
				return nil, false
			}
			off += 4 + olen
		}
	} else if off != len(q) {
		return nil, false
	}
	e, found := z.fast[string(key[:n])]
	if !found || mixed && e.echo == nil {
		return nil, false
	}
	out = append(out[:0], e.msg...)
	out[0], out[1] = q[0], q[1]
	out[2] |= q[2] & 0x01 // RD
	out[3] |= q[3] & 0x10 // CD
	if ra {
		out[3] |= 0x80
	}
	if mixed {
		for _, o := range e.echo {
			copy(out[o:], q[12:nameEnd])
		}
	}
	if edns {
		ar := int(out[10])<<8 | int(out[11]) + 1
		out[10], out[11] = byte(ar>>8), byte(ar)
		out = append(out, optRR...)
	}
	return out, true
}

// fastReader is the UDP server's mdns.Reader: it answers what the fast
// path can on the reading goroutine and hands the rest to miekg/dns.
type fastReader struct {
	s     *Server
	next  mdns.Reader
	buf   []byte
	out   []byte
	setup bool // the socket options are as the reader wants them
	bound bool // the socket is bound to one address, not a wildcard
}

func (r *fastReader) ReadTCP(conn net.Conn, timeout time.Duration) ([]byte, error) {
	return r.next.ReadTCP(conn, timeout)
}

// ReadUDP sets no read deadline: Shutdown sets one in the past to end the
// read, and a later deadline set here could undo it.
func (r *fastReader) ReadUDP(conn *net.UDPConn, timeout time.Duration) ([]byte, *mdns.SessionUDP, error) {
	if !r.setup {
		r.setup = true
		// miekg/dns asks for each datagram's destination address so that
		// a reply from a wildcard socket leaves from the address asked. A
		// socket bound to one address replies from it anyway: reading and
		// parsing that per datagram is wasted.
		if la, ok := conn.LocalAddr().(*net.UDPAddr); ok && !la.IP.IsUnspecified() {
			r.bound = true
			ipv4.NewPacketConn(conn).SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, false)
			ipv6.NewPacketConn(conn).SetControlMessage(ipv6.FlagDst|ipv6.FlagInterface, false)
		}
	}
	for {
		n, sess, err := mdns.ReadFromSessionUDP(conn, r.buf)
		if err != nil {
			return nil, nil, err
		}
		if reply, ok := r.s.fastUDP(r.buf[:n], sess.RemoteAddr(), r.out); ok {
			if reply != nil {
				r.out = reply[:0]
				var err error
				if r.bound {
					_, err = conn.WriteToUDP(reply, sess.RemoteAddr().(*net.UDPAddr))
				} else {
					_, err = mdns.WriteToSessionUDP(conn, reply, sess)
				}
				if err != nil {
					r.s.log.Debug("write reply failed", "err", err)
				}
			}
			continue
		}
		return append([]byte(nil), r.buf[:n]...), sess, nil
	}
}

// fastUDP answers q from src if the fast path can: ok with a nil reply
// means the source gets no answer (outside Allow, or over its rate limit),
// as ServeDNS would decide.
func (s *Server) fastUDP(q []byte, src net.Addr, out []byte) ([]byte, bool) {
	reply, ok := fastReply(s.zone.Load(), q, out, len(*s.ups.Load()) > 0)
	if !ok {
		return nil, false
	}
	if a := addrOf(src); !a.IsLoopback() && (!s.allowed(a) || !s.limit.allow(a)) {
		return nil, true
	}
	if s.log.Enabled(s.ctx, slog.LevelDebug) { // as ServeDNS logs each query
		name, off, _ := mdns.UnpackDomainName(q, 12) // fastReply read it already
		qtype := mdns.Type(uint16(q[off])<<8 | uint16(q[off+1])).String()
		s.log.Debug("query", "name", name, "type", qtype, "rcode", mdns.RcodeToString[int(reply[3]&0xf)],
			"answers", int(reply[6])<<8|int(reply[7]), "via", "mesh-prepared")
	}
	return reply, true
}
