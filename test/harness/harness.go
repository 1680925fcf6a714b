// Package harness runs whole meshes for tests and benchmarks: a coordinator
// and agents in one process over real UDP and TCP on loopback, or the built
// meshlink binary as real processes.
package harness

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
)

// Logger returns a logger that writes to t's output, each line started by
// name, at debug level when MESHLINK_TEST_DEBUG is set.
func Logger(t testing.TB, name string) *slog.Logger {
	lvl := slog.LevelInfo
	if os.Getenv("MESHLINK_TEST_DEBUG") != "" {
		lvl = slog.LevelDebug
	}
	return tstest.NewLogger(t, tstest.LogOptions{Level: lvl, Prefix: name + ": "})
}

// Mesh is an in-process coordinator with agents.
type Mesh struct {
	t     testing.TB
	dir   string
	Coord *coordinator.Server
	addr  string
	// AdminPassword is the first admin's one-time password, read from
	// coordinator.AdminPasswordFile in the data directory after a start
	// (until the admin replaces it); the console asks for a new one at the
	// first sign-in with it.
	AdminPassword string
	// mod adjusts the coordinator's configuration at every start.
	mod func(*coordinator.Config)
}

// NewMesh starts a coordinator on loopback in a temporary directory.
func NewMesh(t testing.TB) *Mesh { return NewMeshWith(t, nil) }

// NewMeshWith is NewMesh with mod applied to the coordinator's
// configuration (at every start).
func NewMeshWith(t testing.TB, mod func(*coordinator.Config)) *Mesh {
	m := &Mesh{t: t, dir: t.TempDir(), addr: "127.0.0.1:0", mod: mod}
	m.StartCoordinator()
	t.Cleanup(func() {
		if m.Coord != nil {
			m.Coord.Close()
		}
	})
	return m
}

// StartCoordinator (re)starts the coordinator on the same data directory and
// port as before.
func (m *Mesh) StartCoordinator() {
	mesh := m
	m.t.Helper()
	cfg := coordinator.Config{
		Listen: m.addr, DataDir: filepath.Join(m.dir, "coord"), Logger: Logger(m.t, "coordinator"),
		AllowLoopbackEndpoints: true, // the whole mesh is on loopback
		KeepAlive:              2 * time.Second, Out: tstest.Writer(m.t),
	}
	if m.mod != nil {
		m.mod(&cfg)
	}
	s, err := coordinator.New(cfg)
	if err != nil {
		m.t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		m.t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(cfg.DataDir, coordinator.AdminPasswordFile)); err == nil {
		mesh.AdminPassword = strings.TrimSpace(string(b))
	}
	m.Coord = s
	m.addr = s.Addr().String()
}

// StopCoordinator closes the coordinator; agents keep their data plane.
func (m *Mesh) StopCoordinator() {
	m.Coord.Close()
	m.Coord = nil
}

// Token mints a reusable token.
func (m *Mesh) Token() string {
	return m.TokenWith(coordinator.TokenOptions{Reusable: true, Expires: time.Hour})
}

// TokenWith mints a token with the given options.
func (m *Mesh) TokenWith(o coordinator.TokenOptions) string {
	m.t.Helper()
	tok, err := m.Coord.CreateToken(context.Background(), o)
	if err != nil {
		m.t.Fatal(err)
	}
	return tok
}

// Dir is the mesh's temporary directory.
func (m *Mesh) Dir() string { return m.dir }

// AgentOptions tunes AddAgent.
type AgentOptions struct {
	Expose []agent.Export
	// ProxyRange defaults to a distinct 127.N.0.0/16 per agent.
	ProxyRange netip.Prefix
	StateDir   string
	// Token defaults to a fresh reusable one; "-" joins with none.
	Token string
	// Region is the agent's --region.
	Region string
}

var proxySeq struct {
	mu sync.Mutex
	n  int
}

// nextProxyRange hands out 127.101.0.0/16, 127.102.0.0/16, … so agents in
// one process never compete for local addresses.
func nextProxyRange() netip.Prefix {
	proxySeq.mu.Lock()
	defer proxySeq.mu.Unlock()
	proxySeq.n++
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{127, byte(100 + proxySeq.n%150), 0, 0}), 16)
}

// AddAgent joins and starts an agent; it is closed at the end of the test.
func (m *Mesh) AddAgent(name string, o AgentOptions) *agent.Agent {
	m.t.Helper()
	a, err := m.StartAgent(name, o)
	if err != nil {
		m.t.Fatal(err)
	}
	return a
}

// AgentConfig is the configuration AddAgent uses, for tests that vary it.
func (m *Mesh) AgentConfig(name string, o AgentOptions) agent.Config {
	if !o.ProxyRange.IsValid() {
		o.ProxyRange = nextProxyRange()
	}
	if o.StateDir == "" {
		o.StateDir = filepath.Join(m.dir, name)
	}
	switch o.Token {
	case "":
		o.Token = m.Token()
	case "-":
		o.Token = ""
	}
	return agent.Config{
		StateDir: o.StateDir, Join: o.Token, Name: name, DNS: "127.0.0.1:0",
		Upstreams: []string{}, Expose: o.Expose, ProxyRange: o.ProxyRange,
		Logger: Logger(m.t, name), RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond,
		DialTimeout: time.Second, Region: o.Region,
	}
}

// StartAgent is AddAgent returning the error from New or Start.
func (m *Mesh) StartAgent(name string, o AgentOptions) (*agent.Agent, error) {
	return StartAgent(m.t, m.AgentConfig(name, o))
}

// StartAgent creates and starts an agent from cfg, closing it at the end of
// the test.
func StartAgent(t testing.TB, cfg agent.Config) (*agent.Agent, error) {
	a, err := agent.New(cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		return nil, err
	}
	t.Cleanup(func() { a.Close() })
	return a, nil
}

var builds struct {
	mu   sync.Mutex
	done map[string]string
}

// Binary builds cmd/meshlink once per test process and returns its path;
// MESHLINK_BINARY names a prebuilt one instead.
func Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("MESHLINK_BINARY"); p != "" {
		return p
	}
	return Build(t, "./cmd/meshlink")
}

// Build builds the main package pkg (relative to the module root) once per
// test process and returns the binary's path.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	builds.mu.Lock()
	defer builds.mu.Unlock()
	if p, ok := builds.done[pkg]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "meshlink-bin")
	if err != nil {
		t.Fatal(err)
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	if builds.done == nil {
		builds.done = map[string]string{}
	}
	builds.done[pkg] = out
	return out
}

// StopProcess interrupts cmd's process, as Ctrl-C would, and waits for it
// to exit, killing it if it has not after 5 s.
func StopProcess(cmd *exec.Cmd) {
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// ProxyRange hands out a loopback range no other agent of the process
// uses, for agents configured without a Mesh.
func ProxyRange() netip.Prefix { return nextProxyRange() }
