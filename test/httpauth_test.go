package test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// TestHTTPAuthThroughMesh: an HTTP service whose policy asks for an
// end-user JWT and has request rules, reached through the mesh by the
// real HTTP path: a token of the issuer (its JWKS served here) gets GET
// /api/x through, POST only with the admin group's claim; no token or an
// expired one gets 401, a refused request 403; the service sees none of
// the refused ones, and a forged x-user never reaches it.
func TestHTTPAuthThroughMesh(t *testing.T) {
	m := harness.NewMesh(t)
	ctx := context.Background()
	ids := map[string]int64{}
	for _, name := range []string{"alice", "bob", "carol"} {
		u, err := m.Coord.Store().CreateUser(ctx, store.User{Username: name, PasswordHash: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = u.ID
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Use: "sig"}}})
	}))
	defer jwks.Close()
	pol := fmt.Sprintf(`groups:
  dev: [user:bob]
services:
  web:
    protocol: http
    http:
      jwt:
        issuer: https://login.test
        jwksURL: %s/jwks.json
        audiences: [web]
        forwardClaims: {sub: x-user}
rules:
  - from: [group:dev]
    to: [web]
    http: {methods: [GET], paths: [/api/*]}
  - from: [group:dev]
    to: [web]
    when: {claim: groups, contains: admin}
tests:
  - from: user:bob
    request: {method: POST, path: /api/x, claims: {groups: [admin]}}
    allow: [web]
  - from: user:carol
    deny: [web]
`, jwks.URL)
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", pol, "test"); err != nil {
		t.Fatal(err)
	}

	// The service: a real HTTP server saying who the mesh says the user is.
	var hits atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		fmt.Fprintf(w, "%s %s user=%q", r.Method, r.URL.Path, strings.Join(r.Header.Values("X-User"), "|"))
	})}
	go srv.Serve(ln)
	defer srv.Close()

	site := meteredAgent(t, m, "alice-site", harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: ids["alice"], Expires: time.Hour}),
		Expose: []agent.Export{{Name: "web", Target: ln.Addr().String(), Protocol: "http"}}})
	bob := m.AddAgent("bob-laptop", harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: ids["bob"], Expires: time.Hour})})
	carol := m.AddAgent("carol-laptop", harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: ids["carol"], Expires: time.Hour})})
	svc := waitProviders(t, bob, "web", 1)
	url := "http://" + svc.Local.String() + "/api/x"

	sign := func(std jwt.Claims, groups ...string) string {
		sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "k1"))
		if err != nil {
			t.Fatal(err)
		}
		s, err := jwt.Signed(sig).Claims(std).Claims(map[string]any{"groups": groups}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	now := time.Now()
	valid := jwt.Claims{Issuer: "https://login.test", Subject: "bob", Audience: jwt.Audience{"web"}, Expiry: jwt.NewNumericDate(now.Add(5 * time.Minute))}
	expired := valid
	expired.Expiry = jwt.NewNumericDate(now.Add(-5 * time.Minute))
	user, admin := sign(valid, "dev"), sign(valid, "dev", "admin")
	c := keepAliveClient()
	do := func(method, token string) (int, string, http.Header) {
		t.Helper()
		req, _ := http.NewRequest(method, url, nil)
		req.Header.Set("X-User", "mallory")
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header
	}
	// The first request may find the provider's map a moment behind
	// bob's: wait for the answer the policy gives.
	tstest.WaitForNil(t, 10*time.Second, "GET /api/x with bob's token", func() error {
		if code, body, _ := do("GET", user); code != 200 || body != `GET /api/x user="bob"` {
			return fmt.Errorf("%d %q", code, body)
		}
		return nil
	})
	before := hits.Load()
	for _, tc := range []struct {
		name, method, token string
		code                int
		body, auth          string
	}{
		{"POST without admin", "POST", user, 403, "meshlink: forbidden: no policy rule lets this node make POST /api/x to web\n", ""},
		{"no token", "GET", "", 401, "meshlink: unauthorized: no bearer token\n", `Bearer realm="meshlink/web", error="invalid_token", error_description="no bearer token"`},
		{"expired", "GET", sign(expired, "dev"), 401, "meshlink: unauthorized: the token expired\n", `error_description="the token expired"`},
		{"garbage", "GET", "not.a.token", 401, "meshlink: unauthorized: the token is not a signed JWT\n", `error="invalid_token"`},
	} {
		code, body, h := do(tc.method, tc.token)
		if code != tc.code || body != tc.body || !strings.Contains(h.Get("WWW-Authenticate"), tc.auth) {
			t.Errorf("%s: %d %q (WWW-Authenticate %q); want %d %q", tc.name, code, body, h.Get("WWW-Authenticate"), tc.code, tc.body)
		}
	}
	if hits.Load() != before {
		t.Errorf("the service saw %d refused requests", hits.Load()-before)
	}
	if code, body, _ := do("POST", admin); code != 200 || body != `POST /api/x user="bob"` {
		t.Errorf("POST with the admin claim: %d %q", code, body)
	}
	// The provider counted each refusal by reason.
	mf, err := harness.Scrape(site.MetricsAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	if fam := mf["meshlink_http_auth_refused_total"]; fam != nil {
		for _, mm := range fam.Metric {
			for _, l := range mm.Label {
				if l.GetName() == "reason" {
					got[l.GetValue()] += mm.GetCounter().GetValue()
				}
			}
		}
	}
	if got["forbidden"] != 1 || got["missing_token"] != 1 || got["expired"] != 1 || got["malformed"] != 1 {
		t.Errorf("meshlink_http_auth_refused_total by reason = %v", got)
	}
	// Carol, whom no rule lets make any request, does not get the service.
	if s, ok := serviceOf(carol, "web"); ok {
		t.Errorf("carol's agent has web: %+v", s)
	}
}
