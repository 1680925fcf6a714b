package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

const threeUsersPolicy = `groups:
  dev: [user:alice, user:bob]
tagOwners:
  db: [user:carol]
services:
  db:
    owners: [tag:db]
rules:
  - from: [group:dev]
    to: [web]
  - from: [user:carol]
    to: ["*"]
tests:
  - from: user:bob
    allow: [web]
    deny: [db]
`

// policyMesh is a coordinator with three members (alice, bob, carol), a
// node of each, alice's web and a db node tagged db by carol.
type policyMesh struct {
	s                         *Server
	c                         *http.Client
	web1, bobs, carols, db1   creds
	webSt, bobSt, carSt, dbSt *stream
}

func newPolicyMesh(t *testing.T) *policyMesh {
	t.Helper()
	ctx := context.Background()
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	ids := map[string]int64{}
	for _, name := range []string{"alice", "bob", "carol"} {
		u, err := s.Store().CreateUser(ctx, store.User{Username: name, PasswordHash: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = u.ID
	}
	m := &policyMesh{s: s, c: c}
	_, m.web1 = register(t, c, mustToken(t, s, TokenOptions{Owner: ids["alice"]}), "web1")
	_, m.bobs = register(t, c, mustToken(t, s, TokenOptions{Owner: ids["bob"]}), "bobs")
	_, m.carols = register(t, c, mustToken(t, s, TokenOptions{Owner: ids["carol"]}), "carols")
	// Before any policy names tag db, only an admin may give it.
	if _, err := s.CreateToken(ctx, TokenOptions{Owner: ids["carol"], Tags: []string{"db"}}); err == nil || !strings.Contains(err.Error(), "only an admin may give it") {
		t.Fatalf("carol's db token under the default policy: %v", err)
	}
	if _, err := s.SetPolicy(ctx, "p.yaml", threeUsersPolicy, "test"); err != nil {
		t.Fatalf("set policy: %v", err)
	}
	// Now tagOwners lets carol give tag db; bob may not.
	if _, err := s.CreateToken(ctx, TokenOptions{Owner: ids["bob"], Tags: []string{"db"}}); err == nil || !strings.Contains(err.Error(), "tagOwners lets only user:carol give tag:db") {
		t.Fatalf("bob minting a db token: %v, want refused naming carol", err)
	}
	_, m.db1 = register(t, c, mustToken(t, s, TokenOptions{Owner: ids["carol"], Tags: []string{"db"}}), "db1")
	if st, body := expose(t, c, s.URL(), m.web1, "web", 8000); st != 200 {
		t.Fatalf("alice exposes web: %d %s", st, body)
	}
	if st, body := expose(t, c, s.URL(), m.db1, "db", 5432); st != 200 {
		t.Fatalf("the db node exposes db: %d %s", st, body)
	}
	m.webSt, m.bobSt = openMap(t, c, s.URL(), m.web1), openMap(t, c, s.URL(), m.bobs)
	m.carSt, m.dbSt = openMap(t, c, s.URL(), m.carols), openMap(t, c, s.URL(), m.db1)
	return m
}

func peerNames(nm wire.NetworkMap) []string {
	var out []string
	for _, p := range nm.Peers {
		out = append(out, p.Name)
	}
	slices.Sort(out)
	return out
}

func serviceNames(nm wire.NetworkMap) []string {
	var out []string
	for _, sv := range nm.Services {
		out = append(out, sv.Name)
	}
	slices.Sort(out)
	return out
}

func allowedOf(nm wire.NetworkMap, svc string) []string {
	for _, sv := range nm.Services {
		if sv.Name == svc {
			return sv.AllowedNodes
		}
	}
	return nil
}

func idStr(cr creds) string { return strconv.FormatUint(uint64(cr.ID), 10) }

// TestPolicyFiltersMaps: each node learns only the services it may reach
// or provides and the peers on the other end of them; a provider's map
// says exactly who may connect; a change reaches every stream at once.
func TestPolicyFiltersMaps(t *testing.T) {
	m := newPolicyMesh(t)
	// Each stream's map as its agent holds it: every message applied in
	// turn, from its full map on.
	held := map[*stream]*wire.NetworkMap{}
	want := func(st *stream, who string, peers, svcs []string) wire.NetworkMap {
		t.Helper()
		if held[st] == nil {
			held[st] = &wire.NetworkMap{}
		}
		nm := held[st]
		if slices.Equal(peerNames(*nm), peers) && slices.Equal(serviceNames(*nm), svcs) {
			return *nm
		}
		st.next(t, 20*time.Second, who+"'s map", func(m wire.MapResponse) bool {
			nm.Apply(&m)
			return slices.Equal(peerNames(*nm), peers) && slices.Equal(serviceNames(*nm), svcs)
		})
		return *nm
	}
	bob := want(m.bobSt, "bob", []string{"web1"}, []string{"web"})
	if got := allowedOf(bob, "web"); !slices.Equal(got, []string{idStr(m.bobs)}) {
		t.Errorf("bob's map names %v as allowed to web; a consumer learns no other consumer", got)
	}
	web := want(m.webSt, "web1", []string{"bobs", "carols"}, []string{"web"})
	if got, exp := allowedOf(web, "web"), []string{idStr(m.web1), idStr(m.bobs), idStr(m.carols)}; !slices.Equal(got, exp) {
		t.Errorf("web1 (the provider) enforces %v, want %v", got, exp)
	}
	db := want(m.dbSt, "db1", []string{"carols"}, []string{"db"})
	if got := allowedOf(db, "db"); !slices.Equal(got, []string{idStr(m.carols)}) {
		t.Errorf("db1 enforces %v, want only carols", got)
	}
	want(m.carSt, "carol", []string{"db1", "web1"}, []string{"db", "web"})

	// Bob leaves the dev group: his map loses web and web1, web1's allow
	// table loses him.
	start := time.Now()
	pc, err := m.s.SetPolicy(context.Background(), "p.yaml", strings.Replace(threeUsersPolicy, "[user:alice, user:bob]", "[user:alice]", 1)+"", "test")
	if err == nil {
		t.Fatal("a policy whose own test fails (bob must reach web) was accepted")
	}
	var pe *PolicyError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "p.yaml:15: test 1 failed: user:bob to web is denied") {
		t.Fatalf("failing test refused with %v", err)
	}
	noBob := strings.Replace(strings.Replace(threeUsersPolicy, "[user:alice, user:bob]", "[user:alice]", 1), "allow: [web]\n    deny: [db]", "deny: [web, db]", 1)
	pc, err = m.s.SetPolicy(context.Background(), "p.yaml", noBob, "test")
	if err != nil {
		t.Fatal(err)
	}
	if len(pc.Revoked) != 1 || pc.Revoked[0] != "node:bobs (user:bob) may no longer reach web" || len(pc.Granted) != 0 {
		t.Errorf("change = %+v", pc)
	}
	want(m.bobSt, "bob after the change", nil, nil)
	t.Logf("the policy change reached bob's map stream in %v", time.Since(start))
	web = want(m.webSt, "web1 after the change", []string{"carols"}, []string{"web"})
	if got := allowedOf(web, "web"); slices.Contains(got, idStr(m.bobs)) {
		t.Errorf("web1 still lets bob in: %v", got)
	}

	// Explain says which rule decides.
	ex, err := m.s.Explain(context.Background(), "carols", "db")
	if err != nil || !ex.Allow || ex.Rule != 2 || !strings.Contains(ex.Why, "belongs to user:carol") {
		t.Errorf("explain carols → db = %+v, %v", ex, err)
	}
	ex, err = m.s.Explain(context.Background(), "bobs", "web")
	if err != nil || ex.Allow || ex.Rule != 0 || !strings.Contains(ex.Why, "denied by default") {
		t.Errorf("explain bobs → web = %+v, %v", ex, err)
	}
	if _, err := m.s.Explain(context.Background(), "nobody", "web"); err == nil || !strings.Contains(err.Error(), `no node named "nobody"`) {
		t.Errorf("explain for a missing node: %v", err)
	}
}

// TestPolicyServiceOwners: services.db.owners decides who provides db
// (tag:db), whoever joined the node; a member's untagged node is refused
// with the policy's reason.
func TestPolicyServiceOwners(t *testing.T) {
	m := newPolicyMesh(t)
	st, body := expose(t, m.c, m.s.URL(), m.bobs, "db", 5432)
	if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeNotOwner {
		t.Fatalf("bob's node exposing db: %d %s, want 403 not_owner", st, body)
	}
	var e wire.Error
	json.Unmarshal(body, &e)
	if want := `service "db": the policy lets only tag:db provide db, and node:bobs (user:bob) is not among them`; !strings.HasPrefix(e.Message, want) {
		t.Errorf("refusal %q\nwant it to start %q", e.Message, want)
	}
	// Carol's own untagged node is not tag:db either.
	if st, _ := expose(t, m.c, m.s.URL(), m.carols, "db", 5432); st != http.StatusForbidden {
		t.Errorf("carol's untagged node exposing db: %d, want 403", st)
	}
}

// TestPolicyBadInput: a policy with mistakes is refused with file, line
// and reason, and the policy in force does not change.
func TestPolicyBadInput(t *testing.T) {
	s := startServer(t, t.TempDir())
	ctx := context.Background()
	before := s.Policy()
	if !before.Default || !strings.Contains(before.Text, `from: ["*"]`) {
		t.Fatalf("a fresh coordinator's policy: %+v", before)
	}
	for _, tc := range []struct{ text, want string }{
		{"rules:\n  - from: [group:ops]\n    to: [web]\n", `bad.yaml:2: "group:ops": no group "ops" is defined under groups`},
		{"rules: [\n", "bad.yaml:"},
		{"rulez: []\n", `bad.yaml:1: unknown field "rulez"`},
		{"tests:\n  - from: node:ghost\n    allow: [web]\n", `bad.yaml:2: test 1: no node named "ghost"`},
	} {
		_, err := s.SetPolicy(ctx, "bad.yaml", tc.text, "test")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SetPolicy(%q) = %v, want %q", tc.text, err, tc.want)
		}
	}
	if after := s.Policy(); after != before {
		t.Errorf("the policy changed: %+v", after)
	}
	// And through the admin socket, as the CLI sees it.
	_, err := NewAdminClient(s.cfg.DataDir).SetPolicy(ctx, "bad.yaml", "rules:\n  - from: [user:]\n    to: [web]\n")
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wire.ErrCodeBadRequest || !strings.Contains(we.Message, `bad.yaml:2: "user:": a user name is 1 to 128 characters`) {
		t.Errorf("admin socket: %v", err)
	}
}

// TestPolicySurvivesRestart: the policy is stored.
func TestPolicySurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	if _, err := s.SetPolicy(context.Background(), "p.yaml", "rules:\n  - from: [autogroup:admin]\n    to: [\"*\"]\n", "test"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2 := startServer(t, dir)
	if p := s2.Policy(); p.Default || !strings.Contains(p.Text, "autogroup:admin") || p.UpdatedBy != "test" {
		t.Fatalf("after a restart: %+v", p)
	}
}

// TestPolicyAutogroupSelf: autogroup:self lets a user reach the services
// they own; a service the policy gives to a tag belongs to no user, so the
// person who joined its tagged provider gains nothing by it.
func TestPolicyAutogroupSelf(t *testing.T) {
	m := newPolicyMesh(t)
	ctx := context.Background()
	self := "tagOwners:\n  db: [user:carol]\nservices:\n  db:\n    owners: [tag:db]\nrules:\n  - from: [autogroup:self]\n    to: [\"*\"]\n"
	if _, err := m.s.SetPolicy(ctx, "self.yaml", self, "test"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		from, to string
		allow    bool
	}{
		{"web1", "web", true},   // alice's node, alice's web
		{"bobs", "web", false},  // bob owns no web
		{"carols", "db", false}, // db belongs to tag:db, not to carol who joined db1
		{"db1", "db", false},    // a tagged node has no self
	} {
		ex, err := m.s.Explain(ctx, tc.from, tc.to)
		if err != nil || ex.Allow != tc.allow {
			t.Errorf("%s → %s: %+v %v, want allow=%v", tc.from, tc.to, ex, err, tc.allow)
		}
	}
}

// TestPolicyOwnersApplyToExistingProviders: services.NAME.owners says who
// may provide NAME, and that holds for a node that exposed it before the
// policy named its owners. Bob's node takes the name pay first; the admin
// then gives pay to alice: bob's node must no longer be offered to pay's
// consumers (who would send it their traffic), nor learn who they are.
func TestPolicyOwnersApplyToExistingProviders(t *testing.T) {
	m := newPolicyMesh(t)
	if st, body := expose(t, m.c, m.s.URL(), m.bobs, "pay", 9000); st != 200 {
		t.Fatalf("bob exposes pay (no owners listed yet): %d %s", st, body)
	}
	var nm wire.NetworkMap // carol's, applied delta by delta
	carol := func(what string, have func() bool) {
		t.Helper()
		m.carSt.next(t, 20*time.Second, what, func(r wire.MapResponse) bool { nm.Apply(&r); return have() })
	}
	carol("carol's map with pay", func() bool { return slices.Contains(serviceNames(nm), "pay") })
	pol := strings.Replace(threeUsersPolicy, "services:\n", "services:\n  pay:\n    owners: [user:alice]\n", 1)
	if _, err := m.s.SetPolicy(context.Background(), "p.yaml", pol, "test"); err != nil {
		t.Fatal(err)
	}
	if st, _ := expose(t, m.c, m.s.URL(), m.web1, "pay", 9000); st != 200 {
		t.Fatalf("alice's node exposes pay: %d", st)
	}
	providers := func(nm wire.NetworkMap) []wire.NodeID {
		for _, sv := range nm.Services {
			if sv.Name == "pay" {
				var ids []wire.NodeID
				for _, p := range sv.Providers {
					ids = append(ids, p.Node)
				}
				return ids
			}
		}
		return nil
	}
	// Carol may reach everything: her map must offer pay from web1 alone.
	carol("carol's map with alice's pay", func() bool { return slices.Contains(providers(nm), m.web1.ID) })
	if got := providers(nm); !slices.Equal(got, []wire.NodeID{m.web1.ID}) {
		t.Errorf("carol's map offers pay from %v (peers %v); the policy lets only alice's nodes (%d) provide it, not bob's (%d)", got, peerNames(nm), m.web1.ID, m.bobs.ID)
	}
	if slices.Contains(peerNames(nm), "bobs") {
		t.Errorf("carol's map lists bobs as a peer, though bob provides nothing she may use: %v", peerNames(nm))
	}
}

// TestPolicyTagOwnersAtJoin: tagOwners is checked when a tagged token is
// used, not only when it is minted. Carol mints a reusable db token while
// she owns tag db; the admin then gives tag db to alice alone. Carol's
// token must no longer join nodes as tag:db (which would let them provide
// db and reach what tag:db reaches).
func TestPolicyTagOwnersAtJoin(t *testing.T) {
	m := newPolicyMesh(t)
	ctx := context.Background()
	carol, err := m.s.store.GetUser(ctx, "carol")
	if err != nil {
		t.Fatal(err)
	}
	tok, err := m.s.CreateToken(ctx, TokenOptions{Owner: carol.ID, Reusable: true, Tags: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	jt, err := wire.ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	register(t, m.c, jt, "db2") // she owns tag db now
	pol := strings.Replace(threeUsersPolicy, "  db: [user:carol]\n", "  db: [user:alice]\n", 1)
	if _, err := m.s.SetPolicy(ctx, "p.yaml", pol, "test"); err != nil {
		t.Fatal(err)
	}
	st, body := call(t, m.c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: jt.ID, TokenSecret: jt.Secret, Name: "db3", NodeKey: newKey(t), ListenPort: 41641,
	})
	if st == http.StatusOK {
		t.Fatalf("carol's db token joined db3 as tag:db after the policy gave tag db to alice alone: %s", body)
	}
	if st != http.StatusForbidden || !strings.Contains(string(body), "tagOwners lets only user:alice give tag:db") {
		t.Errorf("refusal %d %s; want 403 naming who may give the tag", st, body)
	}
}

// TestPolicyChangeWakesOnlyItsStreams: under a policy, a change wakes only
// the map streams whose maps it changes; the others are recorded as
// having it (meshlink_coordinator_map_stream_wakeups_total{result=
// "skipped"}) and a later change that does concern them still reaches
// them whole, as a delta from the map they hold.
func TestPolicyChangeWakesOnlyItsStreams(t *testing.T) {
	m := newPolicyMesh(t)
	held := map[*stream]*wire.NetworkMap{}
	portOf := func(nm *wire.NetworkMap, svc string) uint16 {
		for _, sv := range nm.Services {
			if sv.Name == svc && len(sv.Providers) > 0 {
				return sv.Providers[0].Port
			}
		}
		return 0
	}
	waitPort := func(st *stream, who, svc string, port uint16) {
		t.Helper()
		if held[st] == nil {
			held[st] = &wire.NetworkMap{}
		}
		nm := held[st]
		if portOf(nm, svc) == port {
			return
		}
		st.next(t, 20*time.Second, fmt.Sprintf("%s's map with %s on port %d", who, svc, port), func(msg wire.MapResponse) bool {
			nm.Apply(&msg)
			return portOf(nm, svc) == port
		})
	}
	waitPort(m.bobSt, "bob", "web", 8000)
	waitPort(m.webSt, "web1", "web", 8000)
	waitPort(m.carSt, "carol", "db", 5432)
	waitPort(m.dbSt, "db1", "db", 5432)
	skipped, woken := m.s.metrics.wakeups.WithLabelValues("skipped"), m.s.metrics.wakeups.WithLabelValues("woken")
	// Every wake-up so far (the streams opening) swept, none pending: the
	// counters move from here on only for the change below.
	swept := func() {
		t.Helper()
		tstest.WaitForNil(t, 10*time.Second, "the wake-ups swept", func() error {
			h := &m.s.hub
			h.mu.Lock()
			idle := h.pending == nil && h.wokeGen == h.gen
			gen := h.wokeGen
			h.mu.Unlock()
			if !idle || m.s.sweptGen.Load() != gen {
				return errors.New("a wake-up pending or being swept")
			}
			return nil
		})
	}
	swept()
	before, wokenBefore := counterValue(t, skipped), counterValue(t, woken)

	// db moves: carol and db1 see db, bob and web1 do not.
	if st, body := expose(t, m.c, m.s.URL(), m.db1, "db", 5433); st != 200 {
		t.Fatalf("db1 re-exposes db: %d %s", st, body)
	}
	waitPort(m.carSt, "carol", "db", 5433)
	waitPort(m.dbSt, "db1", "db", 5433)
	swept()
	// Each sweep looks at the four streams once; in each, bob's and
	// web1's have nothing (and no stream is busy sending).
	ds, dw := counterValue(t, skipped)-before, counterValue(t, woken)-wokenBefore
	if sweeps := (ds + dw) / 4; ds < 1 || ds < 2*sweeps || dw > 2*sweeps {
		t.Fatalf("since db moved: %v streams skipped, %v woken (%v sweeps of 4); want bob's and web1's skipped, only carol's and db1's woken", ds, dw, sweeps)
	}

	// web moves: bob's stream, skipped before, gets it, and the map it
	// holds is the one a fresh stream gets.
	if st, body := expose(t, m.c, m.s.URL(), m.web1, "web", 8001); st != 200 {
		t.Fatalf("web1 re-exposes web: %d %s", st, body)
	}
	waitPort(m.bobSt, "bob", "web", 8001)
	fresh := openMap(t, m.c, m.s.URL(), m.bobs)
	first := fresh.next(t, 20*time.Second, "bob's full map", func(msg wire.MapResponse) bool { return msg.Full != nil })
	if got, want := mapSummary(*held[m.bobSt]), mapSummary(*first.Full); got != want {
		t.Fatalf("bob's map, built from deltas:\n%s\nwant what a fresh stream gets:\n%s", got, want)
	}
}

// mapSummary is what of a map a policy decides: its peers, services,
// providers' ports and allowed nodes.
func mapSummary(nm wire.NetworkMap) string {
	var b strings.Builder
	fmt.Fprintf(&b, "peers %v\n", peerNames(nm))
	svcs := slices.Clone(nm.Services)
	slices.SortFunc(svcs, func(a, b wire.Service) int { return strings.Compare(a.Name, b.Name) })
	for _, sv := range svcs {
		var ports []uint16
		for _, p := range sv.Providers {
			ports = append(ports, p.Port)
		}
		fmt.Fprintf(&b, "service %s ports %v allowed %v\n", sv.Name, ports, sv.AllowedNodes)
	}
	return b.String()
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
