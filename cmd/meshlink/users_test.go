//go:build !agentonly

package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// runCLI runs meshlink with args (flags may follow arguments, as users type
// them) and returns what it printed on stdout.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "stdout")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old := os.Stdout
	os.Stdout = f
	app := newApp()
	err = app.Run(flagsFirst(app, append([]string{"meshlink"}, args...)))
	os.Stdout = old
	b, _ := os.ReadFile(f.Name())
	return string(b), err
}

// TestUsersCommands: an admin adds, lists and removes accounts and mints
// tokens for them through the admin socket; removing a user revokes their
// tokens and removes their nodes, and the last admin cannot be removed.
func TestUsersCommands(t *testing.T) {
	m := harness.NewMesh(t)
	data := filepath.Join(m.Dir(), "coord")

	out, err := runCLI(t, "users", "add", "alice", "--data", data)
	if err != nil {
		t.Fatalf("users add: %v", err)
	}
	pw := regexp.MustCompile(`one-time password: (\S+)`).FindStringSubmatch(out)
	if pw == nil || len(pw[1]) < 12 || !strings.Contains(out, "user alice created (member)") || !strings.Contains(out, "new password at first sign-in") {
		t.Fatalf("users add printed:\n%s", out)
	}
	t.Logf("users add alice:\n%s", out)
	if _, err := runCLI(t, "users", "add", "alice", "--data", data); err == nil || !strings.Contains(err.Error(), `already a user "alice"`) {
		t.Fatalf("adding alice twice: %v", err)
	}
	if _, err := runCLI(t, "users", "add", "Not A Name!", "--data", data); err == nil || !strings.Contains(err.Error(), "user name") {
		t.Fatalf("bad name: %v", err)
	}
	if out, err := runCLI(t, "users", "add", "bob", "--admin", "--data", data); err != nil || !strings.Contains(out, "user bob created (admin)") {
		t.Fatalf("users add --admin: %v\n%s", err, out)
	}

	// A token minted for alice joins a node that belongs to her.
	tok, err := runCLI(t, "token", "create", "--user", "alice", "--data", data)
	if err != nil {
		t.Fatalf("token create --user alice: %v", err)
	}
	tok = strings.TrimSpace(tok)
	m.AddAgent("alicebox", harness.AgentOptions{Token: tok})
	if _, err := runCLI(t, "token", "create", "--user", "nobody", "--data", data); err == nil ||
		!strings.Contains(err.Error(), `no user named "nobody"`) || !strings.Contains(err.Error(), "meshlink users add nobody") {
		t.Fatalf("token for an unknown user: %v", err)
	}

	out, err = runCLI(t, "users", "list", "--data", data)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("users list:\n%s", out)
	if !regexp.MustCompile(`(?m)^alice\s+member\s+1\s+must change password`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^admin\s+admin\s+0\s`).MatchString(out) {
		t.Fatalf("users list:\n%s", out)
	}
	out, err = runCLI(t, "users", "list", "--json", "--data", data)
	if err != nil {
		t.Fatal(err)
	}
	var us []coordinator.UserInfo
	if err := json.Unmarshal([]byte(out), &us); err != nil || len(us) != 3 || us[1].Name != "alice" || us[1].Nodes != 1 || us[1].Admin || !us[2].Admin {
		t.Fatalf("users list --json: %v\n%s", err, out)
	}

	// Removing alice cuts her off: her token is revoked, her node removed.
	out, err = runCLI(t, "users", "remove", "alice", "--data", data)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("users remove alice: %s", out)
	if !strings.Contains(out, "user alice removed; 1 token(s) revoked, 1 node(s) removed: alicebox") {
		t.Fatalf("users remove printed %q", out)
	}
	ac := coordinator.NewAdminClient(data)
	nodes, err := ac.Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Name == "alicebox" {
			t.Fatalf("alice's node is still in the mesh: %+v", n)
		}
	}
	jt, _ := wire.ParseToken(tok)
	toks, _ := ac.Tokens(context.Background())
	for _, ti := range toks {
		if ti.ID == jt.ID && !ti.Revoked {
			t.Fatalf("alice's token %s is not revoked", ti.ID)
		}
	}
	if _, err := m.StartAgent("again", harness.AgentOptions{Token: tok}); err == nil {
		t.Fatal("alice's token still joins a node")
	}
	if _, err := runCLI(t, "users", "remove", "alice", "--data", data); err == nil || !strings.Contains(err.Error(), `no user named "alice"`) {
		t.Fatalf("removing alice twice: %v", err)
	}

	// Two admins: one may go; the last may not.
	if _, err := runCLI(t, "users", "remove", "bob", "--data", data); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, "users", "remove", "admin", "--data", data); err == nil ||
		!strings.Contains(err.Error(), "admin is the last admin; make another admin first (`meshlink users add NAME --admin`)") {
		t.Fatalf("removing the last admin: %v", err)
	}
}

// TestCoordinatorConfig: coordinator flags and MESHLINK_* variables reach
// coordinator.Config.
func TestCoordinatorConfig(t *testing.T) {
	cases := []struct {
		name string
		env  map[string]string
		args []string
		want func(coordinator.Config) bool
	}{
		{"members mint by default", nil, nil, func(c coordinator.Config) bool { return !c.MembersCannotMintTokens }},
		{"members-can-mint-tokens flag", nil, []string{"--members-can-mint-tokens=false"}, func(c coordinator.Config) bool { return c.MembersCannotMintTokens }},
		{"members-can-mint-tokens from environment", map[string]string{"MESHLINK_MEMBERS_CAN_MINT_TOKENS": "false"}, nil,
			func(c coordinator.Config) bool { return c.MembersCannotMintTokens }},
		{"node key expiry default", nil, nil, func(c coordinator.Config) bool { return c.NodeKeyExpiry == 4320*time.Hour }},
		{"node key expiry 0 is never", nil, []string{"--node-key-expiry", "0"}, func(c coordinator.Config) bool { return c.NodeKeyExpiry < 0 }},
		{"node key expiry from environment", map[string]string{"MESHLINK_NODE_KEY_EXPIRY": "720h"}, nil,
			func(c coordinator.Config) bool { return c.NodeKeyExpiry == 720*time.Hour }},
		{"oidc defaults", nil, nil, func(c coordinator.Config) bool {
			return c.OIDCAllowedDomains == nil && c.OIDCAllowedGroups == nil && !c.OIDCNewUsersPending
		}},
		{"oidc policy flags", nil, []string{"--oidc-allowed-domains", "a.com,b.org", "--oidc-allowed-groups", "g1", "--oidc-allowed-groups", "g2", "--oidc-new-users=pending"},
			func(c coordinator.Config) bool {
				return strings.Join(c.OIDCAllowedDomains, " ") == "a.com b.org" && strings.Join(c.OIDCAllowedGroups, " ") == "g1 g2" && c.OIDCNewUsersPending
			}},
		{"oidc policy from environment", map[string]string{"MESHLINK_OIDC_ALLOWED_DOMAINS": "a.com", "MESHLINK_OIDC_ALLOWED_GROUPS": "ops", "MESHLINK_OIDC_NEW_USERS": "pending"}, nil,
			func(c coordinator.Config) bool {
				return strings.Join(c.OIDCAllowedDomains, " ") == "a.com" && strings.Join(c.OIDCAllowedGroups, " ") == "ops" && c.OIDCNewUsersPending
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var got coordinator.Config
			cmd := coordinatorCmd()
			cmd.Action = func(c *cli.Context) error {
				var err error
				got, err = coordinatorConfig(c)
				return err
			}
			app := &cli.App{Name: "meshlink", Commands: []*cli.Command{cmd}}
			if err := app.Run(append([]string{"meshlink", "coordinator"}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			if !tc.want(got) {
				t.Errorf("config %+v", got)
			}
		})
	}
}

func TestCoordinatorConfigErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--oidc-new-users", "admin"}, `--oidc-new-users "admin": want member or pending`},
		{[]string{"--oidc-allowed-domains", "a.com,@b.org"}, `--oidc-allowed-domains "@b.org": want a domain such as example.com`},
		{[]string{"--node-key-expiry", "-1h"}, `--node-key-expiry -1h0m0s: use a duration of 1s or more such as 4320h (180 days), or 0 for keys that never expire`},
	}
	for _, tc := range cases {
		cmd := coordinatorCmd()
		cmd.Action = func(c *cli.Context) error { _, err := coordinatorConfig(c); return err }
		app := &cli.App{Name: "meshlink", Commands: []*cli.Command{cmd}}
		if err := app.Run(append([]string{"meshlink", "coordinator"}, tc.args...)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}
