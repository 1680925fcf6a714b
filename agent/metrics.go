package agent

import (
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshlink/meshlink/agent/httpauth"
	"github.com/meshlink/meshlink/agent/httpmesh"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/metricsserver"
	"github.com/meshlink/meshlink/wire"
)

// metricsServer serves the agent's Prometheus metrics at /metrics. Its
// registry belongs to the agent, so that agents in one process (tests, the
// in-process harness) never collide. Everything but the map latency is read
// at scrape time from Status and Services, which the agent keeps anyway:
// the data path pays nothing for metrics.
type metricsServer struct {
	mapLatency prometheus.Histogram
	srv        *metricsserver.Server
}

// startMetrics listens on cfg.Metrics and serves /metrics until Close. It
// does nothing when metrics are off ("" or "off").
func (a *Agent) startMetrics() error {
	if metricsserver.Off(a.cfg.Metrics) {
		return nil
	}
	m := &metricsServer{
		mapLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshlink_agent_netmap_update_latency_seconds",
			Help:    "Time from the coordinator writing a network map update to this agent applying it (clocks of both hosts included).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.mapLatency, agentCollector{a},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if a.httpMetrics == nil {
		a.httpMetrics = httpmesh.NewMetrics()
	}
	reg.MustRegister(a.httpMetrics.Collectors()...)
	if a.httpAuth == nil {
		a.httpAuth = httpauth.NewSet(httpauth.SetConfig{Logger: a.log.With("subsystem", "httpauth")})
	}
	reg.MustRegister(a.httpAuth.Collector())
	srv, err := metricsserver.Start(a.ctx, metricsserver.Config{
		Addr: a.cfg.Metrics, Gatherer: reg, Logger: a.log.With("subsystem", "metrics"),
		Subsystem: "agent", Flag: "--metrics", ShutdownTimeout: 2 * time.Second,
	})
	if err != nil {
		return err
	}
	m.srv = srv
	a.metrics = m
	return nil
}

// close stops serving and waits for the server; nil-safe and idempotent
// through Agent.Close.
func (m *metricsServer) close() {
	if m == nil {
		return
	}
	m.srv.Close()
}

// observeMap records how long map update m took to arrive.
func (m *metricsServer) observeMap(u *wire.MapResponse) {
	if m == nil || u.SentAt.IsZero() {
		return
	}
	// Clocks of two hosts: a skewed one must not record a negative latency.
	m.mapLatency.Observe(max(time.Since(u.SentAt), 0).Seconds())
}

// MetricsAddr is the address /metrics is served on; zero when metrics are
// off or before Start.
func (a *Agent) MetricsAddr() netip.AddrPort {
	if a.metrics == nil {
		return netip.AddrPort{}
	}
	return a.metrics.srv.Addr()
}

var (
	descConnected = prometheus.NewDesc("meshlink_agent_coordinator_connected",
		"1 while the map stream to the coordinator is up, else 0.", nil, nil)
	descPeers = prometheus.NewDesc("meshlink_agent_peers",
		"Peers by the path WireGuard packets take to them: direct, relay, or none yet.", []string{"path"}, nil)
	descPeerPathBytes = prometheus.NewDesc("meshlink_agent_peer_bytes_total",
		"WireGuard packet bytes exchanged with a peer (both directions) by path: direct UDP or the relay.", []string{"peer", "path"}, nil)
	descPeerWGBytes = prometheus.NewDesc("meshlink_agent_peer_wireguard_bytes_total",
		"WireGuard bytes with a peer by direction as WireGuard counts them: rx (received) or tx (sent). Reset when the peer is reconfigured.", []string{"peer", "direction"}, nil)
	descSvcConns = prometheus.NewDesc("meshlink_agent_service_connections_total",
		"Connections opened through a service: role consumer (local clients of a consumed service) or provider (mesh clients of an exported one).", []string{"service", "role"}, nil)
	descSvcOpen = prometheus.NewDesc("meshlink_agent_service_connections_open",
		"Connections open now through a service, by role.", []string{"service", "role"}, nil)
	descSvcBytes = prometheus.NewDesc("meshlink_agent_service_bytes_total",
		"Bytes carried through a service by role and direction: sent (from the client toward the service) or received (back to the client).", []string{"service", "role", "direction"}, nil)
	descSvcDialFail = prometheus.NewDesc("meshlink_agent_service_dial_failures_total",
		"Connections that failed to open, by role: consumer (no provider reachable) or provider (the local target refused or timed out).", []string{"service", "role"}, nil)
	descProvSelected = prometheus.NewDesc("meshlink_agent_provider_selected_total",
		"Connections of a consumed service that a provider took (after the choice by health, priority, split, weight and load).", []string{"service", "provider"}, nil)
	descProvHealth = prometheus.NewDesc("meshlink_agent_provider_health",
		"1 while new connections of a consumed service may go to the provider (healthy and answering), else 0.", []string{"service", "provider"}, nil)
	descSvcDenied = prometheus.NewDesc("meshlink_agent_service_denied_total",
		"Connections to an exported service refused by policy (the same count as meshlink_agent_connections_denied_total).", []string{"service"}, nil)
	descConnDenied = prometheus.NewDesc("meshlink_agent_connections_denied_total",
		"Inbound connections to an exported service refused by policy: the source node is not among the service's allowed nodes in the network map.", []string{"service"}, nil)
	descUDPFlows = prometheus.NewDesc("meshlink_agent_udp_flows",
		"UDP flows open now through a service, by role: consumer (one per local client address) or provider (one per consumer socket).", []string{"service", "role"}, nil)
	descUDPFlowsTotal = prometheus.NewDesc("meshlink_agent_udp_flows_total",
		"UDP flows opened through a service, by role.", []string{"service", "role"}, nil)
	descUDPDatagrams = prometheus.NewDesc("meshlink_agent_udp_datagrams_total",
		"UDP datagrams carried through a service by role and direction: sent (from the client toward the target) or received (back).", []string{"service", "role", "direction"}, nil)
	descUDPDropped = prometheus.NewDesc("meshlink_agent_udp_dropped_total",
		"UDP datagrams of a service not carried, by role: no provider, denied by policy (provider), over the flow bound, or a failed send.", []string{"service", "role"}, nil)
	descUDPEvicted = prometheus.NewDesc("meshlink_agent_udp_flows_evicted_total",
		"UDP flows a consumer closed to make room for a new client address (the least recently active of a full flow table).", []string{"service"}, nil)
	descAccessLogDropped = prometheus.NewDesc("meshlink_http_access_log_dropped_total",
		"Access-log lines dropped because the writer was behind by more than its buffer (--access-log).", nil, nil)
	descHTTPEdgesOverflow = prometheus.NewDesc("meshlink_http_console_edges_overflow_total",
		"HTTP requests left out of the console's figures because the agent already counts the most edges (service, role, peer) it reports.", nil, nil)
)

// agentCollector reads Status and Services at scrape time. Labels are peer
// and service names only, so cardinality follows the mesh's size.
type agentCollector struct{ a *Agent }

func (c agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnected, descPeers, descPeerPathBytes, descPeerWGBytes,
		descSvcConns, descSvcOpen, descSvcBytes, descSvcDialFail, descSvcDenied, descConnDenied, descProvSelected, descProvHealth,
		descUDPFlows, descUDPFlowsTotal, descUDPDatagrams, descUDPDropped, descUDPEvicted, descAccessLogDropped, descHTTPEdgesOverflow} {
		ch <- d
	}
}

func (c agentCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	st := c.a.Status()
	connected := 0.0
	if st.Coordinator.Connected {
		connected = 1
	}
	gauge(descConnected, connected)
	paths := map[string]int{"direct": 0, "relay": 0, "none": 0}
	seen := map[string]bool{}
	for _, p := range st.Peers {
		path := p.Path
		if _, ok := paths[path]; !ok {
			path = "none"
		}
		paths[path]++
		// Names are unique in a mesh; a duplicate during a rename would
		// make the whole scrape fail, so only the first is reported.
		if seen[p.Name] {
			continue
		}
		seen[p.Name] = true
		counter(descPeerPathBytes, float64(p.DirectBytes), p.Name, "direct")
		counter(descPeerPathBytes, float64(p.RelayedBytes), p.Name, "relay")
		counter(descPeerWGBytes, float64(p.RxBytes), p.Name, "rx")
		counter(descPeerWGBytes, float64(p.TxBytes), p.Name, "tx")
	}
	for path, n := range paths {
		gauge(descPeers, float64(n), path)
	}

	svcs := c.a.Services()
	service := func(name, role string, total, open, sent, received, failed int64) {
		counter(descSvcConns, float64(total), name, role)
		gauge(descSvcOpen, float64(open), name, role)
		counter(descSvcBytes, float64(sent), name, role, "sent")
		counter(descSvcBytes, float64(received), name, role, "received")
		counter(descSvcDialFail, float64(failed), name, role)
	}
	udp := func(name, role string, u *localapi.UDPStats) {
		if u == nil {
			return
		}
		gauge(descUDPFlows, float64(u.Flows), name, role)
		counter(descUDPFlowsTotal, float64(u.FlowsTotal), name, role)
		counter(descUDPDatagrams, float64(u.Sent), name, role, "sent")
		counter(descUDPDatagrams, float64(u.Received), name, role, "received")
		counter(descUDPDropped, float64(u.Dropped), name, role)
		if role == "consumer" {
			counter(descUDPEvicted, float64(u.Evicted), name)
		}
	}
	for _, s := range svcs.Consumed {
		service(s.Name, "consumer", s.Total, s.Open, s.Sent, s.Received, s.Failed)
		udp(s.Name, "consumer", s.UDP)
		seen := map[string]bool{}
		for _, p := range s.Providers {
			if seen[p.Name] {
				continue
			}
			seen[p.Name] = true
			counter(descProvSelected, float64(p.Selected), s.Name, p.Name)
			h := 0.0
			if p.Healthy {
				h = 1
			}
			gauge(descProvHealth, h, s.Name, p.Name)
		}
	}
	if h := c.a.httpObs; h != nil {
		if h.log != nil {
			counter(descAccessLogDropped, float64(h.log.Dropped()))
		}
		counter(descHTTPEdgesOverflow, float64(h.obs.Stats().Overflow()))
	}
	for _, e := range svcs.Exported {
		service(e.Name, "provider", e.Total, e.Open, e.Sent, e.Received, e.Failed)
		udp(e.Name, "provider", e.UDP)
		counter(descSvcDenied, float64(e.Denied), e.Name)
		counter(descConnDenied, float64(e.Denied), e.Name)
	}
}
