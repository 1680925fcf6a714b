//go:build !agentonly

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPolicyCheckHTTP: `meshlink policy check` on a file with a jwt,
// http rules and request tests, and on one with mistakes.
func TestPolicyCheckHTTP(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(good, []byte(`groups:
  dev: [user:alice]
services:
  web:
    http:
      jwt:
        issuer: https://login.example.com
        jwksURL: https://login.example.com/jwks.json
        audiences: [web]
        forwardClaims: {sub: x-user}
rules:
  - from: [group:dev]
    to: [web]
    http: {methods: [GET], paths: [/api/*]}
  - from: [group:dev]
    to: [web]
    when: [{claim: groups, contains: admin}]
tests:
  - from: user:alice
    request: {method: GET, path: /api/x, claims: {sub: alice}}
    allow: [web]
  - from: user:alice
    request: {method: POST, path: /api/x, claims: {sub: alice}}
    deny: [web]
  - from: user:alice
    request: {method: POST, path: /api/x, claims: {groups: [admin]}}
    allow: [web]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := runMain(t, "policy", "check", good)
	if code != 0 || !strings.Contains(stdout, "policy.yaml: ok (2 rules, 3 tests passed)") {
		t.Fatalf("check: %d %q %q", code, stdout, stderr)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("rules:\n  - from: ['*']\n    to: [db]\n    http: {methods: [get]}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, stderr, code = runMain(t, "policy", "check", bad)
	for _, want := range []string{
		`bad.yaml:3: rule 1 has http or when, but service "db" is not HTTP`,
		`bad.yaml:4: rule 1: method "get": write it in upper case`,
	} {
		if code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("check of a bad file: %d %q, want %q", code, stderr, want)
		}
	}
}
