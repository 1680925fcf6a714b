package stun

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		addr netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddrPort("203.0.113.7:41641")},
		{"ipv6", netip.MustParseAddrPort("[2001:db8::1234:5678]:65535")},
		{"ipv4-mapped is unmapped", netip.MustParseAddrPort("[::ffff:198.51.100.1]:1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var txid [12]byte
			rand.Read(txid[:])
			req := Request(txid)
			if !IsSTUN(req) {
				t.Fatal("IsSTUN(request) = false")
			}
			got, err := ParseRequest(req)
			if err != nil || got != txid {
				t.Fatalf("ParseRequest: %x %v", got, err)
			}
			if _, _, err := ParseResponse(req); err == nil {
				t.Fatal("a request parsed as a response")
			}
			resp := Response(txid, tc.addr)
			if !IsSTUN(resp) {
				t.Fatal("IsSTUN(response) = false")
			}
			rt, addr, err := ParseResponse(resp)
			want := netip.AddrPortFrom(tc.addr.Addr().Unmap(), tc.addr.Port())
			if err != nil || rt != txid || addr != want {
				t.Fatalf("ParseResponse: %x %v %v, want %v", rt, addr, err, want)
			}
			if _, err := ParseRequest(resp); err == nil {
				t.Fatal("a response parsed as a request")
			}
		})
	}
}

// TestKnownVector checks interoperability against the IPv4 response of
// RFC 5769 section 2.2 (its XOR-MAPPED-ADDRESS and FINGERPRINT; the
// MESSAGE-INTEGRITY attribute, which we do not check, is skipped).
func TestKnownVector(t *testing.T) {
	msg := []byte{
		0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42,
		0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
		0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20,
		0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
		0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
		0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7,
		0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
	}
	_, addr, err := ParseResponse(msg)
	if err != nil || addr != netip.MustParseAddrPort("192.0.2.1:32853") {
		t.Fatalf("RFC 5769 vector: %v %v", addr, err)
	}
	msg[len(msg)-1] ^= 1
	if _, _, err := ParseResponse(msg); err == nil {
		t.Fatal("bad FINGERPRINT accepted")
	}
}

func TestMappedAddressFallback(t *testing.T) {
	var txid [12]byte
	b := header(typeBindingSuccess, txid)
	b = binary.BigEndian.AppendUint16(b, attrMappedAddress)
	b = binary.BigEndian.AppendUint16(b, 8)
	b = append(b, 0, familyIPv4, 0x1f, 0x90, 10, 1, 2, 3)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)-headerLen))
	_, addr, err := ParseResponse(b)
	if err != nil || addr != netip.MustParseAddrPort("10.1.2.3:8080") {
		t.Fatalf("MAPPED-ADDRESS: %v %v", addr, err)
	}
}

func TestIsSTUN(t *testing.T) {
	var txid [12]byte
	wgInit := make([]byte, 148)
	wgInit[0] = 1
	// A WireGuard sender index equal to the cookie still fails the length.
	binary.BigEndian.PutUint32(wgInit[4:], magicCookie)
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"request", Request(txid), true},
		{"wireguard initiation", wgInit, false},
		{"wireguard keepalive", append([]byte{4, 0, 0, 0}, make([]byte, 28)...), false},
		{"short", Request(txid)[:19], false},
		{"empty", nil, false},
	} {
		if got := IsSTUN(tc.b); got != tc.want {
			t.Errorf("%s: IsSTUN = %v", tc.name, got)
		}
	}
}

func TestResponder(t *testing.T) {
	s, err := Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := net.UDPAddrFromAddrPort(s.Addr())
	// Garbage first: the server must ignore it and keep serving.
	c.WriteToUDP([]byte("not stun"), dst)
	c.WriteToUDP(Response([12]byte{}, s.Addr()), dst)
	var txid [12]byte
	rand.Read(txid[:])
	buf := make([]byte, 1500)
	// UDP may lose a datagram even on loopback: retry a few times.
	for attempt := 0; ; attempt++ {
		if _, err := c.WriteToUDP(Request(txid), dst); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err != nil {
			if attempt < 5 {
				continue
			}
			t.Fatal(err)
		}
		got, addr, err := ParseResponse(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		want := c.LocalAddr().(*net.UDPAddr).AddrPort()
		if got != txid || addr != want {
			t.Fatalf("response %x %v, want %x %v", got, addr, txid, want)
		}
		break
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s.Close() // idempotent
}

func fuzzSeeds(f *testing.F) {
	var txid [12]byte
	f.Add(Request(txid))
	f.Add(Response(txid, netip.MustParseAddrPort("1.2.3.4:5")))
	f.Add(Response(txid, netip.MustParseAddrPort("[2001:db8::1]:5")))
	f.Add([]byte{})
	f.Add([]byte{1, 0, 0, 0})
	f.Add(append(header(typeBindingSuccess, txid)[:2], 0, 4, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0xff))
}

func FuzzParseResponse(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		txid, addr, err := ParseResponse(b)
		if !bytes.Equal(b, orig) {
			t.Fatal("input modified")
		}
		if err != nil {
			return
		}
		if !IsSTUN(b) || !addr.IsValid() {
			t.Fatalf("accepted %x: %v", b, addr)
		}
		// What parses re-encodes to something that parses the same.
		txid2, addr2, err := ParseResponse(Response(txid, addr))
		if err != nil || txid2 != txid || addr2 != netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()) {
			t.Fatalf("re-encode of %v: %v %v", addr, addr2, err)
		}
	})
}

func FuzzParseRequest(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		txid, err := ParseRequest(b)
		if err != nil {
			return
		}
		if !IsSTUN(b) {
			t.Fatalf("accepted %x", b)
		}
		if got, err := ParseRequest(Request(txid)); err != nil || got != txid {
			t.Fatalf("re-encode: %v", err)
		}
	})
}
