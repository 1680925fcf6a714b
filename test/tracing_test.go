package test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/httpobs"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// jaegerBuild builds Jaeger (all-in-one, v2) from test/tools, its own
// module so that Jaeger's dependencies stay out of meshlink's go.mod, once
// per test process into bin/jaeger at the module root. .ci/run builds it
// beforehand; MESHLINK_JAEGER names a prebuilt binary.
var jaegerBuild struct {
	once sync.Once
	path string
	err  error
}

// jaegerBinary returns Jaeger's path, or skips the test when it cannot be
// built (fails under MESHLINK_REQUIRE_NETNS=1, as CI runs).
func jaegerBinary(t *testing.T) string {
	t.Helper()
	jaegerBuild.once.Do(func() {
		if p := os.Getenv("MESHLINK_JAEGER"); p != "" {
			jaegerBuild.path = p
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..")
		out := filepath.Join(root, "bin", "jaeger")
		// A binary newer than the tools module's go.sum is its build:
		// go build would only link it again.
		if bi, err := os.Stat(out); err == nil {
			if si, err := os.Stat(filepath.Join(root, "test", "tools", "go.sum")); err == nil && bi.ModTime().After(si.ModTime()) {
				jaegerBuild.path = out
				return
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-C", "test/tools", "-o", out, "github.com/jaegertracing/jaeger/cmd/jaeger")
		cmd.Dir = root
		start := time.Now()
		if b, err := cmd.CombinedOutput(); err != nil {
			jaegerBuild.err = fmt.Errorf("go build -C test/tools github.com/jaegertracing/jaeger/cmd/jaeger: %v\n%s", err, b)
			return
		}
		t.Logf("built Jaeger in %v", time.Since(start).Round(time.Second))
		jaegerBuild.path = out
	})
	if jaegerBuild.err != nil {
		if os.Getenv("MESHLINK_REQUIRE_NETNS") == "1" {
			t.Fatalf("Jaeger is required (MESHLINK_REQUIRE_NETNS=1): %v", jaegerBuild.err)
		}
		t.Skipf("Jaeger could not be built, so there is no OTLP receiver to test against: %v", jaegerBuild.err)
	}
	return jaegerBuild.path
}

// freePort is a loopback port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// jaeger is a running Jaeger all-in-one with in-memory storage, every port
// on loopback.
type jaeger struct {
	otlpHTTP, otlpGRPC string // host:port of the OTLP receivers
	query              string // base URL of the query API
}

const jaegerConfig = `service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:%d
    grpc:
      endpoint: 127.0.0.1:%d
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:%d
      grpc:
        endpoint: 127.0.0.1:%d
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
`

func startJaeger(t *testing.T) *jaeger {
	t.Helper()
	bin := jaegerBinary(t)
	q, qg, h, g := freePort(t), freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(t.TempDir(), "jaeger.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, jaegerConfig, q, qg, h, g), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", "file:"+cfg)
	out, err := os.Create(filepath.Join(t.TempDir(), "jaeger.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		out.Close()
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("jaeger's log:\n%s", b)
		}
	})
	j := &jaeger{otlpHTTP: fmt.Sprintf("127.0.0.1:%d", h), otlpGRPC: fmt.Sprintf("127.0.0.1:%d", g), query: fmt.Sprintf("http://127.0.0.1:%d", q)}
	tstest.WaitForNil(t, 60*time.Second, "Jaeger's query API to answer", func() error {
		if cmd.ProcessState != nil {
			return errors.New("jaeger exited")
		}
		resp, err := http.Get(j.query + "/api/services")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		// The receivers too: a span exported before they listen would be
		// retried, but a test should not lean on that.
		for _, a := range []string{j.otlpHTTP, j.otlpGRPC} {
			c, err := net.Dial("tcp", a)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	})
	return j
}

// jaegerTrace is the part of Jaeger's /api/traces/{id} answer the test reads.
type jaegerTrace struct {
	Spans []struct {
		TraceID       string `json:"traceID"`
		SpanID        string `json:"spanID"`
		OperationName string `json:"operationName"`
		References    []struct {
			RefType string `json:"refType"`
			SpanID  string `json:"spanID"`
		} `json:"references"`
		Tags []struct {
			Key   string `json:"key"`
			Value any    `json:"value"`
		} `json:"tags"`
		ProcessID string `json:"processID"`
	} `json:"spans"`
	Processes map[string]struct {
		ServiceName string `json:"serviceName"`
	} `json:"processes"`
}

func (j *jaeger) trace(id string) (*jaegerTrace, error) {
	resp, err := http.Get(j.query + "/api/traces/" + id)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	var body struct {
		Data []jaegerTrace `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, err
	}
	if len(body.Data) != 1 {
		return nil, fmt.Errorf("%d traces", len(body.Data))
	}
	return &body.Data[0], nil
}

// span is one span of a Jaeger trace, flattened.
type span struct {
	id, parent, service, kind string
	tags                      map[string]string
}

func (tr *jaegerTrace) spans() []span {
	var out []span
	for _, s := range tr.Spans {
		sp := span{id: s.SpanID, service: tr.Processes[s.ProcessID].ServiceName, tags: map[string]string{}}
		for _, r := range s.References {
			if r.RefType == "CHILD_OF" {
				sp.parent = r.SpanID
			}
		}
		for _, tg := range s.Tags {
			sp.tags[tg.Key] = fmt.Sprint(tg.Value)
		}
		sp.kind = sp.tags["span.kind"]
		out = append(out, sp)
	}
	return out
}

// readAccessLog parses an access log's JSON lines.
func readAccessLog(t *testing.T, path string) []httpobs.Entry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []httpobs.Entry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e httpobs.Entry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s: line %q is not JSON: %v", path, sc.Text(), err)
		}
		out = append(out, e)
	}
	return out
}

// TestTracesInJaeger sends requests through a consumer agent to an HTTP
// service with two providers, one of which answers 503 (retried on the
// other), every agent exporting spans to a real Jaeger (the consumer over
// OTLP/HTTP, the providers over OTLP/gRPC). Each request carries the app's
// own traceparent. For a request that was retried, Jaeger holds, under the
// app's trace id: the consumer's client span (a child of the app's span),
// its two attempts as children, and each provider's server span as a
// child of its attempt, with the HTTP attributes; the target saw the
// server span's traceparent, and both access logs name the same trace and
// spans.
func TestTracesInJaeger(t *testing.T) {
	j := startJaeger(t)
	m := harness.NewMesh(t)
	setPolicy(t, m, `
services:
  web:
    protocol: http
    http:
      timeout: 5s
      retries:
        attempts: 2
        on: [503]
        budgetPercent: 100
        minRetriesPerSecond: 100
`)
	var mu sync.Mutex
	seen := map[string]string{} // the target's traceparent by path
	target := func(fail bool) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if fail {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
			mu.Lock()
			seen[r.URL.Path] = r.Header.Get("traceparent")
			mu.Unlock()
			io.WriteString(w, "hello "+r.URL.Path)
		})}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().String()
	}
	dir := t.TempDir()
	start := func(name string, tc httpobs.TraceConfig, o harness.AgentOptions) (*agent.Agent, string) {
		cfg := m.AgentConfig(name, o)
		cfg.Tracing = tc
		cfg.AccessLog = filepath.Join(dir, name+".log")
		a, err := harness.StartAgent(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		return a, cfg.AccessLog
	}
	cons, consLog := start("site-a", httpobs.TraceConfig{Endpoint: "http://" + j.otlpHTTP, Sample: 1, ServiceName: "consumer-a"}, harness.AgentOptions{})
	start("site-b", httpobs.TraceConfig{Endpoint: j.otlpGRPC, Protocol: httpobs.ProtocolGRPC, Sample: 1, ServiceName: "provider-b"},
		harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: target(true), Protocol: "http"}}})
	_, goodLog := start("site-c", httpobs.TraceConfig{Endpoint: j.otlpGRPC, Protocol: httpobs.ProtocolGRPC, Sample: 1, ServiceName: "provider-c"},
		harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: target(false), Protocol: "http"}}})
	svc := waitProviders(t, cons, "web", 2)
	base := "http://" + svc.Local.String()
	c := keepAliveClient()

	// Requests until one went to site-b first and was retried at site-c
	// (the picker balances the two).
	const appSpan = "00f067aa0ba902b7"
	var traceID string
	for i := 0; i < 40 && traceID == ""; i++ {
		id := fmt.Sprintf("4bf92f3577b34da6a3ce929d0e0e%04x", i)
		code, body, _, err := get(c, fmt.Sprintf("%s/r/%d", base, i), "traceparent", "00-"+id+"-"+appSpan+"-01")
		if err != nil || code != 200 || body != fmt.Sprintf("hello /r/%d", i) {
			t.Fatalf("request %d: %d %q %v", i, code, body, err)
		}
		tstest.WaitFor(t, 5*time.Second, "the consumer's access-log line", func() bool { return len(readAccessLog(t, consLog)) > i })
		if e := readAccessLog(t, consLog)[i]; e.Retries == 1 {
			traceID = id
		}
	}
	if traceID == "" {
		t.Fatal("40 requests and none was retried: the picker never chose the failing provider first")
	}

	var spans []span
	tstest.WaitForNil(t, 30*time.Second, "the trace in Jaeger with all five spans", func() error {
		tr, err := j.trace(traceID)
		if err != nil {
			return err
		}
		spans = tr.spans()
		if len(spans) < 5 {
			return fmt.Errorf("%d spans", len(spans))
		}
		return nil
	})
	byID := map[string]span{}
	for _, s := range spans {
		byID[s.id] = s
		t.Logf("span %s parent %s %s %s %v", s.id, s.parent, s.service, s.kind, s.tags)
	}
	var client span
	for _, s := range spans {
		if s.parent == appSpan {
			client = s
		}
	}
	if client.id == "" || client.service != "consumer-a" || client.kind != "client" {
		t.Fatalf("no client span of consumer-a continuing the app's span %s", appSpan)
	}
	for k, want := range map[string]string{"http.request.method": "GET", "meshlink.service": "web", "meshlink.provider": "site-c",
		"http.response.status_code": "200", "http.request.resend_count": "1"} {
		if got := client.tags[k]; got != want {
			t.Errorf("client span %s = %q, want %q", k, got, want)
		}
	}
	if !strings.HasPrefix(client.tags["url.path"], "/r/") {
		t.Errorf("client span url.path %q", client.tags["url.path"])
	}
	attempts := map[string]span{} // by provider
	for _, s := range spans {
		if s.parent == client.id {
			attempts[s.tags["meshlink.provider"]] = s
		}
	}
	if len(attempts) != 2 || attempts["site-b"].tags["http.response.status_code"] != "503" || attempts["site-c"].tags["meshlink.attempt"] != "2" {
		t.Fatalf("attempt spans under the client span: %v", attempts)
	}
	var goodServer span
	for prov, svcName := range map[string]string{"site-b": "provider-b", "site-c": "provider-c"} {
		var srv span
		for _, s := range spans {
			if s.kind == "server" && s.parent == attempts[prov].id {
				srv = s
			}
		}
		if srv.id == "" || srv.service != svcName || srv.tags["meshlink.consumer"] != "site-a" || srv.tags["meshlink.provider"] != prov {
			t.Errorf("no server span of %s under its attempt %s: %+v", svcName, attempts[prov].id, srv)
		}
		if prov == "site-c" {
			goodServer = srv
		}
	}
	path := client.tags["url.path"]
	mu.Lock()
	tp := seen[path]
	mu.Unlock()
	if want := "00-" + traceID + "-" + goodServer.id + "-01"; tp != want {
		t.Errorf("the target saw traceparent %q, want %q (the provider's server span)", tp, want)
	}

	// The access logs name the same trace and spans.
	var ce, pe *httpobs.Entry
	for _, e := range readAccessLog(t, consLog) {
		if e.TraceID == traceID {
			ce = &e
		}
	}
	tstest.WaitFor(t, 5*time.Second, "site-c's access-log line", func() bool {
		for _, e := range readAccessLog(t, goodLog) {
			if e.TraceID == traceID {
				pe = &e
			}
		}
		return pe != nil
	})
	if ce == nil || ce.SpanID != client.id || ce.Provider != "site-c" || ce.Source != "site-a" || ce.Code != 200 || ce.Retries != 1 || ce.Service != "web" {
		t.Errorf("consumer's access-log line %+v", ce)
	}
	if pe.SpanID != goodServer.id || pe.Source != "site-a" || pe.Provider != "site-c" || pe.Code != 200 || pe.Path != path {
		t.Errorf("provider's access-log line %+v", pe)
	}
}

// TestHTTPAccessLogWithoutTracing: with tracing off both agents still
// write an access-log line per request (JSON, with the consumer and
// provider named, no trace id of their own), and the app's traceparent
// reaches the target untouched: nothing is added or changed.
func TestHTTPAccessLogWithoutTracing(t *testing.T) {
	m := harness.NewMesh(t)
	var mu sync.Mutex
	var seen []string
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("traceparent"))
		mu.Unlock()
		io.WriteString(w, "hi")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	dir := t.TempDir()
	start := func(name string, o harness.AgentOptions) (*agent.Agent, string) {
		cfg := m.AgentConfig(name, o)
		cfg.AccessLog = filepath.Join(dir, name+".log")
		a, err := harness.StartAgent(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		return a, cfg.AccessLog
	}
	cons, consLog := start("site-a", harness.AgentOptions{})
	_, provLog := start("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: ln.Addr().String(), Protocol: "http"}}})
	base := "http://" + waitProviders(t, cons, "web", 1).Local.String()
	c := keepAliveClient()
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	for i := range 5 {
		if code, body, _, err := get(c, fmt.Sprintf("%s/n/%d", base, i), "traceparent", tp); err != nil || code != 200 || body != "hi" {
			t.Fatalf("request %d: %d %q %v", i, code, body, err)
		}
	}
	mu.Lock()
	for _, s := range seen {
		if s != tp {
			t.Errorf("the target saw traceparent %q, want the app's %q", s, tp)
		}
	}
	mu.Unlock()
	for _, l := range []struct{ path, role string }{{consLog, "consumer"}, {provLog, "provider"}} {
		var lines []httpobs.Entry
		tstest.WaitFor(t, 5*time.Second, l.role+"'s five access-log lines", func() bool { lines = readAccessLog(t, l.path); return len(lines) >= 5 })
		for i, e := range lines {
			if e.Role != l.role || e.Service != "web" || e.Source != "site-a" || e.Provider != "site-b" || e.Code != 200 || e.Bytes != 2 ||
				e.Method != "GET" || e.Path != fmt.Sprintf("/n/%d", i) || e.TraceID != "" || e.Time.IsZero() {
				t.Errorf("%s line %d: %+v", l.role, i, e)
			}
		}
	}
}
