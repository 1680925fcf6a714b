package dns

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// fromWriter is a memWriter whose queries come from src.
type fromWriter struct {
	memWriter
	src netip.Addr
}

func (w *fromWriter) RemoteAddr() net.Addr {
	if w.tcp {
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(w.src, 40000))
	}
	return net.UDPAddrFromAddrPort(netip.AddrPortFrom(w.src, 40000))
}

func meshQuery() *mdns.Msg { return new(mdns.Msg).SetQuestion("web.mesh.internal.", mdns.TypeA) }

// TestOpenResolverRefusedAtStart: --dns 0.0.0.0:N without --dns-allow would
// make an open resolver; New refuses it and says what to do.
func TestOpenResolverRefusedAtStart(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", "[::]:0", ":0", "192.0.2.1:53", "example.com:53"} {
		_, err := New(Config{Addr: addr, Upstreams: []string{}})
		if err == nil || !strings.Contains(err.Error(), "--dns-allow") || !strings.Contains(err.Error(), "open resolver") {
			t.Errorf("New(%q) = %v, want an error naming the open resolver and --dns-allow", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0", "localhost:0", "127.0.0.53:53"} {
		if _, err := New(Config{Addr: addr, Upstreams: []string{}}); err != nil {
			t.Errorf("New(%q): %v", addr, err)
		}
	}
	s := startServer(t, Config{Addr: "0.0.0.0:0", Upstreams: []string{}, Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}})
	s.SetZone(testZone)
	port := s.Addr().Port()
	if r := query(t, "udp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), "web.mesh.internal.", mdns.TypeA); r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("loopback query on 0.0.0.0 with --dns-allow: %v", r)
	}
}

// TestQueryOutsideAllowList: a stranger's query gets nothing over UDP (not
// even an error to reflect) and REFUSED over TCP; an allowed network's and
// loopback's get their answer.
func TestQueryOutsideAllowList(t *testing.T) {
	s, err := New(Config{Addr: "0.0.0.0:53", Upstreams: []string{}, Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}})
	if err != nil {
		t.Fatal(err)
	}
	s.SetZone(testZone)
	for _, tc := range []struct {
		src    string
		tcp    bool
		writes int
		rcode  int
	}{
		{"198.51.100.7", false, 0, 0},
		{"198.51.100.7", true, 1, mdns.RcodeRefused},
		{"2001:db8::1", false, 0, 0},
		{"::ffff:198.51.100.7", false, 0, 0},
		{"10.1.2.3", false, 1, mdns.RcodeSuccess},
		{"::ffff:10.1.2.3", false, 1, mdns.RcodeSuccess},
		{"fd00::5", true, 1, mdns.RcodeSuccess},
		{"127.0.0.1", false, 1, mdns.RcodeSuccess},
		{"::1", true, 1, mdns.RcodeSuccess},
	} {
		w := &fromWriter{memWriter: memWriter{tcp: tc.tcp}, src: netip.MustParseAddr(tc.src)}
		s.ServeDNS(w, meshQuery())
		if w.n != tc.writes || (w.n > 0 && w.msg.Rcode != tc.rcode) {
			t.Errorf("from %s (tcp %v): %d replies %v, want %d with rcode %s", tc.src, tc.tcp, w.n, w.msg, tc.writes, mdns.RcodeToString[tc.rcode])
		}
	}
}

// TestRateLimitPerSource floods from one allowed source: only the burst is
// answered, then the refill rate; another source is unaffected; loopback is
// never limited; and a spray from many sources keeps the table bounded.
func TestRateLimitPerSource(t *testing.T) {
	s, err := New(Config{Addr: "0.0.0.0:53", Upstreams: []string{}, Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}})
	if err != nil {
		t.Fatal(err)
	}
	s.SetZone(testZone)
	now := time.Unix(1e9, 0)
	s.limit.now = func() time.Time { return now }
	answered := func(src string, n int) int {
		got := 0
		for range n {
			w := &fromWriter{src: netip.MustParseAddr(src)}
			s.ServeDNS(w, meshQuery())
			got += w.n
		}
		return got
	}
	if got := answered("10.0.0.5", 1000); got != DefaultRateBurst {
		t.Fatalf("flood of 1000 queries: %d answered, want the burst of %d", got, DefaultRateBurst)
	}
	if got := answered("10.0.0.6", 10); got != 10 {
		t.Fatalf("another source during the flood: %d of 10 answered", got)
	}
	if got := answered("127.0.0.1", 1000); got != 1000 {
		t.Fatalf("loopback: %d of 1000 answered", got)
	}
	now = now.Add(time.Second)
	if got := answered("10.0.0.5", 1000); got != DefaultRateLimit {
		t.Fatalf("flood one second later: %d answered, want the rate of %d", got, DefaultRateLimit)
	}
	// One host rotating through its IPv6 /64 shares one bucket.
	got := 0
	for i := range 1000 {
		src := netip.AddrFrom16([16]byte{0: 0xfd, 15: byte(i), 14: byte(i >> 8)})
		w := &fromWriter{src: src}
		s.ServeDNS(w, meshQuery())
		got += w.n
	}
	if got != DefaultRateBurst {
		t.Fatalf("flood from 1000 addresses of one /64: %d answered, want %d", got, DefaultRateBurst)
	}
	for i := range 3 * maxRateSources {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		s.ServeDNS(&fromWriter{src: src}, meshQuery())
	}
	if n := len(s.limit.buckets); n > maxRateSources {
		t.Fatalf("%d sources tracked, bound is %d", n, maxRateSources)
	}
}
