package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/meshlink/meshlink/agent/httpmesh"
	"github.com/meshlink/meshlink/agent/httpobs"
	"github.com/meshlink/meshlink/wire"
)

// httpObs is the agent's observation of its HTTP services' requests
// (agent/httpobs): spans, access log and the console's counts.
type httpObs struct {
	obs     *httpobs.Observer
	tp      *sdktrace.TracerProvider // nil: tracing off
	log     *httpobs.AccessLog       // nil: no access log
	logFile io.Closer                // the access log's file, nil for stdout
}

// tracerShutdown bounds how long Close waits to flush queued spans.
const tracerShutdown = 2 * time.Second

// startHTTPObs sets up what Config.Tracing and Config.AccessLog ask for.
// It opens the access log file before anything is served, so a path that
// cannot be written fails the start with its reason.
func (a *Agent) startHTTPObs() error {
	h := &httpObs{}
	tc := a.cfg.Tracing
	if tc.Node == "" {
		tc.Node = a.cfg.Name
	}
	tp, err := httpobs.NewTracerProvider(tc)
	if err != nil {
		return fmt.Errorf("agent: --otlp-endpoint: %w", err)
	}
	h.tp = tp
	switch a.cfg.AccessLog {
	case "", "off":
	case "-":
		h.log = httpobs.NewAccessLog(os.Stdout, 0, a.log.With("subsystem", "accesslog"))
	default:
		f, err := os.OpenFile(a.cfg.AccessLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			h.shutdown()
			return fmt.Errorf("agent: --access-log: %w", err)
		}
		h.log, h.logFile = httpobs.NewAccessLog(f, 0, a.log.With("subsystem", "accesslog")), f
	}
	cfg := httpobs.Config{Node: a.cfg.Name, Log: h.log, Stats: httpobs.NewStats()}
	if tp != nil {
		cfg.Tracer = tp
	}
	h.obs = httpobs.New(cfg)
	a.httpObs = h
	return nil
}

// shutdown flushes and stops; nil-safe.
func (h *httpObs) shutdown() {
	if h == nil {
		return
	}
	if h.tp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), tracerShutdown)
		_ = h.tp.Shutdown(ctx) // spans a dead collector did not take are lost
		cancel()
	}
	if h.log != nil {
		h.log.Close()
	}
	if h.logFile != nil {
		h.logFile.Close()
	}
}

// HTTPObserver is what the HTTP data path reports its requests to: it
// wraps the consumer's transport and the provider's handler of every HTTP
// service. Nil before Start.
func (a *Agent) HTTPObserver() *httpobs.Observer {
	if a.httpObs == nil {
		return nil
	}
	return a.httpObs.obs
}

// The hooks of the HTTP data path (agent/httpmesh) into the observer.

// consumerInfo names the service of a consumer's request.
func consumerInfo(r *http.Request) (string, httpobs.Peer) {
	ri, _ := httpmesh.Info(r.Context())
	return ri.Service, httpobs.Peer{}
}

// providerInfo names the service and the consumer node of a provider's
// request (the node is certain: the mesh source address is bound to its
// WireGuard key).
func providerInfo(r *http.Request) (string, httpobs.Peer) {
	ri, _ := httpmesh.Info(r.Context())
	p := httpobs.Peer{Node: ri.From, Name: ri.FromName}
	if ri.Client.IsValid() {
		p.Addr = ri.Client.String()
	}
	return ri.Service, p
}

// attemptPeer is the provider a consumer's attempt goes to.
func attemptPeer(r *http.Request) httpobs.Peer {
	ai, _ := httpmesh.Attempt(r.Context())
	p := httpobs.Peer{Node: ai.Provider.Node, Name: ai.Provider.Name}
	if ai.Provider.Addr.IsValid() {
		p.Addr = ai.Provider.Addr.Addr().String()
	}
	return p
}

// hook adds the observer to the HTTP data path's configurations.
func (h *httpObs) hook(c *httpmesh.ConsumerConfig, p *httpmesh.ProviderConfig) {
	o := h.obs
	c.Middleware = o.Middleware(wire.RoleConsumer, consumerInfo)
	c.WrapAttempt = func(rt http.RoundTripper) http.RoundTripper { return o.AttemptTransport(rt, attemptPeer) }
	p.Middleware = o.Middleware(wire.RoleProvider, providerInfo)
}
