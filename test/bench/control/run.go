package control

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Scenario is one run of the load: N nodes join at JoinRate, then one
// service change, one join, a burst of changes and a reconnect storm are
// each timed until every stream has them.
type Scenario struct {
	Nodes    int
	JoinRate float64       // registrations started per second
	Burst    int           // service changes in the burst (within one second)
	Timeout  time.Duration // for each phase to reach every stream
	Idle     time.Duration // how long idle CPU is measured (0 skips)
	Storm    bool          // also drop and reconnect every stream at once
	// StormSpread, if set, spreads the storm's reconnects over a random
	// point of [StormSpread/20, StormSpread] each, as agents do after
	// losing an established stream (agent reconnectDelay).
	StormSpread time.Duration
	// Groups is the policy the coordinator holds (nil: allow all); each
	// phase then waits only for the streams whose maps it changes.
	Groups *Groups
	// Proc reads the coordinator's resident memory and CPU time so far;
	// nil leaves them out.
	Proc func() (rss int64, cpu time.Duration, err error)
	// Wait reads how long the coordinator's threads were runnable but
	// not running so far (the machine's other load); nil leaves it out.
	Wait func() time.Duration
	// Writes reads how many write system calls the coordinator has made
	// so far (/proc/PID/io syscw); nil leaves them out.
	Writes func() int64
	// Peak reads the coordinator's highest resident memory so far
	// (/proc/PID/status VmHWM); nil leaves it out.
	Peak func() int64
	// Phase, if set, is told when a phase begins ("join", "idle") and how
	// long it is expected to last, and when the run ends ("end"): the
	// place to take the coordinator's profiles (-control.pprof).
	Phase func(name string, d time.Duration)
}

func (sc Scenario) phase(name string, d time.Duration) {
	if sc.Phase != nil {
		sc.Phase(name, d)
	}
}

// Report holds the figures of a run.
type Report struct {
	Nodes                   int
	JoinTook, SettleTook    time.Duration
	Register                []time.Duration // sorted
	RegisterConn            []time.Duration // sorted: the connection's part (TCP, TLS)
	Change, Join, BurstRes  Result
	BurstTook               time.Duration // from the burst's first change until everyone has all
	Storm                   time.Duration
	RSS                     int64
	CPUJoin, CPUChange      time.Duration // coordinator CPU
	CPUBurst, CPUIdle       time.Duration
	WaitJoin                time.Duration // coordinator runnable without a CPU, join phase
	IdleFor                 time.Duration
	WritesIdle              int64 // write system calls in the idle window (0: not read)
	PeakRSS                 int64 // highest RSS up to the end of the idle window (0: not read)
	HaveProc, HaveStorm     bool
	Drops                   int64 // map streams that ended on their own
	Retries                 int64 // registrations and exposes tried again
	JoinNode                *Node
	Groups                  *Groups
	StormSpread             time.Duration
	ChangedNode, ChangePort string
}

func (sc Scenario) proc() (int64, time.Duration) {
	if sc.Proc == nil {
		return 0, 0
	}
	rss, cpu, _ := sc.Proc()
	return rss, cpu
}

// Run runs the scenario on g.
func (sc Scenario) Run(ctx context.Context, g *Gen) (*Report, error) {
	if sc.Timeout <= 0 {
		sc.Timeout = 60 * time.Second
	}
	r := &Report{Nodes: sc.Nodes, HaveProc: sc.Proc != nil, Groups: sc.Groups, StormSpread: sc.StormSpread}
	defer func() { r.Drops, r.Retries = g.Drops.Load(), g.Retries.Load() }()
	_, cpu0 := sc.proc()
	var wait0 time.Duration
	if sc.Wait != nil {
		wait0 = sc.Wait()
	}
	start := time.Now()
	if sc.JoinRate > 0 {
		sc.phase("join", time.Duration(float64(sc.Nodes)/sc.JoinRate*float64(time.Second)))
	}
	// Join: node i starts at i/JoinRate; registration, service, stream.
	var wg sync.WaitGroup
	errs := make(chan error, sc.Nodes)
	for i := 0; i < sc.Nodes; i++ {
		if sc.JoinRate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / sc.JoinRate * float64(time.Second)))); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := join(ctx, g, i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	r.JoinTook = time.Since(start)
	nodes := g.Nodes()
	for _, n := range nodes {
		r.Register = append(r.Register, n.Register)
		r.RegisterConn = append(r.RegisterConn, n.RegisterConn)
	}
	slices.Sort(r.Register)
	slices.Sort(r.RegisterConn)
	services := map[string]uint16{}
	provider := map[string]int{} // service → its provider's index
	for _, n := range nodes {
		if s, ok := n.Service(); ok {
			services[s] = 1000
			provider[s] = n.Index
		}
	}
	gr := sc.Groups
	provides := func(i int) bool { _, ok := provider["svc-"+strconv.Itoa(i)]; return ok }
	// visible is the part of want node n's map lists.
	visible := func(n *Node, want map[string]uint16) map[string]uint16 {
		if gr == nil {
			return want
		}
		out := map[string]uint16{}
		for k, v := range want {
			if gr.sees(n.Index, provider[k]) {
				out[k] = v
			}
		}
		return out
	}
	// audience is the nodes whose maps list one of the services.
	audience := func(nodes []*Node, svcs ...string) []*Node {
		var out []*Node
		for _, n := range nodes {
			for _, sv := range svcs {
				if gr.sees(n.Index, provider[sv]) {
					out = append(out, n)
					break
				}
			}
		}
		return out
	}
	settled := func(nodes []*Node) func(*Node) bool {
		peers := gr.expectPeers(nodes, provides)
		views := map[int]map[string]uint16{}
		for _, n := range nodes {
			views[n.Index] = visible(n, services)
		}
		return func(n *Node) bool { return n.connected && n.nOnline == peers[n.Index] && portsAre(n, views[n.Index]) }
	}
	// Settled: every stream knows every node its map lists online, and
	// every service it lists.
	w := g.Watch(-1, settled(nodes))
	w.Recheck()
	if _, err := w.Wait(sc.Timeout); err != nil {
		return r, fmt.Errorf("settle after joining: %w", err)
	}
	r.SettleTook = time.Since(start)
	_, cpu1 := sc.proc()
	r.CPUJoin = cpu1 - cpu0
	if sc.Wait != nil {
		r.WaitJoin = sc.Wait() - wait0
	}

	// One service change.
	var prov *Node
	for _, n := range nodes {
		if _, ok := n.Service(); ok {
			prov = n
			break
		}
	}
	if prov != nil {
		name, _ := prov.Service()
		r.ChangedNode, r.ChangePort = name, "2000"
		w := g.WatchSet(time.Now(), audience(nodes, name), -1, func(n *Node) bool { return n.services[name] == 2000 })
		if err := prov.Expose(ctx, name, 2000); err != nil {
			return r, err
		}
		res, err := w.Wait(sc.Timeout)
		r.Change = res
		if err != nil {
			return r, fmt.Errorf("service change: %w", err)
		}
		services[name] = 2000
	}
	_, cpu2 := sc.proc()
	r.CPUChange = cpu2 - cpu1

	// One join: every other stream learns the new node, online.
	{
		t0 := time.Now()
		j, err := g.Add(ctx, sc.Nodes)
		if err != nil {
			return r, err
		}
		var learn []*Node
		for _, n := range g.Nodes() {
			if n != j && gr.peer(n.Index, j.Index, provides) {
				learn = append(learn, n)
			}
		}
		w := g.WatchSet(t0, learn, -1, func(n *Node) bool { return n.online.get(j.ID) })
		if err := j.Connect(ctx); err != nil {
			return r, err
		}
		res, err := w.Wait(sc.Timeout)
		r.Join, r.JoinNode = res, j
		if err != nil {
			return r, fmt.Errorf("join: %w", err)
		}
	}
	_, cpu3 := sc.proc()

	// A burst: Burst service changes spread over one second.
	if sc.Burst > 0 {
		var provs []*Node
		for _, n := range nodes {
			if _, ok := n.Service(); ok && len(provs) < sc.Burst {
				provs = append(provs, n)
			}
		}
		want := map[string]uint16{}
		var names []string
		for i, p := range provs {
			name, _ := p.Service()
			want[name] = uint16(3000 + i)
			names = append(names, name)
		}
		aud := audience(g.Nodes(), names...)
		views := map[int]map[string]uint16{}
		for _, n := range aud {
			views[n.Index] = visible(n, want)
		}
		w := g.WatchSet(time.Now(), aud, -1, func(n *Node) bool { return portsAre(n, views[n.Index]) })
		var bwg sync.WaitGroup
		burstErrs := make(chan error, len(provs))
		for i, p := range provs {
			time.Sleep(time.Second / time.Duration(len(provs))) // the load's own pacing, not a wait for a condition
			n, _ := p.Service()
			bwg.Add(1)
			go func() {
				defer bwg.Done()
				if err := p.Expose(ctx, n, uint16(3000+i)); err != nil {
					burstErrs <- err
				}
			}()
		}
		bwg.Wait()
		select {
		case err := <-burstErrs:
			return r, err
		default:
		}
		res, err := w.Wait(sc.Timeout)
		r.BurstRes = res
		if len(res.Delays) > 0 {
			r.BurstTook = res.Delays[len(res.Delays)-1]
		}
		if err != nil {
			return r, fmt.Errorf("burst: %w", err)
		}
		for k, v := range want {
			services[k] = v
		}
	}
	_, cpu4 := sc.proc()
	r.CPUBurst = cpu4 - cpu3

	if sc.Idle > 0 {
		sc.phase("idle", sc.Idle)
		var w0 int64
		if sc.Writes != nil {
			w0 = sc.Writes()
		}
		time.Sleep(sc.Idle) // measuring idle CPU is waiting on purpose
		_, cpu5 := sc.proc()
		r.CPUIdle, r.IdleFor = cpu5-cpu4, sc.Idle
		if sc.Writes != nil {
			if w1 := sc.Writes(); w0 >= 0 && w1 >= w0 {
				r.WritesIdle = w1 - w0
			}
		}
	}
	r.RSS, _ = sc.proc()
	if sc.Peak != nil {
		r.PeakRSS = sc.Peak()
	}
	sc.phase("end", 0)

	if sc.Storm {
		all := g.Nodes()
		for _, n := range all {
			n.Disconnect()
		}
		t0 := time.Now()
		w := g.Watch(-1, settled(all))
		var swg sync.WaitGroup
		stormErrs := make(chan error, len(all))
		for _, n := range all {
			swg.Add(1)
			go func() {
				defer swg.Done()
				if sc.StormSpread > 0 {
					lo := sc.StormSpread / 20
					time.Sleep(lo + rand.N(sc.StormSpread-lo)) // the agents' own spread, not a wait for a condition
				}
				if err := connectRetry(ctx, n, sc.Timeout); err != nil {
					stormErrs <- err
				}
			}()
		}
		swg.Wait()
		select {
		case err := <-stormErrs:
			return r, err
		default:
		}
		if _, err := w.Wait(sc.Timeout); err != nil {
			return r, fmt.Errorf("reconnect storm: %w", err)
		}
		r.Storm, r.HaveStorm = time.Since(t0), true
	}
	return r, nil
}

// Join makes node i, registers it, exposes its service if it has one and
// opens its stream.
func (g *Gen) Join(ctx context.Context, i int) error {
	return join(ctx, g, i)
}

func join(ctx context.Context, g *Gen, i int) error {
	var n *Node
	err := retry(ctx, g, func() (err error) { n, err = g.Add(ctx, i); return err })
	if err != nil {
		return err
	}
	if name, ok := n.Service(); ok {
		if err := retry(ctx, g, func() error { return n.Expose(ctx, name, 1000) }); err != nil {
			return err
		}
	}
	return connectRetry(ctx, n, 60*time.Second)
}

// retry runs f up to 5 times with backoff, as an agent retries its
// registration and exposes, counting the retries (Gen.Retries).
func retry(ctx context.Context, g *Gen, f func() error) error {
	wait := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := f()
		if err == nil || attempt == 5 || ctx.Err() != nil {
			return err
		}
		g.Retries.Add(1)
		g.cfg.Logf("retrying after: %v", err)
		time.Sleep(wait) // retry backoff, bounded by the attempts
		wait = min(2*wait, 4*time.Second)
	}
}

// connectRetry opens the node's stream, retrying with backoff as an agent
// does, within timeout.
func connectRetry(ctx context.Context, n *Node, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	wait := 250 * time.Millisecond
	for {
		err := n.Connect(ctx)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(wait) // retry backoff, bounded by the deadline
		wait = min(2*wait, 4*time.Second)
	}
}

func portsAre(n *Node, want map[string]uint16) bool {
	for k, v := range want {
		if n.services[k] != v {
			return false
		}
	}
	return true
}

// Print writes the figures, one per line.
func (r *Report) Print(w io.Writer) {
	ms := func(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) + " ms" }
	fmt.Fprintf(w, "nodes                    %d\n", r.Nodes)
	if r.Groups != nil {
		fmt.Fprintf(w, "policy                   %d groups of %d (tag:gK reaches the services of groups K, K+1); delays count the streams whose maps change\n", r.Groups.Count, r.Groups.Size)
	} else {
		fmt.Fprintf(w, "policy                   none: every map holds every node\n")
	}
	fmt.Fprintf(w, "join took                %v (settled %v)\n", r.JoinTook.Round(time.Millisecond), r.SettleTook.Round(time.Millisecond))
	fmt.Fprintf(w, "register p50/p99         %s / %s  (of which connection and TLS p50/p99 %s / %s)\n", ms(Percentile(r.Register, 50)), ms(Percentile(r.Register, 99)),
		ms(Percentile(r.RegisterConn, 50)), ms(Percentile(r.RegisterConn, 99)))
	msgs := func(res Result) string {
		if len(res.Msgs) == 0 {
			return "-"
		}
		return fmt.Sprintf("%d/%d", res.Msgs[len(res.Msgs)/2], res.Msgs[len(res.Msgs)-1])
	}
	fmt.Fprintf(w, "change reaches all       p50 %s  p99 %s  max %s  (msgs/stream p50/max %s)\n", ms(r.Change.Pct(50)), ms(r.Change.Pct(99)), ms(r.Change.Pct(100)), msgs(r.Change))
	fmt.Fprintf(w, "join reaches all         p50 %s  p99 %s  max %s  (msgs/stream p50/max %s)\n", ms(r.Join.Pct(50)), ms(r.Join.Pct(99)), ms(r.Join.Pct(100)), msgs(r.Join))
	fmt.Fprintf(w, "burst reaches all        p99 %s  max %s  (msgs/stream p50/max %s)\n", ms(r.BurstRes.Pct(99)), ms(r.BurstTook), msgs(r.BurstRes))
	if r.HaveProc {
		if r.PeakRSS > 0 {
			fmt.Fprintf(w, "coordinator RSS          %.0f MB after the idle window (peak %.0f MB)\n", float64(r.RSS)/(1<<20), float64(r.PeakRSS)/(1<<20))
		} else {
			fmt.Fprintf(w, "coordinator RSS          %.0f MB\n", float64(r.RSS)/(1<<20))
		}
		fmt.Fprintf(w, "coordinator CPU          join phase %v, one change %v, burst %v\n", r.CPUJoin.Round(time.Millisecond), r.CPUChange.Round(time.Millisecond), r.CPUBurst.Round(time.Millisecond))
		if r.WaitJoin > 0 {
			fmt.Fprintf(w, "coordinator CPU wait     join phase %v runnable without a CPU (summed over threads: the machine's other load)\n", r.WaitJoin.Round(time.Millisecond))
		}
		if r.IdleFor > 0 {
			fmt.Fprintf(w, "coordinator idle CPU     %.1f%% of a core over %v\n", 100*float64(r.CPUIdle)/float64(r.IdleFor), r.IdleFor)
			if r.WritesIdle > 0 {
				fmt.Fprintf(w, "coordinator idle writes  %.0f/s (write system calls: keep-alives)\n", float64(r.WritesIdle)/r.IdleFor.Seconds())
			}
		}
	}
	fmt.Fprintf(w, "map streams dropped      %d\n", r.Drops)
	fmt.Fprintf(w, "requests retried         %d (registrations and exposes, as agents retry)\n", r.Retries)
	if r.HaveStorm {
		fmt.Fprintf(w, "reconnect storm settled  %v (reconnects spread over %v)\n", r.Storm.Round(time.Millisecond), r.StormSpread)
	}
}

// ProcWait sums the time the threads of process pid spent runnable but
// waiting for a CPU (/proc/PID/task/*/schedstat, Linux); threads that
// ended are not counted.
func ProcWait(pid int) time.Duration {
	dirs, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	var sum time.Duration
	for _, d := range dirs {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + d.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			sum += time.Duration(n)
		}
	}
	return sum
}

// ProcPeak is process pid's highest resident memory so far in bytes
// (/proc/PID/status VmHWM); 0 when it cannot be read.
func ProcPeak(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10
		}
	}
	return 0
}

// ProcWrites is how many write system calls process pid has made
// (/proc/PID/io syscw); -1 when it cannot be read.
func ProcWrites(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return -1
			}
			return n
		}
	}
	return -1
}

// ProcStats reads resident memory and user+system CPU time of process pid
// from /proc (Linux).
func ProcStats(pid int) (rss int64, cpu time.Duration, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name, which is in parentheses.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 22 {
		return 0, 0, fmt.Errorf("control: short /proc stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	pages, _ := strconv.ParseInt(f[21], 10, 64)
	const tick = 100 // USER_HZ
	return pages * int64(os.Getpagesize()), time.Duration(ut+st) * time.Second / tick, nil
}
