package coordinator

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/metricsserver"
	"github.com/meshlink/meshlink/relay"
)

// metrics are the coordinator's Prometheus metrics. Each Server has its own
// registry, so that several servers in one process (tests, embedding
// programs) never collide. Most values are read at scrape time from state
// the server keeps anyway (the map snapshot, the hub, the relay's
// counters), which costs the hot paths nothing; only events that leave no
// statistic behind are counted as they happen.
type metrics struct {
	reg           *prometheus.Registry
	registrations *prometheus.CounterVec // by result
	mapUpdates    prometheus.Counter
	mapLatency    prometheus.Histogram
	denied        *prometheus.CounterVec // by service
	wakeups       *prometheus.CounterVec // by result: woken, skipped
}

// latencyBuckets span a change fanned out on loopback (sub-millisecond) to
// a slow or congested stream (seconds).
var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_coordinator_registrations_total",
			Help: "Node registrations by result: ok, or the error code returned (token_invalid, token_expired, token_used, name_in_use, conflict, bad_request, version, internal).",
		}, []string{"result"}),
		mapUpdates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlink_coordinator_netmap_updates_sent_total",
			Help: "Network map updates (full maps and deltas, not keep-alives) written to map streams.",
		}),
		mapLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshlink_coordinator_netmap_update_latency_seconds",
			Help:    "Time from a change being committed to the update carrying it being written on a map stream (the newest change, when several coalesce into one update).",
			Buckets: latencyBuckets,
		}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_coordinator_connections_denied_total",
			Help: "Connections providers reported refusing by policy, by service (only reports that passed validation: a service the provider provides, a source node of the mesh).",
		}, []string{"service"}),
		wakeups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_coordinator_map_stream_wakeups_total",
			Help: "Map streams looked at when the network map changed, by result: woken (the change concerns the stream's node, or the stream was busy sending) or skipped (nothing of its map changed: recorded as sent without waking it).",
		}, []string{"result"}),
	}
	// Seen from the first scrape, so that rate() works from the first
	// success on.
	m.registrations.WithLabelValues("ok")
	m.wakeups.WithLabelValues("woken")
	m.wakeups.WithLabelValues("skipped")
	m.reg.MustRegister(m.registrations, m.mapUpdates, m.mapLatency, m.denied, m.wakeups, serverCollector{s},
		relay.NewCollector("meshlink_coordinator_relay", s.relay),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// countRegistrations counts each answer on PathRegister by its outcome:
// "ok" (also for a node told to wait for approval) or the wire error code,
// a small fixed set. Approvals in the console are not counted.
func (m *metrics) countRegistrations(f handlerFunc) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) *apiError {
		e := f(w, r)
		result := "ok"
		if e != nil {
			result = e.Code
		}
		m.registrations.WithLabelValues(result).Inc()
		return e
	}
}

// mapSent records an update written on a map stream; changed is when the
// newest change it carries was committed (zero if unknown).
func (m *metrics) mapSent(changed time.Time) {
	m.mapUpdates.Inc()
	if !changed.IsZero() {
		m.mapLatency.Observe(time.Since(changed).Seconds())
	}
}

// startMetrics serves /metrics from the server's registry until Close;
// nil when metrics are off.
func (s *Server) startMetrics() (*metricsserver.Server, error) {
	if metricsserver.Off(s.cfg.MetricsListen) {
		return nil, nil
	}
	return metricsserver.Start(s.ctx, metricsserver.Config{
		Addr: s.cfg.MetricsListen, Gatherer: s.metrics.reg, Logger: s.log,
		Subsystem: "coordinator", Flag: "--metrics-listen",
	})
}

// MetricsAddr is the address /metrics is served on, valid after Start;
// zero when metrics are off.
func (s *Server) MetricsAddr() netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.metricsSrv.Addr()
}

func (h *hub) streamCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.streams)
}

var (
	descNodes = prometheus.NewDesc("meshlink_coordinator_nodes",
		"Registered nodes by state: online (its map stream is open) or offline.", []string{"state"}, nil)
	descServices = prometheus.NewDesc("meshlink_coordinator_services",
		"Services with at least one provider, as put into network maps.", nil, nil)
	descMapStreams = prometheus.NewDesc("meshlink_coordinator_map_streams",
		"Map streams open now.", nil, nil)
	descEventsDropped = prometheus.NewDesc("meshlink_coordinator_events_dropped_total",
		"Event log entries dropped because the queue in front of the store was full, or their write failed.", nil, nil)
	descStoreTx = prometheus.NewDesc("meshlink_coordinator_store_write_transactions_total",
		"Write transactions the store committed (SQLite: each holds every write that was queued).", nil, nil)
	descStoreWrites = prometheus.NewDesc("meshlink_coordinator_store_writes_total",
		"Writes those transactions held.", nil, nil)
)

// serverCollector reads the server's state at scrape time.
type serverCollector struct{ s *Server }

func (c serverCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNodes, descServices, descMapStreams, descEventsDropped, descStoreTx, descStoreWrites} {
		ch <- d
	}
}

func (c serverCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	// The snapshot is shared with the map streams and rebuilt only after a
	// change, so a scrape rarely touches the store.
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	snap, err := s.current(ctx)
	cancel()
	if err != nil {
		err = fmt.Errorf("coordinator: read nodes for metrics: %w", err)
		ch <- prometheus.NewInvalidMetric(descNodes, err)
		ch <- prometheus.NewInvalidMetric(descServices, err)
	} else {
		var online int
		for _, n := range snap.nodes {
			if n.Online {
				online++
			}
		}
		ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, float64(online), "online")
		ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, float64(len(snap.nodes)-online), "offline")
		ch <- prometheus.MustNewConstMetric(descServices, prometheus.GaugeValue, float64(len(snap.services)))
	}
	ch <- prometheus.MustNewConstMetric(descMapStreams, prometheus.GaugeValue, float64(s.hub.streamCount()))
	if q, ok := s.store.(store.EventQueuer); ok {
		ch <- prometheus.MustNewConstMetric(descEventsDropped, prometheus.CounterValue, float64(q.EventsDropped()))
	}
	if w, ok := s.store.(store.WriteStats); ok {
		tx, n := w.WriteBatches()
		ch <- prometheus.MustNewConstMetric(descStoreTx, prometheus.CounterValue, float64(tx))
		ch <- prometheus.MustNewConstMetric(descStoreWrites, prometheus.CounterValue, float64(n))
	}

}
