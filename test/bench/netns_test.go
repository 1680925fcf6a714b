package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// How long each measurement of BenchmarkNetns runs. The whole benchmark
// (setup, three paths, eight parallel streams) stays near a minute.
const (
	nsStreamTime = 6 * time.Second
	nsRRTime     = 3 * time.Second
	nsParallel   = 8
)

// netnsTable is BenchmarkNetns's table, printed by TestMain's summary.
var netnsTable string

// nsProc is an agent process of BenchmarkNetns.
type nsProc struct {
	name  string
	pid   int
	state string
}

// cpuSeconds is the process's user+system CPU time from /proc/PID/stat.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// the fields counted from 3 start after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bench: bad /proc/PID/stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("bench: short /proc/PID/stat")
	}
	// utime and stime are fields 14 and 15, in clock ticks of USER_HZ,
	// which Linux fixes at 100 for user space.
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return float64(ut+st) / 100, nil
}

// resetPeak restarts the process's VmHWM from its current RSS
// (proc(5), clear_refs "5"), so that each phase reports its own peak.
func resetPeak(pid int) {
	os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// iperf3 runs one iperf3 client in h and returns the bytes received and
// the rate in Mbit/s.
func iperf3(ctx context.Context, h *topo.Host, addr string, port int, secs time.Duration, parallel int) (bytes, mbps float64, err error) {
	out, err := h.Run(ctx, "iperf3", "-c", addr, "-p", strconv.Itoa(port), "-t", strconv.Itoa(int(secs.Seconds())),
		"-P", strconv.Itoa(parallel), "-J")
	var r struct {
		End struct {
			SumReceived struct {
				Bytes float64 `json:"bytes"`
				BPS   float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return 0, 0, fmt.Errorf("iperf3 -c %s: %v (%w)", addr, jerr, err)
	}
	if r.Error != "" {
		return 0, 0, fmt.Errorf("iperf3 -c %s: %s", addr, r.Error)
	}
	if err != nil {
		return 0, 0, err
	}
	return r.End.SumReceived.Bytes, r.End.SumReceived.BPS / 1e6, nil
}

// nsRoundTrips does 64-byte round trips from h to addr for d and returns
// p50 and p99 in µs.
func nsRoundTrips(ctx context.Context, h *topo.Host, addr string, d time.Duration) (p50, p99 float64, err error) {
	c, err := h.Dial(ctx, "tcp", addr)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	c.SetDeadline(time.Now().Add(d + 30*time.Second))
	buf := make([]byte, 64)
	// A warm-up the figures leave out: the first round trips of a
	// connection include the provider's dial of its target.
	for i := 0; i < 50; i++ {
		if err := roundTrip(c, buf); err != nil {
			return 0, 0, err
		}
	}
	var lat []time.Duration
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		t0 := time.Now()
		if err := roundTrip(c, buf); err != nil {
			return 0, 0, err
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	return us(lat[len(lat)/2]), us(lat[len(lat)*99/100]), nil
}

// BenchmarkNetns is the data plane between two sites in network
// namespaces on one bridge, everything in one run: the bare veth path
// between them (kernel TCP), the mesh (a consumer agent at site A, a
// provider at site B, a direct WireGuard path), and the relay-only path
// (a second consumer at site A started with --relay-only, through the
// coordinator's relay in a third namespace). The agents and the
// coordinator are the built binary as real processes. For each path: one
// iperf3 stream, 64-byte TCP ping-pong p50/p99; for the mesh also eight
// parallel streams. For each agent: RSS idle and its peak (VmHWM) in each
// phase, and CPU (utime+stime) per byte moved. One table, ratios to bare.
// Needs root (skips otherwise) and iperf3.
func BenchmarkNetns(b *testing.B) {
	if b.N > 1 {
		// One run is the measurement: it takes far longer than -benchtime.
		b.Skip("one iteration only")
	}
	n := topo.New(b)
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 not installed (apt-get install iperf3; .ci/run installs it)")
	}
	bin := harness.Binary(b)
	lan := n.Switch("lan")
	coord, siteA, siteB := n.Host("coord"), n.Host("sitea"), n.Host("siteb")
	n.Link(coord, lan, "10.78.0.1/24")
	n.Link(siteA, lan, "10.78.0.2/24")
	n.Link(siteB, lan, "10.78.0.3/24")
	const iperfPort, echoPort = 5201, 7007
	bareIperf, bareEcho := "10.78.0.3", fmt.Sprintf("10.78.0.3:%d", echoPort)

	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	dir := b.TempDir()
	logs := map[string]string{}
	start := func(h *topo.Host, name string, args ...string) int {
		cmd := h.Command(ctx, args[0], args[1:]...)
		p := filepath.Join(dir, name+".log")
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		logs[name] = p
		cmd.Stdout, cmd.Stderr = f, f
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			harness.StopProcess(cmd)
			f.Close()
		})
		return cmd.Process.Pid
	}
	fail := func(format string, args ...any) {
		b.Helper()
		var sb strings.Builder
		for name, p := range logs {
			out, _ := exec.Command("tail", "-n", "15", p).Output()
			fmt.Fprintf(&sb, "--- %s ---\n%s", name, out)
		}
		b.Fatalf(format+"\n%s", append(args, sb.String())...)
	}

	// The servers listen on site B's LAN address (the bare path) and its
	// 127.0.0.1 (the target the provider exports), not on every address:
	// the provider's own consumer proxies take 127.212.x.y on these ports.
	for _, host := range []string{"10.78.0.3", "127.0.0.1"} {
		echo, err := siteB.Listen("tcp", fmt.Sprintf("%s:%d", host, echoPort))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { echo.Close() })
		go serve(echo, echoConn)
		start(siteB, "iperf3-"+host, "iperf3", "-s", "-B", host, "-p", strconv.Itoa(iperfPort))
	}

	data := filepath.Join(dir, "coord")
	coordArgs := []string{bin, "coordinator", "--listen", "10.78.0.1:8443", "--data", data, "--log-level", "warn"}
	if os.Getenv("BENCH_DEBUG") != "" {
		// The relay's profiles: 127.0.0.1:6064 in the coordinator's namespace.
		coordArgs = append(coordArgs, "--debug-listen", "127.0.0.1:6064")
	}
	start(coord, "coordinator", coordArgs...)
	token, err := reusableToken(func(args ...string) ([]byte, error) { return coord.Run(ctx, bin, args...) }, data)
	if err != nil {
		fail("%v", err)
	}
	// BENCH_DEBUG=1 serves each agent's Go profiles and traces inside its
	// namespace (consumer 127.0.0.1:6061, provider :6062, relay-only
	// :6063; `ip netns exec` into the site to fetch them), and
	// BENCH_AGENT_ENV (space-separated NAME=VALUE, e.g. GOMAXPROCS=1)
	// sets variables for the agents only, for A/B runs of runtime
	// settings in one command.
	debugPort := map[string]int{"consumer": 6061, "provider": 6062, "relayonly": 6063, "coordinator": 6064}
	agentEnv := strings.Fields(os.Getenv("BENCH_AGENT_ENV"))
	agent := func(h *topo.Host, name, pfx string, extra ...string) nsProc {
		state := filepath.Join(dir, name)
		args := append([]string{bin, "agent", "--join", token, "--name", "ns-" + name, "--state", state,
			"--proxy-range", pfx, "--dns", "off", "--log-level", "warn"}, extra...)
		if os.Getenv("BENCH_DEBUG") != "" {
			args = append(args, "--debug-listen", fmt.Sprintf("127.0.0.1:%d", debugPort[name]))
		}
		if len(agentEnv) > 0 {
			args = append([]string{"env"}, append(agentEnv, args...)...)
		}
		return nsProc{name: name, pid: start(h, name, args...), state: state}
	}
	pb := agent(siteB, "provider", "127.212.0.0/16",
		"--expose", fmt.Sprintf("iperf=127.0.0.1:%d", iperfPort), "--expose", fmt.Sprintf("echo=127.0.0.1:%d", echoPort))
	pa := agent(siteA, "consumer", "127.211.0.0/16")
	pr := agent(siteA, "relayonly", "127.213.0.0/16", "--relay-only")
	agents := []nsProc{pa, pb, pr}

	addrs := map[string]map[string]string{}
	if err := tstest.Poll(45*time.Second, func() error {
		for _, p := range []nsProc{pa, pr} {
			s, err := consumed(p.state)
			if err != nil {
				return err
			}
			if s["iperf"] == nil || s["echo"] == nil {
				return fmt.Errorf("%s: services not ready", p.name)
			}
			addrs[p.name] = map[string]string{"iperf": s["iperf"].Local.Addr().String(), "echo": s["echo"].Local.String()}
		}
		return nil
	}); err != nil {
		fail("%v", err)
	}
	// Warm both paths (handshakes), and wait until the consumer's path to
	// the provider is proven direct: until then packets may ride the relay.
	for _, p := range []nsProc{pa, pr} {
		if err := tstest.Poll(20*time.Second, func() error {
			_, _, err := nsRoundTrips(ctx, siteA, addrs[p.name]["echo"], time.Millisecond)
			return err
		}); err != nil {
			fail("%s: echo: %v", p.name, err)
		}
	}
	if err := tstest.Poll(20*time.Second, func() error {
		out, err := siteA.Run(ctx, bin, "status", "--json", "--state", pa.state)
		if err != nil {
			return err
		}
		var st struct {
			Peers []struct {
				Name, Path string
			} `json:"peers"`
		}
		if err := json.Unmarshal(out, &st); err != nil {
			return err
		}
		for _, p := range st.Peers {
			if p.Name == "ns-provider" && p.Path == "direct" {
				return nil
			}
		}
		return fmt.Errorf("no direct path yet: %s", out)
	}); err != nil {
		fail("%v", err)
	}

	idle := map[string]float64{}
	for _, p := range agents {
		idle[p.name], _ = readRSS(p.pid, "VmRSS")
	}

	type row struct {
		mbps, p50, p99 float64
	}
	rows := map[string]row{}
	// peak[phase][agent] in MB; cpu[phase][agent] in ns per byte.
	peak := map[string]map[string]float64{}
	cpu := map[string]map[string]float64{}
	// stream runs one iperf3 measurement and records, for the agents on
	// the path, their peak RSS and CPU per byte over it.
	// BENCH_PPROF=DIR (with BENCH_DEBUG=1): CPU profiles of the agents on
	// the path during each mesh stream phase, and of the coordinator (the
	// relay) during the relay's, DIR/PHASE-AGENT.cpu (`go tool pprof -top
	// DIR/mesh-provider.cpu`), over the first seconds of the stream, then
	// their heaps, DIR/PHASE-AGENT.heap. Profiling costs the agents a
	// little CPU.
	pdir := os.Getenv("BENCH_PPROF")
	if pdir != "" && os.Getenv("BENCH_DEBUG") == "" {
		b.Log("BENCH_PPROF needs BENCH_DEBUG=1 (the agents' debug listeners): no profiles")
		pdir = ""
	}
	hostOf := map[string]*topo.Host{pa.name: siteA, pr.name: siteA, pb.name: siteB, "coordinator": coord}
	stream := func(phase, addr string, parallel int, on []nsProc) float64 {
		before := map[string]float64{}
		for _, p := range on {
			resetPeak(p.pid)
			before[p.name], _ = cpuSeconds(p.pid)
		}
		var profiles sync.WaitGroup
		if pdir != "" {
			secs := max(1, int(nsStreamTime/time.Second)-2)
			profiled := on
			if phase == "relay" { // and the relay's
				profiled = append(slices.Clip(on), nsProc{name: "coordinator"})
			}
			for _, p := range profiled {
				profiles.Add(1)
				go func() {
					defer profiles.Done()
					base := fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/", debugPort[p.name])
					out := filepath.Join(pdir, strings.ReplaceAll(phase, " ", "_")+"-"+p.name)
					if o, err := hostOf[p.name].Run(ctx, "curl", "-sS", "-o", out+".cpu", base+fmt.Sprintf("profile?seconds=%d", secs)); err != nil {
						b.Logf("profile of %s: %v %s", p.name, err, o)
					}
					// And the heap while the stream still runs: what the
					// peak RSS is made of (-sample_index=inuse_space).
					if o, err := hostOf[p.name].Run(ctx, "curl", "-sS", "-o", out+".heap", base+"heap"); err != nil {
						b.Logf("heap of %s: %v %s", p.name, err, o)
					}
				}()
			}
		}
		bytes, mbps, err := iperf3(ctx, siteA, addr, iperfPort, nsStreamTime, parallel)
		profiles.Wait()
		if err != nil {
			fail("%s: %v", phase, err)
		}
		peak[phase], cpu[phase] = map[string]float64{}, map[string]float64{}
		for _, p := range on {
			peak[phase][p.name], _ = readRSS(p.pid, "VmHWM")
			after, _ := cpuSeconds(p.pid)
			if bytes > 0 {
				cpu[phase][p.name] = (after - before[p.name]) * 1e9 / bytes
			}
		}
		return mbps
	}
	rr := func(phase, addr string) (float64, float64) {
		p50, p99, err := nsRoundTrips(ctx, siteA, addr, nsRRTime)
		if err != nil {
			fail("%s: round trips: %v", phase, err)
		}
		return p50, p99
	}

	var r row
	r.mbps = stream("bare", bareIperf, 1, nil)
	r.p50, r.p99 = rr("bare", bareEcho)
	rows["bare"] = r
	r.mbps = stream("mesh", addrs[pa.name]["iperf"], 1, []nsProc{pa, pb})
	// BENCH_TRACE=DIR (with BENCH_DEBUG=1): 2 s execution traces of the
	// consumer and the provider during the mesh's round trips, in DIR
	// (`go tool trace DIR/consumer.trace`). Tracing slows the agents: the
	// round-trip figures of a traced run are not comparable.
	var traces sync.WaitGroup
	tdir := os.Getenv("BENCH_TRACE")
	if tdir != "" && os.Getenv("BENCH_DEBUG") == "" {
		b.Log("BENCH_TRACE needs BENCH_DEBUG=1 (the agents' debug listeners): no traces")
		tdir = ""
	}
	if tdir != "" {
		for _, t := range []struct {
			h    *topo.Host
			name string
		}{{siteA, "consumer"}, {siteB, "provider"}} {
			traces.Add(1)
			go func() {
				defer traces.Done()
				url := fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/trace?seconds=2", debugPort[t.name])
				if out, err := t.h.Run(ctx, "curl", "-sS", "-o", filepath.Join(tdir, t.name+".trace"), url); err != nil {
					b.Logf("trace of %s: %v %s", t.name, err, out)
				}
			}()
		}
	}
	r.p50, r.p99 = rr("mesh", addrs[pa.name]["echo"])
	traces.Wait()
	rows["mesh"] = r
	r.mbps = stream("relay", addrs[pr.name]["iperf"], 1, []nsProc{pr, pb})
	r.p50, r.p99 = rr("relay", addrs[pr.name]["echo"])
	rows["relay"] = r
	rows["bare x8"] = row{mbps: stream("bare x8", bareIperf, nsParallel, nil)}
	rows["mesh x8"] = row{mbps: stream("mesh x8", addrs[pa.name]["iperf"], nsParallel, []nsProc{pa, pb})}

	var sb strings.Builder
	bare := rows["bare"]
	fmt.Fprintf(&sb, "\n=== namespace benchmark: two sites on a bridge, agents as processes (same run) ===\n")
	fmt.Fprintf(&sb, "%-10s %12s %8s %9s %8s %9s %8s\n", "path", "Mbit/s", "x bare", "p50 us", "x bare", "p99 us", "x bare")
	for _, k := range []string{"bare", "mesh", "relay"} {
		r := rows[k]
		fmt.Fprintf(&sb, "%-10s %12.0f %8.3f %9.0f %8.2f %9.0f %8.2f\n", k, r.mbps, r.mbps/bare.mbps, r.p50, r.p50/bare.p50, r.p99, r.p99/bare.p99)
	}
	fmt.Fprintf(&sb, "%-10s %12.0f %8.3f\n", "bare x8", rows["bare x8"].mbps, 1.0)
	fmt.Fprintf(&sb, "%-10s %12.0f %8.3f   (of bare x8; of one bare stream %.3f)\n", "mesh x8", rows["mesh x8"].mbps,
		rows["mesh x8"].mbps/rows["bare x8"].mbps, rows["mesh x8"].mbps/bare.mbps)
	fmt.Fprintf(&sb, "%-10s %9s %11s %9s %11s %9s %11s %9s\n", "agent", "RSS idle", "peak mesh", "CPU ns/B", "peak relay", "CPU ns/B", "peak x8", "CPU ns/B")
	for _, p := range agents {
		cell := func(phase string) string {
			if v, ok := peak[phase][p.name]; ok {
				return fmt.Sprintf("%8.1fMB %8.2f", v, cpu[phase][p.name])
			}
			return fmt.Sprintf("%10s %8s", "-", "-")
		}
		fmt.Fprintf(&sb, "%-10s %7.1fMB %s  %s  %s\n", p.name, idle[p.name], cell("mesh"), cell("relay"), cell("mesh x8"))
	}
	netnsTable = sb.String()

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rows["mesh"].mbps/bare.mbps, "mesh-x-bare")
	b.ReportMetric(rows["relay"].mbps/bare.mbps, "relay-x-bare")
	b.ReportMetric(rows["mesh"].p50, "mesh-p50-us")
	b.ReportMetric(rows["mesh"].p99, "mesh-p99-us")
	b.ReportMetric(peak["mesh"][pa.name], "consumer-peak-MB")
	b.ReportMetric(peak["mesh x8"][pa.name], "consumer-peak-x8-MB")
}
