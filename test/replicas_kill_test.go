package test

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/pgtest"
)

// coordProc is a coordinator running as a process of its own.
type coordProc struct {
	t               *testing.T
	bin, dir, addr  string
	url, db, others string
	cmd             *exec.Cmd
}

func (p *coordProc) start() {
	p.t.Helper()
	cmd := exec.Command(p.bin, "coordinator", "--data", p.dir, "--listen", p.addr, "--url", p.url, "--store", p.db,
		"--replica-urls", p.others, "--metrics-listen", "off", "--allow-loopback-endpoints")
	cmd.Stdout, cmd.Stderr = tstest.Writer(p.t), tstest.Writer(p.t)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.cmd = cmd
	tstest.WaitForNil(p.t, 30*time.Second, "coordinator "+p.url+" to listen", func() error {
		c, err := net.DialTimeout("unix", filepath.Join(p.dir, "admin.sock"), time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// kill ends the coordinator with SIGKILL: no shutdown of any kind.
func (p *coordProc) kill() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	p.cmd = nil
}

func (p *coordProc) token(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tok, err := coordinator.NewAdminClient(p.dir).CreateToken(ctx, coordinator.TokenOptions{Reusable: true})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestReplicaKilledWithSIGKILL: two coordinator processes on one
// PostgreSQL database, agents spread over both. Killing one (SIGKILL)
// during a transfer interrupts no transfer, and its agents move to the
// other; killing the other right after a change it committed loses
// nothing: the change reaches every agent and is in the store.
func TestReplicaKilledWithSIGKILL(t *testing.T) {
	db := pgtest.DB(t)
	bin := harness.Binary(t)
	dir := t.TempDir()
	addrA, urlA := loopbackURL(t)
	addrB, urlB := loopbackURL(t)
	a := &coordProc{t: t, bin: bin, dir: filepath.Join(dir, "a"), addr: addrA, url: urlA, db: db, others: urlB}
	b := &coordProc{t: t, bin: bin, dir: filepath.Join(dir, "b"), addr: addrB, url: urlB, db: db, others: urlA}
	t.Cleanup(a.kill)
	t.Cleanup(b.kill)
	a.start()
	copyCoordinatorDir(t, a.dir, b.dir)
	b.start()

	web := startBackend(t, "site-b")
	cfg := func(name, tok string, exp []agent.Export) agent.Config {
		return agent.Config{
			StateDir: filepath.Join(dir, name), Join: tok, Name: name, DNS: "127.0.0.1:0", Upstreams: []string{},
			Expose: exp, ProxyRange: harness.ProxyRange(), Logger: harness.Logger(t, name),
			RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond, DialTimeout: time.Second,
		}
	}
	consumer, err := harness.StartAgent(t, cfg("site-a", a.token(t), nil))
	if err != nil {
		t.Fatal(err)
	}
	provider, err := harness.StartAgent(t, cfg("site-b", b.token(t), []agent.Export{{Name: "web", Target: web.addr()}}))
	if err != nil {
		t.Fatal(err)
	}
	svc := waitProviders(t, consumer, "web", 1)
	waitPeer(t, provider, "site-a")
	connectedTo := func(ag *agent.Agent, url string) func() error {
		return func() error {
			if st := ag.Status(); !st.Coordinator.Connected || st.Coordinator.URL != url {
				return fmt.Errorf("on %s, connected %v: %s", st.Coordinator.URL, st.Coordinator.Connected, st.Coordinator.LastError)
			}
			return nil
		}
	}
	tstest.WaitForNil(t, 10*time.Second, "the consumer on A", connectedTo(consumer, urlA))
	tstest.WaitForNil(t, 10*time.Second, "the provider on B", connectedTo(provider, urlB))

	// 1. SIGKILL A during a transfer.
	conn, _ := dialGreetingOnceAllowed(t, svc.Local.String())
	defer conn.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		echoIntact(t, conn, 16<<20)
	}()
	start := time.Now()
	a.kill()
	tstest.WaitForNil(t, 15*time.Second, "the consumer to move to B", connectedTo(consumer, urlB))
	moved := time.Since(start)
	<-done
	if t.Failed() {
		return
	}

	// 2. A comes back; SIGKILL B right after it committed a change, with
	// a transfer running.
	a.start()
	done = make(chan struct{})
	go func() {
		defer close(done)
		echoIntact(t, conn, 16<<20)
	}()
	if _, _, err := provider.Expose(context.Background(), agent.Export{Name: "api", Target: web.addr(), Port: 7003}); err != nil {
		t.Fatal(err)
	}
	b.kill()
	start = time.Now()
	api := waitProviders(t, consumer, "api", 1)
	arrived := time.Since(start)
	tstest.WaitForNil(t, 15*time.Second, "the provider to move to A", connectedTo(provider, urlA))
	tstest.WaitForNil(t, 15*time.Second, "the consumer to move to A", connectedTo(consumer, urlA))
	<-done
	c2, who, err := dialGreeting(api.Local.String())
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if who != "site-b" {
		t.Fatalf("api greeting %q", who)
	}

	// Nothing lost in the store.
	ctx := context.Background()
	st, err := store.OpenPostgres(ctx, db, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	nodes, _ := st.ListNodes(ctx)
	provs, _ := st.ListProviders(ctx)
	var names []string
	for _, p := range provs {
		names = append(names, p.Service)
	}
	if len(nodes) != 2 || !slices.Contains(names, "web") || !slices.Contains(names, "api") {
		t.Fatalf("store after the kills: %d nodes, providers of %v; want 2 nodes providing web and api", len(nodes), names)
	}
	t.Logf("SIGKILL of A mid-transfer: the consumer was on B %v later; SIGKILL of B after a change: the change reached the consumer %v later", moved, arrived)
}
