package sysresolver

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestDetect(t *testing.T) {
	root := t.TempDir()
	if m := Detect(root, "linux"); m != Dnsmasq {
		t.Errorf("linux without resolved: %s, want %s", m, Dnsmasq)
	}
	os.MkdirAll(filepath.Join(root, "run/systemd/resolve"), 0o755)
	if m := Detect(root, "linux"); m != Resolved {
		t.Errorf("linux with /run/systemd/resolve: %s, want %s", m, Resolved)
	}
	if m := Detect(root, "darwin"); m != Resolver {
		t.Errorf("darwin: %s, want %s", m, Resolver)
	}
}

// TestInstallUninstall writes and removes each method's files under a
// temporary root, as `meshlink dns install` and `uninstall` do under /.
func TestInstallUninstall(t *testing.T) {
	addr := netip.MustParseAddrPort("127.0.0.1:5353")
	for _, tt := range []struct {
		method  Method
		path    string
		content []string
		run     []string
	}{
		{Resolved, ResolvedDropIn, []string{"[Resolve]\n", "DNS=127.0.0.1:5353\n", "Domains=~mesh.internal\n"}, []string{"systemctl restart systemd-resolved"}},
		{Resolver, "/etc/resolver/mesh.internal", []string{"nameserver 127.0.0.1\n", "port 5353\n"}, nil},
	} {
		t.Run(string(tt.method), func(t *testing.T) {
			root := t.TempDir()
			var ran []string
			run := func(_ context.Context, argv []string) error { ran = append(ran, strings.Join(argv, " ")); return nil }
			cfg := Config{Addr: addr, Domain: "Mesh.Internal.", Method: tt.method, Root: root}
			p, err := Install(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Apply(context.Background(), run); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(root, tt.path))
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range tt.content {
				if !strings.Contains(string(b), c) {
					t.Errorf("%s:\n%s\nlacks %q", tt.path, b, c)
				}
			}
			if !slices.Equal(ran, tt.run) {
				t.Errorf("ran %q, want %q", ran, tt.run)
			}
			if s := p.String(); !strings.Contains(s, filepath.Join(root, tt.path)) || !strings.Contains(s, tt.content[0]) {
				t.Errorf("the plan as printed does not show the file:\n%s", s)
			}

			ran = nil
			p, err = Uninstall(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Apply(context.Background(), run); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(root, tt.path)); !os.IsNotExist(err) {
				t.Errorf("%s still there after uninstall: %v", tt.path, err)
			}
			if !slices.Equal(ran, tt.run) {
				t.Errorf("uninstall ran %q, want %q", ran, tt.run)
			}
			// A file someone else wrote is left alone, with a reason.
			os.WriteFile(filepath.Join(root, tt.path), []byte("nameserver 10.0.0.1\n"), 0o644)
			if _, err := Uninstall(cfg); err == nil || !strings.Contains(err.Error(), "not written by `meshlink dns install`") {
				t.Errorf("uninstall over a foreign file: %v", err)
			}
		})
	}
}

func TestDnsmasqLines(t *testing.T) {
	p, err := Install(Config{Addr: netip.MustParseAddrPort("0.0.0.0:5354"), Domain: "mesh.internal", Method: Dnsmasq})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Write)+len(p.Run) != 0 || !strings.Contains(p.String(), "\n  server=/mesh.internal/127.0.0.1#5354\n") ||
		!strings.Contains(p.String(), "NetworkManager") {
		t.Fatalf("dnsmasq plan:\n%s", p)
	}
}

func TestBadInput(t *testing.T) {
	for _, tt := range []struct {
		cfg  Config
		want string
	}{
		{Config{Addr: netip.MustParseAddrPort("127.0.0.1:53"), Domain: "../../etc/passwd", Method: Resolver}, "--domain"},
		{Config{Addr: netip.MustParseAddrPort("127.0.0.1:53"), Domain: "a\nDNS=1.2.3.4", Method: Resolved}, "--domain"},
		{Config{Domain: "mesh.internal", Method: Resolved}, "--dns"},
		{Config{Addr: netip.MustParseAddrPort("127.0.0.1:53"), Domain: "mesh.internal", Method: "bind9"}, "unknown method"},
	} {
		if _, err := Install(tt.cfg); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Install(%+v): %v, want an error naming %s", tt.cfg, err, tt.want)
		}
	}
}

// FuzzInstall: whatever domain the agent (or a flag) reports, the plan
// writes only inside its directory, one line per setting.
func FuzzInstall(f *testing.F) {
	for _, d := range []string{"mesh.internal", "Mesh.Internal.", "../x", "a/b", "a\nb", "", "x..y", strings.Repeat("a.", 200)} {
		f.Add(d, uint16(5353))
	}
	f.Fuzz(func(t *testing.T, domain string, port uint16) {
		for _, m := range Methods {
			p, err := Install(Config{Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), Domain: domain, Method: m, Root: "/r"})
			if err != nil {
				continue
			}
			for _, w := range p.Write {
				if filepath.Clean(w.Path) != w.Path || !strings.HasPrefix(w.Path, "/r/etc/") || strings.Count(w.Path, "/") != 4 && m == Resolver {
					t.Fatalf("%s, domain %q: writes %q", m, domain, w.Path)
				}
				if n := strings.Count(w.Content, "\n"); n != 4 && n != 5 {
					t.Fatalf("%s, domain %q: %d lines:\n%s", m, domain, n, w.Content)
				}
			}
		}
	})
}
