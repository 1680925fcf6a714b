package proxy

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

func TestParseHealth(t *testing.T) {
	tests := []struct {
		in   string
		want HealthSpec
		err  string
	}{
		{"", HealthSpec{Kind: HealthTCP}, ""},
		{"tcp", HealthSpec{Kind: HealthTCP}, ""},
		{"none", HealthSpec{Kind: HealthNone}, ""},
		{"http:/healthz", HealthSpec{Kind: HealthHTTP, Path: "/healthz"}, ""},
		{"http:/ready?full=1@204", HealthSpec{Kind: HealthHTTP, Path: "/ready?full=1", Status: 204}, ""},
		{"http:healthz", HealthSpec{}, "must start with '/'"},
		{"http:/x@99", HealthSpec{}, "status \"99\""},
		{"http:/a b", HealthSpec{}, "spaces"},
		{"udp", HealthSpec{}, `want "tcp", "none"`},
	}
	for _, tc := range tests {
		got, err := ParseHealth(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseHealth(%q) = %v, want error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseHealth(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
		if again, err := ParseHealth(got.String()); err != nil || again != got {
			t.Errorf("ParseHealth(String(%q)) = %+v, %v", tc.in, again, err)
		}
	}
}

func FuzzParseHealth(f *testing.F) {
	for _, s := range []string{"", "tcp", "none", "http:/healthz", "http:/x@204", "http:@", "http:/@1000"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseHealth(s)
		if err != nil {
			return
		}
		if again, err := ParseHealth(h.String()); err != nil || again != h {
			t.Fatalf("%q parsed to %+v, whose String %q parses to %+v, %v", s, h, h.String(), again, err)
		}
	})
}

func TestCheckTarget(t *testing.T) {
	var status atomic.Int32
	status.Store(200)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	target := strings.TrimPrefix(srv.URL, "http://")
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	ctx := context.Background()
	check := func(target, spec string) string {
		h, err := ParseHealth(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := CheckTarget(ctx, target, h, time.Second); err != nil {
			return err.Error()
		}
		return "ok"
	}
	for _, tc := range []struct{ target, spec, want string }{
		{target, "tcp", "ok"},
		{dead, "tcp", "connection refused"},
		{target, "http:/healthz", "ok"},
		{target, "http:/other", "GET /other answered 404"},
		{target, "http:/healthz@204", "GET /healthz answered 200"},
		{dead, "http:/healthz", "connection refused"},
		{dead, "none", "ok"},
	} {
		if got := check(tc.target, tc.spec); got != tc.want {
			t.Errorf("check %s %s: %q, want %q", tc.target, tc.spec, got, tc.want)
		}
	}
	status.Store(503)
	if got := check(target, "http:/healthz"); got != "GET /healthz answered 503" {
		t.Errorf("503: %q", got)
	}
}

// TestProviderHealthChecks: a provider reports its target unhealthy
// within one interval of it going away, and healthy again once it is back.
func TestProviderHealthChecks(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	changes := make(chan struct{}, 16)
	p := NewProvider(ProviderConfig{Logger: tstest.Logger(t), HealthInterval: 50 * time.Millisecond,
		OnHealth: func() {
			select {
			case changes <- struct{}{}:
			default:
			}
		}})
	defer p.Close()
	p.SetExports([]Export{{Name: "web", Target: addr, Port: 80}, {Name: "off", Target: addr, Port: 81, Health: HealthNone}})
	state := func() string {
		hs := p.Health()
		if len(hs) != 1 || hs[0].Name != "web" {
			t.Fatalf("health %+v: want web only (off has checks off)", hs)
		}
		if !hs[0].Checked {
			return "unchecked"
		}
		if hs[0].Healthy {
			return "healthy"
		}
		return "unhealthy: " + hs[0].Error
	}
	tstest.WaitFor(t, 5*time.Second, "web healthy", func() bool { return state() == "healthy" })
	ln.Close()
	tstest.WaitFor(t, 5*time.Second, "web unhealthy", func() bool { return state() == "unhealthy: connection refused" })
	if st := p.Status(); st[1].Health.Healthy || st[1].Health.Error != "connection refused" {
		t.Errorf("status %+v", st[1])
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	defer ln.Close()
	tstest.WaitFor(t, 5*time.Second, "web healthy again", func() bool { return state() == "healthy" })
	if len(changes) < 3 {
		t.Errorf("OnHealth called %d times, want 3 (healthy, unhealthy, healthy)", len(changes))
	}
}
