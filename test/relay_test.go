package test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/relayd"
	"github.com/meshlink/meshlink/test/harness"
)

// startRelay runs a standalone relay on loopback registered with m.
func startRelay(t *testing.T, m *harness.Mesh, name, token string) *relayd.Relay {
	t.Helper()
	r, err := relayd.New(relayd.Config{
		Join: token, StateDir: filepath.Join(m.Dir(), "relay-"+name), Name: name, Listen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0",
		Logger: harness.Logger(t, "relay-"+name), RetryMin: 20 * time.Millisecond, RetryMax: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestStandaloneRelays: with the coordinator's own relay off, two sites
// that may not use UDP paths talk through a standalone relay; when that
// relay dies they move to the next one in the map, bytes intact.
func TestStandaloneRelays(t *testing.T) {
	m := harness.NewMeshWith(t, func(c *coordinator.Config) { c.NoEmbeddedRelay = true })
	tok := m.TokenWith(coordinator.TokenOptions{Relay: true, Reusable: true, Expires: time.Hour})
	r1 := startRelay(t, m, "relay1", tok)
	r2 := startRelay(t, m, "relay2", tok)
	tstest.WaitForNil(t, 10*time.Second, "both relays following the coordinator", func() error {
		if !r1.Status().Connected || !r2.Status().Connected {
			return fmt.Errorf("relay1 %+v, relay2 %+v", r1.Status(), r2.Status())
		}
		return nil
	})

	web := startBackend(t, "web")
	pcfg := m.AgentConfig("prov", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr()}}})
	pcfg.RelayOnly = true
	prov, err := harness.StartAgent(t, pcfg)
	if err != nil {
		t.Fatal(err)
	}
	ccfg := m.AgentConfig("cons", harness.AgentOptions{})
	ccfg.RelayOnly = true
	cons, err := harness.StartAgent(t, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	relayedVia := func(want string) {
		t.Helper()
		tstest.WaitForNil(t, 20*time.Second, "cons relayed via "+want, func() error {
			p, ok := peerOf(cons, "prov")
			if !ok || p.Path != "relay" || p.Relay != want {
				return fmt.Errorf("peer prov: %+v (relays %+v)", p, cons.Status().Relays)
			}
			return nil
		})
	}

	svc := waitProviders(t, cons, "web", 1)
	conn, who, err := dialGreeting(svc.Local.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if who != "web" {
		t.Fatalf("greeting %q", who)
	}
	echoIntact(t, conn, 1<<20)
	// Which relay carries the pair depends on which one each agent had
	// connected to first; the other is the one to fail over to.
	var usedName string
	tstest.WaitForNil(t, 20*time.Second, "cons relayed", func() error {
		p, ok := peerOf(cons, "prov")
		if !ok || p.Path != "relay" || p.Relay == "" {
			return fmt.Errorf("peer prov: %+v", p)
		}
		usedName = p.Relay
		return nil
	})
	used, other, otherName := r1, r2, "relay2"
	if usedName == "relay2" {
		used, other, otherName = r2, r1, "relay1"
	}
	if st := used.Status().Relay; st.BytesRelayed < 1<<20 || st.Clients != 2 {
		t.Fatalf("%s carried %d bytes for %d clients; want the whole transfer for both sites", usedName, st.BytesRelayed, st.Clients)
	}
	fams, err := harness.Scrape(used.MetricsAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	for name, min := range map[string]float64{"meshlink_relay_bytes_total": 1 << 20, "meshlink_relay_clients": 2,
		"meshlink_relay_coordinator_connected": 1, "meshlink_relay_known_nodes": 2} {
		if f := fams[name]; f == nil || len(f.Metric) != 1 || metricValue(f.Metric[0]) < min {
			t.Errorf("%s metric %s = %v, want >= %v", usedName, name, f, min)
		}
	}
	if st := cons.Status(); len(st.Relays) != 2 || !st.Relays[0].Connected || !st.Relays[1].Connected {
		t.Fatalf("cons relays %+v", st.Relays)
	}

	// The relay in use dies: the coordinator unlists it and the sites carry
	// on through the other, on the same TCP connection.
	before := other.Status().Relay.BytesRelayed
	used.Close()
	relayedVia(otherName)
	echoIntact(t, conn, 1<<20)
	if got := other.Status().Relay.BytesRelayed - before; got < 1<<20 {
		t.Fatalf("%s carried %d bytes after %s died", otherName, got, usedName)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := cons.Ping(ctx, "prov", 2*time.Second)
	if err != nil || len(res) == 0 || res[0].Path != "relay "+otherName {
		t.Fatalf("ping over %s: %+v %v", otherName, res, err)
	}

	// An operator removes the remaining relay: maps drop it at once, and
	// its credentials stop working.
	rmCtx, rmCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rmCancel()
	if err := coordinator.NewAdminClient(filepath.Join(m.Dir(), "coord")).RemoveRelay(rmCtx, otherName); err != nil {
		t.Fatal(err)
	}
	tstest.WaitForNil(t, 10*time.Second, otherName+" gone from the sites' maps and refused", func() error {
		if n := len(prov.Status().Relays); n != 0 {
			return fmt.Errorf("prov still lists %d relays", n)
		}
		if st := other.Status(); st.Connected || !strings.Contains(st.LastError, "401") {
			return fmt.Errorf("%s %+v", otherName, st)
		}
		return nil
	})
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return 0
}
