package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// activePolicy is the access policy in force, parsed once.
type activePolicy struct {
	p         *policy.Policy
	text      string
	updated   time.Time
	updatedBy string
}

// denyAll stands in for a stored policy that no longer parses: access
// fails closed until an admin sets a good one.
const denyAll = "rules:\n  - from: [\"*\"]\n    to: [\"*\"]\n    action: deny\n"

// loadPolicy reads the stored policy (the default when none was set).
func (s *Server) loadPolicy(ctx context.Context) error {
	sp, err := s.store.GetPolicy(ctx)
	if errors.Is(err, store.ErrNotFound) {
		sp = store.StoredPolicy{Text: policy.Default}
	} else if err != nil {
		return fmt.Errorf("coordinator: load the access policy: %w", err)
	}
	p, err := policy.Parse("policy", []byte(sp.Text))
	if err != nil {
		s.log.Error("the stored access policy does not parse; denying all access until an admin sets one with `meshlink policy set FILE`", "err", err)
		p, _ = policy.Parse("deny-all", []byte(denyAll))
	}
	s.policy.Store(&activePolicy{p: p, text: sp.Text, updated: sp.Updated, updatedBy: sp.UpdatedBy})
	return nil
}

func (s *Server) currentPolicy() *activePolicy { return s.policy.Load() }

// PolicyInfo is the policy as the admin socket and the console show it.
type PolicyInfo struct {
	Text      string    `json:"text"`
	Updated   time.Time `json:"updated,omitzero"`
	UpdatedBy string    `json:"updated_by,omitempty"`
	// Default: never set; the allow-all policy of a fresh coordinator.
	Default bool `json:"default,omitempty"`
}

// PolicyChange is the answer to setting a policy: the access it adds and
// takes away among the nodes and services of the mesh now.
type PolicyChange struct {
	Unchanged bool     `json:"unchanged,omitempty"`
	Granted   []string `json:"granted"`
	Revoked   []string `json:"revoked"`
}

// PolicyError is a policy refused: every problem with its line.
type PolicyError struct {
	Problems []policy.Problem
}

func (e *PolicyError) Error() string { return (&policy.Error{Problems: e.Problems}).Error() }

// Policy returns the policy in force.
func (s *Server) Policy() PolicyInfo {
	ap := s.currentPolicy()
	return PolicyInfo{Text: ap.text, Updated: ap.updated, UpdatedBy: ap.updatedBy, Default: ap.updated.IsZero()}
}

// SetPolicy checks text (syntax, references, its tests against the mesh as
// it is) and, if it passes, makes it the policy in force at once: every
// map stream gets its delta, providers close what is no longer allowed.
// file names the text in errors; by is who set it (for the event log).
func (s *Server) SetPolicy(ctx context.Context, file, text, by string) (PolicyChange, error) {
	s.policyMu.Lock()
	defer s.policyMu.Unlock()
	if file == "" {
		file = "policy"
	}
	p, err := policy.Parse(file, []byte(text))
	if err != nil {
		return PolicyChange{}, asPolicyError(err)
	}
	dir, err := s.directory(ctx)
	if err != nil {
		return PolicyChange{}, err
	}
	dir.pol = p
	if err := p.Run(dir); err != nil {
		return PolicyChange{}, asPolicyError(err)
	}
	old := s.currentPolicy()
	diff := dir.diff(old.p, p)
	now := time.Now()
	if err := s.store.SetPolicy(ctx, store.StoredPolicy{Text: text, Updated: now, UpdatedBy: by}); err != nil {
		return PolicyChange{}, err
	}
	s.policy.Store(&activePolicy{p: p, text: text, updated: now, updatedBy: by})
	msg := fmt.Sprintf("%s set the access policy: %d grants, %d revocations", by, len(diff.Granted), len(diff.Revoked))
	if diff.Unchanged {
		msg = fmt.Sprintf("%s set the access policy: no access changed", by)
	}
	s.commit(change{log: "access policy set", attrs: []any{"by", by, "granted", len(diff.Granted), "revoked", len(diff.Revoked)},
		event: store.Event{Kind: store.EventPolicy, Actor: by, Message: msg}})
	return diff, nil
}

func asPolicyError(err error) error {
	var pe *policy.Error
	if errors.As(err, &pe) {
		return &PolicyError{Problems: pe.Problems}
	}
	return err
}

// Explanation says who decides whether a node or user reaches a service.
type Explanation struct {
	From    string `json:"from"`
	Service string `json:"service"`
	Allow   bool   `json:"allow"`
	// Rule is the deciding rule, 1-based; 0 when no rule matched.
	Rule int    `json:"rule"`
	Line int    `json:"line,omitempty"`
	Why  string `json:"why"`
	// Request is the HTTP request explained ("GET /api/x"), if one was.
	Request string `json:"request,omitempty"`
	// Conditional: the deciding rule allows only some requests of the
	// service; its providers decide each one.
	Conditional bool `json:"conditional,omitempty"`
}

// ExplainRequest is an HTTP request to explain: the service's providers
// decide it by method, path and the claims of its token (Claims
// NAME=VALUE, a name given twice is a list; none: no token).
type ExplainRequest struct {
	Method string   `json:"method,omitempty"`
	Path   string   `json:"path,omitempty"`
	Claims []string `json:"claims,omitempty"`
}

// request checks e and turns it into the policy's form.
func (e ExplainRequest) request() (policy.Request, error) {
	req := policy.Request{Method: e.Method, Path: e.Path}
	if req.Method == "" {
		req.Method = http.MethodGet
	}
	if req.Path == "" {
		req.Path = "/"
	}
	if err := wire.ValidMethod(req.Method); err != nil {
		return req, fmt.Errorf("--method: %w", err)
	}
	if !wire.CleanPath(req.Path) {
		return req, fmt.Errorf("--path %q: give a clean absolute path (/api/x)", req.Path)
	}
	if len(e.Claims) > 64 {
		return req, errors.New("--claim: at most 64")
	}
	for _, c := range e.Claims {
		name, val, ok := strings.Cut(c, "=")
		if !ok || name == "" {
			return req, fmt.Errorf("--claim %q: write NAME=VALUE (groups=admin)", c)
		}
		if req.Claims == nil {
			req.Claims = map[string]any{}
		}
		switch old := req.Claims[name].(type) {
		case nil:
			req.Claims[name] = val
		case string:
			req.Claims[name] = []any{old, val}
		case []any:
			req.Claims[name] = append(old, val)
		}
	}
	return req, nil
}

// Explain evaluates the policy in force for from (a node name, or
// user:NAME, tag:NAME, node:NAME) and service.
func (s *Server) Explain(ctx context.Context, from, service string) (Explanation, error) {
	return s.ExplainRequest(ctx, from, service, nil)
}

// ExplainRequest is Explain for one HTTP request (nil: the connection).
func (s *Server) ExplainRequest(ctx context.Context, from, service string, er *ExplainRequest) (Explanation, error) {
	var req policy.Request
	if er != nil {
		var err error
		if req, err = er.request(); err != nil {
			return Explanation{}, err
		}
	}
	dir, err := s.directory(ctx)
	if err != nil {
		return Explanation{}, err
	}
	sel := from
	if !strings.Contains(from, ":") {
		sel = "node:" + from
	}
	pr, err := dir.Principal(sel)
	if err != nil {
		return Explanation{}, err
	}
	dir.pol = s.currentPolicy().p
	if er != nil {
		d := dir.pol.DecideRequest(pr, service, dir.ServiceOwner(service), req)
		return Explanation{From: pr.String(), Service: service, Allow: d.Allow, Rule: d.Rule + 1, Line: d.Line, Why: d.Why, Request: req.String()}, nil
	}
	d := dir.pol.Decide(pr, service, dir.ServiceOwner(service))
	return Explanation{From: pr.String(), Service: service, Allow: d.Allow, Rule: d.Rule + 1, Line: d.Line, Why: d.Why, Conditional: d.Conditional}, nil
}

// directory is the mesh as the policy sees it: principals of nodes and
// users, owners of services. It implements policy.Directory.
type directory struct {
	users    map[int64]store.User
	byName   map[string]store.User
	nodes    []store.Node
	services []store.Service
	provided map[string]bool // services with a provider now
	pol      *policy.Policy  // whose service owners ServiceOwner reports
}

func (s *Server) directory(ctx context.Context) (*directory, error) {
	users, err := s.store.ListUsers(ctx)
	if err != nil {
		return nil, err
	}
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	svcs, err := s.store.ListServices(ctx)
	if err != nil {
		return nil, err
	}
	provs, err := s.store.ListProviders(ctx)
	if err != nil {
		return nil, err
	}
	d := &directory{users: map[int64]store.User{}, byName: map[string]store.User{}, nodes: nodes, services: svcs, provided: map[string]bool{}}
	for _, u := range users {
		d.users[u.ID] = u
		d.byName[u.Username] = u
	}
	for _, p := range provs {
		d.provided[p.Service] = true
	}
	return d, nil
}

// nodePrincipal is what the policy selects node n by: a tagged node is
// owned by its tags, an untagged one by the user who joined it.
func nodePrincipal(n store.Node, users map[int64]store.User) policy.Principal {
	pr := policy.Principal{Node: n.Name, Tags: policyTags(n.Tags)}
	if len(n.Tags) == 0 {
		if u, ok := users[n.OwnerID]; ok {
			pr.User, pr.Admin = u.Username, u.Admin
		}
	}
	return pr
}

func (d *directory) Principal(sel string) (policy.Principal, error) {
	kind, name, _ := strings.Cut(sel, ":")
	switch kind {
	case "user":
		u, ok := d.byName[name]
		if !ok {
			return policy.Principal{User: name}, nil // an OIDC user not seen yet
		}
		return policy.Principal{User: u.Username, Admin: u.Admin}, nil
	case "tag":
		return policy.Principal{Tags: []string{name}}, nil
	case "node":
		for _, n := range d.nodes {
			if n.Name == name {
				return nodePrincipal(n, d.users), nil
			}
		}
		return policy.Principal{}, fmt.Errorf("no node named %q; list them with `meshlink nodes`", name)
	}
	return policy.Principal{}, fmt.Errorf("%q names no node or user: use NODE, user:NAME, tag:NAME or node:NAME", sel)
}

// ServiceOwner implements policy.Directory, for the policy being tested
// (d.pol; the one in force when unset).
func (d *directory) ServiceOwner(service string) string {
	for _, sv := range d.services {
		if sv.Name == service {
			return serviceOwner(d.pol, sv, d.users)
		}
	}
	return ""
}

// serviceOwner is the user who owns sv's name for autogroup:self: the
// first user among its owners when the policy lists them (none when only
// tags or groups own it), else the user of its first provider.
func serviceOwner(p *policy.Policy, sv store.Service, users map[int64]store.User) string {
	if owners := p.ServiceOwners(sv.Name); owners != nil {
		for _, o := range owners {
			if name, ok := strings.CutPrefix(o.S, "user:"); ok {
				return name
			}
		}
		return ""
	}
	return users[sv.OwnerID].Username
}

// diff lists who gains and loses which service, over the nodes and
// provided services of the mesh now.
func (d *directory) diff(old, cur *policy.Policy) PolicyChange {
	c := PolicyChange{Granted: []string{}, Revoked: []string{}}
	prs := make([]policy.Principal, len(d.nodes))
	for i, n := range d.nodes {
		prs[i] = nodePrincipal(n, d.users)
	}
	var names, oldOwners, curOwners []string
	for _, sv := range d.services {
		if d.provided[sv.Name] {
			names = append(names, sv.Name)
			oldOwners = append(oldOwners, serviceOwner(old, sv, d.users))
			curOwners = append(curOwners, serviceOwner(cur, sv, d.users))
		}
	}
	before, after := old.Access(prs, names, oldOwners), cur.Access(prs, names, curOwners)
	for i, pr := range prs {
		for j, name := range names {
			switch was, is := before[j][i], after[j][i]; {
			case is && !was:
				c.Granted = append(c.Granted, fmt.Sprintf("%s may now reach %s", pr, name))
			case was && !is:
				c.Revoked = append(c.Revoked, fmt.Sprintf("%s may no longer reach %s", pr, name))
			}
		}
	}
	sort.Strings(c.Granted)
	sort.Strings(c.Revoked)
	c.Unchanged = len(c.Granted) == 0 && len(c.Revoked) == 0
	return c
}

// Access is the matrix of who may reach which service, for the console.
type Access struct {
	Services []string
	Rows     []AccessRow
}

// AccessRow is one node's line of the matrix.
type AccessRow struct {
	Node    string
	Owner   string
	OwnerID int64
	Allow   []bool // by Access.Services
}

// AccessMatrix evaluates the policy in force for every node and provided
// service; visible limits the rows (nil: all).
func (s *Server) AccessMatrix(ctx context.Context, visible func(store.Node) bool) (Access, error) {
	dir, err := s.directory(ctx)
	if err != nil {
		return Access{}, err
	}
	p := s.currentPolicy().p
	var a Access
	var owners []string
	for _, sv := range dir.services {
		if dir.provided[sv.Name] {
			a.Services = append(a.Services, sv.Name)
			owners = append(owners, serviceOwner(p, sv, dir.users))
		}
	}
	var nodes []store.Node
	var prs []policy.Principal
	for _, n := range dir.nodes {
		if visible == nil || visible(n) {
			nodes = append(nodes, n)
			prs = append(prs, nodePrincipal(n, dir.users))
		}
	}
	allow := p.Access(prs, a.Services, owners)
	for i, n := range nodes {
		row := AccessRow{Node: n.Name, OwnerID: n.OwnerID, Owner: strings.TrimPrefix(prs[i].String(), "node:"+n.Name+" ")}
		row.Owner = strings.Trim(row.Owner, "()")
		for j := range a.Services {
			row.Allow = append(row.Allow, allow[j][i])
		}
		a.Rows = append(a.Rows, row)
	}
	return a, nil
}

// checkProvide applies the policy's services.NAME.owners to node n
// exposing name: refused is the error a user sees; listed says the policy
// decides (the first provider's ownership is then not asked).
func (s *Server) checkProvide(ctx context.Context, n store.Node, name string) (listed bool, refused *apiError) {
	p := s.currentPolicy().p
	if p.ServiceOwners(name) == nil {
		return false, nil
	}
	users, err := s.store.ListUsers(ctx)
	if err != nil {
		return true, storeErr("expose", err)
	}
	byID := map[int64]store.User{}
	for _, u := range users {
		byID[u.ID] = u
	}
	pr := nodePrincipal(n, byID)
	_, ok, why := p.CanProvide(pr, name)
	if ok {
		return true, nil
	}
	s.console.Record(store.Event{Kind: store.EventExposeRefused, Actor: "node " + n.Name, Node: n.Name, OwnerID: n.OwnerID,
		Message: fmt.Sprintf("%s may not provide %s: %s", n.Name, name, why)})
	return true, apiErr(http.StatusForbidden, wire.ErrCodeNotOwner, "service %q: %s, and %s is not among them; choose another name or ask an admin to change the policy", name, why, pr)
}

// checkTags refuses a token whose tags its minter may not give (policy
// tagOwners; admins may give any tag).
func (s *Server) checkTags(ctx context.Context, ownerID int64, tags []string) error {
	if len(tags) == 0 {
		return nil
	}
	p := s.currentPolicy().p
	minter := policy.Principal{}
	if ownerID == 0 {
		minter.Admin = true // the admin socket without --user
	} else {
		users, err := s.store.ListUsers(ctx)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(users, func(u store.User) bool { return u.ID == ownerID })
		if i < 0 {
			return fmt.Errorf("no user %d", ownerID)
		}
		minter.User, minter.Admin = users[i].Username, users[i].Admin
	}
	for _, t := range policyTags(tags) {
		if ok, why := p.CanGiveTag(minter, t); !ok {
			return &TagError{Tag: t, Why: why}
		}
	}
	return nil
}

// TagError refuses a token carrying a tag its minter does not own.
type TagError struct {
	Tag, Why string
}

func (e *TagError) Error() string {
	return fmt.Sprintf("may not give tag:%s: %s (add the minter to tagOwners.%s in the policy, or ask an admin)", e.Tag, e.Why, e.Tag)
}

// policySetRequest is the body of PUT /admin/v1/policy.
type policySetRequest struct {
	File string `json:"file"`
	Text string `json:"text"`
}

type policyExplainRequest struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Request, when set, explains one HTTP request.
	Request *ExplainRequest `json:"request,omitempty"`
}

func (s *Server) adminPolicy(mux *http.ServeMux) {
	mux.HandleFunc("GET "+adminPathPolicy, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Policy())
	})
	mux.HandleFunc("PUT "+adminPathPolicy, func(w http.ResponseWriter, r *http.Request) {
		var req policySetRequest
		if e := decode(w, r, &req, "policy set"); e != nil {
			writeError(w, e)
			return
		}
		c, err := s.SetPolicy(r.Context(), req.File, req.Text, "admin socket")
		var pe *PolicyError
		if errors.As(err, &pe) {
			writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%s", pe.Error()))
			return
		} else if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, c)
	})
	mux.HandleFunc("POST "+adminPathPolicy+"/explain", func(w http.ResponseWriter, r *http.Request) {
		var req policyExplainRequest
		if e := decode(w, r, &req, "policy explain"); e != nil {
			writeError(w, e)
			return
		}
		if err := wire.ValidName(req.To); err != nil {
			writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "--to %q: %v", req.To, err))
			return
		}
		if req.Request != nil {
			if _, err := req.Request.request(); err != nil {
				writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%v", err))
				return
			}
		}
		ex, err := s.ExplainRequest(r.Context(), req.From, req.To, req.Request)
		if err != nil {
			writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "--from: %v", err))
			return
		}
		writeJSON(w, http.StatusOK, ex)
	})
}

// Policy returns the access policy in force.
func (c *AdminClient) Policy(ctx context.Context) (PolicyInfo, error) {
	var pi PolicyInfo
	err := c.api.Do(ctx, http.MethodGet, adminPathPolicy, nil, &pi)
	return pi, err
}

// SetPolicy replaces the access policy with text (file names it in errors).
func (c *AdminClient) SetPolicy(ctx context.Context, file, text string) (PolicyChange, error) {
	var pc PolicyChange
	err := c.api.Do(ctx, http.MethodPut, adminPathPolicy, policySetRequest{File: file, Text: text}, &pc)
	return pc, err
}

// ExplainPolicy says whether from (NODE or user:NAME) may reach service to
// and which rule decides.
func (c *AdminClient) ExplainPolicy(ctx context.Context, from, to string) (Explanation, error) {
	return c.ExplainPolicyRequest(ctx, from, to, nil)
}

// ExplainPolicyRequest is ExplainPolicy for one HTTP request (nil: the
// connection).
func (c *AdminClient) ExplainPolicyRequest(ctx context.Context, from, to string, req *ExplainRequest) (Explanation, error) {
	var ex Explanation
	err := c.api.Do(ctx, http.MethodPost, adminPathPolicy+"/explain", policyExplainRequest{From: from, To: to, Request: req}, &ex)
	return ex, err
}

// policyTags are tags as the policy names them: a token's "tag:ci" and
// "ci" are one tag, ci.
func policyTags(tags []string) []string {
	if len(tags) == 0 {
		return nil
	}
	out := make([]string, len(tags))
	for i, t := range tags {
		out[i] = strings.TrimPrefix(t, "tag:")
	}
	return out
}
