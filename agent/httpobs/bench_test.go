package httpobs

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/meshlink/meshlink/wire"
)

// BenchmarkProviderMiddleware measures what the provider's Middleware adds
// to a request handled in memory: none (the bare handler), tracing off
// (the console's counts only), tracing on with nothing sampled, and every
// request sampled (spans ended into the SDK with no exporter).
func BenchmarkProviderMiddleware(b *testing.B) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	info := func(*http.Request) (string, Peer) { return "web", Peer{Node: 1, Name: "a", Addr: "100.96.0.1"} }
	for _, c := range []struct {
		name string
		h    http.Handler
	}{
		{"bare", h},
		{"off", New(Config{Stats: NewStats()}).Middleware(wire.RoleProvider, info)(h)},
		{"unsampled", New(Config{Stats: NewStats(), Tracer: sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))}).Middleware(wire.RoleProvider, info)(h)},
		{"sampled", New(Config{Stats: NewStats(), Tracer: sdktrace.NewTracerProvider()}).Middleware(wire.RoleProvider, info)(h)},
	} {
		b.Run(c.name, func(b *testing.B) {
			r := httptest.NewRequest("GET", "http://web/x", nil)
			b.ReportAllocs()
			for b.Loop() {
				c.h.ServeHTTP(httptest.NewRecorder(), r)
			}
		})
	}
}
