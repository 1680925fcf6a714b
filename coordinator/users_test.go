package coordinator

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/wire"
)

// TestAdminSocketUsers: a user added on the admin socket signs in with the
// one-time password and must choose a new one first; a token minted for
// them owns the node it joins; removing them signs them out, revokes the
// token and removes the node, and their one-time password stops working.
func TestAdminSocketUsers(t *testing.T) {
	s := startServer(t, t.TempDir())
	ctx := context.Background()
	ac := NewAdminClient(s.cfg.DataDir)
	nu, err := ac.AddUser(ctx, "Dana", false)
	if err != nil {
		t.Fatal(err)
	}
	if nu.Name != "dana" || nu.Admin || nu.Password == "" {
		t.Fatalf("added %+v", nu)
	}
	b := newBrowser(t, s)
	if loc := b.login("dana", nu.Password).Header.Get("Location"); loc != "/password?next=%2Fconsole" {
		t.Fatalf("first sign-in goes to %q, want the new-password page", loc)
	}

	tokStr, err := ac.CreateToken(ctx, TokenOptions{User: "dana"})
	if err != nil {
		t.Fatal(err)
	}
	jt, err := wire.ParseToken(tokStr)
	if err != nil {
		t.Fatal(err)
	}
	reg, _ := register(t, pinnedClient(t, s.Fingerprint(), false), jt, "dana-box")
	dana, _ := s.Store().GetUser(ctx, "dana")
	if n, _ := s.Store().GetNode(ctx, reg.Node.ID); n.OwnerID != dana.ID {
		t.Fatalf("dana-box belongs to user %d, want dana (%d)", n.OwnerID, dana.ID)
	}
	if _, err := ac.CreateToken(ctx, TokenOptions{User: "eve"}); err == nil || !strings.Contains(err.Error(), `no user named "eve"`) {
		t.Fatalf("token for an unknown user: %v", err)
	}

	ru, err := ac.RemoveUser(ctx, "dana")
	if err != nil {
		t.Fatal(err)
	}
	if len(ru.TokensRevoked) != 1 || ru.TokensRevoked[0] != jt.ID || len(ru.NodesRemoved) != 1 || ru.NodesRemoved[0] != "dana-box" {
		t.Fatalf("removed %+v", ru)
	}
	if tok, _ := s.Store().GetToken(ctx, jt.ID); !tok.Revoked {
		t.Fatal("dana's token is not revoked")
	}
	if _, err := s.Store().GetNode(ctx, reg.Node.ID); err == nil {
		t.Fatal("dana's node is still registered")
	}
	if resp, _ := b.get("/console"); resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/?next=") {
		t.Fatalf("dana's session after removal: %d %q, want signed out", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, _ := newBrowser(t, s).post("/login", url.Values{"username": {"dana"}, "password": {nu.Password}}); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("removed user's password: %d", resp.StatusCode)
	}
	if _, err := ac.RemoveUser(ctx, "admin"); err == nil || !strings.Contains(err.Error(), "last admin") {
		t.Fatalf("removing the last admin: %v", err)
	}
}

// TestMembersCannotMintTokens: with MembersCannotMintTokens a member's
// Tokens page says only admins mint tokens and the POST is refused;
// admins still mint, and by default members do too.
func TestMembersCannotMintTokens(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.MembersCannotMintTokens = true })
	addUser(t, s, "mem", "member-password-1", false)
	addUser(t, s, "root", "root-password-1", true)
	bm, br := newBrowser(t, s), newBrowser(t, s)
	bm.login("mem", "member-password-1")
	br.login("root", "root-password-1")

	_, page := bm.get("/console/tokens")
	if !strings.Contains(page, "Only admins mint join tokens on this coordinator") || strings.Contains(page, `action="/console/tokens"`) {
		t.Fatalf("member's tokens page does not say minting is for admins:\n%s", page)
	}
	resp, body := bm.post("/console/tokens", url.Values{"csrf": {bm.csrf()}, "expires": {"1h"}})
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "ask an admin for one") || strings.Contains(body, "mlj1_") {
		t.Fatalf("member mints: %d\n%s", resp.StatusCode, body)
	}
	if toks, _ := s.Store().ListTokens(context.Background()); len(toks) != 0 {
		t.Fatalf("a refused mint stored tokens: %+v", toks)
	}
	br.mintToken(nil)

	d := startServer(t, t.TempDir())
	addUser(t, d, "mem", "member-password-1", false)
	b := newBrowser(t, d)
	b.login("mem", "member-password-1")
	b.mintToken(nil)
}
