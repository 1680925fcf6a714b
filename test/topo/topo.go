// Package topo builds small network topologies out of Linux network
// namespaces for tests that must cross a real kernel network: NAT, blocked
// UDP, loss, partitions, a site that dies.
//
// A Net owns every namespace it makes. Hosts and switches are namespaces;
// a switch is a bridge in a namespace of its own, and Link plugs a host into
// it with a veth pair. Because every interface is created directly inside a
// test namespace (never in the root namespace), interface names only have to
// be unique per namespace, and nothing a test makes can touch the machine's
// own network.
//
// Namespaces are named "mlt<pid>-<seq>-<name>": the pid of the test process
// lets a later run recognise and remove what a crashed run left behind.
//
// Everything is done with iproute2 (ip, tc) and nftables, falling back to
// iptables where nft is missing, through os/exec: no cgo, no extra modules.
// The one exception is Delay, whose NFQUEUE reader speaks netlink itself.
package topo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// opTimeout bounds every single setup or teardown command.
const opTimeout = 30 * time.Second

// nsPrefix starts the name of every namespace this package makes.
const nsPrefix = "mlt"

// nameRE is what Host, Switch and Router accept as a name: short enough to
// read in `ip netns list`, safe in a path and on a command line.
var nameRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)

var (
	probeOnce sync.Once
	probeErr  error // why namespaces are unusable, nil if they work

	sweepOnce sync.Once

	netSeq atomic.Int64 // numbers the Nets of this process
)

// Require skips the test unless it runs as root with working network
// namespaces. With MESHLINK_REQUIRE_NETNS=1 (set by CI) it fails instead, so
// that a CI machine that lost its privileges cannot pass by skipping.
func Require(t testing.TB) {
	t.Helper()
	probeOnce.Do(func() { probeErr = probe() })
	if probeErr != nil {
		unavailable(t, probeErr.Error())
	}
}

// unavailable skips or fails t for a missing capability, as Require describes.
func unavailable(t testing.TB, reason string) {
	t.Helper()
	// The environment is read here rather than passed in because it is a
	// switch for the CI run as a whole, not a parameter of any one test.
	if os.Getenv("MESHLINK_REQUIRE_NETNS") == "1" {
		t.Fatalf("topo: needs root and network namespaces (MESHLINK_REQUIRE_NETNS=1): %s", reason)
	}
	t.Skipf("needs root and network namespaces: %s", reason)
}

func probe() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("not root (euid %d)", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("iproute2 `ip` not found on PATH (apt-get install iproute2)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	ns := fmt.Sprintf("%s%d-probe", nsPrefix, os.Getpid())
	_ = deleteNS(ctx, ns) // a probe left by an earlier Require in a reused pid
	if _, err := run(ctx, nil, "ip", "netns", "add", ns); err != nil {
		return fmt.Errorf("ip netns add: %w", err)
	}
	defer deleteNS(ctx, ns)
	if _, err := run(ctx, nil, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"); err != nil {
		return fmt.Errorf("ip netns exec: %w", err)
	}
	return nil
}

// Net is a set of namespaces built for one test. Its methods that build the
// topology fail the test on error and must be called from the test's
// goroutine; Close removes everything and is safe to call more than once.
type Net struct {
	t      testing.TB
	prefix string

	mu       sync.Mutex  // guards the fields below
	nss      []string    // namespaces made, in order
	cmds     []*exec.Cmd // made by Host.Command, killed by Close
	delayers []*delayer  // made by Host.Delay, stopped by Close
	names    map[string]bool
	closed   bool
	closeErr error
}

// New returns an empty Net whose namespaces are removed when t ends. It
// calls Require first.
func New(t testing.TB) *Net {
	t.Helper()
	Require(t)
	sweepOnce.Do(sweepLeftovers)
	n := &Net{
		t:      t,
		prefix: fmt.Sprintf("%s%d-%d-", nsPrefix, os.Getpid(), netSeq.Add(1)),
		names:  map[string]bool{},
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("topo: close: %v", err)
		}
	})
	return n
}

// Close kills every process still running in the Net's namespaces and
// deletes the namespaces, which takes their veths and bridges with them.
func (n *Net) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return n.closeErr
	}
	n.closed = true
	// `ip netns pids` misses a command that opened the namespace but has
	// not entered it yet; killing what Command started covers that window.
	for _, cmd := range n.cmds {
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
	}
	var errs []error
	// The queue readers go first: a socket in a namespace keeps it alive.
	for _, dl := range n.delayers {
		dl.close()
		errs = append(errs, dl.result())
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	for i := len(n.nss) - 1; i >= 0; i-- {
		if err := deleteNS(ctx, n.nss[i]); err != nil {
			errs = append(errs, err)
		}
	}
	n.closeErr = errors.Join(errs...)
	return n.closeErr
}

// Host is a network namespace with loopback up: a machine of the topology.
type Host struct {
	n    *Net
	name string
	ns   string

	mu        sync.Mutex // guards the fields below
	nextIf    int
	addrs     []netip.Prefix
	nextQueue int                 // the last NFQUEUE number Delay took, from delayQueueBase
	delays    map[string]*delayer // by interface
}

// Switch is a bridge ("br0") in a namespace of its own: a LAN segment.
type Switch struct {
	n    *Net
	name string
	ns   string

	mu       sync.Mutex // guards nextPort
	nextPort int
}

// Name returns the name given to Host (or Router).
func (h *Host) Name() string { return h.name }

// Namespace returns the name of the host's network namespace, for use with
// other tools (`ip netns exec NAME ...`).
func (h *Host) Namespace() string { return h.ns }

// Addr returns the host's first address given by Link, without the prefix
// length, or the zero Addr if it has none.
func (h *Host) Addr() netip.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.addrs) == 0 {
		return netip.Addr{}
	}
	return h.addrs[0].Addr()
}

// Name returns the name given to Switch.
func (s *Switch) Name() string { return s.name }

// newNS makes a namespace with lo up for a new Host or Switch.
func (n *Net) newNS(name string) string {
	n.t.Helper()
	if !nameRE.MatchString(name) {
		n.t.Fatalf("topo: bad name %q: want %s", name, nameRE)
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		n.t.Fatalf("topo: %s: Net already closed", name)
	}
	if n.names[name] {
		n.mu.Unlock()
		n.t.Fatalf("topo: name %q used twice", name)
	}
	n.names[name] = true
	ns := n.prefix + name
	// Recorded before it exists so that Close removes a half-made namespace.
	n.nss = append(n.nss, ns)
	n.mu.Unlock()

	n.must("ip", "netns", "add", ns)
	n.must("ip", "-n", ns, "link", "set", "lo", "up")
	return ns
}

// Host adds a namespace with loopback up.
func (n *Net) Host(name string) *Host {
	n.t.Helper()
	return &Host{n: n, name: name, ns: n.newNS(name)}
}

// Switch adds a bridge in a namespace of its own.
func (n *Net) Switch(name string) *Switch {
	n.t.Helper()
	s := &Switch{n: n, name: name, ns: n.newNS(name)}
	n.must("ip", "-n", s.ns, "link", "add", "br0", "type", "bridge")
	n.must("ip", "-n", s.ns, "link", "set", "br0", "up")
	return s
}

// Link plugs h into s with a veth pair, gives the host end the address cidr
// (such as "10.99.0.2/24") and brings both ends up. It returns the name of
// the host's interface ("eth0", "eth1", ... in the order of h's links), for
// Netem, Delay, Loss and SetLinkUp.
func (n *Net) Link(h *Host, s *Switch, cidr string) string {
	n.t.Helper()
	pfx, err := netip.ParsePrefix(cidr)
	if err != nil {
		n.t.Fatalf("topo: link %s-%s: address %q: %v", h.name, s.name, cidr, err)
	}
	h.mu.Lock()
	ifname := fmt.Sprintf("eth%d", h.nextIf)
	h.nextIf++
	h.addrs = append(h.addrs, pfx)
	h.mu.Unlock()
	s.mu.Lock()
	port := fmt.Sprintf("p%d", s.nextPort)
	s.nextPort++
	s.mu.Unlock()

	// The peer is created straight into the switch's namespace: neither end
	// ever exists in the root namespace, so names cannot collide there.
	n.must("ip", "-n", h.ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", s.ns)
	n.must("ip", "-n", s.ns, "link", "set", port, "master", "br0", "up")
	n.must("ip", "-n", h.ns, "addr", "add", pfx.String(), "dev", ifname)
	n.must("ip", "-n", h.ns, "link", "set", ifname, "up")
	return ifname
}

// Router adds a host linked to wan (address wanCIDR) and to lan (address
// lanCIDR) that forwards between them and masquerades what leaves on the WAN
// side, like a home router. Hosts on lan reach the WAN with
// h.DefaultRoute(lanAddress). Its WAN interface is "eth0", its LAN one "eth1".
func (n *Net) Router(name string, wan *Switch, wanCIDR string, lan *Switch, lanCIDR string) *Host {
	n.t.Helper()
	r := n.Host(name)
	wanIf := n.Link(r, wan, wanCIDR)
	n.Link(r, lan, lanCIDR)
	// Written through /proc/sys in the namespace because sysctl(8) (procps)
	// is not on every minimal image.
	n.must("ip", "netns", "exec", r.ns, "sh", "-c",
		"echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
	fw, err := pickFirewall()
	if err != nil {
		unavailable(n.t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if err := fw.masquerade(ctx, r.ns, wanIf); err != nil {
		n.t.Fatalf("topo: router %s: masquerade: %v", name, err)
	}
	return r
}

// DefaultRoute sends everything without a more specific route to gw.
func (h *Host) DefaultRoute(gw string) {
	h.n.t.Helper()
	h.n.must("ip", "-n", h.ns, "route", "replace", "default", "via", gw)
}

// Run runs a command in the host's namespace and returns its standard
// output. On failure the error carries the exit status and standard error.
func (h *Host) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return run(ctx, nil, "ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
}

// Command returns a command that runs in the host's namespace, for long-lived
// processes: ctx ending kills it. `ip netns exec` execs the program in its
// own place, so the process of the Cmd is the program itself and killing it
// kills the program. Whatever is left running when the Net closes is killed.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	h.n.mu.Lock()
	h.n.cmds = append(h.n.cmds, cmd)
	h.n.mu.Unlock()
	return cmd
}

// The fault injections below return errors instead of failing the test:
// they are often called mid-test from other goroutines, and what the kernel
// supports varies (netem is a module some kernels lack).

// DropUDP drops every UDP packet the host receives, sends or forwards on
// its network interfaces (loopback stays open), as a firewall that lets only
// TCP through would. On a Router it blocks UDP for the whole LAN behind it.
func (h *Host) DropUDP() error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	fw, err := pickFirewall()
	if err != nil {
		return err
	}
	return fw.dropUDP(ctx, h.ns, true)
}

// AllowUDP undoes DropUDP.
func (h *Host) AllowUDP() error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	fw, err := pickFirewall()
	if err != nil {
		return err
	}
	return fw.dropUDP(ctx, h.ns, false)
}

// Netem replaces the root qdisc of iface with netem and the given
// parameters, such as "delay 50ms 10ms loss 5%". If the kernel has no netem
// the error matches errors.ErrUnsupported; Loss and Delay work without it.
func (h *Host) Netem(iface, params string) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	args := append([]string{"-n", h.ns, "qdisc", "replace", "dev", iface, "root", "netem"}, strings.Fields(params)...)
	_, err := run(ctx, nil, "tc", args...)
	if err != nil && strings.Contains(err.Error(), "qdisc kind is unknown") {
		return fmt.Errorf("topo: netem on %s/%s: %w (%v)", h.name, iface, errors.ErrUnsupported, err)
	}
	return err
}

// ClearNetem removes what Netem set on iface.
func (h *Host) ClearNetem(iface string) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	_, err := run(ctx, nil, "tc", "-n", h.ns, "qdisc", "del", "dev", iface, "root")
	return err
}

// Loss drops percent (0-100) of the packets leaving the host through iface,
// sent or forwarded, at random; 0 removes the loss. It uses nftables, not
// netem, so it works on kernels without netem.
func (h *Host) Loss(iface string, percent int) error {
	if percent < 0 || percent > 100 {
		return fmt.Errorf("topo: loss %d%%: want 0-100", percent)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		return fmt.Errorf("topo: loss needs nft: %w", errors.ErrUnsupported)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	table := "topo_loss_" + iface
	script := fmt.Sprintf("table inet %s {}\ndelete table inet %s\n", table, table)
	if percent > 0 {
		match := fmt.Sprintf("numgen random mod 100 < %d ", percent)
		if percent == 100 {
			match = "" // nft rejects "< 100" against a 0-99 range
		}
		script += fmt.Sprintf(`table inet %s {
	chain post {
		type filter hook postrouting priority 0; policy accept;
		oifname %q %sdrop
	}
}
`, table, iface, match)
	}
	_, err := run(ctx, strings.NewReader(script), "ip", "netns", "exec", h.ns, "nft", "-f", "-")
	return err
}

// NoGSO makes the host hand iface one wire packet at a time: the kernel
// segments TCP (TSO) and UDP (UDP_SEGMENT, which wireguard-go uses) super-
// packets before they leave. Without it a veth carries a 64 KB super-packet
// as one, and Loss or Delay further along act on the whole burst of up to
// 45 packets at once, which is not what a lossy WAN does.
func (h *Host) NoGSO(iface string) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	_, err := run(ctx, nil, "ip", "-n", h.ns, "link", "set", "dev", iface, "gso_max_segs", "1")
	return err
}

// SetLinkUp brings iface up or down: a cable pulled, a partition.
func (h *Host) SetLinkUp(iface string, up bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	state := "down"
	if up {
		state = "up"
	}
	_, err := run(ctx, nil, "ip", "-n", h.ns, "link", "set", iface, state)
	return err
}

// must runs a setup command and fails the test if it fails.
func (n *Net) must(name string, args ...string) {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if _, err := run(ctx, nil, name, args...); err != nil {
		n.t.Fatalf("topo: %v", err)
	}
}

// run runs a command with optional standard input and returns its standard
// output; the error names the command and carries its standard error.
func run(ctx context.Context, stdin *strings.Reader, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// deleteNS kills whatever still runs in ns, then deletes it. A namespace
// that does not exist is not an error.
func deleteNS(ctx context.Context, ns string) error {
	out, err := run(ctx, nil, "ip", "netns", "pids", ns)
	if err != nil {
		if strings.Contains(err.Error(), "No such file") {
			return nil
		}
		return err
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if _, err := run(ctx, nil, "ip", "netns", "del", ns); err != nil && !strings.Contains(err.Error(), "No such file") {
		return err
	}
	return nil
}

// sweepLeftovers deletes the namespaces of test processes that are gone:
// what a run killed before its cleanups ran left behind.
func sweepLeftovers() {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	out, err := run(ctx, nil, "ip", "netns", "list")
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || !strings.HasPrefix(fields[0], nsPrefix) {
			continue
		}
		ns := fields[0]
		pidStr, _, ok := strings.Cut(strings.TrimPrefix(ns, nsPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			continue // its owner still runs: a parallel test binary
		}
		_ = deleteNS(ctx, ns)
	}
}
