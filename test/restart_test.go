package test

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// TestProviderRestartReachable: a provider's agent restarts (same state,
// a new UDP port, a fresh WireGuard device); a consumer that still holds a
// direct path and a session to the old one reaches the service again in
// seconds, not after its own WireGuard timers give the dead session up:
// the restarted side starts handshakes with its peers at once, and the
// consumer stops trusting the old path once the map moves the peer.
func TestProviderRestartReachable(t *testing.T) {
	m := harness.NewMesh(t)
	srv := startStreamServer(t)
	stateB := filepath.Join(m.Dir(), "site-b")
	bcfg := m.AgentConfig("site-b", harness.AgentOptions{StateDir: stateB, Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	b, err := harness.StartAgent(t, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	a := m.AddAgent("site-a", harness.AgentOptions{})
	svc := waitProviders(t, a, "stream", 1)
	c, _, err := dialGreeting(svc.Local.String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b.Close()
	start := time.Now()
	bcfg.Join = ""
	b2, err := harness.StartAgent(t, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("site-b restarted on UDP port %d in %v", b2.ListenPort(), time.Since(start))
	tstest.WaitForNil(t, 15*time.Second, "a connection after the restart", func() error {
		c, g, err := dialGreeting(svc.Local.String())
		if err != nil {
			return err
		}
		c.Close()
		if g != "hello" {
			return fmt.Errorf("greeting %q", g)
		}
		return nil
	})
	t.Logf("site-a reached the service %v after site-b's restart began", time.Since(start))
}
