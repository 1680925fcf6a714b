package dns

import (
	"net"
	"net/netip"
	"testing"

	mdns "github.com/miekg/dns"
)

// memWriter is an in-memory mdns.ResponseWriter: it packs what is written,
// as the real one does, and keeps the last message.
type memWriter struct {
	tcp bool
	n   int
	msg *mdns.Msg
	len int // packed size of msg
	err error
}

func (w *memWriter) LocalAddr() net.Addr {
	if w.tcp {
		return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
	}
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
}

func (w *memWriter) RemoteAddr() net.Addr {
	if w.tcp {
		return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
	}
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}

func (w *memWriter) WriteMsg(m *mdns.Msg) error {
	w.n++
	b, err := m.Pack()
	if err != nil {
		w.err = err
		return err
	}
	w.msg, w.len = m, len(b)
	_, err = w.Write(b)
	return err
}

func (w *memWriter) Write(b []byte) (int, error) {
	if !w.tcp && len(b) > 65535 {
		return 0, &net.OpError{Op: "write", Err: net.UnknownNetworkError("too big")}
	}
	return len(b), nil
}

func (w *memWriter) Close() error        { return nil }
func (w *memWriter) TsigStatus() error   { return nil }
func (w *memWriter) TsigTimersOnly(bool) {}
func (w *memWriter) Hijack()             {}
func (w *memWriter) Network() string {
	if w.tcp {
		return "tcp"
	}
	return "udp"
}

func FuzzServeDNS(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{
		{"web.mesh.internal.", mdns.TypeA},
		{"_web._tcp.mesh.internal.", mdns.TypeSRV},
		{"laptop.node.mesh.internal.", mdns.TypeAAAA},
		{"mesh.internal.", mdns.TypeANY},
		{"x.y.z.mesh.internal.", mdns.TypeA},
		{"7.0.100.127.in-addr.arpa.", mdns.TypePTR},
		{"2.0.96.100.in-addr.arpa.", mdns.TypeANY},
	} {
		m := new(mdns.Msg).SetQuestion(q.name, q.qtype)
		b, _ := m.Pack()
		f.Add(b, false)
		m.SetEdns0(4096, true)
		b, _ = m.Pack()
		f.Add(b, true)
	}
	f.Add([]byte{0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, false)

	// No upstreams: fuzzing must not touch the network.
	s, err := New(Config{Upstreams: []string{}})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	zone := testZone
	zone.Services = map[string]Service{"web": testZone.Services["web"], "db": testZone.Services["db"]}
	// Many addresses so that answers need truncating.
	var many []netip.Addr
	for i := range 200 {
		many = append(many, netip.AddrFrom4([4]byte{127, 100, 1, byte(i)}), netip.AddrFrom16([16]byte{0xfd, 15: byte(i)}))
	}
	zone.Services["big"] = Service{Addrs: many, Port: 1}
	zone.Local = []netip.Prefix{netip.MustParsePrefix("100.96.0.0/14"), netip.MustParsePrefix("127.100.0.0/16"), netip.MustParsePrefix("fd00::/8")}
	s.SetZone(zone)

	f.Fuzz(func(t *testing.T, b []byte, tcp bool) {
		m := new(mdns.Msg)
		if err := m.Unpack(b); err != nil {
			return
		}
		w := &memWriter{tcp: tcp}
		s.ServeDNS(w, m)
		if w.err != nil {
			t.Fatalf("reply does not pack: %v\nquery: %v", w.err, m)
		}
		if w.n != 1 {
			t.Fatalf("%d replies written", w.n)
		}
		if w.msg.Id != m.Id || !w.msg.Response {
			t.Fatalf("reply id %d response=%v, query id %d", w.msg.Id, w.msg.Response, m.Id)
		}
		if !tcp {
			size := mdns.MinMsgSize
			if o := m.IsEdns0(); o != nil {
				size = ednsSize
			}
			if l := w.len; l > size {
				t.Fatalf("udp reply of %d bytes, limit %d", l, size)
			}
		}
	})
}
