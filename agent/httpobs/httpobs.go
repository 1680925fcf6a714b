// Package httpobs observes the HTTP requests an agent carries for a
// service marked HTTP: an OpenTelemetry span for each (kind client at the
// consumer, kind server at the provider, each attempt of a retried request a
// child of the consumer's), W3C trace context carried to the next hop, a
// JSON access-log line, and per-edge counts with a latency histogram for the
// coordinator's console.
//
// The data path hooks it in at two places: the consumer wraps the
// RoundTripper that carries a request to the chosen provider (Transport)
// and marks each attempt (StartAttempt); the provider wraps the handler
// that forwards to the target (Middleware). Every part is optional: with no
// tracer, no access log and no stats an Observer passes requests through.
package httpobs

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/meshlink/meshlink/wire"
)

// attributeKV keeps the imports of tracing.go short.
type attributeKV = attribute.KeyValue

// meshlink's own span attributes, beside the semantic conventions' ones.
const (
	attrService  = attribute.Key("meshlink.service")
	attrProvider = attribute.Key("meshlink.provider")
	attrConsumer = attribute.Key("meshlink.consumer")
	attrNode     = attribute.Key("meshlink.node")
	attrAttempt  = attribute.Key("meshlink.attempt")
)

// instrumentation is the tracer's name, as spans report it.
const instrumentation = "github.com/meshlink/meshlink/agent/httpobs"

// Peer is the node at the other end of a request: the provider chosen at a
// consumer, the consumer a request came from at a provider.
type Peer struct {
	Node wire.NodeID
	Name string
	// Addr is the peer's mesh address, host or host:port
	// (network.peer.address); may be empty.
	Addr string
}

// Config assembles an Observer; every field may be nil.
type Config struct {
	// Node is this node's name: the access log's provider at a provider
	// and source at a consumer.
	Node string
	// Tracer makes the spans; nil makes none and leaves the trace context
	// headers as they came.
	Tracer trace.TracerProvider
	// Log receives one line per request.
	Log *AccessLog
	// Stats counts the requests per edge for the console.
	Stats *Stats
}

// Observer observes the requests of every HTTP service of one agent. Its
// methods may be called concurrently.
type Observer struct {
	node   string
	tracer trace.Tracer // nil: no spans
	prop   propagation.TextMapPropagator
	log    *AccessLog
	stats  *Stats
}

// New returns an Observer for cfg.
func New(cfg Config) *Observer {
	o := &Observer{node: cfg.Node, log: cfg.Log, stats: cfg.Stats, prop: propagation.TraceContext{}}
	if cfg.Tracer != nil {
		o.tracer = cfg.Tracer.Tracer(instrumentation, trace.WithSchemaURL(semconv.SchemaURL))
	}
	return o
}

// Stats returns the Observer's counters, nil when it keeps none.
func (o *Observer) Stats() *Stats { return o.stats }

// request is one observed request, from its start to the end of its
// response body.
type request struct {
	o       *Observer
	role    wire.ServiceRole
	service string
	start   time.Time
	method  string
	path    string
	span    trace.Span // nil when not tracing

	mu       sync.Mutex // guards the fields below
	peer     Peer       // the provider (consumer) or the source (provider)
	attempts int
	done     bool

	bytes atomic.Int64 // response body bytes
}

type requestKey struct{}

// spanStart starts a span of kind for r, a child of ctx's span.
func (o *Observer) spanStart(ctx context.Context, kind trace.SpanKind, r *http.Request, service string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	// A method outside the known set is "_OTHER", its span "HTTP" (the
	// semantic conventions' rule), so that a client cannot make span names
	// without end.
	name, method := r.Method, r.Method
	if !knownMethods[method] {
		name, method = "HTTP", "_OTHER"
		attrs = append(attrs, semconv.HTTPRequestMethodOriginal(r.Method))
	}
	attrs = append(attrs,
		semconv.HTTPRequestMethodKey.String(method),
		semconv.URLPath(r.URL.Path),
		semconv.ServerAddress(hostOnly(r.Host)),
		attrService.String(service),
	)
	if r.ContentLength > 0 {
		attrs = append(attrs, semconv.HTTPRequestBodySize(int(r.ContentLength)))
	}
	if ua := r.UserAgent(); ua != "" {
		attrs = append(attrs, semconv.UserAgentOriginal(ua))
	}
	// The span name is the method alone: meshlink knows no route template
	// (the semantic conventions' {method} {http.route}).
	return o.tracer.Start(ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
}

var knownMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true, http.MethodPatch: true,
	http.MethodDelete: true, http.MethodConnect: true, http.MethodOptions: true, http.MethodTrace: true,
}

// finish ends req once: its span, its log line and its count.
func (q *request) finish(code int, err error) {
	q.mu.Lock()
	if q.done {
		q.mu.Unlock()
		return
	}
	q.done = true
	peer, attempts := q.peer, q.attempts
	q.mu.Unlock()
	d := time.Since(q.start)
	failed := err != nil || code >= 500 || code == 0
	if q.o.stats != nil {
		q.o.stats.Observe(q.service, q.role, peer.Node, d, failed)
	}
	var traceID, spanID string
	if q.span != nil {
		sc := q.span.SpanContext()
		traceID, spanID = sc.TraceID().String(), sc.SpanID().String()
		if code != 0 {
			q.span.SetAttributes(semconv.HTTPResponseStatusCode(code))
		}
		if n := q.bytes.Load(); n > 0 {
			q.span.SetAttributes(semconv.HTTPResponseBodySize(int(n)))
		}
		switch {
		case err != nil:
			q.span.SetAttributes(semconv.ErrorTypeKey.String(errorType(err)))
			q.span.SetStatus(codes.Error, err.Error())
		case code >= 500 || (q.role == wire.RoleConsumer && code >= 400):
			// Client spans count 4xx as errors, server spans 5xx only.
			q.span.SetAttributes(semconv.ErrorTypeKey.String(strconv.Itoa(code)))
			q.span.SetStatus(codes.Error, "")
		}
		if q.role == wire.RoleConsumer {
			if peer.Name != "" {
				q.span.SetAttributes(attrProvider.String(peer.Name))
			}
			if attempts > 1 {
				q.span.SetAttributes(semconv.HTTPRequestResendCount(attempts - 1))
			}
		}
		q.span.End()
	}
	if q.o.log != nil {
		e := Entry{Time: q.start.UTC(), Role: string(q.role), Service: q.service, Method: q.method, Path: q.path, Code: code,
			DurationMS: float64(d.Microseconds()) / 1000, Bytes: q.bytes.Load(), Retries: max(attempts-1, 0), TraceID: traceID, SpanID: spanID}
		if q.role == wire.RoleConsumer {
			e.Source, e.Provider = q.o.node, peer.Name
		} else {
			e.Source, e.Provider = peer.Name, q.o.node
		}
		if err != nil {
			e.Error = err.Error()
		}
		q.o.log.Log(e)
	}
}

// errorType names an error for error.type: a timeout, a refusal, or the
// catch-all of the conventions.
func errorType(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	return "_OTHER"
}

// hostOnly strips the port of a Host header.
func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return host
	}
	return h
}

// Transport wraps next, the consumer's RoundTripper for service, so that
// each request is observed from the app's request to the end of the
// response body. The app's traceparent is continued (a new trace starts
// without one) and the request leaves with this span's context, or an
// attempt's (StartAttempt).
func (o *Observer) Transport(service string, next http.RoundTripper) http.RoundTripper {
	return &transport{o: o, service: service, next: next}
}

type transport struct {
	o       *Observer
	service string
	next    http.RoundTripper
}

func (t *transport) RoundTrip(r *http.Request) (*http.Response, error) {
	o := t.o
	q := &request{o: o, role: wire.RoleConsumer, service: t.service, start: time.Now(), method: r.Method, path: r.URL.Path}
	ctx := context.WithValue(r.Context(), requestKey{}, q)
	if o.tracer != nil {
		ctx = o.prop.Extract(ctx, propagation.HeaderCarrier(r.Header))
		ctx, q.span = o.spanStart(ctx, trace.SpanKindClient, r, t.service)
	}
	out := r.WithContext(ctx)
	if o.tracer != nil {
		out.Header = r.Header.Clone()
		o.prop.Inject(ctx, propagation.HeaderCarrier(out.Header))
	}
	resp, err := t.next.RoundTrip(out)
	if err != nil {
		q.finish(0, err)
		return nil, err
	}
	watchBody(resp, q)
	return resp, nil
}

// watchBody counts resp's body and finishes q at its end or close.
func watchBody(resp *http.Response, q *request) {
	if resp.Body == nil || resp.Body == http.NoBody {
		q.finish(resp.StatusCode, nil)
		return
	}
	b := &body{rc: resp.Body, q: q, code: resp.StatusCode}
	if w, ok := resp.Body.(io.ReadWriteCloser); ok {
		// A 101 Switching Protocols body is the upgraded stream: keep
		// it writable for the caller.
		resp.Body = &rwBody{body: b, w: w}
		return
	}
	resp.Body = b
}

type body struct {
	rc   io.ReadCloser
	q    *request
	code int
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.q.bytes.Add(int64(n))
	if err == io.EOF {
		b.q.finish(b.code, nil)
	} else if err != nil {
		b.q.finish(b.code, err)
	}
	return n, err
}

func (b *body) Close() error {
	err := b.rc.Close()
	b.q.finish(b.code, nil)
	return err
}

type rwBody struct {
	*body
	w io.Writer
}

func (b *rwBody) Write(p []byte) (int, error) { return b.w.Write(p) }

// StartAttempt marks one attempt of a consumer's request (the first, or a
// retry) at provider p, and returns the request to send: it carries the
// attempt's trace context. Call done with the attempt's status code (0
// when it got no answer) and error. Outside a Transport it changes nothing.
func StartAttempt(r *http.Request, p Peer) (out *http.Request, done func(code int, err error)) {
	q, _ := r.Context().Value(requestKey{}).(*request)
	if q == nil {
		return r, func(int, error) {}
	}
	q.mu.Lock()
	q.attempts++
	n := q.attempts
	q.peer = p
	q.mu.Unlock()
	if q.span == nil {
		return r, func(int, error) {}
	}
	attrs := []attribute.KeyValue{attrAttempt.Int(n), attrProvider.String(p.Name)}
	if n > 1 {
		attrs = append(attrs, semconv.HTTPRequestResendCount(n-1))
	}
	if p.Addr != "" {
		attrs = append(attrs, semconv.NetworkPeerAddress(hostOnly(p.Addr)))
	}
	ctx, span := q.o.spanStart(r.Context(), trace.SpanKindClient, r, q.service, attrs...)
	out = r.WithContext(ctx)
	out.Header = r.Header.Clone()
	q.o.prop.Inject(ctx, propagation.HeaderCarrier(out.Header))
	return out, func(code int, err error) {
		if code != 0 {
			span.SetAttributes(semconv.HTTPResponseStatusCode(code))
		}
		if err != nil {
			span.SetAttributes(semconv.ErrorTypeKey.String(errorType(err)))
			span.SetStatus(codes.Error, err.Error())
		} else if code >= 400 {
			span.SetAttributes(semconv.ErrorTypeKey.String(strconv.Itoa(code)))
			span.SetStatus(codes.Error, "")
		}
		span.End()
	}
}

// Middleware returns the wrapper of the per-request handler at role's end
// of the mesh. info says which service a request is for and, at a
// provider, which consumer it came from (at a consumer the provider is
// known only once an attempt chooses it: AttemptTransport, StartAttempt).
//
// At a consumer the span is of kind client and continues the app's trace
// context; at a provider it is of kind server and continues the
// consumer's. Either way the request goes on with this span's context in
// its headers.
func (o *Observer) Middleware(role wire.ServiceRole, info func(*http.Request) (service string, peer Peer)) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			service, peer := info(r)
			q := &request{o: o, role: role, service: service, start: time.Now(), method: r.Method, path: r.URL.Path, peer: peer}
			ctx := context.WithValue(r.Context(), requestKey{}, q)
			if o.tracer != nil {
				ctx = o.prop.Extract(ctx, propagation.HeaderCarrier(r.Header))
				kind := trace.SpanKindClient
				var attrs []attribute.KeyValue
				if role == wire.RoleProvider {
					kind = trace.SpanKindServer
					attrs = append(attrs, attrProvider.String(o.node))
					if peer.Name != "" {
						attrs = append(attrs, attrConsumer.String(peer.Name))
					}
					if peer.Addr != "" {
						attrs = append(attrs, semconv.NetworkPeerAddress(hostOnly(peer.Addr)), semconv.ClientAddress(hostOnly(peer.Addr)))
					}
				}
				ctx, q.span = o.spanStart(ctx, kind, r, service, attrs...)
				r = r.WithContext(ctx)
				r.Header = r.Header.Clone()
				o.prop.Inject(ctx, propagation.HeaderCarrier(r.Header))
			} else {
				r = r.WithContext(ctx)
			}
			rw := &recorder{ResponseWriter: w, q: q}
			defer func() {
				if p := recover(); p != nil {
					q.finish(http.StatusInternalServerError, errors.New("handler panicked"))
					panic(p)
				}
				code := rw.code
				if code == 0 && role == wire.RoleProvider {
					code = http.StatusOK // the handler wrote nothing: net/http answers 200
				}
				q.finish(code, nil)
			}()
			next.ServeHTTP(rw, r)
		})
	}
}

// AttemptTransport wraps the RoundTripper of each attempt at a consumer
// (the first, or a retry): peer says which provider the attempt goes to.
// Each attempt is a child span of the request's, and its trace context
// is what the provider receives.
func (o *Observer) AttemptTransport(next http.RoundTripper, peer func(*http.Request) Peer) http.RoundTripper {
	return roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		out, done := StartAttempt(r, peer(r))
		resp, err := next.RoundTrip(out)
		if err != nil {
			done(0, err)
			return nil, err
		}
		done(resp.StatusCode, nil)
		return resp, nil
	})
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// recorder notes a response's status and body size. It passes Flush and
// Hijack on (Unwrap, for http.ResponseController; Flusher for handlers that
// assert it), so streaming and upgrades work through it.
type recorder struct {
	http.ResponseWriter
	q    *request
	code int
}

func (w *recorder) WriteHeader(code int) {
	if w.code == 0 && code >= 200 || code == http.StatusSwitchingProtocols {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.q.bytes.Add(int64(n))
	return n, err
}

func (w *recorder) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil && w.code == 0 {
		w.code = http.StatusSwitchingProtocols
	}
	return c, rw, err
}
