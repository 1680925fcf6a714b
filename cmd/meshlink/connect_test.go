package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// TestConnect: `meshlink connect` at site A reaches B's echo service, both
// from stdin/stdout and from a local port, and ends when cancelled.
func TestConnect(t *testing.T) {
	echo := echoServer(t)
	m := harness.NewMesh(t)
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "echo", Target: echo}}})
	cfg := m.AgentConfig("site-a", harness.AgentOptions{})
	if _, err := harness.StartAgent(t, cfg); err != nil {
		t.Fatal(err)
	}
	lc := localapi.NewClient(cfg.StateDir)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var target string
	tstest.WaitForNil(t, 5*time.Second, "echo in site-a's map", func() (err error) {
		target, err = serviceAddr(ctx, lc, "echo")
		return err
	})
	if _, err := serviceAddr(ctx, lc, "nope"); err == nil || !strings.Contains(err.Error(), `no service "nope"`) {
		t.Fatalf("unknown service: %v, want a clear error", err)
	}

	t.Run("stdio", func(t *testing.T) {
		want := strings.Repeat("through the mesh\n", 10000)
		var out bytes.Buffer
		if err := connectStdio(ctx, strings.NewReader(want), &out, target); err != nil {
			t.Fatal(err)
		}
		if out.String() != want {
			t.Fatalf("echoed %d bytes, want the %d sent", out.Len(), len(want))
		}
	})

	t.Run("listen", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lctx, lcancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- connectListen(lctx, ln, target) }()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "ping\n")
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
			t.Fatalf("through the local port: %q %v", got, err)
		}
		lcancel() // Ctrl-C
		if err := <-done; err != nil {
			t.Fatalf("connect after Ctrl-C: %v", err)
		}
		if _, err := c.Read(got); err == nil {
			t.Fatal("the open connection survived Ctrl-C")
		}
	})
}
