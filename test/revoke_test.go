package test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// cutOffLimit is how soon a removed node must lose what it had open.
const cutOffLimit = 5 * time.Second

// streamServer stands for a site's real service: it greets each connection
// and echoes, and reports on ended when its side of a connection that
// carried data ends.
type streamServer struct {
	ln    net.Listener
	ended chan struct{}
	wg    sync.WaitGroup
}

func startStreamServer(t *testing.T) *streamServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveStream(t, ln, "hello")
}

// serveStream is startStreamServer on ln (a listener in a namespace, say)
// with another greeting.
func serveStream(t *testing.T, ln net.Listener, greeting string) *streamServer {
	s := &streamServer{ln: ln, ended: make(chan struct{}, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				fmt.Fprintln(c, greeting)
				// Only connections that carried data count: a provider's
				// health check connects and closes without a byte.
				if n, _ := io.Copy(c, c); n > 0 {
					s.ended <- struct{}{}
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return s
}

// revokeSetup is site A consuming "stream", exported by site B, with one
// connection open and carrying bytes.
func revokeSetup(t *testing.T) (m *harness.Mesh, a, b *agent.Agent, srv *streamServer, conn net.Conn, local string) {
	m = harness.NewMesh(t)
	srv = startStreamServer(t)
	b = m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	a = m.AddAgent("site-a", harness.AgentOptions{})
	svc := waitProviders(t, a, "stream", 1)
	// The first connection may race the first WireGuard handshake on a
	// loaded machine (the harness's dial timeout is 1 s): retry it.
	tstest.WaitForNil(t, 15*time.Second, "a first connection through the mesh", func() error {
		c, greeting, err := dialGreeting(svc.Local.String())
		if err != nil {
			return err
		}
		if greeting != "hello" {
			c.Close()
			return fmt.Errorf("greeting %q", greeting)
		}
		conn = c
		return nil
	})
	t.Cleanup(func() { conn.Close() })
	echoIntact(t, conn, 64<<10)
	return m, a, b, srv, conn, svc.Local.String()
}

// removeNode removes name through the admin socket, as `meshlink nodes
// remove` does, and returns when it was asked.
func removeNode(t *testing.T, m *harness.Mesh, name string) time.Time {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := coordinator.NewAdminClient(filepath.Join(m.Dir(), "coord")).RemoveNode(ctx, name); err != nil {
		t.Fatal(err)
	}
	return start
}

// waitAppClosed waits until the application's connection through the mesh
// ends (EOF or reset), failing if it still carries bytes or takes longer
// than cutOffLimit; it returns the time taken since start.
func waitAppClosed(t *testing.T, conn net.Conn, start time.Time) time.Duration {
	t.Helper()
	return waitAppClosedWithin(t, conn, start, cutOffLimit)
}

// waitAppClosedWithin is waitAppClosed with its own limit.
func waitAppClosedWithin(t *testing.T, conn net.Conn, start time.Time, limit time.Duration) time.Duration {
	t.Helper()
	conn.SetReadDeadline(start.Add(limit))
	buf := make([]byte, 1024)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			t.Fatalf("read %d bytes on a connection that should be cut off", n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || (err != nil && strings.Contains(err.Error(), "reset")) {
			return time.Since(start)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the application's connection is still open %v after the change", limit)
		}
		if err != nil {
			return time.Since(start)
		}
	}
}

// waitServiceClosed waits until the service's side of the connection ends.
func waitServiceClosed(t *testing.T, srv *streamServer, start time.Time) time.Duration {
	t.Helper()
	return waitServiceClosedWithin(t, srv, start, cutOffLimit)
}

// waitServiceClosedWithin is waitServiceClosed with its own limit.
func waitServiceClosedWithin(t *testing.T, srv *streamServer, start time.Time, limit time.Duration) time.Duration {
	t.Helper()
	select {
	case <-srv.ended:
		return time.Since(start)
	case <-time.After(time.Until(start.Add(limit))):
		t.Fatalf("the service's connection is still open %v after the change", limit)
		return 0
	}
}

func hasPeer(ag *agent.Agent, name string) bool {
	for _, p := range ag.Status().Peers {
		if p.Name == name {
			return true
		}
	}
	return false
}

// TestRemoveConsumerCutsItOff removes the consuming node A while a stream
// runs: both ends close within cutOffLimit, A cannot connect again and its
// old secret is refused.
func TestRemoveConsumerCutsItOff(t *testing.T) {
	m, a, b, srv, conn, local := revokeSetup(t)
	start := removeNode(t, m, "site-a")
	service := waitServiceClosed(t, srv, start)
	app := waitAppClosed(t, conn, start)
	t.Logf("site-a removed: service side closed after %v, application side after %v", service.Round(time.Millisecond), app.Round(time.Millisecond))

	tstest.WaitForNil(t, cutOffLimit, "site-b to drop site-a", func() error {
		if hasPeer(b, "site-a") {
			return errors.New("site-a is still a peer of site-b")
		}
		return nil
	})
	// A's agent keeps presenting its old secret, and is refused.
	tstest.WaitForNil(t, cutOffLimit, "site-a's old secret to be refused", func() error {
		st := a.Status().Coordinator
		if st.Connected || !strings.Contains(st.LastError, "removed from the mesh") {
			return fmt.Errorf("connected %v, last error %q", st.Connected, st.LastError)
		}
		return nil
	})
	// And it can no longer reach the service.
	tstest.WaitForNil(t, cutOffLimit, "site-a to lose the service", func() error {
		if _, ok := serviceOf(a, "stream"); ok {
			return errors.New("stream still consumed")
		}
		return nil
	})
	if c, greeting, err := dialGreeting(local); err == nil {
		c.Close()
		t.Fatalf("site-a still reaches the service after its removal (greeting %q)", greeting)
	}
}

// TestRemoveProviderCutsItOff removes the providing node B: A's open
// connection to it closes within cutOffLimit, at both ends.
func TestRemoveProviderCutsItOff(t *testing.T) {
	m, a, _, srv, conn, _ := revokeSetup(t)
	start := removeNode(t, m, "site-b")
	app := waitAppClosed(t, conn, start)
	service := waitServiceClosed(t, srv, start)
	t.Logf("site-b removed: application side closed after %v, service side after %v", app.Round(time.Millisecond), service.Round(time.Millisecond))
	tstest.WaitForNil(t, cutOffLimit, "site-a to drop site-b", func() error {
		if hasPeer(a, "site-b") {
			return errors.New("site-b is still a peer of site-a")
		}
		if _, ok := serviceOf(a, "stream"); ok {
			return errors.New("stream still consumed")
		}
		return nil
	})
}

// TestUnexposeCutsConsumersOff: the providing site stops exporting the
// service while a stream runs; the consumer's connection closes within
// cutOffLimit at both ends instead of lingering until TCP gives up, and
// the consumer loses the service.
func TestUnexposeCutsConsumersOff(t *testing.T) {
	_, a, b, srv, conn, _ := revokeSetup(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Unexpose(ctx, "stream"); err != nil {
		t.Fatal(err)
	}
	app := waitAppClosed(t, conn, start)
	service := waitServiceClosed(t, srv, start)
	t.Logf("stream unexposed at site-b: application side closed after %v, service side after %v", app.Round(time.Millisecond), service.Round(time.Millisecond))
	tstest.WaitForNil(t, cutOffLimit, "site-a to lose the service", func() error {
		if _, ok := serviceOf(a, "stream"); ok {
			return errors.New("stream still consumed")
		}
		return nil
	})
}

// TestProviderLeavesConsumerMap: the consumer's map stops listing site-b
// as a provider of the service (as a coordinator's access policy does for
// a node it no longer lets reach it) while the provider itself still
// allows the connection; the consumer closes its connection to site-b
// within cutOffLimit, at both ends. The map is narrowed at the consumer
// only (Agent.SetMapFilter), so the consumer's own closing is what is
// tested: the provider still allows the connection.
func TestProviderLeavesConsumerMap(t *testing.T) {
	_, a, _, srv, conn, local := revokeSetup(t)
	start := time.Now()
	a.SetMapFilter(func(nm *wire.NetworkMap) {
		for i := range nm.Services {
			if nm.Services[i].Name == "stream" {
				nm.Services[i].Providers = nil
			}
		}
	})
	app := waitAppClosed(t, conn, start)
	service := waitServiceClosed(t, srv, start)
	t.Logf("site-b left site-a's map for stream: application side closed after %v, service side after %v", app.Round(time.Millisecond), service.Round(time.Millisecond))
	if c, greeting, err := dialGreeting(local); err == nil {
		c.Close()
		t.Fatalf("site-a still reaches stream without a provider (greeting %q)", greeting)
	}
}
