package test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// enforceLimit is how soon a provider must close what a new map no longer
// allows.
const enforceLimit = time.Second

// allowOnly returns a map filter that narrows service's AllowedNodes to
// who (node IDs or names; none denies every node). Set at the provider
// only, it leaves the consumers' maps as they were, so what refuses or
// closes their connections is the provider's enforcement alone (the
// coordinator's policy narrows both: TestPolicyRevokeClosesOpenConnection).
func allowOnly(service string, who ...string) func(*wire.NetworkMap) {
	return func(nm *wire.NetworkMap) {
		for i := range nm.Services {
			if nm.Services[i].Name == service {
				nm.Services[i].AllowedNodes = slices.Clone(who)
			}
		}
	}
}

func nodeID(a *agent.Agent) string { return strconv.FormatUint(a.Status().Self.ID, 10) }

// enforceMesh is site-b exporting "stream", with its metrics served and
// its counters reported often, and the coordinator's metrics served.
func enforceMesh(t *testing.T) (m *harness.Mesh, b *agent.Agent, srv *streamServer) {
	m = harness.NewMeshWith(t, func(c *coordinator.Config) { c.MetricsListen = "127.0.0.1:0" })
	srv = startStreamServer(t)
	cfg := m.AgentConfig("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	cfg.Metrics = "127.0.0.1:0"
	cfg.StatsEvery = 100 * time.Millisecond
	b, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m, b, srv
}

// openStream connects through a's proxy for "stream" and checks that bytes
// flow.
func openStream(t *testing.T, a *agent.Agent) (net.Conn, string) {
	t.Helper()
	svc := waitProviders(t, a, "stream", 1)
	conn, greeting, err := dialGreeting(svc.Local.String())
	if err != nil || greeting != "hello" {
		t.Fatalf("connect through the mesh: %q %v", greeting, err)
	}
	t.Cleanup(func() { conn.Close() })
	echoIntact(t, conn, 64<<10)
	return conn, svc.Local.String()
}

// TestPolicyChangeClosesDisallowed: site-a and site-c each have a stream
// open to site-b's service; site-b's map then allows only site-c. Site-a's
// stream closes within enforceLimit at both ends and it cannot connect
// again, while site-c's stream stays up and keeps carrying bytes. When the
// map allows site-a again, it connects again.
func TestPolicyChangeClosesDisallowed(t *testing.T) {
	m, b, srv := enforceMesh(t)
	a := m.AddAgent("site-a", harness.AgentOptions{})
	c := m.AddAgent("site-c", harness.AgentOptions{})
	connA, localA := openStream(t, a)
	connC, _ := openStream(t, c)

	start := time.Now()
	b.SetMapFilter(allowOnly("stream", nodeID(c)))
	app := waitAppClosedWithin(t, connA, start, enforceLimit)
	service := waitServiceClosedWithin(t, srv, start, enforceLimit)
	t.Logf("site-a no longer allowed: its application side closed after %v, the service side after %v", app.Round(time.Millisecond), service.Round(time.Millisecond))

	echoIntact(t, connC, 1<<20)
	if conn, greeting, err := dialGreeting(localA); err == nil {
		conn.Close()
		t.Fatalf("site-a still connects after the map stopped allowing it (greeting %q)", greeting)
	}
	echoIntact(t, connC, 64<<10)

	b.SetMapFilter(nil)
	tstest.WaitForNil(t, 5*time.Second, "site-a to connect again once allowed", func() error {
		conn, greeting, err := dialGreeting(localA)
		if err != nil {
			return err
		}
		conn.Close()
		if greeting != "hello" {
			return fmt.Errorf("greeting %q", greeting)
		}
		return nil
	})
}

// TestPolicyRevokeClosesOpenConnection drives the same change through the
// coordinator's access policy: site-a and site-c may reach stream, each
// has a stream open, then the policy keeps site-c only. Site-a's stream
// closes within enforceLimit at both ends (its provider no longer allows
// it, and its own map loses the service), site-c's keeps carrying bytes.
func TestPolicyRevokeClosesOpenConnection(t *testing.T) {
	m, _, srv := enforceMesh(t)
	ctx := context.Background()
	policy := func(from ...string) string {
		return fmt.Sprintf("rules:\n  - from: [%s]\n    to: [stream]\n", strings.Join(from, ", "))
	}
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", policy("node:site-a", "node:site-c"), "test"); err != nil {
		t.Fatal(err)
	}
	a := m.AddAgent("site-a", harness.AgentOptions{})
	c := m.AddAgent("site-c", harness.AgentOptions{})
	connA, _ := openStream(t, a)
	connC, _ := openStream(t, c)

	start := time.Now()
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", policy("node:site-c"), "test"); err != nil {
		t.Fatal(err)
	}
	app := waitAppClosedWithin(t, connA, start, enforceLimit)
	service := waitServiceClosedWithin(t, srv, start, enforceLimit)
	t.Logf("policy revoked site-a: its application side closed after %v, the service side after %v", app.Round(time.Millisecond), service.Round(time.Millisecond))
	echoIntact(t, connC, 1<<20)
}

// TestDeniedConnectionsCountedAndReported: site-b's map allows no node to
// reach its service, and site-a tries 50 times within a second or so. Each
// attempt is refused, site-b's /metrics counts the 50 in
// meshlink_agent_connections_denied_total{service="stream"}, its reports
// bring all 50 to the coordinator, and the console's event log holds
// exactly one "denied" event for them.
func TestDeniedConnectionsCountedAndReported(t *testing.T) {
	m, b, _ := enforceMesh(t)
	a := m.AddAgent("site-a", harness.AgentOptions{})
	svc := waitProviders(t, a, "stream", 1)
	b.SetMapFilter(allowOnly("stream"))

	const attempts = 50
	start := time.Now()
	for i := range attempts {
		if conn, greeting, err := dialGreeting(svc.Local.String()); err == nil {
			conn.Close()
			t.Fatalf("attempt %d reached the service (greeting %q) though no node is allowed", i, greeting)
		}
	}
	t.Logf("%d denied attempts took %v", attempts, time.Since(start).Round(time.Millisecond))

	counter := func(addr, name string) func() error {
		return func() error {
			fams, err := harness.Scrape(addr)
			if err != nil {
				return err
			}
			f := fams[name]
			if f == nil {
				return fmt.Errorf("no %s", name)
			}
			for _, mt := range f.Metric {
				for _, l := range mt.Label {
					if l.GetName() == "service" && l.GetValue() == "stream" {
						if v := metricValue(mt); v != attempts {
							return fmt.Errorf("%s{service=\"stream\"} = %v, want %d", name, v, attempts)
						}
						return nil
					}
				}
			}
			return fmt.Errorf("no %s{service=\"stream\"}", name)
		}
	}
	tstest.WaitForNil(t, 5*time.Second, "site-b's /metrics to count the denials", counter(b.MetricsAddr().String(), "meshlink_agent_connections_denied_total"))
	tstest.WaitForNil(t, 5*time.Second, "the coordinator to have every denial reported", counter(m.Coord.MetricsAddr().String(), "meshlink_coordinator_connections_denied_total"))

	evs, err := m.Coord.Store().ListEvents(context.Background(), 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var denied []store.Event
	for _, e := range evs {
		if e.Kind == store.EventDenied {
			denied = append(denied, e)
		}
	}
	if len(denied) != 1 {
		t.Fatalf("%d denied events for a burst of %d within a minute, want 1: %+v", len(denied), attempts, denied)
	}
	e := denied[0]
	if e.Actor != "node site-b" || e.Node != "site-a" || !strings.Contains(e.Message, "site-b refused") || !strings.Contains(e.Message, "from site-a to stream") {
		t.Fatalf("denied event %+v; want site-b refusing site-a's connections to stream, with their count", e)
	}
	t.Logf("event: %s", e.Message)
}
