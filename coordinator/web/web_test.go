package web

import (
	"encoding/json"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/internal/key"
)

func TestSafeNext(t *testing.T) {
	tests := []struct{ in, want string }{
		{"/approve/ABCD-EFGH", "/approve/ABCD-EFGH"},
		{"/console/tokens?x=1", "/console/tokens?x=1"},
		{"", "/console"},
		{"//evil.example/", "/console"},
		{"/\\evil.example", "/console"},
		{"https://evil.example/", "/console"},
		{"javascript:alert(1)", "/console"},
		// Browsers drop tab, newline and carriage return, and read a
		// backslash as a slash: each of these would be //evil.example.
		{"/\t/evil.example", "/console"},
		{"/\v/evil.example", "/console"},
		{"/ /evil.example", "/console"},
		{"/\x00/evil.example", "/console"},
		{"/\n/evil.example", "/console"},
		{"/\r/evil.example", "/console"},
		{"/\x7f/evil.example", "/console"},
		{"/\u00a0/evil.example", "/console"},
		{"/\\/evil.example", "/console"},
		{"/x\\evil", "/console"},
		{"/%2F/evil.example", "/console"},
		{"///evil.example", "/console"},
		{"http:/evil.example", "/console"},
		{"evil.example", "/console"},
		{"/" + strings.Repeat("a", 600), "/console"},
		{"/console/graph#x", "/console/graph#x"},
		{"/approve/ABCD-EFGH?a=%2F%2F", "/approve/ABCD-EFGH?a=%2F%2F"},
	}
	for _, tc := range tests {
		if got := safeNext(tc.in); got != tc.want {
			t.Errorf("safeNext(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestSameOrigin(t *testing.T) {
	tests := []struct {
		name string
		hdr  map[string]string
		want bool
	}{
		{"no headers", nil, true},
		{"same origin", map[string]string{"Origin": "https://mesh.example:8443", "Sec-Fetch-Site": "same-origin"}, true},
		{"other host", map[string]string{"Origin": "https://evil.example"}, false},
		{"plain http origin", map[string]string{"Origin": "http://mesh.example:8443"}, false},
		{"null origin", map[string]string{"Origin": "null"}, false},
		{"null origin of our own form (no-referrer)", map[string]string{"Origin": "null", "Sec-Fetch-Site": "same-origin"}, true},
		{"cross-site with a forged-looking origin", map[string]string{"Origin": "https://mesh.example:8443", "Sec-Fetch-Site": "cross-site"}, false},
		{"cross-site", map[string]string{"Sec-Fetch-Site": "cross-site"}, false},
		{"same-site", map[string]string{"Sec-Fetch-Site": "same-site"}, false},
	}
	for _, tc := range tests {
		r := httptest.NewRequest("POST", "https://mesh.example:8443/login", nil)
		for k, v := range tc.hdr {
			r.Header.Set(k, v)
		}
		if got := sameOrigin(r); got != tc.want {
			t.Errorf("%s: sameOrigin = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestTemplatesParse(t *testing.T) {
	pages := parsePages()
	for _, p := range []string{"login", "message", "overview", "graph", "services", "tokens", "events", "users", "approve", "password"} {
		if pages[p] == nil {
			t.Errorf("page %s missing", p)
		}
	}
}

func TestViewRelays(t *testing.T) {
	fp := strings.Repeat("AB01", 16)
	rs := viewRelays([]RelayInfo{
		{Name: "coordinator", URL: "https://mesh.example:8443", Fingerprint: fp, Key: key.NewPrivate().Public(), Embedded: true,
			Counters: &RelayCounters{Clients: 3, Accepted: 7, PacketsRelayed: 11, BytesRelayed: 5000, Dropped: 1}},
		{Name: "eu1", URL: "https://eu1.example:9443", Fingerprint: fp},
	})
	if len(rs) != 2 {
		t.Fatalf("relays %+v", rs)
	}
	emb, eu1 := rs[0], rs[1]
	if !emb.Embedded || emb.FingerprintShort != "SHA256:ab01ab01ab01ab01" || !strings.HasPrefix(emb.KeyFP, "SHA256:") ||
		emb.Stats == nil || *emb.Stats != (ViewRelayStats{Clients: 3, Accepted: 7, PacketsRelayed: 11, BytesRelayed: 5000, Dropped: 1}) {
		t.Fatalf("embedded %+v", emb)
	}
	if eu1.Embedded || eu1.Stats != nil || eu1.KeyFP != "" {
		t.Fatalf("standalone %+v", eu1)
	}
	b, _ := json.Marshal(eu1)
	if !strings.Contains(string(b), `"stats":null`) {
		t.Fatalf("standalone JSON %s: unknown counters must be null", b)
	}
	if got := viewRelays(nil); got == nil || len(got) != 0 {
		t.Fatalf("no relays: %#v, want an empty list", got)
	}
}

// FuzzSafeNext: whatever comes in, the redirect is either the console or
// the input, and the input only when a browser, which drops tabs and
// newlines and reads a backslash as a slash, would still stay on this site.
func FuzzSafeNext(f *testing.F) {
	for _, s := range []string{"/console", "/\t/evil.example", "//evil", "/\\evil", "/approve/A?next=//x", "/%2F/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		got := safeNext(in)
		if got == "/console" {
			return
		}
		if got != in {
			t.Fatalf("safeNext(%q) = %q: neither the input nor /console", in, got)
		}
		browser := strings.NewReplacer("\t", "", "\n", "", "\r", "", "\\", "/").Replace(in)
		u, err := url.Parse(browser)
		if err != nil || u.Host != "" || u.Scheme != "" || strings.HasPrefix(browser, "//") {
			t.Fatalf("safeNext accepted %q, which a browser reads as %q (host %q)", in, browser, u.Host)
		}
	})
}
