package test

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// policyDev lets group dev (alice; bob with bobInDev) reach web, carol
// everything; the admin service on alice's site is for carol alone.
func policyDev(bobInDev bool) string {
	dev := "[user:alice]"
	if bobInDev {
		dev = "[user:alice, user:bob]"
	}
	return fmt.Sprintf(`groups:
  dev: %s
rules:
  - from: [group:dev]
    to: [web]
  - from: [user:carol]
    to: ["*"]
tests:
  - from: user:carol
    allow: [web, admin]
`, dev)
}

// policySite is a member's agent with a SOCKS5 proxy (the way around its
// own network map: NODE.node.mesh.internal at any port).
func policySite(t *testing.T, m *harness.Mesh, name string, owner int64, exp []agent.Export) *agent.Agent {
	t.Helper()
	cfg := m.AgentConfig(name, harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: owner, Expires: time.Hour}), Expose: exp})
	cfg.SOCKS5 = "127.0.0.1:0"
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func exportOf(a *agent.Agent, name string) (total, denied int64) {
	for _, e := range a.Services().Exported {
		if e.Name == name {
			return e.Total, e.Denied
		}
	}
	return 0, 0
}

// TestPolicyEnforced: three members and a policy. A denied member's agent
// does not learn the service (no listener, NXDOMAIN); a member allowed
// one service of a site who dials another of its ports directly through
// the netstack is refused by the provider; a policy change lets the
// denied member in within a second, and taking it back closes the
// connection it opened.
func TestPolicyEnforced(t *testing.T) {
	m := harness.NewMesh(t)
	ctx := context.Background()
	ids := map[string]int64{}
	for _, name := range []string{"alice", "bob", "carol"} {
		u, err := m.Coord.Store().CreateUser(ctx, store.User{Username: name, PasswordHash: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = u.ID
	}
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", policyDev(false), "test"); err != nil {
		t.Fatal(err)
	}
	web, admin := startStreamServer(t), startStreamServer(t)
	site := policySite(t, m, "alice-site", ids["alice"], []agent.Export{
		{Name: "web", Target: web.ln.Addr().String()}, {Name: "admin", Target: admin.ln.Addr().String()}})
	bob := policySite(t, m, "bob-laptop", ids["bob"], nil)
	carol := policySite(t, m, "carol-laptop", ids["carol"], nil)

	// Carol may reach both.
	for _, svc := range []string{"web", "admin"} {
		s := waitProviders(t, carol, svc, 1)
		c, greeting, err := dialGreeting(s.Local.String())
		if err != nil || greeting != "hello" {
			t.Fatalf("carol → %s: %q %v", svc, greeting, err)
		}
		echoIntact(t, c, 16<<10)
		c.Close()
	}
	// Both backends see carol's connections end.
	waitServiceClosed(t, web, time.Now())
	waitServiceClosed(t, admin, time.Now())
	// Bob learns nothing of web: not in his services, NXDOMAIN, no peer.
	tstest.WaitFor(t, 5*time.Second, "bob's agent to have its map", func() bool { return bob.Status().Coordinator.Connected })
	if _, ok := serviceOf(bob, "web"); ok {
		t.Fatal("bob's agent lists web")
	}
	if _, rcode := queryA(t, bob.DNSAddr(), "web.mesh.internal"); rcode != 3 {
		t.Errorf("bob's DNS for web.mesh.internal: rcode %d, want NXDOMAIN (3)", rcode)
	}
	if _, rcode := queryA(t, bob.DNSAddr(), "alice-site.node.mesh.internal"); rcode != 3 {
		t.Errorf("bob's DNS for alice-site.node.mesh.internal: rcode %d, want NXDOMAIN (3)", rcode)
	}
	if hasPeer(bob, "alice-site") {
		t.Error("bob's agent has alice-site as a peer")
	}

	// Alice may reach web but not admin. Her site... is the provider, so
	// take a fourth member site in group dev: a second node of alice.
	alice2 := policySite(t, m, "alice-laptop", ids["alice"], nil)
	waitProviders(t, alice2, "web", 1)
	if _, ok := serviceOf(alice2, "admin"); ok {
		t.Fatal("alice's laptop lists admin")
	}
	// Around her own map: dial alice-site's admin port straight through
	// the netstack. The provider refuses it.
	adminPort := providerPort(t, m, "admin")
	_, deniedBefore := exportOf(site, "admin")
	d, err := xproxy.SOCKS5("tcp", alice2.SOCKS5Addr(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := d.Dial("tcp", fmt.Sprintf("alice-site.node.mesh.internal:%d", adminPort)); err == nil {
		io.WriteString(c, "x\n") // data, so that the backend would count it (startStreamServer)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Fatalf("alice's laptop got %q from admin around its map", b)
		}
	}
	tstest.WaitFor(t, 5*time.Second, "the provider to count the denial", func() bool {
		_, denied := exportOf(site, "admin")
		return denied > deniedBefore
	})
	select {
	case <-admin.ended:
		t.Fatal("the admin backend saw a connection from alice's laptop")
	default:
	}

	// A change lets bob in, within a second of being set.
	start := time.Now()
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", policyDev(true), "test"); err != nil {
		t.Fatal(err)
	}
	s := waitProviders(t, bob, "web", 1)
	t.Logf("bob could reach web %v after the policy change", time.Since(start))
	conn, greeting, err := dialGreeting(s.Local.String())
	if err != nil || greeting != "hello" {
		t.Fatalf("bob → web after the change: %q %v", greeting, err)
	}
	defer conn.Close()
	echoIntact(t, conn, 16<<10)
	if addrs, rcode := queryA(t, bob.DNSAddr(), "web.mesh.internal"); rcode != 0 || len(addrs) == 0 {
		t.Errorf("bob's DNS for web after the change: %v rcode %d", addrs, rcode)
	}
}

// providerPort is the port the service's provider accepts it on.
func providerPort(t *testing.T, m *harness.Mesh, name string) uint16 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svcs, err := coordinator.NewAdminClient(filepath.Join(m.Dir(), "coord")).Services(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		if s.Name == name && len(s.Providers) > 0 {
			return s.Providers[0].Port
		}
	}
	t.Fatalf("no provider of %s", name)
	return 0
}

// TestPolicyTagsAndRotation: a node joined with a tagged token is selected
// by its tag, not by the member who minted the token; the member's own
// untagged node is not; the tagged node keeps its access across a key
// rotation (the policy names nodes, providers check keys).
func TestPolicyTagsAndRotation(t *testing.T) {
	m := harness.NewMesh(t)
	ctx := context.Background()
	alice, err := m.Coord.Store().CreateUser(ctx, store.User{Username: "alice", PasswordHash: "x"})
	if err != nil {
		t.Fatal(err)
	}
	pol := "tagOwners:\n  ci: [user:alice]\nrules:\n  - from: [tag:ci]\n    to: [web]\n"
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", pol, "test"); err != nil {
		t.Fatal(err)
	}
	web := startStreamServer(t)
	m.AddAgent("site", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.ln.Addr().String()}}})
	runner := m.AddAgent("ci-runner", harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: alice.ID, Tags: []string{"tag:ci"}, Expires: time.Hour})})
	laptop := m.AddAgent("alice-laptop", harness.AgentOptions{Token: m.TokenWith(coordinator.TokenOptions{Owner: alice.ID, Expires: time.Hour})})

	dial := func() {
		t.Helper()
		s := waitProviders(t, runner, "web", 1)
		c, greeting, err := dialGreeting(s.Local.String())
		if err != nil || greeting != "hello" {
			t.Fatalf("the tagged runner → web: %q %v", greeting, err)
		}
		echoIntact(t, c, 16<<10)
		c.Close()
	}
	dial()
	tstest.WaitFor(t, 5*time.Second, "alice's laptop to have its map", func() bool { return laptop.Status().Coordinator.Connected })
	if _, ok := serviceOf(laptop, "web"); ok {
		t.Error("alice's untagged laptop lists web; only tag:ci may reach it")
	}
	if ex, err := m.Coord.Explain(ctx, "alice-laptop", "web"); err != nil || ex.Allow {
		t.Errorf("explain alice-laptop → web: %+v %v", ex, err)
	}

	old := runner.Status().Self.Key
	if _, err := runner.RotateKey(ctx); err != nil {
		t.Fatal(err)
	}
	tstest.WaitFor(t, 10*time.Second, "the runner's new key", func() bool { return runner.Status().Self.Key != old })
	dial()
}

// TestPortChangeReachesConsumers: the provider re-exposes its service on
// another --port; the consumer's local listener moves to it and carries
// bytes there.
func TestPortChangeReachesConsumers(t *testing.T) {
	m := harness.NewMesh(t)
	web := startStreamServer(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.ln.Addr().String(), Port: 8000}}})
	a := m.AddAgent("site-a", harness.AgentOptions{})
	if s := waitProviders(t, a, "web", 1); s.Local.Port() != 8000 {
		t.Fatalf("web at site A on %v, want port 8000", s.Local)
	}
	if _, _, err := b.Expose(context.Background(), agent.Export{Name: "web", Target: web.ln.Addr().String(), Port: 9000}); err != nil {
		t.Fatal(err)
	}
	var local string
	tstest.WaitFor(t, 10*time.Second, "site A to serve web on port 9000", func() bool {
		s, ok := serviceOf(a, "web")
		local = s.Local.String()
		return ok && s.Listening && s.Local.Port() == 9000
	})
	c, greeting, err := dialGreeting(local)
	if err != nil || greeting != "hello" {
		t.Fatalf("web on its new port: %q %v", greeting, err)
	}
	echoIntact(t, c, 16<<10)
	c.Close()
}
