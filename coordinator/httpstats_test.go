package coordinator

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/wire"
)

func httpEdge(service string, role wire.ServiceRole, peer wire.NodeID, n int64) wire.HTTPStats {
	h := wire.HTTPStats{Service: service, Role: role, Peer: peer, Requests: n, Buckets: make([]int64, wire.HTTPBuckets)}
	h.Buckets[3] = n
	return h
}

// TestStatsHTTPOnlyOwnEdges is an attack test: a node's HTTP figures show
// in the console only for edges it can have carried. Bob's node may reach
// web (alice's web1) and nothing else; it reports, besides its real edge,
// requests to db at db1 (not its peer: the filtered map hides it), to web
// at carols (no provider of web) and as a provider of web (it provides
// nothing). Only the real edge shows. Reports past the bound or whose
// buckets do not add up are refused whole.
func TestStatsHTTPOnlyOwnEdges(t *testing.T) {
	m := newPolicyMesh(t)
	addUser(t, m.s, "root", "root-password-1", true)
	report := func(edges ...wire.HTTPStats) (int, []byte) {
		t.Helper()
		return call(t, m.c, m.s.URL(), wire.PathStats, &m.bobs, wire.StatsReport{Version: wire.ProtocolVersion, HTTP: edges})
	}
	if st, body := report(
		httpEdge("web", wire.RoleConsumer, m.web1.ID, 7),
		httpEdge("db", wire.RoleConsumer, m.db1.ID, 1000),
		httpEdge("web", wire.RoleConsumer, m.carols.ID, 1000),
		httpEdge("web", wire.RoleProvider, m.carols.ID, 1000),
		httpEdge("web", wire.RoleConsumer, m.bobs.ID, 1000),
		httpEdge("web", wire.RoleConsumer, 999999, 1000),
	); st != http.StatusOK {
		t.Fatalf("report: %d %s", st, body)
	}
	br := newBrowser(t, m.s)
	br.login("root", "root-password-1")
	snap := br.snapshot()
	var got []string
	for _, e := range snap.Edges {
		got = append(got, fmt.Sprintf("%s %s->%s %d", e.Service, e.ConsumerName, e.ProviderName, e.Requests))
	}
	if len(got) != 1 || got[0] != "web bobs->web1 7" {
		t.Errorf("edges in the admin's console: %q, want only web bobs->web1 7", got)
	}
	for _, sv := range snap.Services {
		if sv.Name == "db" && sv.HTTP != nil {
			t.Errorf("db shows HTTP figures from a node that cannot reach it: %+v", sv.HTTP)
		}
		if sv.Name == "web" && (sv.HTTP == nil || sv.HTTP.Requests != 7) {
			t.Errorf("web's figures %+v, want 7 requests", sv.HTTP)
		}
	}

	// The pages render the figures too (the live feed redraws them).
	if _, page := br.get("/console/services"); !strings.Contains(page, "7 requests, 0 failed") || !strings.Contains(page, "p99 ") {
		t.Errorf("services page lacks web's HTTP figures: %s", page)
	}
	if _, page := br.get("/console/graph"); !strings.Contains(page, `data-edge="web/bobs/web1"`) || strings.Contains(page, "db1</td>") {
		t.Errorf("graph page's edge table: %s", page)
	}

	many := make([]wire.HTTPStats, wire.MaxHTTPStats+1)
	for i := range many {
		many[i] = httpEdge("web", wire.RoleConsumer, m.web1.ID, 1)
	}
	if st, body := report(many...); st != http.StatusBadRequest {
		t.Errorf("a report with %d HTTP edges: %d %s, want 400", len(many), st, body)
	}
	bad := httpEdge("web", wire.RoleConsumer, m.web1.ID, 5)
	bad.Requests = 50
	if st, body := report(bad); st != http.StatusBadRequest {
		t.Errorf("buckets that do not add up: %d %s, want 400", st, body)
	}
	short := httpEdge("web", wire.RoleConsumer, m.web1.ID, 5)
	short.Buckets = short.Buckets[:3]
	if st, body := report(short); st != http.StatusBadRequest {
		t.Errorf("too few buckets: %d %s, want 400", st, body)
	}
	// The refused reports changed nothing.
	if snap := br.snapshot(); len(snap.Edges) != 1 || snap.Edges[0].Requests != 7 {
		t.Errorf("after refused reports: %+v", snap.Edges)
	}
}
