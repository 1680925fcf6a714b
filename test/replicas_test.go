package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// loopbackURL picks a free loopback port and returns its address and
// https:// URL, for a coordinator whose URL its replicas must know before
// it starts.
func loopbackURL(t *testing.T) (string, string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr, "https://" + addr
}

// startReplica starts a coordinator on db whose data directory is dir (a
// copy of the first replica's, for the same certificate and keys).
func startReplica(t *testing.T, name, dir, db, addr string, replicas []string) *coordinator.Server {
	t.Helper()
	s, err := coordinator.New(coordinator.Config{
		Listen: addr, DataDir: dir, Store: db, ReplicaURLs: replicas, Logger: harness.Logger(t, name),
		AllowLoopbackEndpoints: true, KeepAlive: 2 * time.Second, Out: tstest.Writer(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// copyCoordinatorDir copies a data directory's certificate and keys.
func copyCoordinatorDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || e.Name() == "meshlink.db" {
			continue
		}
		copyFile(t, filepath.Join(from, e.Name()), filepath.Join(to, e.Name()), 0o600)
	}
}

// replicaMesh is two coordinators on one PostgreSQL database.
type replicaMesh struct {
	dir        string
	ca, cb     *coordinator.Server
	urlA, urlB string
}

func startReplicaMesh(t *testing.T) *replicaMesh {
	db := pgtest.DB(t)
	m := &replicaMesh{dir: t.TempDir()}
	addrA, urlA := loopbackURL(t)
	addrB, urlB := loopbackURL(t)
	m.urlA, m.urlB = urlA, urlB
	m.ca = startReplica(t, "coord-a", filepath.Join(m.dir, "a"), db, addrA, []string{urlB})
	copyCoordinatorDir(t, filepath.Join(m.dir, "a"), filepath.Join(m.dir, "b"))
	m.cb = startReplica(t, "coord-b", filepath.Join(m.dir, "b"), db, addrB, []string{urlA})
	if m.ca.Fingerprint() != m.cb.Fingerprint() {
		t.Fatal("the replicas present different certificates")
	}
	return m
}

// agent starts an agent joining through c (its token lists c first).
func (m *replicaMesh) agent(t *testing.T, c *coordinator.Server, name string, relayOnly bool, exp ...agent.Export) *agent.Agent {
	t.Helper()
	tok, err := c.CreateToken(context.Background(), coordinator.TokenOptions{Reusable: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := harness.StartAgent(t, agent.Config{
		StateDir: filepath.Join(m.dir, name), Join: tok, Name: name, DNS: "127.0.0.1:0", Upstreams: []string{},
		Expose: exp, ProxyRange: harness.ProxyRange(), Logger: harness.Logger(t, name), RelayOnly: relayOnly,
		RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond, DialTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// waitPeer waits until a's map holds the node named peer: with agents on
// different coordinators, each map learns of the other node a moment
// apart, and a WireGuard handshake towards a site that does not know the
// initiator yet waits out its retry timer.
func waitPeer(t *testing.T, a *agent.Agent, peer string) {
	t.Helper()
	tstest.WaitFor(t, 10*time.Second, peer+" in the map", func() bool {
		return slices.ContainsFunc(a.Status().Peers, func(p localapi.Peer) bool { return p.Name == peer })
	})
}

// dialGreetingOnceAllowed dials addr until the greeting comes: with agents
// on different coordinators, the provider's map learns that the consumer
// may reach its service a moment after the consumer's map learns the
// service (each coordinator wakes its streams on its own), and a
// connection made in between is refused by the provider's policy.
func dialGreetingOnceAllowed(t *testing.T, addr string) (net.Conn, string) {
	t.Helper()
	var (
		conn net.Conn
		who  string
	)
	tstest.WaitForNil(t, 10*time.Second, "a greeting through "+addr, func() error {
		c, w, err := dialGreeting(addr)
		conn, who = c, w
		return err
	})
	return conn, who
}

// TestAgentsFailOverBetweenReplicas: two coordinators on one PostgreSQL
// database, agents spread over both by a token listing both. When one
// coordinator goes away, its agent moves to the other within seconds; a
// transfer running meanwhile goes on intact, and a change made afterwards
// through the surviving coordinator reaches every agent.
func TestAgentsFailOverBetweenReplicas(t *testing.T) {
	m := startReplicaMesh(t)
	web := startBackend(t, "site-b")
	consumer := m.agent(t, m.ca, "site-a", false)
	provider := m.agent(t, m.cb, "site-b", false, agent.Export{Name: "web", Target: web.addr()})
	if u := consumer.Status().Coordinator.URL; u != m.urlA {
		t.Fatalf("consumer on %s, want A (%s)", u, m.urlA)
	}
	if u := provider.Status().Coordinator.URL; u != m.urlB {
		t.Fatalf("provider on %s, want B (%s)", u, m.urlB)
	}
	svc := waitProviders(t, consumer, "web", 1)
	waitPeer(t, provider, "site-a")

	// A transfer in flight while A goes away.
	conn, who := dialGreetingOnceAllowed(t, svc.Local.String())
	defer conn.Close()
	if who != "site-b" {
		t.Fatalf("greeting %q", who)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		echoIntact(t, conn, 8<<20)
	}()
	start := time.Now()
	m.ca.Close()
	tstest.WaitForNil(t, 15*time.Second, "the consumer to move to B", func() error {
		if st := consumer.Status(); !st.Coordinator.Connected || st.Coordinator.URL != m.urlB {
			return fmt.Errorf("on %s, connected %v: %s", st.Coordinator.URL, st.Coordinator.Connected, st.Coordinator.LastError)
		}
		return nil
	})
	moved := time.Since(start)
	<-done
	if t.Failed() {
		return
	}
	echoIntact(t, conn, 64<<10) // the same connection, after the move

	// A change through B reaches the consumer that came over from A.
	if _, _, err := provider.Expose(context.Background(), agent.Export{Name: "api", Target: web.addr(), Port: 7002}); err != nil {
		t.Fatal(err)
	}
	api := waitProviders(t, consumer, "api", 1)
	c2, who, err := dialGreeting(api.Local.String())
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if who != "site-b" {
		t.Fatalf("api greeting %q", who)
	}
	t.Logf("the consumer moved from the closed coordinator to the other in %v", moved)
	if moved > 10*time.Second {
		t.Errorf("moving took %v, want seconds", moved)
	}
}

// TestReplicasRelayBetweenTheirNodes: two sites that can only relay,
// joined through different coordinators, still reach each other: every
// map lists every replica's embedded relay, so they share one.
func TestReplicasRelayBetweenTheirNodes(t *testing.T) {
	m := startReplicaMesh(t)
	web := startBackend(t, "site-b")
	consumer := m.agent(t, m.ca, "site-a", true)
	provider := m.agent(t, m.cb, "site-b", true, agent.Export{Name: "web", Target: web.addr()})
	svc := waitProviders(t, consumer, "web", 1)
	waitPeer(t, provider, "site-a")
	conn, who := dialGreetingOnceAllowed(t, svc.Local.String())
	defer conn.Close()
	if who != "site-b" {
		t.Fatalf("greeting %q", who)
	}
	echoIntact(t, conn, 1<<20)
}
