package main

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// runMain runs meshlink as main does (flags may follow arguments) and
// returns what it printed and its exit code.
func runMain(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	dir := t.TempDir()
	outF, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	errF, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	oldOut, oldErr := os.Stdout, os.Stderr
	os.Stdout, os.Stderr = outF, errF
	app := newApp()
	code = report(app.Run(flagsFirst(app, append([]string{"meshlink"}, args...))), errF)
	os.Stdout, os.Stderr = oldOut, oldErr
	outF.Close()
	errF.Close()
	o, _ := os.ReadFile(outF.Name())
	e, _ := os.ReadFile(errF.Name())
	return string(o), string(e), code
}

func TestDefaultStateDir(t *testing.T) {
	cases := []struct {
		name string
		uid  int
		env  map[string]string
		want string
	}{
		{"root", 0, map[string]string{"HOME": "/root", "XDG_STATE_HOME": "/root/.st"}, "/var/lib/meshlink"},
		{"user with XDG_STATE_HOME", 1000, map[string]string{"HOME": "/home/ann", "XDG_STATE_HOME": "/home/ann/st"}, "/home/ann/st/meshlink"},
		{"user without XDG_STATE_HOME", 1000, map[string]string{"HOME": "/home/ann"}, "/home/ann/.local/state/meshlink"},
		{"relative XDG_STATE_HOME is ignored", 1000, map[string]string{"HOME": "/home/ann", "XDG_STATE_HOME": "st"}, "/home/ann/.local/state/meshlink"},
		{"no home", 1000, nil, "meshlink-state"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := defaultStateDir(tc.uid, func(k string) string { return tc.env[k] }); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

// TestStateDirPlacement: --state works before the command, after it and
// as MESHLINK_STATE; without any, client commands look in the default
// directory of the user.
func TestStateDirPlacement(t *testing.T) {
	dir := t.TempDir()
	want := "no agent is running with --state " + dir
	for _, args := range [][]string{
		{"--state", dir, "status"},
		{"--state=" + dir, "services", "--json"},
		{"status", "--state", dir},
		{"ping", "peer", "--state", dir, "-c", "1"},
		{"--state", "/elsewhere", "status", "--state", dir}, // the nearer one wins
	} {
		_, stderr, code := runMain(t, args...)
		if code != exitFailure || !strings.Contains(stderr, want) {
			t.Errorf("%v: exit %d, %q; want 1 and %q", args, code, stderr, want)
		}
	}
	t.Setenv("MESHLINK_STATE", dir)
	if _, stderr, _ := runMain(t, "status"); !strings.Contains(stderr, want) {
		t.Errorf("MESHLINK_STATE: %q, want %q", stderr, want)
	}
	os.Unsetenv("MESHLINK_STATE")
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_STATE_HOME", filepath.Join(home, "xdg"))
	def := defaultStateDir(os.Geteuid(), os.Getenv)
	if _, stderr, _ := runMain(t, "status"); !strings.Contains(stderr, "no agent is running with --state "+def) {
		t.Errorf("no --state: %q, want the default %s", stderr, def)
	}
	// The agent command resolves the same default.
	cfg, err := configFrom(t)
	if err == nil && cfg.StateDir != def {
		t.Errorf("agent state %q, want %q", cfg.StateDir, def)
	}
}

// TestExitCodes: a command called wrongly exits 2 with one line naming
// what was wrong; a failure of a well-formed command exits 1.
func TestExitCodes(t *testing.T) {
	if agentOnlyBuild {
		t.Skip("the full CLI's coordinator commands")
	}
	nowhere := filepath.Join(t.TempDir(), "none")
	cases := []struct {
		name string
		args []string
		code int
		want string // in the one line on stderr
	}{
		{"mistyped command", []string{"stauts"}, 2, `meshlink: unknown command "stauts"; did you mean "status"?`},
		{"unknown command", []string{"frobnicate"}, 2, `meshlink: unknown command "frobnicate" (meshlink --help lists the commands)`},
		{"mistyped subcommand", []string{"token", "creat"}, 2, `meshlink token: unknown command "creat"; did you mean "create"?`},
		{"mistyped subcommand of a command that runs", []string{"nodes", "remov"}, 2, `meshlink nodes: unknown command "remov"; did you mean "remove"?`},
		{"unknown flag", []string{"status", "--bogus"}, 2, "meshlink status: unknown flag --bogus"},
		{"mistyped flag", []string{"services", "--jsno"}, 2, "meshlink services: unknown flag --jsno; did you mean --json?"},
		{"flag without its value", []string{"ping", "x", "--count"}, 2, "meshlink ping: flag needs an argument: --count"},
		{"bad flag value", []string{"ping", "x", "--count", "many"}, 2, `invalid value "many" for flag --count`},
		{"missing argument", []string{"ping"}, 2, "meshlink ping: missing NODE|IP|FQDN"},
		{"extra argument", []string{"expose", "web", "127.0.0.1:80", "more"}, 2, `meshlink expose: unexpected argument "more"`},
		{"argument to a command without", []string{"status", "extra", "--state", nowhere}, 2, `meshlink status: unexpected argument "extra"`},
		{"unknown shell", []string{"completion", "tcsh"}, 2, `meshlink completion: unknown shell "tcsh"`},
		{"bad token", []string{"token", "inspect", "garbage"}, 2, "meshlink token inspect: malformed join token"},
		{"bad agent flag", []string{"agent", "--state", nowhere, "--proxy-range", "nope"}, 2, `--proxy-range "nope"`},
		{"no agent", []string{"status", "--state", nowhere}, 1, "meshlink: no agent is running with --state " + nowhere},
		{"no coordinator", []string{"nodes", "--data", nowhere}, 1, "meshlink: "},
		{"policy explain without --to", []string{"policy", "explain", "--from", "x"}, 2, "meshlink: usage: meshlink policy explain --from NODE|user:NAME --to SERVICE --data DIR"},
		{"policy set without a file", []string{"policy", "set"}, 2, "meshlink: usage: meshlink policy set FILE --data DIR"},
		{"policy check of a missing file", []string{"policy", "check", nowhere}, 1, "meshlink: read the policy: open " + nowhere},
		{"bad store", []string{"coordinator", "--data", filepath.Join(nowhere, "coord"), "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--store", "mysql://db/x"}, 1,
			`meshlink: coordinator: store: "mysql://db/x" is not a store; write sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE`},
		{"unreachable store", []string{"coordinator", "--data", filepath.Join(nowhere, "coord2"), "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--store", "postgres://u:secret@127.0.0.1:1/x?connect_timeout=2"}, 1,
			"cannot reach PostgreSQL at postgres://u:xxxxx@127.0.0.1:1/x?connect_timeout=2"},
		{"version", []string{"version"}, 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := runMain(t, tc.args...)
			if code != tc.code {
				t.Fatalf("%v: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, stdout, stderr)
			}
			if tc.code == 0 {
				return
			}
			if lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n"); len(lines) != 1 {
				t.Errorf("%v: %d lines on stderr, want one:\n%s", tc.args, len(lines), stderr)
			}
			if !strings.Contains(stderr, tc.want) {
				t.Errorf("%v: stderr %q, want %q", tc.args, stderr, tc.want)
			}
			if tc.code == exitUsage && stdout != "" {
				t.Errorf("%v: a usage error printed on stdout too:\n%s", tc.args, stdout)
			}
		})
	}
}

// TestFlagUsageHasNoBackquotes: urfave/cli takes `text` in a flag's usage
// as the placeholder of its value, so help printed "--relay meshlink relay".
func TestFlagUsageHasNoBackquotes(t *testing.T) {
	var walk func(prefix string, flags []cli.Flag, cmds []*cli.Command)
	walk = func(prefix string, flags []cli.Flag, cmds []*cli.Command) {
		for _, f := range flags {
			if u, ok := f.(interface{ GetUsage() string }); ok && strings.Contains(u.GetUsage(), "`") {
				t.Errorf("%s --%s: usage %q has a backquote (shown as the value's placeholder); use quotes", prefix, f.Names()[0], u.GetUsage())
			}
		}
		for _, c := range cmds {
			walk(prefix+" "+c.Name, c.Flags, c.Subcommands)
		}
	}
	app := newApp()
	walk("meshlink", app.Flags, app.Commands)
}

// TestDocsCurrent: docs/cli.md and docs/man/*.1 are what `make docs`
// writes from the CLI definitions now.
func TestDocsCurrent(t *testing.T) {
	if agentOnlyBuild {
		t.Skip("the full CLI's coordinator commands")
	}
	files, err := genDocs(newApp())
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("..", "..", "docs")
	var names []string
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		have, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Errorf("docs/%s: %v; run make docs", n, err)
			continue
		}
		if !bytes.Equal(have, files[n]) {
			t.Errorf("docs/%s is out of date with the CLI definitions; run make docs", n)
		}
	}
	man, _ := filepath.Glob(filepath.Join(dir, "man", "*.1"))
	for _, p := range man {
		if _, ok := files[filepath.Join("man", filepath.Base(p))]; !ok {
			t.Errorf("docs/man/%s belongs to no command; run make docs", filepath.Base(p))
		}
	}
	if !strings.Contains(string(files["cli.md"]), "## status") || !strings.Contains(string(files["man/meshlink-ping.1"]), "meshlink-ping") {
		t.Errorf("generated reference lacks commands:\n%.400s", files["cli.md"])
	}
}

func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{
		"bash": "complete -o bashdefault -o default -F _meshlink_bash_autocomplete meshlink",
		"zsh":  "compdef _meshlink meshlink",
		"fish": "complete -c meshlink",
	} {
		stdout, stderr, code := runMain(t, "completion", shell)
		if code != 0 || !strings.Contains(stdout, want) {
			t.Errorf("completion %s: exit %d %s\n%.300s", shell, code, stderr, stdout)
		}
	}
	// The scripts ask the binary: it answers with the commands. (urfave/cli
	// reads os.Args to tell whether a flag is being completed.)
	oldArgs := os.Args
	os.Args = []string{"meshlink", "--generate-bash-completion"}
	defer func() { os.Args = oldArgs }()
	stdout, _, _ := runMain(t, "--generate-bash-completion")
	for _, c := range []string{"status", "ping", "leave", "version"} {
		if !strings.Contains(stdout, c) {
			t.Errorf("completion candidates lack %s:\n%s", c, stdout)
		}
	}
}

// TestMemoryLimitAuto: auto leaves a GOMEMLIMIT the runtime read alone,
// and sets nothing without a cgroup limit it can read; a size sets it.
func TestMemoryLimitAuto(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	t.Setenv("GOMEMLIMIT", "1GiB")
	if err := setMemoryLimit("auto"); err != nil {
		t.Fatal(err)
	}
	if got := debug.SetMemoryLimit(-1); got != before {
		t.Fatalf("auto with GOMEMLIMIT set changed the limit to %d", got)
	}
	if err := setMemoryLimit("900MiB"); err != nil {
		t.Fatal(err)
	}
	if got := debug.SetMemoryLimit(-1); got != 900<<20 {
		t.Fatalf("limit %d, want %d", got, 900<<20)
	}
	if err := setMemoryLimit("lots"); err == nil {
		t.Fatal("no error for a size that is none")
	}
}
