package policy

import (
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/meshlink/meshlink/wire"
)

// JWT is services.NAME.http.jwt.
type JWT struct {
	Issuer Selector `yaml:"issuer"`
	// JWKSURL (http:// or https://) or JWKSFile (an absolute path on the
	// provider's host): exactly one.
	JWKSURL   Selector   `yaml:"jwksURL"`
	JWKSFile  Selector   `yaml:"jwksFile"`
	Audiences []Selector `yaml:"audiences"`
	// ForwardClaims: claim -> header name.
	ForwardClaims map[string]Selector `yaml:"forwardClaims"`
	// Required is true (the default) or false.
	Required Selector `yaml:"required"`
}

// RuleHTTP is a rule's http: the requests it covers.
type RuleHTTP struct {
	Methods []Selector `yaml:"methods"`
	Paths   []Selector `yaml:"paths"`
}

// Condition is one entry of a rule's when: a claim of the request's token.
type Condition struct {
	Claim    Selector `yaml:"claim"`
	Contains Selector `yaml:"contains"`
	Equals   Selector `yaml:"equals"`
	Line     int      `yaml:"-"`
}

// Conditions is a rule's when: a list of conditions, or one alone.
type Conditions []Condition

// UnmarshalYAML reads one condition or a list of them, refusing unknown
// fields itself (a custom unmarshaler's node.Decode is not strict).
func (cs *Conditions) UnmarshalYAML(n *yaml.Node) error {
	items := []*yaml.Node{n}
	if n.Kind == yaml.SequenceNode {
		items = n.Content
	}
	for _, it := range items {
		if it.Kind != yaml.MappingNode {
			return &posError{line: it.Line, col: it.Column, msg: fmt.Sprintf("a condition of when is a mapping {claim: NAME, contains: VALUE} or {claim: NAME, equals: VALUE}; got %s", kindName(it.Kind))}
		}
		for i := 0; i+1 < len(it.Content); i += 2 {
			if k := it.Content[i].Value; k != "claim" && k != "contains" && k != "equals" {
				return &posError{line: it.Content[i].Line, col: it.Content[i].Column, msg: fmt.Sprintf("unknown field %q in a condition (fields: claim, contains, equals)", k)}
			}
		}
		c := Condition{Line: it.Line}
		if err := it.Decode(&c); err != nil {
			return err
		}
		*cs = append(*cs, c)
	}
	return nil
}

// TestRequest is a test's request: the tests' allow and deny then name
// the services that must allow or refuse it.
type TestRequest struct {
	Method Selector `yaml:"method"`
	Path   Selector `yaml:"path"`
	// Claims are those of a valid token the request carries; without
	// claims the request carries no token.
	Claims map[string]ClaimValue `yaml:"claims"`
}

// ClaimValue is a test claim: a string or a list of strings.
type ClaimValue struct {
	S    string
	List []string
	// IsList: the claim was a list.
	IsList bool
}

// UnmarshalYAML reads a scalar or a list of scalars.
func (v *ClaimValue) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		v.S = n.Value
		return nil
	case yaml.SequenceNode:
		v.IsList = true
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return &posError{line: c.Line, col: c.Column, msg: "a claim is a string or a list of strings"}
			}
			v.List = append(v.List, c.Value)
		}
		return nil
	}
	return &posError{line: n.Line, col: n.Column, msg: fmt.Sprintf("a claim is a string or a list of strings; got %s", kindName(n.Kind))}
}

// Request is one HTTP request as DecideRequest sees it.
type Request struct {
	Method string
	Path   string
	// Claims of the request's valid token; nil: no token.
	Claims map[string]any
}

func (r Request) String() string { return r.Method + " " + r.Path }

// conditional reports whether the rule decides per request.
func (r Rule) conditional() bool { return r.HTTP != nil || len(r.When) > 0 }

// condDeny: a deny rule with conditions refuses only some requests; for
// who may connect it is skipped (later rules may allow the rest).
func (r Rule) condDeny() bool { return r.Action.S == "deny" && r.conditional() }

// httpService reports whether the policy declares service HTTP
// (protocol: http or an http section).
func (p *Policy) httpService(name string) bool {
	sv, ok := p.Services[name]
	return ok && sv.isHTTP()
}

// jwtOf is service's jwt section, nil when none.
func (p *Policy) jwtOf(service string) *JWT {
	if h := p.Services[service].HTTP; h != nil {
		return h.JWT
	}
	return nil
}

// requestRule is rule i's conditions as providers evaluate them.
func (p *Policy) requestRule(i int) wire.RequestRule {
	r := p.Rules[i]
	rr := wire.RequestRule{Rule: i + 1, Line: r.line(), Deny: r.Action.S == "deny"}
	if r.HTTP != nil {
		rr.Methods = strs(r.HTTP.Methods)
		rr.Paths = strs(r.HTTP.Paths)
	}
	for _, c := range r.When {
		rr.When = append(rr.When, wire.ClaimMatch{Claim: c.Claim.S, Contains: c.Contains.S, Equals: c.Equals.S})
	}
	return rr
}

func strs(ss []Selector) []string {
	if len(ss) == 0 {
		return nil
	}
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.S
	}
	return out
}

// wireJWT is a service's jwt as providers receive it, nil when none.
func (p *Policy) wireJWT(service string) *wire.JWT {
	j := p.jwtOf(service)
	if j == nil {
		return nil
	}
	w := &wire.JWT{Issuer: j.Issuer.S, JWKSURL: j.JWKSURL.S, JWKSFile: j.JWKSFile.S, Audiences: strs(j.Audiences),
		Optional: j.Required.S == "false"}
	for _, c := range sortedKeys(j.ForwardClaims) {
		w.ForwardClaims = append(w.ForwardClaims, wire.ForwardClaim{Claim: c, Header: j.ForwardClaims[c].S})
	}
	return w
}

// covering lists the indexes of the rules whose to covers service, in order.
func (p *Policy) covering(service string) []int {
	var out []int
	for i, r := range p.Rules {
		if slices.ContainsFunc(r.To, func(s Selector) bool { return s.S == "*" || s.S == service }) {
			out = append(out, i)
		}
	}
	return out
}

// ChecksRequests reports whether the providers of service decide its
// requests one by one: it has a jwt, or a rule covering it has http or
// when conditions. An agent before wire.VersionRequestAuth cannot.
func (p *Policy) ChecksRequests(service string) bool {
	if p == nil {
		return false
	}
	if p.wireJWT(service) != nil {
		return true
	}
	return slices.ContainsFunc(p.covering(service), func(i int) bool { return p.Rules[i].conditional() })
}

// HTTPAuth is what the providers of service (owned by user owner, for
// autogroup:self) need to decide each of its requests: its jwt, and the
// rules covering it, in order, when any of them has conditions, each
// with the IDs (ids[i] is prs[i]'s) of the nodes among prs its from
// matches. prs are the nodes allowed to connect (AllowedNodes); the
// others never reach a provider. nil when there is nothing to decide.
func (p *Policy) HTTPAuth(service, owner string, prs []Principal, ids []wire.NodeID) *wire.HTTPAuth {
	if p == nil {
		return nil
	}
	a := &wire.HTTPAuth{JWT: p.wireJWT(service)}
	rules := p.covering(service)
	if slices.ContainsFunc(rules, func(i int) bool { return p.Rules[i].conditional() }) {
		for _, i := range rules {
			r := p.Rules[i]
			rr := p.requestRule(i)
			if slices.ContainsFunc(r.From, isStar) {
				rr.From = []string{"*"}
			} else {
				for k, pr := range prs {
					if slices.ContainsFunc(r.From, func(s Selector) bool { ok, _ := p.matches(s.S, pr, owner, service); return ok }) {
						rr.From = append(rr.From, strconv.FormatUint(uint64(ids[k]), 10))
					}
				}
				if len(rr.From) == 0 {
					continue // matches none of the nodes that may connect
				}
			}
			a.Rules = append(a.Rules, rr)
			if !rr.Conditional() && rr.From[0] == "*" {
				break // decides every request the rules before left
			}
		}
	}
	if a.JWT == nil && len(a.Rules) == 0 {
		return nil
	}
	return a
}

// DecideRequest says whether from may make request req of service (owned
// by serviceOwner), as its providers decide it: a service with a required
// jwt refuses a request without a token (401); then the first rule whose
// from matches and whose http and when hold decides; none: refused.
func (p *Policy) DecideRequest(from Principal, service, serviceOwner string, req Request) Decision {
	if p != nil {
		if j := p.wireJWT(service); j != nil && !j.Optional && req.Claims == nil {
			return Decision{Allow: false, Rule: -1, Why: fmt.Sprintf("%s requires a token (services.%s.http.jwt): refused with 401", service, service)}
		}
	}
	if p == nil || len(p.Rules) == 0 {
		return Decision{Allow: true, Rule: -1, Why: "the policy has no rules: every node may reach every service"}
	}
	for _, i := range p.covering(service) {
		r := p.Rules[i]
		for _, s := range r.From {
			ok, why := p.matches(s.S, from, serviceOwner, service)
			if !ok {
				continue
			}
			rr := p.requestRule(i)
			if !rr.MatchesRequest(req.Method, req.Path, req.Claims) {
				break
			}
			if r.conditional() {
				why += fmt.Sprintf(", and %s matches its %s", req, r.describe())
			}
			return Decision{Allow: r.Action.S != "deny", Rule: i, Line: r.line(), Why: why}
		}
	}
	return Decision{Allow: false, Rule: -1, Why: fmt.Sprintf("no rule lets %s make %s to %s: denied by default", from, req, service)}
}

// describe says in words what a conditional rule covers.
func (r Rule) describe() string {
	var parts []string
	if r.HTTP != nil {
		if len(r.HTTP.Methods) > 0 {
			parts = append(parts, "methods "+joinSel(r.HTTP.Methods))
		}
		if len(r.HTTP.Paths) > 0 {
			parts = append(parts, "paths "+joinSel(r.HTTP.Paths))
		}
	}
	for _, c := range r.When {
		if c.Contains.S != "" {
			parts = append(parts, fmt.Sprintf("claim %s contains %s", c.Claim.S, c.Contains.S))
		} else {
			parts = append(parts, fmt.Sprintf("claim %s equals %s", c.Claim.S, c.Equals.S))
		}
	}
	return strings.Join(parts, ", ")
}

// Claims turns a test's claims into a token's (nil for none).
func (t *TestRequest) claims() map[string]any {
	if t == nil || t.Claims == nil {
		return nil
	}
	out := make(map[string]any, len(t.Claims))
	for k, v := range t.Claims {
		if v.IsList {
			l := make([]any, len(v.List))
			for i, s := range v.List {
				l[i] = s
			}
			out[k] = l
		} else {
			out[k] = v.S
		}
	}
	return out
}

// checkJWT checks services.NAME.http.jwt.
func (p *Policy) checkJWT(ps *problems, name string, h *HTTP) {
	j := h.JWT
	if j == nil {
		return
	}
	line := p.lines["services/"+name+"/http/jwt"]
	if line == 0 {
		line = p.lines["services/"+name]
	}
	at := func(s Selector) int {
		if s.Line > 0 {
			return s.Line
		}
		return line
	}
	what := fmt.Sprintf("service %q: jwt", name)
	switch {
	case j.Issuer.S == "":
		ps.add(line, "%s: no issuer: write the iss its tokens carry (issuer: https://login.example.com)", what)
	case len(j.Issuer.S) > 512:
		ps.add(at(j.Issuer), "%s: the issuer is longer than 512 characters", what)
	}
	switch {
	case j.JWKSURL.S == "" && j.JWKSFile.S == "":
		ps.add(line, "%s: give jwksURL (where the issuer publishes its keys) or jwksFile (a JWKS on the provider's host)", what)
	case j.JWKSURL.S != "" && j.JWKSFile.S != "":
		ps.add(at(j.JWKSFile), "%s: give jwksURL or jwksFile, not both", what)
	case j.JWKSURL.S != "":
		u, err := url.Parse(j.JWKSURL.S)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || len(j.JWKSURL.S) > 2048 {
			ps.add(at(j.JWKSURL), "%s: jwksURL %q must be an http:// or https:// URL", what, j.JWKSURL.S)
		}
	default:
		if !filepath.IsAbs(j.JWKSFile.S) || len(j.JWKSFile.S) > 4096 {
			ps.add(at(j.JWKSFile), "%s: jwksFile %q must be an absolute path (on the provider's host)", what, j.JWKSFile.S)
		}
	}
	if len(j.Audiences) == 0 {
		ps.add(line, "%s: no audiences: list the aud values this service accepts (audiences: [%s])", what, name)
	}
	if len(j.Audiences) > 64 {
		ps.add(line, "%s: %d audiences, more than 64", what, len(j.Audiences))
	}
	for _, a := range j.Audiences {
		if a.S == "" || len(a.S) > 512 {
			ps.add(at(a), "%s: an audience is 1 to 512 characters", what)
		}
	}
	headers := map[string]string{}
	if len(j.ForwardClaims) > 32 {
		ps.add(line, "%s: forwardClaims has %d entries, more than 32", what, len(j.ForwardClaims))
	}
	for _, c := range sortedKeys(j.ForwardClaims) {
		h := j.ForwardClaims[c]
		if err := wire.ValidClaimName(c); err != nil {
			ps.add(at(h), "%s: forwardClaims: %v", what, err)
		}
		if err := wire.ValidHeaderName(h.S); err != nil {
			ps.add(at(h), "%s: forwardClaims.%s: %v", what, c, err)
			continue
		}
		lower := strings.ToLower(h.S)
		if other, dup := headers[lower]; dup {
			ps.add(at(h), "%s: forwardClaims: claims %s and %s both go to header %s", what, other, c, h.S)
		}
		headers[lower] = c
	}
	switch j.Required.S {
	case "", "true", "false":
	default:
		ps.add(at(j.Required), "%s: required %q: write true (the default: requests without a valid token get 401) or false", what, j.Required.S)
	}
}

// checkRuleHTTP checks a rule's http and when, and that it names only
// HTTP services.
func (p *Policy) checkRuleHTTP(ps *problems, i int, r Rule) {
	if !r.conditional() {
		return
	}
	line := r.line()
	for _, t := range r.To {
		switch {
		case t.S == "*":
			ps.add(t.Line, "rule %d has http or when, which only HTTP services can decide: name them in \"to\" instead of \"*\"", i+1)
		case !p.httpService(t.S):
			ps.add(t.Line, "rule %d has http or when, but service %q is not HTTP: declare it under services (services.%s.protocol: http) or move the conditions to a rule of HTTP services", i+1, t.S, t.S)
		case len(r.When) > 0 && p.jwtOf(t.S) == nil:
			ps.add(t.Line, "rule %d's when reads token claims, but service %q checks no token: add services.%s.http.jwt", i+1, t.S, t.S)
		}
	}
	if h := r.HTTP; h != nil {
		if len(h.Methods)+len(h.Paths) == 0 {
			ps.add(line, "rule %d: http lists no methods and no paths: give one, or remove http", i+1)
		}
		if len(h.Methods) > 64 || len(h.Paths) > 256 {
			ps.add(line, "rule %d: http lists more than 64 methods or 256 paths", i+1)
		}
		for _, m := range h.Methods {
			if err := wire.ValidMethod(m.S); err != nil {
				ps.add(m.Line, "rule %d: %v", i+1, err)
			}
		}
		for _, pa := range h.Paths {
			if err := wire.ValidPathPattern(pa.S); err != nil {
				ps.add(pa.Line, "rule %d: %v", i+1, err)
			}
		}
	}
	if len(r.When) > 64 {
		ps.add(line, "rule %d: when has %d conditions, more than 64", i+1, len(r.When))
	}
	for _, c := range r.When {
		cl := c.Line
		if cl == 0 {
			cl = line
		}
		if err := wire.ValidClaimName(c.Claim.S); err != nil {
			ps.add(cl, "rule %d: when: %v", i+1, err)
		}
		switch {
		case c.Contains.S == "" && c.Equals.S == "":
			ps.add(cl, "rule %d: when: claim %q needs contains: VALUE or equals: VALUE", i+1, c.Claim.S)
		case c.Contains.S != "" && c.Equals.S != "":
			ps.add(cl, "rule %d: when: claim %q: give contains or equals, not both", i+1, c.Claim.S)
		}
		if len(c.Contains.S) > 512 || len(c.Equals.S) > 512 {
			ps.add(cl, "rule %d: when: a value is longer than 512 characters", i+1)
		}
	}
}

// checkTestRequest checks a test's request.
func (p *Policy) checkTestRequest(ps *problems, i int, t Test) {
	rq := t.Request
	if rq == nil {
		return
	}
	line := t.From.Line
	if rq.Method.S == "" {
		ps.add(line, "test %d: request needs a method (GET)", i+1)
	} else if err := wire.ValidMethod(rq.Method.S); err != nil {
		ps.add(rq.Method.Line, "test %d: request: %v", i+1, err)
	}
	if !wire.CleanPath(rq.Path.S) {
		l := rq.Path.Line
		if l == 0 {
			l = line
		}
		ps.add(l, "test %d: request path %q must be a clean absolute path (/api/x)", i+1, rq.Path.S)
	}
	for _, svcs := range [][]Selector{t.Allow, t.Deny} {
		for _, s := range svcs {
			if s.S != "*" && !p.httpService(s.S) {
				ps.add(s.Line, "test %d has a request, but service %q is not HTTP (services.%s.http)", i+1, s.S, s.S)
			}
		}
	}
}

// checkRequestRuleCount refuses a policy whose rules covering one HTTP
// service with conditions are more than a provider accepts.
func (p *Policy) checkRequestRuleCount(ps *problems) {
	for _, name := range sortedKeys(p.Services) {
		if !p.httpService(name) {
			continue
		}
		rules := p.covering(name)
		if len(rules) > wire.MaxRequestRules && slices.ContainsFunc(rules, func(i int) bool { return p.Rules[i].conditional() }) {
			ps.add(p.lines["services/"+name], "service %q: %d rules cover it and some have http or when; providers decide each request by at most %d", name, len(rules), wire.MaxRequestRules)
		}
	}
}
