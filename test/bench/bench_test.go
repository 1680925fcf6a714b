// Package bench measures the mesh as a user sees it: the built meshlink
// binary runs a coordinator and three agents as real processes on loopback
// (a provider, a consumer, and a consumer started with --relay-only), and
// the benchmark pushes a TCP stream and 64-byte request/response round trips
// through a consumer's local proxy, beside the same over a direct loopback
// TCP connection in the same run. BenchmarkTimeToFirstByte starts fresh
// consumer processes and times how long they take to deliver the first
// byte of a service. BenchmarkHTTP sends small GETs over keep-alive
// connections straight to a server, through the mesh with the server
// exported as TCP, and exported as an HTTP service. TestMain prints the
// ratios and each agent's memory. BenchmarkNetns (netns_test.go) measures
// two sites in network namespaces against the bare veth path between them,
// and prints its own table.
package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

var (
	setupOnce sync.Once
	env       *meshEnv
	setupErr  error

	resultsMu sync.Mutex
	results   = map[string]float64{}
)

func record(k string, v float64) {
	resultsMu.Lock()
	results[k] = v
	resultsMu.Unlock()
}

type meshEnv struct {
	bin, coordData    string
	dir               string
	procs             []*exec.Cmd
	agentPIDs         map[string]int
	sink, echo, greet net.Listener
	web               net.Listener // a small HTTP server
	meshWebHTTP       string       // it exported as an HTTP service
	meshWebTCP        string       // and as a plain TCP one
	meshSink          string       // consumer-side proxy addresses
	meshEcho          string
	relaySink         string // the same at the --relay-only consumer
	relayEcho         string
	greetAt           netip.AddrPort
	fresh             int    // fresh agents started so far, to name them
	token             string // reusable join token, for agents a benchmark adds
}

// Proxy ranges of the agents; the fresh consumers of
// BenchmarkTimeToFirstByte get their own.
var (
	benchDebugA = "127.0.0.1:6061"
	benchDebugB = "127.0.0.1:6062"

	rangeA     = netip.MustParsePrefix("127.201.0.0/16")
	rangeB     = netip.MustParsePrefix("127.202.0.0/16")
	rangeRelay = netip.MustParsePrefix("127.203.0.0/16")
	rangeFresh = netip.MustParsePrefix("127.204.0.0/16")
)

func TestMain(m *testing.M) {
	code := m.Run()
	if netnsTable != "" {
		fmt.Print(netnsTable)
	}
	if env != nil {
		summary()
		env.close()
	}
	os.Exit(code)
}

func summary() {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	if len(results) == 0 {
		return
	}
	fmt.Println("\n=== meshlink bench summary (same run, same machine) ===")
	if d, t := results["stream_direct_MBps"], results["stream_mesh_MBps"]; d > 0 && t > 0 {
		fmt.Printf("TCP stream:   direct %.0f MB/s, mesh %.0f MB/s, ratio %.3fx\n", d, t, t/d)
		if r := results["stream_relay_MBps"]; r > 0 {
			fmt.Printf("              relay-only %.0f MB/s, ratio %.3fx of direct, %.3fx of mesh\n", r, r/d, r/t)
		}
	}
	if d, t := results["rr_direct_p50_us"], results["rr_mesh_p50_us"]; d > 0 && t > 0 {
		fmt.Printf("64B RR p50:   direct %.0f us, mesh %.0f us (%.1fx)\n", d, t, t/d)
		fmt.Printf("64B RR p99:   direct %.0f us, mesh %.0f us\n", results["rr_direct_p99_us"], results["rr_mesh_p99_us"])
	}
	if d := results["http_direct_rps"]; d > 0 {
		fmt.Printf("HTTP GET, %d keep-alive connections:\n", httpConns)
		for _, k := range []struct{ key, name string }{{"direct", "direct"}, {"tcp", "TCP service"}, {"http", "HTTP service"}} {
			r := results["http_"+k.key+"_rps"]
			if r == 0 {
				continue
			}
			fmt.Printf("  %-13s %6.0f req/s (%.2fx of direct), p50 %4.0f us, p99 %5.0f us\n", k.name, r, r/d,
				results["http_"+k.key+"_p50_us"], results["http_"+k.key+"_p99_us"])
		}
		if h, t := results["http_http_rps"], results["http_tcp_rps"]; h > 0 && t > 0 {
			fmt.Printf("  HTTP service vs TCP service: %.2fx the requests/s, p50 %+.0f us\n", h/t, results["http_http_p50_us"]-results["http_tcp_p50_us"])
		}
	}
	for _, c := range []struct{ key, name string }{{"direct", "direct allowed"}, {"relay", "relay-only"}} {
		if n := results["ttfb_"+c.key+"_n"]; n > 0 {
			fmt.Printf("first byte:   fresh agent, %s: p50 %.0f ms, max %.0f ms, %.0f of %.0f starts over %v\n", c.name,
				results["ttfb_"+c.key+"_p50_ms"], results["ttfb_"+c.key+"_max_ms"], results["ttfb_"+c.key+"_slow"], n, ttfbSlow)
		}
	}
	summaryMore()
	for _, n := range []string{"a", "b"} {
		if v, ok := results["rss_idle_"+n]; ok {
			fmt.Printf("agent %s RSS:  idle %.1f MB, peak under load %.1f MB\n", n, v, results["rss_peak_"+n])
		}
	}
}

// setup starts the processes once for all benchmarks.
func setup(b *testing.B) *meshEnv {
	setupOnce.Do(func() {
		env, setupErr = startMesh(b)
	})
	if setupErr != nil {
		b.Fatal(setupErr)
	}
	return env
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startMesh(b *testing.B) (*meshEnv, error) {
	bin := harness.Binary(b)
	dir, err := os.MkdirTemp("", "meshlink-bench")
	if err != nil {
		return nil, err
	}
	e := &meshEnv{bin: bin, dir: dir, agentPIDs: map[string]int{}}
	ok := false
	defer func() {
		if !ok {
			e.close()
		}
	}()
	if e.sink, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	go serve(e.sink, sinkConn)
	if e.echo, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	go serve(e.echo, echoConn)
	if e.greet, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	go serve(e.greet, greetConn)
	if e.web, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	go (&http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "ok\n")
	})}).Serve(e.web)
	webTCPPort, err := freePort()
	if err != nil {
		return nil, err
	}

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	coordData := filepath.Join(dir, "coord")
	e.coordData = coordData
	e.start(bin, "coordinator", "coordinator", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data", coordData, "--allow-loopback-endpoints",
		"--metrics-listen", "off") // 127.0.0.1:9090 may be another coordinator's
	token, err := reusableToken(func(args ...string) ([]byte, error) { return exec.Command(bin, args...).Output() }, coordData)
	if err != nil {
		return nil, err
	}
	e.token = token
	common := []string{"--join", token, "--dns", "off", "--log-level", "warn"}
	// BENCH_DEBUG=1 serves Go profiles and traces of the consumer (a) and
	// the provider (b) on benchDebugA and benchDebugB, for profiling a run.
	var debugA, debugB []string
	if os.Getenv("BENCH_DEBUG") != "" {
		debugA, debugB = []string{"--debug-listen", benchDebugA}, []string{"--debug-listen", benchDebugB}
	}
	argsA := append([]string{"agent", "--name", "bench-a", "--state", filepath.Join(dir, "a"), "--proxy-range", rangeA.String()}, debugA...)
	argsB := append([]string{"agent", "--name", "bench-b", "--state", filepath.Join(dir, "b"), "--proxy-range", rangeB.String(),
		"--expose", "sink=" + e.sink.Addr().String(), "--expose", "echo=" + e.echo.Addr().String(),
		"--expose", "greet=" + e.greet.Addr().String(),
		"--expose", "web=" + e.web.Addr().String() + ";protocol=http",
		"--expose", fmt.Sprintf("webtcp=%s;port=%d", e.web.Addr(), webTCPPort)}, debugB...)
	pa := e.start(bin, "a", append(argsA, common...)...)
	pb := e.start(bin, "b", append(argsB, common...)...)
	e.agentPIDs["a"], e.agentPIDs["b"] = pa, pb
	e.agentPIDs["relay"] = e.start(bin, "relay", append([]string{"agent", "--name", "bench-relay", "--state", filepath.Join(dir, "relay"),
		"--proxy-range", rangeRelay.String(), "--relay-only"}, common...)...)

	if err := tstest.Poll(30*time.Second, func() error {
		a, err := consumed(filepath.Join(dir, "a"))
		if err != nil {
			return err
		}
		r, err := consumed(filepath.Join(dir, "relay"))
		if err != nil {
			return err
		}
		if a["sink"] == nil || a["echo"] == nil || a["greet"] == nil || r["sink"] == nil || r["echo"] == nil || a["web"] == nil || a["webtcp"] == nil {
			return errors.New("services not ready")
		}
		e.meshWebHTTP, e.meshWebTCP = a["web"].Local.String(), a["webtcp"].Local.String()
		e.meshSink, e.meshEcho = a["sink"].Local.String(), a["echo"].Local.String()
		e.relaySink, e.relayEcho = r["sink"].Local.String(), r["echo"].Local.String()
		e.greetAt = a["greet"].Local
		return nil
	}); err != nil {
		logs, _ := exec.Command("sh", "-c", "tail -n 20 "+dir+"/*.log").CombinedOutput()
		return nil, fmt.Errorf("%w\n%s", err, logs)
	}
	// Warm the paths (handshakes) before anything is measured.
	for _, addr := range []string{e.meshEcho, e.relayEcho} {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			roundTrip(c, make([]byte, 64))
			c.Close()
		}
	}
	for _, n := range []string{"a", "b"} {
		rss, _ := readRSS(e.agentPIDs[n], "VmRSS")
		record("rss_idle_"+n, rss)
	}
	ok = true
	return e, nil
}

func (e *meshEnv) start(bin, name string, args ...string) int {
	cmd := exec.Command(bin, args...)
	logf, _ := os.Create(filepath.Join(e.dir, name+".log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		setupErr = err
		return 0
	}
	e.procs = append(e.procs, cmd)
	return cmd.Process.Pid
}

func (e *meshEnv) close() {
	for i := len(e.procs) - 1; i >= 0; i-- {
		harness.StopProcess(e.procs[i])
	}
	if e.sink != nil {
		e.sink.Close()
	}
	if e.echo != nil {
		e.echo.Close()
	}
	if e.web != nil {
		e.web.Close()
	}
	if e.greet != nil {
		e.greet.Close()
	}
	os.RemoveAll(e.dir)
}

// reusableToken mints a reusable join token at the coordinator of data
// directory data, trying for 20 s while it starts; run runs the meshlink
// binary with args and answers what it printed on standard output.
func reusableToken(run func(args ...string) ([]byte, error), data string) (string, error) {
	var token string
	if err := tstest.Poll(20*time.Second, func() error {
		out, err := run("token", "create", "--data", data, "--reusable")
		token = strings.TrimSpace(string(out))
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}); err != nil {
		return "", fmt.Errorf("token create: %w", err)
	}
	return token, nil
}

// procStatusMB returns the fields of /proc/PID/status counted in kB
// (VmRSS, VmHWM, RssAnon, …), in MB.
func procStatusMB(pid int) (map[string]float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	mb := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if v, isKB := strings.CutSuffix(strings.TrimSpace(v), " kB"); ok && isKB {
			if kb, err := strconv.ParseFloat(v, 64); err == nil {
				mb[k] = kb / 1024
			}
		}
	}
	return mb, sc.Err()
}

// readRSS returns a /proc/PID/status field in MB.
func readRSS(pid int, field string) (float64, error) {
	mb, err := procStatusMB(pid)
	if err != nil {
		return 0, err
	}
	v, ok := mb[field]
	if !ok {
		return 0, fmt.Errorf("no %s", field)
	}
	return v, nil
}

func serve(ln net.Listener, h func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			h(c)
		}()
	}
}

// sinkConn reads everything, then answers the byte count as 8 bytes once
// the client has half-closed: the benchmark's clock stops only when every
// byte has arrived at the far end.
func sinkConn(c net.Conn) {
	n, _ := io.Copy(io.Discard, c)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	c.Write(b[:])
}

func echoConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	io.Copy(c, c)
}

func streamOnce(b *testing.B, addr string) {
	const chunk = 256 << 10
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	// A stalled path fails the benchmark instead of hanging `make bench`.
	c.SetWriteDeadline(time.Now().Add(60 * time.Second))
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	var ack [8]byte
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if got := binary.BigEndian.Uint64(ack[:]); got != uint64(b.N)*chunk {
		b.Fatalf("sink got %d bytes, sent %d", got, uint64(b.N)*chunk)
	}
	mbps := float64(b.N) * chunk / b.Elapsed().Seconds() / 1e6
	b.ReportMetric(mbps, "MB/s")
}

// BenchmarkStream is one TCP stream, direct and through the mesh.
func BenchmarkStream(b *testing.B) {
	e := setup(b)
	b.Run("direct", func(b *testing.B) {
		streamOnce(b, e.sink.Addr().String())
		record("stream_direct_MBps", float64(b.N)*(256<<10)/b.Elapsed().Seconds()/1e6)
	})
	b.Run("mesh", func(b *testing.B) {
		streamOnce(b, e.meshSink)
		record("stream_mesh_MBps", float64(b.N)*(256<<10)/b.Elapsed().Seconds()/1e6)
		for _, n := range []string{"a", "b"} {
			rss, _ := readRSS(e.agentPIDs[n], "VmHWM")
			record("rss_peak_"+n, rss)
			b.ReportMetric(rss, "agent-"+n+"-peak-RSS-MB")
		}
	})
	// The same provider, through the consumer that never uses a direct
	// path: every packet crosses the coordinator's relay over TLS.
	b.Run("relay", func(b *testing.B) {
		streamOnce(b, e.relaySink)
		record("stream_relay_MBps", float64(b.N)*(256<<10)/b.Elapsed().Seconds()/1e6)
	})
}

func roundTrip(c net.Conn, buf []byte) error {
	if _, err := c.Write(buf); err != nil {
		return err
	}
	_, err := io.ReadFull(c, buf)
	return err
}

func rrOnce(b *testing.B, addr, key string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	buf := make([]byte, 64)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if err := roundTrip(c, buf); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50 := float64(lat[len(lat)/2].Nanoseconds()) / 1e3
	p99 := float64(lat[len(lat)*99/100].Nanoseconds()) / 1e3
	b.ReportMetric(p50, "p50-us")
	b.ReportMetric(p99, "p99-us")
	record("rr_"+key+"_p50_us", p50)
	record("rr_"+key+"_p99_us", p99)
}

// BenchmarkRoundTrip64 is 64-byte request/response, direct and through the mesh.
func BenchmarkRoundTrip64(b *testing.B) {
	e := setup(b)
	b.Run("direct", func(b *testing.B) { rrOnce(b, e.echo.Addr().String(), "direct") })
	b.Run("mesh", func(b *testing.B) { rrOnce(b, e.meshEcho, "mesh") })
}

// consumed is the services an agent consumes, by name, that have a
// listening proxy and a provider.
func consumed(state string) (map[string]*localapi.Service, error) {
	s, err := localapi.NewClient(state).Services(context.Background())
	if err != nil {
		return nil, err
	}
	out := map[string]*localapi.Service{}
	for i, sv := range s.Consumed {
		if sv.Listening && len(sv.Providers) > 0 {
			out[sv.Name] = &s.Consumed[i]
		}
	}
	return out, nil
}

// greetConn sends one line at once: the first byte a fresh consumer waits
// for needs no request.
func greetConn(c net.Conn) {
	io.WriteString(c, "hello from bench-b\n")
}

// rebase moves a local proxy address from one agent's proxy range to
// another's: the offset in the range is the service VIP's (README, "Names
// and addresses"), the same at every agent.
func rebase(a netip.AddrPort, from, to netip.Prefix) netip.AddrPort {
	u32 := func(a netip.Addr) uint32 { b := a.As4(); return binary.BigEndian.Uint32(b[:]) }
	var out [4]byte
	binary.BigEndian.PutUint32(out[:], u32(to.Addr())+u32(a.Addr())-u32(from.Addr()))
	return netip.AddrPortFrom(netip.AddrFrom4(out), a.Port())
}

// firstByte starts a fresh consumer agent (new state directory, new
// single-use token) and returns the time from its process start to the
// first byte of greet through its local proxy. A real program would retry
// the same way: connect, read, and try again while the proxy is not up or
// the mesh connection closes before any byte.
func (e *meshEnv) firstByte(b *testing.B, i int, extra ...string) time.Duration {
	b.Helper()
	out, err := exec.Command(e.bin, "token", "create", "--data", e.coordData, "--ephemeral").Output()
	if err != nil {
		b.Fatalf("token create: %v", err)
	}
	state := filepath.Join(e.dir, fmt.Sprintf("fresh-%d", i))
	defer os.RemoveAll(state)
	addr := rebase(e.greetAt, rangeA, rangeFresh).String()
	args := append([]string{"agent", "--join", strings.TrimSpace(string(out)), "--name", fmt.Sprintf("bench-fresh-%d", i),
		"--state", state, "--proxy-range", rangeFresh.String(), "--dns", "off", "--log-level", "warn"}, extra...)
	cmd := exec.Command(e.bin, args...)
	logf, _ := os.Create(state + ".log")
	defer os.Remove(state + ".log")
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf

	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer harness.StopProcess(cmd)
	buf := make([]byte, 1)
	deadline := start.Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, _ := c.Read(buf)
			c.Close()
			if n == 1 {
				return time.Since(start)
			}
		}
		// A poll under the deadline above with a short fixed step, kept
		// rather than tstest.Poll: this loop is the measurement, and Poll's
		// backoff (to 50 ms) would add its own delay to the time it
		// reports. Another process's listener has no event to wait on, and
		// a refused dial returns at once, so without a step it would spin.
		time.Sleep(2 * time.Millisecond)
	}
	logs, _ := os.ReadFile(state + ".log")
	b.Fatalf("fresh agent: no byte from greet at %s within 20 s\n%s", addr, logs)
	return 0
}

// One op of BenchmarkTimeToFirstByte is a round of fresh agents started one
// after another for at least ttfbRound, and at least ttfbMin of them. Not
// one agent per op: starts are bimodal (tens of ms, or a second or five
// when a first packet is lost and TCP or WireGuard retries), so b.N
// predicted from one fast start could run for minutes. With the default
// -benchtime 3s the framework stops after one round.
const (
	ttfbRound = 3 * time.Second
	ttfbMin   = 5
	ttfbSlow  = time.Second // a start this slow waited for a retry
)

// BenchmarkTimeToFirstByte is the time a fresh consumer agent takes from
// process start (keys, join, network map, relay, WireGuard handshake) to
// the first byte of a service: with direct paths allowed (the first bytes
// may still ride the relay until a direct path is proven) and with
// --relay-only. It reports the median, the mean, the slowest start and how
// many starts took over ttfbSlow.
func BenchmarkTimeToFirstByte(b *testing.B) {
	e := setup(b)
	for _, tc := range []struct {
		name  string
		extra []string
	}{{"direct", nil}, {"relay", []string{"--relay-only"}}} {
		b.Run(tc.name, func(b *testing.B) {
			var samples []time.Duration
			for i := 0; i < b.N; i++ {
				start := time.Now()
				for n := 0; n < ttfbMin || time.Since(start) < ttfbRound; n++ {
					e.fresh++
					samples = append(samples, e.firstByte(b, e.fresh, tc.extra...))
				}
			}
			sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
			var total time.Duration
			slow := 0
			for _, d := range samples {
				total += d
				if d >= ttfbSlow {
					slow++
				}
			}
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
			p50, mean, worst := ms(samples[len(samples)/2]), ms(total)/float64(len(samples)), ms(samples[len(samples)-1])
			b.ReportMetric(0, "ns/op") // the length of a round says nothing
			b.ReportMetric(p50, "ms-p50")
			b.ReportMetric(mean, "ms-mean")
			b.ReportMetric(worst, "ms-max")
			b.ReportMetric(float64(slow), "slow-starts")
			b.ReportMetric(float64(len(samples)), "starts")
			record("ttfb_"+tc.name+"_p50_ms", p50)
			record("ttfb_"+tc.name+"_max_ms", worst)
			record("ttfb_"+tc.name+"_slow", float64(slow))
			record("ttfb_"+tc.name+"_n", float64(len(samples)))
		})
	}
}

// httpConns is how many keep-alive connections the HTTP load generator
// keeps busy at once.
const httpConns = 8

// httpLoad sends b.N small GETs to addr over httpConns keep-alive
// connections and records requests/s and latency under key.
func httpLoad(b *testing.B, addr, key string) {
	tr := &http.Transport{MaxIdleConnsPerHost: httpConns, MaxConnsPerHost: httpConns, DisableCompression: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	url := "http://" + addr + "/"
	get := func() error {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return err
	}
	for range httpConns { // warm the connections
		if err := get(); err != nil {
			b.Fatal(err)
		}
	}
	var mu sync.Mutex
	lat := make([]time.Duration, 0, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, httpConns)
	b.ResetTimer()
	start := time.Now()
	for range httpConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mine := make([]time.Duration, 0, b.N/httpConns+1)
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if err := get(); err != nil {
					errc <- err
					return
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	select {
	case err := <-errc:
		b.Fatal(err)
	default:
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	rps := float64(len(lat)) / elapsed.Seconds()
	p50 := float64(lat[len(lat)/2].Nanoseconds()) / 1e3
	p99 := float64(lat[len(lat)*99/100].Nanoseconds()) / 1e3
	b.ReportMetric(rps, "req/s")
	b.ReportMetric(p50, "p50-us")
	b.ReportMetric(p99, "p99-us")
	record("http_"+key+"_rps", rps)
	record("http_"+key+"_p50_us", p50)
	record("http_"+key+"_p99_us", p99)
}

// BenchmarkHTTP is small GETs over keep-alive connections: straight to
// the server, through the mesh with the server exported as plain TCP, and
// exported as an HTTP service (parsed at both agents, per request).
func BenchmarkHTTP(b *testing.B) {
	e := setup(b)
	b.Run("direct", func(b *testing.B) { httpLoad(b, e.web.Addr().String(), "direct") })
	b.Run("tcp", func(b *testing.B) { httpLoad(b, e.meshWebTCP, "tcp") })
	b.Run("http", func(b *testing.B) { httpLoad(b, e.meshWebHTTP, "http") })
}
