package bench

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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
// for 2 s and the lowest kept, split into anonymous and file-backed pages
// (/proc/PID/status RssAnon, RssFile).
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
		c, err := net.DialTimeout("tcp", local, 10*time.Second)
		if err != nil {
			return err
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		err = roundTrip(c, make([]byte, 64))
		c.Close()
		if err != nil {
			return fmt.Errorf("%s: through the mesh: %w", s.key, err)
		}
	}
	// Idle: the lowest of 10 samples over 2 s (a sample is a measurement,
	// not a wait for a condition).
	low := map[string]memSample{}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for i := 0; i < 10; i++ {
		<-tick.C
		for _, s := range sites {
			m, err := readMem(pids[s.key])
			if err != nil {
				return err
			}
			if l, ok := low[s.key]; !ok || m.rss < l.rss {
				low[s.key] = m
			}
		}
	}
	for _, s := range sites {
		m := low[s.key]
		record("rss_idle_"+s.key+suffix+"_MB", m.rss)
		record("rss_idle_"+s.key+suffix+"_anon_MB", m.anon)
		record("rss_idle_"+s.key+suffix+"_file_MB", m.file)
	}
	return nil
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
				fmt.Printf("idle RSS:     %-9s %-24s %.1f MB (anon %.1f, file %.1f), binary %.1f MB\n", k, t.name, v,
					results["rss_idle_"+k+t.suffix+"_anon_MB"], results["rss_idle_"+k+t.suffix+"_file_MB"], results["bin_"+k+"_MB"])
			}
		}
	}
}
