// Package test holds multi-site tests: a whole mesh in one process over real
// loopback sockets, and the built binary in network namespaces.
package test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// backend is a TCP server standing for a site's real service: it greets each
// connection with its id on one line, then echoes.
type backend struct {
	id   string
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	hits int
}

func startBackend(t *testing.T, id string) *backend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{id: id, ln: ln}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.hits++
			b.mu.Unlock()
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				defer c.Close()
				fmt.Fprintf(c, "%s\n", b.id)
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) stop() { b.ln.Close() }

func (b *backend) addr() string { return b.ln.Addr().String() }

func serviceOf(a *agent.Agent, name string) (localapi.Service, bool) {
	for _, s := range a.Services().Consumed {
		if s.Name == name {
			return s, true
		}
	}
	return localapi.Service{}, false
}

// waitProviders waits until a sees service name with n providers, listening.
func waitProviders(t *testing.T, a *agent.Agent, name string, n int) localapi.Service {
	var svc localapi.Service
	tstest.WaitForNil(t, 5*time.Second, fmt.Sprintf("%s to have %d providers", name, n), func() error {
		s, ok := serviceOf(a, name)
		if !ok {
			return errors.New("service not in the network map")
		}
		if len(s.Providers) != n {
			return fmt.Errorf("%d providers", len(s.Providers))
		}
		if !s.Listening {
			return errors.New("not listening: " + s.Error)
		}
		svc = s
		return nil
	})
	return svc
}

// dialGreeting connects to addr and returns the backend id greeting.
func dialGreeting(addr string) (net.Conn, string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, "", err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("no greeting: %w", err)
	}
	c.SetDeadline(time.Time{})
	return c, strings.TrimSpace(line), nil
}

// echoIntact sends n random bytes through c and checks they come back whole.
func echoIntact(t *testing.T, c net.Conn, n int) {
	t.Helper()
	payload := make([]byte, n)
	rand.Read(payload)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		errc <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read back: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatal("bytes came back altered")
	}
}

func queryA(t *testing.T, server, name string) ([]netip.Addr, int) {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(name), mdns.TypeA)
	c := &mdns.Client{Timeout: 3 * time.Second}
	r, _, err := c.Exchange(m, server)
	if err != nil {
		t.Fatalf("dns %s: %v", name, err)
	}
	var out []netip.Addr
	for _, rr := range r.Answer {
		if a, ok := rr.(*mdns.A); ok {
			ip, _ := netip.AddrFromSlice(a.A.To4())
			out = append(out, ip)
		}
	}
	return out, r.Rcode
}

// TestMesh is the whole path in one process: a coordinator and three agents
// over real UDP on loopback.
func TestMesh(t *testing.T) {
	m := harness.NewMesh(t)
	web1 := startBackend(t, "site-b")
	web2 := startBackend(t, "site-c")

	a := m.AddAgent("site-a", harness.AgentOptions{})
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web1.addr()}}})
	c := m.AddAgent("site-c", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web2.addr()}}})

	svc := waitProviders(t, a, "web", 2)

	t.Run("dns", func(t *testing.T) {
		ips, rcode := queryA(t, a.DNSAddr(), "web.mesh.internal")
		if rcode != mdns.RcodeSuccess || len(ips) != 1 || ips[0] != svc.Local.Addr() {
			t.Fatalf("web.mesh.internal = %v (rcode %d), want %v", ips, rcode, svc.Local.Addr())
		}
		if _, rcode := queryA(t, a.DNSAddr(), "nope.mesh.internal"); rcode != mdns.RcodeNameError {
			t.Fatalf("unknown name: rcode %d, want NXDOMAIN", rcode)
		}
		ips, _ = queryA(t, a.DNSAddr(), "site-b.node.mesh.internal")
		if len(ips) != 1 || !strings.HasPrefix(ips[0].String(), "100.") {
			t.Fatalf("site-b.node.mesh.internal = %v", ips)
		}
	})

	t.Run("bytes intact both ways", func(t *testing.T) {
		conn, who, err := dialGreeting(svc.Local.String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if who != "site-b" && who != "site-c" {
			t.Fatalf("greeting %q", who)
		}
		echoIntact(t, conn, 4<<20)
	})

	t.Run("balanced across providers", func(t *testing.T) {
		// Held-open connections: least-open-connections must alternate,
		// once earlier connections have wound down.
		tstest.WaitForNil(t, 5*time.Second, "no open connections", func() error {
			if s, _ := serviceOf(a, "web"); s.Open != 0 {
				return fmt.Errorf("%d open", s.Open)
			}
			return nil
		})
		seen := map[string]int{}
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for i := 0; i < 6; i++ {
			conn, who, err := dialGreeting(svc.Local.String())
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, conn)
			seen[who]++
		}
		if seen["site-b"] != 3 || seen["site-c"] != 3 {
			t.Fatalf("connections per provider = %v, want 3 and 3", seen)
		}
	})

	t.Run("stopped provider is skipped", func(t *testing.T) {
		c.Close()
		for i := 0; i < 4; i++ {
			conn, who, err := dialGreeting(svc.Local.String())
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			conn.Close()
			if who != "site-b" {
				t.Fatalf("connection %d went to %q", i, who)
			}
		}
	})

	t.Run("refusing target closes the consumer at once", func(t *testing.T) {
		dead := startBackend(t, "dead")
		dead.stop()
		if _, _, err := b.Expose(context.Background(), agent.Export{Name: "gone", Target: dead.addr(), Port: 7001}); err != nil {
			t.Fatal(err)
		}
		s := waitProviders(t, a, "gone", 1)
		start := time.Now()
		conn, err := net.DialTimeout("tcp", s.Local.String(), 5*time.Second)
		switch {
		case errors.Is(err, syscall.ECONNRESET):
			// Reset before the dial returned: closed at once indeed.
		case err != nil:
			t.Fatal(err)
		default:
			defer conn.Close()
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := conn.Read(make([]byte, 1))
			if n != 0 || err == nil {
				t.Fatalf("read %d bytes, err %v; want the connection closed", n, err)
			}
		}
		if el := time.Since(start); el > 3*time.Second {
			t.Fatalf("closing took %v", el)
		}
	})

	t.Run("coordinator restart", func(t *testing.T) {
		m.StopCoordinator()
		// The data plane keeps working while the coordinator is down.
		conn, who, err := dialGreeting(svc.Local.String())
		if err != nil {
			t.Fatalf("with the coordinator down: %v", err)
		}
		echoIntact(t, conn, 64<<10)
		conn.Close()
		if who != "site-b" {
			t.Fatalf("went to %q", who)
		}
		m.StartCoordinator()
		tstest.WaitForNil(t, 10*time.Second, "agents to reconnect", func() error {
			for _, ag := range []*agent.Agent{a, b} {
				if st := ag.Status(); !st.Coordinator.Connected {
					return fmt.Errorf("%s: %s", st.Self.Name, st.Coordinator.LastError)
				}
			}
			return nil
		})
		// After the resync, changes flow again.
		db := startBackend(t, "db")
		if _, _, err := b.Expose(context.Background(), agent.Export{Name: "db", Target: db.addr()}); err != nil {
			t.Fatal(err)
		}
		s := waitProviders(t, a, "db", 1)
		conn, who, err = dialGreeting(s.Local.String())
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		if who != "db" {
			t.Fatalf("db answered as %q", who)
		}
	})

	t.Run("unexpose reaches consumers", func(t *testing.T) {
		start := time.Now()
		if err := b.Unexpose(context.Background(), "db"); err != nil {
			t.Fatal(err)
		}
		tstest.WaitForNil(t, 2*time.Second, "db to disappear", func() error {
			if _, ok := serviceOf(a, "db"); ok {
				return errors.New("still listed")
			}
			return nil
		})
		t.Logf("unexpose reached the consumer in %v", time.Since(start))
		if err := b.Unexpose(context.Background(), "db"); err == nil {
			t.Fatal("unexposing an unknown service succeeded")
		}
	})
}

// TestSilentProviderSkipped: a provider that dies while the coordinator is
// down (so nobody tells the consumer) is found dead by the consumer itself
// and skipped; connections keep working through the other provider.
func TestSilentProviderSkipped(t *testing.T) {
	m := harness.NewMesh(t)
	w1, w2 := startBackend(t, "p1"), startBackend(t, "p2")
	a := m.AddAgent("cons", harness.AgentOptions{})
	m.AddAgent("p1", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: w1.addr()}}})
	p2 := m.AddAgent("p2", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: w2.addr()}}})
	svc := waitProviders(t, a, "web", 2)

	m.StopCoordinator()
	p2.Close()
	for i := 0; i < 6; i++ {
		conn, who, err := dialGreeting(svc.Local.String())
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conn.Close()
		if who != "p1" {
			t.Fatalf("connection %d answered by %q", i, who)
		}
	}
	s, _ := serviceOf(a, "web")
	for _, p := range s.Providers {
		if p.Name == "p2" && p.Healthy {
			t.Fatalf("dead provider still marked healthy: %+v", p)
		}
	}
}
