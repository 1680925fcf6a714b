package agent

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/meshlink/meshlink/agent/httpobs"
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
