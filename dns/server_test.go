package dns

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/internal/tstest"
)

func startServer(t *testing.T, cfg Config) *Server {
	t.Helper()
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Logger == nil {
		cfg.Logger = tstest.Logger(t)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func query(t *testing.T, network string, addr netip.AddrPort, name string, qtype uint16) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg).SetQuestion(name, qtype)
	c := &mdns.Client{Net: network, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr.String())
	if err != nil {
		t.Fatalf("%s %s %s: %v", network, name, mdns.Type(qtype), err)
	}
	if r.Id != m.Id {
		t.Fatalf("reply id %d, want %d", r.Id, m.Id)
	}
	return r
}

var testZone = Zone{
	Services: map[string]Service{
		"web": {Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.7"), netip.MustParseAddr("fd7a:6d65:7368::7")}, Port: 8080},
		"db":  {Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.9")}, Port: 5432},
		"ns":  {Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.10")}, Port: 53, Protocol: "udp"},
		"kv":  {Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.11")}, Port: 6000, Protocol: "tcp+udp"},
	},
	Nodes: map[string][]netip.Addr{
		"laptop": {netip.MustParseAddr("100.96.0.2"), netip.MustParseAddr("fd7a:6d65:7368::2")},
	},
}

// rrStrings renders a section as "TYPE value" strings, for comparison.
func rrStrings(rrs []mdns.RR) []string {
	var out []string
	for _, rr := range rrs {
		switch v := rr.(type) {
		case *mdns.A:
			out = append(out, "A "+v.A.String())
		case *mdns.AAAA:
			out = append(out, "AAAA "+v.AAAA.String())
		case *mdns.SRV:
			out = append(out, "SRV "+v.Target+" "+strconv.Itoa(int(v.Port)))
		case *mdns.SOA:
			out = append(out, "SOA "+v.Hdr.Name)
		case *mdns.OPT:
			// transport detail, not content
		default:
			out = append(out, rr.String())
		}
	}
	slices.Sort(out)
	return out
}

func TestLocalAnswers(t *testing.T) {
	tstest.CheckGoroutines(t)
	s := startServer(t, Config{Upstreams: []string{}})
	s.SetZone(testZone)

	tests := []struct {
		name       string
		qname      string
		qtype      uint16
		rcode      int
		answer     []string
		ns         []string
		additional []string
	}{
		{name: "service A", qname: "web.mesh.internal.", qtype: mdns.TypeA, answer: []string{"A 127.100.0.7"}},
		{name: "service AAAA", qname: "web.mesh.internal.", qtype: mdns.TypeAAAA, answer: []string{"AAAA fd7a:6d65:7368::7"}},
		{name: "case insensitive", qname: "WeB.MESH.Internal.", qtype: mdns.TypeA, answer: []string{"A 127.100.0.7"}},
		{name: "NODATA AAAA", qname: "db.mesh.internal.", qtype: mdns.TypeAAAA, ns: []string{"SOA mesh.internal."}},
		{name: "NODATA TXT", qname: "db.mesh.internal.", qtype: mdns.TypeTXT, ns: []string{"SOA mesh.internal."}},
		{name: "SRV", qname: "_web._tcp.mesh.internal.", qtype: mdns.TypeSRV,
			answer:     []string{"SRV web.mesh.internal. 8080"},
			additional: []string{"A 127.100.0.7", "AAAA fd7a:6d65:7368::7"}},
		{name: "SRV case", qname: "_DB._TCP.mesh.internal.", qtype: mdns.TypeSRV,
			answer:     []string{"SRV db.mesh.internal. 5432"},
			additional: []string{"A 127.100.0.9"}},
		{name: "SRV unknown", qname: "_nope._tcp.mesh.internal.", qtype: mdns.TypeSRV, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "SRV udp", qname: "_ns._udp.mesh.internal.", qtype: mdns.TypeSRV,
			answer: []string{"SRV ns.mesh.internal. 53"}, additional: []string{"A 127.100.0.10"}},
		{name: "SRV udp-only has no _tcp", qname: "_ns._tcp.mesh.internal.", qtype: mdns.TypeSRV, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "SRV tcp-only has no _udp", qname: "_web._udp.mesh.internal.", qtype: mdns.TypeSRV, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "SRV tcp+udp _udp", qname: "_kv._udp.mesh.internal.", qtype: mdns.TypeSRV,
			answer: []string{"SRV kv.mesh.internal. 6000"}, additional: []string{"A 127.100.0.11"}},
		{name: "SRV tcp+udp _tcp", qname: "_kv._tcp.mesh.internal.", qtype: mdns.TypeSRV,
			answer: []string{"SRV kv.mesh.internal. 6000"}, additional: []string{"A 127.100.0.11"}},
		{name: "_udp non-terminal", qname: "_udp.mesh.internal.", qtype: mdns.TypeSRV, ns: []string{"SOA mesh.internal."}},
		{name: "node A", qname: "laptop.node.mesh.internal.", qtype: mdns.TypeA, answer: []string{"A 100.96.0.2"}},
		{name: "node AAAA", qname: "LAPTOP.node.mesh.internal.", qtype: mdns.TypeAAAA, answer: []string{"AAAA fd7a:6d65:7368::2"}},
		{name: "node unknown", qname: "desk.node.mesh.internal.", qtype: mdns.TypeA, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "node apex", qname: "node.mesh.internal.", qtype: mdns.TypeA, ns: []string{"SOA mesh.internal."}},
		{name: "apex SOA", qname: "mesh.internal.", qtype: mdns.TypeSOA, answer: []string{"SOA mesh.internal."}},
		{name: "apex A", qname: "mesh.internal.", qtype: mdns.TypeA, ns: []string{"SOA mesh.internal."}},
		{name: "NXDOMAIN", qname: "nope.mesh.internal.", qtype: mdns.TypeA, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "NXDOMAIN deep", qname: "a.web.mesh.internal.", qtype: mdns.TypeA, rcode: mdns.RcodeNameError, ns: []string{"SOA mesh.internal."}},
		{name: "no upstreams", qname: "example.com.", qtype: mdns.TypeA, rcode: mdns.RcodeServerFailure},
	}
	for _, network := range []string{"udp", "tcp"} {
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				r := query(t, network, s.Addr(), tt.qname, tt.qtype)
				if r.Rcode != tt.rcode {
					t.Errorf("rcode %s, want %s", mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tt.rcode])
				}
				if tt.rcode != mdns.RcodeServerFailure && !r.Authoritative {
					t.Error("AA bit not set")
				}
				if got := rrStrings(r.Answer); !slices.Equal(got, tt.answer) {
					t.Errorf("answer %q, want %q", got, tt.answer)
				}
				if got := rrStrings(r.Ns); !slices.Equal(got, tt.ns) {
					t.Errorf("authority %q, want %q", got, tt.ns)
				}
				if got := rrStrings(r.Extra); !slices.Equal(got, tt.additional) {
					t.Errorf("additional %q, want %q", got, tt.additional)
				}
				for _, rr := range r.Answer {
					if rr.Header().Ttl > 60 {
						t.Errorf("TTL %d too long for a mesh name", rr.Header().Ttl)
					}
				}
			})
		}
	}
}

func TestSetZoneSwap(t *testing.T) {
	tstest.CheckGoroutines(t)
	s := startServer(t, Config{Upstreams: []string{}})
	if r := query(t, "udp", s.Addr(), "web.mesh.internal.", mdns.TypeA); r.Rcode != mdns.RcodeNameError {
		t.Fatalf("before SetZone: rcode %s, want NXDOMAIN", mdns.RcodeToString[r.Rcode])
	}
	s.SetZone(testZone)
	if got := rrStrings(query(t, "udp", s.Addr(), "web.mesh.internal.", mdns.TypeA).Answer); !slices.Equal(got, []string{"A 127.100.0.7"}) {
		t.Fatalf("after SetZone: %q", got)
	}
	s.SetZone(Zone{Services: map[string]Service{"web": {Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.8")}, Port: 80}}})
	if got := rrStrings(query(t, "tcp", s.Addr(), "web.mesh.internal.", mdns.TypeA).Answer); !slices.Equal(got, []string{"A 127.100.0.8"}) {
		t.Fatalf("after second SetZone: %q", got)
	}
	if r := query(t, "udp", s.Addr(), "laptop.node.mesh.internal.", mdns.TypeA); r.Rcode != mdns.RcodeNameError {
		t.Fatalf("removed node: rcode %s, want NXDOMAIN", mdns.RcodeToString[r.Rcode])
	}
}

func TestCustomDomain(t *testing.T) {
	s := startServer(t, Config{Domain: "Corp.Example", Upstreams: []string{}})
	s.SetZone(testZone)
	if got := rrStrings(query(t, "udp", s.Addr(), "db.corp.example.", mdns.TypeA).Answer); !slices.Equal(got, []string{"A 127.100.0.9"}) {
		t.Fatalf("got %q", got)
	}
	if r := query(t, "udp", s.Addr(), "db.mesh.internal.", mdns.TypeA); r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("other domain: rcode %s, want SERVFAIL (not ours, no upstream)", mdns.RcodeToString[r.Rcode])
	}
}

// upstream starts a miekg server on 127.0.0.1:0 (UDP and TCP) with handler h.
func upstream(t *testing.T, h mdns.HandlerFunc) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		t.Skipf("tcp port of upstream taken: %v", err)
	}
	for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ActivateAndServe()
		}()
		<-started
		t.Cleanup(func() {
			srv.Shutdown()
			<-done
		})
	}
	return pc.LocalAddr().String()
}

func exampleAnswer(w mdns.ResponseWriter, r *mdns.Msg) {
	m := new(mdns.Msg).SetReply(r)
	if r.Question[0].Name == "example.com." && r.Question[0].Qtype == mdns.TypeA {
		m.Answer = append(m.Answer, &mdns.A{
			Hdr: mdns.RR_Header{Name: "example.com.", Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 300},
			A:   net.ParseIP("192.0.2.1"),
		})
	} else {
		m.Rcode = mdns.RcodeNameError
	}
	w.WriteMsg(m)
}

// silent is a resolver that never answers: a bound UDP socket nobody reads.
func silent(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

func TestForward(t *testing.T) {
	tstest.CheckGoroutines(t)
	good := upstream(t, exampleAnswer)
	// truncating answers TC over UDP and in full over TCP.
	truncating := upstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			m := new(mdns.Msg).SetReply(r)
			m.Truncated = true
			w.WriteMsg(m)
			return
		}
		exampleAnswer(w, r)
	})
	servfail := upstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		w.WriteMsg(new(mdns.Msg).SetRcode(r, mdns.RcodeServerFailure))
	})
	const timeout = 300 * time.Millisecond

	tests := []struct {
		name      string
		upstreams []string
		qname     string
		rcode     int
		answer    []string
	}{
		{name: "answer", upstreams: []string{good}, qname: "example.com.", answer: []string{"A 192.0.2.1"}},
		{name: "NXDOMAIN passes through", upstreams: []string{good}, qname: "nope.example.", rcode: mdns.RcodeNameError},
		{name: "TCP retry when truncated", upstreams: []string{truncating}, qname: "example.com.", answer: []string{"A 192.0.2.1"}},
		{name: "silent then good", upstreams: []string{silent(t), good}, qname: "example.com.", answer: []string{"A 192.0.2.1"}},
		{name: "SERVFAIL then good", upstreams: []string{servfail, good}, qname: "example.com.", answer: []string{"A 192.0.2.1"}},
		{name: "silent", upstreams: []string{silent(t)}, qname: "example.com.", rcode: mdns.RcodeServerFailure},
		{name: "refused connection", upstreams: []string{"127.0.0.1:1"}, qname: "example.com.", rcode: mdns.RcodeServerFailure},
	}
	for _, network := range []string{"udp", "tcp"} {
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				s := startServer(t, Config{Upstreams: tt.upstreams, UpstreamTimeout: timeout})
				start := time.Now()
				r := query(t, network, s.Addr(), tt.qname, mdns.TypeA)
				if el := time.Since(start); el > time.Duration(len(tt.upstreams))*timeout+2*time.Second {
					t.Errorf("took %v with timeout %v per upstream", el, timeout)
				}
				if r.Rcode != tt.rcode {
					t.Errorf("rcode %s, want %s", mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tt.rcode])
				}
				if got := rrStrings(r.Answer); !slices.Equal(got, tt.answer) {
					t.Errorf("answer %q, want %q", got, tt.answer)
				}
			})
		}
	}
}

func TestForwardEDNS(t *testing.T) {
	tstest.CheckGoroutines(t)
	var sawOpt atomic.Bool
	up := upstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		sawOpt.Store(r.IsEdns0() != nil)
		m := new(mdns.Msg).SetReply(r)
		// A large answer: 60 TXT records of ~100 bytes.
		for i := range 60 {
			m.Answer = append(m.Answer, &mdns.TXT{
				Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: 60},
				Txt: []string{strings.Repeat("x", 90) + strconv.Itoa(i)},
			})
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := mdns.MinMsgSize
			if o := r.IsEdns0(); o != nil {
				size = int(o.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	s := startServer(t, Config{Upstreams: []string{up}, UpstreamTimeout: 2 * time.Second})

	// No EDNS from the client over UDP: no OPT back, at most 512 bytes, TC set.
	m := new(mdns.Msg).SetQuestion("big.example.", mdns.TypeTXT)
	c := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if !sawOpt.Load() {
		t.Error("upstream query had no EDNS0")
	}
	if r.IsEdns0() != nil {
		t.Error("OPT in reply to a query without one")
	}
	r.Compress = true // as it was on the wire
	if !r.Truncated || r.Len() > mdns.MinMsgSize {
		t.Errorf("truncated=%v len=%d, want TC within 512", r.Truncated, r.Len())
	}

	// EDNS from the client: OPT back, size within what it offered.
	m.SetEdns0(1200, false)
	r, _, err = c.Exchange(m, s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if r.IsEdns0() == nil {
		t.Error("no OPT in reply to an EDNS query")
	}
	r.Compress = true
	if !r.Truncated || r.Len() > 1200 {
		t.Errorf("truncated=%v len=%d, want TC within 1200", r.Truncated, r.Len())
	}

	// Over TCP it all comes through.
	c.Net = "tcp"
	r, _, err = c.Exchange(m, s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Truncated || len(r.Answer) != 60 {
		t.Errorf("tcp: truncated=%v answers=%d, want 60", r.Truncated, len(r.Answer))
	}
}

func TestMalformed(t *testing.T) {
	s, err := New(Config{Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	q := func(edit func(m *mdns.Msg)) *mdns.Msg {
		m := new(mdns.Msg).SetQuestion("web.mesh.internal.", mdns.TypeA)
		edit(m)
		w := &memWriter{}
		s.ServeDNS(w, m)
		if w.n != 1 {
			t.Fatalf("%d replies written", w.n)
		}
		return w.msg
	}
	tests := []struct {
		name  string
		edit  func(m *mdns.Msg)
		rcode int
	}{
		{"no question", func(m *mdns.Msg) { m.Question = nil }, mdns.RcodeFormatError},
		{"two questions", func(m *mdns.Msg) { m.Question = append(m.Question, m.Question[0]) }, mdns.RcodeFormatError},
		{"notify", func(m *mdns.Msg) { m.Opcode = mdns.OpcodeNotify }, mdns.RcodeNotImplemented},
		{"update", func(m *mdns.Msg) { m.Opcode = mdns.OpcodeUpdate }, mdns.RcodeNotImplemented},
		{"response", func(m *mdns.Msg) { m.Response = true }, mdns.RcodeFormatError},
		{"EDNS version 1", func(m *mdns.Msg) { m.SetEdns0(1232, false); m.IsEdns0().SetVersion(1) }, mdns.RcodeBadVers},
		{"class CH", func(m *mdns.Msg) { m.Question[0].Qclass = mdns.ClassCHAOS }, mdns.RcodeRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := q(tt.edit)
			if r.Rcode != tt.rcode {
				t.Errorf("rcode %s, want %s", mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tt.rcode])
			}
		})
	}
}

func TestPortInUse(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	addr := pc.LocalAddr().String()
	s, err := New(Config{Addr: addr, Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.Start()
	if err == nil {
		t.Fatal("Start on a port in use succeeded")
	}
	for _, want := range []string{addr, "--dns", "in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestCloseIdempotent(t *testing.T) {
	tstest.CheckGoroutines(t)
	s, err := New(Config{Addr: "127.0.0.1:0", Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	addr := s.Addr()
	for range 2 {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
	// The port is free again.
	pc, err := net.ListenPacket("udp", addr.String())
	if err != nil {
		t.Fatalf("port not released: %v", err)
	}
	pc.Close()
}

// Close must not wait out the upstream timeout of queries in flight.
func TestCloseDuringForward(t *testing.T) {
	tstest.CheckGoroutines(t)
	// An upstream that receives the query and never answers.
	up, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	received := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 2048)
		if _, _, err := up.ReadFrom(buf); err == nil {
			close(received)
		}
	}()
	t.Cleanup(func() { up.Close(); <-readerDone })

	s, err := New(Config{Addr: "127.0.0.1:0", Upstreams: []string{up.LocalAddr().String()}, UpstreamTimeout: time.Minute, Logger: tstest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("udp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := new(mdns.Msg).SetQuestion("example.com.", mdns.TypeA).Pack()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	select {
	case <-received:
	case <-time.After(10 * time.Second):
		t.Fatal("query never reached the upstream")
	}
	start := time.Now()
	s.Close()
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("Close took %v with a forward in flight", el)
	}
	// The client still got its answer: SERVFAIL.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no reply after Close: %v", err)
	}
	r := new(mdns.Msg)
	if err := r.Unpack(buf[:n]); err != nil || r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("reply %v, %v; want SERVFAIL", r, err)
	}
}

func TestResolvConf(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(path, []byte("# test\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver ::1\nsearch example\n"), 0o644)
	tests := []struct {
		self netip.AddrPort
		want []string
	}{
		{netip.MustParseAddrPort("127.0.0.1:53"), []string{"192.0.2.53:53", "[::1]:53"}},
		{netip.MustParseAddrPort("0.0.0.0:53"), []string{"192.0.2.53:53"}},
		{netip.MustParseAddrPort("127.0.0.1:5353"), []string{"127.0.0.1:53", "192.0.2.53:53", "[::1]:53"}},
	}
	for _, tt := range tests {
		got, err := upstreamsFromResolvConf(path, tt.self)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("self %v: %q, want %q", tt.self, got, tt.want)
		}
	}
	if got, err := upstreamsFromResolvConf(filepath.Join(t.TempDir(), "missing"), tests[0].self); err == nil || len(got) != 0 {
		t.Errorf("missing file: %q, %v", got, err)
	}

	// A server with Upstreams nil takes them from the file at Start.
	os.WriteFile(path, []byte("nameserver 127.0.0.1\noptions ndots:1\n"), 0o644)
	s := startServer(t, Config{ResolvConf: path})
	if got := *s.ups.Load(); !slices.Equal(got, []string{"127.0.0.1:53"}) {
		t.Errorf("upstreams %q", got)
	}
}

func TestNormalizeUpstreams(t *testing.T) {
	got, err := normalizeUpstreams([]string{"1.1.1.1", "1.1.1.1:5353", "fd00::1", "[fd00::1]:53", "dns.example"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"1.1.1.1:53", "1.1.1.1:5353", "[fd00::1]:53", "[fd00::1]:53", "dns.example:53"}
	if !slices.Equal(got, want) {
		t.Errorf("%q, want %q", got, want)
	}
	for _, bad := range []string{"", "1.1.1.1:0", "1.1.1.1:x", ":53"} {
		if _, err := normalizeUpstreams([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
