package httpobs

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// retrying is a consumer's inner transport as the data path has it: it
// tries the providers in order, marking each attempt, until one answers
// below 500.
type retrying struct {
	providers []Peer
	urls      []string
}

func (t *retrying) RoundTrip(r *http.Request) (*http.Response, error) {
	var last *http.Response
	for i, p := range t.providers {
		out, done := StartAttempt(r, p)
		out = out.Clone(out.Context())
		out.URL.Host = strings.TrimPrefix(t.urls[i], "http://")
		out.Host = ""
		out.RequestURI = ""
		resp, err := http.DefaultTransport.RoundTrip(out)
		if err != nil {
			done(0, err)
			return nil, err
		}
		done(resp.StatusCode, nil)
		if resp.StatusCode < 500 || i == len(t.providers)-1 {
			return resp, nil
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		last = resp
	}
	return last, nil
}

// readLines parses the access log's JSON lines, waiting (with a deadline)
// until there are n.
func readLines(t *testing.T, buf *tstest.Buffer, n int) []Entry {
	t.Helper()
	var out []Entry
	// Poll's error is left out: a short log fails just below, and a long
	// one at once, each saying what the log holds.
	tstest.Poll(5*time.Second, func() error {
		out = nil
		sc := bufio.NewScanner(strings.NewReader(buf.String()))
		for sc.Scan() {
			var e Entry
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				t.Fatalf("access log line %q is not JSON: %v", sc.Text(), err)
			}
			out = append(out, e)
		}
		if len(out) < n {
			return fmt.Errorf("%d lines", len(out))
		}
		return nil
	})
	if len(out) != n {
		t.Fatalf("access log has %d lines, want %d:\n%s", len(out), n, buf.String())
	}
	return out
}

func attrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	m := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value
	}
	return m
}

// TestRequestAcrossBothEnds sends an app's request with its own
// traceparent through a consumer Transport (whose first provider answers
// 503, the second 200) and a provider Middleware, and checks the spans,
// their parents, the headers the target saw, the access logs and the
// counts.
func TestRequestAcrossBothEnds(t *testing.T) {
	consRec, provRec := tracetest.NewSpanRecorder(), tracetest.NewSpanRecorder()
	consTP := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(consRec))
	provTP := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(provRec))
	var consLog, provLog tstest.Buffer
	cl, pl := NewAccessLog(&consLog, 16, nil), NewAccessLog(&provLog, 16, nil)
	defer cl.Close()
	defer pl.Close()
	cons := New(Config{Node: "site-a", Tracer: consTP, Log: cl, Stats: NewStats()})
	prov := New(Config{Node: "site-c", Tracer: provTP, Log: pl, Stats: NewStats()})

	var targetSaw http.Header
	target := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		targetSaw = r.Header.Clone()
		io.WriteString(w, "hello")
	})
	good := httptest.NewServer(prov.Middleware(wire.RoleProvider, func(*http.Request) (string, Peer) {
		return "web", Peer{Node: 1, Name: "site-a", Addr: "100.96.0.1:4000"}
	})(target))
	defer good.Close()
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "busy", http.StatusServiceUnavailable) }))
	defer bad.Close()

	client := &http.Client{Transport: cons.Transport("web", &retrying{
		providers: []Peer{{Node: 2, Name: "site-b", Addr: "100.96.0.2"}, {Node: 3, Name: "site-c", Addr: "100.96.0.3"}},
		urls:      []string{bad.URL, good.URL},
	})}
	const appTrace, appSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	req, _ := http.NewRequest("GET", "http://web.mesh.internal:8000/api/x?q=secret", nil)
	req.Header.Set("traceparent", "00-"+appTrace+"-"+appSpan+"-01")
	req.Header.Set("tracestate", "vendor=1")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "hello" || resp.StatusCode != 200 {
		t.Fatalf("got %d %q", resp.StatusCode, b)
	}

	cs := consRec.Ended()
	if len(cs) != 3 {
		t.Fatalf("consumer ended %d spans, want 3 (request and two attempts)", len(cs))
	}
	var top sdktrace.ReadOnlySpan
	var tries []sdktrace.ReadOnlySpan
	for _, s := range cs {
		if s.Parent().SpanID().String() == appSpan {
			top = s
		} else {
			tries = append(tries, s)
		}
	}
	if top == nil || top.SpanKind() != trace.SpanKindClient || top.SpanContext().TraceID().String() != appTrace {
		t.Fatalf("no client span continuing the app's trace: %v", cs)
	}
	if top.SpanContext().TraceState().String() != "vendor=1" {
		t.Errorf("tracestate %q, want vendor=1", top.SpanContext().TraceState())
	}
	a := attrs(top)
	for k, want := range map[attribute.Key]string{"http.request.method": "GET", "url.path": "/api/x", "server.address": "web.mesh.internal", "meshlink.service": "web", "meshlink.provider": "site-c"} {
		if got := a[k].AsString(); got != want {
			t.Errorf("client span %s = %q, want %q", k, got, want)
		}
	}
	if a["http.response.status_code"].AsInt64() != 200 || a["http.request.resend_count"].AsInt64() != 1 {
		t.Errorf("client span status %v resend %v", a["http.response.status_code"], a["http.request.resend_count"])
	}
	if len(tries) != 2 {
		t.Fatalf("%d attempt spans", len(tries))
	}
	var second sdktrace.ReadOnlySpan
	for _, s := range tries {
		if s.Parent().SpanID() != top.SpanContext().SpanID() {
			t.Errorf("attempt span %s is not a child of the request's", s.SpanContext().SpanID())
		}
		at := attrs(s)
		switch at["meshlink.attempt"].AsInt64() {
		case 1:
			if at["http.response.status_code"].AsInt64() != 503 || at["meshlink.provider"].AsString() != "site-b" || at["network.peer.address"].AsString() != "100.96.0.2" {
				t.Errorf("first attempt: %v", at)
			}
		case 2:
			second = s
			if at["http.request.resend_count"].AsInt64() != 1 || at["meshlink.provider"].AsString() != "site-c" {
				t.Errorf("second attempt: %v", at)
			}
		}
	}
	if second == nil {
		t.Fatal("no second attempt span")
	}

	ps := provRec.Ended()
	if len(ps) != 1 {
		t.Fatalf("provider ended %d spans", len(ps))
	}
	srv := ps[0]
	if srv.SpanKind() != trace.SpanKindServer || srv.Parent().SpanID() != second.SpanContext().SpanID() || srv.SpanContext().TraceID().String() != appTrace {
		t.Errorf("server span kind %v parent %s trace %s: want a server span, child of the second attempt %s", srv.SpanKind(), srv.Parent().SpanID(), srv.SpanContext().TraceID(), second.SpanContext().SpanID())
	}
	sa := attrs(srv)
	if sa["meshlink.consumer"].AsString() != "site-a" || sa["network.peer.address"].AsString() != "100.96.0.1" || sa["http.response.status_code"].AsInt64() != 200 {
		t.Errorf("server span attributes %v", sa)
	}
	if want := fmt.Sprintf("00-%s-%s-01", appTrace, srv.SpanContext().SpanID()); targetSaw.Get("traceparent") != want {
		t.Errorf("target saw traceparent %q, want %q", targetSaw.Get("traceparent"), want)
	}

	ce := readLines(t, &consLog, 1)[0]
	pe := readLines(t, &provLog, 1)[0]
	if ce.TraceID != appTrace || ce.SpanID != top.SpanContext().SpanID().String() || ce.Retries != 1 || ce.Code != 200 || ce.Provider != "site-c" || ce.Source != "site-a" || ce.Path != "/api/x" || ce.Bytes != 5 || ce.Role != "consumer" {
		t.Errorf("consumer access log %+v", ce)
	}
	if pe.TraceID != appTrace || pe.SpanID != srv.SpanContext().SpanID().String() || pe.Source != "site-a" || pe.Provider != "site-c" || pe.Code != 200 || pe.Bytes != 5 || pe.Role != "provider" {
		t.Errorf("provider access log %+v", pe)
	}
	if strings.Contains(consLog.String(), "secret") {
		t.Error("the access log carries the query string")
	}

	if r := cons.Stats().Report(); len(r) != 1 || r[0].Peer != 3 || r[0].Requests != 1 || r[0].Errors != 0 || r[0].Role != wire.RoleConsumer {
		t.Errorf("consumer stats %+v", r)
	}
	if r := prov.Stats().Report(); len(r) != 1 || r[0].Peer != 1 || r[0].Requests != 1 || r[0].Role != wire.RoleProvider {
		t.Errorf("provider stats %+v", r)
	}
}

// TestNewTraceWhenAbsent: a request without a traceparent starts a trace,
// and the provider continues it.
func TestNewTraceWhenAbsent(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	o := New(Config{Tracer: tp})
	var saw string
	srv := httptest.NewServer(o.Middleware(wire.RoleProvider, func(*http.Request) (string, Peer) { return "web", Peer{} })(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { saw = r.Header.Get("traceparent") })))
	defer srv.Close()
	resp, err := (&http.Client{Transport: o.Transport("web", http.DefaultTransport)}).Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	sp := rec.Ended()
	if len(sp) != 2 {
		t.Fatalf("%d spans", len(sp))
	}
	var client, server sdktrace.ReadOnlySpan
	for _, s := range sp {
		if s.SpanKind() == trace.SpanKindClient {
			client = s
		} else {
			server = s
		}
	}
	if client == nil || server == nil || client.Parent().IsValid() || server.Parent().SpanID() != client.SpanContext().SpanID() {
		t.Fatalf("want a root client span and its server child: %v", sp)
	}
	if !strings.Contains(saw, server.SpanContext().TraceID().String()) {
		t.Errorf("target saw traceparent %q", saw)
	}
}

// TestTracingOff: without a tracer the headers pass untouched and the log
// and counts still work; a 502 counts as an error.
func TestTracingOff(t *testing.T) {
	var buf tstest.Buffer
	l := NewAccessLog(&buf, 16, nil)
	defer l.Close()
	o := New(Config{Node: "a", Log: l, Stats: NewStats()})
	var saw http.Header
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		saw = r.Header.Clone()
		w.WriteHeader(http.StatusBadGateway)
	}))
	defer srv.Close()
	resp, err := (&http.Client{Transport: o.Transport("web", http.DefaultTransport)}).Get(srv.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if saw.Get("traceparent") != "" {
		t.Errorf("tracing off added traceparent %q", saw.Get("traceparent"))
	}
	e := readLines(t, &buf, 1)[0]
	if e.Code != 502 || e.TraceID != "" || e.Path != "/x" {
		t.Errorf("entry %+v", e)
	}
	if r := o.Stats().Report(); len(r) != 1 || r[0].Errors != 1 || r[0].Requests != 1 {
		t.Errorf("stats %+v", r)
	}
}

// TestTransportError: a request that gets no answer is logged with code 0
// and its error, and counted as failed.
func TestTransportError(t *testing.T) {
	var buf tstest.Buffer
	l := NewAccessLog(&buf, 16, nil)
	defer l.Close()
	rec := tracetest.NewSpanRecorder()
	o := New(Config{Log: l, Stats: NewStats(), Tracer: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = (&http.Client{Transport: o.Transport("web", http.DefaultTransport)}).Get("http://" + addr + "/")
	if err == nil {
		t.Fatal("a closed port answered")
	}
	e := readLines(t, &buf, 1)[0]
	if e.Code != 0 || e.Error == "" || e.TraceID == "" {
		t.Errorf("entry %+v", e)
	}
	if sp := rec.Ended(); len(sp) != 1 || sp[0].Status().Code.String() != "Error" {
		t.Errorf("spans %v", sp)
	}
}

// blockedWriter blocks every write until released.
type blockedWriter struct{ release chan struct{} }

func (w *blockedWriter) Write(p []byte) (int, error) { <-w.release; return len(p), nil }

// TestAccessLogNeverBlocks: with the writer stuck, Log returns at once and
// counts what it drops.
func TestAccessLogNeverBlocks(t *testing.T) {
	w := &blockedWriter{release: make(chan struct{})}
	l := NewAccessLog(w, 8, nil)
	start := time.Now()
	for range 10000 {
		l.Log(Entry{Service: "web", Path: strings.Repeat("x", 100)})
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("10000 Log calls with a stuck writer took %v", d)
	}
	if d := l.Dropped(); d < 10000-8-1-(64<<10)/100 {
		t.Errorf("dropped %d of 10000 with a buffer of 8", d)
	}
	close(w.release)
	l.Close()
	l.Close()
	l.Log(Entry{}) // after Close: dropped, no panic
}

// TestStatsBounded: edges past wire.MaxHTTPStats are not kept, and every
// reported entry passes the coordinator's check.
func TestStatsBounded(t *testing.T) {
	s := NewStats()
	for i := range wire.MaxHTTPStats + 10 {
		s.Observe("web", wire.RoleConsumer, wire.NodeID(i+1), time.Duration(i)*time.Millisecond, i%3 == 0)
	}
	s.Observe("web", wire.RoleConsumer, 1, 20*time.Second, false)
	r := s.Report()
	if len(r) != wire.MaxHTTPStats || s.Overflow() != 10 {
		t.Fatalf("%d edges, overflow %d", len(r), s.Overflow())
	}
	for _, h := range r {
		if err := h.Check(); err != nil {
			t.Fatal(err)
		}
	}
	if r[0].Peer != 1 || r[0].Requests != 2 || r[0].Buckets[wire.HTTPBuckets-1] != 1 || r[0].Buckets[0] != 1 {
		t.Errorf("first edge %+v", r[0])
	}
}

// TestDeadCollector: spans for a collector that accepts connections and
// never answers cost the requests nothing: a full queue drops spans, and
// Shutdown gives up at its deadline.
func TestDeadCollector(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns sync.WaitGroup
	stop := make(chan struct{})
	conns.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Go(func() { <-stop; c.Close() })
		}
	})
	defer func() { close(stop); ln.Close(); conns.Wait() }()
	tp, err := NewTracerProvider(TraceConfig{Endpoint: ln.Addr().String(), Sample: 1, QueueSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	o := New(Config{Tracer: tp})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	c := &http.Client{Transport: o.Transport("web", http.DefaultTransport)}
	start := time.Now()
	for range 2000 {
		resp, err := c.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	t.Logf("2000 requests with a dead collector: %v", time.Since(start))
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start = time.Now()
	err = tp.Shutdown(ctx)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Shutdown took %v past its 500ms deadline", d)
	}
	if err == nil {
		t.Log("shutdown flushed (the collector took the bytes)")
	}
}

func TestExporterURL(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    TraceConfig
		want string
		err  bool
	}{
		{"host:port http", TraceConfig{Endpoint: "127.0.0.1:4318"}, "http://127.0.0.1:4318/v1/traces", false},
		{"host only http", TraceConfig{Endpoint: "collector"}, "http://collector:4318/v1/traces", false},
		{"host only grpc", TraceConfig{Endpoint: "collector", Protocol: ProtocolGRPC}, "http://collector:4317", false},
		{"url with path", TraceConfig{Endpoint: "https://otel.example/otlp/"}, "https://otel.example/otlp/v1/traces", false},
		{"grpc url", TraceConfig{Endpoint: "https://otel.example:4317", Protocol: ProtocolGRPC}, "https://otel.example:4317", false},
		{"traces endpoint as is", TraceConfig{Endpoint: "x:1", TracesEndpoint: "http://j:4318/custom"}, "http://j:4318/custom", false},
		{"bad scheme", TraceConfig{Endpoint: "ftp://x"}, "", true},
		{"bad traces endpoint", TraceConfig{TracesEndpoint: "j:4318"}, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.c.exporterURL()
			if (err != nil) != tc.err || got != tc.want {
				t.Errorf("got %q, %v; want %q (error %v)", got, err, tc.want, tc.err)
			}
		})
	}
	if _, err := NewTracerProvider(TraceConfig{Endpoint: "x:1", Protocol: "thrift"}); err == nil {
		t.Error("an unknown protocol was taken")
	}
	if _, err := NewTracerProvider(TraceConfig{Endpoint: "x:1", Sample: 2}); err == nil {
		t.Error("a sampling ratio of 2 was taken")
	}
	if tp, err := NewTracerProvider(TraceConfig{}); tp != nil || err != nil {
		t.Error("no endpoint made a tracer provider")
	}
}

func TestParseSampler(t *testing.T) {
	for _, tc := range []struct {
		name, arg string
		sample    float64
		ignore    bool
		err       bool
	}{
		{"", "", 1, false, false},
		{"always_on", "", 1, true, false},
		{"always_off", "", 0, true, false},
		{"parentbased_always_off", "", 0, false, false},
		{"traceidratio", "0.25", 0.25, true, false},
		{"parentbased_traceidratio", "0.1", 0.1, false, false},
		{"parentbased_traceidratio", "", 1, false, false},
		{"traceidratio", "1.5", 0, true, true},
		{"traceidratio", "x", 0, true, true},
		{"jaeger_remote", "", 0, false, true},
	} {
		s, ig, err := ParseSampler(tc.name, tc.arg)
		if (err != nil) != tc.err || (!tc.err && (s != tc.sample || ig != tc.ignore)) {
			t.Errorf("ParseSampler(%q, %q) = %v, %v, %v", tc.name, tc.arg, s, ig, err)
		}
		if tc.name == "jaeger_remote" && !errors.Is(err, ErrBadSampler) {
			t.Errorf("unknown sampler error %v", err)
		}
	}
}

type peerKey struct{}

// TestConsumerMiddleware drives the hooks as the HTTP data path has them
// (agent/httpmesh): the consumer's Middleware around a reverse proxy whose
// transport retries, each attempt through AttemptTransport, to a provider
// behind the provider's Middleware.
func TestConsumerMiddleware(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	var buf tstest.Buffer
	l := NewAccessLog(&buf, 16, nil)
	defer l.Close()
	o := New(Config{Node: "a", Tracer: tp, Log: l, Stats: NewStats()})
	calls := 0
	prov := httptest.NewServer(o.Middleware(wire.RoleProvider, func(*http.Request) (string, Peer) { return "web", Peer{Node: 1, Name: "a"} })(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if calls++; calls == 1 {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			io.WriteString(w, "ok")
		})))
	defer prov.Close()
	attempt := o.AttemptTransport(http.DefaultTransport, func(r *http.Request) Peer { return r.Context().Value(peerKey{}).(Peer) })
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(mustURL(t, prov.URL)) },
		Transport: roundTripperFunc(func(r *http.Request) (*http.Response, error) {
			for n := 1; ; n++ {
				out := r.Clone(context.WithValue(r.Context(), peerKey{}, Peer{Node: wire.NodeID(10 + n), Name: fmt.Sprintf("p%d", n)}))
				resp, err := attempt.RoundTrip(out)
				if err != nil || resp.StatusCode < 500 || n == 3 {
					return resp, err
				}
				resp.Body.Close()
			}
		}),
	}
	cons := httptest.NewServer(o.Middleware(wire.RoleConsumer, func(*http.Request) (string, Peer) { return "web", Peer{} })(rp))
	defer cons.Close()
	resp, err := http.Get(cons.URL + "/p")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "ok" {
		t.Fatalf("got %q", b)
	}
	var client sdktrace.ReadOnlySpan
	kids, servers := 0, 0
	sp := rec.Ended()
	for _, s := range sp {
		if s.SpanKind() == trace.SpanKindClient && !s.Parent().IsValid() {
			client = s
		}
	}
	if client == nil {
		t.Fatalf("no root client span: %v", sp)
	}
	for _, s := range sp {
		switch {
		case s.SpanKind() == trace.SpanKindClient && s.Parent().SpanID() == client.SpanContext().SpanID():
			kids++
		case s.SpanKind() == trace.SpanKindServer && s.SpanContext().TraceID() == client.SpanContext().TraceID():
			servers++
		}
	}
	if kids != 2 || servers != 2 || len(sp) != 5 {
		t.Errorf("%d spans: %d attempts under the request's, %d server spans; want 2 and 2", len(sp), kids, servers)
	}
	if a := attrs(client); a["meshlink.provider"].AsString() != "p2" || a["http.request.resend_count"].AsInt64() != 1 || a["http.response.status_code"].AsInt64() != 200 {
		t.Errorf("client span %v", a)
	}
	var ce *Entry
	for _, e := range readLines(t, &buf, 3) {
		if e.Role == "consumer" {
			ce = &e
		}
	}
	if ce == nil || ce.Provider != "p2" || ce.Retries != 1 || ce.Code != 200 || ce.Bytes != 2 || ce.TraceID != client.SpanContext().TraceID().String() {
		t.Errorf("consumer line %+v", ce)
	}
	var edges []string
	for _, h := range o.Stats().Report() {
		edges = append(edges, fmt.Sprintf("%s %d %d/%d", h.Role, h.Peer, h.Errors, h.Requests))
	}
	if want := "[consumer 12 0/1 provider 1 1/2]"; fmt.Sprint(edges) != want {
		t.Errorf("edges %v, want %s", edges, want)
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestUnknownMethod: a method outside the known set is "_OTHER" in a span
// named "HTTP", with the original kept aside.
func TestUnknownMethod(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	o := New(Config{Tracer: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))})
	h := o.Middleware(wire.RoleProvider, func(*http.Request) (string, Peer) { return "web", Peer{} })(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("FROBNICATE", "/", nil))
	sp := rec.Ended()
	if len(sp) != 1 || sp[0].Name() != "HTTP" || attrs(sp[0])["http.request.method"].AsString() != "_OTHER" || attrs(sp[0])["http.request.method_original"].AsString() != "FROBNICATE" {
		t.Fatalf("spans %v", sp)
	}
}
