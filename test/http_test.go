package test

import (
	"bytes"
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
	// fail, when set, answers every request with this status.
	fail atomic.Int64
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
			b.hits.Add(1)
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

// httpRequests sums meshlink_http_requests_total of a at the labels
// given (name, value pairs).
func httpRequests(t *testing.T, a *agent.Agent, labels ...string) float64 {
	t.Helper()
	mf, err := harness.Scrape(a.MetricsAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	fam := mf["meshlink_http_requests_total"]
	if fam == nil {
		return 0
	}
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
		sum += m.GetCounter().GetValue()
	}
	return sum
}

// TestHTTPServiceRequests: a service exported with protocol=http carries
// HTTP/1.1 requests one by one through the mesh: each arrives at the real
// server with its method, path, Host and body, responses come back
// intact, and the provider forwards them over a few pooled keep-alive
// connections, not one per request.
func TestHTTPServiceRequests(t *testing.T) {
	m := harness.NewMesh(t)
	web := startHTTPBackend(t, "site-b")
	cons := meteredAgent(t, m, "site-a", harness.AgentOptions{})
	prov := meteredAgent(t, m, "site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr(), Protocol: "http"}}})
	svc := waitProviders(t, cons, "web", 1)
	base := "http://" + svc.Local.String()
	c := keepAliveClient()

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
	m := harness.NewMesh(t)
	web := startHTTPBackend(t, "site-b")
	cons := m.AddAgent("site-a", harness.AgentOptions{})
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr(), Protocol: "http"}}})
	svc := waitProviders(t, cons, "web", 1)
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
