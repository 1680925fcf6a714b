package httpauth_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/meshlink/meshlink/agent/httpauth"
	"github.com/meshlink/meshlink/wire"
)

const issuer = "https://login.test"

// issuerKeys is a real issuer: its keys, generated here, served as a
// JWKS by an HTTP server that counts its fetches.
type issuerKeys struct {
	t      *testing.T
	mu     sync.Mutex
	keys   map[string]crypto.Signer // kid -> private key
	served []string                 // kids in the JWKS
	hits   atomic.Int32
	srv    *httptest.Server
}

func newIssuer(t *testing.T) *issuerKeys {
	ik := &issuerKeys{t: t, keys: map[string]crypto.Signer{}}
	ik.add("rsa1", mustRSA(t))
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ik.add("ec1", ec)
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ik.add("ed1", ed)
	ik.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ik.hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write(ik.jwks())
	}))
	t.Cleanup(ik.srv.Close)
	return ik
}

func mustRSA(t *testing.T) *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// add makes kid a key of the issuer, published in its JWKS.
func (ik *issuerKeys) add(kid string, k crypto.Signer) {
	ik.mu.Lock()
	defer ik.mu.Unlock()
	ik.keys[kid] = k
	ik.served = append(ik.served, kid)
}

func (ik *issuerKeys) jwks() []byte {
	ik.mu.Lock()
	defer ik.mu.Unlock()
	var set jose.JSONWebKeySet
	for _, kid := range ik.served {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: ik.keys[kid].Public(), KeyID: kid, Use: "sig"})
	}
	// A key of a type no one knows must not spoil the others.
	b, _ := json.Marshal(set)
	return []byte(strings.Replace(string(b), `{"keys":[`, `{"keys":[{"kty":"XYZ","kid":"odd"},`, 1))
}

func algOf(k crypto.Signer) jose.SignatureAlgorithm {
	switch k.(type) {
	case *rsa.PrivateKey:
		return jose.RS256
	case *ecdsa.PrivateKey:
		return jose.ES256
	}
	return jose.EdDSA
}

// claims of a token the service accepts, at now.
func good(now time.Time) jwt.Claims {
	return jwt.Claims{Issuer: issuer, Subject: "bob", Audience: jwt.Audience{"web"},
		Expiry: jwt.NewNumericDate(now.Add(5 * time.Minute)), IssuedAt: jwt.NewNumericDate(now)}
}

func (ik *issuerKeys) sign(kid string, std jwt.Claims, extra map[string]any) string {
	ik.mu.Lock()
	k := ik.keys[kid]
	ik.mu.Unlock()
	return signWith(ik.t, k, algOf(k), kid, std, extra)
}

func signWith(t *testing.T, key any, alg jose.SignatureAlgorithm, kid string, std jwt.Claims, extra map[string]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	b := jwt.Signed(sig).Claims(std)
	if extra != nil {
		b = b.Claims(extra)
	}
	s, err := b.Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// service is a real HTTP server behind an Authorizer: what reaches it
// is recorded.
type service struct {
	srv  *httptest.Server
	mu   sync.Mutex
	seen []http.Header
}

func newService(t *testing.T, a *httpauth.Authorizer, from wire.NodeID) *service {
	s := &service{}
	s.srv = httptest.NewServer(a.Middleware(func(*http.Request) wire.NodeID { return from }, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.seen = append(s.seen, r.Header.Clone())
		s.mu.Unlock()
		io.WriteString(w, "hello "+r.Method+" "+r.URL.Path)
	})))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *service) reached() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.seen)
}

func (s *service) last() http.Header {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen[len(s.seen)-1]
}

type resp struct {
	code int
	auth string
	body string
}

func do(t *testing.T, method, url, token string, hdr map[string]string) resp {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return resp{r.StatusCode, r.Header.Get("WWW-Authenticate"), string(b)}
}

func jwtAuth(ik *issuerKeys) *wire.HTTPAuth {
	return &wire.HTTPAuth{JWT: &wire.JWT{Issuer: issuer, JWKSURL: ik.srv.URL + "/jwks.json", Audiences: []string{"web", "web-admin"},
		ForwardClaims: []wire.ForwardClaim{{Claim: "groups", Header: "x-groups"}, {Claim: "sub", Header: "x-user"}}}}
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestJWT: tokens of a real issuer, whose JWKS a server serves: a valid
// one passes (RSA, ECDSA and Ed25519 keys), every bad one gets 401 with
// WWW-Authenticate and never reaches the service.
func TestJWT(t *testing.T) {
	ik := newIssuer(t)
	clk := &clock{t: time.Now()}
	set := httpauth.NewSet(httpauth.SetConfig{Now: clk.now, Logger: nil})
	auths := set.Update([]wire.Service{{Name: "web", Providers: []wire.Provider{{Node: 1}}, HTTPAuth: jwtAuth(ik)}}, 1)
	svc := newService(t, auths["web"], 2)
	url := svc.srv.URL + "/api/x"
	now := clk.now()

	for _, kid := range []string{"rsa1", "ec1", "ed1"} {
		if r := do(t, "GET", url, ik.sign(kid, good(now), map[string]any{"groups": []string{"dev", "admin"}}), nil); r.code != 200 || r.body != "hello GET /api/x" {
			t.Fatalf("valid %s token: %+v", kid, r)
		}
	}
	if got := svc.last(); got.Get("X-User") != "bob" || got.Get("X-Groups") != "dev,admin" {
		t.Errorf("forwarded claims: x-user %q x-groups %q", got.Get("X-User"), got.Get("X-Groups"))
	}
	if n := ik.hits.Load(); n != 1 {
		t.Errorf("the JWKS was fetched %d times for three tokens, want 1 (cached)", n)
	}

	otherRSA := mustRSA(t)
	rsa1 := func() *rsa.PrivateKey { ik.mu.Lock(); defer ik.mu.Unlock(); return ik.keys["rsa1"].(*rsa.PrivateKey) }()
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: must(x509.MarshalPKIXPublicKey(rsa1.Public()))})
	b64 := base64.RawURLEncoding.EncodeToString
	payload, _ := json.Marshal(good(now))
	expired, notYet, wrongAud, wrongIss, noExp := good(now), good(now), good(now), good(now), good(now)
	expired.Expiry = jwt.NewNumericDate(now.Add(-5 * time.Minute))
	notYet.NotBefore = jwt.NewNumericDate(now.Add(5 * time.Minute))
	wrongAud.Audience = jwt.Audience{"db"}
	wrongIss.Issuer = "https://evil.test"
	noExp.Expiry = nil
	valid := ik.sign("rsa1", good(now), nil)
	parts := strings.Split(valid, ".")
	for _, tc := range []struct {
		name, token, reason, desc string
		header                    map[string]string
	}{
		{"no token", "", httpauth.ReasonMissingToken, "no bearer token", nil},
		{"basic auth", "", httpauth.ReasonMissingToken, "no bearer token", map[string]string{"Authorization": "Basic Ym9iOnB3"}},
		{"expired", ik.sign("rsa1", expired, nil), httpauth.ReasonExpired, "the token expired", nil},
		{"not yet valid", ik.sign("ec1", notYet, nil), httpauth.ReasonNotYetValid, "the token is not valid yet", nil},
		{"wrong audience", ik.sign("rsa1", wrongAud, nil), httpauth.ReasonWrongAudience, "the token is for another audience", nil},
		{"wrong issuer", ik.sign("ed1", wrongIss, nil), httpauth.ReasonWrongIssuer, "the token is from another issuer", nil},
		{"no exp", ik.sign("rsa1", noExp, nil), httpauth.ReasonMalformed, "the token has no exp", nil},
		{"wrong key, issuer's kid", signWith(t, otherRSA, jose.RS256, "rsa1", good(now), nil), httpauth.ReasonBadSignature, "the token's signature does not verify", nil},
		{"wrong key, no kid", signWith(t, otherRSA, jose.RS256, "", good(now), nil), httpauth.ReasonBadSignature, "", nil},
		{"tampered payload", parts[0] + "." + b64([]byte(`{"iss":"https://login.test","sub":"admin","aud":"web","exp":9999999999}`)) + "." + parts[2], httpauth.ReasonBadSignature, "", nil},
		{"alg none", b64([]byte(`{"alg":"none","kid":"rsa1"}`)) + "." + b64(payload) + ".", httpauth.ReasonAlgorithm, "the token's signature algorithm is not allowed", nil},
		{"HS256 keyed with the public key", signWith(t, pubPEM, jose.HS256, "rsa1", good(now), nil), httpauth.ReasonAlgorithm, "", nil},
		{"HS256 keyed with the DER key", signWith(t, must(x509.MarshalPKIXPublicKey(rsa1.Public())), jose.HS256, "rsa1", good(now), nil), httpauth.ReasonAlgorithm, "", nil},
		{"garbage", "garbage", httpauth.ReasonMalformed, "the token is not a signed JWT", nil},
		{"three dots of garbage", "a.b.c", httpauth.ReasonMalformed, "", nil},
		{"oversized", strings.Repeat("a", httpauth.MaxToken+1), httpauth.ReasonTooLarge, "the token is too large", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, fetches := svc.reached(), ik.hits.Load()
			beforeN := set.Refused("web", tc.reason)
			r := do(t, "GET", url, tc.token, tc.header)
			if r.code != http.StatusUnauthorized {
				t.Fatalf("got %+v, want 401", r)
			}
			if !strings.HasPrefix(r.auth, `Bearer realm="meshlink/web", error="invalid_token", error_description="`) || !strings.Contains(r.auth, tc.desc) {
				t.Errorf("WWW-Authenticate: %q (want description %q)", r.auth, tc.desc)
			}
			if !strings.HasPrefix(r.body, "meshlink: unauthorized: ") {
				t.Errorf("body %q", r.body)
			}
			if svc.reached() != before {
				t.Error("the service saw the request")
			}
			if got := set.Refused("web", tc.reason); got != beforeN+1 {
				t.Errorf("refused{reason=%s} went from %v to %v", tc.reason, beforeN, got)
			}
			if ik.hits.Load() != fetches {
				t.Errorf("a bad token made the provider fetch the JWKS")
			}
		})
	}

	// Key rotation: the issuer publishes k2 and signs with it. Just after
	// a fetch, an unknown kid does not fetch again (a flood of made-up
	// kids must not hammer the issuer); once MinRefetch passed, it does.
	ik.add("k2", mustRSA(t))
	rotated := ik.sign("k2", good(now), nil)
	fetches := ik.hits.Load()
	if r := do(t, "GET", url, rotated, nil); r.code != 401 || !strings.Contains(r.auth, "the token's key is not the issuer's") {
		t.Fatalf("new kid within MinRefetch: %+v", r)
	}
	if ik.hits.Load() != fetches {
		t.Fatal("an unknown kid fetched the JWKS within MinRefetch")
	}
	clk.add(httpauth.MinRefetch)
	if r := do(t, "GET", url, rotated, nil); r.code != 200 {
		t.Fatalf("the rotated key: %+v", r)
	}
	if ik.hits.Load() != fetches+1 {
		t.Errorf("JWKS fetches %d, want %d", ik.hits.Load(), fetches+1)
	}
	// A made-up kid now: refused, no fetch either.
	if r := do(t, "GET", url, signWith(t, otherRSA, jose.RS256, "made-up", good(now), nil), nil); r.code != 401 || ik.hits.Load() != fetches+1 {
		t.Errorf("made-up kid: %+v, fetches %d", r, ik.hits.Load())
	}
	// The cache ages out: a request after RefreshEvery fetches again.
	clk.add(httpauth.RefreshEvery + time.Second)
	if r := do(t, "GET", url, ik.sign("rsa1", good(clk.now()), nil), nil); r.code != 200 || ik.hits.Load() != fetches+2 {
		t.Errorf("after RefreshEvery: %+v, fetches %d", r, ik.hits.Load())
	}
	// A verified token is remembered, but never past its exp: one that
	// expires in 20 s passes now and is refused 55 s later (20 s + the
	// 30 s leeway), though a token is otherwise trusted for a minute.
	short := good(clk.now())
	short.Expiry = jwt.NewNumericDate(clk.now().Add(20 * time.Second))
	shortTok := ik.sign("ec1", short, nil)
	for range 3 {
		if r := do(t, "GET", url, shortTok, nil); r.code != 200 {
			t.Fatalf("short-lived token: %+v", r)
		}
	}
	clk.add(55 * time.Second)
	if r := do(t, "GET", url, shortTok, nil); r.code != 401 || !strings.Contains(r.auth, "the token expired") {
		t.Errorf("a remembered token past its exp: %+v", r)
	}
	// A map that leaves the jwt as it was keeps the Authorizer and its keys.
	if again := set.Update([]wire.Service{{Name: "web", Providers: []wire.Provider{{Node: 1}}, HTTPAuth: jwtAuth(ik)}}, 1); again["web"] != auths["web"] {
		t.Error("an unchanged map rebuilt the Authorizer")
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestForwardedClaims: a client cannot forge the headers claims go to;
// claim values lose control characters and are bounded.
func TestForwardedClaims(t *testing.T) {
	ik := newIssuer(t)
	auth := jwtAuth(ik)
	auth.JWT.Optional = true
	a, err := httpauth.New(httpauth.Config{Service: "web", Auth: auth})
	if err != nil {
		t.Fatal(err)
	}
	svc := newService(t, a, 2)
	now := time.Now()
	forged := map[string]string{"X-User": "admin", "x-groups": "admin"}
	// Optional token, none given: passes, with the forged headers removed.
	if r := do(t, "GET", svc.srv.URL+"/", "", forged); r.code != 200 {
		t.Fatalf("no token on an optional jwt: %+v", r)
	}
	if h := svc.last(); h.Get("X-User") != "" || h.Get("X-Groups") != "" {
		t.Errorf("forged headers reached the service: %v", h)
	}
	// A token whose claims lack groups: x-user replaced, x-groups gone.
	if r := do(t, "GET", svc.srv.URL+"/", ik.sign("rsa1", good(now), nil), forged); r.code != 200 {
		t.Fatalf("%+v", r)
	}
	if h := svc.last(); h.Get("X-User") != "bob" || len(h.Values("X-User")) != 1 || h.Get("X-Groups") != "" {
		t.Errorf("headers: %v", h)
	}
	// An optional jwt still refuses a bad token.
	if r := do(t, "GET", svc.srv.URL+"/", "garbage", nil); r.code != 401 {
		t.Errorf("bad token on an optional jwt: %+v", r)
	}
	// CR/LF in a claim cannot add a header; a long claim is cut.
	evil := good(now)
	evil.Subject = "bob\r\nX-Admin: yes"
	if r := do(t, "GET", svc.srv.URL+"/", ik.sign("rsa1", evil, map[string]any{"groups": strings.Repeat("g", 5000)}), nil); r.code != 200 {
		t.Fatalf("%+v", r)
	}
	h := svc.last()
	if h.Get("X-User") != "bobX-Admin: yes" || h.Get("X-Admin") != "" {
		t.Errorf("x-user %q, x-admin %q", h.Get("X-User"), h.Get("X-Admin"))
	}
	if n := len(h.Get("X-Groups")); n != wire.MaxClaimValue {
		t.Errorf("x-groups is %d bytes, want %d", n, wire.MaxClaimValue)
	}
}

// TestJWKSFile: the keys from a file on the provider's host; a file that
// is missing refuses with keys_unavailable and is read again later.
func TestJWKSFile(t *testing.T) {
	ik := newIssuer(t)
	file := filepath.Join(t.TempDir(), "jwks.json")
	clk := &clock{t: time.Now()}
	set := httpauth.NewSet(httpauth.SetConfig{Now: clk.now})
	auth := &wire.HTTPAuth{JWT: &wire.JWT{Issuer: issuer, JWKSFile: file, Audiences: []string{"web"}}}
	svc := newService(t, set.Update([]wire.Service{{Name: "web", Providers: []wire.Provider{{Node: 1}}, HTTPAuth: auth}}, 1)["web"], 2)
	tok := ik.sign("ec1", good(clk.now()), nil)
	if r := do(t, "GET", svc.srv.URL+"/", tok, nil); r.code != 401 || !strings.Contains(r.auth, "keys are not available") {
		t.Fatalf("missing file: %+v", r)
	}
	if set.Refused("web", httpauth.ReasonKeysUnavailable) != 1 {
		t.Error("keys_unavailable not counted")
	}
	if err := os.WriteFile(file, ik.jwks(), 0o600); err != nil {
		t.Fatal(err)
	}
	clk.add(httpauth.MinRefetch)
	if r := do(t, "GET", svc.srv.URL+"/", tok, nil); r.code != 200 {
		t.Fatalf("with the file: %+v", r)
	}
}

// TestRequestRules: the policy's request rules at the provider: first
// match wins, 403 names the rule's line, claims decide when rules.
func TestRequestRules(t *testing.T) {
	ik := newIssuer(t)
	auth := jwtAuth(ik)
	auth.Rules = []wire.RequestRule{
		{Rule: 1, Line: 10, Deny: true, From: []string{"2"}, Methods: []string{"DELETE"}},
		{Rule: 2, Line: 14, From: []string{"2", "3"}, Methods: []string{"GET"}, Paths: []string{"/api/*"}},
		{Rule: 3, Line: 18, From: []string{"*"}, When: []wire.ClaimMatch{{Claim: "groups", Contains: "admin"}}},
	}
	set := httpauth.NewSet(httpauth.SetConfig{})
	a := set.Update([]wire.Service{{Name: "web", Providers: []wire.Provider{{Node: 1}}, HTTPAuth: auth}}, 1)["web"]
	from2, from4 := newService(t, a, 2), newService(t, a, 4)
	now := time.Now()
	user := ik.sign("rsa1", good(now), map[string]any{"groups": []string{"dev"}})
	admin := ik.sign("rsa1", good(now), map[string]any{"groups": []string{"dev", "admin"}})
	for _, tc := range []struct {
		name         string
		svc          *service
		method, path string
		token        string
		code         int
		body         string
	}{
		{"GET api", from2, "GET", "/api/x", user, 200, "hello GET /api/x"},
		{"POST api", from2, "POST", "/api/x", user, 403, "meshlink: forbidden: no policy rule lets this node make POST /api/x to web\n"},
		{"GET outside api", from2, "GET", "/admin", user, 403, "no policy rule"},
		{"POST as admin", from2, "POST", "/api/x", admin, 200, "hello POST"},
		{"DELETE denied first, admin or not", from2, "DELETE", "/api/x", admin, 403, "meshlink: forbidden: policy rule 1 (line 10) denies DELETE /api/x to web\n"},
		{"another node: rule 2 not its", from4, "GET", "/api/x", user, 403, "no policy rule"},
		{"another node as admin", from4, "DELETE", "/api/x", admin, 200, "hello DELETE"},
		{"dot segments", from2, "GET", "/api/../admin", admin, 400, "not clean"},
		{"escaped slash", from2, "GET", "/api%2F..%2Fadmin", admin, 400, "not clean"},
		{"no token: 401 before the rules", from2, "GET", "/api/x", "", 401, "unauthorized"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.svc.reached()
			r := do(t, tc.method, tc.svc.srv.URL+tc.path, tc.token, nil)
			if r.code != tc.code || !strings.Contains(r.body, tc.body) {
				t.Errorf("got %d %q, want %d %q", r.code, r.body, tc.code, tc.body)
			}
			if reached := tc.svc.reached() > before; reached != (tc.code == 200) {
				t.Errorf("the service saw it: %v", reached)
			}
		})
	}
	if n := set.Refused("web", httpauth.ReasonForbidden); n != 4 {
		t.Errorf("forbidden counted %v, want 4", n)
	}
	if n := set.Refused("web", httpauth.ReasonBadPath); n != 2 {
		t.Errorf("bad_path counted %v, want 2", n)
	}
}

// TestBadConfigFailsClosed: an HTTPAuth a provider cannot accept refuses
// every request (503) rather than letting them through.
func TestBadConfigFailsClosed(t *testing.T) {
	set := httpauth.NewSet(httpauth.SetConfig{})
	bad := &wire.HTTPAuth{JWT: &wire.JWT{Issuer: issuer, Audiences: []string{"web"}}} // no keys
	a := set.Update([]wire.Service{{Name: "web", Providers: []wire.Provider{{Node: 1}}, HTTPAuth: bad}, {Name: "other", Providers: []wire.Provider{{Node: 5}}, HTTPAuth: bad}}, 1)
	if len(a) != 1 || a["web"] == nil {
		t.Fatalf("authorizers %v: want web only (other is not provided here)", a)
	}
	svc := newService(t, a["web"], 2)
	if r := do(t, "GET", svc.srv.URL+"/", "", nil); r.code != 503 || svc.reached() != 0 {
		t.Errorf("%+v", r)
	}
}

// BenchmarkAuthorize: what deciding one request costs at the provider:
// "rules-only" (no jwt) is the baseline; KEY/fresh verifies a token never
// seen (a new one every request), KEY/again one seen before (the cache).
func BenchmarkAuthorize(b *testing.B) {
	t := &testing.T{}
	ik := newIssuer(t)
	now := time.Now()
	rules := []wire.RequestRule{{Rule: 1, From: []string{"2"}, Methods: []string{"GET"}, Paths: []string{"/api/*"}}}
	run := func(b *testing.B, auth *wire.HTTPAuth, toks []string) {
		a, err := httpauth.New(httpauth.Config{Service: "web", Auth: auth})
		if err != nil {
			b.Fatal(err)
		}
		r := httptest.NewRequest("GET", "/api/x", nil)
		i := 0
		for b.Loop() {
			if len(toks) > 0 {
				r.Header.Set("Authorization", toks[i%len(toks)])
				i++
			}
			if _, _, reason, ok := a.Authorize(r, 2); !ok {
				b.Fatal(reason)
			}
		}
	}
	b.Run("rules-only", func(b *testing.B) { run(b, &wire.HTTPAuth{Rules: rules}, nil) })
	for _, kid := range []string{"rsa1", "ec1", "ed1"} {
		auth := jwtAuth(ik)
		auth.Rules = rules
		var toks []string
		for n := range 4096 { // more than the cache holds: each is verified
			c := good(now)
			c.ID = strconv.Itoa(n)
			toks = append(toks, "Bearer "+ik.sign(kid, c, nil))
		}
		b.Run(kid+"/fresh", func(b *testing.B) { run(b, auth, toks) })
		b.Run(kid+"/again", func(b *testing.B) { run(b, auth, toks[:1]) })
	}
}

// TestConcurrentRequests: many requests at once on a cold key set fetch
// it once, and all of them pass (run with -race).
func TestConcurrentRequests(t *testing.T) {
	ik := newIssuer(t)
	a, err := httpauth.New(httpauth.Config{Service: "web", Auth: jwtAuth(ik)})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	toks := []string{ik.sign("rsa1", good(now), nil), ik.sign("ec1", good(now), nil), ik.sign("ed1", good(now), nil)}
	var wg sync.WaitGroup
	errs := make(chan string, 16*30)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 30 {
				r := httptest.NewRequest("GET", "/api/x", nil)
				r.Header.Set("Authorization", "Bearer "+toks[(g+i)%len(toks)])
				if _, _, reason, ok := a.Authorize(r, 2); !ok || r.Header.Get("X-User") != "bob" {
					errs <- reason
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	if n := ik.hits.Load(); n != 1 {
		t.Errorf("the JWKS was fetched %d times", n)
	}
}
