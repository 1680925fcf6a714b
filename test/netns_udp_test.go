package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// iperfUDP is what iperf3 --json reports of a UDP test, receiver side.
type iperfUDP struct {
	End struct {
		Sum struct {
			BitsPerSecond float64 `json:"bits_per_second"`
			LostPercent   float64 `json:"lost_percent"`
			LostPackets   int64   `json:"lost_packets"`
			Packets       int64   `json:"packets"`
			JitterMS      float64 `json:"jitter_ms"`
		} `json:"sum"`
	} `json:"end"`
	Error string `json:"error"`
}

// TestNetnsUDP: real processes in namespaces. Site B exports a real
// dnsmasq as the UDP service dns=127.0.0.1:53/udp and an iperf3 server
// as perf=127.0.0.1:5201/tcp+udp (iperf3 has a TCP control connection
// beside its UDP data). At site A, dig resolves a name dnsmasq answers
// through the mesh, and the agent's DNS answers SRV _dns._udp; then
// iperf3 -u at a fixed rate runs straight to site B and through the
// mesh, and the test reports both paths' throughput and loss.
func TestNetnsUDP(t *testing.T) {
	n := topo.New(t)
	needCommands(t, "dig", "dnsmasq", "iperf3")
	bin := harness.Binary(t)
	lan := n.Switch("lan")
	coord, siteA, siteB := n.Host("coord"), n.Host("sitea"), n.Host("siteb")
	n.Link(coord, lan, "10.79.0.1/24")
	n.Link(siteA, lan, "10.79.0.2/24")
	n.Link(siteB, lan, "10.79.0.3/24")

	dir := t.TempDir()
	data := filepath.Join(dir, "coord")
	startProc(t, coord, "coordinator", bin, "coordinator", "--listen", "10.79.0.1:8443", "--data", data)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var tokenA, tokenB string
	tstest.WaitForNil(t, 20*time.Second, "join tokens", func() error {
		out, err := coord.Run(ctx, bin, "token", "create", "--data", data)
		tokenA = strings.TrimSpace(string(out))
		return err
	})
	if out, err := coord.Run(ctx, bin, "token", "create", "--data", data); err != nil {
		t.Fatalf("token create: %v\n%s", err, out)
	} else {
		tokenB = strings.TrimSpace(string(out))
	}

	conf := filepath.Join(dir, "dnsmasq.conf")
	if err := os.WriteFile(conf, []byte("no-resolv\nno-hosts\nlisten-address=127.0.0.1\nbind-interfaces\naddress=/www.example.test/192.0.2.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	startProc(t, siteB, "dnsmasq", "dnsmasq", "--no-daemon", "--conf-file="+conf, "--port=53", "--pid-file="+filepath.Join(dir, "dnsmasq.pid"))
	startProc(t, siteB, "iperf3", "iperf3", "-s", "-p", "5201")
	startProc(t, siteB, "agent-b", bin, "agent", "--join", tokenB, "--name", "siteb", "--state", filepath.Join(dir, "b"),
		"--dns", "off", "--expose", "dns=127.0.0.1:53/udp;udp-idle=30s,perf=127.0.0.1:5201/tcp+udp")
	startProc(t, siteA, "agent-a", bin, "agent", "--join", tokenA, "--name", "sitea", "--state", filepath.Join(dir, "a"),
		"--dns", "127.0.0.1:53")

	var svcs map[string]localapi.Service
	tstest.WaitForNil(t, 30*time.Second, "dns and perf to reach site A", func() error {
		out, err := siteA.Run(ctx, bin, "services", "--json", "--state", filepath.Join(dir, "a"))
		if err != nil {
			return err
		}
		var s struct {
			Consumed []localapi.Service `json:"consumed"`
		}
		if err := json.Unmarshal(out, &s); err != nil {
			return err
		}
		svcs = map[string]localapi.Service{}
		for _, sv := range s.Consumed {
			svcs[sv.Name] = sv
		}
		for _, name := range []string{"dns", "perf"} {
			if sv, ok := svcs[name]; !ok || !sv.Listening || len(sv.Providers) != 1 {
				return errors.New("not yet")
			}
		}
		return nil
	})
	dnsAddr, perfAddr := svcs["dns"].Local, svcs["perf"].Local
	if svcs["dns"].Protocol != "udp" || svcs["perf"].Protocol != "tcp+udp" {
		t.Fatalf("protocols at site A: dns %q, perf %q", svcs["dns"].Protocol, svcs["perf"].Protocol)
	}

	// dig, a real DNS client, at the service's local address and port.
	tstest.WaitForNil(t, 10*time.Second, "dig through the mesh to dnsmasq", func() error {
		out, err := siteA.Run(ctx, "dig", "+short", "+time=1", "+tries=1", "@"+dnsAddr.Addr().String(), "-p", fmt.Sprint(dnsAddr.Port()), "www.example.test")
		if err != nil || strings.TrimSpace(string(out)) != "192.0.2.53" {
			return fmt.Errorf("%q, %v", out, err)
		}
		return nil
	})
	start := time.Now()
	const queries = 50
	for i := range queries {
		out, err := siteA.Run(ctx, "dig", "+short", "+time=2", "+tries=2", "@"+dnsAddr.Addr().String(), "-p", fmt.Sprint(dnsAddr.Port()), "www.example.test")
		if err != nil || strings.TrimSpace(string(out)) != "192.0.2.53" {
			t.Fatalf("dig %d through the mesh: %q %v", i, out, err)
		}
	}
	t.Logf("%d dig queries through the mesh to dnsmasq answered, %v each (a dig process each)", queries, (time.Since(start) / queries).Round(time.Microsecond))
	out, err := siteA.Run(ctx, "dig", "+short", "@127.0.0.1", "SRV", "_dns._udp.mesh.internal")
	if want := fmt.Sprintf("%d dns.mesh.internal.", dnsAddr.Port()); err != nil || !strings.Contains(string(out), want) {
		t.Fatalf("dig SRV _dns._udp.mesh.internal: %q %v; want %q", out, err, want)
	}

	// Bulk UDP at a fixed rate, the direct path and the mesh in one run.
	const rate, seconds, size = "50M", "3", "1200"
	iperf := func(host string) iperfUDP {
		t.Helper()
		var r iperfUDP
		// iperf3's server takes one test at a time: a second client
		// while the first winds down is told "busy"; retry that.
		tstest.WaitForNil(t, 20*time.Second, "iperf3 -u to "+host, func() error {
			out, err := siteA.Run(ctx, "iperf3", "-c", host, "-p", "5201", "-u", "-b", rate, "-l", size, "-t", seconds, "--json")
			r = iperfUDP{}
			if jerr := json.Unmarshal(out, &r); jerr != nil {
				return fmt.Errorf("%v: %s", jerr, out)
			}
			if r.Error != "" || err != nil {
				return fmt.Errorf("%s (%v)", r.Error, err)
			}
			return nil
		})
		return r
	}
	direct := iperf("10.79.0.3")
	mesh := iperf(perfAddr.Addr().String())
	for _, p := range []struct {
		name string
		r    iperfUDP
	}{{"direct", direct}, {"mesh", mesh}} {
		s := p.r.End.Sum
		t.Logf("iperf3 -u -b %s -l %s -t %s %-6s: %.1f Mbit/s received, loss %d/%d (%.2f%%), jitter %.3f ms",
			rate, size, seconds, p.name, s.BitsPerSecond/1e6, s.LostPackets, s.Packets, s.LostPercent, s.JitterMS)
	}
	if mesh.End.Sum.Packets == 0 || mesh.End.Sum.LostPercent > 50 {
		t.Fatalf("bulk UDP through the mesh: %+v", mesh.End.Sum)
	}
}
