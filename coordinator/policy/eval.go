package policy

import (
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"
)

// Principal is who connects or provides: a node, described by what the
// policy can select it by.
type Principal struct {
	// Node is the node's name; "" when the principal is a user alone (a
	// test's user:NAME, a person minting a token).
	Node string
	// User owns the node; "" for a tagged node, which is owned by its
	// tags and not by the person who joined it.
	User string
	// Admin: User is an admin account.
	Admin bool
	Tags  []string
}

func (p Principal) String() string {
	var owner string
	switch {
	case len(p.Tags) > 0:
		owner = "tag:" + strings.Join(p.Tags, ",tag:")
	case p.User != "":
		owner = "user:" + p.User
	default:
		owner = "no owner"
	}
	if p.Node == "" {
		return owner
	}
	return fmt.Sprintf("node:%s (%s)", p.Node, owner)
}

// Decision is the policy's answer for one principal and one service.
type Decision struct {
	Allow bool
	// Rule is the deciding rule's index in Rules, -1 when none matched.
	Rule int
	// Line is the deciding rule's line in the file (0 for none).
	Line int
	// Why says in words which selector matched, or why none did.
	Why string
	// Conditional: the deciding rule allows only some requests (http,
	// when); the node may connect, and the provider decides each request.
	Conditional bool
}

// AllowsAll reports whether the policy has no rules (or only a first rule
// from "*" to "*" that allows): every node may reach every service, and
// the map needs no filtering.
func (p *Policy) AllowsAll() bool {
	if p == nil || len(p.Rules) == 0 {
		return true
	}
	r := p.Rules[0]
	return r.Action.S != "deny" && !r.conditional() && slices.ContainsFunc(r.From, isStar) && slices.ContainsFunc(r.To, isStar)
}

func isStar(s Selector) bool { return s.S == "*" }

// Decide says whether from may connect to service, whose names are owned
// by serviceOwner (a user name, "" if unknown): the first rule whose from
// matches and whose to names the service decides; with no rules, allow;
// once rules exist, what no rule allows is denied. A rule with http or
// when allows only some requests: one that allows decides that the node
// may connect (Conditional); one that denies is passed over, since it
// leaves the other requests to the rules after it.
func (p *Policy) Decide(from Principal, service, serviceOwner string) Decision {
	if p == nil || len(p.Rules) == 0 {
		return Decision{Allow: true, Rule: -1, Why: "the policy has no rules: every node may reach every service"}
	}
	decide := func(i int) (Decision, bool) {
		r := p.Rules[i]
		if r.condDeny() {
			return Decision{}, false
		}
		for _, s := range r.From {
			if ok, why := p.matches(s.S, from, serviceOwner, service); ok {
				d := Decision{Allow: r.Action.S != "deny", Rule: i, Line: r.line(), Why: why, Conditional: r.conditional()}
				if d.Conditional {
					d.Why += fmt.Sprintf("; the rule allows only %s, which the provider decides per request", r.describe())
				}
				return d, true
			}
		}
		return Decision{}, false
	}
	if ix := p.idx; ix != nil {
		// The rules whose to covers the service, in order: the merge of
		// those naming it and those with "*".
		named, star := ix.toName[service], ix.toStar
		for len(named) > 0 || len(star) > 0 {
			var i int
			switch {
			case len(star) == 0 || len(named) > 0 && named[0] < star[0]:
				i, named = named[0], named[1:]
			case len(named) > 0 && named[0] == star[0]:
				i, named, star = named[0], named[1:], star[1:]
			default:
				i, star = star[0], star[1:]
			}
			if d, ok := decide(i); ok {
				return d
			}
		}
	} else {
		for i, r := range p.Rules {
			if !slices.ContainsFunc(r.To, func(s Selector) bool { return s.S == "*" || s.S == service }) {
				continue
			}
			if d, ok := decide(i); ok {
				return d
			}
		}
	}
	return Decision{Allow: false, Rule: -1, Why: fmt.Sprintf("no rule lets %s reach %s: denied by default", from, service)}
}

// Access is Decide(prs[i], services[j], owners[j]).Allow for every
// principal i and service j, as allow[j][i], computed for the network
// map at every change of the mesh. The rules matching a principal are
// looked up by selector, once per kind of principal, and those covering
// a service by name, into bitsets; a decision is the first rule in both,
// found a word of 64 rules at a time. A policy of the largest size over
// a large mesh then costs principals × services × rules/64 at most.
func (p *Policy) Access(prs []Principal, services, owners []string) [][]bool {
	allow := make([][]bool, len(services))
	for j := range allow {
		allow[j] = make([]bool, len(prs))
	}
	class, rows := p.AccessClasses(prs, services, owners)
	for i, c := range class {
		for j, ok := range rows[c] {
			allow[j][i] = ok
		}
	}
	return allow
}

// AccessClasses is Access by class: principals the policy cannot tell
// apart (the same user, admin bit and tags, and a name only if a rule
// names it) form one class and share one row, rows[class[i]][j] being
// Access's allow[j][i]. A mesh of many nodes in few groups then costs
// classes × services, and callers can share each class's answers among
// its members rather than expand them per node.
func (p *Policy) AccessClasses(prs []Principal, services, owners []string) (class []int, rows [][]bool) {
	class = make([]int, len(prs))
	if p == nil || len(p.Rules) == 0 || p.idx == nil {
		for i, pr := range prs {
			row := make([]bool, len(services))
			for j, svc := range services {
				row[j] = p.Decide(pr, svc, owners[j]).Allow
			}
			class[i], rows = len(rows), append(rows, row)
		}
		return class, rows
	}
	ix := p.idx
	words := (len(p.Rules) + 63) / 64
	set := func(b []uint64, rules []int) {
		for _, r := range rules {
			b[r/64] |= 1 << (r % 64)
		}
	}
	// The rules covering each service.
	covers := make([][]uint64, len(services))
	for j, svc := range services {
		covers[j] = make([]uint64, words)
		set(covers[j], ix.toName[svc])
		set(covers[j], ix.toStar)
		for _, r := range ix.condDeny {
			covers[j][r/64] &^= 1 << (r % 64)
		}
	}
	// Principals the policy cannot tell apart share their answers.
	answers := map[string]int{}
	for i, pr := range prs {
		name := ""
		if ix.nodes[pr.Node] {
			name = pr.Node
		}
		key := strconv.FormatBool(pr.Admin) + strconv.Quote(pr.User) + strconv.Quote(name)
		for _, t := range pr.Tags {
			key += strconv.Quote(t) // quoted: a tag holding a comma is one tag
		}
		c, ok := answers[key]
		if !ok {
			// The rules whose from matches pr; self: those that match
			// by autogroup:self, when pr's user owns the service.
			mine, self := make([]uint64, words), make([]uint64, words)
			set(mine, ix.bySel["*"])
			if pr.User != "" {
				set(mine, ix.bySel["user:"+pr.User])
				for _, g := range ix.groupsOf[pr.User] {
					set(mine, ix.bySel["group:"+g])
				}
				if pr.Admin {
					set(mine, ix.bySel[AutoAdmin])
				}
				set(self, ix.bySel[AutoSelf])
			}
			for _, t := range pr.Tags {
				set(mine, ix.bySel["tag:"+t])
			}
			if pr.Node != "" {
				set(mine, ix.bySel["node:"+pr.Node])
			}
			ans := make([]bool, len(services))
			for j := range services {
				isOwner := pr.User != "" && pr.User == owners[j]
				for w := range words {
					m := mine[w]
					if isOwner {
						m |= self[w]
					}
					if x := m & covers[j][w]; x != 0 {
						ans[j] = p.Rules[w*64+bits.TrailingZeros64(x)].Action.S != "deny"
						break
					}
				}
			}
			c = len(rows)
			answers[key] = c
			rows = append(rows, ans)
		}
		class[i] = c
	}
	return class, rows
}

// matches reports whether selector sel covers principal pr, and why.
func (p *Policy) matches(sel string, pr Principal, serviceOwner, service string) (bool, string) {
	kind, name := splitSel(sel)
	switch kind {
	case kindAll:
		return true, "* matches every node"
	case kindUser:
		if pr.User != "" && pr.User == name {
			return true, fmt.Sprintf("%s belongs to user:%s", pr, name)
		}
	case kindGroup:
		if pr.User != "" && slices.ContainsFunc(p.Groups[name], func(s Selector) bool { return s.S == "user:"+pr.User }) {
			return true, fmt.Sprintf("user:%s is in group:%s", pr.User, name)
		}
	case kindTag:
		if slices.Contains(pr.Tags, name) {
			return true, fmt.Sprintf("%s carries tag:%s", pr, name)
		}
	case kindNode:
		if pr.Node != "" && pr.Node == name {
			return true, fmt.Sprintf("it is node:%s", name)
		}
	case kindAuto:
		switch sel {
		case AutoAdmin:
			if pr.Admin && pr.User != "" {
				return true, fmt.Sprintf("user:%s is an admin (autogroup:admin)", pr.User)
			}
		case AutoSelf:
			if pr.User != "" && pr.User == serviceOwner {
				return true, fmt.Sprintf("user:%s owns %s too (autogroup:self)", pr.User, service)
			}
		}
	}
	return false, ""
}

// ServiceOwners returns the owners listed for service, or nil if the
// policy does not list it (its first provider's owner owns it then).
func (p *Policy) ServiceOwners(service string) []Selector {
	if p == nil {
		return nil
	}
	return p.Services[service].Owners
}

// CanProvide reports whether pr may provide service. listed is false when
// the policy says nothing of the service: ownership by first provider
// applies then, and ok is true.
func (p *Policy) CanProvide(pr Principal, service string) (listed, ok bool, why string) {
	owners := p.ServiceOwners(service)
	if owners == nil {
		return false, true, ""
	}
	for _, s := range owners {
		if m, why := p.matches(s.S, pr, "", service); m {
			return true, true, why
		}
	}
	names := make([]string, len(owners))
	for i, s := range owners {
		names[i] = s.S
	}
	return true, false, fmt.Sprintf("the policy lets only %s provide %s", strings.Join(names, ", "), service)
}

// CanGiveTag reports whether the person minter (a user, no node) may mint
// a token carrying tag: admins may give any tag; others only those whose
// tagOwners entry covers them.
func (p *Policy) CanGiveTag(minter Principal, tag string) (bool, string) {
	if minter.Admin {
		return true, "admins may give any tag"
	}
	var owners []Selector
	listed := false
	if p != nil {
		owners, listed = p.TagOwners[tag]
	}
	if !listed {
		return false, fmt.Sprintf("tag:%s has no owners in the policy's tagOwners; only an admin may give it", tag)
	}
	for _, s := range owners {
		if m, why := p.matches(s.S, minter, "", ""); m {
			return true, why
		}
	}
	return false, fmt.Sprintf("tagOwners lets only %s give tag:%s", joinSel(owners), tag)
}

func joinSel(ss []Selector) string {
	names := make([]string, len(ss))
	for i, s := range ss {
		names[i] = s.S
	}
	return strings.Join(names, ", ")
}

// Directory answers what the tests need to know about the mesh.
type Directory interface {
	// Principal resolves a test's from (user:NAME, tag:NAME, node:NAME).
	Principal(sel string) (Principal, error)
	// ServiceOwner is the user owning service's name, "" if none.
	ServiceOwner(service string) string
}

// Offline is the Directory of `meshlink policy check`: no coordinator, so
// user:NAME is a member's untagged node, tag:NAME a node with that tag
// alone, node:NAME a node of unknown owner; a service is owned by the
// first user: among its policy owners.
type Offline struct{ P *Policy }

// Principal implements Directory.
func (o Offline) Principal(sel string) (Principal, error) {
	kind, name := splitSel(sel)
	switch kind {
	case kindUser:
		return Principal{User: name}, nil
	case kindTag:
		return Principal{Tags: []string{name}}, nil
	case kindNode:
		return Principal{Node: name}, nil
	}
	return Principal{}, fmt.Errorf("%q names no principal", sel)
}

// ServiceOwner implements Directory.
func (o Offline) ServiceOwner(service string) string {
	for _, s := range o.P.ServiceOwners(service) {
		if k, n := splitSel(s.S); k == kindUser {
			return n
		}
	}
	return ""
}

// Run checks the policy's tests against dir and returns what failed, as
// problems at the tests' lines (nil when all pass).
func (p *Policy) Run(dir Directory) error {
	ps := &problems{file: p.file}
	for i, t := range p.Tests {
		pr, err := dir.Principal(t.From.S)
		if err != nil {
			ps.add(t.From.Line, "test %d: %v", i+1, err)
			continue
		}
		expect := func(svcs []Selector, allow bool) {
			for _, s := range svcs {
				for _, svc := range p.expand(s.S) {
					if t.Request != nil && !p.httpService(svc) {
						continue // "*": the HTTP services only
					}
					var d Decision
					what := svc
					if rq := t.Request; rq != nil {
						req := Request{Method: rq.Method.S, Path: rq.Path.S, Claims: rq.claims()}
						d = p.DecideRequest(pr, svc, dir.ServiceOwner(svc), req)
						what = fmt.Sprintf("%s %s", svc, req)
					} else {
						d = p.Decide(pr, svc, dir.ServiceOwner(svc))
					}
					if d.Allow == allow {
						continue
					}
					verdict := "denied"
					if d.Allow {
						verdict = "allowed"
					}
					by := d.Why
					if d.Rule >= 0 {
						by = fmt.Sprintf("rule %d (line %d): %s", d.Rule+1, d.Line, d.Why)
					}
					ps.add(s.Line, "test %d failed: %s to %s is %s by %s", i+1, t.From.S, what, verdict, by)
				}
			}
		}
		expect(t.Allow, true)
		expect(t.Deny, false)
	}
	return ps.err()
}

// expand turns a test's service reference into names: "*" is every
// service the policy names.
func (p *Policy) expand(s string) []string {
	if s != "*" {
		return []string{s}
	}
	set := map[string]bool{}
	for name := range p.Services {
		set[name] = true
	}
	for _, r := range p.Rules {
		for _, t := range r.To {
			if t.S != "*" {
				set[t.S] = true
			}
		}
	}
	return sortedKeys(set)
}
