// Package oidclogin signs console users in with an external OpenID Connect
// provider (authorization-code flow with PKCE S256 and a nonce).
//
// The coordinator's console calls [Provider.Begin] from its login route
// (GET /login/oidc) and [Provider.Finish] from the callback route
// (GET /login/oidc/callback), then maps the returned [Identity] to a local
// account (see [Identity.Username]).
//
// # Where the login state lives
//
// Between Begin and Finish the state, the nonce and the PKCE verifier travel in
// one cookie, sealed with AES-256-GCM under [Config.CookieKey]: the browser
// carries it but can neither read nor alter it, so no server-side session
// table is needed and any coordinator replica holding the same key can finish
// a login another one began. The cookie is HttpOnly, SameSite=Lax (the
// callback is a top-level GET redirect from the provider, which Lax allows),
// Secure whenever the redirect URL is https, scoped to the callback path, and
// lives [LoginTimeout]; the sealed payload carries its own expiry so a
// browser that keeps the cookie longer gains nothing. Finish always clears it.
//
// A callback is accepted once per process: Finish remembers the states it
// has consumed until they expire, and the provider itself refuses a code
// that was already exchanged (which also covers a replay on another replica).
package oidclogin

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"
)

// LoginTimeout is how long a user has between Begin and Finish.
const LoginTimeout = 10 * time.Minute

// CookieName is the cookie that carries the sealed login state.
const CookieName = "meshlink_oidc_login"

// callTimeout bounds each call to the provider (discovery, token, userinfo)
// when the caller's context has no deadline of its own.
const callTimeout = 15 * time.Second

// maxConsumed bounds the replay cache; past it, replays are left to the
// provider's single-use codes rather than growing memory without limit.
const maxConsumed = 100_000

// Errors returned by Finish, for callers that want to tell them apart. Every
// error Finish returns wraps one of these and its message is safe to show to
// the user: it never contains a token, code or secret.
var (
	// ErrNoLogin: no login cookie came back (never started, expired, or
	// cookies are blocked).
	ErrNoLogin = errors.New("no sign-in is in progress or it expired; start the sign-in again")
	// ErrState: the callback does not belong to the login this browser
	// started (stale tab, forged or tampered link) or was already used.
	ErrState = errors.New("the sign-in response does not match the sign-in this browser started; start the sign-in again")
	// ErrDenied: the provider returned an error instead of a code (the user
	// cancelled, or the provider refused the client).
	ErrDenied = errors.New("the identity provider did not sign you in")
	// ErrClientAuth: the provider rejected the coordinator's client
	// credentials. An operator must fix the configuration.
	ErrClientAuth = errors.New("the identity provider rejected the coordinator's client credentials; an administrator must check --oidc-client-id and --oidc-client-secret")
	// ErrCode: the provider refused the authorization code (already used,
	// expired, or issued for another client).
	ErrCode = errors.New("the identity provider refused the sign-in code (already used or expired); start the sign-in again")
	// ErrToken: the ID token failed verification.
	ErrToken = errors.New("the identity provider's ID token could not be verified")
	// ErrProvider: the provider could not be reached or answered nonsense.
	ErrProvider = errors.New("the identity provider could not be reached; try again later")
)

// Config configures a Provider. The coordinator fills it from
// --oidc-issuer, --oidc-client-id, --oidc-client-secret and
// --oidc-redirect-url.
type Config struct {
	Issuer       string
	ClientID     string
	ClientSecret string // may be empty for a public client (PKCE still applies)
	// RedirectURL is the absolute callback URL registered with the provider,
	// by default <coordinator URL>/login/oidc/callback.
	RedirectURL string
	// Scopes requested; default openid, email, profile. "openid" is always
	// included.
	Scopes []string
	// HTTPClient is used for discovery, token and userinfo calls; nil means
	// http.DefaultClient.
	HTTPClient *http.Client
	// CookieKey seals the login cookie: exactly 32 random bytes (AES-256).
	// Replicas behind one name must share it. Nil generates a random key,
	// which is fine for a single coordinator: a restart only fails logins
	// that were in flight.
	CookieKey []byte
	// Now is the clock; nil means time.Now.
	Now    func() time.Time
	Logger *slog.Logger // nil discards
}

// Identity is who the provider says signed in.
type Identity struct {
	Subject       string // "sub": stable and unique within Issuer
	Issuer        string // "iss"
	Email         string // may be empty if the provider does not share it
	EmailVerified bool
	Name          string
	// Groups is the "groups" claim (ID token, else userinfo); nil when the
	// provider sends none.
	Groups []string
}

// Username is the local account name for this identity:
// "oidc:<issuer>#<subject>". Issuer plus subject is the only pair OpenID
// Connect guarantees to be stable and unique; email addresses are neither,
// so they are for display only.
func (id Identity) Username() string {
	return "oidc:" + id.Issuer + "#" + id.Subject
}

// Provider is one configured OpenID provider. It is safe for concurrent use.
type Provider struct {
	name     string
	issuer   string
	oauth    oauth2.Config
	verifier *oidc.IDTokenVerifier
	op       *oidc.Provider
	client   *http.Client
	aead     cipher.AEAD
	secure   bool
	path     string
	now      func() time.Time
	log      *slog.Logger

	mu       sync.Mutex           // guards the fields below
	consumed map[string]time.Time // state → expiry of states Finish has accepted
}

// New discovers the provider at cfg.Issuer. Its errors name the flag to fix.
func New(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("--oidc-issuer is required to enable OIDC sign-in")
	}
	iu, err := url.Parse(cfg.Issuer)
	if err != nil || iu.Host == "" || (iu.Scheme != "https" && iu.Scheme != "http") {
		return nil, fmt.Errorf("--oidc-issuer %q: not an absolute http(s) URL", cfg.Issuer)
	}
	if iu.Scheme == "http" && !isLoopback(iu.Hostname()) {
		// Discovery and key fetches over plain HTTP would let anyone on the
		// path substitute the provider's signing keys.
		return nil, fmt.Errorf("--oidc-issuer %q: must be https (plain http is allowed only for localhost)", cfg.Issuer)
	}
	if cfg.ClientID == "" {
		return nil, errors.New("--oidc-client-id is required with --oidc-issuer")
	}
	ru, err := url.Parse(cfg.RedirectURL)
	if err != nil || ru.Host == "" || (ru.Scheme != "https" && ru.Scheme != "http") {
		return nil, fmt.Errorf("--oidc-redirect-url %q: not an absolute http(s) URL", cfg.RedirectURL)
	}
	key := cfg.CookieKey
	if key == nil {
		key = make([]byte, 32)
		rand.Read(key)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("oidclogin: cookie key must be 32 bytes, got %d", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("oidclogin: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("oidclogin: %w", err)
	}

	client := cfg.HTTPClient
	if client == nil {
		client = http.DefaultClient
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("subsystem", "oidclogin", "issuer", cfg.Issuer)

	dctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	op, err := oidc.NewProvider(oidc.ClientContext(dctx, client), cfg.Issuer)
	if err != nil {
		return nil, fmt.Errorf("--oidc-issuer %s: OpenID discovery failed (check the URL is reachable from the coordinator and serves /.well-known/openid-configuration): %w", cfg.Issuer, err)
	}

	scopes := cfg.Scopes
	if len(scopes) == 0 {
		scopes = []string{oidc.ScopeOpenID, "email", "profile"}
	}
	hasOpenID := false
	for _, s := range scopes {
		hasOpenID = hasOpenID || s == oidc.ScopeOpenID
	}
	if !hasOpenID {
		scopes = append([]string{oidc.ScopeOpenID}, scopes...)
	}

	path := ru.EscapedPath()
	if path == "" {
		path = "/"
	}
	return &Provider{
		name:   iu.Host,
		issuer: cfg.Issuer,
		oauth: oauth2.Config{
			ClientID:     cfg.ClientID,
			ClientSecret: cfg.ClientSecret,
			Endpoint:     op.Endpoint(),
			RedirectURL:  cfg.RedirectURL,
			Scopes:       scopes,
		},
		verifier: op.Verifier(&oidc.Config{ClientID: cfg.ClientID, Now: now}),
		op:       op,
		client:   client,
		aead:     aead,
		secure:   ru.Scheme == "https",
		path:     path,
		now:      now,
		log:      log,
		consumed: make(map[string]time.Time),
	}, nil
}

// Name is the provider's display name for a "Sign in with …" button: the
// issuer's host.
func (p *Provider) Name() string { return p.name }

// loginState is what the sealed cookie carries between Begin and Finish.
type loginState struct {
	State    string `json:"s"`
	Nonce    string `json:"n"`
	Verifier string `json:"v"`
	Expires  int64  `json:"e"` // unix seconds
}

// Begin starts a sign-in: it sets the sealed login cookie on w and returns
// the provider URL to redirect the browser to (302). r is the request that
// asked to sign in (Begin does not read it today).
func (p *Provider) Begin(w http.ResponseWriter, r *http.Request) (string, error) {
	ls := loginState{
		State:    randomString(),
		Nonce:    randomString(),
		Verifier: oauth2.GenerateVerifier(),
		Expires:  p.now().Add(LoginTimeout).Unix(),
	}
	sealed, err := p.seal(ls)
	if err != nil {
		return "", fmt.Errorf("oidclogin: seal login state: %w", err)
	}
	http.SetCookie(w, &http.Cookie{
		Name:     CookieName,
		Value:    sealed,
		Path:     p.path,
		MaxAge:   int(LoginTimeout / time.Second),
		HttpOnly: true,
		Secure:   p.secure,
		SameSite: http.SameSiteLaxMode,
	})
	return p.oauth.AuthCodeURL(ls.State, oidc.Nonce(ls.Nonce), oauth2.S256ChallengeOption(ls.Verifier)), nil
}

// Finish completes a sign-in from the provider's redirect to the callback
// URL: it checks the state against the cookie Begin set, exchanges the code
// (with the PKCE verifier), verifies the ID token's signature, issuer,
// audience, expiry and nonce, and returns who signed in. It always clears
// the login cookie. Its errors wrap one of the Err* sentinels and are safe to
// show to the user.
func (p *Provider) Finish(w http.ResponseWriter, r *http.Request) (Identity, error) {
	http.SetCookie(w, &http.Cookie{
		Name: CookieName, Value: "", Path: p.path, MaxAge: -1,
		HttpOnly: true, Secure: p.secure, SameSite: http.SameSiteLaxMode,
	})
	id, err := p.finish(r)
	if err != nil {
		return Identity{}, fmt.Errorf("sign-in with %s: %w", p.name, err)
	}
	p.log.InfoContext(r.Context(), "oidc sign-in", "subject", id.Subject, "email", id.Email)
	return id, nil
}

func (p *Provider) finish(r *http.Request) (Identity, error) {
	ctx := r.Context()
	c, err := r.Cookie(CookieName)
	if err != nil || c.Value == "" {
		return Identity{}, ErrNoLogin
	}
	ls, err := p.open(c.Value)
	if err != nil {
		p.log.WarnContext(ctx, "oidc callback with an unreadable login cookie", "err", err)
		return Identity{}, ErrState
	}
	now := p.now()
	if now.Unix() > ls.Expires {
		return Identity{}, ErrNoLogin
	}
	q := r.URL.Query()
	if subtle.ConstantTimeCompare([]byte(q.Get("state")), []byte(ls.State)) != 1 {
		p.log.WarnContext(ctx, "oidc callback state mismatch")
		return Identity{}, ErrState
	}
	if !p.consume(ls.State, time.Unix(ls.Expires, 0), now) {
		p.log.WarnContext(ctx, "oidc callback replayed")
		return Identity{}, ErrState
	}
	if e := q.Get("error"); e != "" {
		// The description is free text an attacker can put in a link, so
		// it goes to the log, and only the standard error code to the user.
		p.log.InfoContext(ctx, "oidc provider returned an error", "error", e, "description", q.Get("error_description"))
		return Identity{}, fmt.Errorf("%w (%s)", ErrDenied, safeCode(e))
	}
	code := q.Get("code")
	if code == "" {
		return Identity{}, fmt.Errorf("%w (no code in the response)", ErrDenied)
	}

	cctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	cctx = oidc.ClientContext(cctx, p.client)
	tok, err := p.oauth.Exchange(cctx, code, oauth2.VerifierOption(ls.Verifier))
	if err != nil {
		return Identity{}, p.exchangeError(ctx, err)
	}
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		return Identity{}, fmt.Errorf("%w: the token response has no id_token", ErrToken)
	}
	idt, err := p.verifier.Verify(cctx, raw)
	if err != nil {
		p.log.WarnContext(ctx, "oidc id token rejected", "err", err)
		return Identity{}, fmt.Errorf("%w: %s", ErrToken, verifyReason(err))
	}
	if subtle.ConstantTimeCompare([]byte(idt.Nonce), []byte(ls.Nonce)) != 1 {
		p.log.WarnContext(ctx, "oidc id token nonce mismatch")
		return Identity{}, fmt.Errorf("%w: nonce mismatch", ErrToken)
	}
	if idt.AccessTokenHash != "" {
		if err := idt.VerifyAccessToken(tok.AccessToken); err != nil {
			return Identity{}, fmt.Errorf("%w: access token hash mismatch", ErrToken)
		}
	}
	var claims struct {
		Email         string   `json:"email"`
		EmailVerified flexBool `json:"email_verified"`
		Name          string   `json:"name"`
		Preferred     string   `json:"preferred_username"`
		Groups        []string `json:"groups"`
	}
	if err := idt.Claims(&claims); err != nil {
		return Identity{}, fmt.Errorf("%w: malformed claims", ErrToken)
	}
	id := Identity{
		Subject:       idt.Subject,
		Issuer:        idt.Issuer,
		Email:         claims.Email,
		EmailVerified: bool(claims.EmailVerified),
		Name:          claims.Name,
		Groups:        claims.Groups,
	}
	// Many providers put only sub in the ID token of the code flow and
	// the profile behind the userinfo endpoint.
	if (id.Email == "" || id.Name == "" || id.Groups == nil) && p.op.UserInfoEndpoint() != "" {
		p.fillFromUserInfo(cctx, tok, &id)
	}
	if id.Name == "" {
		id.Name = claims.Preferred
	}
	if id.Subject == "" {
		return Identity{}, fmt.Errorf("%w: no subject", ErrToken)
	}
	return id, nil
}

// fillFromUserInfo adds email and name from the userinfo endpoint. It is
// best effort: the ID token already proved who signed in.
func (p *Provider) fillFromUserInfo(ctx context.Context, tok *oauth2.Token, id *Identity) {
	ui, err := p.op.UserInfo(ctx, oauth2.StaticTokenSource(tok))
	if err != nil {
		p.log.InfoContext(ctx, "oidc userinfo unavailable", "err", err)
		return
	}
	if ui.Subject != id.Subject {
		// OpenID Connect Core 5.3.2: the response MUST NOT be used otherwise.
		p.log.WarnContext(ctx, "oidc userinfo subject differs from id token; ignoring it")
		return
	}
	var extra struct {
		Name   string   `json:"name"`
		Groups []string `json:"groups"`
	}
	_ = ui.Claims(&extra)
	if id.Groups == nil {
		id.Groups = extra.Groups
	}
	if id.Email == "" && ui.Email != "" {
		id.Email, id.EmailVerified = ui.Email, ui.EmailVerified
	}
	if id.Name == "" {
		id.Name = extra.Name
	}
}

func (p *Provider) exchangeError(ctx context.Context, err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		// Log the provider's own words (they never contain our tokens);
		// the user gets a sentinel that says what to do.
		p.log.WarnContext(ctx, "oidc code exchange refused", "status", re.Response.StatusCode, "error", re.ErrorCode, "description", re.ErrorDescription)
		switch {
		case re.ErrorCode == "invalid_client" || re.ErrorCode == "unauthorized_client" ||
			(re.ErrorCode == "" && re.Response.StatusCode == http.StatusUnauthorized):
			return ErrClientAuth
		case re.ErrorCode == "invalid_grant":
			return ErrCode
		case re.ErrorCode != "":
			return fmt.Errorf("%w (%s)", ErrDenied, safeCode(re.ErrorCode))
		}
		return fmt.Errorf("%w (HTTP %d from the token endpoint)", ErrProvider, re.Response.StatusCode)
	}
	p.log.WarnContext(ctx, "oidc code exchange failed", "err", err)
	return ErrProvider
}

// consume records state as used until exp; it reports false if it already was.
func (p *Provider) consume(state string, exp, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.consumed[state]; ok {
		return false
	}
	if len(p.consumed) >= maxConsumed/2 {
		for s, e := range p.consumed {
			if now.After(e) {
				delete(p.consumed, s)
			}
		}
	}
	if len(p.consumed) < maxConsumed {
		p.consumed[state] = exp
	}
	return true
}

// cookieAD binds sealed values to this use, so a value sealed for another
// purpose under the same key does not open here.
var cookieAD = []byte(CookieName + "/v1")

func (p *Provider) seal(ls loginState) (string, error) {
	plain, err := json.Marshal(ls)
	if err != nil {
		return "", err
	}
	nonce := make([]byte, p.aead.NonceSize(), p.aead.NonceSize()+len(plain)+p.aead.Overhead())
	rand.Read(nonce)
	return base64.RawURLEncoding.EncodeToString(p.aead.Seal(nonce, nonce, plain, cookieAD)), nil
}

func (p *Provider) open(v string) (loginState, error) {
	var ls loginState
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return ls, err
	}
	ns := p.aead.NonceSize()
	if len(b) < ns+p.aead.Overhead() {
		return ls, errors.New("short cookie")
	}
	plain, err := p.aead.Open(nil, b[:ns], b[ns:], cookieAD)
	if err != nil {
		return ls, err
	}
	d := json.NewDecoder(bytes.NewReader(plain))
	d.DisallowUnknownFields()
	if err := d.Decode(&ls); err != nil {
		return ls, err
	}
	if ls.State == "" || ls.Nonce == "" || ls.Verifier == "" {
		return ls, errors.New("incomplete login state")
	}
	return ls, nil
}

func randomString() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, callTimeout)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// safeCode keeps an OAuth error code to its RFC 6749 alphabet and a sane
// length, since it may come from a crafted link.
func safeCode(s string) string {
	if len(s) > 64 {
		s = s[:64]
	}
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.' {
			return r
		}
		return -1
	}, s)
}

// verifyReason turns a go-oidc verification error into a short, token-free
// phrase for the user.
func verifyReason(err error) string {
	var exp *oidc.TokenExpiredError
	switch {
	case errors.As(err, &exp):
		return "the token has expired (is the coordinator's clock right?)"
	case strings.Contains(err.Error(), "audience"):
		return "the token was issued for another client"
	case strings.Contains(err.Error(), "issuer"):
		return "the token was issued by another issuer"
	case strings.Contains(err.Error(), "signature"):
		return "bad signature"
	}
	return "invalid token"
}

// flexBool accepts email_verified as a JSON boolean or as the string
// "true"/"false", which some providers send.
type flexBool bool

func (b *flexBool) UnmarshalJSON(data []byte) error {
	switch string(data) {
	case "true", `"true"`:
		*b = true
	case "false", `"false"`, "null", `""`:
		*b = false
	default:
		return fmt.Errorf("email_verified: unexpected %s", data)
	}
	return nil
}
