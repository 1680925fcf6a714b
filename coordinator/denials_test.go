package coordinator

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

func deniedEvents(t *testing.T, s *Server) []store.Event {
	t.Helper()
	evs, err := s.Store().ListEvents(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []store.Event
	for _, e := range evs {
		if e.Kind == store.EventDenied {
			out = append(out, e)
		}
	}
	return out
}

// TestStatsDenials: a provider's reported denials become one console event
// per pair and minute; a report with more than wire.MaxDenials is refused
// whole with a log line, and entries naming unknown nodes or services, or
// carrying nonsense, are ignored with a log line, storing nothing.
func TestStatsDenials(t *testing.T) {
	var logs tstest.Buffer
	s := startServer(t, t.TempDir(), func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	api := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	rp, cp := register(t, api, jt, "prov")
	rc, cc := register(t, api, jt, "cons")
	if st, body := call(t, api, s.URL(), wire.PathServices, &cp, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "db", Port: 5432}); st != 200 {
		t.Fatalf("expose: %d %s", st, body)
	}
	first := time.Now().Add(-time.Second)
	report := func(ds ...wire.Denial) (int, []byte) {
		return call(t, api, s.URL(), wire.PathStats, &cp, wire.StatsReport{Version: wire.ProtocolVersion, Denials: ds})
	}

	t.Run("10,000 denials are refused whole", func(t *testing.T) {
		// Without times, so that the body stays under the API's size
		// limit and the count is what refuses it.
		many := make([]wire.Denial, 10000)
		for i := range many {
			many[i] = wire.Denial{Service: "db", Node: rc.Node.ID, Count: int64(i + 1)}
		}
		st, body := report(many...)
		if st != 400 || errCode(t, body) != wire.ErrCodeBadRequest || !strings.Contains(string(body), "10000 denials, more than 64") {
			t.Fatalf("a report with 10,000 denials: %d %s; want 400 saying how many are allowed", st, body)
		}
		if !strings.Contains(logs.String(), "refused a stats report with too many denials") {
			t.Fatalf("no log line for the refused report:\n%s", logs.String())
		}
		if n := s.denials.len(); n != 0 || len(deniedEvents(t, s)) != 0 {
			t.Fatalf("after a refused report: %d pairs tracked, events %v", n, deniedEvents(t, s))
		}
	})

	t.Run("unknown nodes, services and nonsense are ignored", func(t *testing.T) {
		st, body := report(
			wire.Denial{Service: "db", Node: 999999, Count: 7, First: first, Last: first},
			wire.Denial{Service: "nope", Node: rc.Node.ID, Count: 7, First: first, Last: first},
			wire.Denial{Service: "db", Node: rp.Node.ID, Count: 7, First: first, Last: first}, // itself
			wire.Denial{Service: "db", Node: rc.Node.ID, Count: -3, First: first, Last: first},
			wire.Denial{Service: "db", Node: rc.Node.ID, Count: 1 << 50, First: first, Last: first},
			wire.Denial{Service: "db", Node: rc.Node.ID, Count: 2, First: first, Last: first.Add(-time.Hour)},
			wire.Denial{Service: strings.Repeat("x", 5000), Node: rc.Node.ID, Count: 1, First: first, Last: first},
		)
		if st != 200 {
			t.Fatalf("report: %d %s", st, body)
		}
		if !strings.Contains(logs.String(), "ignored denials in a stats report") || !strings.Contains(logs.String(), "ignored=7") {
			t.Fatalf("no log line for the ignored denials:\n%s", logs.String())
		}
		if n := s.denials.len(); n != 0 || len(deniedEvents(t, s)) != 0 {
			t.Fatalf("after a report of nonsense: %d pairs tracked, events %v", n, deniedEvents(t, s))
		}
	})

	t.Run("one event per pair and minute, with the count", func(t *testing.T) {
		// The event names what in the policy denies it. cons provides
		// cache, which prov may reach: they are peers, so cons's packets
		// reach prov, which refuses them.
		if st, body := call(t, api, s.URL(), wire.PathServices, &cc, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "cache", Port: 6379}); st != 200 {
			t.Fatalf("expose cache: %d %s", st, body)
		}
		if _, err := s.SetPolicy(context.Background(), "p.yaml", "rules:\n  - from: [node:prov]\n    to: [\"*\"]\n", "test"); err != nil {
			t.Fatal(err)
		}
		valid := wire.Denial{Service: "db", Node: rc.Node.ID, Count: 5, First: first, Last: first}
		for range 3 { // the agent reports the same totals again and again
			if st, body := report(valid); st != 200 {
				t.Fatalf("report: %d %s", st, body)
			}
		}
		evs := deniedEvents(t, s)
		if len(evs) != 1 || evs[0].Message != "prov refused 5 connections from cons to db: no rule lets node:cons (user:admin) reach db: denied by default" ||
			evs[0].Node != "cons" || evs[0].Actor != "node prov" {
			t.Fatalf("events %+v; want one for the 5 denials", evs)
		}
		// The console's event log shows it like the others.
		addUser(t, s, "root", "root-password-1", true)
		br := newBrowser(t, s)
		br.login("root", "root-password-1")
		if _, page := br.get("/console/log"); !strings.Contains(page, `<span class="pill ev-denied">denied</span>`) || !strings.Contains(page, "prov refused 5 connections from cons to db") {
			t.Fatalf("the event log page lacks the denied event:\n%s", page)
		}
		valid.Count, valid.Last = 55, first.Add(time.Second)
		if st, body := report(valid); st != 200 {
			t.Fatalf("report: %d %s", st, body)
		}
		if evs := deniedEvents(t, s); len(evs) != 1 {
			t.Fatalf("a second event within the minute: %+v", evs)
		}
		// The window ends: the 50 since become one event.
		pending := s.denials.flush(time.Now().Add(denialWindow))
		if len(pending) != 1 || !strings.Contains(pending[0].Message, "refused 50 connections") {
			t.Fatalf("at the end of the window: %+v; want one event for the 50 since", pending)
		}
	})
}

// TestDenialEventsWindow drives the coalescing on a clock of its own.
func TestDenialEventsWindow(t *testing.T) {
	var d denialEvents
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	p := denialPair{provider: 1, source: 2, service: "db"}
	names := denialNames{provider: "prov", source: "cons"}
	series := t0.Add(-time.Minute)
	add := func(count int64, first, now time.Time) (string, int64) {
		ev, record, full, n := d.add(p, wire.Denial{Service: "db", Node: 2, Count: count, First: first, Last: now}, names, now)
		if full {
			t.Fatal("table full")
		}
		if !record {
			return "", n
		}
		return ev.Message, n
	}
	if msg, n := add(1, series, t0); !strings.Contains(msg, "refused 1 connection from") || n != 1 {
		t.Fatalf("first denial: %q, %d new", msg, n)
	}
	if msg, n := add(40, series, t0.Add(30*time.Second)); msg != "" || n != 39 {
		t.Fatalf("within the window: %q, %d new", msg, n)
	}
	if evs := d.flush(t0.Add(59 * time.Second)); len(evs) != 0 {
		t.Fatalf("flushed before the window ended: %+v", evs)
	}
	// A new series (the agent forgot a quiet pair, or restarted) counts
	// from its own start; the window has passed, so it is recorded with
	// what was pending.
	if msg, n := add(3, t0.Add(50*time.Second), t0.Add(61*time.Second)); !strings.Contains(msg, "refused 42 connections") || n != 3 {
		t.Fatalf("new series after the window: %q, %d new", msg, n)
	}
	if evs := d.flush(t0.Add(3 * time.Minute)); len(evs) != 0 {
		t.Fatalf("nothing pending, yet flushed %+v", evs)
	}
	if d.flush(t0.Add(time.Hour)); d.len() != 0 {
		t.Fatalf("a pair quiet for an hour is still tracked")
	}
}

// TestDenialTableBounded: the table holds at most maxDenialPairs pairs; a
// new one beyond is dropped until quiet pairs are forgotten.
func TestDenialTableBounded(t *testing.T) {
	var d denialEvents
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	dn := wire.Denial{Service: "db", Count: 1, First: t0, Last: t0}
	// Many providers, maxDenialPairsPerProvider pairs each.
	for i := range maxDenialPairs {
		prov := wire.NodeID(1 + i/maxDenialPairsPerProvider)
		if _, _, full, _ := d.add(denialPair{provider: prov, source: wire.NodeID(1 << 20), service: fmt.Sprint("s", i)}, dn, denialNames{}, t0); full {
			t.Fatalf("full after %d pairs", i)
		}
	}
	if _, _, full, _ := d.add(denialPair{provider: 1 << 30, source: 1 << 40, service: "db"}, dn, denialNames{}, t0); !full || d.len() != maxDenialPairs {
		t.Fatalf("pair %d: full %v, %d tracked", maxDenialPairs+1, full, d.len())
	}
	later := t0.Add(denialKeep)
	if _, record, full, _ := d.add(denialPair{provider: 1 << 30, source: 1 << 40, service: "db"}, dn, denialNames{}, later); full || !record || d.len() != 1 {
		t.Fatalf("after the others went quiet: full %v, recorded %v, %d tracked", full, record, d.len())
	}
}

// TestDenialTableShared: one provider reporting denials for every pair it
// can name (its services times its peers; the counts are its word) takes
// at most maxDenialPairsPerProvider of the table, so another provider's
// real denials are still recorded.
func TestDenialTableShared(t *testing.T) {
	var d denialEvents
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	dn := wire.Denial{Service: "db", Count: 1, First: t0, Last: t0}
	for i := range maxDenialPairs {
		d.add(denialPair{provider: 1, source: wire.NodeID(i + 2), service: "db"}, dn, denialNames{}, t0)
	}
	if n := d.len(); n != maxDenialPairsPerProvider {
		t.Errorf("one provider's %d pairs: %d tracked, want %d", maxDenialPairs, n, maxDenialPairsPerProvider)
	}
	if _, record, full, _ := d.add(denialPair{provider: 2, source: 3, service: "web"}, dn, denialNames{}, t0); full || !record {
		t.Fatalf("another provider's denial after the flood: full %v, recorded %v", full, record)
	}
}

// FuzzStatsBody: whatever a node reports, the coordinator answers 2xx or
// 4xx and tracks at most the bound. The fuzzing node provides "db" and the
// mesh has one other node, so valid denials reach the table.
func FuzzStatsBody(f *testing.F) {
	s, h, cr := fuzzCoordinator(f)
	ctx := context.Background()
	if _, err := s.store.RegisterNode(ctx, store.Registration{TokenID: "fuzz", TokenSecret: "fuzz-secret-0123456789", Name: "other",
		Key: key.NewPrivate().Public(), SecretHash: store.HashSecret("other-secret")}); err != nil {
		f.Fatal(err)
	}
	if _, err := s.store.ExposeService(ctx, "db", cr.ID, 5432); err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{
		`{"version":7,"denials":[{"service":"db","node":2,"count":5,"first":"2026-12-01T00:00:00Z","last":"2026-12-01T00:00:01Z"}]}`,
		`{"version":7,"denials":[{"service":"fuzzer","node":1,"count":1}]}`,
		`{"version":7,"denials":[{"count":-1},{"count":9223372036854775807}]}`,
		`{"version":7,"denials":null}`, `{"version":7,"denials":{}}`,
		`{"version":7,"services":[{"name":"x","role":"provider","denied":3}]}`,
		`{"version":13,"http":[{"service":"fuzzer","role":"provider","peer":2,"requests":1,"buckets":[1,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}`,
		`{"version":13,"http":[{"service":"x","role":"consumer","peer":1,"requests":-1,"errors":-2,"buckets":[-1]}]}`,
		`{"version":13,"http":[{"service":"x","role":"?","requests":9223372036854775807,"buckets":[9223372036854775807,1,0,0,0,0,0,0,0,0,0,0,0,0]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Add([]byte(fmt.Sprintf(`{"version":7,"denials":[%s{}]}`, strings.Repeat(`{"service":"db","node":2,"count":1},`, 100))))
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := fuzzPost(h, cr, wire.PathStats, body)
		if rec.Code >= 500 || rec.Code >= 300 && rec.Code < 400 {
			t.Fatalf("stats(%q) = %d %s", body, rec.Code, rec.Body)
		}
		if n := s.denials.len(); n > maxDenialPairs {
			t.Fatalf("%d pairs tracked, more than %d", n, maxDenialPairs)
		}
	})
}

// TestDenialsNameOnlyPeers: a provider can only be refused connections by
// the peers of its map (no other node's packets reach it), so a report
// naming another node is forged. Bob's node, providing x, reports that
// db1 (carol's tagged node, which the filtered map hides from it) was
// refused: the event would tell bob, in his own event log, db1's name,
// tags and the rule that decides (enumerating node IDs, the whole mesh).
func TestDenialsNameOnlyPeers(t *testing.T) {
	m := newPolicyMesh(t)
	if st, body := expose(t, m.c, m.s.URL(), m.bobs, "x", 7000); st != 200 {
		t.Fatalf("bob exposes x: %d %s", st, body)
	}
	first := time.Now().Add(-time.Second)
	report := func(from creds) {
		t.Helper()
		st, body := call(t, m.c, m.s.URL(), wire.PathStats, &m.bobs, wire.StatsReport{Version: wire.ProtocolVersion,
			Denials: []wire.Denial{{Service: "x", Node: from.ID, Count: 1, First: first, Last: first}}})
		if st != 200 {
			t.Fatalf("report: %d %s", st, body)
		}
	}
	report(m.db1)
	for _, e := range deniedEvents(t, m.s) {
		t.Errorf("a denial naming a node that is no peer of the provider was recorded: %q", e.Message)
	}
	// web1 (alice, dev: web only) is bob's peer and may not reach x: a
	// real denial, recorded.
	report(m.web1)
	if evs := deniedEvents(t, m.s); len(evs) != 1 || !strings.Contains(evs[0].Message, "bobs refused 1 connection from web1 to x") {
		t.Errorf("the denial of a peer: events %+v", evs)
	}
}

// TestStatsPeersNameOnlyPeers: a node's stats report lists its paths to
// peers by node ID, and the console names them on the node's page, which
// its owner sees. Bob's node lists db1, which its filtered map hides:
// bob's console must not name it (enumerating IDs would list the mesh).
func TestStatsPeersNameOnlyPeers(t *testing.T) {
	m := newPolicyMesh(t)
	ctx := context.Background()
	bob, err := m.s.store.GetUser(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	h, _ := bcrypt.GenerateFromPassword([]byte("bob-password-1"), bcrypt.MinCost)
	if err := m.s.store.SetPassword(ctx, bob.ID, string(h), nil); err != nil {
		t.Fatal(err)
	}
	st, body := call(t, m.c, m.s.URL(), wire.PathStats, &m.bobs, wire.StatsReport{Version: wire.ProtocolVersion, Peers: []wire.PeerStats{
		{Node: m.db1.ID, Path: "direct", DirectBytes: 1}, {Node: m.web1.ID, Path: "direct", DirectBytes: 1}}})
	if st != 200 {
		t.Fatalf("report: %d %s", st, body)
	}
	br := newBrowser(t, m.s)
	br.login("bob", "bob-password-1")
	snap := br.snapshot()
	var paths []string
	for _, n := range snap.Nodes {
		for _, p := range n.Paths {
			paths = append(paths, n.Name+"->"+p.PeerName)
		}
	}
	if slices.Contains(paths, "bobs->db1") || !slices.Contains(paths, "bobs->web1") {
		t.Errorf("bob's console shows the paths %v; want bobs->web1 (a peer) and not bobs->db1 (hidden from bob's map)", paths)
	}
}
