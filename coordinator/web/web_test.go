package web

import (
	"fmt"
	"net/http/httptest"
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(5, time.Minute, 100)
	for i := 0; i < 5; i++ {
		if !l.allowed("k", now) {
			t.Fatalf("refused after %d failures", i)
		}
		l.fail("k", now)
	}
	if l.allowed("k", now.Add(59*time.Second)) {
		t.Fatal("allowed after 5 failures within the window")
	}
	if !l.allowed("k", now.Add(time.Minute)) {
		t.Fatal("still refused after the window")
	}
	// Memory stays bounded however many keys fail.
	for i := 0; i < 1000; i++ {
		l.fail(fmt.Sprint("spray", i), now)
	}
	if n := l.size(); n > 100 {
		t.Fatalf("limiter holds %d entries, bound 100", n)
	}
}

func TestSafeNext(t *testing.T) {
	tests := []struct{ in, want string }{
		{"/approve/ABCD-EFGH", "/approve/ABCD-EFGH"},
		{"/console/tokens?x=1", "/console/tokens?x=1"},
		{"", "/console"},
		{"//evil.example/", "/console"},
		{"/\\evil.example", "/console"},
		{"https://evil.example/", "/console"},
		{"javascript:alert(1)", "/console"},
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
	for _, p := range []string{"login", "message", "overview", "graph", "services", "tokens", "events", "users", "approve"} {
		if pages[p] == nil {
			t.Errorf("page %s missing", p)
		}
	}
}
