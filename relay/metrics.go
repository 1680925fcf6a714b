package relay

import "github.com/prometheus/client_golang/prometheus"

// Collector exports a Server's counters to Prometheus, read at scrape time.
// prefix names the metrics: "meshlink_coordinator_relay" for the embedded
// relay, "meshlink_relay" for a standalone one.
type Collector struct {
	s                                                 *Server
	clients, conns, packets, bytes, dropped, peerGone *prometheus.Desc
	queueDropped, queued, queuedPeak                  *prometheus.Desc
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
		queueDropped: prometheus.NewDesc(prefix+"_queue_dropped_packets_total",
			"Packets dropped because the receiver's queue or the relay's total queue budget was full (part of dropped).", nil, nil),
		queued:     prometheus.NewDesc(prefix+"_queued_bytes", "Buffer memory held by the outbound queues of all relay connections now.", nil, nil),
		queuedPeak: prometheus.NewDesc(prefix+"_queued_bytes_peak", "Highest buffer memory held by the outbound queues since start.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.clients, c.conns, c.packets, c.bytes, c.dropped, c.peerGone, c.queueDropped, c.queued, c.queuedPeak} {
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
	ch <- prometheus.MustNewConstMetric(c.queueDropped, prometheus.CounterValue, float64(st.QueueDropped))
	ch <- prometheus.MustNewConstMetric(c.queued, prometheus.GaugeValue, float64(st.QueuedBytes))
	ch <- prometheus.MustNewConstMetric(c.queuedPeak, prometheus.GaugeValue, float64(st.QueuedBytesPeak))
}
