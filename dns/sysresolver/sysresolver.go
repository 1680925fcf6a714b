// Package sysresolver points the host's own resolver at the agent's DNS
// server for the mesh domain only (split DNS), so that every program on
// the host resolves NAME.mesh.internal while other names go where they went
// before, and the agent itself needs no privilege to serve DNS.
//
// Where systemd-resolved runs it writes a drop-in
// (/etc/systemd/resolved.conf.d/meshlink.conf: DNS=127.0.0.1:PORT,
// Domains=~mesh.internal) and restarts resolved; on macOS it writes
// /etc/resolver/DOMAIN; elsewhere it only says what to add to dnsmasq or
// NetworkManager. A Plan is computed first, as a value, so that a dry run
// prints exactly what Apply would do.
package sysresolver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// Method is how the host's resolver is configured.
type Method string

// The methods; Detect picks one.
const (
	// Resolved writes a systemd-resolved drop-in and restarts resolved.
	Resolved Method = "systemd-resolved"
	// Resolver writes /etc/resolver/DOMAIN (macOS).
	Resolver Method = "resolver"
	// Dnsmasq writes nothing: it prints the dnsmasq (and NetworkManager,
	// whose dns=dnsmasq mode takes the same line) configuration to add.
	Dnsmasq Method = "dnsmasq"
)

// Methods lists the methods by name, for flags and errors.
var Methods = []Method{Resolved, Resolver, Dnsmasq}

// Where the files go, under Config.Root.
const (
	ResolvedDropIn = "/etc/systemd/resolved.conf.d/meshlink.conf"
	ResolverDir    = "/etc/resolver"
	// marker starts every file this package writes; Uninstall removes
	// only files that carry it.
	marker = "# Written by `meshlink dns install`"
)

// Config says what to install.
type Config struct {
	// Addr is the agent's DNS address; an unspecified address (0.0.0.0)
	// means loopback.
	Addr netip.AddrPort
	// Domain is the mesh domain, e.g. "mesh.internal".
	Domain string
	// Method is how; "" detects it (Detect).
	Method Method
	// Root prefixes every path read or written ("" is /); tests use a
	// temporary directory.
	Root string
	// GOOS is the operating system for Detect; "" means this one.
	GOOS string
}

// File is a file a Plan writes.
type File struct {
	Path    string // absolute, under Config.Root
	Content string
}

// Plan is what Install or Uninstall will do.
type Plan struct {
	Method Method
	Write  []File
	Remove []string   // files to remove (absolute, under Config.Root)
	Run    [][]string // commands to run after the files
	// Manual is configuration for the user to add themselves (Dnsmasq).
	Manual string
}

// Detect picks the method for this host: Resolver on macOS, Resolved
// where systemd-resolved runs (its runtime directory exists), else Dnsmasq.
func Detect(root, goos string) Method {
	if goos == "darwin" {
		return Resolver
	}
	if goos == "linux" {
		if fi, err := os.Stat(filepath.Join(root, "/run/systemd/resolve")); err == nil && fi.IsDir() {
			return Resolved
		}
	}
	return Dnsmasq
}

// check validates cfg and fills in its defaults.
func (cfg Config) check() (Config, error) {
	if cfg.GOOS == "" {
		cfg.GOOS = runtime.GOOS
	}
	if cfg.Method == "" {
		cfg.Method = Detect(cfg.Root, cfg.GOOS)
	}
	known := false
	for _, m := range Methods {
		known = known || m == cfg.Method
	}
	if !known {
		return cfg, fmt.Errorf("dns: unknown method %q: want one of %v", cfg.Method, Methods)
	}
	d, err := CheckDomain(cfg.Domain)
	if err != nil {
		return cfg, err
	}
	cfg.Domain = d
	return cfg, nil
}

// CheckDomain validates a mesh domain for use in a file name and in a
// resolver's configuration, and returns it lowercase without a final dot.
func CheckDomain(d string) (string, error) {
	d = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(d), "."))
	bad := func(why string) error {
		return fmt.Errorf("dns: domain %q %s; give the mesh domain with --domain, e.g. mesh.internal", d, why)
	}
	if d == "" || len(d) > 253 {
		return "", bad("is empty or too long")
	}
	for _, l := range strings.Split(d, ".") {
		if l == "" || len(l) > 63 {
			return "", bad("has an empty or too long label")
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", bad("may hold only letters, digits, '-' and '_' between dots")
			}
		}
	}
	return d, nil
}

// addr is the address resolvers should query: loopback for a wildcard.
func (cfg Config) addr() (netip.AddrPort, error) {
	a := cfg.Addr
	if !a.IsValid() || a.Port() == 0 {
		return a, fmt.Errorf("dns: the agent's DNS address %q is not IP:PORT; give it with --dns, e.g. --dns 127.0.0.1:5353", a)
	}
	if a.Addr().IsUnspecified() {
		lo := netip.MustParseAddr("127.0.0.1")
		if a.Addr().Is6() && !a.Addr().Is4In6() {
			lo = netip.IPv6Loopback()
		}
		a = netip.AddrPortFrom(lo, a.Port())
	}
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()), nil
}

// DnsmasqLine is the dnsmasq line that sends domain to addr.
func DnsmasqLine(domain string, addr netip.AddrPort) string {
	return fmt.Sprintf("server=/%s/%s#%d", domain, addr.Addr(), addr.Port())
}

// Install returns the plan that sends cfg.Domain to cfg.Addr.
func Install(cfg Config) (Plan, error) {
	cfg, err := cfg.check()
	if err != nil {
		return Plan{}, err
	}
	addr, err := cfg.addr()
	if err != nil {
		return Plan{}, err
	}
	p := Plan{Method: cfg.Method}
	switch cfg.Method {
	case Resolved:
		p.Write = []File{{Path: filepath.Join(cfg.Root, ResolvedDropIn), Content: fmt.Sprintf(
			"%s: names under %s go to the meshlink agent's DNS.\n# `meshlink dns uninstall` removes it.\n[Resolve]\nDNS=%s\nDomains=~%s\n",
			marker, cfg.Domain, addr, cfg.Domain)}}
		p.Run = [][]string{{"systemctl", "restart", "systemd-resolved"}}
	case Resolver:
		p.Write = []File{{Path: filepath.Join(cfg.Root, ResolverDir, cfg.Domain), Content: fmt.Sprintf(
			"%s: names under %s go to the meshlink agent's DNS.\n# `meshlink dns uninstall` removes it.\nnameserver %s\nport %d\n",
			marker, cfg.Domain, addr.Addr(), addr.Port())}}
	case Dnsmasq:
		line := DnsmasqLine(cfg.Domain, addr)
		p.Manual = fmt.Sprintf("No systemd-resolved here: add split DNS for %[1]s to your resolver.\n"+
			"dnsmasq: put this line in /etc/dnsmasq.d/meshlink.conf, then restart dnsmasq:\n  %[2]s\n"+
			"NetworkManager with dns=dnsmasq: put it in /etc/NetworkManager/dnsmasq.d/meshlink.conf, then run `nmcli general reload`:\n  %[2]s\n",
			cfg.Domain, line)
	}
	return p, nil
}

// Uninstall returns the plan that undoes Install: it removes what Install
// wrote (only files that carry its marker), or says what to remove.
func Uninstall(cfg Config) (Plan, error) {
	cfg, err := cfg.check()
	if err != nil {
		return Plan{}, err
	}
	p := Plan{Method: cfg.Method}
	var path string
	switch cfg.Method {
	case Resolved:
		path = filepath.Join(cfg.Root, ResolvedDropIn)
	case Resolver:
		path = filepath.Join(cfg.Root, ResolverDir, cfg.Domain)
	case Dnsmasq:
		p.Manual = fmt.Sprintf("Remove the server=/%s/… line you added to dnsmasq (or NetworkManager's dnsmasq.d) and restart it.\n", cfg.Domain)
		return p, nil
	}
	ours, err := written(path)
	if err != nil {
		return p, err
	}
	if ours {
		p.Remove = []string{path}
		if cfg.Method == Resolved {
			p.Run = [][]string{{"systemctl", "restart", "systemd-resolved"}}
		}
	}
	return p, nil
}

// written reports whether path exists and was written by Install.
func written(path string) (bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("dns: %w", err)
	}
	if !strings.HasPrefix(string(b), marker) {
		return false, fmt.Errorf("dns: %s was not written by `meshlink dns install`; remove it yourself if it is no longer wanted", path)
	}
	return true, nil
}

// Runner runs one command; Apply passes it each of Plan.Run.
type Runner func(ctx context.Context, argv []string) error

// Apply carries the plan out: writes and removes its files, then runs its
// commands. Errors say what to do (a permission error: run it as root).
func (p Plan) Apply(ctx context.Context, run Runner) error {
	for _, f := range p.Write {
		if err := os.MkdirAll(filepath.Dir(f.Path), 0o755); err != nil {
			return permHint(err)
		}
		if err := os.WriteFile(f.Path, []byte(f.Content), 0o644); err != nil {
			return permHint(err)
		}
	}
	for _, r := range p.Remove {
		if err := os.Remove(r); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return permHint(err)
		}
	}
	for _, argv := range p.Run {
		if err := run(ctx, argv); err != nil {
			return fmt.Errorf("dns: %s: %w; run it yourself once the problem is fixed", strings.Join(argv, " "), err)
		}
	}
	return nil
}

func permHint(err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("dns: %w; run it as root (sudo), or with --dry-run to see what it would do", err)
	}
	return fmt.Errorf("dns: %w", err)
}

// String says what the plan does, for a person: every file with its
// content, every command, or the configuration to add by hand.
func (p Plan) String() string {
	var b strings.Builder
	for _, f := range p.Write {
		fmt.Fprintf(&b, "write %s:\n", f.Path)
		for _, l := range strings.SplitAfter(strings.TrimSuffix(f.Content, "\n"), "\n") {
			fmt.Fprintf(&b, "  %s", l)
		}
		b.WriteString("\n")
	}
	for _, r := range p.Remove {
		fmt.Fprintf(&b, "remove %s\n", r)
	}
	for _, argv := range p.Run {
		fmt.Fprintf(&b, "run %s\n", strings.Join(argv, " "))
	}
	b.WriteString(p.Manual)
	if b.Len() == 0 {
		b.WriteString("nothing to do\n")
	}
	return b.String()
}
