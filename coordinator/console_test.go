package coordinator

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/coordinator/web"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// browser is a console client: pinned certificate, cookie jar, redirects
// not followed (tests look at them).
type browser struct {
	t    *testing.T
	c    *http.Client
	base string
}

func newBrowser(t *testing.T, s *Server) *browser {
	jar, _ := cookiejar.New(nil)
	c := pinnedClient(t, s.Fingerprint(), false)
	c.Jar = jar
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &browser{t: t, c: c, base: s.URL()}
}

func (b *browser) do(req *http.Request) (*http.Response, string) {
	b.t.Helper()
	resp, err := b.c.Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func (b *browser) get(path string) (*http.Response, string) {
	b.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, b.base+path, nil)
	return b.do(req)
}

func (b *browser) post(path string, form url.Values, hdr ...string) (*http.Response, string) {
	b.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, b.base+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	return b.do(req)
}

func (b *browser) login(user, pw string) *http.Response {
	b.t.Helper()
	resp, body := b.post("/login", url.Values{"username": {user}, "password": {pw}})
	if resp.StatusCode != http.StatusSeeOther {
		b.t.Fatalf("login %s: %d %s", user, resp.StatusCode, body)
	}
	return resp
}

var csrfRE = regexp.MustCompile(`name="csrf" content="([^"]+)"`)

// csrf reads the session's CSRF token from a console page.
func (b *browser) csrf() string {
	b.t.Helper()
	_, body := b.get("/console")
	m := csrfRE.FindStringSubmatch(body)
	if m == nil {
		b.t.Fatalf("no csrf token on the console page: %s", body)
	}
	return m[1]
}

func (b *browser) snapshot() web.Snapshot {
	b.t.Helper()
	resp, body := b.get("/console/api/snapshot")
	if resp.StatusCode != 200 {
		b.t.Fatalf("snapshot: %d %s", resp.StatusCode, body)
	}
	var s web.Snapshot
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		b.t.Fatal(err)
	}
	return s
}

// mintToken mints a token in the console and returns it as shown once.
func (b *browser) mintToken(extra url.Values) wire.JoinToken {
	b.t.Helper()
	form := url.Values{"csrf": {b.csrf()}, "expires": {"1h"}}
	for k, v := range extra {
		form[k] = v
	}
	resp, body := b.post("/console/tokens", form)
	if resp.StatusCode != 200 {
		b.t.Fatalf("mint: %d %s", resp.StatusCode, body)
	}
	m := regexp.MustCompile(`mlj1_[A-Za-z0-9_\-.]+`).FindString(body)
	jt, err := wire.ParseToken(m)
	if err != nil {
		b.t.Fatalf("no token on the page (%q): %v", m, err)
	}
	return jt
}

func addUser(t *testing.T, s *Server, name, pw string, admin bool) store.User {
	t.Helper()
	h, _ := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
	u, err := s.Store().CreateUser(context.Background(), store.User{Username: name, PasswordHash: string(h), Admin: admin})
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func nodeIn(ns []web.ViewNode, name string) bool {
	for _, n := range ns {
		if n.Name == name {
			return true
		}
	}
	return false
}

func TestConsoleLoginLogout(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "alice", "alice-password-1", false)
	b := newBrowser(t, s)

	resp, body := b.get("/")
	if resp.StatusCode != 200 || !strings.Contains(body, `action="/login"`) || !strings.Contains(body, `name="username"`) || !strings.Contains(body, `name="password"`) {
		t.Fatalf("login page: %d %s", resp.StatusCode, body)
	}
	for h, want := range map[string]string{"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
		t.Errorf("CSP %q", csp)
	}
	if strings.Contains(body, "<script>") {
		t.Error("inline script on the login page")
	}

	// Wrong password: no session, an error shown.
	resp, body = b.post("/login", url.Values{"username": {"alice"}, "password": {"nope"}})
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, "Wrong username or password") {
		t.Fatalf("wrong password: %d %s", resp.StatusCode, body)
	}
	for _, c := range resp.Cookies() {
		if c.Name == web.SessionCookie {
			t.Fatal("wrong password set a session cookie")
		}
	}
	if resp, _ := b.get("/console"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("console without login: %d", resp.StatusCode)
	}

	resp = b.login("alice", "alice-password-1")
	var sess *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == web.SessionCookie {
			sess = c
		}
	}
	if sess == nil || !sess.HttpOnly || !sess.Secure || sess.SameSite != http.SameSiteStrictMode || sess.Path != "/" {
		t.Fatalf("session cookie %+v", sess)
	}
	if resp.Header.Get("Location") != "/console" {
		t.Fatalf("login redirects to %q", resp.Header.Get("Location"))
	}
	resp, body = b.get("/console")
	if resp.StatusCode != 200 || !strings.Contains(body, "Sites") || !strings.Contains(body, "alice") {
		t.Fatalf("console: %d %s", resp.StatusCode, body)
	}
	if resp.Header.Get("Content-Security-Policy") == "" || resp.Header.Get("X-Frame-Options") != "DENY" {
		t.Fatal("console page without security headers")
	}
	if strings.Contains(body, sess.Value) {
		t.Fatal("the session id appears in the page")
	}
	if resp, _ := b.get("/"); resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/console" {
		t.Fatalf("/ when logged in: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}

	resp, _ = b.post("/logout", url.Values{"csrf": {b.csrf()}})
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	if _, err := s.Store().GetSession(context.Background(), store.HashSecret(sess.Value), time.Now()); err == nil {
		t.Fatal("session still stored after logout")
	}
	// Replaying the old cookie gets nothing.
	b2 := newBrowser(t, s)
	u, _ := url.Parse(s.URL())
	b2.c.Jar.SetCookies(u, []*http.Cookie{{Name: web.SessionCookie, Value: sess.Value, Path: "/"}})
	if resp, _ := b2.get("/console/api/snapshot"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("old session after logout: %d", resp.StatusCode)
	}
}

func TestConsoleLoginRateLimit(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "alice", "alice-password-1", false)
	b := newBrowser(t, s)
	for i := 1; i <= 5; i++ {
		if resp, _ := b.post("/login", url.Values{"username": {"alice"}, "password": {"wrong"}}); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d", i, resp.StatusCode)
		}
	}
	// The sixth attempt is refused even with the right password.
	resp, body := b.post("/login", url.Values{"username": {"alice"}, "password": {"alice-password-1"}})
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(body, "Too many failed sign-ins") || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("6th attempt: %d %s", resp.StatusCode, body)
	}
	// Alice at another address is not locked out by those guesses.
	other := newBrowser(t, s)
	other.c.Transport.(*http.Transport).DialContext = (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext
	other.login("alice", "alice-password-1")
}

func TestConsoleCSRF(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "alice", "alice-password-1", false)
	b := newBrowser(t, s)
	b.login("alice", "alice-password-1")
	tok := b.csrf()
	tests := []struct {
		name   string
		form   url.Values
		hdr    []string
		status int
	}{
		{"no csrf", url.Values{"expires": {"1h"}}, nil, 403},
		{"wrong csrf", url.Values{"csrf": {"x" + tok}, "expires": {"1h"}}, nil, 403},
		{"cross-origin", url.Values{"csrf": {tok}, "expires": {"1h"}}, []string{"Origin", "https://evil.example"}, 403},
		{"cross-site fetch", url.Values{"csrf": {tok}, "expires": {"1h"}}, []string{"Sec-Fetch-Site", "cross-site"}, 403},
		{"ok", url.Values{"csrf": {tok}, "expires": {"1h"}}, []string{"Origin", s.URL(), "Sec-Fetch-Site", "same-origin"}, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := b.post("/console/tokens", tc.form, tc.hdr...)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
		})
	}
	if resp, _ := b.post("/logout", url.Values{}); resp.StatusCode != 403 {
		t.Fatalf("logout without csrf: %d", resp.StatusCode)
	}
}

func TestConsoleOwnership(t *testing.T) {
	s := startServer(t, t.TempDir())
	ctx := context.Background()
	alice := addUser(t, s, "alice", "alice-password-1", false)
	addUser(t, s, "bob", "bob-password-1", false)
	addUser(t, s, "root", "root-password-1", true)
	api := pinnedClient(t, s.Fingerprint(), false)

	ba, bb, br := newBrowser(t, s), newBrowser(t, s), newBrowser(t, s)
	ba.login("alice", "alice-password-1")
	bb.login("bob", "bob-password-1")
	br.login("root", "root-password-1")

	// A member gives only the tags the policy's tagOwners gives them.
	form := url.Values{"csrf": {ba.csrf()}, "expires": {"1h"}, "tags": {"tag:a"}}
	if resp, body := ba.post("/console/tokens", form); resp.StatusCode != 200 || !strings.Contains(body, "tag:a has no owners in the policy&#39;s tagOwners; only an admin may give it") {
		t.Fatalf("alice minting tag:a under the default policy: %d, page without the refusal", resp.StatusCode)
	}
	if _, err := s.SetPolicy(ctx, "p.yaml", "tagOwners:\n  a: [user:alice]\n", "test"); err != nil {
		t.Fatal(err)
	}
	// Tokens minted in the console register nodes through the real API.
	ta := ba.mintToken(url.Values{"tags": {"tag:a"}})
	tb := bb.mintToken(nil)
	ra, _ := register(t, api, ta, "alice-1")
	_, cb := register(t, api, tb, "bob-1")
	if n, _ := s.Store().GetNode(ctx, ra.Node.ID); n.OwnerID != alice.ID || len(n.Tags) != 1 {
		t.Fatalf("alice-1 owner %d tags %v, want %d", n.OwnerID, n.Tags, alice.ID)
	}
	if st, body := call(t, api, s.URL(), wire.PathServices, &cb, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "db", Port: 5432}); st != 200 {
		t.Fatalf("expose: %d %s", st, body)
	}

	snap := ba.snapshot()
	if !nodeIn(snap.Nodes, "alice-1") || nodeIn(snap.Nodes, "bob-1") || len(snap.Nodes) != 1 {
		t.Fatalf("alice sees nodes %+v", snap.Nodes)
	}
	if len(snap.Tokens) != 1 || snap.Tokens[0].ID != ta.ID {
		t.Fatalf("alice sees tokens %+v", snap.Tokens)
	}
	if len(snap.Services) != 1 || len(snap.Services[0].Providers) != 0 || snap.Services[0].HiddenProviders != 1 {
		t.Fatalf("alice sees services %+v", snap.Services)
	}
	for _, e := range snap.Events {
		if strings.Contains(e.Message, "bob") {
			t.Fatalf("alice sees bob's event %+v", e)
		}
	}
	_, page := ba.get("/console")
	if !strings.Contains(page, "alice-1") || strings.Contains(page, "bob-1") {
		t.Fatal("alice's sites page shows bob's node or misses hers")
	}
	_, page = ba.get("/console/tokens")
	if !strings.Contains(page, ta.ID) || strings.Contains(page, tb.ID) {
		t.Fatal("alice's tokens page shows bob's token or misses hers")
	}
	_, page = ba.get("/console/services")
	if strings.Contains(page, "bob-1") || !strings.Contains(page, "+1 other site") {
		t.Fatal("alice's services page shows bob's provider")
	}

	csrf := ba.csrf()
	bobID := strconv.FormatUint(uint64(cb.ID), 10)
	if resp, _ := ba.post("/console/nodes/"+bobID+"/remove", url.Values{"csrf": {csrf}}); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("alice removes bob-1: %d", resp.StatusCode)
	}
	if resp, _ := ba.post("/console/tokens/"+tb.ID+"/revoke", url.Values{"csrf": {csrf}}); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("alice revokes bob's token: %d", resp.StatusCode)
	}
	if _, err := s.Store().GetNode(ctx, cb.ID); err != nil {
		t.Fatal("bob-1 is gone after alice's attempt")
	}
	if tok, _ := s.Store().GetToken(ctx, tb.ID); tok.Revoked {
		t.Fatal("bob's token revoked by alice")
	}
	if resp, _ := ba.get("/console/users"); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("member on users page: %d", resp.StatusCode)
	}
	// Alice manages her own.
	if resp, _ := ba.post("/console/tokens/"+ta.ID+"/revoke", url.Values{"csrf": {csrf}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("alice revokes her token: %d", resp.StatusCode)
	}

	// The admin sees and manages everything.
	snap = br.snapshot()
	if !nodeIn(snap.Nodes, "alice-1") || !nodeIn(snap.Nodes, "bob-1") || len(snap.Tokens) != 2 || len(snap.Services[0].Providers) != 1 {
		t.Fatalf("admin snapshot %+v", snap)
	}
	if resp, _ := br.post("/console/nodes/"+bobID+"/remove", url.Values{"csrf": {br.csrf()}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("admin removes bob-1: %d", resp.StatusCode)
	}
	if _, err := s.Store().GetNode(ctx, cb.ID); err == nil {
		t.Fatal("bob-1 still there after the admin removed it")
	}
	// Admin creates a member, whose one-time password works once shown.
	resp, body := br.post("/console/users", url.Values{"csrf": {br.csrf()}, "username": {"carol"}, "role": {"member"}})
	m := regexp.MustCompile(`id="secret" value="([^"]+)"`).FindStringSubmatch(body)
	if resp.StatusCode != 200 || m == nil {
		t.Fatalf("create user: %d %s", resp.StatusCode, body)
	}
	newBrowser(t, s).login("carol", m[1])
	// Tokens from the admin socket belong to the first admin.
	tokStr, err := NewAdminClient(s.cfg.DataDir).CreateToken(ctx, TokenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	jt, _ := wire.ParseToken(tokStr)
	admin, _ := s.Store().GetUser(ctx, "admin")
	if tok, _ := s.Store().GetToken(ctx, jt.ID); tok.OwnerID != admin.ID {
		t.Fatalf("admin-socket token owner %d, want %d", tok.OwnerID, admin.ID)
	}
}

func TestInteractiveRegistration(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.RegisterPollWait = 200 * time.Millisecond })
	ctx := context.Background()
	alice := addUser(t, s, "alice", "alice-password-1", false)
	api := pinnedClient(t, s.Fingerprint(), false)
	base := s.URL()

	start := func(name string) wire.RegisterPending {
		t.Helper()
		st, body := call(t, api, base, wire.PathRegister, nil, map[string]any{
			"version": wire.ProtocolVersion, "name": name, "hostname": "laptop.example", "node_key": newKey(t), "listen_port": 41641, "interactive": true,
		})
		if st != http.StatusAccepted {
			t.Fatalf("interactive register: %d %s", st, body)
		}
		var p wire.RegisterPending
		if err := json.Unmarshal(body, &p); err != nil || !strings.HasPrefix(p.AuthURL, base+"/approve/") || p.PollID == "" || p.Expires.IsZero() {
			t.Fatalf("pending %+v (%v)", p, err)
		}
		if strings.Contains(p.AuthURL, p.PollID) {
			t.Fatal("the auth URL carries the poll secret")
		}
		return p
	}
	poll := func(p wire.RegisterPending) (int, []byte) {
		return call(t, api, base, wire.PathRegisterPoll, nil, wire.RegisterPollRequest{Version: wire.ProtocolVersion, PollID: p.PollID})
	}

	p := start("laptop")
	if st, body := poll(p); st != http.StatusAccepted {
		t.Fatalf("poll before approval: %d %s", st, body)
	}
	// The approval page needs a login and comes back to itself after it.
	b := newBrowser(t, s)
	path := strings.TrimPrefix(p.AuthURL, base)
	resp, _ := b.get(path)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(loc, "/?next=") {
		t.Fatalf("approve page logged out: %d %q", resp.StatusCode, loc)
	}
	next, _ := url.Parse(loc)
	resp, _ = b.post("/login", url.Values{"username": {"alice"}, "password": {"alice-password-1"}, "next": {next.Query().Get("next")}})
	if resp.Header.Get("Location") != path {
		t.Fatalf("login went to %q, want %q", resp.Header.Get("Location"), path)
	}
	resp, body := b.get(path)
	if resp.StatusCode != 200 || !strings.Contains(body, "laptop") || !strings.Contains(body, "SHA256:") || !strings.Contains(body, "127.0.0.1") {
		t.Fatalf("approve page: %d %s", resp.StatusCode, body)
	}
	csrf := csrfRE.FindStringSubmatch(body)[1]
	if resp, _ := b.post(path, url.Values{"action": {"approve"}}); resp.StatusCode != 403 {
		t.Fatalf("approve without csrf: %d", resp.StatusCode)
	}
	if resp, body := b.post(path, url.Values{"csrf": {csrf}, "action": {"approve"}}); resp.StatusCode != 200 || !strings.Contains(body, "Approved") {
		t.Fatalf("approve: %d %s", resp.StatusCode, body)
	}
	st, raw := poll(p)
	if st != 200 {
		t.Fatalf("poll after approval: %d %s", st, raw)
	}
	var rr wire.RegisterResponse
	if err := json.Unmarshal(raw, &rr); err != nil || rr.NodeSecret == "" || rr.Node.Name != "laptop" || len(rr.Node.Addresses) != 2 || rr.Domain == "" {
		t.Fatalf("register response %+v (%v)", rr, err)
	}
	if n, err := s.Store().GetNode(ctx, rr.Node.ID); err != nil || n.OwnerID != alice.ID {
		t.Fatalf("approved node owner %d (%v), want %d", n.OwnerID, err, alice.ID)
	}
	// The secret works like one from a token registration.
	cr := creds{rr.Node.ID, rr.NodeSecret}
	if st, body := call(t, api, base, wire.PathStats, &cr, wire.StatsReport{Version: wire.ProtocolVersion}); st != 200 {
		t.Fatalf("stats with the approved node's secret: %d %s", st, body)
	}
	if snap := b.snapshot(); !nodeIn(snap.Nodes, "laptop") {
		t.Fatalf("alice does not see her approved node: %+v", snap.Nodes)
	}

	// Denied.
	p2 := start("other")
	csrf = b.csrf()
	if resp, _ := b.post(strings.TrimPrefix(p2.AuthURL, base), url.Values{"csrf": {csrf}, "action": {"deny"}}); resp.StatusCode != 200 {
		t.Fatalf("deny: %d", resp.StatusCode)
	}
	if st, body := poll(p2); st != http.StatusForbidden || !strings.Contains(string(body), "denied") {
		t.Fatalf("poll after deny: %d %s", st, body)
	}
	// Unknown.
	if st, body := poll(wire.RegisterPending{PollID: "no-such-poll-id"}); st != http.StatusForbidden || errCode(t, body) == "" {
		t.Fatalf("unknown poll: %d %s", st, body)
	}
	if resp, _ := b.get("/approve/ZZZZ-ZZZZ"); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown code: %d", resp.StatusCode)
	}
	// Without Interactive, a missing token is still an error.
	if st, body := call(t, api, base, wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion, Name: "x", NodeKey: newKey(t)}); st != 401 {
		t.Fatalf("no token, not interactive: %d %s", st, body)
	}
}

// sse reads server-sent snapshots from /console/events.
func openSSE(t *testing.T, b *browser) <-chan web.Snapshot {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.base+"/console/events", nil)
	resp, err := b.c.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		cancel()
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	ch := make(chan web.Snapshot, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<22)
		event := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				event = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: ") && event == "snapshot":
				var s web.Snapshot
				if json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &s) == nil {
					select {
					case ch <- s:
					case <-ctx.Done():
						return
					}
				}
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ch
}

func waitSnapshot(t *testing.T, ch <-chan web.Snapshot, what string, pred func(web.Snapshot) bool) web.Snapshot {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		select {
		case s := <-ch:
			if pred(s) {
				return s
			}
		case <-deadline.C:
			t.Fatalf("no live snapshot with %s", what)
		}
	}
}

func TestConsoleStatsAndLiveUpdates(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "root", "root-password-1", true)
	api := pinnedClient(t, s.Fingerprint(), false)
	b := newBrowser(t, s)
	b.login("root", "root-password-1")
	live := openSSE(t, b)
	waitSnapshot(t, live, "the first snapshot", func(web.Snapshot) bool { return true })

	jt := b.mintToken(url.Values{"reusable": {"1"}})
	ra, ca := register(t, api, jt, "site-a")
	rb, cb := register(t, api, jt, "site-b")
	openMap(t, api, s.URL(), ca)

	// An expose reaches the live feed.
	if st, body := call(t, api, s.URL(), wire.PathServices, &ca, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 8080,
		Priority: 2, Weight: 7, ServiceVersion: "v3"}); st != 200 {
		t.Fatalf("expose: %d %s", st, body)
	}
	waitSnapshot(t, live, "service web", func(sn web.Snapshot) bool {
		return len(sn.Services) == 1 && sn.Services[0].Name == "web" && len(sn.Services[0].Providers) == 1
	})

	// Counters from both ends show in the snapshot and the live feed.
	if st, body := call(t, api, s.URL(), wire.PathStats, &ca, wire.StatsReport{Version: wire.ProtocolVersion,
		Services: []wire.ServiceStats{{Name: "web", Role: "provider", Open: 2, Total: 5, BytesSent: 1000, BytesReceived: 200}},
		Peers:    []wire.PeerStats{{Node: rb.Node.ID, Path: "direct", Endpoint: "192.0.2.1:41641", RTTMicros: 900}}}); st != 200 {
		t.Fatalf("stats a: %d %s", st, body)
	}
	if st, body := call(t, api, s.URL(), wire.PathStats, &cb, wire.StatsReport{Version: wire.ProtocolVersion,
		Services: []wire.ServiceStats{{Name: "web", Role: "consumer", Open: 2, Total: 5, BytesSent: 200, BytesReceived: 1000}},
		Peers:    []wire.PeerStats{{Node: ra.Node.ID, Path: "relay"}}}); st != 200 {
		t.Fatalf("stats b: %d %s", st, body)
	}
	if st, _ := call(t, api, s.URL(), wire.PathStats, nil, wire.StatsReport{Version: wire.ProtocolVersion}); st != 401 {
		t.Fatalf("stats without credentials: %d", st)
	}
	check := func(sn web.Snapshot) bool {
		if len(sn.Services) != 1 {
			return false
		}
		sv := sn.Services[0]
		if sv.Open != 2 || sv.Total != 5 || sv.Bytes != 1200 || len(sv.Consumers) != 1 || sv.Consumers[0].Name != "site-b" {
			return false
		}
		for _, n := range sn.Nodes {
			if n.Name == "site-a" && (len(n.Paths) != 1 || n.Paths[0].Path != "direct" || n.Paths[0].PeerName != "site-b" || !n.Online) {
				return false
			}
			if n.Name == "site-b" && (len(n.Paths) != 1 || n.Paths[0].Path != "relay") {
				return false
			}
		}
		return true
	}
	waitSnapshot(t, live, "the counters", check)
	if sn := b.snapshot(); !check(sn) {
		t.Fatalf("snapshot without the counters: %+v", sn)
	}
	_, page := b.get("/console/services")
	if !strings.Contains(page, "site-b") || !strings.Contains(page, "1.2 KiB") {
		t.Fatalf("services page lacks the counters: %s", page)
	}
	// Each provider with how consumers choose it, and its health.
	if !strings.Contains(page, "prio 2 · weight 7 · v3 · 2 open · 100%") {
		t.Errorf("services page lacks the provider's priority, weight, version, open and share: %s", page)
	}
	if st, body := call(t, api, s.URL(), wire.PathHealth, &ca, wire.HealthReport{Version: wire.ProtocolVersion,
		Services: []wire.ServiceHealth{{Name: "web", Error: "connection refused"}}}); st != 200 {
		t.Fatalf("health: %d %s", st, body)
	}
	waitSnapshot(t, live, "web unhealthy", func(sn web.Snapshot) bool {
		return len(sn.Services) == 1 && len(sn.Services[0].Providers) == 1 && sn.Services[0].Providers[0].Health == wire.HealthUnhealthy
	})
	if _, page = b.get("/console/services"); !strings.Contains(page, "unhealthy") || !strings.Contains(page, "connection refused") {
		t.Errorf("services page lacks the provider's health: %s", page)
	}
	// The event log has the story.
	_, page = b.get("/console/log")
	for _, want := range []string{"join", "expose", "login", "token_created"} {
		if !strings.Contains(page, want) {
			t.Errorf("event log lacks %q", want)
		}
	}
	// Every console page renders.
	for _, p := range []string{"/console", "/console/graph", "/console/services", "/console/tokens", "/console/log", "/console/users", "/static/app.js", "/static/app.css"} {
		if resp, body := b.get(p); resp.StatusCode != 200 {
			t.Errorf("%s: %d %s", p, resp.StatusCode, body)
		}
	}
}

// TestConsoleRelays: the overview and the snapshot list the relays of the
// mesh to every user, live, with the embedded relay's counters, and a
// relayed path names its relay.
func TestConsoleRelays(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "root", "root-password-1", true)
	addUser(t, s, "bob", "bob-password-12", false)
	api := pinnedClient(t, s.Fingerprint(), false)
	root := newBrowser(t, s)
	root.login("root", "root-password-1")
	bob := newBrowser(t, s)
	bob.login("bob", "bob-password-12")

	// A standalone relay registers and holds its node-key stream open.
	relayTok := mustToken(t, s, TokenOptions{Relay: true})
	relayPriv := key.NewPrivate()
	relayPub := relayPriv.Public()
	certFP := strings.Repeat("0123456789abcdef", 4)
	st, body := relayCall(t, api, s.URL(), wire.PathRelayRegister, 0, "", wire.RelayRegisterRequest{Version: wire.ProtocolVersion,
		TokenID: relayTok.ID, TokenSecret: relayTok.Secret, Name: "eu1", URL: "https://127.0.0.1:9443", Fingerprint: certFP, Key: relayPub})
	if st != http.StatusOK {
		t.Fatalf("relay register: %d %s", st, body)
	}
	var rr wire.RelayRegisterResponse
	json.Unmarshal(body, &rr)
	_, cancel := openRelayNodes(t, api, s.URL(), rr)

	// Two sites; b reaches a through eu1.
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	na := registerKeyed(t, api, jt, "site-a")
	nb := registerKeyed(t, api, jt, "site-b")
	if st, body := call(t, api, s.URL(), wire.PathStats, &nb.cr, wire.StatsReport{Version: wire.ProtocolVersion,
		Peers: []wire.PeerStats{{Node: na.rr.Node.ID, Path: "relay", Endpoint: "eu1", RelayedBytes: 4096}}}); st != 200 {
		t.Fatalf("stats b: %d %s", st, body)
	}

	checkRelays := func(who string, sn web.Snapshot) {
		t.Helper()
		if len(sn.Relays) != 2 {
			t.Fatalf("%s: relays %+v, want coordinator and eu1", who, sn.Relays)
		}
		emb, eu1 := sn.Relays[0], sn.Relays[1]
		if emb.Name != EmbeddedRelayName || !emb.Embedded || emb.URL != s.URL() || emb.Fingerprint != s.Fingerprint() ||
			emb.FingerprintShort != "SHA256:"+strings.ToLower(s.Fingerprint()[:16]) || emb.KeyFP == "" || emb.Stats == nil {
			t.Fatalf("%s: embedded relay %+v", who, emb)
		}
		if eu1.Name != "eu1" || eu1.Embedded || eu1.URL != "https://127.0.0.1:9443" || eu1.Fingerprint != certFP ||
			eu1.FingerprintShort != "SHA256:0123456789abcdef" || eu1.KeyFP == "" || eu1.Stats != nil {
			t.Fatalf("%s: standalone relay %+v", who, eu1)
		}
	}
	checkRelays("admin", root.snapshot())
	checkRelays("member", bob.snapshot())
	// Counters we do not have are null, not zeros; no key is shown whole.
	_, js := root.get("/console/api/snapshot")
	if !strings.Contains(js, `"name":"eu1"`) || !strings.Contains(js, `"stats":null`) || strings.Contains(js, relayPub.String()) {
		t.Fatalf("snapshot JSON: %s", js)
	}
	sn := root.snapshot()
	var path *web.ViewPath
	for _, n := range sn.Nodes {
		if n.Name == "site-b" && len(n.Paths) == 1 {
			path = &n.Paths[0]
		}
	}
	if path == nil || path.Path != "relay" || path.Relay != "eu1" || path.PeerName != "site-a" {
		t.Fatalf("site-b's path: %+v", path)
	}

	// The overview page, for both.
	for who, b := range map[string]*browser{"admin": root, "member": bob} {
		_, page := b.get("/console")
		for _, want := range []string{`<h2>Relays</h2>`, `data-live="relays"`, `data-relay="coordinator"`, `data-relay="eu1"`,
			"embedded", "standalone", "https://127.0.0.1:9443", "SHA256:0123456789abcdef", `title="` + certFP + `"`, `title="a standalone relay keeps its own counters">—</td>`} {
			if !strings.Contains(page, want) {
				t.Errorf("%s: overview lacks %q", who, want)
			}
		}
		if strings.Contains(page, relayPub.String()) {
			t.Errorf("%s: overview shows a relay key whole", who)
		}
	}
	if _, page := root.get("/console"); !regexp.MustCompile(`site-a <span class="muted">via</span> <span class="via">eu1</span>`).MatchString(page) {
		t.Errorf("overview does not say site-b reaches site-a via eu1: %s", page)
	}

	// Live: the embedded relay's counters follow a client connecting, and
	// a relay going away leaves the list.
	live := openSSE(t, root)
	waitSnapshot(t, live, "both relays", func(sn web.Snapshot) bool { return len(sn.Relays) == 2 && sn.Relays[0].Stats.Clients == 0 })
	var rx relayRx
	rl, err := s.relayList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rc := relayClient(t, rl[0], na.priv, &rx)
	tstest.WaitFor(t, 5*time.Second, "relay client connected", rc.Connected)
	waitSnapshot(t, live, "one client on the embedded relay", func(sn web.Snapshot) bool {
		return len(sn.Relays) == 2 && sn.Relays[0].Stats.Clients == 1 && sn.Relays[0].Stats.Accepted == 1
	})
	cancel()
	waitSnapshot(t, live, "eu1 gone", func(sn web.Snapshot) bool { return len(sn.Relays) == 1 && sn.Relays[0].Embedded })
	if _, page := root.get("/console"); strings.Contains(page, `data-relay="eu1"`) {
		t.Fatal("overview still lists eu1 after it went offline")
	}
}

func TestConsoleNoRelay(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.NoEmbeddedRelay = true })
	addUser(t, s, "root", "root-password-1", true)
	b := newBrowser(t, s)
	b.login("root", "root-password-1")
	if _, js := b.get("/console/api/snapshot"); !strings.Contains(js, `"relays":[]`) {
		t.Fatalf("snapshot with no relay: %s", js)
	}
	if _, page := b.get("/console"); !strings.Contains(page, "No relay is online") || strings.Contains(page, `data-relay=`) {
		t.Fatalf("overview with no relay: %s", page)
	}
}

// TestFirstAdminMustChangePassword: the first admin's one-time password
// (read from its file) opens only the "choose a new password" page; once a
// new one is set the console opens, the file is gone, the one-time
// password and any other session signed in with it stop working.
func TestFirstAdminMustChangePassword(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	pwFile := filepath.Join(dir, AdminPasswordFile)
	b, err := os.ReadFile(pwFile)
	if err != nil {
		t.Fatal(err)
	}
	oneTime := strings.TrimSpace(string(b))

	other := newBrowser(t, s) // someone else who read the file
	other.login("admin", oneTime)
	br := newBrowser(t, s)
	resp := br.login("admin", oneTime)
	if loc := resp.Header.Get("Location"); loc != "/password?next=%2Fconsole" {
		t.Fatalf("first sign-in goes to %q, want the new-password page", loc)
	}
	resp, body := br.get("/console/tokens")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/password?next=%2Fconsole%2Ftokens" {
		t.Fatalf("console before the change: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, _ := br.get("/console/api/snapshot"); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("snapshot before the change: %d", resp.StatusCode)
	}
	resp, body = br.get("/password?next=%2Fconsole%2Ftokens")
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindStringSubmatch(body)
	if resp.StatusCode != 200 || m == nil || !strings.Contains(body, "Choose a new password") {
		t.Fatalf("password page: %d %s", resp.StatusCode, body)
	}
	csrf := m[1]
	if resp, body := br.post("/console/tokens", url.Values{"csrf": {csrf}}); resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "Choose a new password first") {
		t.Fatalf("mint a token before the change: %d %s", resp.StatusCode, body)
	}
	for _, tc := range []struct{ pw, again, want string }{
		{"short", "short", "too short"},
		{strings.Repeat("x", 73), strings.Repeat("x", 73), "too long"},
		{"a-new-password-1", "a-new-password-2", "differ"},
		{oneTime, oneTime, "the password you were given"},
	} {
		resp, body := br.post("/password", url.Values{"csrf": {csrf}, "new_password": {tc.pw}, "confirm_password": {tc.again}})
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, tc.want) {
			t.Fatalf("new password %q/%q: %d, want 400 saying %q: %s", tc.pw, tc.again, resp.StatusCode, tc.want, body)
		}
	}
	if _, err := os.Stat(pwFile); err != nil {
		t.Fatalf("the file went before the password changed: %v", err)
	}
	resp, _ = br.post("/password", url.Values{"csrf": {csrf}, "new_password": {"admins-own-password"}, "confirm_password": {"admins-own-password"}, "next": {"/console/tokens"}})
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/console/tokens" {
		t.Fatalf("set password: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, body := br.get("/console/tokens"); resp.StatusCode != 200 || !strings.Contains(body, `action="/console/tokens"`) {
		t.Fatalf("console after the change: %d %s", resp.StatusCode, body)
	}
	if _, err := os.Stat(pwFile); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("password file after the change: %v", err)
	}
	if resp, _ := other.get("/console"); resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/?next=") {
		t.Fatalf("the other session after the change: %d %q, want signed out", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, _ := newBrowser(t, s).post("/login", url.Values{"username": {"admin"}, "password": {oneTime}}); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("one-time password after the change: %d", resp.StatusCode)
	}
	if resp := newBrowser(t, s).login("admin", "admins-own-password"); resp.Header.Get("Location") != "/console" {
		t.Fatalf("new password signs in to %q", resp.Header.Get("Location"))
	}
	// A restart does not bring the file back.
	s.Close()
	s = startServer(t, dir)
	if _, err := os.Stat(pwFile); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("password file after a restart: %v", err)
	}
}

// TestConsoleRemoveUser: an admin removes a member in the console; the
// member's tokens are revoked and nodes removed. A member cannot, and an
// admin cannot remove their own account while signed in with it.
func TestConsoleRemoveUser(t *testing.T) {
	s := startServer(t, t.TempDir())
	ctx := context.Background()
	alice := addUser(t, s, "alice", "alice-password-1", false)
	root := addUser(t, s, "root", "root-password-1", true)
	api := pinnedClient(t, s.Fingerprint(), false)
	ba, br := newBrowser(t, s), newBrowser(t, s)
	ba.login("alice", "alice-password-1")
	br.login("root", "root-password-1")
	_, cr := register(t, api, ba.mintToken(nil), "alice-1")

	path := func(id int64) string { return fmt.Sprintf("/console/users/%d/remove", id) }
	if resp, _ := ba.post(path(root.ID), url.Values{"csrf": {ba.csrf()}}); resp.StatusCode != http.StatusForbidden {
		t.Errorf("a member removing an admin: %d, want 403", resp.StatusCode)
	}
	if resp, body := br.post(path(root.ID), url.Values{"csrf": {br.csrf()}}); resp.StatusCode != http.StatusConflict || !strings.Contains(body, "cannot remove your own account") {
		t.Errorf("an admin removing themself: %d", resp.StatusCode)
	}
	resp, body := br.post(path(alice.ID), url.Values{"csrf": {br.csrf()}})
	if resp.StatusCode != 200 || !strings.Contains(body, "Removed alice: 1 tokens revoked; nodes removed from the mesh: alice-1.") {
		t.Fatalf("remove alice: %d %s", resp.StatusCode, body)
	}
	if _, err := s.Store().GetUser(ctx, "alice"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("alice still exists: %v", err)
	}
	if st, body := call(t, api, s.URL(), wire.PathEndpoints, &cr, wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: 1}); st != http.StatusUnauthorized {
		t.Errorf("alice's node after her removal: %d %s", st, body)
	}
	evs, _ := s.Store().ListEvents(ctx, 0, 20)
	if len(evs) == 0 || !slices.ContainsFunc(evs, func(e store.Event) bool { return e.Kind == store.EventUserRemoved && e.Actor == "root" }) {
		t.Errorf("no user_removed event by root in %+v", evs)
	}
}
