package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// goBuild builds ./cmd/meshlink with tags into dir.
func goBuild(t *testing.T, dir, tags string) string {
	t.Helper()
	out := filepath.Join(dir, "meshlink"+strings.ReplaceAll(tags, ",", "-"))
	args := []string{"build", "-o", out}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.Command("go", append(args, ".")...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags %q: %v\n%s", tags, err, b)
	}
	return out
}

// TestAgentOnlyBuild: the agent-only binary (make build-agent) leaves the
// coordinator side out, has the same CLI for the agent's commands, and
// its coordinator commands say to use the full binary.
func TestAgentOnlyBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary twice")
	}
	deps, err := exec.Command("go", "list", "-deps", "-tags", "agentonly", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, p := range strings.Fields(string(deps)) {
		for _, bad := range []string{"meshlink/meshlink/coordinator", "modernc.org/sqlite", "jackc/pgx", "coreos/go-oidc", "golang.org/x/oauth2"} {
			if strings.Contains(p, bad) {
				t.Errorf("the agent-only build depends on %s", p)
			}
		}
	}

	dir := t.TempDir()
	agentOnly, full := goBuild(t, dir, "agentonly"), goBuild(t, dir, "")
	run := func(bin string, args ...string) (string, string, error) {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		cmd.Env = append(os.Environ(), "MESHLINK_STATE="+filepath.Join(dir, "state"))
		err := cmd.Run()
		return stdout.String(), stderr.String(), err
	}
	for _, c := range [][]string{{"agent"}, {"expose"}, {"services"}, {"status"}, {"connect"}, {"dns"}, {"token", "inspect"}, {"relay"}, {"leave"}} {
		args := append(c, "--help")
		got, _, err := run(agentOnly, args...)
		if err != nil {
			t.Errorf("agent-only %s: %v", strings.Join(args, " "), err)
			continue
		}
		want, _, _ := run(full, args...)
		if got != want {
			t.Errorf("%s differs between the builds:\nagent-only:\n%s\nfull:\n%s", strings.Join(args, " "), got, want)
		}
	}
	for _, c := range [][]string{
		{"coordinator", "--listen", "127.0.0.1:0"}, {"token", "create", "--reusable"}, {"users", "list"},
		{"nodes"}, {"policy", "show"}, {"store", "copy"}, {"relays"},
	} {
		_, stderr, err := run(agentOnly, c...)
		if err == nil || !strings.Contains(stderr, "this build has no coordinator") || !strings.Contains(stderr, "use the full meshlink binary") {
			t.Errorf("agent-only %s: err %v, stderr %q; want the no-coordinator message", strings.Join(c, " "), err, stderr)
		}
	}
}
