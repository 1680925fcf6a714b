package coordinator

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// scrape fetches and parses /metrics at addr.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: status %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape: parse: %v", err)
	}
	return fams
}

// value is the sample of family name whose labels include want (name=value
// pairs); for a histogram, its sample count.
func value(fams map[string]*dto.MetricFamily, name string, want ...string) (float64, error) {
	f := fams[name]
	if f == nil {
		return 0, fmt.Errorf("no metric %s", name)
	}
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
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue(), nil
		case m.Counter != nil:
			return m.Counter.GetValue(), nil
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), nil
		}
	}
	return 0, fmt.Errorf("no sample of %s with labels %v", name, want)
}

// expect is one value a user would check on a dashboard.
type expect struct {
	name   string
	labels []string
	ok     func(float64) bool
	what   string
}

func eq(n float64) (func(float64) bool, string) {
	return func(v float64) bool { return v == n }, fmt.Sprintf("= %v", n)
}

func atLeast(n float64) (func(float64) bool, string) {
	return func(v float64) bool { return v >= n }, fmt.Sprintf(">= %v", n)
}

func want(name string, cmp func(float64) (func(float64) bool, string), n float64, labels ...string) expect {
	ok, what := cmp(n)
	return expect{name: name, labels: labels, ok: ok, what: what}
}

// waitMetrics scrapes until every expectation holds or d passes.
func waitMetrics(t *testing.T, addr string, d time.Duration, exps ...expect) map[string]*dto.MetricFamily {
	t.Helper()
	var fams map[string]*dto.MetricFamily
	tstest.WaitForNil(t, d, "metrics", func() error {
		fams = scrape(t, addr)
		for _, e := range exps {
			v, err := value(fams, e.name, e.labels...)
			if err != nil {
				return err
			}
			if !e.ok(v) {
				return fmt.Errorf("%s%v = %v, want %s", e.name, e.labels, v, e.what)
			}
		}
		return nil
	})
	return fams
}

func TestMetrics(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.MetricsListen = "127.0.0.1:0" })
	addr := s.MetricsAddr()
	if !addr.IsValid() || addr.Port() == 0 {
		t.Fatalf("MetricsAddr() = %v after Start", addr)
	}
	m := addr.String()
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	na := registerKeyed(t, c, jt, "a")
	ca := na.cr
	_, cb := register(t, c, jt, "b")
	bad := jt
	bad.Secret = "wrong"
	if st, body := call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: bad.ID, TokenSecret: bad.Secret, Name: "c", NodeKey: newKey(t),
	}); st != http.StatusUnauthorized {
		t.Fatalf("register with a wrong secret: %d %s", st, body)
	}

	// Registered, not yet connected.
	waitMetrics(t, m, 5*time.Second,
		want("meshlink_coordinator_nodes", eq, 2, "state", "offline"),
		want("meshlink_coordinator_nodes", eq, 0, "state", "online"),
		want("meshlink_coordinator_registrations_total", eq, 2, "result", "ok"),
		want("meshlink_coordinator_registrations_total", eq, 1, "result", wire.ErrCodeTokenInvalid),
	)

	sa := openMap(t, c, jt.URL, ca)
	sb := openMap(t, c, jt.URL, cb)
	full := sa.next(t, 5*time.Second, "a's full map", func(m wire.MapResponse) bool { return m.Full != nil })
	if st, body := call(t, c, jt.URL, wire.PathServices, &ca, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80}); st != http.StatusOK {
		t.Fatalf("expose: %d %s", st, body)
	}
	sb.next(t, 5*time.Second, "web in b's map", func(m wire.MapResponse) bool {
		for _, sv := range append(m.ServicesChanged, func() []wire.Service {
			if m.Full != nil {
				return m.Full.Services
			}
			return nil
		}()...) {
			if sv.Name == "web" {
				return true
			}
		}
		return false
	})
	var rx relayRx
	rc := relayClient(t, full.Full.Relays[0], na.priv, &rx)
	tstest.WaitFor(t, 5*time.Second, "relay client connected", rc.Connected)

	fams := waitMetrics(t, m, 5*time.Second,
		want("meshlink_coordinator_nodes", eq, 2, "state", "online"),
		want("meshlink_coordinator_nodes", eq, 0, "state", "offline"),
		want("meshlink_coordinator_map_streams", eq, 2),
		want("meshlink_coordinator_services", eq, 1),
		want("meshlink_coordinator_relay_clients", atLeast, 1),
		want("meshlink_coordinator_relay_connections_total", atLeast, 1),
		// Two full maps, then at least web appearing in a's (a had its
		// full map before exposing it; b's may already hold b online and
		// web, as changes close together travel in one update).
		want("meshlink_coordinator_netmap_updates_sent_total", atLeast, 3),
	)
	sent, _ := value(fams, "meshlink_coordinator_netmap_updates_sent_total")
	if n, err := value(fams, "meshlink_coordinator_netmap_update_latency_seconds"); err != nil || n != sent {
		t.Errorf("latency histogram has %v samples (%v), want one per update sent (%v)", n, err, sent)
	}
	for _, name := range []string{"go_goroutines", "process_open_fds"} {
		if fams[name] == nil {
			t.Errorf("standard collector metric %s missing", name)
		}
	}

	// A node whose stream ends is offline.
	sb.close()
	waitMetrics(t, m, 5*time.Second,
		want("meshlink_coordinator_nodes", eq, 1, "state", "online"),
		want("meshlink_coordinator_nodes", eq, 1, "state", "offline"),
		want("meshlink_coordinator_map_streams", eq, 1),
	)
}

func TestMetricsListenErrors(t *testing.T) {
	// Off by default in the library: nothing listens.
	s := startServer(t, t.TempDir())
	if a := s.MetricsAddr(); a.IsValid() {
		t.Fatalf("metrics listening on %v without MetricsListen", a)
	}
	s1 := startServer(t, t.TempDir(), func(c *Config) { c.MetricsListen = "127.0.0.1:0" })
	busy := s1.MetricsAddr().String()
	s2, err := New(Config{Listen: "127.0.0.1:0", DataDir: t.TempDir(), MetricsListen: busy})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	err = s2.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--metrics-listen") || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("metrics port in use: got %v, want an error naming --metrics-listen", err)
	}
	// Two servers in one process keep separate registries.
	if got, _ := value(scrape(t, busy), "meshlink_coordinator_registrations_total", "result", "ok"); got != 0 {
		t.Fatalf("registrations on a fresh server = %v", got)
	}
}
