package dns

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/internal/tstest"
)

func TestReverseName(t *testing.T) {
	for _, tt := range []struct {
		name string
		want string // "" when not a reverse name we answer
	}{
		{"7.0.100.127.in-addr.arpa.", "127.100.0.7/32"},
		{"100.127.in-addr.arpa.", "127.100.0.0/16"},
		{"127.in-addr.arpa.", "127.0.0.0/8"},
		{"9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.6.3.7.5.6.d.6.a.7.d.f.ip6.arpa.", "fd7a:6d65:7368::9/128"},
		{"d.f.ip6.arpa.", "fd00::/8"},
		{"1.2.3.4.5.in-addr.arpa.", ""},
		{"07.0.100.127.in-addr.arpa.", ""},
		{"256.0.100.127.in-addr.arpa.", ""},
		{"x.0.100.127.in-addr.arpa.", ""},
		{"..in-addr.arpa.", ""},
		{"10.d.f.ip6.arpa.", ""},
		{"g.f.ip6.arpa.", ""},
		{"example.com.", ""},
	} {
		p, ok := reverseName(tt.name)
		if got := ""; ok {
			got = p.String()
			if got != tt.want {
				t.Errorf("reverseName(%q) = %s, want %q", tt.name, got, tt.want)
			}
		} else if tt.want != "" {
			t.Errorf("reverseName(%q) failed, want %s", tt.name, tt.want)
		}
	}
}

// TestReversePTR: PTR queries for node addresses, service VIPs and proxy
// addresses get the mesh names from the agent itself; an unknown address in
// those ranges is NXDOMAIN, and none of them reaches the upstream, which
// still answers everything else.
func TestReversePTR(t *testing.T) {
	tstest.CheckGoroutines(t)
	var asked atomic.Int32
	up := upstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		asked.Add(1)
		m := new(mdns.Msg).SetReply(r)
		m.Answer = append(m.Answer, &mdns.PTR{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypePTR, Class: mdns.ClassINET, Ttl: 60}, Ptr: "upstream.example."})
		w.WriteMsg(m)
	})
	s := startServer(t, Config{Upstreams: []string{up}})
	z := testZone
	z.Services = map[string]Service{"web": {Addrs: testZone.Services["web"].Addrs, Port: 8080, VIP: netip.MustParseAddr("100.100.0.7")}}
	z.Local = []netip.Prefix{netip.MustParsePrefix("100.96.0.0/14"), netip.MustParsePrefix("fd7a:6d65:7368::/48"),
		netip.MustParsePrefix("100.100.0.0/16"), netip.MustParsePrefix("127.100.0.0/16")}
	s.SetZone(z)

	ptr := func(a string) string { n, _ := mdns.ReverseAddr(a); return n }
	for _, tt := range []struct {
		name, qname string
		rcode       int
		answer      []string
	}{
		{"node IPv4", ptr("100.96.0.2"), mdns.RcodeSuccess, []string{"laptop.node.mesh.internal."}},
		{"node IPv6", ptr("fd7a:6d65:7368::2"), mdns.RcodeSuccess, []string{"laptop.node.mesh.internal."}},
		{"service VIP", ptr("100.100.0.7"), mdns.RcodeSuccess, []string{"web.mesh.internal."}},
		{"proxy address", ptr("127.100.0.7"), mdns.RcodeSuccess, []string{"web.mesh.internal."}},
		{"unknown mesh address", ptr("100.96.0.99"), mdns.RcodeNameError, nil},
		{"unknown proxy address", ptr("127.100.9.9"), mdns.RcodeNameError, nil},
		{"above the addresses", "100.127.in-addr.arpa.", mdns.RcodeSuccess, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := query(t, "udp", s.Addr(), tt.qname, mdns.TypePTR)
			var got []string
			for _, rr := range r.Answer {
				if p, ok := rr.(*mdns.PTR); ok {
					got = append(got, p.Ptr)
				}
			}
			if r.Rcode != tt.rcode || !slices.Equal(got, tt.answer) || !r.Authoritative {
				t.Errorf("PTR %s: %s %v (aa=%v), want %s %v from the agent", tt.qname, mdns.RcodeToString[r.Rcode], got, r.Authoritative, mdns.RcodeToString[tt.rcode], tt.answer)
			}
		})
	}
	if n := asked.Load(); n != 0 {
		t.Fatalf("%d mesh PTR queries leaked to the upstream", n)
	}
	// Addresses outside the mesh are the upstream's.
	r := query(t, "udp", s.Addr(), ptr("192.0.2.1"), mdns.TypePTR)
	if len(r.Answer) != 1 || r.Answer[0].(*mdns.PTR).Ptr != "upstream.example." || asked.Load() != 1 {
		t.Fatalf("PTR 192.0.2.1: %v, want the upstream's answer", r.Answer)
	}
}

// FuzzReverseName: any name parses without panicking, and what parses is
// a prefix whose own reverse name (for a single address) is the name.
func FuzzReverseName(f *testing.F) {
	for _, s := range []string{"7.0.100.127.in-addr.arpa.", "100.127.in-addr.arpa.",
		"9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.6.3.7.5.6.d.6.a.7.d.f.ip6.arpa.", "d.f.ip6.arpa.", "01.in-addr.arpa.", ".in-addr.arpa."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		p, ok := reverseName(name)
		if !ok {
			return
		}
		if !p.IsValid() || p.Masked() != p {
			t.Fatalf("reverseName(%q) = %v, not a masked prefix", name, p)
		}
		if p.IsSingleIP() && !p.Addr().Is4In6() { // ReverseAddr writes those under in-addr.arpa
			if back, err := mdns.ReverseAddr(p.Addr().String()); err != nil || !strings.EqualFold(back, name) {
				t.Fatalf("reverseName(%q) = %v, whose reverse name is %q", name, p, back)
			}
		}
	})
}

// TestSystemResolverUpstreams: when this server is the system resolver
// (resolv.conf names only 127.0.0.1 and it listens on 127.0.0.1:53), names
// outside the mesh go to the upstreams remembered from before, and never
// back to itself; with none remembered it has none (and warns), and an
// explicit upstream that is itself is left out.
func TestSystemResolverUpstreams(t *testing.T) {
	good := upstream(t, exampleAnswer)
	conf := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(conf, []byte("nameserver 127.0.0.1\n"), 0o644)
	self := netip.MustParseAddrPort("127.0.0.1:53")
	pick := func(cfg Config) (*Server, []string) {
		cfg.Logger = tstest.Logger(t)
		s, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		s.addr = self // as if bound there: a test cannot count on port 53
		ups := s.pickUpstreams()
		s.ups.Store(&ups)
		return s, ups
	}

	s, ups := pick(Config{ResolvConf: conf, Remembered: []string{"127.0.0.1:53", good}})
	if !slices.Equal(ups, []string{good}) {
		t.Fatalf("upstreams %q, want only the remembered %s (never itself)", ups, good)
	}
	if got := s.ResolvConfUpstreams(); len(got) != 0 {
		t.Fatalf("ResolvConfUpstreams %q: resolv.conf named only this server", got)
	}
	w := &memWriter{}
	s.ServeDNS(w, new(mdns.Msg).SetQuestion("example.com.", mdns.TypeA))
	if got := rrStrings(w.msg.Answer); !slices.Equal(got, []string{"A 192.0.2.1"}) {
		t.Fatalf("example.com through the remembered upstream: %v", got)
	}

	if _, ups := pick(Config{ResolvConf: conf}); len(ups) != 0 {
		t.Fatalf("upstreams %q with nothing remembered, want none", ups)
	}
	if _, ups := pick(Config{Upstreams: []string{"127.0.0.1:53", good}}); !slices.Equal(ups, []string{good}) {
		t.Fatalf("--dns-upstream naming itself: %q, want only %s", ups, good)
	}
	// What resolv.conf names besides itself is what the agent remembers.
	os.WriteFile(conf, []byte("nameserver 127.0.0.1\nnameserver 192.0.2.53\n"), 0o644)
	if s, ups := pick(Config{ResolvConf: conf, Remembered: []string{good}}); !slices.Equal(ups, []string{"192.0.2.53:53"}) || !slices.Equal(s.ResolvConfUpstreams(), ups) {
		t.Fatalf("upstreams %q, remembered %q; want resolv.conf's 192.0.2.53:53", ups, s.ResolvConfUpstreams())
	}
}
