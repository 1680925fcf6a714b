package agent

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestProxyAddr(t *testing.T) {
	cases := []struct {
		name, rng, vip, want string
	}{
		{"default range", "127.100.0.0/16", "100.100.3.7", "127.100.3.7"},
		{"second agent", "127.101.0.0/16", "100.100.0.1", "127.101.0.1"},
		{"bigger range", "127.0.0.0/8", "100.100.1.2", "127.0.1.2"},
		{"not a VIP", "127.100.0.0/16", "100.96.0.1", ""},
		{"ipv6", "127.100.0.0/16", "fd7a::1", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := &Agent{cfg: Config{ProxyRange: netip.MustParsePrefix(tc.rng)}}
			got := a.proxyAddr(netip.MustParseAddr(tc.vip))
			if (tc.want == "" && got.IsValid()) || (tc.want != "" && got != netip.MustParseAddr(tc.want)) {
				t.Fatalf("proxyAddr(%s) = %v, want %q", tc.vip, got, tc.want)
			}
		})
	}
}

func TestParseExport(t *testing.T) {
	cases := []struct {
		in      string
		want    Export
		wantErr bool
	}{
		{in: "web=127.0.0.1:8000", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000}},
		{in: "DB=db.lan:5432", want: Export{Name: "db", Target: "db.lan:5432", Port: 5432}},
		{in: "v6=[::1]:22", want: Export{Name: "v6", Target: "[::1]:22", Port: 22}},
		{in: "web", wantErr: true},
		{in: "=127.0.0.1:80", wantErr: true},
		{in: "web=:80", wantErr: true},
		{in: "web=127.0.0.1", wantErr: true},
		{in: "web=127.0.0.1:http", wantErr: true},
		{in: "we b=127.0.0.1:80", wantErr: true},
		{in: "web=127.0.0.1:8000;weight=10;version=v2", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000, Weight: 10, Version: "v2"}},
		{in: "web=127.0.0.1:8000; priority=1 ;health=http:/healthz@204;port=80", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 80, Priority: 1, Health: "http:/healthz@204"}},
		{in: "web=127.0.0.1:8000;health=none;", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000, Health: "none"}},
		{in: "web=127.0.0.1:8000;weight=-1", wantErr: true},
		{in: "web=127.0.0.1:8000;weight=99999", wantErr: true},
		{in: "web=127.0.0.1:8000;weight", wantErr: true},
		{in: "web=127.0.0.1:8000;colour=red", wantErr: true},
		{in: "web=127.0.0.1:8000;version=v 2", wantErr: true},
		{in: "web=127.0.0.1:8000;health=udp", wantErr: true},
		{in: "web=127.0.0.1:8000;weight=1;weight=2", wantErr: true},
		{in: "dns=127.0.0.1:53/udp", want: Export{Name: "dns", Target: "127.0.0.1:53", Port: 53, Protocol: "udp"}},
		{in: "dns=127.0.0.1:53/TCP+UDP;udp-idle=30s", want: Export{Name: "dns", Target: "127.0.0.1:53", Port: 53, Protocol: "tcp+udp", UDPIdle: 30}},
		{in: "web=127.0.0.1:80/tcp", want: Export{Name: "web", Target: "127.0.0.1:80", Port: 80}},
		{in: "v6=[::1]:53/udp;port=5353;udp-idle=90", want: Export{Name: "v6", Target: "[::1]:53", Port: 5353, Protocol: "udp", UDPIdle: 90}},
		{in: "dns=127.0.0.1:53/sctp", wantErr: true},
		{in: "dns=127.0.0.1:53/", wantErr: true},
		{in: "dns=127.0.0.1/udp", wantErr: true},
		{in: "dns=127.0.0.1:53/udp;udp-idle=0s", wantErr: true},
		{in: "dns=127.0.0.1:53/udp;udp-idle=2h", wantErr: true},
		{in: "web=127.0.0.1:8000;protocol=http", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000, Protocol: "http"}},
		{in: "web=127.0.0.1:8000/http;version=v2", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000, Protocol: "http", Version: "v2"}},
		{in: "web=127.0.0.1:8000/http;protocol=HTTP", want: Export{Name: "web", Target: "127.0.0.1:8000", Port: 8000, Protocol: "http"}},
		{in: "dns=127.0.0.1:53;protocol=udp", want: Export{Name: "dns", Target: "127.0.0.1:53", Port: 53, Protocol: "udp"}},
		{in: "web=127.0.0.1:8000/udp;protocol=http", wantErr: true},
		{in: "web=127.0.0.1:8000;protocol=gopher", wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseExport(tc.in)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// FuzzParseExport: whatever --expose or MESHLINK_EXPOSE holds, the parser
// answers an export that checks, or an error; and an export it answers
// parses the same when written back as options.
func FuzzParseExport(f *testing.F) {
	for _, s := range []string{"web=127.0.0.1:8000", "web=127.0.0.1:8000;weight=10;version=v2", "a=b:1;health=http:/x@200;priority=3;port=9",
		"web=:80;;", "x=[::1]:1;health=none", "=;=;=", "web=h:1;port=0",
		"dns=127.0.0.1:53/udp", "d=h:53/tcp+udp;udp-idle=30s", "d=h:53/udp+tcp;udp-idle=1", "d=h:1//udp", "d=h:1/", "d=h/udp:1", "d=h:1/udp;udp-idle=1ms", "web=h:80;protocol=http", "web=h:80/http;protocol=tcp"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseExport(s)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if _, err := checkExport(e); err != nil {
			t.Fatalf("%q parsed to %+v, which does not check: %v", s, e, err)
		}
		back := fmt.Sprintf("%s=%s;port=%d;priority=%d;weight=%d", e.Name, e.Target, e.Port, e.Priority, e.Weight)
		if e.Protocol != "" {
			back = fmt.Sprintf("%s=%s/%s;port=%d;priority=%d;weight=%d", e.Name, e.Target, e.Protocol, e.Port, e.Priority, e.Weight)
		}
		if e.UDPIdle != 0 {
			back += fmt.Sprintf(";udp-idle=%ds", e.UDPIdle)
		}
		if e.Version != "" {
			back += ";version=" + e.Version
		}
		if e.Health != "" {
			back += ";health=" + e.Health
		}
		again, err := ParseExport(back)
		if err != nil || again != e {
			t.Fatalf("%q parsed to %+v; written back as %q it parses to %+v, %v", s, e, back, again, err)
		}
	})
}

func TestHostLabel(t *testing.T) {
	for in, want := range map[string]string{"My-Laptop.local": "my-laptop", "___": "node", "a_b": "ab", "-x-": "x"} {
		if got := hostLabel(in); got != want {
			t.Errorf("hostLabel(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestAddExportPortConflict(t *testing.T) {
	a := &Agent{}
	if err := a.addExportLocked(Export{Name: "web", Target: "127.0.0.1:80"}, false); err != nil {
		t.Fatal(err)
	}
	if err := a.addExportLocked(Export{Name: "api", Target: "127.0.0.1:80"}, false); err == nil {
		t.Fatal("second service on mesh port 80 accepted")
	}
	if err := a.addExportLocked(Export{Name: "api", Target: "127.0.0.1:80", Port: 81}, false); err != nil {
		t.Fatal(err)
	}
	// Re-exposing a name with another target needs replace: a second
	// `meshlink expose web …` must not silently redirect live traffic.
	if err := a.addExportLocked(Export{Name: "web", Target: "127.0.0.1:8080", Port: 80}, false); err == nil || !strings.Contains(err.Error(), "--replace") {
		t.Fatalf("re-expose to another target without replace: %v", err)
	}
	if a.exports[1].Target != "127.0.0.1:80" {
		t.Fatalf("refused re-expose changed the target: %+v", a.exports)
	}
	// The same target again is fine; with replace a new one too.
	if err := a.addExportLocked(Export{Name: "web", Target: "127.0.0.1:80"}, false); err != nil {
		t.Fatal(err)
	}
	if err := a.addExportLocked(Export{Name: "web", Target: "127.0.0.1:8080", Port: 80}, true); err != nil {
		t.Fatal(err)
	}
	if len(a.exports) != 2 || a.exports[1].Target != "127.0.0.1:8080" {
		t.Fatalf("exports %+v", a.exports)
	}
}

func TestPipelinePacketsDefault(t *testing.T) {
	for _, n := range []int{0, -1} {
		a, err := New(Config{StateDir: t.TempDir(), Coordinator: "https://127.0.0.1:1", PipelinePackets: n})
		if err != nil {
			t.Fatal(err)
		}
		if a.cfg.PipelinePackets != DefaultPipelinePackets {
			t.Errorf("PipelinePackets %d: got %d, want the default %d", n, a.cfg.PipelinePackets, DefaultPipelinePackets)
		}
	}
}

func TestGoroutineRefusedAfterClose(t *testing.T) {
	a := &Agent{log: slog.New(slog.DiscardHandler)}
	ran := make(chan struct{})
	if !a.goroutine("first", func() { close(ran) }) {
		t.Fatal("goroutine refused before Close")
	}
	<-ran
	a.Close()
	if a.goroutine("late", func() { t.Error("started after Close") }) {
		t.Fatal("goroutine accepted after Close")
	}
	a.wg.Wait()
}

// TestReconnectDelaySpread: the first reconnect after a stream ends lands
// anywhere in [RetryMin/2, min(RetryMax/2, 10s)), so a fleet that lost its
// coordinator together comes back spread out.
func TestReconnectDelaySpread(t *testing.T) {
	for _, tc := range []struct {
		name         string
		min, max     time.Duration
		lo, hi       time.Duration
		wantSpreadGE time.Duration
	}{
		{"defaults", time.Second, 30 * time.Second, 500 * time.Millisecond, 10 * time.Second, 5 * time.Second},
		{"tests", 50 * time.Millisecond, 500 * time.Millisecond, 25 * time.Millisecond, 250 * time.Millisecond, 100 * time.Millisecond},
		{"narrow", time.Second, time.Second, time.Second, time.Second, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &Agent{cfg: Config{RetryMin: tc.min, RetryMax: tc.max}}
			lo, hi := time.Duration(1<<62), time.Duration(0)
			for range 2000 {
				d := a.reconnectDelay()
				if d < tc.lo || d > tc.hi {
					t.Fatalf("delay %v outside [%v, %v]", d, tc.lo, tc.hi)
				}
				lo, hi = min(lo, d), max(hi, d)
			}
			if hi-lo < tc.wantSpreadGE {
				t.Fatalf("2000 delays spread over %v only (%v to %v)", hi-lo, lo, hi)
			}
		})
	}
}
