package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// TestNetnsPodSidecar plays a Kubernetes pod: an application and a
// sidecar agent share one network namespace (and, with unshare --uts, a
// host name: the pod's name), and the agent is configured by MESHLINK_*
// variables only, its token read from a file as from a mounted Secret.
// The application reaches a service at another site by name through the
// pod's /etc/resolv.conf (nameserver 127.0.0.1: the sidecar on port 53),
// /readyz turns ready, the site reaches the pod's own port through the
// mesh, and SIGTERM removes the node from the site's map within 2s with
// exit status 0. A second pod of the same name with no state joins
// cleanly, and a third one elsewhere with the same name replaces it while
// it still runs (a pod rescheduled before its predecessor's stream timed
// out). Start to ready and idle RSS are measured and logged.
func TestNetnsPodSidecar(t *testing.T) {
	n := topo.New(t)
	needCommands(t, "curl", "unshare", "hostname")
	bin := harness.Binary(t)
	hello := harness.Build(t, "./examples/hello")

	lan := n.Switch("lan")
	coord, site, pod, podB := n.Host("coord"), n.Host("site"), n.Host("pod"), n.Host("podb")
	n.Link(coord, lan, "10.83.0.1/24")
	n.Link(site, lan, "10.83.0.2/24")
	n.Link(pod, lan, "10.83.0.3/24")
	n.Link(podB, lan, "10.83.0.4/24")
	for _, h := range []*topo.Host{pod, podB} {
		rdir := filepath.Join("/etc/netns", h.Namespace())
		if err := os.MkdirAll(rdir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(rdir) })
		if err := os.WriteFile(filepath.Join(rdir, "resolv.conf"), []byte("nameserver 127.0.0.1\nsearch mesh.internal\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	startProc(t, coord, "coordinator", bin, "coordinator", "--listen", "10.83.0.1:8443", "--data", data)
	var siteToken string
	tstest.WaitForNil(t, 20*time.Second, "a join token", func() error {
		out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
		siteToken = strings.TrimSpace(string(out))
		return err
	})
	// The pods' token, as kept in a Secret: reusable and ephemeral.
	out, err := coord.Run(ctx, bin, "token", "create", "--reusable", "--ephemeral", "--data", data)
	if err != nil {
		t.Fatalf("token create: %v\n%s", err, out)
	}
	secret := filepath.Join(dir, "secret")
	os.Mkdir(secret, 0o700)
	if err := os.WriteFile(filepath.Join(secret, "token"), out, 0o600); err != nil {
		t.Fatal(err)
	}

	siteState := filepath.Join(dir, "site")
	startProc(t, site, "hello-site", hello, "--listen", "127.0.0.1:8000", "--site", "site")
	startProc(t, site, "agent-site", bin, "agent", "--join", siteToken, "--name", "site", "--state", siteState,
		"--dns", "off", "--expose", "web=127.0.0.1:8000", "--expose", "db=127.0.0.1:5432", "--expose", "cache=127.0.0.1:6379")

	const podName = "web-7f9c4-abcde"
	// startPod starts the pod's application and its sidecar in h, the
	// sidecar with a fresh state directory (an emptyDir).
	startPod := func(h *topo.Host, label string) (*exec.Cmd, time.Time) {
		startProc(t, h, "app-"+label, hello, "--listen", "127.0.0.1:8080", "--site", label)
		state := filepath.Join(t.TempDir(), "state")
		env := []string{
			"PATH=" + os.Getenv("PATH"),
			"MESHLINK_JOIN_FILE=" + filepath.Join(secret, "token"),
			"MESHLINK_STATE=" + state,
			"MESHLINK_DNS_UPSTREAM=10.83.0.1:53",
			// The app's port, and a second one: a few services in all.
			"MESHLINK_EXPOSE=app=127.0.0.1:8080,admin=127.0.0.1:8081",
			"MESHLINK_HEALTH_LISTEN=127.0.0.1:9099",
			"MESHLINK_DRAIN_TIMEOUT=5s",
			"MESHLINK_LOG_LEVEL=debug",
		}
		start := time.Now()
		// unshare and sh exec in place: the process signalled is the agent.
		cmd, _ := startCmd(t, h, "sidecar-"+label, func(c *exec.Cmd) { c.Env = env },
			"unshare", "--uts", "--", "sh", "-c", `hostname "$1" && exec "$0" agent`, bin, podName)
		return cmd, start
	}
	ready := func(h *topo.Host) error {
		out, err := h.Run(ctx, "curl", "-sS", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9099/readyz")
		if code := strings.TrimSpace(string(out)); err != nil || code != "200" {
			body, _ := h.Run(ctx, "curl", "-sS", "--max-time", "2", "http://127.0.0.1:9099/readyz")
			return fmt.Errorf("readyz %s %v: %s", code, err, body)
		}
		return nil
	}
	sitePeers := func() ([]localapi.Peer, error) {
		out, err := site.Run(ctx, bin, "status", "--json", "--state", siteState)
		if err != nil {
			return nil, fmt.Errorf("%v: %s", err, out)
		}
		var st localapi.Status
		if err := json.Unmarshal(out, &st); err != nil {
			return nil, err
		}
		return st.Peers, nil
	}
	hasPeer := func(ps []localapi.Peer, name string) bool {
		for _, p := range ps {
			if p.Name == name {
				return true
			}
		}
		return false
	}
	coordNodes := func() []string {
		out, err := coord.Run(ctx, bin, "nodes", "--json", "--data", data)
		if err != nil {
			t.Fatalf("nodes: %v\n%s", err, out)
		}
		var ns []struct {
			Name string `json:"name"`
		}
		if err := json.Unmarshal(out, &ns); err != nil {
			t.Fatalf("nodes --json: %v\n%s", err, out)
		}
		var names []string
		for _, n := range ns {
			names = append(names, n.Name)
		}
		return names
	}
	count := func(names []string, name string) int {
		c := 0
		for _, n := range names {
			if n == name {
				c++
			}
		}
		return c
	}

	// The first pod.
	sc, start := startPod(pod, "pod1")
	tstest.WaitForNil(t, 30*time.Second, "the sidecar's /readyz", func() error { return ready(pod) })
	startToReady := time.Since(start)
	rssReady := readRSS(t, sc.Process.Pid)
	// The goal is 1s; the bound leaves room for a loaded machine.
	if startToReady > 10*time.Second {
		t.Errorf("start to ready took %v; the goal is 1s", startToReady)
	}
	// The application reaches the site's service by its short name, the
	// pod's resolv.conf searching mesh.internal, as a pod's app would.
	var body []byte
	tstest.WaitForNil(t, 20*time.Second, "the app reaching web by name", func() error {
		body, err = pod.Run(ctx, "curl", "-sS", "--max-time", "5", "http://web:8000/")
		if err != nil {
			return fmt.Errorf("%v: %s", err, body)
		}
		if !strings.Contains(string(body), "hello from site") {
			return errors.New("unexpected body: " + string(body))
		}
		return nil
	})
	// The site reaches the pod's own port, exported by the sidecar.
	siteConn, _ := startCmd(t, site, "connect-app", nil, bin, "connect", "app", "--state", siteState, "--listen", "127.0.0.1:18080")
	_ = siteConn
	tstest.WaitForNil(t, 20*time.Second, "the site reaching the pod's app", func() error {
		b, err := site.Run(ctx, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:18080/")
		if err != nil || !strings.Contains(string(b), "hello from pod1") {
			return fmt.Errorf("%v: %s", err, b)
		}
		return nil
	})
	if names := coordNodes(); count(names, podName) != 1 {
		t.Fatalf("the coordinator's nodes %v: want one %s, the pod's host name", names, podName)
	}
	rss := readRSS(t, sc.Process.Pid)
	t.Logf("sidecar (2 services exported, 3 consumed): start to ready %v (curl through ip netns exec included); RSS at ready %d KiB, after a request each way %d KiB",
		startToReady.Round(time.Millisecond), rssReady, rss)

	// SIGTERM: drained (nothing open), left, exit 0, gone from the site's map.
	tstest.WaitForNil(t, 10*time.Second, "the pod among the site's peers", func() error {
		ps, err := sitePeers()
		if err == nil && !hasPeer(ps, podName) {
			err = fmt.Errorf("peers %+v", ps)
		}
		return err
	})
	term := time.Now()
	if err := sc.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	tstest.WaitForNil(t, 2*time.Second, "the pod gone from the site's map within 2s of SIGTERM", func() error {
		ps, err := sitePeers()
		if err == nil && hasPeer(ps, podName) {
			err = fmt.Errorf("still a peer: %+v", ps)
		}
		return err
	})
	gone := time.Since(term)
	waitErr := make(chan error, 1)
	go func() { waitErr <- sc.Wait() }()
	select {
	case err := <-waitErr:
		if err != nil {
			t.Fatalf("the sidecar's exit after SIGTERM: %v; want status 0", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the sidecar did not exit within 10s of SIGTERM")
	}
	t.Logf("SIGTERM to gone from the site's map: %v; to exit: %v", gone.Round(time.Millisecond), time.Since(term).Round(time.Millisecond))
	if names := coordNodes(); count(names, podName) != 0 {
		t.Fatalf("the coordinator still lists %s after it left: %v", podName, names)
	}

	// A second pod of the same name, no state: joins cleanly.
	sc2, start2 := startPod(pod, "pod2")
	tstest.WaitForNil(t, 30*time.Second, "the second pod's /readyz", func() error { return ready(pod) })
	t.Logf("second pod: start to ready %v", time.Since(start2).Round(time.Millisecond))
	tstest.WaitForNil(t, 20*time.Second, "the second pod's app reaching web", func() error {
		b, err := pod.Run(ctx, "curl", "-sS", "--max-time", "5", "http://web.mesh.internal:8000/")
		if err != nil || !strings.Contains(string(b), "hello from site") {
			return fmt.Errorf("%v: %s", err, b)
		}
		return nil
	})

	// A third, elsewhere, while the second still runs: it replaces it
	// (same ephemeral token), and the second says it is no longer ready.
	startPod(podB, "pod3")
	tstest.WaitForNil(t, 30*time.Second, "the third pod's /readyz", func() error { return ready(podB) })
	tstest.WaitForNil(t, 10*time.Second, "the replaced pod unready", func() error {
		if ready(pod) == nil {
			return errors.New("the replaced sidecar is still ready")
		}
		return nil
	})
	if names := coordNodes(); count(names, podName) != 1 {
		t.Fatalf("the coordinator's nodes %v: want one %s", names, podName)
	}
	sc2.Process.Signal(syscall.SIGTERM)
}

// readRSS returns a process's resident set size in KiB (VmRSS).
func readRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}
