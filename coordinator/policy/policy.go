// Package policy is the mesh's access policy: one YAML (or JSON) file of
// groups, tag owners, service owners, rules and tests. Parse reads and
// checks it strictly (unknown fields, unknown selectors and missing groups
// are errors with their line); Policy.Decide says whether a node may reach
// a service and which rule decides; Policy.Run checks the file's own tests.
//
// The coordinator evaluates the policy into the network map (who may reach
// each service, which peers each node learns); providers enforce what the
// map says on every inbound connection. `meshlink policy check` runs Parse
// and the tests offline.
package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/meshlink/meshlink/wire"
)

// MaxSize bounds a policy file in bytes.
const MaxSize = 256 << 10

// Limits on what one policy may hold, so that evaluating it stays cheap.
const (
	maxEntries   = 10000 // groups, tag owners, services, rules or tests
	maxSelectors = 10000 // selectors in one list
)

// Default is the policy of a fresh coordinator: everyone may reach
// everything, said explicitly so that the console shows it.
const Default = `# meshlink access policy. Rules are read top to bottom; the first whose
# "from" matches the connecting node and whose "to" names the service
# decides. Once any rule exists, what no rule allows is denied.
#
# groups:
#   dev: [user:alice, user:bob]
# tagOwners:
#   ci: [group:dev]
# services:
#   web:
#     owners: [user:alice]
# rules:
#   - from: [group:dev, tag:ci]
#     to: [web]
# tests:
#   - from: user:bob
#     allow: [web]
rules:
  - from: ["*"]
    to: ["*"]
`

// Policy is a parsed, checked policy file.
type Policy struct {
	// Groups name sets of users: group name -> user:NAME selectors.
	Groups map[string][]Selector `yaml:"groups"`
	// TagOwners says who may give each tag to a node (by minting a join
	// token carrying it): tag name -> selectors. Admins may give any tag
	// listed here.
	TagOwners map[string][]Selector `yaml:"tagOwners"`
	// Services lists, per service name, who may provide it. Names not
	// listed belong to the owner of their first provider.
	Services map[string]Service `yaml:"services"`
	// Rules decide access, first match wins; with no rules at all, every
	// node may reach every service.
	Rules []Rule `yaml:"rules"`
	// Tests are checked whenever the policy is set.
	Tests []Test `yaml:"tests"`

	file string
	// lines of group names, tag owner keys and service keys, for errors
	lines map[string]int
	// idx is built once the policy is checked, so that Decide and Access
	// cost what the rules that concern a service or principal cost.
	idx *index
}

// index locates rules by what they name.
type index struct {
	toStar []int // rules whose to holds "*", ascending
	// condDeny: deny rules with http or when, which refuse only some
	// requests and so never decide who may connect
	condDeny []int
	toName   map[string][]int // rules whose to names a service, ascending
	nodes    map[string]bool  // names of node: selectors in rules' from
	// bySel: rules by the selectors of their from, ascending
	bySel map[string][]int
	// groupsOf: a user's groups
	groupsOf map[string][]string
}

func (p *Policy) buildIndex() {
	ix := &index{toName: map[string][]int{}, nodes: map[string]bool{}, bySel: map[string][]int{}, groupsOf: map[string][]string{}}
	for _, g := range sortedKeys(p.Groups) {
		for _, m := range p.Groups[g] {
			if u, ok := strings.CutPrefix(m.S, "user:"); ok && !slices.Contains(ix.groupsOf[u], g) {
				ix.groupsOf[u] = append(ix.groupsOf[u], g)
			}
		}
	}
	for i, r := range p.Rules {
		if r.condDeny() {
			ix.condDeny = append(ix.condDeny, i)
		}
		star := false
		for _, t := range r.To {
			if t.S == "*" {
				star = true
			} else if l := ix.toName[t.S]; len(l) == 0 || l[len(l)-1] != i {
				ix.toName[t.S] = append(l, i)
			}
		}
		if star {
			ix.toStar = append(ix.toStar, i)
		}
		for _, f := range r.From {
			if k, n := splitSel(f.S); k == kindNode {
				ix.nodes[n] = true
			}
			if l := ix.bySel[f.S]; len(l) == 0 || l[len(l)-1] != i {
				ix.bySel[f.S] = append(l, i)
			}
		}
	}
	p.idx = ix
}

// Service is a per-service entry.
type Service struct {
	Owners []Selector `yaml:"owners"`
	// Split shares new connections between provider versions by
	// percentage (summing to 100), overriding their weights: the canary
	// of a rollout, {v1: 90, v2: 10}.
	Split map[string]int `yaml:"split"`
	// Locality is wire.LocalitySameSite or wire.LocalitySameRegion.
	Locality string `yaml:"locality"`
	// Affinity is wire.AffinityClient (or "none"): one client address
	// stays on one provider.
	Affinity string `yaml:"affinity"`
	// Protocol http makes the service HTTP whatever its providers
	// exported it as (docs/http.md); so does an http section.
	Protocol Selector `yaml:"protocol"`
	// HTTP is how an HTTP service's requests are carried (http.go).
	HTTP *HTTP `yaml:"http"`

	http *wire.ServiceHTTP // evaluated by check when the service is HTTP
}

// traffic reports whether the entry sets how traffic is shared.
func (s Service) traffic() bool {
	return len(s.Split) > 0 || s.Locality != "" || s.Affinity != "" || s.isHTTP()
}

// Rule is one access rule.
type Rule struct {
	From []Selector `yaml:"from"`
	To   []Selector `yaml:"to"`
	// Action is allow (the default) or deny.
	Action Selector `yaml:"action"`
	// HTTP and When limit the rule to some requests of HTTP services:
	// their providers decide each request.
	HTTP *RuleHTTP  `yaml:"http"`
	When Conditions `yaml:"when"`
}

// Test is one expectation the policy must meet.
type Test struct {
	From  Selector   `yaml:"from"`
	Allow []Selector `yaml:"allow"`
	Deny  []Selector `yaml:"deny"`
	// Request, when set, makes allow and deny about this HTTP request.
	Request *TestRequest `yaml:"request"`
}

// Selector is one string of the file with where it stood.
type Selector struct {
	S    string
	Line int
	Col  int
}

// UnmarshalYAML keeps the position of a scalar.
func (s *Selector) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &posError{line: n.Line, col: n.Column, msg: fmt.Sprintf("want a string, got %s", kindName(n.Kind))}
	}
	s.S, s.Line, s.Col = n.Value, n.Line, n.Column
	return nil
}

func (s Selector) String() string { return s.S }

// MarshalYAML writes the string alone.
func (s Selector) MarshalYAML() (any, error) { return s.S, nil }

func kindName(k yaml.Kind) string {
	switch k {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	case yaml.AliasNode:
		return "an alias"
	}
	return "a document"
}

type posError struct {
	line, col int
	msg       string
}

func (e *posError) Error() string { return fmt.Sprintf("line %d: %s", e.line, e.msg) }

// Problem is one thing wrong with a policy file.
type Problem struct {
	File string
	Line int // 0: the file as a whole
	Msg  string
}

func (p Problem) String() string {
	switch {
	case p.Line > 0:
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
	default:
		return fmt.Sprintf("%s: %s", p.File, p.Msg)
	}
}

// Error lists every problem found in a policy file, in line order.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// problems collects Problems of one file.
type problems struct {
	file string
	list []Problem
}

func (ps *problems) add(line int, format string, args ...any) {
	if len(ps.list) < 100 {
		ps.list = append(ps.list, Problem{File: ps.file, Line: line, Msg: fmt.Sprintf(format, args...)})
	}
}

func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	sort.SliceStable(ps.list, func(i, j int) bool { return ps.list[i].Line < ps.list[j].Line })
	return &Error{Problems: ps.list}
}

// Parse reads a policy file (YAML or JSON) and checks it: every field
// known, every selector well formed, every group and tag it names defined.
// It does not run the tests (Run does). file names the source in errors.
func Parse(file string, data []byte) (*Policy, error) {
	ps := &problems{file: file}
	if len(data) > MaxSize {
		ps.add(0, "the policy is %d bytes, more than the %d allowed", len(data), MaxSize)
		return nil, ps.err()
	}
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil && !errors.Is(err, io.EOF) {
		ps.add(yamlLine(err), "%s", yamlMsg(err))
		return nil, ps.err()
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		ps.add(extra.Line, "a policy is one YAML document; remove the second")
		return nil, ps.err()
	}
	p := &Policy{file: file, lines: map[string]int{}}
	if root.Kind == 0 || len(root.Content) == 0 {
		return p, nil // an empty file: no rules, everyone may reach everything
	}
	doc := root.Content[0]
	if doc.Kind != yaml.MappingNode {
		ps.add(doc.Line, "a policy is a mapping of groups, tagOwners, services, rules and tests; got %s", kindName(doc.Kind))
		return nil, ps.err()
	}
	if hasAlias(doc, 0) {
		ps.add(doc.Line, "YAML aliases and anchors are not allowed in a policy")
		return nil, ps.err()
	}
	// Strict decoding: unknown fields and wrong types are errors.
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	if err := strict.Decode(p); err != nil {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			for _, e := range te.Errors {
				ps.add(yamlLine(errors.New(e)), "%s", yamlMsg(errors.New(e)))
			}
		} else {
			ps.add(yamlLine(err), "%s", yamlMsg(err))
		}
		return nil, ps.err()
	}
	p.recordLines(doc)
	p.check(ps)
	if err := ps.err(); err != nil {
		return nil, err
	}
	p.buildIndex()
	return p, nil
}

func hasAlias(n *yaml.Node, depth int) bool {
	if n.Kind == yaml.AliasNode || n.Anchor != "" || depth > 64 {
		return true
	}
	for _, c := range n.Content {
		if hasAlias(c, depth+1) {
			return true
		}
	}
	return false
}

// recordLines notes where the keys of groups, tagOwners and services
// are, and inside services those of http and http.jwt.
func (p *Policy) recordLines(doc *yaml.Node) {
	var walk func(prefix string, n *yaml.Node, depth int)
	walk = func(prefix string, n *yaml.Node, depth int) {
		if n.Kind != yaml.MappingNode {
			return
		}
		for j := 0; j+1 < len(n.Content); j += 2 {
			k := prefix + "/" + n.Content[j].Value
			p.lines[k] = n.Content[j].Line
			if depth > 0 {
				walk(k, n.Content[j+1], depth-1)
			}
		}
	}
	for i := 0; i+1 < len(doc.Content); i += 2 {
		sec, val := doc.Content[i].Value, doc.Content[i+1]
		depth := 0
		if sec == "services" {
			depth = 2 // services/NAME/http/jwt
		}
		walk(sec, val, depth)
	}
}

// yamlLine pulls "line N" out of a yaml.v3 error.
func yamlLine(err error) int {
	var pe *posError
	if errors.As(err, &pe) {
		return pe.line
	}
	s := err.Error()
	if i := strings.Index(s, "line "); i >= 0 {
		n := 0
		for _, c := range s[i+5:] {
			if c < '0' || c > '9' {
				break
			}
			n = n*10 + int(c-'0')
			if n > 1<<24 {
				break
			}
		}
		return n
	}
	return 0
}

// yamlMsg turns a yaml.v3 error into a sentence without its "yaml: line N:"
// prefix and Go type names.
func yamlMsg(err error) string {
	var pe *posError
	if errors.As(err, &pe) {
		return pe.msg
	}
	s := err.Error()
	s = strings.TrimPrefix(s, "yaml: ")
	if strings.HasPrefix(s, "line ") {
		if i := strings.Index(s, ": "); i >= 0 {
			s = s[i+2:]
		}
	}
	if strings.HasPrefix(s, "unmarshal errors:") {
		s = strings.TrimSpace(strings.TrimPrefix(s, "unmarshal errors:"))
	}
	if f, typ, ok := strings.Cut(s, " not found in type "); ok && strings.HasPrefix(f, "field ") {
		return fmt.Sprintf("unknown field %q in %s (fields: %s)", strings.TrimPrefix(f, "field "), section(typ), fieldsOf(typ))
	}
	if strings.Contains(s, "cannot unmarshal") {
		return "wrong type: " + strings.ReplaceAll(strings.ReplaceAll(s, "policy.", ""), "!!", "")
	}
	return s
}

func section(typ string) string {
	if s, _, ok := httpFields(typ); ok {
		return s
	}
	switch typ {
	case "policy.Policy":
		return "the policy"
	case "policy.Rule":
		return "a rule"
	case "policy.Test":
		return "a test"
	case "policy.Service":
		return "a service"
	case "policy.JWT":
		return "jwt"
	case "policy.RuleHTTP":
		return "a rule's http"
	case "policy.TestRequest":
		return "a test's request"
	}
	return typ
}

func fieldsOf(typ string) string {
	if _, f, ok := httpFields(typ); ok {
		return f
	}
	switch typ {
	case "policy.Policy":
		return "groups, tagOwners, services, rules, tests"
	case "policy.Rule":
		return "from, to, action, http, when"
	case "policy.Test":
		return "from, allow, deny, request"
	case "policy.Service":
		return "owners, split, locality, affinity, protocol, http"
	case "policy.JWT":
		return "issuer, jwksURL, jwksFile, audiences, forwardClaims, required"
	case "policy.RuleHTTP":
		return "methods, paths"
	case "policy.TestRequest":
		return "method, path, claims"
	}
	return "?"
}

// Kinds of selector.
const (
	kindAll   = "*"
	kindUser  = "user"
	kindGroup = "group"
	kindTag   = "tag"
	kindNode  = "node"
	kindAuto  = "autogroup"
)

// Autogroups.
const (
	AutoAdmin = "autogroup:admin" // nodes of admin accounts
	AutoSelf  = "autogroup:self"  // nodes whose owner owns the service
)

// splitSel splits "kind:name"; "*" has kind "*".
func splitSel(s string) (kind, name string) {
	if s == "*" {
		return kindAll, ""
	}
	k, n, ok := strings.Cut(s, ":")
	if !ok {
		return "", s
	}
	return k, n
}

func validUser(name string) error {
	if name == "" || len(name) > 128 {
		return errors.New("a user name is 1 to 128 characters")
	}
	for _, c := range name {
		if c <= ' ' || c == ':' || c == ',' || c == 0x7f {
			return fmt.Errorf("user name %q holds a space, a control character, ':' or ','", name)
		}
	}
	return nil
}

// where a selector may stand, and what it may be there
type place int

const (
	placeFrom       place = iota // rules[].from: who connects
	placeOwner                   // services.X.owners, tagOwners.X: who provides / gives a tag
	placeGroup                   // groups.X: members
	placeTestFrom                // tests[].from: one principal
	placeServiceRef              // rules[].to, tests[].allow/deny: service names
)

func (p *Policy) checkSel(ps *problems, s Selector, at place) {
	if at == placeServiceRef {
		if s.S == "*" {
			return
		}
		if k, _ := splitSel(s.S); k != "" {
			ps.add(s.Line, "%q: \"to\", \"allow\" and \"deny\" name services (web, db) or \"*\", not %s: selectors", s.S, k)
			return
		}
		if err := wire.ValidName(s.S); err != nil {
			ps.add(s.Line, "%q is not a service name: %v", s.S, err)
		}
		return
	}
	kind, name := splitSel(s.S)
	ok := map[place][]string{
		placeFrom:     {kindAll, kindUser, kindGroup, kindTag, kindNode, kindAuto},
		placeOwner:    {kindUser, kindGroup, kindTag, kindNode, kindAuto},
		placeGroup:    {kindUser},
		placeTestFrom: {kindUser, kindTag, kindNode},
	}[at]
	if kind == "" {
		ps.add(s.Line, "%q is no selector: write *, user:NAME, group:NAME, tag:NAME, node:NAME, autogroup:admin or autogroup:self", s.S)
		return
	}
	if !slices.Contains(ok, kind) {
		what := map[place]string{
			placeFrom:     "*, user:, group:, tag:, node: and autogroup:",
			placeOwner:    "user:, group:, tag:, node: and autogroup:admin",
			placeGroup:    "user: (groups do not nest)",
			placeTestFrom: "user:, tag: and node: (one principal)",
		}[at]
		if !slices.Contains([]string{kindAll, kindUser, kindGroup, kindTag, kindNode, kindAuto}, kind) {
			ps.add(s.Line, "%q: unknown selector kind %q (known: user, group, tag, node, autogroup)", s.S, kind)
		} else {
			ps.add(s.Line, "%q is not allowed here; only %s", s.S, what)
		}
		return
	}
	switch kind {
	case kindUser:
		if err := validUser(name); err != nil {
			ps.add(s.Line, "%q: %v", s.S, err)
		}
	case kindGroup:
		if _, def := p.Groups[name]; !def {
			ps.add(s.Line, "%q: no group %q is defined under groups", s.S, name)
		}
	case kindTag:
		if err := wire.ValidName(name); err != nil {
			ps.add(s.Line, "%q: %v", s.S, err)
		} else if _, def := p.TagOwners[name]; !def {
			ps.add(s.Line, "%q: tag %q is not defined under tagOwners (say who may give it)", s.S, name)
		}
	case kindNode:
		if err := wire.ValidName(name); err != nil {
			ps.add(s.Line, "%q: %v", s.S, err)
		}
	case kindAuto:
		switch s.S {
		case AutoAdmin:
		case AutoSelf:
			if at != placeFrom {
				ps.add(s.Line, "autogroup:self may only stand in a rule's from")
			}
		default:
			ps.add(s.Line, "%q: unknown autogroup (known: autogroup:admin, autogroup:self)", s.S)
		}
	}
}

func (p *Policy) check(ps *problems) {
	if n := len(p.Groups) + len(p.TagOwners) + len(p.Services) + len(p.Rules) + len(p.Tests); n > maxEntries {
		ps.add(0, "the policy has %d entries, more than the %d allowed", n, maxEntries)
		return
	}
	list := func(ss []Selector, at place, line int, what string) {
		if len(ss) > maxSelectors {
			ps.add(line, "%s has %d entries, more than the %d allowed", what, len(ss), maxSelectors)
			return
		}
		for _, s := range ss {
			p.checkSel(ps, s, at)
		}
	}
	// Normalise "tag:ci" keys of tagOwners to "ci".
	for k, v := range p.TagOwners {
		if name, ok := strings.CutPrefix(k, "tag:"); ok {
			if _, dup := p.TagOwners[name]; dup {
				ps.add(p.lines["tagOwners/"+k], "tag %q is listed twice under tagOwners", name)
			}
			delete(p.TagOwners, k)
			p.TagOwners[name] = v
			p.lines["tagOwners/"+name] = p.lines["tagOwners/"+k]
		}
	}
	for _, name := range sortedKeys(p.Groups) {
		line := p.lines["groups/"+name]
		if err := wire.ValidName(name); err != nil {
			ps.add(line, "group %q: %v", name, err)
		}
		list(p.Groups[name], placeGroup, line, "group "+name)
	}
	for _, name := range sortedKeys(p.TagOwners) {
		line := p.lines["tagOwners/"+name]
		if err := wire.ValidName(name); err != nil {
			ps.add(line, "tag %q: %v", name, err)
		}
		list(p.TagOwners[name], placeOwner, line, "tagOwners."+name)
	}
	for _, name := range sortedKeys(p.Services) {
		line := p.lines["services/"+name]
		if err := wire.ValidName(name); err != nil {
			ps.add(line, "service %q: %v", name, err)
		}
		sv := p.Services[name]
		p.checkHTTP(ps, line, name, &sv)
		p.Services[name] = sv
		if len(sv.Owners) == 0 && !sv.traffic() {
			ps.add(line, "service %q lists no owners; remove the entry or name who may provide it", name)
		}
		p.checkTraffic(ps, line, name, sv)
		if sv.HTTP != nil {
			p.checkJWT(ps, name, sv.HTTP)
		}
		list(p.Services[name].Owners, placeOwner, line, "services."+name+".owners")
	}
	for i, r := range p.Rules {
		line := r.line()
		if len(r.From) == 0 {
			ps.add(line, "rule %d has no \"from\"", i+1)
		}
		if len(r.To) == 0 {
			ps.add(line, "rule %d has no \"to\"", i+1)
		}
		list(r.From, placeFrom, line, fmt.Sprintf("rule %d's from", i+1))
		list(r.To, placeServiceRef, line, fmt.Sprintf("rule %d's to", i+1))
		switch r.Action.S {
		case "", "allow", "deny":
		default:
			ps.add(r.Action.Line, "rule %d: action %q: write allow or deny", i+1, r.Action.S)
		}
		p.checkRuleHTTP(ps, i, r)
	}
	p.checkRequestRuleCount(ps)
	for i, t := range p.Tests {
		line := t.From.Line
		if t.From.S == "" {
			ps.add(firstLine(line, t.Allow, t.Deny), "test %d has no \"from\"", i+1)
		} else {
			p.checkSel(ps, t.From, placeTestFrom)
		}
		if len(t.Allow)+len(t.Deny) == 0 {
			ps.add(line, "test %d expects nothing: give it allow or deny", i+1)
		}
		list(t.Allow, placeServiceRef, line, fmt.Sprintf("test %d's allow", i+1))
		list(t.Deny, placeServiceRef, line, fmt.Sprintf("test %d's deny", i+1))
		p.checkTestRequest(ps, i, t)
	}
}

func firstLine(line int, lists ...[]Selector) int {
	for _, l := range lists {
		if len(l) > 0 && (line == 0 || l[0].Line < line) {
			line = l[0].Line
		}
	}
	return line
}

func (r Rule) line() int { return firstLine(0, r.From, r.To) }

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// File is the name the policy was parsed under.
func (p *Policy) File() string { return p.file }

// TagDefined reports whether tag is listed under tagOwners.
func (p *Policy) TagDefined(tag string) bool {
	_, ok := p.TagOwners[tag]
	return ok
}

// checkTraffic checks a service's split, locality and affinity.
func (p *Policy) checkTraffic(ps *problems, line int, name string, sv Service) {
	if len(sv.Split) > 0 {
		sum := 0
		for _, v := range sortedKeys(sv.Split) {
			pct := sv.Split[v]
			if err := wire.ValidVersion(v); err != nil {
				ps.add(line, "service %q: split: %v", name, err)
			}
			if pct < 0 || pct > 100 {
				ps.add(line, "service %q: split: %s: %d must be a percentage from 0 to 100", name, v, pct)
			}
			sum += pct
		}
		if sum != 100 {
			ps.add(line, "service %q: split percentages sum to %d; make them sum to 100, e.g. {v1: 90, v2: 10}", name, sum)
		}
	}
	switch sv.Locality {
	case "", wire.LocalitySameSite, wire.LocalitySameRegion:
	default:
		ps.add(line, "service %q: locality %q must be %s or %s", name, sv.Locality, wire.LocalitySameSite, wire.LocalitySameRegion)
	}
	switch sv.Affinity {
	case "", "none", wire.AffinityClient:
	default:
		ps.add(line, "service %q: affinity %q must be %q or \"none\"", name, sv.Affinity, wire.AffinityClient)
	}
}
