package test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// httpBackend is a real HTTP server on loopback that says who it is,
// echoes request bodies and can be told to fail.
type httpBackend struct {
	name  string
	srv   *http.Server
	ln    net.Listener
	hits  atomic.Int64
	conns atomic.Int64
	// fail, when set, answers every request with this status;
	// failEvery, when set, only every failEvery-th (503).
	fail, failEvery atomic.Int64
}

func startHTTPBackend(t *testing.T, name string) *httpBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &httpBackend{name: name, ln: ln}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	b.srv = &http.Server{
		Protocols: &protos,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				b.conns.Add(1)
			}
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case r.Method == http.MethodConnect:
				// A tunnel: 200, then an echo of the stream.
				conn, brw, err := http.NewResponseController(w).Hijack()
				if err != nil {
					return
				}
				defer conn.Close()
				io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n")
				io.Copy(conn, brw)
				return
			case r.URL.Path == "/slow":
				select { // a target that takes its time
				case <-r.Context().Done():
				case <-time.After(5 * time.Second):
				}
				return
			}
			hit := b.hits.Add(1)
			if every := b.failEvery.Load(); every > 0 && hit%every == 0 {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintf(w, "%s failing\n", b.name)
				return
			}
			if code := b.fail.Load(); code != 0 {
				w.WriteHeader(int(code))
				fmt.Fprintf(w, "%s failing\n", b.name)
				return
			}
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Backend", b.name)
			fmt.Fprintf(w, "%s %s %s %s host=%s body=%s", b.name, r.Proto, r.Method, r.URL.Path, r.Host, body)
		}),
	}
	go b.srv.Serve(ln)
	t.Cleanup(func() { b.srv.Close() })
	return b
}

func (b *httpBackend) addr() string { return b.ln.Addr().String() }

// keepAliveClient reuses connections to the consumer's local address.
func keepAliveClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}}
}

// get fetches url and answers the status and body.
func get(c *http.Client, url string, header ...string) (int, string, http.Header, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header, err
}

// meteredAgent is AddAgent with /metrics served on loopback.
func meteredAgent(t *testing.T, m *harness.Mesh, name string, o harness.AgentOptions) *agent.Agent {
	t.Helper()
	cfg := m.AgentConfig(name, o)
	cfg.Metrics = "127.0.0.1:0"
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// webMesh is the mesh of most HTTP tests: a consumer, site-a, and one
// provider of service web per export (site-b, site-c, …), every agent
// serving its metrics.
type webMesh struct {
	m     *harness.Mesh
	cons  *agent.Agent
	provs []*agent.Agent
	svc   localapi.Service // web at the consumer
	base  string           // http:// and web's local address at the consumer
	c     *http.Client     // keep-alive, see keepAliveClient
}

// newWebMesh starts a mesh with policy set (none if empty), the consumer
// and a provider for each export (its Name set to web), and waits until
// the consumer has every provider of web.
func newWebMesh(t *testing.T, policy string, exports ...agent.Export) *webMesh {
	t.Helper()
	m := harness.NewMesh(t)
	if policy != "" {
		setPolicy(t, m, policy)
	}
	w := &webMesh{m: m, c: keepAliveClient()}
	w.cons = meteredAgent(t, m, "site-a", harness.AgentOptions{})
	for i, e := range exports {
		e.Name = "web"
		w.provs = append(w.provs, meteredAgent(t, m, fmt.Sprintf("site-%c", 'b'+i), harness.AgentOptions{Expose: []agent.Export{e}}))
	}
	w.svc = waitProviders(t, w.cons, "web", len(exports))
	w.base = "http://" + w.svc.Local.String()
	return w
}

// httpRequests sums meshlink_http_requests_total of a at the labels
// given (name, value pairs).
func httpRequests(t *testing.T, a *agent.Agent, labels ...string) float64 {
	t.Helper()
	return httpMetric(t, a, "meshlink_http_requests_total", labels...)
}

// TestHTTPServiceRequests: a service exported with protocol=http carries
// HTTP/1.1 requests one by one through the mesh: each arrives at the real
// server with its method, path, Host and body, responses come back
// intact, and the provider forwards them over a few pooled keep-alive
// connections, not one per request.
func TestHTTPServiceRequests(t *testing.T) {
	web := startHTTPBackend(t, "site-b")
	w := newWebMesh(t, "", agent.Export{Target: web.addr(), Protocol: "http"})
	cons, prov, svc, base, c := w.cons, w.provs[0], w.svc, w.base, w.c

	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, body, h, err := get(c, fmt.Sprintf("%s/item/%d", base, i))
			want := fmt.Sprintf("site-b HTTP/1.1 GET /item/%d host=%s body=", i, svc.Local)
			if err != nil || code != 200 || body != want || h.Get("X-Backend") != "site-b" {
				errs <- fmt.Errorf("GET %d: %d %q %v; want 200 %q", i, code, body, err, want)
			}
		}()
		if i%16 == 15 {
			wg.Wait()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("x"), 100_000)
	resp, err := c.Post(base+"/upload", "application/octet-stream", bytes.NewReader(payload))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := "site-b HTTP/1.1 POST /upload host=" + svc.Local.String() + " body=" + string(payload); resp.StatusCode != 200 || string(got) != want {
		t.Fatalf("POST: %d, %d bytes; want 200 and the body echoed", resp.StatusCode, len(got))
	}
	if hits := web.hits.Load(); hits != n+1 {
		t.Fatalf("the server saw %d requests, want %d", hits, n+1)
	}
	if conns := web.conns.Load(); conns > 32 {
		t.Fatalf("the provider opened %d connections to the server for %d requests; want pooled keep-alive connections", conns, n+1)
	}
	t.Logf("%d requests over %d connections to the server", n+1, web.conns.Load())
	// Status says what the service is at both ends.
	if s, _ := serviceOf(cons, "web"); s.Protocol != "http" {
		t.Fatalf("the consumer lists web as %q, want http", s.Protocol)
	}
	if e := prov.Services().Exported; len(e) != 1 || e[0].Protocol != "http" {
		t.Fatalf("the provider lists its exports as %+v, want web as http", e)
	}
	// Both ends counted every request, by provider, code and method.
	if got := httpRequests(t, cons, "role", "consumer", "service", "web", "provider", "site-b", "code", "200", "method", "GET"); got != n {
		t.Fatalf("consumer counted %v GETs, want %d", got, n)
	}
	if got := httpRequests(t, prov, "role", "provider", "service", "web", "code", "200", "method", "POST"); got != 1 {
		t.Fatalf("provider counted %v POSTs, want 1", got)
	}
}

// TestHTTPServiceGarbage: bytes that are not HTTP sent to an HTTP
// service's local address get a 400 and the connection closed; the agents
// live on and the next request works.
func TestHTTPServiceGarbage(t *testing.T) {
	web := startHTTPBackend(t, "site-b")
	svc := newWebMesh(t, "", agent.Export{Target: web.addr(), Protocol: "http"}).svc
	for i, garbage := range []string{"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", strings.Repeat("A", 100), "hello there\r\n\r\n", "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"} {
		conn, err := net.Dial("tcp", svc.Local.String())
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, garbage)
		b, _ := io.ReadAll(conn)
		conn.Close()
		if !strings.HasPrefix(string(b), "HTTP/1.1 400 ") {
			t.Fatalf("%q got %q; want a 400", garbage, b)
		}
		// The consumer answers what cannot start a request itself; the
		// others are request lines net/http refuses with its own 400.
		if i < 2 && !strings.Contains(string(b), "meshlink: this service speaks HTTP") {
			t.Fatalf("%q got %q; want the consumer's 400", garbage, b)
		}
	}
	tstest.WaitForNil(t, 5*time.Second, "a request after the garbage", func() error {
		code, body, _, err := get(keepAliveClient(), "http://"+svc.Local.String()+"/after")
		if err != nil || code != 200 || !strings.HasPrefix(body, "site-b ") {
			return fmt.Errorf("%d %q %v", code, body, err)
		}
		return nil
	})
}

// setPolicy sets the coordinator's policy file.
func setPolicy(t *testing.T, m *harness.Mesh, text string) {
	t.Helper()
	if _, err := m.Coord.SetPolicy(context.Background(), "policy.yaml", text, "test"); err != nil {
		t.Fatal(err)
	}
}

// backendOf fetches url and answers the X-Backend that answered.
func backendOf(t *testing.T, c *http.Client, url string, header ...string) string {
	t.Helper()
	code, body, h, err := get(c, url, header...)
	if err != nil || code != 200 {
		t.Fatalf("GET %s: %d %q %v", url, code, body, err)
	}
	return h.Get("X-Backend")
}

// TestHTTPRoutesAndSplit: the policy's routes send requests with
// x-canary: true (and those under /beta/) to v2, and the rest by the
// service's 90/10 split: over 10,000 requests v2 gets 10% ± 2%.
func TestHTTPRoutesAndSplit(t *testing.T) {
	v1, v2 := startHTTPBackend(t, "v1"), startHTTPBackend(t, "v2")
	w := newWebMesh(t, `
services:
  web:
    protocol: http
    split: {v1: 90, v2: 10}
    http:
      routes:
        - match:
            headers:
              x-canary: {exact: "true"}
          version: v2
        - match: {path: /beta/, methods: [GET]}
          version: v2
        - match:
            headers:
              user-agent: {regex: "old-.*"}
          split: {v1: 100}
`, agent.Export{Target: v1.addr(), Version: "v1"}, agent.Export{Target: v2.addr(), Version: "v2"})
	base, c := w.base, w.c
	tstest.WaitFor(t, 5*time.Second, "the service to be HTTP at the consumer", func() bool {
		return backendOf(t, c, base+"/", "x-canary", "true") == "v2"
	})
	for i := range 100 {
		if b := backendOf(t, c, base+"/x", "x-canary", "true"); b != "v2" {
			t.Fatalf("canary request %d went to %s", i, b)
		}
		if b := backendOf(t, c, base+"/beta/page"); b != "v2" {
			t.Fatalf("/beta/ request %d went to %s", i, b)
		}
		if b := backendOf(t, c, base+"/", "user-agent", "old-browser/1", "x-canary", "false"); b != "v1" {
			t.Fatalf("old-.* request %d went to %s", i, b)
		}
	}

	const n = 10_000
	var counts [2]atomic.Int64
	var wg sync.WaitGroup
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				switch backendOf(t, c, base+"/") {
				case "v1":
					counts[0].Add(1)
				case "v2":
					counts[1].Add(1)
				}
			}
		}()
	}
	start := time.Now()
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	got := float64(counts[1].Load()) / n
	t.Logf("%d requests in %v: v1 %d, v2 %d (%.2f%%)", n, time.Since(start).Round(time.Millisecond), counts[0].Load(), counts[1].Load(), 100*got)
	if counts[0].Load()+counts[1].Load() != n {
		t.Fatalf("%d answers of %d", counts[0].Load()+counts[1].Load(), n)
	}
	if got < 0.08 || got > 0.12 {
		t.Fatalf("v2 got %.2f%% of the requests; want 10%% ± 2%%", 100*got)
	}
}

// httpMetric sums the samples of family name at the labels given.
func httpMetric(t *testing.T, a *agent.Agent, name string, labels ...string) float64 {
	t.Helper()
	mf, err := harness.Scrape(a.MetricsAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	fam := mf[name]
	if fam == nil {
		return 0
	}
	sum := 0.0
next:
	for _, m := range fam.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return sum
}

// TestHTTPRetries: one of two providers answers every 4th request it
// gets with 503; with retries on 503 every request succeeds, and the
// consumer counts the retries. Then both fail every request: retries
// stop at the budget (20% of the requests, no minimum here), so the
// service sees at most 1.2 times the load.
func TestHTTPRetries(t *testing.T) {
	flaky, good := startHTTPBackend(t, "flaky"), startHTTPBackend(t, "good")
	flaky.failEvery.Store(4)
	w := newWebMesh(t, `
services:
  web:
    protocol: http
    http:
      timeout: 5s
      retries:
        attempts: 2
        on: [connect-failure, reset, 503]
        budgetPercent: 20
        minRetriesPerSecond: 0
`, agent.Export{Target: flaky.addr()}, agent.Export{Target: good.addr()})
	cons, base, c := w.cons, w.base, w.c
	waitHTTP(t, cons, base, "web")
	const n = 400
	for i := range n {
		code, body, _, err := get(c, fmt.Sprintf("%s/r/%d", base, i))
		if err != nil || code != 200 {
			t.Fatalf("request %d: %d %q %v; want every 503 retried into a success", i, code, body, err)
		}
	}
	retries := httpMetric(t, cons, "meshlink_http_retries_total", "service", "web")
	failed := flaky.hits.Load() / 4
	t.Logf("%d requests: the flaky provider failed %d of its %d, the consumer retried %v", n, failed, flaky.hits.Load(), retries)
	if retries < 1 || retries > float64(failed)+1 {
		t.Fatalf("%v retries for %d injected 503s", retries, failed)
	}

	// Both fail: the budget caps the retries.
	flaky.failEvery.Store(0)
	flaky.fail.Store(503)
	good.fail.Store(503)
	before := retries
	hitsBefore := flaky.hits.Load() + good.hits.Load()
	const m2 = 300
	failures := 0
	for i := range m2 {
		code, _, _, err := get(c, fmt.Sprintf("%s/f/%d", base, i))
		if err != nil {
			t.Fatal(err)
		}
		if code == 503 {
			failures++
		}
	}
	spent := httpMetric(t, cons, "meshlink_http_retries_total", "service", "web") - before
	load := flaky.hits.Load() + good.hits.Load() - hitsBefore
	t.Logf("%d requests to failing providers: %d answered 503, %v retries, %d requests reached the servers", m2, failures, spent, load)
	// The window holds the earlier requests too: at most 20% of all.
	if limit := 0.2 * float64(n+m2+1); spent > limit || spent < 1 {
		t.Fatalf("%v retries; want some, at most %v (the budget)", spent, limit)
	}
	if float64(load) > 1.2*float64(n+m2+1)-float64(n) {
		t.Fatalf("the servers saw %d requests for %d; the budget lets retries add at most 20%%", load, m2)
	}
	if failures < m2*3/4 {
		t.Fatalf("only %d of %d requests failed with every provider failing", failures, m2)
	}
}

// TestHTTPOutlierEjection: a provider that answers 500 three times in a
// row is ejected for a second: the next requests all go to the other;
// once it works again it gets requests after its ejection time.
func TestHTTPOutlierEjection(t *testing.T) {
	bad, good := startHTTPBackend(t, "bad"), startHTTPBackend(t, "good")
	bad.fail.Store(500)
	w := newWebMesh(t, `
services:
  web:
    protocol: http
    http:
      outlierDetection:
        consecutive5xx: 3
        baseEjectionTime: 1s
        maxEjectionPercent: 50
`, agent.Export{Target: bad.addr()}, agent.Export{Target: good.addr()})
	cons, base, c := w.cons, w.base, w.c
	tstest.WaitForNil(t, 10*time.Second, "the failing provider ejected", func() error {
		get(c, base+"/")
		if n := httpMetric(t, cons, "meshlink_http_ejections_total", "service", "web", "provider", "site-b"); n < 1 {
			return fmt.Errorf("%v ejections", n)
		}
		return nil
	})
	ejected := time.Now()
	for i := range 20 {
		code, body, h, err := get(c, base+"/")
		if err != nil || code != 200 || h.Get("X-Backend") != "good" {
			if time.Since(ejected) > 900*time.Millisecond {
				break // the ejection may be over already on a loaded machine
			}
			t.Fatalf("request %d after the ejection: %d %q %v", i, code, body, err)
		}
	}
	bad.fail.Store(0)
	tstest.WaitForNil(t, 10*time.Second, "the provider back after its ejection", func() error {
		if b := backendOf(t, c, base+"/"); b != "bad" {
			return fmt.Errorf("answered by %s", b)
		}
		return nil
	})
	t.Logf("back %v after the ejection", time.Since(ejected).Round(time.Millisecond))
	if d := time.Since(ejected); d < 900*time.Millisecond {
		t.Fatalf("back after %v, before its ejection time", d)
	}
}

// TestHTTPTimeoutAndConnect: a request that takes longer than the
// service's timeout gets a 504 soon after it; CONNECT passes through as a
// stream to the target.
func TestHTTPTimeoutAndConnect(t *testing.T) {
	web := startHTTPBackend(t, "site-b")
	w := newWebMesh(t, `
services:
  web:
    protocol: http
    http:
      timeout: 300ms
`, agent.Export{Target: web.addr()})
	svc, base, c := w.svc, w.base, w.c
	waitHTTP(t, w.cons, base, "web")
	start := time.Now()
	code, body, _, err := get(c, base+"/slow")
	took := time.Since(start)
	if err != nil || code != http.StatusGatewayTimeout || took > 3*time.Second {
		t.Fatalf("slow request: %d %q %v after %v; want a 504 after about 300ms", code, body, err, took)
	}
	t.Logf("504 after %v", took.Round(time.Millisecond))

	conn, err := net.Dial("tcp", svc.Local.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "CONNECT inner.example:443 HTTP/1.1\r\nHost: inner.example:443\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	for i := range 10 {
		msg := fmt.Sprintf("tunnelled %d\n", i)
		io.WriteString(conn, msg)
		line, err := br.ReadString('\n')
		if err != nil || line != msg {
			t.Fatalf("through the tunnel: %q %v; want %q", line, err, msg)
		}
	}
}
