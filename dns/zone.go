package dns

import (
	"net/netip"
	"slices"
	"strings"

	mdns "github.com/miekg/dns"
)

// ttl is short: the network map can move a service at any time, and the
// answers are local (cheap to ask again).
const ttl = 5

// nodeLabel is the label under which node names live: NODE.node.DOMAIN.
const nodeLabel = "node"

// zoneIndex is an immutable, query-ready copy of a Zone.
type zoneIndex struct {
	serial   uint32
	services map[string]Service // lowercase label → service
	nodes    map[string][]netip.Addr
	ptr      map[netip.Addr]string // address → FQDN, for PTR
	local    []netip.Prefix        // ranges whose reverse names stay here
	fast     map[string]fastEntry  // prepared replies, by fastKey
}

// SetZone replaces the mesh zone. Queries see either the old zone or the new
// one, never a mix. Names that are not a valid DNS label are skipped.
func (s *Server) SetZone(z Zone) {
	idx := &zoneIndex{
		serial:   s.serial.Add(1),
		services: make(map[string]Service, len(z.Services)),
		nodes:    make(map[string][]netip.Addr, len(z.Nodes)),
		ptr:      map[netip.Addr]string{},
	}
	for _, p := range z.Local {
		if p.IsValid() && p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if p.IsValid() {
			idx.local = append(idx.local, p.Masked())
		}
	}
	for name, svc := range z.Services {
		key, ok := label(name)
		if !ok || key == nodeLabel {
			s.log.Debug("skipping service with unusable name", "service", name)
			continue
		}
		svc := Service{Addrs: cleanAddrs(svc.Addrs), Port: svc.Port, VIP: svc.VIP.Unmap(), Protocol: svc.Protocol}
		idx.services[key] = svc
		for _, a := range append(slices.Clone(svc.Addrs), svc.VIP) {
			if a.IsValid() {
				idx.ptr[a] = key + "." + s.domain
			}
		}
	}
	for name, addrs := range z.Nodes {
		key, ok := label(name)
		if !ok {
			s.log.Debug("skipping node with unusable name", "node", name)
			continue
		}
		idx.nodes[key] = cleanAddrs(addrs)
		for _, a := range idx.nodes[key] {
			if _, taken := idx.ptr[a]; !taken {
				idx.ptr[a] = key + "." + nodeLabel + "." + s.domain
			}
		}
	}
	s.prepare(idx)
	s.zone.Store(idx)
}

// label lowercases name and reports whether it is usable as one DNS label
// that needs no escaping (so that lookups by query label match it).
func label(name string) (string, bool) {
	name = strings.ToLower(name)
	if name == "" || len(name) > 63 {
		return "", false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return "", false
		}
	}
	return name, true
}

func cleanAddrs(in []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, 0, len(in))
	for _, a := range in {
		if a.IsValid() {
			out = append(out, a.Unmap().WithZone(""))
		}
	}
	return out
}

// answerLocal fills resp (already SetReply'd) for a question inside s.domain,
// from zone z.
func (s *Server) answerLocal(resp *mdns.Msg, q mdns.Question, z *zoneIndex) {
	resp.Authoritative = true
	owner := mdns.Fqdn(q.Name) // keep the client's case (0x20)
	name := mdns.CanonicalName(q.Name)

	if q.Qclass != mdns.ClassINET && q.Qclass != mdns.ClassANY {
		resp.Rcode = mdns.RcodeRefused
		return
	}

	labels := mdns.SplitDomainName(name)
	rel := labels[:max(0, len(labels)-s.domLabels)]

	exists := false
	switch len(rel) {
	case 0: // the apex
		exists = true
		if q.Qtype == mdns.TypeSOA || q.Qtype == mdns.TypeANY {
			resp.Answer = append(resp.Answer, s.soa(z, owner))
		}
	case 1:
		switch {
		case rel[0] == nodeLabel:
			exists = true // empty non-terminal
		case rel[0] == "_tcp" || rel[0] == "_udp":
			for _, svc := range z.services {
				exists = exists || svc.carries(rel[0]) // empty non-terminal above the SRV names
			}
		default:
			if svc, ok := z.services[rel[0]]; ok {
				exists = true
				resp.Answer = appendAddrs(resp.Answer, owner, q.Qtype, svc.Addrs)
			}
		}
	case 2:
		switch {
		case rel[1] == nodeLabel:
			if addrs, ok := z.nodes[rel[0]]; ok {
				exists = true
				resp.Answer = appendAddrs(resp.Answer, owner, q.Qtype, addrs)
			}
		case (rel[1] == "_tcp" || rel[1] == "_udp") && strings.HasPrefix(rel[0], "_"):
			if svc, ok := z.services[rel[0][1:]]; ok && svc.carries(rel[1]) {
				exists = true
				if q.Qtype == mdns.TypeSRV || q.Qtype == mdns.TypeANY {
					target := rel[0][1:] + "." + s.domain
					resp.Answer = append(resp.Answer, &mdns.SRV{
						Hdr:    mdns.RR_Header{Name: owner, Rrtype: mdns.TypeSRV, Class: mdns.ClassINET, Ttl: ttl},
						Target: target,
						Port:   svc.Port,
					})
					resp.Extra = appendAddrs(resp.Extra, target, mdns.TypeANY, svc.Addrs)
				}
			}
		}
	}

	switch {
	case !exists:
		resp.Rcode = mdns.RcodeNameError
		resp.Ns = append(resp.Ns, s.soa(z, s.domain))
	case len(resp.Answer) == 0: // NODATA
		resp.Ns = append(resp.Ns, s.soa(z, s.domain))
	}
}

// appendAddrs appends the A (qtype A), AAAA (qtype AAAA) or both (qtype ANY)
// records for addrs.
func appendAddrs(rrs []mdns.RR, owner string, qtype uint16, addrs []netip.Addr) []mdns.RR {
	for _, a := range addrs {
		switch {
		case a.Is4() && (qtype == mdns.TypeA || qtype == mdns.TypeANY):
			rrs = append(rrs, &mdns.A{
				Hdr: mdns.RR_Header{Name: owner, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: ttl},
				A:   a.AsSlice(),
			})
		case a.Is6() && (qtype == mdns.TypeAAAA || qtype == mdns.TypeANY):
			rrs = append(rrs, &mdns.AAAA{
				Hdr:  mdns.RR_Header{Name: owner, Rrtype: mdns.TypeAAAA, Class: mdns.ClassINET, Ttl: ttl},
				AAAA: a.AsSlice(),
			})
		}
	}
	return rrs
}

// soa is the zone's SOA; its minimum (the negative-caching TTL) is as short
// as the positive TTL, since a name may appear with the next network map.
func (s *Server) soa(z *zoneIndex, owner string) *mdns.SOA {
	return &mdns.SOA{
		Hdr:     mdns.RR_Header{Name: owner, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: ttl},
		Ns:      s.domain,
		Mbox:    s.mbox,
		Serial:  z.serial,
		Refresh: 60,
		Retry:   60,
		Expire:  60,
		Minttl:  ttl,
	}
}
