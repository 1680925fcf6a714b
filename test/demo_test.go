package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
// sample service answered through the mesh.
func TestDemo(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed (.ci/run installs it)")
	}
	bin, hello := harness.Binary(t), harness.Build(t, "./examples/hello")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("..", "scripts", "demo.sh"))
	dir := t.TempDir()
	cmd.Env = append(os.Environ(),
		"MESHLINK_DEMO_ONESHOT=1", "BIN="+bin, "HELLO="+hello, "DEMO_DIR="+dir,
		fmt.Sprintf("COORD_PORT=%d", freeTCPPort(t)), fmt.Sprintf("WEB_PORT=%d", freeTCPPort(t)),
		fmt.Sprintf("DNS_PORT=%d", freeTCPPort(t)), fmt.Sprintf("METRICS_PORT=%d", freeTCPPort(t)),
		"PROXY_RANGE_A=127.160.0.0/16", "PROXY_RANGE_B=127.161.0.0/16")
	out, err := cmd.CombinedOutput()
	if err != nil {
		logs, _ := exec.Command("sh", "-c", "tail -n 400 "+dir+"/*.log").CombinedOutput()
		t.Fatalf("demo failed: %v\n%s\n%s", err, out, logs)
	}
	if !strings.Contains(string(out), "hello from site-b, through meshlink") {
		t.Fatalf("demo did not reach the service:\n%s", out)
	}
}
