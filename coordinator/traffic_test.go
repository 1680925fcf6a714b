package coordinator

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// svcIn returns the service named in m (full map or delta), if any.
func svcIn(m wire.MapResponse, name string) (wire.Service, bool) {
	svcs := m.ServicesChanged
	if m.Full != nil {
		svcs = m.Full.Services
	}
	for _, s := range svcs {
		if s.Name == name {
			return s, true
		}
	}
	return wire.Service{}, false
}

func providerOf(sv wire.Service, id wire.NodeID) (wire.Provider, bool) {
	for _, p := range sv.Providers {
		if p.Node == id {
			return p, true
		}
	}
	return wire.Provider{}, false
}

// TestTrafficInMap: priority, weight and version announced with an
// expose, health reported by the provider, the policy's split and
// locality, and a node's region all reach every consumer's map; a node
// reports only on its own exports, within bounds.
func TestTrafficInMap(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, a := register(t, c, jt, "a")
	_, b := register(t, c, jt, "b")
	_, cons := register(t, c, jt, "cons")
	base := s.URL()
	sa := openMapReq(t, c, base, a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 1, Region: "eu"})
	_ = sa
	openMap(t, c, base, b)
	st := openMap(t, c, base, cons)

	for _, tc := range []struct {
		cr   creds
		req  wire.ServiceRequest
		code int
	}{
		{a, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80, Priority: 1, Weight: 10, ServiceVersion: "v1"}, 200},
		{b, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80, ServiceVersion: "v2"}, 200},
		{b, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80, Weight: -1}, 400},
		{b, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80, ServiceVersion: "v 2"}, 400},
	} {
		if code, body := call(t, c, base, wire.PathServices, &tc.cr, tc.req); code != tc.code {
			t.Fatalf("expose %+v: %d %s, want %d", tc.req, code, body, tc.code)
		}
	}
	m := st.next(t, 5*time.Second, "web with both providers", func(m wire.MapResponse) bool {
		sv, ok := svcIn(m, "web")
		return ok && len(sv.Providers) == 2
	})
	sv, _ := svcIn(m, "web")
	if p, _ := providerOf(sv, a.ID); p.Priority != 1 || p.Weight != 10 || p.Version != "v1" || p.Health != "" {
		t.Errorf("a's export in the map: %+v", p)
	}

	// b reports web unhealthy, and a service it does not provide.
	rep := wire.HealthReport{Version: wire.ProtocolVersion, Services: []wire.ServiceHealth{
		{Name: "web", Healthy: false, Error: "connection refused\n" + strings.Repeat("x", 500)},
		{Name: "other", Healthy: false}}}
	if code, body := call(t, c, base, wire.PathHealth, &b, rep); code != 200 {
		t.Fatalf("health: %d %s", code, body)
	}
	m = st.next(t, 5*time.Second, "b unhealthy", func(m wire.MapResponse) bool {
		sv, ok := svcIn(m, "web")
		p, _ := providerOf(sv, b.ID)
		return ok && p.Health == wire.HealthUnhealthy
	})
	sv, _ = svcIn(m, "web")
	p, _ := providerOf(sv, b.ID)
	if !strings.HasPrefix(p.HealthError, "connection refused x") || len(p.HealthError) > wire.MaxHealthError {
		t.Errorf("health error in the map: %q (%d bytes)", p.HealthError, len(p.HealthError))
	}
	if p, _ := providerOf(sv, a.ID); p.Health != "" {
		t.Errorf("b's report changed a's health: %+v", p)
	}
	if _, ok := svcIn(m, "other"); ok {
		t.Errorf("a report on a service b does not provide made it into the map")
	}
	// cons reports on web, which it does not provide: nothing changes.
	if code, _ := call(t, c, base, wire.PathHealth, &cons, wire.HealthReport{Version: wire.ProtocolVersion,
		Services: []wire.ServiceHealth{{Name: "web", Healthy: false, Error: "forged"}}}); code != 200 {
		t.Fatalf("cons health: %d", code)
	}
	snap, _ := s.current(context.Background())
	got, _ := snap.service("web")
	for _, p := range got.Providers {
		if p.HealthError == "forged" {
			t.Errorf("a node changed the health of another's export: %+v", p)
		}
	}
	// Too many services in one report; too many reports.
	big := wire.HealthReport{Version: wire.ProtocolVersion, Services: make([]wire.ServiceHealth, wire.MaxHealthServices+1)}
	if code, body := call(t, c, base, wire.PathHealth, &b, big); code != http.StatusBadRequest {
		t.Errorf("oversized report: %d %s", code, body)
	}
	limited := false
	for i := range 3 * healthBurst {
		code, body := call(t, c, base, wire.PathHealth, &b, wire.HealthReport{Version: wire.ProtocolVersion,
			Services: []wire.ServiceHealth{{Name: "web", Healthy: i%2 == 0}}})
		if code == http.StatusTooManyRequests {
			limited = true
			t.Logf("report %d refused: %s", i, body)
			break
		}
	}
	if !limited {
		t.Errorf("%d reports in a row were all taken, want a 429 after %d", 3*healthBurst, healthBurst)
	}

	// The policy's split and locality; a's region.
	pol := "services:\n  web:\n    split: {v1: 90, v2: 10}\n    locality: prefer-same-region\n    affinity: client\n"
	if _, err := s.SetPolicy(context.Background(), "policy.yaml", pol, "test"); err != nil {
		t.Fatal(err)
	}
	m = st.next(t, 5*time.Second, "web with its split", func(m wire.MapResponse) bool {
		sv, ok := svcIn(m, "web")
		return ok && sv.Split["v2"] == 10
	})
	sv, _ = svcIn(m, "web")
	if sv.Locality != wire.LocalitySameRegion || sv.Affinity != wire.AffinityClient || sv.Split["v1"] != 90 {
		t.Errorf("web's traffic policy in the map: %+v", sv)
	}
	snap, _ = s.current(context.Background())
	if i, ok := snap.byID[a.ID]; !ok || snap.nodes[i].Region != "eu" {
		t.Errorf("a's region not in the map")
	}
	for _, bad := range []struct{ text, want string }{
		{"services:\n  web:\n    split: {v1: 90, v2: 20}\n", "sum to 110"},
		{"services:\n  web:\n    split: {\"v 1\": 100}\n", "version \"v 1\""},
		{"services:\n  web:\n    locality: nearby\n", "locality \"nearby\" must be"},
		{"services:\n  web:\n    affinity: cookie\n", "affinity \"cookie\""},
		{"services:\n  web:\n    splits: {v1: 100}\n", "unknown field \"splits\""},
	} {
		_, err := s.SetPolicy(context.Background(), "policy.yaml", bad.text, "test")
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("policy %q: %v, want an error with %q", bad.text, err, bad.want)
		}
	}
	// A bad region is refused with what to do.
	code, body := call(t, c, base, wire.PathMap, &b, wire.MapRequest{Version: wire.ProtocolVersion, Region: "EU West"})
	if code != http.StatusBadRequest || !strings.Contains(string(body), "--region") {
		t.Errorf("bad region: %d %s", code, body)
	}
}
