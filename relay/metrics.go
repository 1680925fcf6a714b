package relay

import "github.com/prometheus/client_golang/prometheus"

// Collector exports a Server's counters to Prometheus, read at scrape time.
// prefix names the metrics: "meshlink_coordinator_relay" for the embedded
// relay, "meshlink_relay" for a standalone one.
type Collector struct {
	s                                                 *Server
	clients, conns, packets, bytes, dropped, peerGone *prometheus.Desc
}

// NewCollector returns a Collector of s's counters.
func NewCollector(prefix string, s *Server) *Collector {
	return &Collector{
		s:        s,
		clients:  prometheus.NewDesc(prefix+"_clients", "Nodes connected to the relay now.", nil, nil),
		conns:    prometheus.NewDesc(prefix+"_connections_total", "Relay connections accepted.", nil, nil),
		packets:  prometheus.NewDesc(prefix+"_packets_total", "Packets relayed between nodes.", nil, nil),
		bytes:    prometheus.NewDesc(prefix+"_bytes_total", "Packet bytes relayed between nodes (framing excluded).", nil, nil),
		dropped:  prometheus.NewDesc(prefix+"_dropped_packets_total", "Packets the relay dropped: destination not connected, queue full, or refused by policy.", nil, nil),
		peerGone: prometheus.NewDesc(prefix+"_peer_gone_packets_total", "Dropped packets whose destination was not connected to the relay (part of dropped).", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.clients, c.conns, c.packets, c.bytes, c.dropped, c.peerGone} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	ch <- prometheus.MustNewConstMetric(c.clients, prometheus.GaugeValue, float64(st.Clients))
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.CounterValue, float64(st.Accepted))
	ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.PacketsRelayed))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.BytesRelayed))
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(st.Dropped))
	ch <- prometheus.MustNewConstMetric(c.peerGone, prometheus.CounterValue, float64(st.PeerGone))
}
