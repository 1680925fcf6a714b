package dns

import (
	"net/netip"
	"strconv"
	"strings"

	mdns "github.com/miekg/dns"
)

// Reverse names (PTR) of the mesh's own addresses are answered here and
// never forwarded: an upstream knows nothing of them, and a query for one
// would tell it which mesh addresses this host talks to.

// reverseName parses a name under in-addr.arpa. or ip6.arpa. (canonical,
// lowercase, fully qualified) into the prefix it designates: all four
// labels of an IPv4 address give a /32, fewer a shorter prefix
// (100.96.in-addr.arpa is 96.100.0.0/16, written backwards); 32 nibbles
// give an IPv6 /128. ok is false for anything else, including names with
// extra labels (RFC 2317 delegations) and labels with leading zeros.
func reverseName(name string) (p netip.Prefix, ok bool) {
	switch {
	case strings.HasSuffix(name, ".in-addr.arpa."):
		labels := strings.Split(strings.TrimSuffix(name, ".in-addr.arpa."), ".")
		if len(labels) > 4 {
			return netip.Prefix{}, false
		}
		var b [4]byte
		for i, l := range labels {
			if l == "" || len(l) > 3 || (len(l) > 1 && l[0] == '0') {
				return netip.Prefix{}, false
			}
			n, err := strconv.ParseUint(l, 10, 8)
			if err != nil {
				return netip.Prefix{}, false
			}
			b[len(labels)-1-i] = byte(n)
		}
		return netip.PrefixFrom(netip.AddrFrom4(b), 8*len(labels)), true
	case strings.HasSuffix(name, ".ip6.arpa."):
		labels := strings.Split(strings.TrimSuffix(name, ".ip6.arpa."), ".")
		if len(labels) > 32 {
			return netip.Prefix{}, false
		}
		var b [16]byte
		for i, l := range labels {
			if len(l) != 1 {
				return netip.Prefix{}, false
			}
			v, err := strconv.ParseUint(l, 16, 8)
			if err != nil {
				return netip.Prefix{}, false
			}
			nib := len(labels) - 1 - i // nibble index from the left
			if nib%2 == 0 {
				b[nib/2] |= byte(v) << 4
			} else {
				b[nib/2] |= byte(v)
			}
		}
		return netip.PrefixFrom(netip.AddrFrom16(b), 4*len(labels)), true
	}
	return netip.Prefix{}, false
}

// localReverse reports whether name is a reverse name inside one of the
// zone's local ranges, and if so fills resp with the answer: a PTR to the
// service or node name for a known address, NXDOMAIN for an unknown one,
// and an empty answer (NODATA) for a name above the addresses (a /16).
func (s *Server) localReverse(resp *mdns.Msg, q mdns.Question, z *zoneIndex) bool {
	name := mdns.CanonicalName(q.Name)
	p, ok := reverseName(name)
	if !ok {
		return false
	}
	inside := false
	for _, l := range z.local {
		if l.Bits() <= p.Bits() && l.Contains(p.Addr()) {
			inside = true
			break
		}
	}
	if !inside {
		return false
	}
	resp.Authoritative = true
	if !p.IsSingleIP() {
		return true // NODATA: an empty non-terminal above the addresses
	}
	target, ok := z.ptr[p.Addr()]
	if !ok {
		resp.Rcode = mdns.RcodeNameError
		return true
	}
	if q.Qtype == mdns.TypePTR || q.Qtype == mdns.TypeANY {
		resp.Answer = append(resp.Answer, &mdns.PTR{
			Hdr: mdns.RR_Header{Name: mdns.Fqdn(q.Name), Rrtype: mdns.TypePTR, Class: mdns.ClassINET, Ttl: ttl},
			Ptr: target,
		})
	}
	return true
}
