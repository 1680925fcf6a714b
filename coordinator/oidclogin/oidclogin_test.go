package oidclogin_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/oidclogin"
	"github.com/meshlink/meshlink/coordinator/oidclogin/oidctest"
	"github.com/meshlink/meshlink/internal/tstest"
)

const (
	clientID     = "meshlink-console"
	clientSecret = "s3cret-for-tests"
	callbackPath = "/login/oidc/callback"
)

var alice = oidctest.User{
	Subject:       "user-1",
	Username:      "alice",
	Password:      "correct horse",
	Email:         "alice@example.com",
	EmailVerified: true,
	Name:          "Alice Example",
	Groups:        []string{"ops", "dev"},
}

// harness is a provider plus a console-like relying party serving
// /login/oidc and /login/oidc/callback the way coordinator/web will.
type harness struct {
	t     *testing.T
	op    *oidctest.Server
	rp    *httptest.Server
	cfg   oidclogin.Config
	skew  atomic.Int64 // added to the RP's clock, in nanoseconds
	login *oidclogin.Provider

	mu             sync.Mutex // guards the fields below
	callbackCookie string     // Cookie header of the last callback request
	lastErr        error      // last error from Finish
}

type harnessOpts struct {
	claimsInIDToken bool
	secret          string // client secret the RP uses; default clientSecret
}

func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	h := &harness{t: t, op: oidctest.NewServer(t, alice)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /login/oidc", func(w http.ResponseWriter, r *http.Request) {
		u, err := h.login.Begin(w, r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		http.Redirect(w, r, u, http.StatusFound)
	})
	mux.HandleFunc("GET "+callbackPath, func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.callbackCookie = r.Header.Get("Cookie")
		h.mu.Unlock()
		id, err := h.login.Finish(w, r)
		h.mu.Lock()
		h.lastErr = err
		h.mu.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		json.NewEncoder(w).Encode(id)
	})
	h.rp = httptest.NewTLSServer(mux)
	t.Cleanup(h.rp.Close)
	h.op.AddClient(oidctest.Client{
		ID:              clientID,
		Secret:          clientSecret,
		RedirectURIs:    []string{h.rp.URL + callbackPath},
		ClaimsInIDToken: o.claimsInIDToken,
	})
	secret := o.secret
	if secret == "" {
		secret = clientSecret
	}
	h.cfg = oidclogin.Config{
		Issuer:       h.op.Issuer,
		ClientID:     clientID,
		ClientSecret: secret,
		RedirectURL:  h.rp.URL + callbackPath,
		HTTPClient:   h.op.Client(), // trusts the httptest certificate
		CookieKey:    []byte("0123456789abcdef0123456789abcdef"),
		Now:          func() time.Time { return time.Now().Add(time.Duration(h.skew.Load())) },
		Logger:       tstest.Logger(t),
	}
	h.login = h.newProvider()
	return h
}

func (h *harness) newProvider() *oidclogin.Provider {
	h.t.Helper()
	p, err := oidclogin.New(context.Background(), h.cfg)
	if err != nil {
		h.t.Fatalf("New: %v", err)
	}
	return p
}

// browser is an http.Client with a cookie jar that trusts both servers.
func (h *harness) browser() *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{Transport: h.op.Client().Transport, Jar: jar, Timeout: 10 * time.Second}
}

var (
	formAction = regexp.MustCompile(`<form method="post" action="([^"]+)"`)
	hiddenID   = regexp.MustCompile(`<input type="hidden" name="id" value="([^"]+)"`)
)

// signInUntilCallback does what a browser and a person do up to the
// provider's redirect back to the console: start at /login/oidc, land on the
// provider's login form, submit it. It returns the callback URL without
// visiting it.
func (h *harness) signInUntilCallback(b *http.Client, username, password string) string {
	h.t.Helper()
	var callback string
	b.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if req.URL.Path == callbackPath {
			callback = req.URL.String()
			return http.ErrUseLastResponse
		}
		return nil
	}
	defer func() { b.CheckRedirect = nil }()

	resp, err := b.Get(h.rp.URL + "/login/oidc")
	if err != nil {
		h.t.Fatal(err)
	}
	page := readAll(h.t, resp)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Request.URL.String(), h.op.Issuer) {
		h.t.Fatalf("expected the provider's login page, got %d at %s:\n%s", resp.StatusCode, resp.Request.URL, page)
	}
	action, id := formAction.FindStringSubmatch(page), hiddenID.FindStringSubmatch(page)
	if action == nil || id == nil {
		h.t.Fatalf("no login form on the provider's page:\n%s", page)
	}
	target, _ := resp.Request.URL.Parse(action[1])
	resp, err = b.PostForm(target.String(), url.Values{"id": {id[1]}, "username": {username}, "password": {password}})
	if err != nil {
		h.t.Fatal(err)
	}
	page = readAll(h.t, resp)
	if callback == "" {
		h.t.Fatalf("provider did not redirect back to the console (%d):\n%s", resp.StatusCode, page)
	}
	return callback
}

// visit GETs u in browser b and returns the status and body.
func visit(t *testing.T, b *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := b.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, readAll(t, resp)
}

func (h *harness) finishErr() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lastErr
}

func decodeIdentity(t *testing.T, body string) oidclogin.Identity {
	t.Helper()
	var id oidclogin.Identity
	if err := json.Unmarshal([]byte(body), &id); err != nil {
		t.Fatalf("callback body %q: %v", body, err)
	}
	return id
}

func TestSignIn(t *testing.T) {
	for _, tc := range []struct {
		name            string
		claimsInIDToken bool
	}{
		{"claims from userinfo", false},
		{"claims in id token", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{claimsInIDToken: tc.claimsInIDToken})
			b := h.browser()
			cb := h.signInUntilCallback(b, alice.Username, alice.Password)
			status, body := visit(t, b, cb)
			if status != http.StatusOK {
				t.Fatalf("callback: %d %s", status, body)
			}
			got := decodeIdentity(t, body)
			want := oidclogin.Identity{
				Subject:       alice.Subject,
				Issuer:        h.op.Issuer,
				Email:         alice.Email,
				EmailVerified: true,
				Name:          alice.Name,
				Groups:        alice.Groups,
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("identity = %+v, want %+v", got, want)
			}
			if u, want := got.Username(), "oidc:"+h.op.Issuer+"#"+alice.Subject; u != want {
				t.Errorf("Username() = %q, want %q", u, want)
			}
			// Finish cleared the login cookie.
			rpURL, _ := url.Parse(h.rp.URL + callbackPath)
			for _, c := range b.Jar.Cookies(rpURL) {
				if c.Name == oidclogin.CookieName {
					t.Errorf("login cookie still set after Finish")
				}
			}
		})
	}
}

func TestBegin(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	rec := httptest.NewRecorder()
	u, err := h.login.Begin(rec, httptest.NewRequest("GET", "/login/oidc", nil))
	if err != nil {
		t.Fatal(err)
	}
	au, _ := url.Parse(u)
	q := au.Query()
	if !strings.HasPrefix(u, h.op.Issuer) || q.Get("client_id") != clientID ||
		q.Get("code_challenge_method") != "S256" || q.Get("code_challenge") == "" ||
		q.Get("nonce") == "" || q.Get("state") == "" || q.Get("redirect_uri") != h.rp.URL+callbackPath ||
		q.Get("scope") != "openid email profile" {
		t.Errorf("auth URL lacks PKCE, nonce, state or scopes: %s", u)
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 {
		t.Fatalf("Begin set %d cookies, want 1", len(cookies))
	}
	c := cookies[0]
	if c.Name != oidclogin.CookieName || !c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteLaxMode ||
		c.Path != callbackPath || c.MaxAge <= 0 || c.MaxAge > int(oidclogin.LoginTimeout/time.Second) {
		t.Errorf("cookie = %+v, want HttpOnly, Secure, SameSite=Lax, Path=%s, short-lived", c, callbackPath)
	}
	for _, secret := range []string{q.Get("state"), q.Get("nonce")} {
		if strings.Contains(c.Value, secret) {
			t.Errorf("cookie carries the state or nonce in clear")
		}
	}
	if h.login.Name() != strings.TrimPrefix(h.op.Issuer, "https://") {
		t.Errorf("Name() = %q", h.login.Name())
	}
}

func TestCallbackRejected(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mangle func(h *harness, b *http.Client, callback string) string
		want   error
	}{
		{"tampered state", func(h *harness, b *http.Client, cb string) string {
			u, _ := url.Parse(cb)
			q := u.Query()
			st := []byte(q.Get("state"))
			st[0] ^= 1
			q.Set("state", string(st))
			u.RawQuery = q.Encode()
			return u.String()
		}, oidclogin.ErrState},
		{"missing state", func(h *harness, b *http.Client, cb string) string {
			u, _ := url.Parse(cb)
			q := u.Query()
			q.Del("state")
			u.RawQuery = q.Encode()
			return u.String()
		}, oidclogin.ErrState},
		{"no login cookie", func(h *harness, b *http.Client, cb string) string {
			b.Jar, _ = cookiejar.New(nil)
			return cb
		}, oidclogin.ErrNoLogin},
		{"tampered cookie", func(h *harness, b *http.Client, cb string) string {
			u, _ := url.Parse(cb)
			c := b.Jar.Cookies(u)[0]
			v := []byte(c.Value)
			v[len(v)/2] ^= 1
			c.Value, c.Path, c.Secure, c.HttpOnly = string(v), callbackPath, true, true
			b.Jar.SetCookies(u, []*http.Cookie{c})
			return cb
		}, oidclogin.ErrState},
		{"login started in another tab", func(h *harness, b *http.Client, cb string) string {
			// A second login overwrites the cookie; the first callback
			// no longer matches it.
			resp, err := b.Get(h.rp.URL + "/login/oidc")
			if err != nil {
				h.t.Fatal(err)
			}
			readAll(h.t, resp)
			return cb
		}, oidclogin.ErrState},
		{"login expired", func(h *harness, b *http.Client, cb string) string {
			h.skew.Store(int64(oidclogin.LoginTimeout + time.Minute))
			return cb
		}, oidclogin.ErrNoLogin},
		{"provider error", func(h *harness, b *http.Client, cb string) string {
			u, _ := url.Parse(cb)
			q := u.Query()
			q.Del("code")
			q.Set("error", "access_denied")
			q.Set("error_description", "<script>call +1 555 0100</script>")
			u.RawQuery = q.Encode()
			return u.String()
		}, oidclogin.ErrDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{})
			b := h.browser()
			cb := h.signInUntilCallback(b, alice.Username, alice.Password)
			code := mustQuery(t, cb, "code")
			status, body := visit(t, b, tc.mangle(h, b, cb))
			if status != http.StatusBadRequest {
				t.Fatalf("callback: %d %s, want 400", status, body)
			}
			if err := h.finishErr(); !errors.Is(err, tc.want) {
				t.Fatalf("Finish error = %v, want %v", err, tc.want)
			}
			if strings.Contains(body, code) || strings.Contains(body, "script") {
				t.Errorf("error shown to the user leaks the code or provider text: %q", body)
			}
		})
	}
}

func TestReplayedCallback(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	b := h.browser()
	cb := h.signInUntilCallback(b, alice.Username, alice.Password)
	if status, body := visit(t, b, cb); status != http.StatusOK {
		t.Fatalf("first callback: %d %s", status, body)
	}
	h.mu.Lock()
	cookie := h.callbackCookie
	h.mu.Unlock()

	// Whoever captured the callback URL and the login cookie replays both.
	replay := func(t *testing.T) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", cb, nil)
		req.Header.Set("Cookie", cookie)
		resp, err := h.op.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, readAll(t, resp)
	}
	t.Run("same coordinator", func(t *testing.T) {
		if status, body := replay(t); status != http.StatusBadRequest || !errors.Is(h.finishErr(), oidclogin.ErrState) {
			t.Fatalf("replay: %d %s (%v), want 400 and ErrState", status, body, h.finishErr())
		}
	})
	t.Run("another replica", func(t *testing.T) {
		// A replica sharing the cookie key but not the replay memory:
		// the provider's single-use code is what stops it.
		h.login = h.newProvider()
		status, body := replay(t)
		if status != http.StatusBadRequest || !errors.Is(h.finishErr(), oidclogin.ErrCode) {
			t.Fatalf("replay: %d %s (%v), want 400 and ErrCode", status, body, h.finishErr())
		}
		if strings.Contains(body, mustQuery(t, cb, "code")) {
			t.Errorf("error leaks the code: %q", body)
		}
	})
}

func TestWrongClientSecret(t *testing.T) {
	h := newHarness(t, harnessOpts{secret: "not-the-secret"})
	b := h.browser()
	cb := h.signInUntilCallback(b, alice.Username, alice.Password)
	status, body := visit(t, b, cb)
	if status != http.StatusBadRequest || !errors.Is(h.finishErr(), oidclogin.ErrClientAuth) {
		t.Fatalf("callback: %d %s (%v), want 400 and ErrClientAuth", status, body, h.finishErr())
	}
	if !strings.Contains(body, "--oidc-client-secret") || strings.Contains(body, "not-the-secret") {
		t.Errorf("error should name the flag to fix and not echo the secret: %q", body)
	}
}

func TestWrongPasswordStaysAtProvider(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	b := h.browser()
	b.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if req.URL.Path == callbackPath {
			t.Errorf("provider redirected back after a wrong password")
		}
		return nil
	}
	resp, err := b.Get(h.rp.URL + "/login/oidc")
	if err != nil {
		t.Fatal(err)
	}
	page := readAll(t, resp)
	id := hiddenID.FindStringSubmatch(page)
	resp, err = b.PostForm(h.op.Issuer+"/login", url.Values{"id": {id[1]}, "username": {"alice"}, "password": {"wrong"}})
	if err != nil {
		t.Fatal(err)
	}
	if page := readAll(t, resp); resp.StatusCode != http.StatusUnauthorized || !strings.Contains(page, "wrong username or password") {
		t.Errorf("wrong password: %d %s", resp.StatusCode, page)
	}
}

func TestNewErrors(t *testing.T) {
	// An address that refuses connections: a listener we close at once.
	closed := httptest.NewTLSServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close()
	notOIDC := httptest.NewTLSServer(http.NotFoundHandler())
	defer notOIDC.Close()
	op := oidctest.NewServer(t)

	ok := oidclogin.Config{
		Issuer:      op.Issuer,
		ClientID:    clientID,
		RedirectURL: "https://coordinator.example" + callbackPath,
		HTTPClient:  op.Client(),
	}
	for _, tc := range []struct {
		name   string
		mutate func(*oidclogin.Config)
		want   []string // substrings of the error
	}{
		{"unreachable issuer", func(c *oidclogin.Config) { c.Issuer = closedURL }, []string{"--oidc-issuer " + closedURL, "discovery failed", "refused"}},
		{"not an OpenID provider", func(c *oidclogin.Config) { c.Issuer = notOIDC.URL }, []string{"--oidc-issuer " + notOIDC.URL, "discovery failed", "404"}},
		{"issuer mismatch", func(c *oidclogin.Config) { c.Issuer = op.Issuer + "/" }, []string{"--oidc-issuer", "did not match"}},
		{"plain http", func(c *oidclogin.Config) { c.Issuer = "http://idp.example.com" }, []string{"--oidc-issuer", "must be https"}},
		{"no issuer", func(c *oidclogin.Config) { c.Issuer = "" }, []string{"--oidc-issuer is required"}},
		{"no client id", func(c *oidclogin.Config) { c.ClientID = "" }, []string{"--oidc-client-id is required"}},
		{"relative redirect", func(c *oidclogin.Config) { c.RedirectURL = callbackPath }, []string{"--oidc-redirect-url"}},
		{"short cookie key", func(c *oidclogin.Config) { c.CookieKey = []byte("short") }, []string{"32 bytes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ok
			tc.mutate(&cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			p, err := oidclogin.New(ctx, cfg)
			if err == nil {
				t.Fatalf("New succeeded (%s), want an error", p.Name())
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	t.Run("ok", func(t *testing.T) {
		if _, err := oidclogin.New(context.Background(), ok); err != nil {
			t.Fatal(err)
		}
	})
}

func mustQuery(t *testing.T, u, key string) string {
	t.Helper()
	pu, err := url.Parse(u)
	if err != nil || pu.Query().Get(key) == "" {
		t.Fatalf("no %s in %s", key, u)
	}
	return pu.Query().Get(key)
}

func readAll(t testing.TB, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestNonceMismatch(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	b := h.browser()
	cb := h.signInUntilCallback(b, alice.Username, alice.Password)
	u, _ := url.Parse(cb)
	c := b.Jar.Cookies(u)[0]
	forged, err := oidclogin.ResealWithNonce(h.login, c.Value, "not-the-nonce")
	if err != nil {
		t.Fatal(err)
	}
	c.Value, c.Path, c.Secure, c.HttpOnly = forged, callbackPath, true, true
	b.Jar.SetCookies(u, []*http.Cookie{c})
	status, body := visit(t, b, cb)
	if status != http.StatusBadRequest || !errors.Is(h.finishErr(), oidclogin.ErrToken) || !strings.Contains(body, "nonce") {
		t.Fatalf("callback: %d %s (%v), want 400 and ErrToken (nonce)", status, body, h.finishErr())
	}
}
