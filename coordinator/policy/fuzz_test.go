package policy_test

import (
	"testing"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/wire"
)

// FuzzParse: no input crashes the parser, and whatever it accepts the
// evaluator and the test runner handle.
func FuzzParse(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte(policy.Default))
	f.Add([]byte(`{"rules":[{"from":["*"],"to":["web"],"action":"deny"}]}`))
	f.Add([]byte("groups:\n  a: &x [user:a]\n  b: *x\n"))
	f.Add([]byte("rules:\n  - from: [autogroup:self]\n    to: ['*']\ntests:\n  - from: node:x\n    allow: ['*']\n"))
	f.Add([]byte(httpExample))
	f.Add([]byte(httpAuthExample))
	f.Add([]byte("services:\n  web:\n    http:\n      jwt: {issuer: i, jwksFile: /j, audiences: [a], required: false, forwardClaims: {sub: x-user}}\nrules:\n  - from: ['*']\n    to: [web]\n    when: {claim: sub, equals: bob}\n    http: {paths: ['*']}\ntests:\n  - from: user:a\n    request: {method: GET, path: /, claims: {sub: [bob]}}\n    allow: ['*']\n"))
	f.Add([]byte("services:\n  web:\n    http:\n      routes:\n        - match: {headers: {x: {regex: \"a(b\"}}}\n          version: v2\n"))
	f.Add([]byte("services:\n  web:\n    http: {timeout: 1ns, retries: {attempts: 1, on: [599]}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := policy.Parse("fuzz.yaml", data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("an error without a message")
			}
			return
		}
		prs := []policy.Principal{{}, {Node: "n", User: "alice", Admin: true}, {Node: "t", Tags: []string{"ci", "db"}}}
		for _, pr := range prs {
			for _, svc := range []string{"web", "db", ""} {
				d := p.Decide(pr, svc, "alice")
				if d.Rule >= len(p.Rules) {
					t.Fatalf("rule %d of %d", d.Rule, len(p.Rules))
				}
				p.CanProvide(pr, svc)
				if h := p.ServiceHTTP(svc, true); h == nil || h.Check() != nil {
					t.Fatalf("accepted an HTTP configuration that does not check: %+v", h)
				}
				p.CanGiveTag(pr, svc)
				p.DecideRequest(pr, svc, "alice", policy.Request{Method: "GET", Path: "/api/x", Claims: map[string]any{"groups": []any{"admin"}}})
				if a := p.HTTPAuth(svc, "alice", prs, []wire.NodeID{1, 2, 3}); a != nil {
					if err := a.Check(); err != nil {
						t.Fatalf("the policy accepted what a provider refuses: %v", err)
					}
					a.Decide(2, "GET", "/", nil)
				}
			}
		}
		_ = p.Run(policy.Offline{P: p})
	})
}
