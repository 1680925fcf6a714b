package bench

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/internal/tstest"
)

// The DNS benchmark: dnsmasq answering a name from its own hosts file
// against a consumer agent (a real meshlink process) answering the same
// service's NAME.mesh.internal, driven by the same load generator in
// alternating rounds of the same run. BENCH_DNS_PPROF=FILE also writes a
// CPU profile of that agent under the load.
const (
	dnsClients = 8                      // concurrent UDP clients, one socket each
	dnsRound   = 750 * time.Millisecond // one round against one server
	dnsRounds  = 4                      // rounds against each, alternating
)

var dnsOnce sync.Once

// dnsDebugAddr serves the DNS agent's profiles when BENCH_DNS_PPROF names
// a file to write one to.
const dnsDebugAddr = "127.0.0.1:39999"

func BenchmarkDNS(b *testing.B) {
	dnsmasq, err := exec.LookPath("dnsmasq")
	if err != nil {
		b.Skip("dnsmasq is not installed (.ci/run installs it)")
	}
	e := setup(b)
	dnsOnce.Do(func() {
		agentAddr, err := e.dnsAgent(b)
		if err != nil {
			b.Fatal(err)
		}
		masqAddr, err := e.startDnsmasq(dnsmasq, "sink.mesh.internal")
		if err != nil {
			b.Fatal(err)
		}
		if out := os.Getenv("BENCH_DNS_PPROF"); out != "" {
			// A 3 s CPU profile of the agent under the same load, before
			// the measured rounds (curl fetches it from --debug-listen).
			go exec.Command("curl", "-s", "-o", out, "http://"+dnsDebugAddr+"/debug/pprof/profile?seconds=3").Run()
			dnsLoad(agentAddr, "sink.mesh.internal.", dnsClients, 4*time.Second)
		}
		var agentQ, masqQ float64
		for i := 0; i < dnsRounds; i++ {
			n, err := dnsLoad(masqAddr, "sink.mesh.internal.", dnsClients, dnsRound)
			if err != nil {
				b.Fatalf("dnsmasq: %v", err)
			}
			masqQ += n
			if n, err = dnsLoad(agentAddr, "sink.mesh.internal.", dnsClients, dnsRound); err != nil {
				b.Fatalf("agent: %v", err)
			}
			agentQ += n
		}
		secs := (dnsRounds * dnsRound).Seconds()
		record("dns_dnsmasq_qps", masqQ/secs)
		record("dns_agent_qps", agentQ/secs)
		if rss, err := readRSS(e.agentPIDs["dns"], "VmHWM"); err == nil {
			record("dns_agent_peak_MB", rss)
		}
	})
	b.ReportMetric(results["dns_agent_qps"], "agent-qps")
	b.ReportMetric(results["dns_dnsmasq_qps"], "dnsmasq-qps")
	for i := 0; i < b.N; i++ {
	}
}

// dnsAgent starts a consumer agent whose DNS listens on a free loopback
// port and waits until it answers sink.mesh.internal.
func (e *meshEnv) dnsAgent(b *testing.B) (string, error) {
	port, err := freePort()
	if err != nil {
		return "", err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := []string{"agent", "--name", "bench-dns", "--state", filepath.Join(e.dir, "dns"),
		"--proxy-range", "127.205.0.0/16", "--join", e.token, "--dns", addr, "--dns-upstream", "127.0.0.1:1", "--log-level", "warn"}
	if os.Getenv("BENCH_DNS_PPROF") != "" {
		args = append(args, "--debug-listen", dnsDebugAddr)
	}
	e.agentPIDs["dns"] = e.start(e.bin, "dns", args...)
	err = tstest.Poll(30*time.Second, func() error {
		r, err := dnsQuery(addr, "sink.mesh.internal.")
		if err != nil {
			return err
		}
		if len(r.Answer) == 0 {
			return errors.New("no answer yet")
		}
		return nil
	})
	return addr, err
}

// startDnsmasq runs dnsmasq on a free loopback port answering name from a
// hosts file of its own and nothing else.
func (e *meshEnv) startDnsmasq(bin, name string) (string, error) {
	port, err := freePort()
	if err != nil {
		return "", err
	}
	hosts := filepath.Join(e.dir, "dnsmasq.hosts")
	if err := os.WriteFile(hosts, []byte("127.205.0.7 "+name+"\n"), 0o644); err != nil {
		return "", err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	e.start(bin, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--addn-hosts="+hosts,
		"--listen-address=127.0.0.1", "--bind-interfaces", fmt.Sprintf("--port=%d", port),
		"--pid-file="+filepath.Join(e.dir, "dnsmasq.pid"), "--user="+currentUser(), "--local-ttl=5")
	err = tstest.Poll(10*time.Second, func() error {
		r, err := dnsQuery(addr, name+".")
		if err != nil {
			return err
		}
		if len(r.Answer) == 0 {
			return errors.New("no answer yet")
		}
		return nil
	})
	return addr, err
}

func currentUser() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return "root"
}

func dnsQuery(addr, name string) (*mdns.Msg, error) {
	c := &mdns.Client{Timeout: time.Second}
	r, _, err := c.Exchange(new(mdns.Msg).SetQuestion(name, mdns.TypeA), addr)
	return r, err
}

// dnsLoad asks addr for name's A record from clients UDP sockets at once,
// each waiting for its answer before the next question, for d; it returns
// how many answers arrived. A lost datagram costs its client a 200ms wait.
func dnsLoad(addr, name string, clients int, d time.Duration) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, clients)
	deadline := time.Now().Add(d)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := net.Dial("udp", addr)
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			m := new(mdns.Msg).SetQuestion(name, mdns.TypeA)
			q, err := m.Pack()
			if err != nil {
				errc <- err
				return
			}
			buf := make([]byte, 1500)
			var n int64
			for id := uint16(i << 12); time.Now().Before(deadline); id++ {
				q[0], q[1] = byte(id>>8), byte(id)
				if _, err := c.Write(q); err != nil {
					errc <- err
					return
				}
				c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				for {
					k, err := c.Read(buf)
					if err != nil {
						break // lost: ask again
					}
					if k >= 12 && buf[0] == q[0] && buf[1] == q[1] {
						if buf[3]&0xF != 0 || buf[6]|buf[7] == 0 {
							errc <- fmt.Errorf("answer with rcode %d and %d records", buf[3]&0xF, int(buf[6])<<8|int(buf[7]))
							return
						}
						n++
						break
					}
				}
			}
			total.Add(n)
		}(i)
	}
	wg.Wait()
	select {
	case err := <-errc:
		return 0, err
	default:
	}
	return float64(total.Load()), nil
}

// summaryMore prints the figures of the benchmarks outside bench_test.go
// (resultsMu is held).
func summaryMore() {
	if d, a := results["dns_dnsmasq_qps"], results["dns_agent_qps"]; d > 0 && a > 0 {
		fmt.Printf("DNS A query:  dnsmasq %.0f qps, agent %.0f qps, ratio %.2fx (%d clients)\n", d, a, a/d, dnsClients)
	}
	summaryRSS()
	summaryConns()
}
