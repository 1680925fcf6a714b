package control_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/bench/control"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

var (
	keepMaps    = flag.Bool("control.keepmaps", true, "TestMapsMatch: whole maps")
	benchN      = flag.Int("control.n", 0, "run TestBenchControl with this many nodes (0 skips it)")
	benchRate   = flag.Float64("control.rate", 200, "TestBenchControl: nodes joining per second")
	benchStorm  = flag.Bool("control.storm", true, "TestBenchControl: end with a reconnect storm")
	benchIdle   = flag.Duration("control.idle", 20*time.Second, "TestBenchControl: how long idle CPU is measured")
	benchArgs   = flag.String("control.args", "", "TestBenchControl: extra coordinator flags, space-separated")
	benchGroup  = flag.Int("control.policy", 0, "TestBenchControl: run under a policy of tagged groups of this many nodes, each reaching the services of two groups (0: no policy, every map holds every node)")
	benchPprof  = flag.String("control.pprof", "", "TestBenchControl: save the coordinator's CPU profiles of the join phase (join.cpu) and of the idle window (idle.cpu), and its heap, goroutines and memory statistics after it (heap.pprof, goroutines.txt, memstats.txt), in this directory")
	benchSpread = flag.Duration("control.stormspread", 10*time.Second, "TestBenchControl: spread the storm's reconnects over this window, as agents do (0: all at once)")
)

// TestMapsMatch runs the load at a small N against an in-process
// coordinator and checks what every agent would see: each stream, built
// from its full map and the deltas after it, ends with exactly the map the
// coordinator holds for its node.
func TestMapsMatch(t *testing.T) { mapsMatch(t, 0) }

// TestMapsMatchOneSlot is TestMapsMatch with one slot for the woken
// streams' messages (Config.MapSendSlots): every stream waits its turn,
// and a slow one gives its slot up before its write ends; every stream
// still ends with the coordinator's map.
func TestMapsMatchOneSlot(t *testing.T) { mapsMatch(t, 1) }

func mapsMatch(t *testing.T, slots int) {
	const nodes = 60
	m := harness.NewMeshWith(t, func(c *coordinator.Config) {
		c.MaxConnsPerSource = 4 * nodes
		c.MapSendSlots = slots
		c.Logger = nil
	})
	g, err := control.New(control.Config{Token: m.Token(), ServiceEvery: 10, KeepMaps: *keepMaps})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sc := control.Scenario{Nodes: nodes, JoinRate: 400, Burst: 5, Timeout: 30 * time.Second, Storm: true}
	r, err := sc.Run(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	r.Print(&b)
	t.Log("\n" + b.String())
	sameMaps(t, ctx, m, g)
}

// TestMapsMatchPolicy is TestMapsMatch under an access policy, which
// filters every map: nodes join, services change, a provider leaves its
// service, the policy changes, all streams reconnect; every stream ends
// with its node's filtered map.
func TestMapsMatchPolicy(t *testing.T) {
	const nodes = 40
	m := harness.NewMeshWith(t, func(c *coordinator.Config) {
		c.MaxConnsPerSource = 4 * nodes
		c.Logger = nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	setPolicy := func(text string) {
		t.Helper()
		if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", text, "test"); err != nil {
			t.Fatal(err)
		}
	}
	var few []string
	for i := 1; i < nodes; i += 3 {
		few = append(few, "node:bench-"+strconv.Itoa(i))
	}
	setPolicy("rules:\n  - from: [" + strings.Join(few, ", ") + "]\n    to: [svc-0, svc-10]\n  - from: [\"*\"]\n    to: [svc-20]\n")
	g, err := control.New(control.Config{Token: m.Token(), ServiceEvery: 10, KeepMaps: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	var wg sync.WaitGroup
	errs := make(chan error, nodes+1)
	for i := range nodes {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- g.Join(ctx, i) }()
	}
	wg.Wait()
	byIndex := map[int]*control.Node{}
	for _, n := range g.Nodes() {
		byIndex[n.Index] = n
	}
	for range nodes {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	sameMaps(t, ctx, m, g)
	if err := byIndex[0].Expose(ctx, "svc-0", 2000); err != nil {
		t.Fatal(err)
	}
	if err := byIndex[11].Expose(ctx, "svc-10", 3000); err != nil { // a second provider
		t.Fatal(err)
	}
	if err := g.Join(ctx, nodes); err != nil {
		t.Fatal(err)
	}
	sameMaps(t, ctx, m, g)
	setPolicy("rules:\n  - from: [" + strings.Join(few[1:], ", ") + ", node:bench-2]\n    to: [svc-0, svc-30]\n  - from: [\"*\"]\n    to: [svc-10]\n")
	sameMaps(t, ctx, m, g)
	for _, n := range g.Nodes() {
		n.Disconnect()
		if err := n.Connect(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sameMaps(t, ctx, m, g)
	setPolicy("")
	sameMaps(t, ctx, m, g)
}

// TestMapsMatchGroups is TestMapsMatch under a policy of tagged groups
// (the bench's -control.policy): each group reaches the services of two,
// so that maps are filtered by class of node; every stream ends with its
// node's filtered map after the joins, changes, a burst and a reconnect
// storm, and the figures count only the streams each change concerns.
func TestMapsMatchGroups(t *testing.T) {
	const nodes, size, every = 48, 8, 4
	m := harness.NewMeshWith(t, func(c *coordinator.Config) {
		c.MaxConnsPerSource = 4 * nodes
		c.Logger = nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	gr := control.NewGroups(nodes, size, every)
	if _, err := m.Coord.SetPolicy(ctx, "policy.yaml", gr.Policy(nodes+1), "test"); err != nil {
		t.Fatal(err)
	}
	cfg := control.Config{Token: m.Token(), ServiceEvery: every, KeepMaps: true, Groups: gr}
	for k := range gr.Count {
		cfg.GroupTokens = append(cfg.GroupTokens, m.TokenWith(coordinator.TokenOptions{Reusable: true, Expires: time.Hour, Tags: []string{gr.Tag(k)}}))
	}
	g, err := control.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	sc := control.Scenario{Nodes: nodes, JoinRate: 400, Burst: 5, Timeout: 30 * time.Second, Storm: true, StormSpread: time.Second, Groups: gr}
	r, err := sc.Run(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	r.Print(&b)
	t.Log("\n" + b.String())
	sameMaps(t, ctx, m, g)
	// Filtered: a consumer's map holds the providers it may reach, not
	// the mesh.
	n := g.Nodes()[1]
	if want, _, _ := m.Coord.NodeMap(ctx, n.ID); want == nil || len(want.Peers) >= nodes/2 {
		t.Fatalf("%s's map: %v; want a few peers", n.Name, want)
	}
}

// sameMaps waits until every stream's map is the coordinator's map of its
// node.
func sameMaps(t *testing.T, ctx context.Context, m *harness.Mesh, g *control.Gen) {
	t.Helper()
	for _, n := range g.Nodes() {
		tstest.WaitForNil(t, 30*time.Second, n.Name+"'s map matches the coordinator's", func() error {
			want, ok, err := m.Coord.NodeMap(ctx, n.ID)
			if err != nil || !ok {
				return fmt.Errorf("coordinator has no map of %s: %v", n.Name, err)
			}
			got := n.Map()
			if d := mapDiff(normal(got), normal(*want)); d != "" {
				return fmt.Errorf("%s: %s", n.Name, d)
			}
			return nil
		})
	}
}

func normal(nm wire.NetworkMap) wire.NetworkMap {
	nm.Peers = slices.Clone(nm.Peers)
	slices.SortFunc(nm.Peers, func(a, b wire.Node) int { return int(a.ID) - int(b.ID) })
	nm.Services = slices.Clone(nm.Services)
	slices.SortFunc(nm.Services, func(a, b wire.Service) int { return strings.Compare(a.Name, b.Name) })
	for i := range nm.Peers {
		nm.Peers[i].LastSeen = nm.Peers[i].LastSeen.UTC().Round(0)
		nm.Peers[i].KeyExpiry = nm.Peers[i].KeyExpiry.UTC().Round(0)
	}
	nm.Self.LastSeen = nm.Self.LastSeen.UTC().Round(0)
	nm.Self.KeyExpiry = nm.Self.KeyExpiry.UTC().Round(0)
	if len(nm.Relays) == 0 {
		nm.Relays = nil
	}
	return nm
}

func mapDiff(got, want wire.NetworkMap) string {
	if len(got.Peers) != len(want.Peers) {
		return fmt.Sprintf("%d peers, want %d", len(got.Peers), len(want.Peers))
	}
	for i := range got.Peers {
		if !reflect.DeepEqual(got.Peers[i], want.Peers[i]) {
			return fmt.Sprintf("peer %+v, want %+v", got.Peers[i], want.Peers[i])
		}
	}
	if !reflect.DeepEqual(got.Services, want.Services) {
		return fmt.Sprintf("services %+v, want %+v", got.Services, want.Services)
	}
	if !reflect.DeepEqual(got.Self, want.Self) {
		return fmt.Sprintf("self %+v, want %+v", got.Self, want.Self)
	}
	if !reflect.DeepEqual(got.Relays, want.Relays) || got.Domain != want.Domain {
		return fmt.Sprintf("relays/domain %+v %q, want %+v %q", got.Relays, got.Domain, want.Relays, want.Domain)
	}
	return ""
}

// TestBenchControl is the load at -control.n nodes against the built
// meshlink coordinator as its own process (so that its memory and CPU are
// its own): make bench-control N=10000. It prints figures and checks no
// timing.
func TestBenchControl(t *testing.T) {
	if *benchN <= 0 {
		t.Skip("pass -control.n=N (make bench-control N=...)")
	}
	bin := harness.Binary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	port := freePort(t)
	args := []string{"coordinator", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data", data, "--allow-loopback-endpoints",
		"--max-conns", fmt.Sprint(2**benchN + 1000), "--max-conns-per-source", fmt.Sprint(2**benchN + 1000), "--log-level", "warn",
		"--metrics-listen", "off"} // its default port may be another process's
	debugAddr := ""
	if *benchPprof != "" {
		if err := os.MkdirAll(*benchPprof, 0o755); err != nil {
			t.Fatal(err)
		}
		debugAddr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		args = append(args, "--debug-listen", debugAddr)
	}
	args = append(args, strings.Fields(*benchArgs)...)
	logf, err := os.Create(filepath.Join(dir, "coordinator.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("coordinator log (tail):\n%s", b)
		}
	})
	var token string
	tstest.WaitForNil(t, 30*time.Second, "a token from the coordinator", func() error {
		out, err := exec.Command(bin, "token", "create", "--data", data, "--reusable").Output()
		token = strings.TrimSpace(string(out))
		return err
	})
	cfg := control.Config{Token: token, ServiceEvery: 50, Logf: t.Logf}
	if *benchGroup > 0 {
		// The joining node of the run is node N: in the policy too.
		cfg.Groups = control.NewGroups(*benchN, *benchGroup, cfg.ServiceEvery)
		pf := filepath.Join(dir, "policy.yaml")
		if err := os.WriteFile(pf, []byte(cfg.Groups.Policy(*benchN+1)), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bin, "policy", "set", "--data", data, pf).CombinedOutput(); err != nil {
			t.Fatalf("policy set: %v: %s", err, out)
		}
		for k := range cfg.Groups.Count {
			out, err := exec.Command(bin, "token", "create", "--data", data, "--reusable", "--tags", strings.TrimPrefix(cfg.Groups.Tag(k), "tag:")).Output()
			if err != nil {
				t.Fatalf("token for group %d: %v", k, err)
			}
			cfg.GroupTokens = append(cfg.GroupTokens, strings.TrimSpace(string(out)))
		}
		t.Logf("policy: %d groups of %d nodes", cfg.Groups.Count, *benchGroup)
	}
	g, err := control.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	sc := control.Scenario{Nodes: *benchN, JoinRate: *benchRate, Burst: 20, Timeout: 120 * time.Second, Idle: *benchIdle, Storm: *benchStorm,
		StormSpread: *benchSpread, Groups: cfg.Groups,
		Proc:   func() (int64, time.Duration, error) { return control.ProcStats(cmd.Process.Pid) },
		Wait:   func() time.Duration { return control.ProcWait(cmd.Process.Pid) },
		Writes: func() int64 { return control.ProcWrites(cmd.Process.Pid) },
		Peak:   func() int64 { return control.ProcPeak(cmd.Process.Pid) }}
	var profiles sync.WaitGroup
	defer profiles.Wait()
	if debugAddr != "" {
		// Profiles are taken beside the run, never in its way: a failed
		// one is logged.
		save := func(name, path string) {
			defer profiles.Done()
			resp, err := http.Get("http://" + debugAddr + path)
			if err != nil {
				t.Logf("profile %s: %v", name, err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(filepath.Join(*benchPprof, name))
			if err == nil {
				_, err = io.Copy(f, resp.Body)
				f.Close()
			}
			if err != nil {
				t.Logf("profile %s: %v", name, err)
			}
		}
		sc.Phase = func(phase string, d time.Duration) {
			secs := max(1, int(min(d, 30*time.Second)/time.Second))
			switch phase {
			case "join", "idle":
				profiles.Add(1)
				go save(phase+".cpu", fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs))
			case "end":
				profiles.Add(3)
				save("heap.pprof", "/debug/pprof/heap?gc=1") // what is live now, not at the last cycle
				save("goroutines.txt", "/debug/pprof/goroutine?debug=1")
				// The runtime's memory split (heap in use, idle, released to
				// the OS, stacks, next GC goal) at the end of its listing:
				// what the RSS is made of beyond the live heap.
				save("memstats.txt", "/debug/pprof/heap?debug=1")
			}
		}
	}
	r, err := sc.Run(ctx, g)
	if r != nil {
		r.Print(os.Stdout)
	}
	if err != nil {
		t.Fatal(err)
	}
}
