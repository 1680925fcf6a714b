package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// TestRotateKeyKeepsStreams rotates site A's key, as `meshlink rotate-key`
// does through A's local API, while a TCP stream from A to B's echo service
// carries bytes without pause: the stream survives, every byte comes back
// intact, keeps flowing after the rotation (so over a WireGuard session of
// the new key), and the coordinator and B's map hold A's new key.
func TestRotateKeyKeepsStreams(t *testing.T) {
	m := harness.NewMesh(t)
	srv := startStreamServer(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	stateA := t.TempDir()
	cfg := m.AgentConfig("site-a", harness.AgentOptions{})
	cfg.StateDir = stateA
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	svc := waitProviders(t, a, "stream", 1)
	conn, greeting, err := dialGreeting(svc.Local.String())
	if err != nil || greeting != "hello" {
		t.Fatalf("connect through the mesh: %q %v", greeting, err)
	}
	defer conn.Close()

	echoed, waitEchoed, stop := runStream(t, conn)
	waitEchoed("1 MiB before the rotation", 1<<20)

	oldKey := a.Status().Self.Key
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	before := echoed.Load()
	res, err := localapi.NewClient(stateA).RotateKey(ctx)
	if err != nil {
		t.Fatalf("rotate-key: %v", err)
	}
	newKey, err := key.ParsePublic(res.Key)
	if err != nil || res.Key[:12] == oldKey[:12] {
		t.Fatalf("rotate-key answered key %q (%v); old %q", res.Key, err, oldKey)
	}
	if n, err := m.Coord.Store().GetNode(ctx, wire.NodeID(a.Status().Self.ID)); err != nil || n.Key != newKey {
		t.Fatalf("coordinator's key for site-a: %v %v, want %v", n.Key, err, newKey)
	}
	tstest.WaitForNil(t, 10*time.Second, "site-b's map to hold site-a's new key", func() error {
		for _, p := range b.Status().Peers {
			if p.Name == "site-a" && p.Key == newKey.String()[:12]+"…" {
				return nil
			}
		}
		return errors.New("site-b has not got the new key yet")
	})
	after := echoed.Load()
	// 1 MiB more, all of it sent once site-b knew only the new key.
	waitEchoed("1 MiB after the rotation", after+1<<20)
	stop()
	t.Logf("rotation took %v; %d bytes echoed intact in all, %d during the rotation, %d after site-b had the new key",
		time.Since(start).Round(time.Millisecond), echoed.Load(), after-before, echoed.Load()-after)
}

// runStream keeps conn (to an echo service) busy with 16 KiB rounds, each
// checked as it comes back. echoed counts the bytes echoed intact;
// waitEchoed waits until n have been, failing the test if the stream
// broke; stop ends the stream and fails the test if it had broken.
func runStream(t *testing.T, conn net.Conn) (echoed *atomic.Int64, waitEchoed func(what string, n int64), stop func()) {
	echoed = new(atomic.Int64)
	quit := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		out, in := make([]byte, 16<<10), make([]byte, 16<<10)
		for {
			select {
			case <-quit:
				errc <- nil
				return
			default:
			}
			rand.Read(out)
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write(out); err != nil {
				errc <- fmt.Errorf("write after %d bytes: %w", echoed.Load(), err)
				return
			}
			if _, err := io.ReadFull(conn, in); err != nil {
				errc <- fmt.Errorf("read after %d bytes: %w", echoed.Load(), err)
				return
			}
			if !bytes.Equal(in, out) {
				errc <- fmt.Errorf("bytes came back altered after %d bytes", echoed.Load())
				return
			}
			echoed.Add(int64(len(in)))
		}
	}()
	var failed error
	waitEchoed = func(what string, n int64) {
		t.Helper()
		tstest.WaitForNil(t, 30*time.Second, what, func() error {
			select {
			case err := <-errc:
				failed = err
				t.Fatalf("stream: %v", err)
			default:
			}
			if got := echoed.Load(); got < n {
				return fmt.Errorf("%d of %d bytes echoed", got, n)
			}
			return nil
		})
	}
	var once sync.Once
	stop = func() {
		t.Helper()
		once.Do(func() {
			close(quit)
			if failed == nil {
				failed = <-errc
			}
		})
		if failed != nil {
			t.Fatalf("stream: %v", failed)
		}
	}
	t.Cleanup(func() {
		once.Do(func() { close(quit); conn.Close() })
	})
	return echoed, waitEchoed, stop
}
