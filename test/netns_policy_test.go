package test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// nsDialer dials from inside a namespace, for x/net/proxy.
type nsDialer struct{ h *topo.Host }

func (d nsDialer) Dial(network, addr string) (net.Conn, error) {
	return d.h.Dial(context.Background(), network, addr)
}

// TestNetnsPolicy: real processes in namespaces, the policy set with the
// CLI. A member's site that the policy does not let reach web gets
// NXDOMAIN for it, and a connection it makes around its map (SOCKS5 to
// the provider's node name and port) is refused by the provider and
// counted there; a policy change lets it in within a second or so; taking
// it back closes the connection it holds open.
func TestNetnsPolicy(t *testing.T) {
	n := topo.New(t)
	bin := harness.Binary(t)
	for _, tool := range []string{"dig", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (installed by .ci/run): %v", tool, err)
		}
	}
	lan := n.Switch("lan")
	coord, siteA, siteB := n.Host("coord"), n.Host("sitea"), n.Host("siteb")
	n.Link(coord, lan, "10.78.0.1/24")
	n.Link(siteA, lan, "10.78.0.2/24")
	n.Link(siteB, lan, "10.78.0.3/24")

	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	startProc(t, coord, "coordinator", bin, "coordinator", "--listen", "10.78.0.1:8443", "--data", data)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	run := func(h *topo.Host, args ...string) string {
		t.Helper()
		out, err := h.Run(ctx, bin, args...)
		if err != nil {
			t.Fatalf("meshlink %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	var tokenB string
	tstest.WaitForNil(t, 20*time.Second, "a join token", func() error {
		out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
		tokenB = strings.TrimSpace(string(out))
		return err
	})
	run(coord, "users", "add", "alice", "--data", data)
	tokenA := run(coord, "token", "create", "--user", "alice", "--data", data)

	policyFile := filepath.Join(dir, "policy.yaml")
	setPolicy := func(aliceWeb bool) string {
		t.Helper()
		to := "[pub]"
		if aliceWeb {
			to = "[pub, web]"
		}
		text := fmt.Sprintf("rules:\n  - from: [autogroup:admin]\n    to: [\"*\"]\n  - from: [user:alice]\n    to: %s\n", to)
		if err := os.WriteFile(policyFile, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		if out := run(coord, "policy", "check", policyFile); !strings.HasSuffix(out, ": ok (2 rules, 0 tests passed)") {
			t.Fatalf("policy check: %s", out)
		}
		return run(coord, "policy", "set", policyFile, "--data", data)
	}
	setPolicy(false)

	for port, greeting := range map[int]string{8000: "web", 8001: "pub"} {
		ln, err := siteB.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		serveStream(t, ln, greeting)
	}
	startProc(t, siteB, "agent-b", bin, "agent", "--join", tokenB, "--name", "siteb", "--state", filepath.Join(dir, "b"),
		"--dns", "off", "--expose", "web=127.0.0.1:8000,pub=127.0.0.1:8001", "--metrics", "127.0.0.1:9091")
	startProc(t, siteA, "agent-a", bin, "agent", "--join", tokenA, "--name", "sitea", "--state", filepath.Join(dir, "a"),
		"--dns", "127.0.0.1:53", "--dns-upstream", "10.78.0.1:53", "--socks5", "127.0.0.1:1080")

	services := func() map[string]localapi.Service {
		out, err := siteA.Run(ctx, bin, "services", "--json", "--state", filepath.Join(dir, "a"))
		if err != nil {
			return nil
		}
		var s localapi.Services
		if json.Unmarshal(out, &s) != nil {
			return nil
		}
		m := map[string]localapi.Service{}
		for _, sv := range s.Consumed {
			m[sv.Name] = sv
		}
		return m
	}
	tstest.WaitForNil(t, 30*time.Second, "pub to reach site A", func() error {
		if sv, ok := services()["pub"]; !ok || !sv.Listening || len(sv.Providers) != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	if _, ok := services()["web"]; ok {
		t.Fatal("site A lists web, which the policy does not let it reach")
	}
	out, _ := siteA.Run(ctx, "dig", "@127.0.0.1", "web.mesh.internal")
	if !strings.Contains(string(out), "status: NXDOMAIN") {
		t.Errorf("dig web.mesh.internal at site A:\n%s\nwant NXDOMAIN", out)
	}

	// Around its map: straight to the provider's port for web.
	socks, err := xproxy.SOCKS5("tcp", "127.0.0.1:1080", nil, nsDialer{siteA})
	if err != nil {
		t.Fatal(err)
	}
	if c, err := socks.Dial("tcp", "siteb.node.mesh.internal:8000"); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Fatalf("site A read %q from web around its map", b)
		}
	}
	denied := regexp.MustCompile(`meshlink_agent_connections_denied_total\{service="web"\} (\d+)`)
	tstest.WaitForNil(t, 10*time.Second, "site B to count the denial", func() error {
		out, err := siteB.Run(ctx, "curl", "-sS", "http://127.0.0.1:9091/metrics")
		if err != nil {
			return err
		}
		m := denied.FindSubmatch(out)
		if m == nil {
			return errors.New("no denial counted for web")
		}
		if v, _ := strconv.Atoi(string(m[1])); v < 1 {
			return errors.New("0 denials")
		}
		return nil
	})

	// Allowed by a change: time from `policy set` returning to a
	// connection through the mesh that gets web's greeting.
	start := time.Now()
	t.Logf("meshlink policy set:\n%s", setPolicy(true))
	var conn net.Conn
	var local string
	tstest.WaitForNil(t, 10*time.Second, "site A to reach web after the change", func() error {
		sv, ok := services()["web"]
		if !ok || !sv.Listening {
			return errors.New("web not listening at site A yet")
		}
		local = sv.Local.String()
		c, err := siteA.Dial(ctx, "tcp", local)
		if err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "web" {
			c.Close()
			return fmt.Errorf("greeting %q, %v", line, err)
		}
		c.SetReadDeadline(time.Time{})
		conn = c
		return nil
	})
	t.Logf("site A reached web %v after `meshlink policy set` started", time.Since(start))
	defer conn.Close()
	echoIntact(t, conn, 64<<10)

	// Revoked with the connection open: the provider closes it.
	start = time.Now()
	t.Logf("meshlink policy set:\n%s", setPolicy(false))
	conn.SetReadDeadline(start.Add(10 * time.Second))
	buf := make([]byte, 1024)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			t.Fatalf("read %d bytes on a connection the policy no longer allows", n)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the connection is still open 10 s after the revocation")
		}
		if err != nil {
			break
		}
	}
	t.Logf("site A's open connection to web closed %v after `meshlink policy set` started", time.Since(start))
	tstest.WaitForNil(t, 10*time.Second, "web to leave site A's services", func() error {
		if _, ok := services()["web"]; ok {
			return errors.New("still listed")
		}
		return nil
	})
}
