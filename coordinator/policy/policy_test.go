package policy_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/coordinator/policy"
)

// example is the policy of the issue that asked for policies.
const example = `groups:
  dev: [user:alice, user:bob]
tagOwners:
  ci: [group:dev]
  db: [user:carol]
services:
  web:
    owners: [user:alice]
  db:
    owners: [tag:db]
rules:
  - from: [group:dev, tag:ci]
    to: [web]
  - from: [user:carol]
    to: ["*"]
  - from: [tag:ci]
    to: [db]
    action: deny
tests:
  - from: user:bob
    allow: [web]
    deny: [db]
`

// badPolicy is a policy file that Parse must refuse, with an error that
// holds want.
type badPolicy struct{ name, src, want string }

// wantRefused parses each case's source and wants it refused so.
func wantRefused(t *testing.T, cases []badPolicy) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := policy.Parse("policy.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted: %+v", p)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant it to hold %q", err, tc.want)
			}
		})
	}
}

func mustParse(t *testing.T, src string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("policy.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

func TestDecide(t *testing.T) {
	p := mustParse(t, example)
	alice := policy.Principal{Node: "laptop", User: "alice"}
	bob := policy.Principal{Node: "bobs", User: "bob"}
	carol := policy.Principal{Node: "c1", User: "carol"}
	dave := policy.Principal{Node: "d1", User: "dave", Admin: true}
	ci := policy.Principal{Node: "runner", Tags: []string{"ci"}}
	for _, tc := range []struct {
		name    string
		from    policy.Principal
		service string
		allow   bool
		rule    int
		why     string
	}{
		{"group member reaches web", bob, "web", true, 0, "user:bob is in group:dev"},
		{"group member not db", bob, "db", false, -1, "denied by default"},
		{"alice via group", alice, "web", true, 0, "group:dev"},
		{"tag reaches web", ci, "web", true, 0, "carries tag:ci"},
		{"tag denied db by rule 3", ci, "db", false, 2, "carries tag:ci"},
		{"carol everything", carol, "db", true, 1, "belongs to user:carol"},
		{"carol unknown service", carol, "anything", true, 1, "user:carol"},
		{"admin is nobody special here", dave, "web", false, -1, "no rule lets node:d1 (user:dave) reach web"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := p.Decide(tc.from, tc.service, "")
			if d.Allow != tc.allow || d.Rule != tc.rule || !strings.Contains(d.Why, tc.why) {
				t.Errorf("Decide(%v, %s) = %+v, want allow=%v rule=%d why~%q", tc.from, tc.service, d, tc.allow, tc.rule, tc.why)
			}
		})
	}
	if err := p.Run(policy.Offline{P: p}); err != nil {
		t.Errorf("the example's own tests fail: %v", err)
	}
}

func TestDecideSelectors(t *testing.T) {
	p := mustParse(t, `tagOwners: {db: [autogroup:admin]}
rules:
  - from: [node:build1]
    to: [web]
  - from: [autogroup:admin]
    to: [admin-ui]
  - from: [autogroup:self]
    to: ["*"]
`)
	for _, tc := range []struct {
		name    string
		from    policy.Principal
		service string
		owner   string
		allow   bool
	}{
		{"node selector", policy.Principal{Node: "build1", User: "x"}, "web", "", true},
		{"other node", policy.Principal{Node: "build2", User: "x"}, "web", "", false},
		{"admin", policy.Principal{Node: "n", User: "root", Admin: true}, "admin-ui", "", true},
		{"member not admin", policy.Principal{Node: "n", User: "bob"}, "admin-ui", "", false},
		{"tagged node of an admin is no admin", policy.Principal{Node: "n", Tags: []string{"db"}, Admin: true}, "admin-ui", "", false},
		{"self: own service", policy.Principal{Node: "n", User: "bob"}, "notes", "bob", true},
		{"self: another's service", policy.Principal{Node: "n", User: "bob"}, "notes", "alice", false},
		{"self: tagged node has no self", policy.Principal{Node: "n", Tags: []string{"db"}}, "notes", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d := p.Decide(tc.from, tc.service, tc.owner); d.Allow != tc.allow {
				t.Errorf("Decide = %+v, want allow=%v", d, tc.allow)
			}
		})
	}
}

func TestDefaultAndEmpty(t *testing.T) {
	for name, src := range map[string]string{"default": policy.Default, "empty": "", "comments only": "# nothing\n"} {
		p := mustParse(t, src)
		if !p.AllowsAll() {
			t.Errorf("%s: AllowsAll false", name)
		}
		if d := p.Decide(policy.Principal{Node: "x", User: "y"}, "web", ""); !d.Allow {
			t.Errorf("%s: denies: %+v", name, d)
		}
	}
	if mustParse(t, example).AllowsAll() {
		t.Error("the example allows all?")
	}
	// JSON is YAML.
	p := mustParse(t, `{"groups": {"dev": ["user:a"]}, "rules": [{"from": ["group:dev"], "to": ["web"]}]}`)
	if !p.Decide(policy.Principal{User: "a"}, "web", "").Allow || p.Decide(policy.Principal{User: "b"}, "web", "").Allow {
		t.Error("JSON policy misread")
	}
}

// TestBadPolicies: each mistake is refused with its line and a reason.
func TestBadPolicies(t *testing.T) {
	wantRefused(t, []badPolicy{
		{"invalid yaml", "rules:\n  - from: [a\n", "policy.yaml:"},
		{"unknown top field", "groups: {}\nrulez: []\n", `policy.yaml:2: unknown field "rulez" in the policy`},
		{"unknown rule field", "rules:\n  - from: ['*']\n    too: [web]\n", `policy.yaml:3: unknown field "too" in a rule (fields: from, to, action, http, when)`},
		{"missing group", "rules:\n  - from: [group:ops]\n    to: [web]\n", `policy.yaml:2: "group:ops": no group "ops" is defined under groups`},
		{"unknown selector kind", "rules:\n  - from: [team:x]\n    to: [web]\n", `policy.yaml:2: "team:x": unknown selector kind "team"`},
		{"bare word", "rules:\n  - from: [alice]\n    to: [web]\n", `policy.yaml:2: "alice" is no selector`},
		{"undefined tag", "rules:\n  - from: [tag:ci]\n    to: [web]\n", `"tag:ci": tag "ci" is not defined under tagOwners`},
		{"selector in to", "rules:\n  - from: ['*']\n    to: [user:bob]\n", `"to", "allow" and "deny" name services`},
		{"bad action", "rules:\n  - from: ['*']\n    to: [web]\n    action: maybe\n", `policy.yaml:4: rule 1: action "maybe"`},
		{"no to", "rules:\n  - from: ['*']\n", `rule 1 has no "to"`},
		{"nested group", "groups:\n  a: [user:x]\n  b: [group:a]\n", `policy.yaml:3: "group:a" is not allowed here; only user:`},
		{"bad service name", "services:\n  Web_1:\n    owners: [user:a]\n", `policy.yaml:2: service "Web_1"`},
		{"service without owners", "services:\n  web: {}\n", `service "web" lists no owners`},
		{"autogroup typo", "rules:\n  - from: [autogroup:admins]\n    to: [web]\n", `unknown autogroup`},
		{"self as owner", "services:\n  web:\n    owners: [autogroup:self]\n", "autogroup:self may only stand in a rule's from"},
		{"wrong type", "rules: yes\n", "policy.yaml:1: wrong type"},
		{"not a mapping", "- a\n- b\n", "policy.yaml:1: a policy is a mapping"},
		{"two documents", "rules: []\n---\nrules: []\n", "one YAML document"},
		{"alias", "groups:\n  a: &x [user:a]\n  b: *x\n", "aliases and anchors are not allowed"},
		{"test without expectations", "tests:\n  - from: user:a\n", "test 1 expects nothing"},
		{"test from a group", "groups: {g: [user:a]}\ntests:\n  - from: group:g\n    allow: [web]\n", `"group:g" is not allowed here`},
		{"list where a string goes", "rules:\n  - from: [[a]]\n    to: [web]\n", "policy.yaml:2: want a string, got a list"},
	})
}

func TestFailingTestRejects(t *testing.T) {
	p := mustParse(t, strings.Replace(example, "deny: [db]", "deny: [web]", 1))
	err := p.Run(policy.Offline{P: p})
	if err == nil {
		t.Fatal("a failing test passed")
	}
	want := `policy.yaml:22: test 1 failed: user:bob to web is allowed by rule 1 (line 12): user:bob is in group:dev`
	if !strings.Contains(err.Error(), want) {
		t.Errorf("got %q\nwant %q", err, want)
	}
}

func TestOwnership(t *testing.T) {
	p := mustParse(t, example)
	for _, tc := range []struct {
		name         string
		pr           policy.Principal
		service      string
		listed, ok   bool
		wantInReason string
	}{
		{"owner provides", policy.Principal{User: "alice"}, "web", true, true, ""},
		{"other user refused", policy.Principal{User: "bob"}, "web", true, false, "only user:alice"},
		{"tag owns db", policy.Principal{Tags: []string{"db"}}, "db", true, true, ""},
		{"carol's untagged node can't provide db", policy.Principal{User: "carol"}, "db", true, false, "only tag:db"},
		{"unlisted", policy.Principal{User: "bob"}, "notes", false, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			listed, ok, why := p.CanProvide(tc.pr, tc.service)
			if listed != tc.listed || ok != tc.ok || !strings.Contains(why, tc.wantInReason) {
				t.Errorf("CanProvide = %v %v %q", listed, ok, why)
			}
		})
	}
	for _, tc := range []struct {
		minter policy.Principal
		tag    string
		ok     bool
	}{
		{policy.Principal{User: "bob"}, "ci", true},
		{policy.Principal{User: "bob"}, "db", false},
		{policy.Principal{User: "carol"}, "db", true},
		{policy.Principal{User: "eve"}, "ci", false},
		{policy.Principal{User: "eve"}, "unlisted", false},
		{policy.Principal{User: "root", Admin: true}, "unlisted", true},
	} {
		if ok, why := p.CanGiveTag(tc.minter, tc.tag); ok != tc.ok {
			t.Errorf("CanGiveTag(%v, %s) = %v (%s), want %v", tc.minter, tc.tag, ok, why, tc.ok)
		}
	}
}

// TestAccessIsDecide: Access, which the coordinator evaluates at every
// map change, and Decide with its index answer exactly what walking every
// rule answers, over random policies and principals (users, admins,
// groups, tags, node names, autogroups).
func TestAccessIsDecide(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	users := []string{"alice", "bob", "carol", "dave"}
	tags := []string{"ci", "db", "web"}
	nodes := []string{"n1", "n2", "n3"}
	svcs := []string{"web", "db", "ssh", "x"}
	pick := func(l []string) string { return l[rng.IntN(len(l))] }
	sel := func() string {
		switch rng.IntN(8) {
		case 0:
			return "*"
		case 1:
			return "user:" + pick(users)
		case 2:
			return "group:" + pick([]string{"g1", "g2"})
		case 3:
			return "tag:" + pick(tags)
		case 4:
			return "node:" + pick(nodes)
		case 5:
			return "autogroup:admin"
		default:
			return "autogroup:self"
		}
	}
	for round := range 300 {
		var b strings.Builder
		fmt.Fprintf(&b, "groups:\n  g1: [user:%s, user:%s]\n  g2: [user:%s]\ntagOwners:\n  ci: [user:alice]\n  db: [user:alice]\n  web: [user:alice]\nservices:\n  web: {protocol: http}\n  x: {protocol: http}\nrules:\n", pick(users), pick(users), pick(users))
		for range 1 + rng.IntN(8) {
			var from, to []string
			for range 1 + rng.IntN(3) {
				from = append(from, fmt.Sprintf("%q", sel()))
			}
			for range 1 + rng.IntN(2) {
				if rng.IntN(4) == 0 {
					to = append(to, `"*"`)
				} else {
					to = append(to, pick(svcs))
				}
			}
			action := pick([]string{"allow", "deny", "allow"})
			fmt.Fprintf(&b, "  - from: [%s]\n    to: [%s]\n    action: %s\n", strings.Join(from, ", "), strings.Join(to, ", "), action)
			// Rules of HTTP services only may decide per request: an
			// allow lets the node connect, a deny is passed over.
			if !slices.ContainsFunc(to, func(s string) bool { return s != "web" && s != "x" }) && rng.IntN(2) == 0 {
				b.WriteString("    http: {methods: [GET]}\n")
			}
		}
		p, err := policy.Parse("p", []byte(b.String()))
		if err != nil {
			t.Fatalf("round %d: %v\n%s", round, err, b.String())
		}
		var prs []policy.Principal
		for range 12 {
			pr := policy.Principal{Node: pick(append(nodes, "other"))}
			if rng.IntN(3) == 0 {
				// An admin may give any tag, "ci,db" too: one tag.
				pr.Tags = []string{pick(append(tags, "ci,db"))}
				if rng.IntN(2) == 0 {
					pr.Tags = append(pr.Tags, pick(tags))
				}
			} else {
				pr.User, pr.Admin = pick(users), rng.IntN(3) == 0
			}
			prs = append(prs, pr)
		}
		owners := make([]string, len(svcs))
		for j := range owners {
			owners[j] = pick(append(users, ""))
		}
		got := p.Access(prs, svcs, owners)
		slow := policy.WithoutIndex(p)
		for j, svc := range svcs {
			for i, pr := range prs {
				want := slow.Decide(pr, svc, owners[j])
				if d := p.Decide(pr, svc, owners[j]); d != want {
					t.Fatalf("round %d: %s to %s (owner %q): Decide %+v, walking every rule %+v\n%s", round, pr, svc, owners[j], d, want, b.String())
				}
				if got[j][i] != want.Allow {
					t.Fatalf("round %d: %s to %s (owner %q): Access %v, Decide %+v\n%s", round, pr, svc, owners[j], got[j][i], want, b.String())
				}
			}
		}
	}
}
