// Package bench measures the mesh as a user sees it: the built meshlink
// binary runs a coordinator and two agents as real processes on loopback, and
// the benchmark pushes a TCP stream and 64-byte request/response round trips
// through the consumer's local proxy, beside the same over a direct loopback
// TCP connection in the same run. TestMain prints the ratios and each
// agent's memory.
package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
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
	dir        string
	procs      []*exec.Cmd
	agentPIDs  map[string]int
	sink, echo net.Listener
	meshSink   string // consumer-side proxy addresses
	meshEcho   string
}

func TestMain(m *testing.M) {
	code := m.Run()
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
	}
	if d, t := results["rr_direct_p50_us"], results["rr_mesh_p50_us"]; d > 0 && t > 0 {
		fmt.Printf("64B RR p50:   direct %.0f us, mesh %.0f us (%.1fx)\n", d, t, t/d)
		fmt.Printf("64B RR p99:   direct %.0f us, mesh %.0f us\n", results["rr_direct_p99_us"], results["rr_mesh_p99_us"])
	}
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
	e := &meshEnv{dir: dir, agentPIDs: map[string]int{}}
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

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	coordData := filepath.Join(dir, "coord")
	e.start(bin, "coordinator", "coordinator", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data", coordData)
	var token string
	if err := poll(20*time.Second, func() error {
		out, err := exec.Command(bin, "token", "create", "--data", coordData, "--reusable").Output()
		token = strings.TrimSpace(string(out))
		return err
	}); err != nil {
		return nil, fmt.Errorf("token create: %w", err)
	}
	common := []string{"--join", token, "--dns", "off", "--log-level", "warn"}
	pa := e.start(bin, "a", append([]string{"agent", "--name", "bench-a", "--state", filepath.Join(dir, "a"), "--proxy-range", "127.201.0.0/16"}, common...)...)
	pb := e.start(bin, "b", append([]string{"agent", "--name", "bench-b", "--state", filepath.Join(dir, "b"), "--proxy-range", "127.202.0.0/16",
		"--expose", "sink=" + e.sink.Addr().String(), "--expose", "echo=" + e.echo.Addr().String()}, common...)...)
	e.agentPIDs["a"], e.agentPIDs["b"] = pa, pb

	cl := localapi.NewClient(filepath.Join(dir, "a"))
	if err := poll(30*time.Second, func() error {
		s, err := cl.Services(context.Background())
		if err != nil {
			return err
		}
		for _, sv := range s.Consumed {
			if sv.Listening && len(sv.Providers) > 0 {
				switch sv.Name {
				case "sink":
					e.meshSink = sv.Local.String()
				case "echo":
					e.meshEcho = sv.Local.String()
				}
			}
		}
		if e.meshSink == "" || e.meshEcho == "" {
			return errors.New("services not ready")
		}
		return nil
	}); err != nil {
		logs, _ := exec.Command("sh", "-c", "tail -n 20 "+dir+"/*.log").CombinedOutput()
		return nil, fmt.Errorf("%w\n%s", err, logs)
	}
	// Warm the path (handshake) before anything is measured.
	if c, err := net.Dial("tcp", e.meshEcho); err == nil {
		roundTrip(c, make([]byte, 64))
		c.Close()
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
		p := e.procs[i]
		p.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.Process.Kill()
			<-done
		}
	}
	if e.sink != nil {
		e.sink.Close()
	}
	if e.echo != nil {
		e.echo.Close()
	}
	os.RemoveAll(e.dir)
}

func poll(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readRSS returns a /proc/PID/status field in MB.
func readRSS(pid int, field string) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no %s", field)
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
