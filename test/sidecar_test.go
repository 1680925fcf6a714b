package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
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
)

// TestGatewayExposeFile: a gateway exports the services listed in a file;
// an edit shows up at a consumer, a broken edit keeps the last good set
// (and the services keep working), and a fixed one applies.
func TestGatewayExposeFile(t *testing.T) {
	m := harness.NewMesh(t)
	db, legacy := startBackend(t, "db"), startBackend(t, "legacy")
	file := filepath.Join(t.TempDir(), "expose.yaml")
	write := func(s string) {
		t.Helper()
		// Replaced by a rename, as a ConfigMap update does.
		if err := os.WriteFile(file+".tmp", []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("- name: db\n  target: %s\n  port: 5432\n", db.addr()))
	cfg := m.AgentConfig("gw", harness.AgentOptions{})
	cfg.ExposeFile, cfg.ExposeFileEvery = file, 50*time.Millisecond
	gw, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cons := m.AddAgent("cons", harness.AgentOptions{})
	greet := func(name, want string) error {
		s, ok := serviceOf(cons, name)
		if !ok || !s.Listening || len(s.Providers) != 1 {
			return fmt.Errorf("%s: %+v", name, s)
		}
		c, got, err := dialGreeting(s.Local.String())
		if err != nil {
			return err
		}
		c.Close()
		if got != want {
			return fmt.Errorf("%s greeted %q, want %q", name, got, want)
		}
		return nil
	}
	tstest.WaitForNil(t, 10*time.Second, "db through the gateway", func() error { return greet("db", "db") })
	exported := func() []string {
		var out []string
		for _, e := range gw.Services().Exported {
			if e.Source != localapi.SourceFile {
				t.Fatalf("export %s has source %q, want %q", e.Name, e.Source, localapi.SourceFile)
			}
			out = append(out, e.Name)
		}
		return out
	}

	write(fmt.Sprintf("- name: db\n  target: %s\n  port: 5432\n- name: legacy\n  target: %s\n  port: 8080\n", db.addr(), legacy.addr()))
	tstest.WaitForNil(t, 10*time.Second, "legacy added by the edit", func() error { return greet("legacy", "legacy") })

	// Broken: an unknown key. The last good set stays.
	write(fmt.Sprintf("- name: db\n  target: %s\n  prot: 5432\n", db.addr()))
	// Nothing observable changes, so wait for the gateway to have read it:
	// a later good edit is applied only after this one was seen.
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if got := exported(); !slices.Equal(got, []string{"db", "legacy"}) {
			t.Fatalf("after a broken edit the gateway exports %v; want the last good [db legacy]", got)
		}
		if err := greet("legacy", "legacy"); err != nil {
			t.Fatalf("after a broken edit: %v", err)
		}
	}
	// Fixed: legacy only.
	write(fmt.Sprintf("- name: legacy\n  target: %s\n", legacy.addr()))
	tstest.WaitForNil(t, 10*time.Second, "db withdrawn by the fixed edit", func() error {
		if _, ok := serviceOf(cons, "db"); ok {
			return errors.New("db still in the consumer's map")
		}
		return greet("legacy", "legacy")
	})
	if got := exported(); !slices.Equal(got, []string{"legacy"}) {
		t.Fatalf("the gateway exports %v, want [legacy]", got)
	}
}

// TestSidecarShutdown: /readyz answers ready once the map is in; on
// Shutdown it turns unready at once, new inbound connections are refused
// while an open one goes on, Shutdown returns as soon as that one ends,
// and the ephemeral node is gone from its peer's map (not reaped later).
func TestSidecarShutdown(t *testing.T) {
	m := harness.NewMeshWith(t, func(c *coordinator.Config) { c.EphemeralGrace = time.Hour })
	web := startBackend(t, "web")
	health := freeAddr(t)
	cfg := m.AgentConfig("pod", harness.AgentOptions{
		Expose: []agent.Export{{Name: "web", Target: web.addr()}},
		Token:  m.TokenWith(coordinator.TokenOptions{Reusable: true, Ephemeral: true, Expires: time.Hour}),
	})
	cfg.HealthListen = health
	pod, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	readyz := func() (int, agent.Readiness) {
		resp, err := http.Get("http://" + health + "/readyz")
		if err != nil {
			return 0, agent.Readiness{}
		}
		defer resp.Body.Close()
		var rd agent.Readiness
		json.NewDecoder(resp.Body).Decode(&rd)
		return resp.StatusCode, rd
	}
	tstest.WaitFor(t, 10*time.Second, "/readyz 200", func() bool { c, _ := readyz(); return c == 200 })
	if resp, err := http.Get("http://" + health + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("/healthz: %v %v", resp, err)
	}

	cons := m.AddAgent("cons", harness.AgentOptions{})
	svc := waitProviders(t, cons, "web", 1)
	open, greeting, err := dialGreeting(svc.Local.String())
	if err != nil || greeting != "web" {
		t.Fatalf("dial web: %q %v", greeting, err)
	}
	tstest.WaitFor(t, 5*time.Second, "the open connection counted", func() bool {
		ex := pod.Services().Exported
		return len(ex) == 1 && ex[0].Open == 1
	})

	type result struct {
		res agent.ShutdownResult
		err error
		at  time.Time
	}
	done := make(chan result, 1)
	go func() {
		r, err := pod.Shutdown(context.Background(), 20*time.Second)
		done <- result{r, err, time.Now()}
	}()
	tstest.WaitFor(t, 5*time.Second, "/readyz 503 while draining", func() bool { c, _ := readyz(); return c == 503 })
	// A new connection is refused by the draining provider.
	if c, g, err := dialGreeting(svc.Local.String()); err == nil {
		c.Close()
		t.Fatalf("a new connection while draining got through (greeting %q)", g)
	}
	// The open one still carries bytes.
	echoIntact(t, open, 64<<10)
	select {
	case r := <-done:
		t.Fatalf("Shutdown returned with a connection open: %+v", r)
	default:
	}
	closed := time.Now()
	open.Close()
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return 10s after the last connection closed")
	}
	if r.err != nil || !r.res.Drained || !r.res.Left {
		t.Fatalf("Shutdown = %+v, %v; want drained and left", r.res, r.err)
	}
	t.Logf("Shutdown returned %v after the last connection closed", r.at.Sub(closed).Round(time.Millisecond))
	tstest.WaitFor(t, 2*time.Second, "the pod gone from its peer's map", func() bool {
		for _, p := range cons.Status().Peers {
			if p.Name == "pod" {
				return false
			}
		}
		return true
	})
}

// freeAddr is a loopback address nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
