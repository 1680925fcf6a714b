package bench

import (
	"fmt"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Many connections through one service: BenchmarkConcurrentConns holds
// connsConcurrent connections open through the consumer's proxy at once
// and makes a round trip on each; BenchmarkConnRate opens, uses once and
// closes connections from connsWorkers goroutines for connsRound, through
// the mesh and directly in alternating rounds, and reports new connections
// per second and the p50 time from dial to the first echoed byte.
const (
	connsConcurrent = 1000
	connsWorkers    = 8
	connsRound      = time.Second
	connsRounds     = 2
)

var concurrentOnce, rateOnce sync.Once

func BenchmarkConcurrentConns(b *testing.B) {
	e := setup(b)
	concurrentOnce.Do(func() {
		for _, c := range []struct{ key, addr string }{{"direct", e.echo.Addr().String()}, {"mesh", e.meshEcho}} {
			ok, d, err := concurrentConns(c.addr, connsConcurrent)
			if err != nil {
				b.Logf("%s: %v", c.key, err)
			}
			record("conc_"+c.key+"_ok", float64(ok))
			record("conc_"+c.key+"_s", d.Seconds())
		}
	})
	b.ReportMetric(results["conc_mesh_ok"], "mesh-conns-ok")
	for i := 0; i < b.N; i++ {
	}
}

// concurrentConns opens n connections to addr, all held open, then makes a
// 64-byte round trip on each; it returns how many succeeded and how long
// it all took.
func concurrentConns(addr string, n int) (int, time.Duration, error) {
	start := time.Now()
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	var ok atomic.Int64
	errc := make(chan error, n)
	sem := make(chan struct{}, 64) // dials in flight
	for i := range conns {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			c, err := net.DialTimeout("tcp", addr, 20*time.Second)
			<-sem
			if err != nil {
				errc <- err
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(c net.Conn) {
			defer wg.Done()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			if err := roundTrip(c, make([]byte, 64)); err != nil {
				errc <- err
				return
			}
			ok.Add(1)
		}(c)
	}
	wg.Wait()
	d := time.Since(start)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	select {
	case err := <-errc:
		return int(ok.Load()), d, fmt.Errorf("%d of %d failed, first: %w", n-int(ok.Load()), n, err)
	default:
	}
	return int(ok.Load()), d, nil
}

func BenchmarkConnRate(b *testing.B) {
	e := setup(b)
	rateOnce.Do(func() {
		var lat = map[string][]time.Duration{}
		var count = map[string]int{}
		var fails = map[string]int{}
		for r := 0; r < connsRounds; r++ {
			for _, c := range []struct{ key, addr string }{{"direct", e.echo.Addr().String()}, {"mesh", e.meshEcho}} {
				l, f := connRate(c.addr, connsWorkers, connsRound)
				lat[c.key] = append(lat[c.key], l...)
				count[c.key] += len(l)
				fails[c.key] += f
			}
		}
		for k, l := range lat {
			sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
			record("rate_"+k+"_cps", float64(count[k])/(connsRounds*connsRound).Seconds())
			record("rate_"+k+"_fail", float64(fails[k]))
			if len(l) > 0 {
				record("rate_"+k+"_p50_us", float64(l[len(l)/2].Microseconds()))
				record("rate_"+k+"_p99_us", float64(l[len(l)*99/100].Microseconds()))
			}
		}
	})
	b.ReportMetric(results["rate_mesh_cps"], "mesh-conn/s")
	b.ReportMetric(results["rate_direct_cps"], "direct-conn/s")
	for i := 0; i < b.N; i++ {
	}
}

// connRate opens connections to addr from workers goroutines for d, each
// one dialled, one byte echoed, closed; it returns the time from dial to
// the echoed byte of each, and how many failed.
func connRate(addr string, workers int, d time.Duration) ([]time.Duration, int) {
	var mu sync.Mutex
	var lat []time.Duration
	var fails int
	var wg sync.WaitGroup
	deadline := time.Now().Add(d)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			buf := make([]byte, 1)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				c, err := net.DialTimeout("tcp", addr, 10*time.Second)
				if err != nil {
					bad++
					continue
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err = c.Write([]byte{'x'})
				if err == nil {
					_, err = c.Read(buf)
				}
				c.Close()
				if err != nil {
					bad++
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			fails += bad
			mu.Unlock()
		}()
	}
	wg.Wait()
	return lat, fails
}

func summaryConns() {
	if n, ok := results["conc_mesh_ok"]; ok {
		fmt.Printf("concurrent:   %d connections held at once, a round trip on each: mesh %.0f ok in %.2f s, direct %.0f ok in %.2f s\n",
			connsConcurrent, n, results["conc_mesh_s"], results["conc_direct_ok"], results["conc_direct_s"])
	}
	if d, m := results["rate_direct_cps"], results["rate_mesh_cps"]; d > 0 && m > 0 {
		fmt.Printf("new conns:    direct %.0f/s, mesh %.0f/s, ratio %.2fx (%d workers); dial to first byte p50 direct %.0f us, mesh %.0f us (p99 %.0f, %.0f); failed %.0f, %.0f\n",
			d, m, m/d, connsWorkers, results["rate_direct_p50_us"], results["rate_mesh_p50_us"],
			results["rate_direct_p99_us"], results["rate_mesh_p99_us"], results["rate_direct_fail"], results["rate_mesh_fail"])
	}
}
