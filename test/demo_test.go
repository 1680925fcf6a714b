package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/test/harness"
)

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestDemo runs the README's `make demo` script end to end (on free ports,
// so it does not disturb a demo a developer is running) and checks that the
// sample service answered through the mesh, by its local address and by
// name through the SOCKS5 proxy the demo turns on. Port 5353 is held busy
// (as mDNS often holds it): the demo must pick another DNS port, say which,
// and answer there.
func TestDemo(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed (.ci/run installs it)")
	}
	bin, hello := harness.Binary(t), harness.Build(t, "./examples/hello")
	if pc, err := net.ListenPacket("udp", "127.0.0.1:5353"); err == nil {
		defer pc.Close() // else someone else holds it: busy either way
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("..", "scripts", "demo.sh"))
	dir := t.TempDir()
	cmd.Env = append(os.Environ(),
		"MESHLINK_DEMO_ONESHOT=1", "BIN="+bin, "HELLO="+hello, "DEMO_DIR="+dir,
		fmt.Sprintf("COORD_PORT=%d", freeTCPPort(t)), fmt.Sprintf("WEB_PORT=%d", freeTCPPort(t)),
		fmt.Sprintf("METRICS_PORT=%d", freeTCPPort(t)), fmt.Sprintf("SOCKS_PORT=%d", freeTCPPort(t)),
		fmt.Sprintf("HTTP_PROXY_PORT=%d", freeTCPPort(t)),
		"PROXY_RANGE_A=127.160.0.0/16", "PROXY_RANGE_B=127.161.0.0/16")
	cmd.Env = append(cmd.Env, "DNS_PORT=") // the demo picks it
	out, err := cmd.CombinedOutput()
	if err != nil {
		logs, _ := exec.Command("sh", "-c", "tail -n 400 "+dir+"/*.log").CombinedOutput()
		t.Fatalf("demo failed: %v\n%s\n%s", err, out, logs)
	}
	if n := strings.Count(string(out), "hello from site-b, through meshlink"); n != 2 {
		t.Fatalf("demo reached the service %d times, want 2 (local address, then SOCKS5):\n%s", n, out)
	}
	if !strings.Contains(string(out), "$ curl --socks5-hostname 127.0.0.1:") {
		t.Fatalf("demo does not show the SOCKS5 way:\n%s", out)
	}
	m := regexp.MustCompile(`DNS on 127\.0\.0\.1:(\d+) \(DNS_PORT\)`).FindStringSubmatch(string(out))
	if m == nil || m[1] == "5353" {
		t.Fatalf("demo's DNS port: %v, want another than the busy 5353, printed:\n%s", m, out)
	}
	if _, err := exec.LookPath("dig"); err == nil && !strings.Contains(string(out), "\n127.160.0.1\n") {
		t.Fatalf("dig at the demo's DNS port %s did not answer web.mesh.internal:\n%s", m[1], out)
	}
}
