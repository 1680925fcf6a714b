package httpobs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// The OTLP protocols of TraceConfig.Protocol, named as
// OTEL_EXPORTER_OTLP_PROTOCOL names them.
const (
	ProtocolHTTP = "http/protobuf"
	ProtocolGRPC = "grpc"
)

// Bounds of the span exporter: spans wait in a queue of DefaultQueueSize
// for the exporter's goroutine; a full queue drops new spans rather than
// hold a request (a dead or slow collector costs spans, never latency).
const (
	DefaultQueueSize = 2048
	exportBatch      = 512
	exportEvery      = 2 * time.Second
	exportTimeout    = 5 * time.Second
	DefaultTraceName = "meshlink-agent"
	retryMaxElapsed  = 10 * time.Second
	defaultHTTPPort  = "4318"
	defaultGRPCPort  = "4317"
	tracesURLPath    = "/v1/traces"
	// maxAttributeLength bounds each attribute value of a span.
	maxAttributeLength = 1024
)

// TraceConfig says where and how an agent exports its spans.
type TraceConfig struct {
	// Endpoint is the collector's OTLP base address: a URL
	// ("http://127.0.0.1:4318", "https://otel.example:4317") or host:port
	// (plain, no TLS). For http/protobuf the traces go to its path
	// /v1/traces. "" turns tracing off unless TracesEndpoint is set.
	Endpoint string
	// TracesEndpoint, when set, is the full URL traces go to, used as it
	// is (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); it wins over Endpoint.
	TracesEndpoint string
	// Protocol is ProtocolHTTP (default) or ProtocolGRPC.
	Protocol string
	// Sample is the share of new traces sampled, 0 to 1. A request that
	// arrives with a trace context keeps its parent's decision unless
	// IgnoreParent.
	Sample       float64
	IgnoreParent bool
	// ServiceName is the resource's service.name; default
	// DefaultTraceName. Node, the agent's node name, is its
	// service.instance.id.
	ServiceName string
	Node        string
	// QueueSize bounds the spans waiting for export; default
	// DefaultQueueSize.
	QueueSize int
}

// Enabled says whether c exports anything.
func (c TraceConfig) Enabled() bool { return c.Endpoint != "" || c.TracesEndpoint != "" }

// exporterURL is the URL the exporter is given.
func (c TraceConfig) exporterURL() (string, error) {
	if c.TracesEndpoint != "" {
		u, err := url.Parse(c.TracesEndpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return "", fmt.Errorf("tracing: traces endpoint %q is not an http:// or https:// URL", c.TracesEndpoint)
		}
		return c.TracesEndpoint, nil
	}
	ep := c.Endpoint
	if !strings.Contains(ep, "://") {
		if _, _, err := net.SplitHostPort(ep); err != nil {
			port := defaultHTTPPort
			if c.Protocol == ProtocolGRPC {
				port = defaultGRPCPort
			}
			ep = net.JoinHostPort(ep, port)
		}
		ep = "http://" + ep
	}
	u, err := url.Parse(ep)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("tracing: OTLP endpoint %q is neither host:port nor an http:// or https:// URL", c.Endpoint)
	}
	if c.Protocol != ProtocolGRPC {
		u.Path = strings.TrimSuffix(u.Path, "/") + tracesURLPath
	}
	return u.String(), nil
}

// NewTracerProvider starts the exporter c describes, or returns nil when c
// is off. The caller shuts it down (Shutdown, with a deadline) to flush
// what is queued. The exporter connects lazily: an unreachable collector
// is no error here, only dropped spans later.
func NewTracerProvider(c TraceConfig) (*sdktrace.TracerProvider, error) {
	if !c.Enabled() {
		return nil, nil
	}
	if !(c.Sample >= 0 && c.Sample <= 1) {
		return nil, fmt.Errorf("tracing: sampling ratio %v is not between 0 and 1", c.Sample)
	}
	u, err := c.exporterURL()
	if err != nil {
		return nil, err
	}
	var exp sdktrace.SpanExporter
	switch c.Protocol {
	case "", ProtocolHTTP:
		exp, err = otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(u), otlptracehttp.WithTimeout(exportTimeout),
			otlptracehttp.WithRetry(otlptracehttp.RetryConfig{Enabled: true, InitialInterval: 500 * time.Millisecond, MaxInterval: 2 * time.Second, MaxElapsedTime: retryMaxElapsed}))
	case ProtocolGRPC:
		exp, err = otlptracegrpc.New(context.Background(), otlptracegrpc.WithEndpointURL(u), otlptracegrpc.WithTimeout(exportTimeout),
			otlptracegrpc.WithRetry(otlptracegrpc.RetryConfig{Enabled: true, InitialInterval: 500 * time.Millisecond, MaxInterval: 2 * time.Second, MaxElapsedTime: retryMaxElapsed}))
	default:
		return nil, fmt.Errorf("tracing: OTLP protocol %q is neither %s nor %s", c.Protocol, ProtocolHTTP, ProtocolGRPC)
	}
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %s: %w", u, err)
	}
	name := c.ServiceName
	if name == "" {
		name = DefaultTraceName
	}
	attrs := []attributeKV{semconv.ServiceName(name)}
	if c.Node != "" {
		attrs = append(attrs, semconv.ServiceInstanceID(c.Node), attrNode.String(c.Node))
	}
	res := resource.NewWithAttributes(semconv.SchemaURL, attrs...)
	var sampler sdktrace.Sampler = sdktrace.TraceIDRatioBased(c.Sample)
	if !c.IgnoreParent {
		sampler = sdktrace.ParentBased(sampler)
	}
	queue := c.QueueSize
	if queue <= 0 {
		queue = DefaultQueueSize
	}
	limits := sdktrace.NewSpanLimits()
	// A path or a user agent is the client's to choose: bound what a span
	// carries of it.
	limits.AttributeValueLengthLimit = maxAttributeLength
	return sdktrace.NewTracerProvider(
		sdktrace.WithResource(res),
		sdktrace.WithRawSpanLimits(limits),
		sdktrace.WithSampler(sampler),
		// No WithBlocking: a full queue drops the span.
		sdktrace.WithBatcher(exp, sdktrace.WithMaxQueueSize(queue), sdktrace.WithMaxExportBatchSize(min(exportBatch, queue)),
			sdktrace.WithBatchTimeout(exportEvery), sdktrace.WithExportTimeout(exportTimeout)),
	), nil
}

// ParseSampler reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG's
// values (given by the caller, which reads the environment) into
// TraceConfig's Sample and IgnoreParent. An empty name is the
// specification's default, parentbased_always_on.
func ParseSampler(name, arg string) (sample float64, ignoreParent bool, err error) {
	ratio := func() (float64, error) {
		if arg == "" {
			return 1, nil
		}
		r, err := strconv.ParseFloat(arg, 64)
		if err != nil || !(r >= 0 && r <= 1) {
			return 0, fmt.Errorf("tracing: sampler argument %q is not a ratio between 0 and 1", arg)
		}
		return r, nil
	}
	switch name {
	case "", "parentbased_always_on":
		return 1, false, nil
	case "parentbased_always_off":
		return 0, false, nil
	case "always_on":
		return 1, true, nil
	case "always_off":
		return 0, true, nil
	case "traceidratio":
		r, err := ratio()
		return r, true, err
	case "parentbased_traceidratio":
		r, err := ratio()
		return r, false, err
	}
	return 0, false, fmt.Errorf("%w %q: use always_on, always_off, traceidratio or their parentbased_ forms", ErrBadSampler, name)
}

// ErrBadSampler is returned by ParseSampler for a sampler it does not know.
var ErrBadSampler = errors.New("tracing: unknown sampler")
