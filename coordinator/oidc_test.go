package coordinator

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/oidclogin/oidctest"
	"github.com/meshlink/meshlink/coordinator/web"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

const (
	oidcClientID     = "meshlink-console"
	oidcClientSecret = "s3cret-for-tests"
)

var oidcCarol = oidctest.User{
	Subject:       "carol-sub-7",
	Username:      "carol",
	Password:      "correct horse",
	Email:         "carol@example.com",
	EmailVerified: true,
	Name:          "Carol Example",
}

// startOIDC starts a test provider and a coordinator that signs console
// users in with it, the client registered with the coordinator's callback.
func startOIDC(t *testing.T) (*oidctest.Server, *Server) {
	t.Helper()
	return startOIDCWith(t, nil, oidcCarol)
}

// startOIDCWith is startOIDC with these provider users and mod applied to
// the coordinator's Config.
func startOIDCWith(t *testing.T, mod func(*Config), users ...oidctest.User) (*oidctest.Server, *Server) {
	t.Helper()
	op := oidctest.NewServer(t, users...)
	s := startServer(t, t.TempDir(), func(c *Config) {
		c.OIDCIssuer = op.Issuer
		c.OIDCClientID = oidcClientID
		c.OIDCClientSecret = oidcClientSecret
		c.OIDCHTTPClient = op.Client() // trusts the provider's test certificate
		c.Logger = tstest.Logger(t)
		if mod != nil {
			mod(c)
		}
	})
	op.AddClient(oidctest.Client{ID: oidcClientID, Secret: oidcClientSecret,
		RedirectURIs: []string{s.URL() + "/login/oidc/callback"}})
	return op, s
}

// oidcBrowser is a person's browser for the whole flow: one cookie jar,
// trusting the coordinator's pinned certificate and the provider's test CA.
// follow follows redirects (across both sites); b does not, for looking at
// the console.
type oidcBrowser struct {
	t      *testing.T
	follow *http.Client
	b      *browser
	jar    http.CookieJar
}

func newOIDCBrowser(t *testing.T, op *oidctest.Server, s *Server) *oidcBrowser {
	t.Helper()
	roots := op.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	fp := s.Fingerprint()
	tr := &http.Transport{TLSClientConfig: &tls.Config{
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			if wire.FingerprintMatches(leaf.Raw, fp) {
				return nil
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: cs.ServerName})
			return err
		},
	}}
	t.Cleanup(tr.CloseIdleConnections)
	jar, _ := cookiejar.New(nil)
	follow := &http.Client{Transport: tr, Jar: jar, Timeout: 15 * time.Second}
	noFollow := &http.Client{Transport: tr, Jar: jar, Timeout: 15 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return &oidcBrowser{t: t, follow: follow, b: &browser{t: t, c: noFollow, base: s.URL()}, jar: jar}
}

var (
	opFormAction = regexp.MustCompile(`<form method="post" action="([^"]+)"`)
	opHiddenID   = regexp.MustCompile(`<input type="hidden" name="id" value="([^"]+)"`)
)

// signIn clicks "Sign in with …", fills in the provider's form and follows
// the redirects back to the coordinator; it returns the last response (the
// coordinator's callback page) and its body.
func (ob *oidcBrowser) signIn(username, password string) (*http.Response, string) {
	ob.t.Helper()
	_, body := ob.b.get("/")
	if !strings.Contains(body, `href="/login/oidc"`) {
		ob.t.Fatalf("login page has no OIDC button:\n%s", body)
	}
	req, _ := http.NewRequest(http.MethodGet, ob.b.base+"/login/oidc", nil)
	resp, form := (&browser{t: ob.t, c: ob.follow}).do(req)
	if resp.StatusCode != http.StatusOK {
		ob.t.Fatalf("provider login page: %d %s", resp.StatusCode, form)
	}
	action, id := opFormAction.FindStringSubmatch(form), opHiddenID.FindStringSubmatch(form)
	if action == nil || id == nil {
		ob.t.Fatalf("no login form at %s:\n%s", resp.Request.URL, form)
	}
	target, err := resp.Request.URL.Parse(action[1])
	if err != nil {
		ob.t.Fatal(err)
	}
	vals := url.Values{"id": {id[1]}, "username": {username}, "password": {password}}
	req, _ = http.NewRequest(http.MethodPost, target.String(), strings.NewReader(vals.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, body = (&browser{t: ob.t, c: ob.follow}).do(req)
	if p := resp.Request.URL; p.Path != "/login/oidc/callback" || !strings.HasPrefix(p.String(), ob.b.base) {
		ob.t.Fatalf("sign-in ended at %s (%d), not the coordinator's callback:\n%s", p, resp.StatusCode, body)
	}
	return resp, body
}

func (ob *oidcBrowser) hasSession() bool {
	u, _ := url.Parse(ob.b.base)
	for _, c := range ob.jar.Cookies(u) {
		if c.Name == web.SessionCookie && c.Value != "" {
			return true
		}
	}
	return false
}

func TestConsoleOIDCLogin(t *testing.T) {
	op, s := startOIDC(t)
	wantName := "oidc:" + op.Issuer + "#" + oidcCarol.Subject
	opHost := strings.TrimPrefix(op.Issuer, "https://")

	ob := newOIDCBrowser(t, op, s)
	_, page := ob.b.get("/")
	for _, want := range []string{"Sign in with " + opHost, `name="username"`, `name="password"`, `action="/login"`} {
		if !strings.Contains(page, want) {
			t.Errorf("login page lacks %q", want)
		}
	}

	resp, body := ob.signIn(oidcCarol.Username, oidcCarol.Password)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, `http-equiv="refresh" content="0;url=/console"`) {
		t.Fatalf("callback: %d, want 200 and a refresh to /console:\n%s", resp.StatusCode, body)
	}
	if !ob.hasSession() {
		t.Fatal("no session cookie after the OIDC sign-in")
	}
	snap := ob.b.snapshot()
	if snap.User.Name != wantName || snap.User.Admin {
		t.Fatalf("signed in as %+v, want member %s", snap.User, wantName)
	}
	if r, _ := ob.b.get("/console"); r.StatusCode != http.StatusOK {
		t.Fatalf("GET /console after sign-in: %d", r.StatusCode)
	}
	var sawLogin bool
	for _, e := range snap.Events {
		sawLogin = sawLogin || e.Kind == "login" && strings.Contains(e.Message, "signed in with "+opHost+" as "+oidcCarol.Email)
	}
	if !sawLogin {
		t.Errorf("no OIDC login event among %+v", snap.Events)
	}

	// The next sign-in, from another browser, is the same account.
	ob2 := newOIDCBrowser(t, op, s)
	ob2.signIn(oidcCarol.Username, oidcCarol.Password)
	if snap2 := ob2.b.snapshot(); snap2.User.ID != snap.User.ID || snap2.User.Admin {
		t.Fatalf("second sign-in is %+v, want the same member %+v", snap2.User, snap.User)
	}
	users, err := s.Store().ListUsers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, u := range users {
		if u.Username == wantName {
			n++
		}
	}
	if n != 1 || len(users) != 2 {
		t.Fatalf("users after two sign-ins: %+v, want admin and one %s", users, wantName)
	}

	// That account has no password that works.
	pw := newOIDCBrowser(t, op, s).b
	for _, p := range []string{"", "!oidc-sign-in-only", oidcCarol.Password} {
		if r, _ := pw.post("/login", url.Values{"username": {wantName}, "password": {p}}); r.StatusCode != http.StatusUnauthorized {
			t.Errorf("password login as %s with %q: %d, want 401", wantName, p, r.StatusCode)
		}
	}

	// The sealing key survives restarts, private to the coordinator.
	if fi, err := os.Stat(filepath.Join(s.cfg.DataDir, oidcKeyFile)); err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != 32 {
		t.Errorf("cookie key file: %v %v", fi, err)
	}
}

func TestConsoleOIDCWrongSecret(t *testing.T) {
	op, s := startOIDC(t)
	// The provider now expects another secret than the coordinator's.
	op.AddClient(oidctest.Client{ID: oidcClientID, Secret: "rotated-elsewhere",
		RedirectURIs: []string{s.URL() + "/login/oidc/callback"}})

	ob := newOIDCBrowser(t, op, s)
	resp, body := ob.signIn(oidcCarol.Username, oidcCarol.Password)
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("callback with a wrong client secret: %d, want 502", resp.StatusCode)
	}
	for _, want := range []string{"Sign-in failed", "rejected the coordinator&#39;s client credentials", "--oidc-client-secret", `href="/login/oidc"`, "Try again"} {
		if !strings.Contains(body, want) {
			t.Errorf("error page lacks %q:\n%s", want, body)
		}
	}
	if ob.hasSession() {
		t.Error("a session cookie was set after a failed sign-in")
	}
	if r, _ := ob.b.get("/console/api/snapshot"); r.StatusCode != http.StatusUnauthorized {
		t.Errorf("snapshot after a failed sign-in: %d, want 401", r.StatusCode)
	}
	if users, _ := s.Store().ListUsers(context.Background()); len(users) != 1 {
		t.Errorf("a failed sign-in created an account: %+v", users)
	}
}

func TestConsoleOIDCCallbackWithoutLogin(t *testing.T) {
	op, s := startOIDC(t)
	ob := newOIDCBrowser(t, op, s)
	// A forged link from another site: no login cookie, so no session, and
	// an escaped, readable page rather than a same-origin refusal.
	resp, body := ob.b.get("/login/oidc/callback?state=x&code=<script>")
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "start the sign-in again") || strings.Contains(body, "<script>") {
		t.Fatalf("forged callback: %d\n%s", resp.StatusCode, body)
	}
	if ob.hasSession() {
		t.Fatal("session after a forged callback")
	}
}

func TestStartFailsWhenOIDCDiscoveryFails(t *testing.T) {
	notOP := httptest.NewTLSServer(http.NotFoundHandler())
	defer notOP.Close()
	s, err := New(Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), Out: tstest.Writer(t),
		OIDCIssuer: notOP.URL, OIDCClientID: oidcClientID, OIDCHTTPClient: notOP.Client()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--oidc-issuer") || !strings.Contains(err.Error(), "discovery failed") {
		t.Fatalf("Start with an issuer without discovery: %v", err)
	}
}
