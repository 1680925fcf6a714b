package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// startProc runs a long-lived command in h and stops it at the end of the
// test, keeping its output in a log file shown on failure.
func startProc(t *testing.T, h *topo.Host, logName string, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd, _ := startCmd(t, h, logName, nil, name, args...)
	return cmd
}

// startCmd is startProc with setup (working directory, environment, user)
// done by prepare before the command starts; it also returns the path of
// the command's log.
func startCmd(t *testing.T, h *topo.Host, logName string, prepare func(*exec.Cmd), name string, args ...string) (*exec.Cmd, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, name, args...)
	if prepare != nil {
		prepare(cmd)
	}
	logPath := filepath.Join(t.TempDir(), logName+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		harness.StopProcess(cmd)
		cancel()
		f.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("--- %s log ---\n%s", logName, b)
		}
	})
	return cmd, logPath
}

// TestNetnsHTTPByName runs the built binary as real processes: a coordinator
// and two sites, each in its own network namespace, joined by a bridge. A
// real HTTP server at site B is fetched by name with curl at site A, through
// the agent's DNS and the encrypted tunnel.
func TestNetnsHTTPByName(t *testing.T) {
	n := topo.New(t)
	bin := harness.Binary(t)
	hello := harness.Build(t, "./examples/hello")
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is needed (installed by .ci/run): ", err)
	}

	lan := n.Switch("lan")
	coord, siteA, siteB := n.Host("coord"), n.Host("sitea"), n.Host("siteb")
	n.Link(coord, lan, "10.77.0.1/24")
	n.Link(siteA, lan, "10.77.0.2/24")
	n.Link(siteB, lan, "10.77.0.3/24")

	// Site A's processes resolve names through its agent: `ip netns exec`
	// mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf.
	rdir := filepath.Join("/etc/netns", siteA.Namespace())
	if err := os.MkdirAll(rdir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(rdir) })
	if err := os.WriteFile(filepath.Join(rdir, "resolv.conf"), []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	startProc(t, coord, "coordinator", bin, "coordinator", "--listen", "10.77.0.1:8443", "--data", data)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var token string
	tstest.WaitForNil(t, 20*time.Second, "a join token", func() error {
		out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
		token = strings.TrimSpace(string(out))
		return err
	})
	// A single-use token per site, as a careful operator would.
	out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
	if err != nil {
		t.Fatal(err)
	}
	tokenB := strings.TrimSpace(string(out))

	startProc(t, siteB, "hello", hello, "--listen", "127.0.0.1:8000", "--site", "siteb")
	startProc(t, siteB, "agent-b", bin, "agent", "--join", tokenB, "--name", "siteb", "--state", filepath.Join(dir, "b"),
		"--dns", "off", "--expose", "web=127.0.0.1:8000")
	startProc(t, siteA, "agent-a", bin, "agent", "--join", token, "--name", "sitea", "--state", filepath.Join(dir, "a"),
		"--dns", "127.0.0.1:53", "--dns-upstream", "10.77.0.1:53")

	tstest.WaitForNil(t, 30*time.Second, "web to reach site A", func() error {
		out, err := siteA.Run(ctx, bin, "services", "--json", "--state", filepath.Join(dir, "a"))
		if err != nil {
			return err
		}
		var s localapi.Services
		if err := json.Unmarshal(out, &s); err != nil {
			return err
		}
		for _, sv := range s.Consumed {
			if sv.Name == "web" && sv.Listening && len(sv.Providers) == 1 {
				return nil
			}
		}
		return fmt.Errorf("services: %s", out)
	})

	if _, err := exec.LookPath("dig"); err == nil {
		out, err := siteA.Run(ctx, "dig", "+short", "@127.0.0.1", "web.mesh.internal")
		if err != nil || strings.TrimSpace(string(out)) != "127.100.0.1" {
			t.Fatalf("dig web.mesh.internal = %q, %v; want 127.100.0.1", out, err)
		}
	}

	var body []byte
	tstest.WaitForNil(t, 20*time.Second, "curl by name", func() error {
		body, err = siteA.Run(ctx, "curl", "-sS", "--max-time", "5", "http://web.mesh.internal:8000/")
		if err != nil {
			return err
		}
		if !strings.Contains(string(body), "hello from siteb") {
			return errors.New("unexpected body: " + string(body))
		}
		return nil
	})
	t.Logf("curl http://web.mesh.internal:8000/ at site A: %s", strings.TrimSpace(string(body)))

	// The request came through the tunnel to site B, and (on one bridge) the
	// path between the sites becomes direct. The first packets may go over
	// the relay while the direct path is being proven, hence the poll.
	tstest.WaitForNil(t, 10*time.Second, "a direct path to site B", func() error {
		out, err := siteA.Run(ctx, bin, "status", "--json", "--state", filepath.Join(dir, "a"))
		if err != nil {
			return err
		}
		// `status --json` as scripts read it.
		var st struct {
			Peers []struct {
				Name          string  `json:"name"`
				Path          string  `json:"path"`
				Endpoint      *string `json:"endpoint"`
				ReceivedBytes uint64  `json:"received_bytes"`
			} `json:"peers"`
		}
		if err := json.Unmarshal(out, &st); err != nil {
			return err
		}
		if len(st.Peers) != 1 || st.Peers[0].Name != "siteb" || st.Peers[0].ReceivedBytes == 0 || st.Peers[0].Path != "direct" ||
			st.Peers[0].Endpoint == nil || !strings.HasPrefix(*st.Peers[0].Endpoint, "10.77.0.3:") {
			return fmt.Errorf("site A's peers: %s", out)
		}
		return nil
	})
}
