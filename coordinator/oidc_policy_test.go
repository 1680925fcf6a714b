package coordinator

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/coordinator/oidclogin/oidctest"
)

// oidcUser is a provider account for the policy tests.
func oidcUser(name, email string, verified bool, groups ...string) oidctest.User {
	return oidctest.User{Subject: name + "-sub", Username: name, Password: name + " password", Email: email,
		EmailVerified: verified, Name: name, Groups: groups}
}

// TestConsoleOIDCPolicy: --oidc-allowed-domains and --oidc-allowed-groups
// admit only matching identities, over the real provider; the refused get
// a page saying why and whom to ask, no session and no account.
func TestConsoleOIDCPolicy(t *testing.T) {
	ok := oidcUser("okay", "okay@a.com", true, "ops")
	users := []oidctest.User{ok,
		oidcUser("other", "other@evil.com", true, "ops"),
		oidcUser("unverified", "unverified@a.com", false, "ops"),
		oidcUser("sub", "sub@x.a.com", true, "ops"),
		oidcUser("nogroup", "nogroup@b.org", true, "dev"),
		oidcUser("nogroups", "nogroups@a.com", true),
	}
	op, s := startOIDCWith(t, func(c *Config) {
		c.OIDCAllowedDomains = []string{"a.com", "b.org"}
		c.OIDCAllowedGroups = []string{"admins", "ops"}
	}, users...)
	for _, tc := range []struct {
		user oidctest.User
		want string
	}{
		{users[1], "its email domain evil.com is not one of a.com, b.org"},
		{users[2], "it has no verified email address"},
		{users[3], "its email domain x.a.com is not one of a.com, b.org"},
		{users[4], "it is in none of the groups admins, ops"},
		{users[5], "it is in none of the groups admins, ops"},
	} {
		t.Run(tc.user.Username, func(t *testing.T) {
			ob := newOIDCBrowser(t, op, s)
			resp, body := ob.signIn(tc.user.Username, tc.user.Password)
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "This coordinator does not admit your account: "+tc.want) ||
				!strings.Contains(body, "Ask an admin") {
				t.Fatalf("refused sign-in: %d, want 403 saying %q:\n%s", resp.StatusCode, tc.want, body)
			}
			if ob.hasSession() {
				t.Fatal("a refused identity got a session")
			}
			if r, _ := ob.b.get("/console/api/snapshot"); r.StatusCode != http.StatusUnauthorized {
				t.Fatalf("snapshot after a refused sign-in: %d", r.StatusCode)
			}
		})
	}
	if us, _ := s.Store().ListUsers(context.Background()); len(us) != 1 {
		t.Fatalf("refused sign-ins created accounts: %+v", us)
	}
	ob := newOIDCBrowser(t, op, s)
	if resp, body := ob.signIn(ok.Username, ok.Password); resp.StatusCode != http.StatusOK || !ob.hasSession() {
		t.Fatalf("allowed identity: %d\n%s", resp.StatusCode, body)
	}
	if snap := ob.b.snapshot(); snap.User.Name != "oidc:"+op.Issuer+"#"+ok.Subject {
		t.Fatalf("signed in as %+v", snap.User)
	}
}

// TestConsoleOIDCPendingUser: under --oidc-new-users=pending the first
// sign-in creates the account but no session; the user is told to wait.
// Once an admin approves it (Users page here, the admin socket for the
// second account), sign-in works.
func TestConsoleOIDCPendingUser(t *testing.T) {
	pat, quinn := oidcUser("pat", "pat@a.com", true), oidcUser("quinn", "quinn@a.com", true)
	op, s := startOIDCWith(t, func(c *Config) { c.OIDCNewUsersPending = true }, pat, quinn)
	addUser(t, s, "root", "root-password-1", true)
	ctx := context.Background()

	ob := newOIDCBrowser(t, op, s)
	resp, body := ob.signIn(pat.Username, pat.Password)
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "awaits approval by an admin") || ob.hasSession() {
		t.Fatalf("pending sign-in: %d session=%v\n%s", resp.StatusCode, ob.hasSession(), body)
	}
	name := "oidc:" + op.Issuer + "#" + pat.Subject
	u, err := s.Store().GetUser(ctx, name)
	if err != nil || !u.Pending || u.Admin {
		t.Fatalf("pending account %+v, %v", u, err)
	}
	// Signing in again changes nothing until the approval.
	if resp, _ := newOIDCBrowser(t, op, s).signIn(pat.Username, pat.Password); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("second pending sign-in: %d", resp.StatusCode)
	}

	// The admin sees it on the Users page and approves it there.
	br := newBrowser(t, s)
	br.login("root", "root-password-1")
	_, page := br.get("/console/users")
	if !strings.Contains(page, "awaiting approval") || !strings.Contains(page, "/console/users/"+strconv.FormatInt(u.ID, 10)+"/approve") {
		t.Fatalf("users page does not offer the approval:\n%s", page)
	}
	// A member cannot approve.
	addUser(t, s, "mem", "member-password-1", false)
	bm := newBrowser(t, s)
	bm.login("mem", "member-password-1")
	if r, _ := bm.post("/console/users/"+strconv.FormatInt(u.ID, 10)+"/approve", url.Values{"csrf": {bm.csrf()}}); r.StatusCode != http.StatusForbidden {
		t.Fatalf("member approves: %d", r.StatusCode)
	}
	if r, body := br.post("/console/users/"+strconv.FormatInt(u.ID, 10)+"/approve", url.Values{"csrf": {br.csrf()}}); r.StatusCode != http.StatusOK || !strings.Contains(body, "is approved and may sign in") {
		t.Fatalf("approve: %d\n%s", r.StatusCode, body)
	}
	ob = newOIDCBrowser(t, op, s)
	if resp, body := ob.signIn(pat.Username, pat.Password); resp.StatusCode != http.StatusOK || !ob.hasSession() {
		t.Fatalf("sign-in after approval: %d\n%s", resp.StatusCode, body)
	}
	if snap := ob.b.snapshot(); snap.User.Name != name || snap.User.Admin {
		t.Fatalf("approved user signed in as %+v", snap.User)
	}

	// The second one is approved on the admin socket (`meshlink users approve`).
	if resp, _ := newOIDCBrowser(t, op, s).signIn(quinn.Username, quinn.Password); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("quinn's first sign-in: %d", resp.StatusCode)
	}
	ac := NewAdminClient(s.cfg.DataDir)
	us, err := ac.Users(ctx)
	if err != nil {
		t.Fatal(err)
	}
	qname := "oidc:" + op.Issuer + "#" + quinn.Subject
	var listed bool
	for _, u := range us {
		listed = listed || u.Name == qname && u.Pending
	}
	if !listed {
		t.Fatalf("admin socket does not list quinn as pending: %+v", us)
	}
	if err := ac.ApproveUser(ctx, qname); err != nil {
		t.Fatal(err)
	}
	if err := ac.ApproveUser(ctx, "nobody"); err == nil || !strings.Contains(err.Error(), `no user named "nobody"`) {
		t.Fatalf("approving an unknown user: %v", err)
	}
	qb := newOIDCBrowser(t, op, s)
	if resp, body := qb.signIn(quinn.Username, quinn.Password); resp.StatusCode != http.StatusOK || !qb.hasSession() {
		t.Fatalf("quinn after approval: %d\n%s", resp.StatusCode, body)
	}
}
