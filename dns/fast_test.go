package dns

import (
	"bytes"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/internal/tstest"
)

// byteWriter is a UDP mdns.ResponseWriter from loopback that keeps the
// bytes of the reply, packed as miekg/dns's own writer packs them.
type byteWriter struct {
	memWriter
	b []byte
}

func (w *byteWriter) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	w.n++
	w.b = b
	return nil
}

// fastZone is testZone with reverse ranges and a service whose answers are
// too large to prepare.
func fastServer(t testing.TB, ups []string) *Server {
	s, err := New(Config{Upstreams: ups})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	z := testZone
	z.Services = map[string]Service{}
	for k, v := range testZone.Services {
		z.Services[k] = v
	}
	z.Services["web"] = Service{Addrs: testZone.Services["web"].Addrs, Port: 8080, VIP: netip.MustParseAddr("100.100.0.7")}
	var many []netip.Addr
	for i := range 60 {
		many = append(many, netip.AddrFrom4([4]byte{127, 100, 1, byte(i)}))
	}
	z.Services["big"] = Service{Addrs: many, Port: 1}
	z.Local = []netip.Prefix{netip.MustParsePrefix("100.96.0.0/12"), netip.MustParsePrefix("100.100.0.0/16"),
		netip.MustParsePrefix("127.100.0.0/16"), netip.MustParsePrefix("fd7a:6d65:7368::/48")}
	s.SetZone(z)
	return s
}

// slowReply is what ServeDNS (the ordinary path) sends to the UDP query q.
func slowReply(t testing.TB, s *Server, q []byte) []byte {
	m := new(mdns.Msg)
	if err := m.Unpack(q); err != nil {
		return nil
	}
	w := &byteWriter{}
	s.ServeDNS(w, m)
	if w.n != 1 {
		t.Fatalf("ServeDNS wrote %d replies", w.n)
	}
	return w.b
}

func packQuery(t testing.TB, name string, qtype uint16, id uint16, rd, cd bool, edns func(*mdns.Msg)) []byte {
	m := new(mdns.Msg).SetQuestion(name, qtype)
	m.Id, m.RecursionDesired, m.CheckingDisabled = id, rd, cd
	if edns != nil {
		edns(m)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestFastMatchesSlow: every reply the fast path sends is byte for byte
// the ordinary path's, and the common questions do take the fast path.
func TestFastMatchesSlow(t *testing.T) {
	cookie := func(m *mdns.Msg) {
		m.SetEdns0(4096, true)
		o := m.IsEdns0()
		o.Option = append(o.Option, &mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0102030405060708"})
	}
	tests := []struct {
		name  string
		qname string
		qtype uint16
		edns  func(*mdns.Msg)
		fast  bool // the fast path must answer
	}{
		{"A", "web.mesh.internal.", mdns.TypeA, nil, true},
		{"AAAA", "web.mesh.internal.", mdns.TypeAAAA, nil, true},
		{"ANY", "web.mesh.internal.", mdns.TypeANY, nil, true},
		{"A mixed case", "WeB.MESH.internal.", mdns.TypeA, nil, true},
		{"AAAA mixed case", "wEb.mesh.INTERNAL.", mdns.TypeAAAA, nil, true},
		{"NODATA AAAA", "db.mesh.internal.", mdns.TypeAAAA, nil, true},
		{"NODATA AAAA mixed case", "DB.mesh.internal.", mdns.TypeAAAA, nil, true},
		{"NODATA TXT", "db.mesh.internal.", mdns.TypeTXT, nil, false},
		{"SRV", "_web._tcp.mesh.internal.", mdns.TypeSRV, nil, true},
		{"SRV udp", "_ns._udp.mesh.internal.", mdns.TypeSRV, nil, true},
		{"SRV mixed case", "_WEB._tcp.Mesh.internal.", mdns.TypeSRV, nil, true},
		{"node A", "laptop.node.mesh.internal.", mdns.TypeA, nil, true},
		{"node AAAA mixed", "LAPTOP.Node.mesh.internal.", mdns.TypeAAAA, nil, true},
		{"PTR node", "2.0.96.100.in-addr.arpa.", mdns.TypePTR, nil, true},
		{"PTR VIP", "7.0.100.100.in-addr.arpa.", mdns.TypePTR, nil, true},
		{"PTR proxy", "7.0.100.127.in-addr.arpa.", mdns.TypePTR, nil, true},
		{"PTR v6", "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.6.3.7.5.6.d.6.a.7.d.f.ip6.arpa.", mdns.TypePTR, nil, true},
		{"PTR mixed case", "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.6.3.7.5.6.D.6.A.7.D.F.IP6.ARPA.", mdns.TypePTR, nil, true},
		{"PTR unknown", "9.9.96.100.in-addr.arpa.", mdns.TypePTR, nil, false},
		{"NXDOMAIN", "nope.mesh.internal.", mdns.TypeA, nil, false},
		{"NXDOMAIN deep", "a.web.mesh.internal.", mdns.TypeA, nil, false},
		{"too big", "big.mesh.internal.", mdns.TypeA, nil, false},
		{"outside", "example.com.", mdns.TypeA, nil, false},
		{"EDNS0", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(1232, false) }, true},
		{"EDNS0 DO", "web.mesh.internal.", mdns.TypeAAAA, func(m *mdns.Msg) { m.SetEdns0(4096, true) }, true},
		{"EDNS0 small", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(100, false) }, true},
		{"EDNS0 cookie", "_web._tcp.mesh.internal.", mdns.TypeSRV, cookie, true},
		{"EDNS0 mixed case", "WEB.mesh.internal.", mdns.TypeA, cookie, true},
		{"EDNS0 version 1", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(1232, false); m.IsEdns0().SetVersion(1) }, false},
		{"EDNS0 subnet", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) {
			m.SetEdns0(1232, false)
			m.IsEdns0().Option = append(m.IsEdns0().Option, &mdns.EDNS0_SUBNET{Code: mdns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(10, 0, 0, 0)})
		}, false},
		{"two OPT", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.SetEdns0(1232, false); m.Extra = append(m.Extra, m.Extra[0]) }, false},
		{"class CH", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.Question[0].Qclass = mdns.ClassCHAOS }, false},
		{"opcode", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.Opcode = mdns.OpcodeNotify }, false},
		{"response", "web.mesh.internal.", mdns.TypeA, func(m *mdns.Msg) { m.Response = true }, false},
	}
	for _, ups := range [][]string{{}, {"127.0.0.1:1"}} { // RA clear, then set
		s := fastServer(t, ups)
		z := s.zone.Load()
		for _, tt := range tests {
			for _, bits := range []struct{ rd, cd bool }{{true, false}, {false, false}, {true, true}} {
				t.Run(tt.name, func(t *testing.T) {
					q := packQuery(t, tt.qname, tt.qtype, 0xbeef, bits.rd, bits.cd, tt.edns)
					got, ok := fastReply(z, q, nil, len(ups) > 0)
					if ok != tt.fast {
						t.Fatalf("fast path answered: %v, want %v", ok, tt.fast)
					}
					if !ok {
						return
					}
					want := slowReply(t, s, q)
					if !bytes.Equal(got, want) {
						g, w := new(mdns.Msg), new(mdns.Msg)
						g.Unpack(got)
						w.Unpack(want)
						t.Fatalf("fast reply differs\nfast:\n%v\nslow:\n%v\n% x\n% x", g, w, got, want)
					}
				})
			}
		}
	}
}

// TestFastOverUDP: the prepared answers reach a real client over a real
// socket, with its ID, and follow a new zone at once.
func TestFastOverUDP(t *testing.T) {
	tstest.CheckGoroutines(t)
	s := startServer(t, Config{Upstreams: []string{}, Logger: nil})
	s.SetZone(testZone)
	c := &mdns.Client{Timeout: 5 * time.Second}
	for i := range 50 {
		m := new(mdns.Msg).SetQuestion("Web.mesh.internal.", mdns.TypeA)
		if i%2 == 1 {
			m.SetEdns0(1232, false)
		}
		r, _, err := c.Exchange(m, s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if r.Id != m.Id || r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].Header().Name != "Web.mesh.internal." {
			t.Fatalf("reply %v", r)
		}
		if (r.IsEdns0() != nil) != (i%2 == 1) {
			t.Fatalf("OPT in reply %v, in query %v", r.IsEdns0() != nil, i%2 == 1)
		}
	}
	s.SetZone(Zone{})
	r, _, err := c.Exchange(new(mdns.Msg).SetQuestion("web.mesh.internal.", mdns.TypeA), s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Rcode != mdns.RcodeNameError {
		t.Fatalf("after the service left: %v", r)
	}
}

// FuzzFastPath: whatever the fast path answers, the ordinary path answers
// the same bytes.
func FuzzFastPath(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{
		{"web.mesh.internal.", mdns.TypeA},
		{"WEB.mesh.internal.", mdns.TypeAAAA},
		{"_web._tcp.mesh.internal.", mdns.TypeSRV},
		{"laptop.node.mesh.internal.", mdns.TypeAAAA},
		{"2.0.96.100.in-addr.arpa.", mdns.TypePTR},
	} {
		m := new(mdns.Msg).SetQuestion(q.name, q.qtype)
		b, _ := m.Pack()
		f.Add(b)
		m.SetEdns0(4096, true)
		b, _ = m.Pack()
		f.Add(b)
	}
	s := fastServer(f, []string{})
	z := s.zone.Load()
	f.Fuzz(func(t *testing.T, q []byte) {
		got, ok := fastReply(z, q, nil, false)
		if !ok {
			return
		}
		if want := slowReply(t, s, q); !bytes.Equal(got, want) {
			t.Fatalf("fast reply differs from ServeDNS's\nquery % x\nfast  % x\nslow  % x", q, got, want)
		}
	})
}

func BenchmarkFastReply(b *testing.B) {
	s := fastServer(b, []string{})
	z := s.zone.Load()
	q := packQuery(b, "web.mesh.internal.", mdns.TypeA, 1, true, false, nil)
	out := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		var ok bool
		if out, ok = fastReply(z, q, out, false); !ok {
			b.Fatal("not prepared")
		}
	}
}

func BenchmarkSlowReply(b *testing.B) {
	s := fastServer(b, []string{})
	q := packQuery(b, "web.mesh.internal.", mdns.TypeA, 1, true, false, nil)
	b.ReportAllocs()
	for b.Loop() {
		slowReply(b, s, q)
	}
}

// TestSecondServerSamePort: the SO_REUSEPORT sockets of one server do not
// let a second server (another agent) share its port.
func TestSecondServerSamePort(t *testing.T) {
	tstest.CheckGoroutines(t)
	a := startServer(t, Config{Upstreams: []string{}})
	b, err := New(Config{Addr: a.Addr().String(), Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Start(); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("second server on %s: %v, want already in use", a.Addr(), err)
	}
}
