package main

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/urfave/cli/v2"
	"go.opentelemetry.io/otel"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/httpobs"
)

// tracingFlags are the agent's flags for what it records of HTTP
// requests (docs/tracing.md). The OpenTelemetry variables are read as
// defaults (tracingConfig); a meshlink flag or MESHLINK_ variable wins.
func tracingFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "otlp-endpoint", Usage: "export traces of HTTP requests to this OTLP collector, host:port or URL (e.g. 127.0.0.1:4318, https://otel.example:4318); default OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else off", EnvVars: env("OTLP_ENDPOINT")},
		&cli.StringFlag{Name: "otlp-protocol", Usage: "OTLP protocol: http/protobuf or grpc; default OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf", EnvVars: env("OTLP_PROTOCOL")},
		&cli.Float64Flag{Name: "trace-sample", Value: 1, Usage: "share of new traces sampled, 0 to 1; a request whose traceparent is sampled, or not, keeps its caller's choice; default from OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, else 1", EnvVars: env("TRACE_SAMPLE")},
		&cli.StringFlag{Name: "trace-service", Usage: "service.name of this agent's spans; default OTEL_SERVICE_NAME, else " + httpobs.DefaultTraceName, EnvVars: env("TRACE_SERVICE")},
		&cli.StringFlag{Name: "access-log", Usage: "write one JSON line per HTTP request to this file (appended), or - for standard output; default off", EnvVars: env("ACCESS_LOG")},
	}
}

// tracingConfig adds the tracing flags, with the OpenTelemetry variables
// (getenv) as their defaults, to the agent's configuration.
func tracingConfig(c *cli.Context, getenv func(string) string, cfg *agent.Config) error {
	first := func(names ...string) string {
		for _, n := range names {
			if v := getenv(n); v != "" {
				return v
			}
		}
		return ""
	}
	tc := httpobs.TraceConfig{
		Protocol:    c.String("otlp-protocol"),
		ServiceName: c.String("trace-service"),
	}
	if c.IsSet("otlp-endpoint") {
		tc.Endpoint = c.String("otlp-endpoint")
	} else {
		tc.Endpoint, tc.TracesEndpoint = getenv("OTEL_EXPORTER_OTLP_ENDPOINT"), getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	}
	if tc.Endpoint == "off" {
		tc.Endpoint = ""
	}
	if tc.Protocol == "" {
		tc.Protocol = first("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	if tc.Protocol != "" && tc.Protocol != httpobs.ProtocolHTTP && tc.Protocol != httpobs.ProtocolGRPC {
		return fmt.Errorf("--otlp-protocol %q: want %s or %s", tc.Protocol, httpobs.ProtocolHTTP, httpobs.ProtocolGRPC)
	}
	if tc.ServiceName == "" {
		tc.ServiceName = getenv("OTEL_SERVICE_NAME")
	}
	if c.IsSet("trace-sample") {
		tc.Sample = c.Float64("trace-sample")
		if !(tc.Sample >= 0 && tc.Sample <= 1) {
			return fmt.Errorf("--trace-sample %v: want a share between 0 and 1, e.g. 0.1", tc.Sample)
		}
	} else {
		var err error
		tc.Sample, tc.IgnoreParent, err = httpobs.ParseSampler(getenv("OTEL_TRACES_SAMPLER"), getenv("OTEL_TRACES_SAMPLER_ARG"))
		if err != nil {
			return fmt.Errorf("OTEL_TRACES_SAMPLER: %w", err)
		}
	}
	cfg.Tracing = tc
	cfg.AccessLog = c.String("access-log")
	return nil
}

// otelErrors sends the OpenTelemetry SDK's errors (an exporter that cannot
// reach its collector) to log, at most one a minute: a dead collector
// must not fill the log. The SDK's handler is global, as is this process.
func otelErrors(log *slog.Logger) {
	var mu sync.Mutex
	var last time.Time
	var quiet int
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(last) < time.Minute {
			quiet++
			return
		}
		log.Warn("tracing: span export failed; spans are dropped while the collector is unreachable", "subsystem", "tracing", "err", err, "errors_not_logged", quiet)
		last, quiet = time.Now(), 0
	}))
}
