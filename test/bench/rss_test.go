package bench

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

// BenchmarkIdleRSS: the idle memory of a joined agent with one exposed and
// one consumed service, for the full binary and the agent-only build
// (make build-agent's flags), side by side in one run. Two agents join a
// coordinator of their own; each exports a service the other consumes; a
// connection goes through each way; then each agent's VmRSS is sampled
// for 2 s and the lowest kept ("just after traffic"), and, for the
// default (trimming) agents, for 30 s more, the median of the last 10 s
// kept ("idle": they drop the pages the traffic faulted in once they have
// idled 10 s), split into anonymous and file-backed pages
// (/proc/PID/status RssAnon, RssFile); then a connection through each
// agent is timed, and the next one.
func BenchmarkIdleRSS(b *testing.B) {
	e := setup(b)
	rssOnce.Do(func() {
		if err := e.idleRSS(b); err != nil {
			b.Fatal(err)
		}
	})
	b.ReportMetric(results["rss_idle_full_MB"], "full-MB")
	b.ReportMetric(results["rss_idle_agentonly_MB"], "agentonly-MB")
	for i := 0; i < b.N; i++ {
	}
}

var rssOnce sync.Once

// agentOnlyBinary builds the agent-only binary as make build-agent does.
func agentOnlyBinary(b *testing.B, dir string) (string, error) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	out := filepath.Join(dir, "meshlink-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-tags", "agentonly", "-ldflags", "-s -w", "-o", out, "./cmd/meshlink")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build -tags agentonly: %v\n%s", err, o)
	}
	return out, nil
}

func (e *meshEnv) idleRSS(b *testing.B) error {
	agentOnly, err := agentOnlyBinary(b, e.dir)
	if err != nil {
		return err
	}
	for _, trim := range []bool{false, true} {
		if err := e.idlePair(agentOnly, trim); err != nil {
			return err
		}
	}
	if fi, err := os.Stat(e.bin); err == nil {
		record("bin_full_MB", float64(fi.Size())/(1<<20))
	}
	if fi, err := os.Stat(agentOnly); err == nil {
		record("bin_agentonly_MB", float64(fi.Size())/(1<<20))
	}
	return nil
}

// idlePair measures a full and an agent-only agent on a coordinator of
// their own, each exporting one service the other consumes; trim says
// whether they drop their binary's pages once started (--trim-executable).
func (e *meshEnv) idlePair(agentOnly string, trim bool) error {
	suffix := ""
	if !trim {
		suffix = "_notrim"
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	data := filepath.Join(e.dir, "rss-coord"+suffix)
	e.start(e.bin, "rss-coord"+suffix, "coordinator", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data", data,
		"--allow-loopback-endpoints", "--metrics-listen", "off")
	token, err := reusableToken(func(args ...string) ([]byte, error) { return exec.Command(e.bin, args...).CombinedOutput() }, data)
	if err != nil {
		logs, _ := os.ReadFile(filepath.Join(e.dir, "rss-coord"+suffix+".log"))
		return fmt.Errorf("%w\n%s", err, logs)
	}
	type site struct{ key, bin, expose, consume, state, rng string }
	r := 216 // proxy ranges 127.216/16 and 127.217/16, then 218 and 219
	if trim {
		r = 218
	}
	sites := []site{
		{"full", e.bin, "full-svc", "agentonly-svc", filepath.Join(e.dir, "rss-full"+suffix), fmt.Sprintf("127.%d.0.0/16", r)},
		{"agentonly", agentOnly, "agentonly-svc", "full-svc", filepath.Join(e.dir, "rss-agentonly"+suffix), fmt.Sprintf("127.%d.0.0/16", r+1)},
	}
	pids := map[string]int{}
	locals := map[string]string{} // each site's local proxy of the other's service
	for _, s := range sites {
		pids[s.key] = e.start(s.bin, "rss-"+s.key+suffix, "agent", "--name", "rss-"+s.key, "--state", s.state, "--proxy-range", s.rng,
			"--join", token, "--dns", "off", "--log-level", "warn", "--expose", s.expose+"="+e.echo.Addr().String(),
			fmt.Sprintf("--trim-executable=%v", trim))
	}
	for _, s := range sites {
		var local string
		if err := tstest.Poll(30*time.Second, func() error {
			svcs, err := consumed(s.state)
			if err != nil {
				return err
			}
			if svcs[s.consume] == nil {
				return errors.New("not consumed yet")
			}
			local = svcs[s.consume].Local.String()
			return nil
		}); err != nil {
			return fmt.Errorf("%s: %w", s.key, err)
		}
		locals[s.key] = local
		if _, err := connectOnce(local); err != nil {
			return fmt.Errorf("%s: through the mesh: %w", s.key, err)
		}
	}
	// recordAt keeps, per site, the sample of each process at pick (an index
	// into its samples sorted by RSS) under name.
	recordAt := func(name string, samples map[string][]memSample, pick func(n int) int) {
		for _, s := range sites {
			ms := samples[s.key]
			m := ms[pick(len(ms))]
			record(name+"_"+s.key+suffix+"_MB", m.rss)
			record(name+"_"+s.key+suffix+"_anon_MB", m.anon)
			record(name+"_"+s.key+suffix+"_file_MB", m.file)
		}
	}
	lowest := func(int) int { return 0 }
	// Just after the traffic: the lowest of 10 samples over 2 s (a sample
	// is a measurement, not a wait for a condition).
	after, err := sampleMem(pids, 10, 200*time.Millisecond)
	if err != nil {
		return err
	}
	recordAt("rss_traffic", after, lowest)
	if !trim {
		recordAt("rss_idle", after, lowest)
	} else {
		// Idle: a trimming agent that has idled 10 s drops what the
		// traffic faulted in, and again at each 10 s it idles once pages
		// came back; so after 20 s, the median of the next 10 s (the
		// lowest would be the moment right after a trim).
		if _, err := sampleMem(pids, 40, 500*time.Millisecond); err != nil {
			return err
		}
		idle, err := sampleMem(pids, 20, 500*time.Millisecond)
		if err != nil {
			return err
		}
		recordAt("rss_idle", idle, func(n int) int { return n / 2 })
	}
	// What the pages given back cost the next connection, which faults
	// them in again: a new connection and a round trip after the idle
	// window, then another.
	if trim {
		for _, s := range sites {
			for _, which := range []string{"first", "next"} {
				d, err := connectOnce(locals[s.key])
				if err != nil {
					return fmt.Errorf("%s: through the mesh after idling: %w", s.key, err)
				}
				record("conn_after_idle_"+which+"_"+s.key+"_ms", float64(d)/float64(time.Millisecond))
			}
		}
	}
	return nil
}

// connectOnce opens a connection to addr, makes a 64-byte round trip and
// closes it, and says how long that took.
func connectOnce(addr string) (time.Duration, error) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := roundTrip(c, make([]byte, 64)); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// sampleMem samples each process's memory n times, every, and returns
// each one's samples sorted by RSS.
func sampleMem(pids map[string]int, n int, every time.Duration) (map[string][]memSample, error) {
	all := map[string][]memSample{}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for i := 0; i < n; i++ {
		<-tick.C
		for key, pid := range pids {
			m, err := readMem(pid)
			if err != nil {
				return nil, err
			}
			all[key] = append(all[key], m)
		}
	}
	for _, ms := range all {
		slices.SortFunc(ms, func(a, b memSample) int { return cmp.Compare(a.rss, b.rss) })
	}
	return all, nil
}

type memSample struct{ rss, anon, file float64 } // MB

// readMem reads VmRSS, RssAnon and RssFile (+RssShmem) of pid.
func readMem(pid int) (memSample, error) {
	mb, err := procStatusMB(pid)
	return memSample{rss: mb["VmRSS"], anon: mb["RssAnon"], file: mb["RssFile"] + mb["RssShmem"]}, err
}

func summaryRSS() {
	for _, k := range []string{"full", "agentonly"} {
		for _, t := range []struct{ suffix, name string }{{"_notrim", "--trim-executable=false"}, {"", "default"}} {
			if v, ok := results["rss_idle_"+k+t.suffix+"_MB"]; ok {
				fmt.Printf("idle RSS:     %-9s %-24s %.1f MB (anon %.1f, file %.1f), binary %.1f MB; just after traffic %.1f MB (file %.1f)\n", k, t.name, v,
					results["rss_idle_"+k+t.suffix+"_anon_MB"], results["rss_idle_"+k+t.suffix+"_file_MB"], results["bin_"+k+"_MB"],
					results["rss_traffic_"+k+t.suffix+"_MB"], results["rss_traffic_"+k+t.suffix+"_file_MB"])
			}
		}
		if v, ok := results["conn_after_idle_first_"+k+"_ms"]; ok {
			fmt.Printf("after idle:   %-9s connection and round trip %.2f ms, the next %.2f ms\n", k, v, results["conn_after_idle_next_"+k+"_ms"])
		}
	}
}
