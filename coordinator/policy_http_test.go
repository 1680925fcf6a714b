package coordinator

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

const httpPolicy = `groups:
  dev: [user:alice, user:bob]
tagOwners:
  db: [user:carol]
services:
  db:
    owners: [tag:db]
  web:
    http:
      jwt:
        issuer: https://login.example.com
        jwksFile: /etc/meshlink/jwks.json
        audiences: [web]
        forwardClaims: {sub: x-user}
rules:
  - from: [group:dev]
    to: [web]
    http: {methods: [GET], paths: [/api/*]}
  - from: [user:carol]
    to: [web]
    when: {claim: groups, contains: admin}
  - from: [user:carol]
    to: [db]
tests:
  - from: user:bob
    request: {method: GET, path: /api/x, claims: {sub: bob}}
    allow: [web]
  - from: user:bob
    request: {method: POST, path: /api/x, claims: {sub: bob}}
    deny: [web]
`

// TestPolicyHTTPAuthInMaps: the provider's map carries the jwt and the
// request rules with the IDs of the nodes they name; a consumer's map
// carries the jwt alone (the rules name other consumers); explain
// answers for one request.
func TestPolicyHTTPAuthInMaps(t *testing.T) {
	m := newPolicyMesh(t)
	if _, err := m.s.SetPolicy(context.Background(), "p.yaml", httpPolicy, "test"); err != nil {
		t.Fatal(err)
	}
	authOf := func(st *stream, who string) *wire.HTTPAuth {
		t.Helper()
		nm := &wire.NetworkMap{}
		var got *wire.HTTPAuth
		st.next(t, 20*time.Second, who+"'s map with web's http auth", func(mr wire.MapResponse) bool {
			nm.Apply(&mr)
			for _, sv := range nm.Services {
				if sv.Name == "web" && sv.HTTPAuth != nil {
					got = sv.HTTPAuth
					return true
				}
			}
			return false
		})
		return got
	}
	a := authOf(m.webSt, "web1")
	if a.JWT == nil || a.JWT.JWKSFile != "/etc/meshlink/jwks.json" || len(a.JWT.ForwardClaims) != 1 {
		t.Errorf("provider's jwt = %+v", a.JWT)
	}
	if len(a.Rules) != 2 {
		t.Fatalf("provider's rules = %+v", a.Rules)
	}
	if r := a.Rules[0]; r.Rule != 1 || r.Line != 16 || !slices.Equal(r.From, []string{idStr(m.web1), idStr(m.bobs)}) || !slices.Equal(r.Paths, []string{"/api/*"}) {
		t.Errorf("rule 1 = %+v", r)
	}
	if r := a.Rules[1]; r.Rule != 2 || !slices.Equal(r.From, []string{idStr(m.carols)}) || len(r.When) != 1 {
		t.Errorf("rule 2 = %+v", r)
	}
	if err := a.Check(); err != nil {
		t.Error(err)
	}
	b := authOf(m.bobSt, "bob")
	if b.JWT == nil || len(b.Rules) != 0 {
		t.Errorf("a consumer's http auth = %+v; want the jwt alone", b)
	}
	for _, tc := range []struct {
		from  string
		req   ExplainRequest
		allow bool
		inWhy string
	}{
		{"bobs", ExplainRequest{Method: "GET", Path: "/api/x", Claims: []string{"sub=bob"}}, true, "matches its methods GET, paths /api/*"},
		{"bobs", ExplainRequest{Method: "POST", Path: "/api/x", Claims: []string{"sub=bob"}}, false, "denied by default"},
		{"bobs", ExplainRequest{Method: "GET", Path: "/api/x"}, false, "requires a token"},
		{"carols", ExplainRequest{Path: "/", Claims: []string{"groups=dev", "groups=admin"}}, true, "claim groups contains admin"},
	} {
		ex, err := m.s.ExplainRequest(context.Background(), tc.from, "web", &tc.req)
		if err != nil || ex.Allow != tc.allow || !strings.Contains(ex.Why, tc.inWhy) {
			t.Errorf("explain %s %+v = %+v, %v", tc.from, tc.req, ex, err)
		}
	}
	ex, err := m.s.Explain(context.Background(), "bobs", "web")
	if err != nil || !ex.Allow || !ex.Conditional || ex.Rule != 1 {
		t.Errorf("explain bobs → web = %+v, %v", ex, err)
	}
	if _, err := m.s.ExplainRequest(context.Background(), "bobs", "web", &ExplainRequest{Path: "/a/../b"}); err == nil {
		t.Error("an unclean path explained")
	}
	// The same through the admin socket, as `meshlink policy explain
	// --method POST --path /api/x --claim sub=bob` asks it.
	ac := NewAdminClient(m.s.cfg.DataDir)
	ex, err = ac.ExplainPolicyRequest(context.Background(), "bobs", "web", &ExplainRequest{Method: "POST", Path: "/api/x", Claims: []string{"sub=bob"}})
	if err != nil || ex.Allow || ex.Request != "POST /api/x" {
		t.Errorf("explain over the admin socket = %+v, %v", ex, err)
	}
	if _, err := ac.ExplainPolicyRequest(context.Background(), "bobs", "web", &ExplainRequest{Method: "get"}); err == nil || !strings.Contains(err.Error(), "--method") {
		t.Errorf("a lower-case method over the admin socket: %v", err)
	}
}

// TestTooOldProviderWithheld: a provider whose agent announced its export
// with a protocol before request-level authorization (13) would carry
// every request of web unchecked, so consumers are not given it while
// web's policy has request rules and a jwt; once it announces again with
// a current agent, it is listed.
func TestTooOldProviderWithheld(t *testing.T) {
	m := newPolicyMesh(t)
	if _, err := m.s.SetPolicy(context.Background(), "p.yaml", httpPolicy, "test"); err != nil {
		t.Fatal(err)
	}
	alice, err := m.s.Store().GetUser(context.Background(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	tok := mustToken(t, m.s, TokenOptions{Owner: alice.ID})
	_, web2 := register(t, m.c, tok, "web2")
	announce := func(version int) {
		t.Helper()
		st, body := call(t, m.c, m.s.URL(), wire.PathServices, &web2, wire.ServiceRequest{Version: version, Name: "web", Port: 8000})
		if st != 200 {
			t.Fatalf("web2 announces web with protocol %d: %d %s", version, st, body)
		}
	}
	listed := func() []wire.NodeID {
		t.Helper()
		snap, err := m.s.current(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var got []wire.NodeID
		if i, ok := snap.svcIndex["web"]; ok {
			for _, p := range snap.services[i].Providers {
				got = append(got, p.Node)
			}
		}
		return got
	}
	// The answer came after the change was committed: the coordinator's
	// current map holds it.
	announce(12)
	if got := listed(); !slices.Equal(got, []wire.NodeID{m.web1.ID}) {
		t.Fatalf("web's providers %v with web2's agent at protocol 12, want web1 alone", got)
	}
	announce(wire.ProtocolVersion)
	if got := listed(); !slices.Equal(got, []wire.NodeID{m.web1.ID, web2.ID}) {
		t.Fatalf("web's providers %v once web2 announced with a current agent, want web1 and web2", got)
	}
	nm := &wire.NetworkMap{}
	m.bobSt.next(t, 20*time.Second, "bob's map with web2 a provider of web", func(mr wire.MapResponse) bool {
		nm.Apply(&mr)
		for _, sv := range nm.Services {
			if sv.Name == "web" {
				return len(sv.Providers) == 2 && slices.Contains(peerNames(*nm), "web2")
			}
		}
		return false
	})
}
