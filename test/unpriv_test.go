package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// asNobody runs what follows it as the unprivileged user nobody.
var asNobody = []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"}

// needCommands fails (or skips, as topo.Require does) unless every command
// is installed; .ci/run installs them.
func needCommands(t *testing.T, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			if os.Getenv("MESHLINK_REQUIRE_NETNS") == "1" {
				t.Fatalf("%s is needed (installed by .ci/run): %v", c, err)
			}
			t.Skipf("%s not installed (.ci/run installs it): %v", c, err)
		}
	}
}

// TestNetnsUnprivileged: a consuming site whose agent runs as nobody (no
// capability at all, state directory owned by nobody) reaches a web
// service on port 80 and a real sshd on port 22 at another site: curl
// through its SOCKS5 and HTTP proxies, `meshlink connect`, and ssh through
// `meshlink connect --stdio` (BatchMode, a known_hosts written here).
// `services` reports each privileged port served on port+10000, and a real
// dnsmasq configured from `meshlink dns install --dry-run` resolves mesh
// names through the agent (SRV with the fallback port) while other names
// still go to a local upstream.
func TestNetnsUnprivileged(t *testing.T) {
	n := topo.New(t)
	needCommands(t, "curl", "dig", "ssh", "ssh-keygen", "sshd", "dnsmasq", "setpriv")
	sshd, _ := exec.LookPath("sshd") // sshd wants an absolute path
	bin := harness.Binary(t)
	hello := harness.Build(t, "./examples/hello")

	lan := n.Switch("lan")
	coord, prov, cons := n.Host("coord"), n.Host("prov"), n.Host("cons")
	n.Link(coord, lan, "10.79.0.1/24")
	n.Link(prov, lan, "10.79.0.3/24")
	n.Link(cons, lan, "10.79.0.2/24")

	// What nobody runs and writes lives in a directory it can reach
	// (t.TempDir is 0700 root).
	pub, err := os.MkdirTemp("", "meshlink-nobody")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	nbin := filepath.Join(pub, "meshlink")
	copyFile(t, bin, nbin, 0o755)
	state := filepath.Join(pub, "a")
	keys := filepath.Join(pub, "ssh")
	for _, d := range []string{state, keys} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	run := func(h *topo.Host, name string, args ...string) string {
		t.Helper()
		out, err := h.Run(ctx, name, args...)
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	// nobody is the argument list after "setpriv" that runs args as nobody.
	nobody := func(args ...string) []string { return append(append([]string(nil), asNobody[1:]...), args...) }
	const setpriv = "setpriv"

	// sshd at the provider on 127.0.0.1:22, with keys made here.
	sdir := t.TempDir()
	run(prov, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(sdir, "hostkey"))
	run(prov, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(keys, "id"))
	userPub, _ := os.ReadFile(filepath.Join(keys, "id.pub"))
	os.WriteFile(filepath.Join(sdir, "authorized_keys"), userPub, 0o600)
	hostPub, _ := os.ReadFile(filepath.Join(sdir, "hostkey.pub"))
	f := strings.Fields(string(hostPub))
	os.WriteFile(filepath.Join(keys, "known_hosts"), []byte("ssh.mesh.internal "+f[0]+" "+f[1]+"\n"), 0o644)
	os.WriteFile(filepath.Join(sdir, "sshd_config"), []byte(fmt.Sprintf(`Port 22
ListenAddress 127.0.0.1
HostKey %[1]s/hostkey
AuthorizedKeysFile %[1]s/authorized_keys
PidFile %[1]s/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
`, sdir)), 0o600)
	os.MkdirAll("/run/sshd", 0o755) // sshd's privilege separation directory
	for _, p := range []string{keys, filepath.Join(keys, "id"), filepath.Join(keys, "known_hosts"), state} {
		os.Chown(p, 65534, 65534)
	}
	startProc(t, prov, "sshd", sshd, "-D", "-e", "-f", filepath.Join(sdir, "sshd_config"))
	startProc(t, prov, "hello", hello, "--listen", "127.0.0.1:80", "--site", "prov")

	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	startProc(t, coord, "coordinator", bin, "coordinator", "--listen", "10.79.0.1:8443", "--data", data)
	var tokens []string
	tstest.WaitForNil(t, 20*time.Second, "join tokens", func() error {
		out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
		if err == nil {
			tokens = append(tokens, strings.TrimSpace(string(out)))
		}
		if err == nil && len(tokens) < 2 {
			return errors.New("one more")
		}
		return err
	})
	startProc(t, prov, "agent-prov", bin, "agent", "--join", tokens[0], "--name", "prov", "--state", filepath.Join(dir, "p"),
		"--dns", "off", "--expose", "web=127.0.0.1:80", "--expose", "ssh=127.0.0.1:22")
	// No --dns: port 53 needs privileges, so the agent serves 5353.
	_, agentLog := startCmd(t, cons, "agent-cons", nil, setpriv, nobody(nbin, "agent", "--join", tokens[1], "--name", "cons",
		"--state", state, "--socks5", "127.0.0.1:1080", "--http-proxy", "127.0.0.1:3128", "--dns-upstream", "127.0.0.1:5400")...)

	// services: both privileged ports served on port+10000, and why.
	var svcs localapi.Services
	tstest.WaitForNil(t, 30*time.Second, "web and ssh at the consumer", func() error {
		out, err := cons.Run(ctx, setpriv, nobody(nbin, "services", "--json", "--state", state)...)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		svcs = localapi.Services{}
		if err := json.Unmarshal(out, &svcs); err != nil {
			return err
		}
		up := 0
		for _, s := range svcs.Consumed {
			if s.Listening && len(s.Providers) == 1 {
				up++
			}
		}
		if up != 2 {
			return fmt.Errorf("services: %s", out)
		}
		return nil
	})
	for _, s := range svcs.Consumed {
		want := map[string]uint16{"web": 80, "ssh": 22}[s.Name]
		if s.Port != want || s.FallbackPort != want+10000 || s.Local.Port() != want+10000 || !strings.Contains(s.Note, "setcap cap_net_bind_service=+ep") {
			t.Errorf("service %s as nobody: %+v; want port %d served on %d, with the setcap hint", s.Name, s, want, want+10000)
		}
	}
	// The agent really is nobody: what it wrote is nobody's.
	if fi, err := os.Stat(filepath.Join(state, "node.key")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
		t.Fatalf("node.key: %v, %v; want it written by nobody", fi, err)
	}
	text := run(cons, setpriv, nobody(nbin, "services", "--state", state)...)
	t.Logf("services as nobody:\n%s", text)
	if !strings.Contains(text, "port 80 needs privileges") || strings.Contains(text, "--proxy-range") {
		t.Errorf("services as text does not explain the fallback:\n%s", text)
	}
	if b, _ := os.ReadFile(agentLog); !strings.Contains(string(b), "for_the_real_port") {
		t.Errorf("the agent's log does not say how to get the real port:\n%s", b)
	}

	get := func(what string, args ...string) {
		t.Helper()
		out := run(cons, "curl", append([]string{"-sS", "--max-time", "10"}, args...)...)
		if !strings.Contains(out, "hello from prov") {
			t.Errorf("%s: %q, want prov's page", what, out)
		}
	}
	get("SOCKS5", "--socks5-hostname", "127.0.0.1:1080", "http://web.mesh.internal/")
	get("HTTP proxy", "-x", "http://127.0.0.1:3128", "http://web.mesh.internal/")

	// meshlink connect, to a local port.
	_, connLog := startCmd(t, cons, "connect", nil, setpriv, nobody(nbin, "connect", "web", "--state", state, "--listen", "127.0.0.1:18080")...)
	tstest.WaitFor(t, 10*time.Second, "connect to listen", func() bool {
		b, _ := os.ReadFile(connLog)
		return strings.Contains(string(b), "127.0.0.1:18080")
	})
	get("meshlink connect", "http://127.0.0.1:18080/")

	// A real ssh session through connect --stdio.
	out := run(cons, setpriv, nobody("ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
		"-o", "UserKnownHostsFile="+filepath.Join(keys, "known_hosts"), "-i", filepath.Join(keys, "id"),
		"-o", "ProxyCommand="+nbin+" connect --stdio ssh --state "+state, "root@ssh.mesh.internal", "echo", "ssh-through-the-mesh")...)
	t.Logf("ssh through connect --stdio: %s", out)
	if strings.TrimSpace(out) != "ssh-through-the-mesh" {
		t.Errorf("ssh through connect --stdio: %q", out)
	}

	// A real resolver, configured from dns install's dry run, in front of
	// the agent and of an upstream of the test's own.
	plan := run(cons, setpriv, nobody(nbin, "dns", "install", "--dry-run", "--method", "dnsmasq", "--state", state)...)
	line := regexp.MustCompile(`(?m)^\s*(server=/mesh\.internal/127\.0\.0\.1#\d+)$`).FindStringSubmatch(plan)
	if line == nil || !strings.HasSuffix(line[1], "#5353") {
		t.Fatalf("dns install --dry-run gave no dnsmasq line for the agent on 5353:\n%s", plan)
	}
	rdir := t.TempDir()
	dnsmasq := func(name string, port int, conf string) {
		path := filepath.Join(rdir, name+".conf")
		os.WriteFile(path, []byte("no-resolv\nno-hosts\nlisten-address=127.0.0.1\nbind-interfaces\n"+conf), 0o644)
		startProc(t, cons, name, "dnsmasq", "--no-daemon", "--conf-file="+path, fmt.Sprintf("--port=%d", port), "--pid-file="+filepath.Join(rdir, name+".pid"))
	}
	dnsmasq("upstream", 5400, "address=/made-up.example/192.0.2.77\n")
	dnsmasq("resolver", 53, line[1]+"\nserver=127.0.0.1#5400\n")
	var webAddr string
	for _, s := range svcs.Consumed {
		if s.Name == "web" {
			webAddr = s.Local.Addr().String()
		}
	}
	for _, q := range []struct{ args, want string }{
		{"web.mesh.internal", webAddr},
		{"SRV _web._tcp.mesh.internal", "10080 web.mesh.internal."},
		{"made-up.example", "192.0.2.77"},
	} {
		tstest.WaitForNil(t, 10*time.Second, "dig "+q.args+" through dnsmasq", func() error {
			out, err := cons.Run(ctx, "dig", append([]string{"+short", "+time=2", "+tries=1", "@127.0.0.1"}, strings.Fields(q.args)...)...)
			if err != nil || !strings.Contains(string(out), q.want) {
				return fmt.Errorf("%q, %v; want %q", out, err, q.want)
			}
			t.Logf("dig %s through dnsmasq: %s", q.args, strings.TrimSpace(string(out)))
			return nil
		})
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}
