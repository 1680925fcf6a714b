package policy_test

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/wire"
)

// httpAuthExample is the policy of docs/policy.md's HTTP section.
const httpAuthExample = `groups:
  dev: [user:alice, user:bob]
services:
  web:
    http:
      jwt:
        issuer: https://login.example.com
        jwksURL: https://login.example.com/.well-known/jwks.json
        audiences: [web]
        forwardClaims: {sub: x-user, groups: x-groups}
  db:
    owners: [user:carol]
rules:
  - from: [group:dev]
    to: [web]
    http: {methods: [DELETE]}
    action: deny
  - from: [group:dev]
    to: [web]
    http: {methods: [GET, HEAD], paths: [/api/*, /healthz]}
  - from: [group:dev]
    to: [web]
    when: [{claim: groups, contains: admin}]
  - from: [user:carol]
    to: [db]
tests:
  - from: user:bob
    allow: [web]
    deny: [db]
  - from: user:bob
    request: {method: GET, path: /api/x, claims: {sub: bob}}
    allow: [web]
  - from: user:bob
    request: {method: POST, path: /api/x, claims: {sub: bob, groups: [dev]}}
    deny: [web]
  - from: user:bob
    request: {method: POST, path: /api/x, claims: {sub: bob, groups: [dev, admin]}}
    allow: [web]
  - from: user:bob
    request: {method: DELETE, path: /api/x, claims: {groups: [admin]}}
    deny: [web]
  - from: user:bob
    request: {method: GET, path: /api/x}
    deny: [web]
  - from: user:carol
    request: {method: GET, path: /api/x, claims: {sub: carol}}
    deny: [web]
`

func TestHTTPPolicy(t *testing.T) {
	p := mustParse(t, httpAuthExample)
	if err := p.Run(policy.Offline{P: p}); err != nil {
		t.Fatalf("the example's tests: %v", err)
	}
	if p.AllowsAll() {
		t.Fatal("AllowsAll")
	}
	bob := policy.Principal{Node: "b1", User: "bob"}
	carol := policy.Principal{Node: "c1", User: "carol"}
	// Who may connect: bob (rule 2 may allow some requests; rule 1, a
	// conditional deny, is passed over), not carol.
	d := p.Decide(bob, "web", "")
	if !d.Allow || !d.Conditional || d.Rule != 1 || !strings.Contains(d.Why, "methods GET, HEAD, paths /api/*, /healthz") {
		t.Errorf("Decide(bob, web) = %+v", d)
	}
	if d := p.Decide(carol, "web", ""); d.Allow {
		t.Errorf("Decide(carol, web) = %+v", d)
	}
	acc := p.Access([]policy.Principal{bob, carol}, []string{"web", "db"}, []string{"", "carol"})
	if !acc[0][0] || acc[0][1] || acc[1][0] || !acc[1][1] {
		t.Errorf("Access = %v", acc)
	}
	for _, tc := range []struct {
		name  string
		req   policy.Request
		allow bool
		rule  int
		inWhy string
	}{
		{"get api", policy.Request{Method: "GET", Path: "/api/x", Claims: map[string]any{}}, true, 1, "methods GET"},
		{"get healthz exact", policy.Request{Method: "GET", Path: "/healthz", Claims: map[string]any{}}, true, 1, ""},
		{"get healthz/x not", policy.Request{Method: "GET", Path: "/healthz/x", Claims: map[string]any{}}, false, -1, "denied by default"},
		{"api itself not under /api/*", policy.Request{Method: "GET", Path: "/api", Claims: map[string]any{}}, false, -1, ""},
		{"post denied", policy.Request{Method: "POST", Path: "/api/x", Claims: map[string]any{"groups": []any{"dev"}}}, false, -1, "no rule lets"},
		{"post as admin", policy.Request{Method: "POST", Path: "/api/x", Claims: map[string]any{"groups": []any{"admin"}}}, true, 2, "claim groups contains admin"},
		{"admin as a string of words", policy.Request{Method: "POST", Path: "/x", Claims: map[string]any{"groups": "ops admin"}}, true, 2, ""},
		{"delete denied first", policy.Request{Method: "DELETE", Path: "/api/x", Claims: map[string]any{"groups": []any{"admin"}}}, false, 0, "methods DELETE"},
		{"no token", policy.Request{Method: "GET", Path: "/api/x"}, false, -1, "401"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := p.DecideRequest(bob, "web", "", tc.req)
			if d.Allow != tc.allow || d.Rule != tc.rule || !strings.Contains(d.Why, tc.inWhy) {
				t.Errorf("DecideRequest = %+v, want allow=%v rule=%d why~%q", d, tc.allow, tc.rule, tc.inWhy)
			}
		})
	}
}

// TestHTTPAuthForProviders: what a provider's map carries.
func TestHTTPAuthForProviders(t *testing.T) {
	p := mustParse(t, httpAuthExample)
	prs := []policy.Principal{{Node: "a1", User: "alice"}, {Node: "b1", User: "bob"}}
	a := p.HTTPAuth("web", "", prs, []wire.NodeID{7, 9})
	if a == nil || a.JWT == nil {
		t.Fatalf("HTTPAuth = %+v", a)
	}
	if a.JWT.Issuer != "https://login.example.com" || a.JWT.Optional || len(a.JWT.ForwardClaims) != 2 || a.JWT.ForwardClaims[0] != (wire.ForwardClaim{Claim: "groups", Header: "x-groups"}) {
		t.Errorf("JWT = %+v", a.JWT)
	}
	if len(a.Rules) != 3 {
		t.Fatalf("rules = %+v", a.Rules)
	}
	r := a.Rules[1]
	if r.Rule != 2 || r.Line != 18 || r.Deny || strings.Join(r.From, ",") != "7,9" || strings.Join(r.Methods, ",") != "GET,HEAD" {
		t.Errorf("rule 2 = %+v", r)
	}
	if err := a.Check(); err != nil {
		t.Error(err)
	}
	if got, ok := a.Decide(9, "GET", "/api/v1", map[string]any{}); !ok || got.Rule != 2 {
		t.Errorf("Decide GET = %+v %v", got, ok)
	}
	if got, ok := a.Decide(9, "DELETE", "/api/v1", map[string]any{}); !ok || !got.Deny || got.Rule != 1 {
		t.Errorf("Decide DELETE = %+v %v", got, ok)
	}
	if _, ok := a.Decide(8, "GET", "/api/v1", map[string]any{}); ok {
		t.Error("node 8 matched")
	}
	if a := p.HTTPAuth("db", "carol", prs, []wire.NodeID{7, 9}); a != nil {
		t.Errorf("db: %+v", a)
	}
}

func TestBadHTTPPolicies(t *testing.T) {
	const svc = "services:\n  web:\n    http:\n      jwt:\n        issuer: https://i\n        jwksURL: https://i/jwks\n        audiences: [web]\n"
	wantRefused(t, []badPolicy{
		{"unknown jwt field", "services:\n  web:\n    http:\n      jwt:\n        issuer: x\n        jwks: y\n", `policy.yaml:6: unknown field "jwks" in jwt (fields: issuer, jwksURL, jwksFile, audiences, forwardClaims, required)`},
		{"unknown http field", "services:\n  web:\n    http:\n      jwtt: {}\n", `policy.yaml:4: unknown field "jwtt" in a service's http`},
		{"no issuer", "services:\n  web:\n    http:\n      jwt:\n        jwksURL: https://i/jwks\n        audiences: [web]\n", `policy.yaml:4: service "web": jwt: no issuer`},
		{"no jwks", "services:\n  web:\n    http:\n      jwt:\n        issuer: x\n        audiences: [web]\n", `policy.yaml:4: service "web": jwt: give jwksURL`},
		{"both jwks", svc + "        jwksFile: /etc/jwks.json\n", `policy.yaml:8: service "web": jwt: give jwksURL or jwksFile, not both`},
		{"relative jwksFile", "services:\n  web:\n    http:\n      jwt:\n        issuer: x\n        jwksFile: jwks.json\n        audiences: [a]\n", `policy.yaml:6: service "web": jwt: jwksFile "jwks.json" must be an absolute path`},
		{"ftp jwksURL", "services:\n  web:\n    http:\n      jwt:\n        issuer: x\n        jwksURL: ftp://x/y\n        audiences: [a]\n", `policy.yaml:6: service "web": jwt: jwksURL "ftp://x/y" must be an http:// or https:// URL`},
		{"no audiences", "services:\n  web:\n    http:\n      jwt:\n        issuer: x\n        jwksURL: https://i/jwks\n", `policy.yaml:4: service "web": jwt: no audiences`},
		{"bad header", svc + "        forwardClaims: {sub: 'x user'}\n", `policy.yaml:8: service "web": jwt: forwardClaims.sub: header "x user" may only hold`},
		{"reserved header", svc + "        forwardClaims: {sub: Authorization}\n", `policy.yaml:8: service "web": jwt: forwardClaims.sub: header "Authorization" frames the request`},
		{"two claims one header", svc + "        forwardClaims: {sub: x-user, email: X-User}\n", `claims email and sub both go to header`},
		{"required maybe", svc + "        required: maybe\n", `policy.yaml:8: service "web": jwt: required "maybe"`},
		{"http rule on tcp service", svc + "rules:\n  - from: ['*']\n    to: [db]\n    http: {methods: [GET]}\n", `policy.yaml:10: rule 1 has http or when, but service "db" is not HTTP`},
		{"http rule to star", svc + "rules:\n  - from: ['*']\n    to: ['*']\n    http: {methods: [GET]}\n", `policy.yaml:10: rule 1 has http or when, which only HTTP services can decide`},
		{"when without jwt", "services:\n  web:\n    http: {}\nrules:\n  - from: ['*']\n    to: [web]\n    when: {claim: groups, contains: admin}\n", `policy.yaml:6: rule 1's when reads token claims, but service "web" checks no token`},
		{"empty http", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {}\n", `policy.yaml:9: rule 1: http lists no methods and no paths`},
		{"lower-case method", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {methods: [get]}\n", `policy.yaml:11: rule 1: method "get": write it in upper case`},
		{"path without slash", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {paths: [api/*]}\n", `policy.yaml:11: rule 1: path "api/*" must start with /`},
		{"star inside path", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {paths: ['/a/*/b']}\n", `policy.yaml:11: rule 1: path "/a/*/b": * may only end a path`},
		{"unclean path", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {paths: ['/a/../b']}\n", `policy.yaml:11: rule 1: path "/a/../b" is not clean`},
		{"unknown rule http field", svc + "rules:\n  - from: ['*']\n    to: [web]\n    http: {verbs: [GET]}\n", `policy.yaml:11: unknown field "verbs" in a rule's http (fields: methods, paths)`},
		{"unknown condition field", svc + "rules:\n  - from: ['*']\n    to: [web]\n    when:\n      - claim: groups\n        has: admin\n", `policy.yaml:13: unknown field "has" in a condition (fields: claim, contains, equals)`},
		{"condition without value", svc + "rules:\n  - from: ['*']\n    to: [web]\n    when: [{claim: groups}]\n", `policy.yaml:11: rule 1: when: claim "groups" needs contains: VALUE or equals: VALUE`},
		{"condition with both", svc + "rules:\n  - from: ['*']\n    to: [web]\n    when: [{claim: groups, contains: a, equals: b}]\n", `policy.yaml:11: rule 1: when: claim "groups": give contains or equals, not both`},
		{"condition a string", svc + "rules:\n  - from: ['*']\n    to: [web]\n    when: [admin]\n", `policy.yaml:11: a condition of when is a mapping`},
		{"test request on tcp service", svc + "tests:\n  - from: user:a\n    request: {method: GET, path: /}\n    allow: [db]\n", `policy.yaml:11: test 1 has a request, but service "db" is not HTTP`},
		{"test request bad path", svc + "tests:\n  - from: user:a\n    request: {method: GET, path: x}\n    allow: [web]\n", `policy.yaml:10: test 1: request path "x" must be a clean absolute path`},
		{"test request unknown field", svc + "tests:\n  - from: user:a\n    request: {method: GET, url: /}\n    allow: [web]\n", `policy.yaml:10: unknown field "url" in a test's request (fields: method, path, claims)`},
	})
}

// TestHTTPTestFails: a failing request test names the request and the rule.
func TestHTTPTestFails(t *testing.T) {
	p := mustParse(t, strings.Replace(httpAuthExample, "request: {method: POST, path: /api/x, claims: {sub: bob, groups: [dev]}}\n    deny: [web]", "request: {method: POST, path: /api/x, claims: {sub: bob, groups: [dev]}}\n    allow: [web]", 1))
	err := p.Run(policy.Offline{P: p})
	want := `policy.yaml:35: test 3 failed: user:bob to web POST /api/x is denied by no rule lets user:bob make POST /api/x to web: denied by default`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("got %v\nwant %q", err, want)
	}
}

// TestHTTPAuthDocExample: the policy of docs/http-auth.md parses, its
// tests pass, and the refusal it shows names the right line.
func TestHTTPAuthDocExample(t *testing.T) {
	doc, err := os.ReadFile("../../docs/http-auth.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(doc), "```yaml\n")
	src, _, _ := strings.Cut(rest, "```")
	p := mustParse(t, src)
	if err := p.Run(policy.Offline{P: p}); err != nil {
		t.Fatalf("the example's tests: %v", err)
	}
	a := p.HTTPAuth("web", "", []policy.Principal{{Node: "bobs", User: "bob"}}, []wire.NodeID{2})
	r, ok := a.Decide(2, "DELETE", "/api/orders", map[string]any{})
	if !ok || !r.Deny {
		t.Fatalf("DELETE: %+v %v", r, ok)
	}
	if want := fmt.Sprintf("policy rule %d (line %d) denies DELETE /api/orders to web", r.Rule, r.Line); !strings.Contains(string(doc), want) {
		t.Errorf("the doc does not show %q", want)
	}
}
