package httpmesh

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the per-request metrics of both ends, registered in the
// agent's registry (Collectors). Labels are bounded: service and provider
// are names from the network map, method is one of the standard methods
// or OTHER, code is the status number (0: the client went away first).
// A nil *Metrics records nothing.
type Metrics struct {
	requests  *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	retries   *prometheus.CounterVec
	ejections *prometheus.CounterVec
	inFlight  *prometheus.GaugeVec
}

// NewMetrics makes the metrics; nothing is registered yet.
func NewMetrics() *Metrics {
	return &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_http_requests_total",
			Help: "HTTP requests of HTTP services by role (consumer: local clients; provider: from the mesh), service, provider (who answered; at the provider, this node), status code and method.",
		}, []string{"role", "service", "provider", "code", "method"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshlink_http_request_duration_seconds",
			Help:    "Time from an HTTP request's arrival to the end of its response, by role and service.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"role", "service"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_http_retries_total",
			Help: "HTTP attempts a consumer retried on another try, by service.",
		}, []string{"service"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_http_ejections_total",
			Help: "Providers a consumer ejected by outlier detection (too many errors in a row), by service and provider.",
		}, []string{"service", "provider"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshlink_http_requests_in_flight",
			Help: "HTTP requests being served now, by role and service.",
		}, []string{"role", "service"}),
	}
}

// Collectors are what to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.retries, m.ejections, m.inFlight}
}

func (m *Metrics) begin(role Role, service string) func() {
	if m == nil {
		return func() {}
	}
	g := m.inFlight.WithLabelValues(string(role), service)
	g.Inc()
	return g.Dec
}

func (m *Metrics) done(role Role, service, provider string, code int, method string, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(string(role), service, provider, strconv.Itoa(code), normMethod(method)).Inc()
	m.duration.WithLabelValues(string(role), service).Observe(d.Seconds())
}

func (m *Metrics) retried(service string) {
	if m != nil {
		m.retries.WithLabelValues(service).Inc()
	}
}

func (m *Metrics) ejected(service, provider string) {
	if m != nil {
		m.ejections.WithLabelValues(service, provider).Inc()
	}
}

// forget drops the series of a service that is gone, so that labels
// follow the map.
func (m *Metrics) forget(service string) {
	if m == nil {
		return
	}
	l := prometheus.Labels{"service": service}
	m.requests.DeletePartialMatch(l)
	m.duration.DeletePartialMatch(l)
	m.retries.DeletePartialMatch(l)
	m.ejections.DeletePartialMatch(l)
	m.inFlight.DeletePartialMatch(l)
}
