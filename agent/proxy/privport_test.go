package proxy

import (
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
)

// fakePrivileged opens real loopback listeners on port 0 for every
// address, except that ports below 1024 fail as they do for a process
// without CAP_NET_BIND_SERVICE and busy ports as taken. The listeners
// report the address asked for, so that status shows it.
type fakePrivileged struct {
	busy map[uint16]bool
	real map[netip.AddrPort]string // asked-for address -> where it listens
}

type addrListener struct {
	net.Listener
	addr net.Addr
}

func (l addrListener) Addr() net.Addr { return l.addr }

func (f *fakePrivileged) listen(a netip.AddrPort) (net.Listener, error) {
	if a.Port() < 1024 {
		return nil, &net.OpError{Op: "listen", Net: "tcp", Err: syscall.EACCES}
	}
	if f.busy[a.Port()] {
		return nil, &net.OpError{Op: "listen", Net: "tcp", Err: syscall.EADDRINUSE}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f.real[a] = ln.Addr().String()
	return addrListener{ln, net.TCPAddrFromAddrPort(a)}, nil
}

func TestFallbackPort(t *testing.T) {
	for in, want := range map[uint16]uint16{22: 10022, 80: 10080, 443: 10443, 1023: 11023, 1024: 1024, 8000: 8000, 0: 0} {
		if got := FallbackPort(in); got != want {
			t.Errorf("FallbackPort(%d) = %d, want %d", in, got, want)
		}
	}
}

// TestPrivilegedPortFallback: a service on port 80 that the process may
// not bind is served on the same address at port 10080; a connection there
// reaches the provider, and status says where it is served and which port
// it wanted. When the fallback is taken too, the error names the setcap
// command, and a port merely in use blames --proxy-range.
func TestPrivilegedPortFallback(t *testing.T) {
	prov := netip.MustParseAddrPort("100.96.0.1:80")
	f := &fakePrivileged{real: map[netip.AddrPort]string{}, busy: map[uint16]bool{}}
	c := NewConsumer(ConsumerConfig{Dialer: kernelDialer{prov: greeter(t, "web")}, Listen: f.listen})
	t.Cleanup(func() { c.Close(); c.Wait() })

	want := netip.MustParseAddrPort("127.100.0.1:80")
	fallback := netip.MustParseAddrPort("127.100.0.1:10080")
	cfg := []ServiceConfig{{Name: "web", Listen: want, Targets: []Target{{Node: 1, Name: "b", Addr: prov, Online: true}}}}
	if err := c.Reconfig(cfg); err != nil {
		t.Fatalf("Reconfig: %v", err)
	}
	st := c.Status()
	if len(st) != 1 || !st[0].Listening || st[0].Listen != fallback || st[0].Wanted != want {
		t.Fatalf("status %+v, want web listening on %s for %s", st, fallback, want)
	}
	if b := c.Bound(); b["web"] != fallback {
		t.Fatalf("Bound() = %v, want web at %s", b, fallback)
	}
	conn, who := greet(t, f.real[fallback])
	conn.Close()
	if who != "web" {
		t.Fatalf("through the fallback port: %q, want the provider's greeting", who)
	}
	// Another reconfig keeps the listener: the port is stable.
	if err := c.Reconfig(cfg); err != nil || c.Bound()["web"] != fallback {
		t.Fatalf("second Reconfig: %v, bound %v", err, c.Bound())
	}

	for _, tc := range []struct {
		name, listen string
		busy         uint16
		wantIn       []string
		wantNot      string
	}{
		{"fallback taken", "127.100.0.2:22", 10022, []string{"port 22 needs privileges", "10022", "setcap cap_net_bind_service=+ep"}, "--proxy-range"},
		{"port in use", "127.100.0.3:8000", 8000, []string{"already in use", "--proxy-range"}, "setcap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.busy[tc.busy] = true
			err := c.Reconfig(append(cfg, ServiceConfig{Name: "other", Listen: netip.MustParseAddrPort(tc.listen)}))
			if err == nil {
				t.Fatal("Reconfig succeeded, want an error")
			}
			for _, w := range tc.wantIn {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), tc.wantNot) {
				t.Errorf("error %q mentions %s, which would not help", err, tc.wantNot)
			}
			for _, s := range c.Status() {
				if s.Name == "other" && (s.Listening || s.Error == "") {
					t.Errorf("status of the failed service: %+v", s)
				}
			}
		})
	}
}
