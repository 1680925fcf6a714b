// Package httpmesh is the HTTP data path of services marked HTTP
// (protocol=http): at the consumer's local listener it parses HTTP/1.1
// and h2c (HTTP/2 with prior knowledge, how gRPC runs in clear) and
// carries each request to a provider of its own choosing; at the provider
// it serves the mesh connections as HTTP and forwards each request to the
// target over pooled keep-alive connections.
//
// Per request, the consumer (Consumer) applies the service's HTTP
// configuration from the network map (wire.ServiceHTTP): the first
// matching route chooses a version or a split (else the service's
// split), then the provider is chosen as for a TCP connection (health,
// priority, weights, load: proxy.Consumer.Pick) among those outlier
// detection has not ejected; failed attempts are retried on another
// provider within a retry budget, and the whole request is bounded by the
// service's timeout. Upgrades (WebSocket) and CONNECT become streams
// after their handshake. Anything that is not HTTP gets a 400 and a
// rate-limited log line.
//
// gRPC requests (HTTP/2 with Content-Type application/grpc…) travel as
// h2c over the mesh and to the target, since gRPC needs HTTP/2 end to
// end; every other request goes as HTTP/1.1, whatever the client spoke,
// so that targets that only speak HTTP/1.1 serve h2c clients too, and a
// provider agent older than HTTP services (or one exporting the service
// as plain TCP) splices them to its target as it would any HTTP/1.1
// client's. Providers, in turn, parse whatever arrives on
// an HTTP export as HTTP, so consumers older than HTTP services, which
// carry the service as TCP, still work: their clients' requests are
// forwarded one by one.
//
// # Hook points
//
// Other parts of the agent hang off three hooks, none of which touches
// the routing:
//
//   - Provider.SetAuthorizer(service, Authorizer): called for every
//     request at the provider before it is forwarded, with the node the
//     request came from (known for certain: the mesh source address is
//     bound to a WireGuard key). A refusal is answered with its status,
//     its header (WWW-Authenticate…) and reason as the body; the target
//     never sees the request. An authorizer that lets a request through
//     may add headers to r (claims, say): they are forwarded to the
//     target with it.
//   - ConsumerConfig.Middleware and ProviderConfig.Middleware wrap the
//     whole per-request handler at either end: they see the request
//     before anything is chosen (and may add headers, such as a
//     traceparent) and the response as it is written. Info(ctx) says
//     which service and end a request is at, and from which node at the
//     provider.
//   - ConsumerConfig.Observer and ProviderConfig.Observer are told of
//     every attempt (the chosen provider, its number, the status or the
//     error, the time) and of every request's end (the final status and
//     duration, the provider that answered). WrapAttempt wraps the
//     RoundTripper of each attempt at the consumer (a child span per
//     attempt); Attempt(ctx) there says which provider the attempt goes
//     to. Observers and Chain combine several observers or middlewares.
//
// The agent constructs one Consumer and one Provider (agent.Agent's
// httpOut and httpIn) and hands them to proxy.Consumer and
// proxy.Provider, which pass them the connections of HTTP services.
package httpmesh

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/wire"
)

// Authorizer decides, at the provider, whether request r from node from
// may be forwarded to the target. It returns ok, or the status (401,
// 403), header and reason the refusal is answered with. It runs on the
// request's goroutine and may read r's headers, not its body.
type Authorizer func(r *http.Request, from wire.NodeID) (status int, header http.Header, reason string, ok bool)

// Role is which end of the mesh a request is seen at.
type Role string

// The ends.
const (
	RoleConsumer Role = "consumer"
	RoleProvider Role = "provider"
)

// RequestInfo is what Info reports of a request.
type RequestInfo struct {
	Service string
	Role    Role
	// From is the consumer node at the provider (0 at the consumer);
	// FromName its name.
	From     wire.NodeID
	FromName string
	// Client is the local client's address at the consumer, the mesh
	// source address at the provider.
	Client netip.Addr

	export *proxy.Export // at the provider
}

// AttemptInfo describes one attempt of a request at the consumer.
type AttemptInfo struct {
	Service string
	// N counts the attempts of the request from 1.
	N        int
	Provider proxy.Target
	// Code is the response's status, 0 if none came (Err says why).
	Code     int
	Err      error
	Duration time.Duration
	// Retried says the consumer will try again after this attempt.
	Retried bool
}

// DoneInfo describes a request that ended.
type DoneInfo struct {
	RequestInfo
	// Code is the status the client got (0: the client went away
	// before any).
	Code int
	// Provider is who answered at the consumer ("" if none did), this
	// node's name at the provider.
	Provider string
	Attempts int
	Duration time.Duration
}

// Observer is told of attempts and of requests' ends. Its methods are
// called on the request's goroutine and must be quick.
type Observer interface {
	Attempt(r *http.Request, a AttemptInfo)
	Done(r *http.Request, d DoneInfo)
}

type ctxKey int

const (
	infoKey ctxKey = iota
	attemptKey
	requestKey
)

// Info reports which service and end the request of ctx is at.
func Info(ctx context.Context) (RequestInfo, bool) {
	ri, ok := ctx.Value(infoKey).(*RequestInfo)
	if !ok {
		return RequestInfo{}, false
	}
	return *ri, true
}

// Attempt reports, inside a consumer's attempt (WrapAttempt), which
// provider it goes to and its number.
func Attempt(ctx context.Context) (AttemptInfo, bool) {
	a, ok := ctx.Value(attemptKey).(*AttemptInfo)
	if !ok {
		return AttemptInfo{}, false
	}
	return *a, true
}

// statusWriter records the status a handler wrote. It unwraps for
// http.ResponseController (flushes, hijacks of upgrades).
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 && code >= 200 || code == http.StatusSwitchingProtocols {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack takes the connection over: ReverseProxy does for an upgrade,
// after a 101 it writes itself (CONNECT sets its code before).
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.code == 0 {
		w.code = http.StatusSwitchingProtocols
	}
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// logLimiter lets one log line through per interval and counts the rest:
// whoever sends garbage must not flood the log.
type logLimiter struct {
	mu         sync.Mutex // guards the fields below
	last       time.Time
	suppressed int
}

// allow reports whether to log now and how many were held back since.
func (l *logLimiter) allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < 10*time.Second {
		l.suppressed++
		return false, 0
	}
	n := l.suppressed
	l.last, l.suppressed = now, 0
	return true, n
}

func discardLogger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// Observers is one Observer telling each of os in turn (nil ones left
// out), for when tracing, access logs and statistics all observe.
func Observers(os ...Observer) Observer {
	var keep multiObserver
	for _, o := range os {
		if o != nil {
			keep = append(keep, o)
		}
	}
	switch len(keep) {
	case 0:
		return nil
	case 1:
		return keep[0]
	}
	return keep
}

type multiObserver []Observer

func (m multiObserver) Attempt(r *http.Request, a AttemptInfo) {
	for _, o := range m {
		o.Attempt(r, a)
	}
}

func (m multiObserver) Done(r *http.Request, d DoneInfo) {
	for _, o := range m {
		o.Done(r, d)
	}
}

// Chain is one middleware applying mws outermost first (nil ones left
// out).
func Chain(mws ...func(http.Handler) http.Handler) func(http.Handler) http.Handler {
	return func(h http.Handler) http.Handler {
		for i := len(mws) - 1; i >= 0; i-- {
			if mws[i] != nil {
				h = mws[i](h)
			}
		}
		return h
	}
}
