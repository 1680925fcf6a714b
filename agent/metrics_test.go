package agent_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// scrape fetches and parses /metrics at addr.
func scrape(addr string) (map[string]*dto.MetricFamily, error) { return harness.Scrape(addr) }

// sum adds the samples of family name whose labels include want (name=value
// pairs); for a histogram, its sample count.
func sum(fams map[string]*dto.MetricFamily, name string, want ...string) (float64, error) {
	f := fams[name]
	if f == nil {
		return 0, fmt.Errorf("no metric %s", name)
	}
	var total float64
	var n int
next:
	for _, m := range f.Metric {
		for i := 0; i+1 < len(want); i += 2 {
			found := false
			for _, l := range m.Label {
				if l.GetName() == want[i] && l.GetValue() == want[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		n++
		switch {
		case m.Gauge != nil:
			total += m.Gauge.GetValue()
		case m.Counter != nil:
			total += m.Counter.GetValue()
		case m.Histogram != nil:
			total += float64(m.Histogram.GetSampleCount())
		}
	}
	if n == 0 {
		return 0, fmt.Errorf("no sample of %s with labels %v", name, want)
	}
	return total, nil
}

type check struct {
	name   string
	labels []string
	min    float64 // the sum must be at least this
	max    float64 // and at most this, unless negative
}

// waitMetrics scrapes the agent until every check holds.
func waitMetrics(t *testing.T, a *agent.Agent, checks ...check) {
	t.Helper()
	tstest.WaitForNil(t, 10*time.Second, "metrics", func() error {
		fams, err := scrape(a.MetricsAddr().String())
		if err != nil {
			return err
		}
		for _, c := range checks {
			v, err := sum(fams, c.name, c.labels...)
			if err != nil {
				return err
			}
			if v < c.min || (c.max >= 0 && v > c.max) {
				return fmt.Errorf("%s%v = %v, want [%v, %v]", c.name, c.labels, v, c.min, c.max)
			}
		}
		return nil
	})
}

// echoServer greets nothing and echoes everything: a site's real service.
func echoServer(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func startWithMetrics(t *testing.T, m *harness.Mesh, name string, o harness.AgentOptions) *agent.Agent {
	t.Helper()
	cfg := m.AgentConfig(name, o)
	cfg.Metrics = "127.0.0.1:0"
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !a.MetricsAddr().IsValid() {
		t.Fatal("no metrics address after Start with Metrics set")
	}
	return a
}

func TestAgentMetrics(t *testing.T) {
	m := harness.NewMesh(t)
	prov := startWithMetrics(t, m, "prov", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: echoServer(t)}}})
	cons := startWithMetrics(t, m, "cons", harness.AgentOptions{})

	var local string
	tstest.WaitForNil(t, 10*time.Second, "web consumable at cons", func() error {
		for _, s := range cons.Services().Consumed {
			if s.Name == "web" && s.Listening && len(s.Providers) == 1 {
				local = s.Local.String()
				return nil
			}
		}
		return errors.New("web not listening yet")
	})
	c, err := net.DialTimeout("tcp", local, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat([]byte("meshlink"), 1024)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the mesh: %v", err)
	}
	c.Close()

	n := float64(len(msg))
	waitMetrics(t, cons,
		check{"meshlink_agent_coordinator_connected", nil, 1, 1},
		check{"meshlink_agent_peers", nil, 1, 1}, // prov, on whatever path
		check{"meshlink_agent_peers", []string{"path", "none"}, 0, 0},
		check{"meshlink_agent_peer_bytes_total", []string{"peer", "prov"}, n, -1},
		check{"meshlink_agent_peer_wireguard_bytes_total", []string{"peer", "prov", "direction", "tx"}, n, -1},
		check{"meshlink_agent_service_connections_total", []string{"service", "web", "role", "consumer"}, 1, -1},
		check{"meshlink_agent_service_connections_open", []string{"service", "web", "role", "consumer"}, 0, 0},
		check{"meshlink_agent_service_bytes_total", []string{"service", "web", "role", "consumer", "direction", "sent"}, n, n},
		check{"meshlink_agent_service_bytes_total", []string{"service", "web", "role", "consumer", "direction", "received"}, n, n},
		check{"meshlink_agent_service_dial_failures_total", []string{"service", "web", "role", "consumer"}, 0, 0},
		check{"meshlink_agent_netmap_update_latency_seconds", nil, 1, -1},
	)
	waitMetrics(t, prov,
		check{"meshlink_agent_service_connections_total", []string{"service", "web", "role", "provider"}, 1, -1},
		check{"meshlink_agent_service_bytes_total", []string{"service", "web", "role", "provider"}, 2 * n, 2 * n},
		check{"meshlink_agent_service_denied_total", []string{"service", "web"}, 0, 0},
	)
}

func TestAgentMetricsPortInUse(t *testing.T) {
	m := harness.NewMesh(t)
	a := startWithMetrics(t, m, "a", harness.AgentOptions{})
	cfg := m.AgentConfig("b", harness.AgentOptions{})
	cfg.Metrics = a.MetricsAddr().String()
	_, err := harness.StartAgent(t, cfg)
	if err == nil || !strings.Contains(err.Error(), "--metrics") || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("metrics address in use: got %v, want an error naming --metrics", err)
	}
	// Off by default.
	if b := m.AddAgent("c", harness.AgentOptions{}); b.MetricsAddr().IsValid() {
		t.Fatalf("metrics served on %v without Metrics set", b.MetricsAddr())
	}
}
