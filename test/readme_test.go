package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// The README's commands are run by these tests as they are written, taken
// from the README itself so that the two cannot drift apart. Each runs in
// network namespaces of its own, where every port and address the README
// names (5353, 8000, 8443, 10.0.0.1, 127.100.0.1) is free.

// readmeLine is one command of a README block: what it runs, where, and
// what its output must contain (the text after "# -> ", if any).
type readmeLine struct {
	section string // the last "# On …" / "# At …" comment above it
	cmd     string
	want    string
}

// readmeBlock returns the commands of the n-th ```sh block (from 0) after
// the heading, one per line, without comment lines and trailing comments.
func readmeBlock(t *testing.T, heading string, n int) []readmeLine {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("README has no heading %q", heading)
	}
	s = s[i:]
	for k := 0; ; k++ {
		j := strings.Index(s, "\n```sh\n")
		if j < 0 {
			t.Fatalf("README: no ```sh block %d under %q", n, heading)
		}
		s = s[j+len("\n```sh\n"):]
		if k == n {
			break
		}
	}
	s = s[:strings.Index(s, "\n```")]
	var out []readmeLine
	section := ""
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "":
			continue
		case strings.HasPrefix(l, "#"):
			if strings.HasPrefix(l, "# On ") || strings.HasPrefix(l, "# At ") {
				section = l
			}
			continue
		}
		rl := readmeLine{section: section, cmd: l}
		if c := strings.Index(l, "  #"); c >= 0 {
			rl.cmd = strings.TrimSpace(l[:c])
			if w, ok := strings.CutPrefix(strings.TrimSpace(l[c+3:]), "-> "); ok {
				rl.want = w
			}
		}
		out = append(out, rl)
	}
	if len(out) == 0 {
		t.Fatalf("README block %d under %q has no commands", n, heading)
	}
	return out
}

// shellEnv is the environment the README's commands run in: this one, with
// dir first on PATH and vars set.
func shellEnv(dir string, vars map[string]string) []string {
	env := []string{"PATH=" + dir + ":" + os.Getenv("PATH")}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if _, set := vars[k]; !set && k != "PATH" && !strings.HasPrefix(k, "MESHLINK_") && !strings.HasSuffix(k, "_PORT") {
			env = append(env, kv)
		}
	}
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	return env
}

// runREADMELine runs one command in h (in dir, with env) until it succeeds
// and prints what the README says, within timeout: the commands before it
// start daemons, which take a moment.
func runREADMELine(t *testing.T, h *topo.Host, dir string, env []string, l readmeLine, timeout time.Duration) string {
	t.Helper()
	var out []byte
	tstest.WaitForNil(t, timeout, fmt.Sprintf("README command %q (%s) to print %q", l.cmd, l.section, l.want), func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		cmd := h.Command(ctx, "bash", "-c", l.cmd)
		cmd.Dir, cmd.Env = dir, env
		var err error
		out, err = cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if !strings.Contains(string(out), l.want) {
			return fmt.Errorf("output lacks %q: %s", l.want, out)
		}
		return nil
	})
	return string(out)
}

// binDir is a directory holding the built binary as "meshlink".
func binDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Symlink(harness.Binary(t), filepath.Join(dir, "meshlink")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestREADMEQuickStart runs `make demo`'s script as the quick start
// describes, then every command the README says it prints, verbatim, and
// checks each printed what its "# ->" comment says.
func TestREADMEQuickStart(t *testing.T) {
	lines := readmeBlock(t, "## Quick start", 1)
	n := topo.New(t)
	h := n.Host("demo")
	bin, hello := harness.Binary(t), harness.Build(t, "./examples/hello")
	// A checkout's layout: bin/, scripts/; the demo writes demo/.
	work := t.TempDir()
	os.MkdirAll(filepath.Join(work, "bin"), 0o755)
	os.MkdirAll(filepath.Join(work, "scripts"), 0o755)
	for src, dst := range map[string]string{bin: "bin/meshlink", hello: "bin/hello", filepath.Join("..", "scripts", "demo.sh"): "scripts/demo.sh"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(work, dst), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	env := shellEnv(filepath.Join(work, "bin"), map[string]string{})
	_, log := startCmd(t, h, "demo", func(c *exec.Cmd) { c.Dir, c.Env = work, env }, "bash", "scripts/demo.sh")
	tstest.WaitFor(t, 60*time.Second, "the demo to say the mesh is up", func() bool {
		b, _ := os.ReadFile(log)
		return strings.Contains(string(b), "The mesh is up")
	})
	for _, l := range lines {
		out := runREADMELine(t, h, work, env, l, 10*time.Second)
		t.Logf("$ %s\n%s", l.cmd, out)
	}
}

// TestREADMERunningForReal runs the README's "Running it for real" block
// as written: the coordinator at 10.0.0.1, sites B and A on one LAN, each
// section's commands on its machine in a directory of its own, with
// meshlink installed by `make install` on PATH. The coordinator and the
// agents stay in the foreground, so they are started in the background
// here; a TOKEN_X=$(…) assignment carries the token to the other machine,
// as pasting it would.
func TestREADMERunningForReal(t *testing.T) {
	lines := readmeBlock(t, "## Running it for real", 0)
	n := topo.New(t)
	hello := harness.Build(t, "./examples/hello")
	lan := n.Switch("lan")
	hosts := map[string]*topo.Host{"coordinator": n.Host("coord"), "site B": n.Host("siteb"), "site A": n.Host("sitea")}
	n.Link(hosts["coordinator"], lan, "10.0.0.1/24")
	n.Link(hosts["site B"], lan, "10.0.0.3/24")
	n.Link(hosts["site A"], lan, "10.0.0.2/24")
	dirs := map[string]string{}
	for k := range hosts {
		dirs[k] = t.TempDir()
	}
	startProc(t, hosts["site B"], "hello", hello, "--listen", "127.0.0.1:8000", "--site", "siteb")

	vars := map[string]string{}
	assign := regexp.MustCompile(`^([A-Z_]+)=\$\((.*)\)$`)
	var path string // where `make install` put meshlink
	for i, l := range lines {
		if strings.HasPrefix(l.section, "# On every machine") {
			// The install step, into a directory of the test's own
			// rather than this machine's /usr/local/bin.
			if !strings.Contains(l.cmd, "make install") {
				t.Fatalf("README's install step %q: want make install", l.cmd)
			}
			dest := t.TempDir()
			out, err := exec.Command("make", "-C", "..", "install", "DESTDIR="+dest, "BIN="+harness.Binary(t)).CombinedOutput()
			if err != nil {
				t.Fatalf("make install: %v\n%s", err, out)
			}
			path = filepath.Join(dest, "usr", "local", "bin")
			if _, err := os.Stat(filepath.Join(path, "meshlink")); err != nil {
				t.Fatalf("make install did not install /usr/local/bin/meshlink: %v\n%s", err, out)
			}
			continue
		}
		// The machine the section names first: "# At site B, … from the
		// coordinator" is site B's (map order would pick either).
		var where string
		first := -1
		for k := range hosts {
			if i := strings.Index(l.section, k); i >= 0 && (first < 0 || i < first) {
				where, first = k, i
			}
		}
		if where == "" || path == "" {
			t.Fatalf("README command %q: no machine (%q) or no install step before it", l.cmd, l.section)
		}
		h, dir := hosts[where], dirs[where]
		cmd := strings.TrimPrefix(l.cmd, "sudo ") // the test runs as root
		if strings.Contains(cmd, "meshlink dns install") {
			if _, err := os.Stat("/run/systemd/resolve"); err == nil {
				cmd += " --dry-run" // this machine's own resolved is not the test's to change
			}
		}
		env := shellEnv(path, vars)
		switch m := assign.FindStringSubmatch(cmd); {
		case strings.HasPrefix(cmd, "meshlink coordinator ") || strings.HasPrefix(cmd, "meshlink agent "):
			startCmd(t, h, fmt.Sprintf("%02d-%s", i, strings.Fields(cmd)[1]), func(c *exec.Cmd) { c.Dir, c.Env = dir, env }, "bash", "-c", "exec "+cmd)
		case m != nil:
			out := runREADMELine(t, h, dir, env, readmeLine{section: l.section, cmd: m[2]}, 30*time.Second)
			vars[m[1]] = strings.TrimSpace(out)
		default:
			out := runREADMELine(t, h, dir, env, readmeLine{section: l.section, cmd: cmd, want: l.want}, 30*time.Second)
			t.Logf("%s: $ %s\n%s", where, cmd, out)
		}
	}
}
