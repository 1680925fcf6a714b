package httpmesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/wire"
)

// Picker chooses and reaches the providers of consumed services;
// *proxy.Consumer is one.
type Picker interface {
	Pick(service string, client netip.Addr, split map[string]int, skip func(wire.NodeID) bool) ([]proxy.Target, error)
	Begin(service string, t proxy.Target) (done func())
	DialTarget(ctx context.Context, service string, t proxy.Target) (net.Conn, error)
	Providers(service string) []proxy.Target
}

// ConsumerConfig configures a Consumer.
type ConsumerConfig struct {
	Logger  *slog.Logger
	Metrics *Metrics
	// Now is the clock of budgets and ejections; nil is time.Now.
	Now func() time.Time
	// Middleware wraps the per-request handler (see the package doc).
	Middleware func(http.Handler) http.Handler
	// WrapAttempt wraps the RoundTripper of every attempt.
	WrapAttempt func(http.RoundTripper) http.RoundTripper
	Observer    Observer
}

// maxReplayBody is the largest request body kept for retries; a larger
// one (or one of unknown length) is sent once.
const maxReplayBody = 64 << 10

// Consumer serves the local connections of consumed HTTP services
// (proxy.HTTPHandler) and carries their requests to providers.
type Consumer struct {
	cfg     ConsumerConfig
	log     *slog.Logger
	picker  Picker
	srv     *server
	tr      transports
	attempt http.RoundTripper // the transports, wrapped by WrapAttempt
	proxy   *httputil.ReverseProxy

	services atomic.Pointer[map[string]*consumerService]
	// hosts maps the URL host of an attempt to its provider, for the
	// transports' dials: one host per provider, so one pool each.
	hosts sync.Map // string -> proxy.Target

	mu sync.Mutex // serialises SetServices
}

// consumerService is one HTTP service's configuration, ready to use.
type consumerService struct {
	name    string
	cfg     wire.ServiceHTTP
	routes  []route
	retryOn map[string]bool
	budget  *budget   // nil without retries
	out     *outliers // nil without outlier detection
}

// NewConsumer returns a Consumer that serves nothing until Attach and
// SetServices.
func NewConsumer(cfg ConsumerConfig) *Consumer {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Consumer{cfg: cfg, log: discardLogger(cfg.Logger).With("subsystem", "http")}
	empty := map[string]*consumerService{}
	c.services.Store(&empty)
	c.tr = newTransports(c.dial)
	c.attempt = roundTripperFunc(func(r *http.Request) (*http.Response, error) { return c.tr.of(r).RoundTrip(r) })
	if cfg.WrapAttempt != nil {
		c.attempt = cfg.WrapAttempt(c.attempt)
	}
	c.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.Host = pr.In.Host
		},
		Transport:    roundTripperFunc(c.roundTrip),
		ErrorHandler: c.proxyError,
		ErrorLog:     slogErrorLog(c.log),
	}
	var h http.Handler = http.HandlerFunc(c.serveHTTP)
	if cfg.Middleware != nil {
		h = cfg.Middleware(h)
	}
	c.srv = newServer(h, c.log, "consumer")
	return c
}

// Attach gives the Consumer its picker; call it once, before the first
// connection.
func (c *Consumer) Attach(p Picker) { c.picker = p }

// Close stops serving; connections handed in end.
func (c *Consumer) Close() {
	c.srv.close()
	c.tr.close()
}

// SetServices implements proxy.HTTPHandler.
func (c *Consumer) SetServices(m map[string]*wire.ServiceHTTP) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := *c.services.Load()
	next := make(map[string]*consumerService, len(m))
	for name, h := range m {
		if o := old[name]; o != nil && equalHTTP(&o.cfg, h) {
			next[name] = o // keeps its budget and ejections
			continue
		}
		cs := &consumerService{name: name, cfg: *h, routes: compileRoutes(h.Routes), retryOn: map[string]bool{}}
		if r := h.Retries; r != nil && r.Check() == nil {
			cs.budget = newBudget(r)
			for _, on := range r.On {
				cs.retryOn[on] = true
			}
		}
		if o := h.Outlier; o != nil && o.Check() == nil {
			cs.out = newOutliers(o)
			if prev := old[name]; prev != nil && prev.out != nil {
				prev.out.mu.Lock()
				cs.out.hosts = prev.out.hosts // ejections survive a config change
				prev.out.mu.Unlock()
			}
		}
		next[name] = cs
	}
	for name := range old {
		if next[name] == nil {
			c.cfg.Metrics.forget(name)
		}
	}
	c.services.Store(&next)
}

// ServeConn implements proxy.HTTPHandler.
func (c *Consumer) ServeConn(service string, conn net.Conn) {
	info := &RequestInfo{Service: service, Role: RoleConsumer}
	if ta, ok := conn.RemoteAddr().(*net.TCPAddr); ok {
		info.Client = ta.AddrPort().Addr().Unmap()
	}
	c.srv.serveConn(conn, info)
}

// request is the state of one request at the consumer, shared by its
// attempts.
type request struct {
	svc      *consumerService
	info     *RequestInfo
	split    map[string]int // a route's, nil for the service's
	tried    []wire.NodeID
	attempts int
	provider string // who answered last
	// replay is the buffered body for retries; canReplay says whether a
	// retry may send the body again.
	replay    []byte
	canReplay bool
	start     time.Time
}

func (c *Consumer) serveHTTP(w http.ResponseWriter, r *http.Request) {
	info, _ := r.Context().Value(infoKey).(*RequestInfo)
	if info == nil {
		http.Error(w, "meshlink: no service", http.StatusInternalServerError)
		return
	}
	rq := &request{info: info, start: c.cfg.Now()}
	defer c.cfg.Metrics.begin(RoleConsumer, info.Service)()
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		d := c.cfg.Now().Sub(rq.start)
		c.cfg.Metrics.done(RoleConsumer, info.Service, rq.provider, sw.code, r.Method, d)
		if c.cfg.Observer != nil {
			c.cfg.Observer.Done(r, DoneInfo{RequestInfo: *info, Code: sw.code, Provider: rq.provider, Attempts: rq.attempts, Duration: d})
		}
	}()
	rq.svc = (*c.services.Load())[info.Service]
	if rq.svc == nil || c.picker == nil {
		http.Error(sw, "meshlink: service "+info.Service+" is not consumed here", http.StatusServiceUnavailable)
		return
	}
	rq.split, _ = matchRoutes(rq.svc.routes, r)
	ctx := context.WithValue(r.Context(), requestKey, rq)
	if t := rq.svc.cfg.Timeout(); t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t)
		defer cancel()
	}
	r = r.WithContext(ctx)
	if r.Method == http.MethodConnect {
		c.connect(sw, r, rq)
		return
	}
	if rq.svc.budget != nil {
		rq.svc.budget.request(rq.start)
		rq.canReplay = r.Body == nil || r.Body == http.NoBody
		if !rq.canReplay && r.ContentLength > 0 && r.ContentLength <= maxReplayBody && r.ProtoMajor == 1 {
			b, err := io.ReadAll(io.LimitReader(r.Body, maxReplayBody+1))
			if err != nil || int64(len(b)) != r.ContentLength {
				http.Error(sw, "meshlink: could not read the request body", http.StatusBadRequest)
				return
			}
			rq.replay, rq.canReplay = b, true
			r.Body = io.NopCloser(bytes.NewReader(b))
		}
	}
	c.proxy.ServeHTTP(sw, r)
}

// choose picks the provider of the next attempt: the first of the
// picker's order not tried yet by this request, else the first.
func (c *Consumer) choose(rq *request) (proxy.Target, error) {
	var skip func(wire.NodeID) bool
	if rq.svc.out != nil {
		now := c.cfg.Now()
		skip = func(n wire.NodeID) bool { return rq.svc.out.ejected(n, now) }
	}
	ts, err := c.picker.Pick(rq.svc.name, rq.info.Client, rq.split, skip)
	if err != nil {
		return proxy.Target{}, err
	}
	for _, t := range ts {
		tried := false
		for _, n := range rq.tried {
			tried = tried || n == t.Node
		}
		if !tried {
			return t, nil
		}
	}
	return ts[0], nil
}

// hostOf is the URL host of attempts to t: its mesh address, or its
// local target.
func hostOf(t proxy.Target) string {
	if t.Local != "" {
		return t.Local
	}
	return t.Addr.String()
}

// roundTrip runs the attempts of one request (the ReverseProxy's
// transport).
func (c *Consumer) roundTrip(req *http.Request) (*http.Response, error) {
	rq, _ := req.Context().Value(requestKey).(*request)
	if rq == nil {
		return nil, errors.New("httpmesh: request without state")
	}
	svc := rq.svc
	for {
		t, err := c.choose(rq)
		if err != nil {
			return nil, err
		}
		rq.attempts++
		rq.tried = append(rq.tried, t.Node)
		host := hostOf(t)
		c.hosts.Store(host, t)
		out := req
		if rq.attempts > 1 {
			out = req.Clone(req.Context())
			if rq.replay != nil {
				out.Body = io.NopCloser(bytes.NewReader(rq.replay))
			}
		}
		out.URL.Host = host
		ai := &AttemptInfo{Service: svc.name, N: rq.attempts, Provider: t}
		out = out.WithContext(context.WithValue(out.Context(), attemptKey, ai))
		done := c.picker.Begin(svc.name, t)
		start := c.cfg.Now()
		resp, err := c.attempt.RoundTrip(out)
		now := c.cfg.Now()
		oc := classify(resp, err)
		if svc.out != nil && req.Context().Err() == nil {
			if d := svc.out.record(t.Node, oc, now, len(c.picker.Providers(svc.name))); d > 0 {
				c.cfg.Metrics.ejected(svc.name, t.Name)
				c.log.Warn("provider ejected: too many errors in a row", "service", svc.name, "provider", t.Name, "for", d)
			}
		}
		retry := c.retryable(rq, req, oc) && svc.budget.retry(now)
		ai.Code, ai.Err, ai.Duration, ai.Retried = oc.code, err, now.Sub(start), retry
		if c.cfg.Observer != nil {
			c.cfg.Observer.Attempt(req, *ai)
		}
		if retry {
			if resp != nil {
				io.CopyN(io.Discard, resp.Body, maxReplayBody)
				resp.Body.Close()
			}
			done()
			c.cfg.Metrics.retried(svc.name)
			continue
		}
		rq.provider = t.Name
		if err != nil {
			done()
			return nil, err
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			done() // the body is the stream: ReverseProxy needs it as it is
			return resp, nil
		}
		resp.Body = &doneBody{ReadCloser: resp.Body, done: done}
		return resp, nil
	}
}

// retryable reports whether an attempt's outcome may be retried under
// the service's retries (the budget aside).
func (c *Consumer) retryable(rq *request, req *http.Request, oc outcome) bool {
	svc := rq.svc
	if svc.budget == nil || rq.attempts > svc.cfg.Retries.Attempts || req.Context().Err() != nil {
		return false
	}
	if !rq.canReplay || !idempotent(req.Method) && !svc.cfg.Retries.NonIdempotent {
		return false
	}
	if req.Header.Get("Upgrade") != "" {
		return false
	}
	switch {
	case oc.connectFail:
		return svc.retryOn[wire.RetryConnectFailure]
	case oc.reset:
		return svc.retryOn[wire.RetryReset]
	case oc.code >= 500:
		return svc.retryOn[fmt.Sprint(oc.code)]
	}
	return false
}

// dialError marks a failure to reach a provider: the request never left.
type dialError struct{ err error }

func (e *dialError) Error() string { return "no connection to the provider: " + e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// classify turns an attempt's result into an outcome.
func classify(resp *http.Response, err error) outcome {
	if err == nil {
		return outcome{code: resp.StatusCode}
	}
	var de *dialError
	if errors.As(err, &de) {
		return outcome{connectFail: true}
	}
	return outcome{reset: true}
}

func (c *Consumer) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	v, ok := c.hosts.Load(addr)
	if !ok {
		return nil, &dialError{fmt.Errorf("httpmesh: no provider at %s", addr)}
	}
	t := v.(proxy.Target)
	conn, err := c.picker.DialTarget(ctx, serviceOfCtx(ctx), t)
	if err != nil {
		return nil, &dialError{err}
	}
	return conn, nil
}

func serviceOfCtx(ctx context.Context) string {
	if a, ok := ctx.Value(attemptKey).(*AttemptInfo); ok {
		return a.Service
	}
	return ""
}

// proxyError answers a request no provider answered.
func (c *Consumer) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := http.StatusBadGateway, "meshlink: no answer from a provider"
	switch {
	case errors.Is(err, proxy.ErrNoHealthyProvider):
		code, msg = http.StatusServiceUnavailable, "meshlink: "+err.Error()
	case errors.Is(err, context.DeadlineExceeded):
		code, msg = http.StatusGatewayTimeout, "meshlink: no answer within the service's timeout"
	case r.Context().Err() != nil:
		return // the client went away
	}
	c.log.Debug("request failed", "service", serviceName(r), "err", err, "answered", code)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	io.WriteString(w, msg+"\n")
}

func serviceName(r *http.Request) string {
	if ri, ok := Info(r.Context()); ok {
		return ri.Service
	}
	return ""
}

// connect passes a CONNECT request through as a stream to a provider.
func (c *Consumer) connect(w http.ResponseWriter, r *http.Request, rq *request) {
	t, err := c.choose(rq)
	if err != nil {
		c.proxyError(w, r, err)
		return
	}
	rq.attempts, rq.provider = 1, t.Name
	done := c.picker.Begin(rq.svc.name, t)
	defer done()
	stream(w, r, func(ctx context.Context) (net.Conn, error) { return c.picker.DialTarget(ctx, rq.svc.name, t) })
}

// stream hijacks the client's connection of an HTTP/1.1 request, writes
// the request to a connection from dial and splices both ways.
func stream(w http.ResponseWriter, r *http.Request, dial func(context.Context) (net.Conn, error)) {
	if r.ProtoMajor != 1 {
		http.Error(w, "meshlink: CONNECT is passed through for HTTP/1.1 only", http.StatusNotImplemented)
		return
	}
	up, err := dial(r.Context())
	if err != nil {
		http.Error(w, "meshlink: no connection to a provider", http.StatusBadGateway)
		return
	}
	defer up.Close()
	if err := r.Write(up); err != nil {
		http.Error(w, "meshlink: the provider went away", http.StatusBadGateway)
		return
	}
	if sw, ok := w.(*statusWriter); ok {
		sw.code = http.StatusOK // what the client sees is the target's
	}
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer client.Close()
	if n := brw.Reader.Buffered(); n > 0 {
		b, _ := brw.Reader.Peek(n)
		up.Write(b)
	}
	var ctr proxy.Counters
	proxy.Splice(client, up, &ctr)
}

// doneBody runs done once, when the body is closed.
type doneBody struct {
	io.ReadCloser
	once sync.Once
	done func()
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// equalHTTP reports whether two configurations are the same.
func equalHTTP(a, b *wire.ServiceHTTP) bool { return reflect.DeepEqual(a, b) }
