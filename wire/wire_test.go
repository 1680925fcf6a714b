package wire

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func goodToken() JoinToken {
	sum := sha256.Sum256([]byte("cert"))
	return JoinToken{URL: "https://10.0.0.1:8443", Fingerprint: hex.EncodeToString(sum[:]), ID: "tok1", Secret: strings.Repeat("s", 43), Expires: 1900000000}
}

func TestTokenRoundTrip(t *testing.T) {
	tok := goodToken()
	s := tok.String()
	if !strings.HasPrefix(s, TokenPrefix) {
		t.Fatalf("token %q lacks prefix", s)
	}
	got, err := ParseToken("  " + s + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, tok) {
		t.Fatalf("round trip: got %+v, want %+v", got, tok)
	}
	// Version 11: more coordinator URLs travel too.
	tok.URLs = []string{"https://10.0.0.2:8443", "https://c3.example:8443"}
	if got, err := ParseToken(tok.String()); err != nil || !reflect.DeepEqual(got, tok) {
		t.Fatalf("round trip with URLs: got %+v %v, want %+v", got, err, tok)
	}
}

func TestParseTokenErrors(t *testing.T) {
	tok := goodToken()
	mod := func(f func(*JoinToken)) string { t := tok; f(&t); return t.String() }
	cases := []struct{ name, in, want string }{
		{"empty", "", "must start with"},
		{"other prefix", "tskey-abc", "must start with"},
		{"not base64", TokenPrefix + "!!!", "incomplete or damaged"},
		{"bad second URL", mod(func(t *JoinToken) { t.URLs = []string{"http://10.0.0.2:8443"} }), `coordinator URL "http://10.0.0.2:8443" is not https://host:port`},
		{"truncated", tok.String()[:30], "incomplete or damaged"},
		{"http url", mod(func(t *JoinToken) { t.URL = "http://10.0.0.1:8443" }), "not https"},
		{"no host", mod(func(t *JoinToken) { t.URL = "https://" }), "not https"},
		{"short fingerprint", mod(func(t *JoinToken) { t.Fingerprint = "abcd" }), "fingerprint"},
		{"short secret", mod(func(t *JoinToken) { t.Secret = "x" }), "secret"},
		{"no id", mod(func(t *JoinToken) { t.ID = "" }), "id"},
		{"too long", TokenPrefix + strings.Repeat("A", 5000), "too long"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseToken(tc.in)
			if !errors.Is(err, ErrTokenMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseToken: %v, want ErrTokenMalformed mentioning %q", err, tc.want)
			}
		})
	}
}

func TestFingerprintMatches(t *testing.T) {
	der := []byte("certificate bytes")
	fp := CertFingerprint(der)
	if !FingerprintMatches(der, fp) || !FingerprintMatches(der, strings.ToUpper(fp)) {
		t.Fatal("own fingerprint does not match")
	}
	if FingerprintMatches([]byte("other"), fp) {
		t.Fatal("other certificate matches")
	}
}

func TestValidName(t *testing.T) {
	for _, ok := range []string{"web", "db-1", "a", strings.Repeat("a", 63)} {
		if err := ValidName(ok); err != nil {
			t.Errorf("ValidName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-web", "web-", "Web", "w b", "w.b", "ü", strings.Repeat("a", 64)} {
		if ValidName(bad) == nil {
			t.Errorf("ValidName(%q) accepted", bad)
		}
	}
}

func TestLocalProxyAddr(t *testing.T) {
	if got := LocalProxyAddr(netip.MustParseAddr("100.100.3.7")); got != netip.MustParseAddr("127.100.3.7") {
		t.Fatalf("got %v", got)
	}
	if LocalProxyAddr(netip.MustParseAddr("fd00::1")).IsValid() {
		t.Fatal("IPv6 VIP mapped")
	}
}

func FuzzParseToken(f *testing.F) {
	f.Add(goodToken().String())
	f.Add(TokenPrefix)
	f.Add(TokenPrefix + "e30")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseToken(s)
		if err != nil {
			if !errors.Is(err, ErrTokenMalformed) {
				t.Fatalf("error not ErrTokenMalformed: %v", err)
			}
			return
		}
		// Whatever parses must survive a round trip.
		again, err := ParseToken(tok.String())
		if err != nil || again.String() != tok.String() {
			t.Fatalf("round trip of %+v: %+v, %v", tok, again, err)
		}
	})
}

// FuzzMapResponse feeds arbitrary bytes to the decoder the agent uses on the
// map stream and checks that whatever decodes re-encodes and decodes the same.
func FuzzMapResponse(f *testing.F) {
	full, _ := json.Marshal(MapResponse{Seq: 1, Full: &NetworkMap{
		Self:     Node{ID: 1, Name: "a", Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.1/32")}},
		Peers:    []Node{{ID: 2, Name: "b", Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.2:51820")}}},
		Services: []Service{{Name: "web", VIP: netip.MustParseAddr("100.100.0.1"), Port: 80, Providers: []Provider{{Node: 2, Port: 80}}, AllowedNodes: []string{"*"}}},
	}})
	f.Add(full)
	f.Add([]byte(`{"seq":2,"peers_removed":[2],"services_removed":["web"]}`))
	f.Add([]byte(`{"full":{"self":{"addresses":["garbage"]}}}`))
	f.Add([]byte(`{"seq":3,"services_changed":[{"name":"web","http":{"timeout_ms":5000,"retries":{"attempts":2,"on":["503"]},"outlier":{"consecutive_5xx":3},"routes":[{"headers":[{"name":"X-Canary","regex":"(a|b"}],"version":"v2"}]}}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var m MapResponse
		if json.Unmarshal(b, &m) != nil {
			return
		}
		_ = m.IsKeepAlive()
		// The agent checks what a service's HTTP configuration says
		// before it compiles its routes: no input may panic there.
		for _, s := range m.ServicesChanged {
			if s.HTTP != nil {
				_ = s.HTTP.Check()
			}
		}
		// Applying any message to any map must not panic.
		var nm NetworkMap
		nm.Apply(&MapResponse{Full: &NetworkMap{Peers: []Node{{ID: 2}}, Services: []Service{{Name: "web"}}}})
		nm.Apply(&m)
		out, err := json.Marshal(&m)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		var m2 MapResponse
		if err := json.Unmarshal(out, &m2); err != nil {
			t.Fatalf("decode of own encoding: %v\n%s", err, out)
		}
		out2, _ := json.Marshal(&m2)
		if !bytes.Equal(out, out2) {
			t.Fatalf("not stable:\n%s\n%s", out, out2)
		}
	})
}

func TestApply(t *testing.T) {
	n := func(id NodeID, name string) Node { return Node{ID: id, Name: name} }
	var nm NetworkMap
	nm.Apply(&MapResponse{Full: &NetworkMap{Peers: []Node{n(1, "a"), n(2, "b")}, Services: []Service{{Name: "web", Port: 80}}}})
	nm.Apply(&MapResponse{}) // keep-alive
	nm.Apply(&MapResponse{PeersRemoved: []NodeID{1}, PeersChanged: []Node{n(2, "b2"), n(3, "c")},
		ServicesRemoved: []string{"web"}, ServicesChanged: []Service{{Name: "db", Port: 5432}}, Self: &Node{ID: 9, Name: "me"}})
	if len(nm.Peers) != 2 || nm.Peers[0].Name != "b2" || nm.Peers[1].Name != "c" {
		t.Fatalf("peers %+v", nm.Peers)
	}
	if len(nm.Services) != 1 || nm.Services[0].Name != "db" || nm.Self.Name != "me" {
		t.Fatalf("services %+v self %+v", nm.Services, nm.Self)
	}
	// A removal and a change of the same key in one message: the change wins.
	nm.Apply(&MapResponse{PeersRemoved: []NodeID{3}, PeersChanged: []Node{n(3, "c2")}})
	if len(nm.Peers) != 2 || nm.Peers[1].Name != "c2" {
		t.Fatalf("peers %+v", nm.Peers)
	}
}

// TestPrefixesDisjoint: no node address can be a service VIP (issue 9's
// address plan: 100.96.0.0/12 used to contain 100.100.0.0/16).
func TestPrefixesDisjoint(t *testing.T) {
	if NodePrefix4.Overlaps(ServicePrefix) {
		t.Fatalf("node prefix %v overlaps the service prefix %v", NodePrefix4, ServicePrefix)
	}
	if NodePrefix6.Overlaps(ServicePrefix) || !NodePrefix4.Addr().Is4() || !NodePrefix6.Addr().Is6() {
		t.Fatal("bad prefix families")
	}
}

func TestHTTPStatsCheck(t *testing.T) {
	ok := func() HTTPStats {
		h := HTTPStats{Service: "web", Role: RoleConsumer, Peer: 2, Requests: 3, Errors: 1, Buckets: make([]int64, HTTPBuckets)}
		h.Buckets[HTTPBucket(3*time.Millisecond)], h.Buckets[HTTPBucket(time.Minute)] = 2, 1
		return h
	}
	if h := ok(); h.Check() != nil {
		t.Fatalf("a good entry: %v", h.Check())
	}
	for name, mod := range map[string]func(*HTTPStats){
		"no service":        func(h *HTTPStats) { h.Service = "" },
		"long service":      func(h *HTTPStats) { h.Service = strings.Repeat("x", 64) },
		"bad role":          func(h *HTTPStats) { h.Role = "admin" },
		"short buckets":     func(h *HTTPStats) { h.Buckets = h.Buckets[:2] },
		"more errors":       func(h *HTTPStats) { h.Errors = 4 },
		"negative requests": func(h *HTTPStats) { h.Requests = -1 },
		"negative bucket":   func(h *HTTPStats) { h.Buckets[0] = -1; h.Buckets[1] = 1 },
		"buckets differ":    func(h *HTTPStats) { h.Requests = 2; h.Errors = 0 },
		"overflow":          func(h *HTTPStats) { h.Buckets[0] = math.MaxInt64; h.Buckets[1] = math.MaxInt64 },
	} {
		h := ok()
		mod(&h)
		if h.Check() == nil {
			t.Errorf("%s: taken", name)
		}
	}
	if HTTPBucket(0) != 0 || HTTPBucket(time.Millisecond) != 0 || HTTPBucket(time.Millisecond+1) != 1 || HTTPBucket(time.Hour) != HTTPBuckets-1 {
		t.Error("HTTPBucket's edges")
	}
}
