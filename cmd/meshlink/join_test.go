package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// configFrom runs the agent command's flag parsing only.
func configFrom(t *testing.T, args ...string) (agent.Config, error) {
	t.Helper()
	var got agent.Config
	cmd := agentCmd()
	cmd.Action = func(c *cli.Context) error {
		var err error
		got, err = agentConfig(c)
		return err
	}
	app := &cli.App{Name: "meshlink", Commands: []*cli.Command{cmd}}
	err := app.Run(append([]string{"meshlink", "agent"}, args...))
	return got, err
}

// TestJoinFile: --join-file keeps the token out of ps. It joins like
// --join; a token file in the state directory is removed once spent, and
// no file there holds the token's secret afterwards.
func TestJoinFile(t *testing.T) {
	m := harness.NewMesh(t)
	tok := m.Token()
	state := filepath.Join(m.Dir(), "site")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(state, "join-token")
	if err := os.WriteFile(file, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := configFrom(t, "--state", state, "--join-file", file)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Join != tok {
		t.Fatalf("--join-file read %q, want the token", cfg.Join)
	}
	want := m.AgentConfig("site", harness.AgentOptions{StateDir: state})
	want.Join, want.JoinFile = cfg.Join, cfg.JoinFile
	a, err := harness.StartAgent(t, want)
	if err != nil {
		t.Fatalf("agent with --join-file: %v", err)
	}
	if st := a.Status(); st.Self.Name != "site" || st.Self.ID == 0 {
		t.Fatalf("agent did not join: %+v", st)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("spent token file still in the state directory: %v", err)
	}
	jt, _ := wire.ParseToken(tok)
	filepath.Walk(state, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte(jt.Secret)) {
			t.Errorf("%s holds the spent token's secret", p)
		}
		return nil
	})
}

func TestJoinFileErrors(t *testing.T) {
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "tok")
	os.WriteFile(tokFile, []byte("T"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte(" \n"), 0o600)
	big := filepath.Join(dir, "big")
	os.WriteFile(big, bytes.Repeat([]byte("x"), maxJoinFile+1), 0o600)
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"both", []string{"--join", "T", "--join-file", tokFile}, "--join and --join-file both given"},
		{"missing", []string{"--join-file", filepath.Join(dir, "nope")}, "give a readable file holding the token"},
		{"empty", []string{"--join-file", empty}, "is empty"},
		{"too big", []string{"--join-file", big}, "not a join token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := configFrom(t, append([]string{"--state", dir}, tc.args...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v: %v, want an error containing %q", tc.args, err, tc.want)
			}
		})
	}
	t.Setenv("MESHLINK_JOIN_FILE", tokFile)
	if cfg, err := configFrom(t, "--state", dir); err != nil || cfg.Join != "T" {
		t.Fatalf("MESHLINK_JOIN_FILE: %q, %v", cfg.Join, err)
	}
}
