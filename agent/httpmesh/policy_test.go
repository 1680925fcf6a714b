package httpmesh

import (
	"bufio"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

func TestRoutes(t *testing.T) {
	rs := compileRoutes([]wire.HTTPRoute{
		{Headers: []wire.HTTPHeaderMatch{{Name: "X-Canary", Exact: "true"}}, Version: "v2"},
		{PathPrefix: "/api/", Methods: []string{"GET", "HEAD"}, Split: map[string]int{"v1": 50, "v2": 50}},
		{Headers: []wire.HTTPHeaderMatch{{Name: "User-Agent", Regex: "curl/[0-9.]+"}, {Name: "X-Team", Prefix: "blue"}}, Version: "v3"},
		{PathPrefix: "bad"}, // fails Check: dropped
	})
	if len(rs) != 3 {
		t.Fatalf("%d routes compiled, want 3", len(rs))
	}
	for _, tc := range []struct {
		name, method, path string
		header             []string
		want               map[string]int
	}{
		{"canary", "POST", "/", []string{"x-canary", "true"}, map[string]int{"v2": 100}},
		{"canary is exact", "GET", "/", []string{"x-canary", "True"}, nil},
		{"path and method", "GET", "/api/x", nil, map[string]int{"v1": 50, "v2": 50}},
		{"path, other method", "POST", "/api/x", nil, nil},
		{"path prefix only", "GET", "/apix", nil, nil},
		{"regex anchored, both headers", "GET", "/", []string{"user-agent", "curl/8.5", "x-team", "blue-1"}, map[string]int{"v3": 100}},
		{"regex anchored", "GET", "/", []string{"user-agent", "xcurl/8.5", "x-team", "blue-1"}, nil},
		{"one header missing", "GET", "/", []string{"user-agent", "curl/8.5"}, nil},
		{"first match wins", "GET", "/api/", []string{"x-canary", "true"}, map[string]int{"v2": 100}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := http.NewRequest(tc.method, "http://x"+tc.path, nil)
			for i := 0; i+1 < len(tc.header); i += 2 {
				r.Header.Set(tc.header[i], tc.header[i+1])
			}
			got, ok := matchRoutes(rs, r)
			if ok != (tc.want != nil) || len(got) != len(tc.want) {
				t.Fatalf("got %v %v, want %v", got, ok, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func TestBudget(t *testing.T) {
	b := newBudget(&wire.HTTPRetries{Attempts: 1, On: []string{"503"}, BudgetPercent: 20, MinPerSecond: -1})
	now := time.Unix(1000, 0)
	allowed := 0
	for i := range 1000 {
		b.request(now.Add(time.Duration(i) * time.Millisecond))
		if b.retry(now.Add(time.Duration(i) * time.Millisecond)) {
			allowed++
		}
	}
	if allowed != 200 {
		t.Fatalf("%d retries allowed of 1000 requests at 20%%, want 200", allowed)
	}
	// Ten seconds later the window is empty again: nothing without
	// requests (no minimum), then 20% of the new ones.
	later := now.Add(20 * time.Second)
	if b.retry(later) {
		t.Fatal("a retry allowed without requests and without a minimum")
	}
	for range 10 {
		b.request(later)
	}
	if !b.retry(later) || !b.retry(later) || b.retry(later) {
		t.Fatal("want exactly 2 retries for 10 requests")
	}
	// The minimum: 3 per second of the window, 30, even without requests.
	m := newBudget(&wire.HTTPRetries{Attempts: 1, On: []string{"503"}})
	n := 0
	for m.retry(now) {
		n++
	}
	if n != wire.DefaultRetryMinPerSecond*budgetWindow {
		t.Fatalf("%d retries from the minimum, want %d", n, wire.DefaultRetryMinPerSecond*budgetWindow)
	}
}

func TestOutliers(t *testing.T) {
	o := newOutliers(&wire.HTTPOutlier{Consecutive5xx: 3, ConsecutiveGatewayErrors: 2, BaseEjectionMS: 1000, MaxEjectionMS: 2500, MaxEjectionPercent: 50})
	now := time.Unix(1000, 0)
	fail := outcome{code: 500}
	if o.record(1, fail, now, 4) != 0 || o.record(1, outcome{code: 200}, now, 4) != 0 || o.record(1, fail, now, 4) != 0 || o.record(1, fail, now, 4) != 0 {
		t.Fatal("ejected before 3 in a row")
	}
	if d := o.record(1, fail, now, 4); d != time.Second {
		t.Fatalf("third 5xx in a row: ejected for %v, want 1s", d)
	}
	if !o.ejected(1, now) || o.ejected(1, now.Add(time.Second)) {
		t.Fatal("ejected for the wrong time")
	}
	// Gateway errors count sooner; a second ejection of node 2 would
	// pass the 50% cap of 4 providers with 1 ejected? 2 of 4 is 50%: ok.
	if o.record(2, outcome{connectFail: true}, now, 4) != 0 {
		t.Fatal("ejected after one gateway error")
	}
	if d := o.record(2, outcome{code: 503}, now, 4); d != time.Second {
		t.Fatalf("two gateway errors: %v", d)
	}
	// A third would make 75%: refused.
	o.record(3, outcome{code: 502}, now, 4)
	if d := o.record(3, outcome{code: 502}, now, 4); d != 0 || o.ejected(3, now) {
		t.Fatal("ejected beyond maxEjectionPercent")
	}
	// Repeats grow the ejection, up to the maximum.
	at := now.Add(2 * time.Second)
	for _, want := range []time.Duration{2 * time.Second, 2500 * time.Millisecond} {
		for range 2 {
			o.record(1, fail, at, 4)
		}
		d := o.record(1, fail, at, 4)
		if d != want {
			t.Fatalf("ejection %v, want %v", d, want)
		}
		at = at.Add(d)
	}
	// With one provider, that one may still be ejected.
	one := newOutliers(&wire.HTTPOutlier{Consecutive5xx: 1, MaxEjectionPercent: 10})
	if one.record(9, fail, now, 1) == 0 {
		t.Fatal("the only provider could not be ejected")
	}
}

func TestSniff(t *testing.T) {
	for in, ok := range map[string]bool{
		"GET / HTTP/1.1\r\n":       true,
		"PRI * HTTP/2.0\r\n\r\nSM": true,
		"M-SEARCH * HTTP/1.1":      true,
		"":                         true, // closed at once
		"\x16\x03\x01":             false,
		"get\x00":                  false,
		strings.Repeat("A", 30):    false,
		" GET / HTTP/1.1\r\n\r\n":  false,
		"SSH-2.0-OpenSSH_9.6\r\n":  false,
		"ab":                       false, // ended inside the first line
	} {
		why := sniff(bufio.NewReader(strings.NewReader(in)))
		if (why == "") != ok {
			t.Errorf("sniff(%q) = %q; want ok %v", in, why, ok)
		}
	}
}

// FuzzSniff: whatever a peer sends first, sniff answers without
// panicking and leaves the bytes for the server.
func FuzzSniff(f *testing.F) {
	for _, s := range []string{"GET / HTTP/1.1\r\n\r\n", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "\x16\x03\x01", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		br := bufio.NewReaderSize(strings.NewReader(string(b)), 4096)
		sniff(br)
		rest, _ := br.Peek(min(len(b), 24))
		if string(rest) != string(b[:len(rest)]) {
			t.Fatal("sniff consumed bytes")
		}
	})
}
