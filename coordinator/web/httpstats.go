package web

import (
	"cmp"
	"slices"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// The console's live HTTP figures are differences between two reports of
// a node's totals: the newest, and the oldest one still within httpWindow
// of it. A node keeps at most maxHTTPSamples reports, so one that reports
// very often gets a shorter window.
const (
	httpWindow     = time.Minute
	maxHTTPSamples = 32
)

type httpSample struct {
	at   time.Time
	http []wire.HTTPStats
}

// addHTTPSample returns samples with s appended, less those no longer
// needed: it keeps one sample at or before the window's start. It never
// changes samples' array, which copies of the stats may still read.
func addHTTPSample(samples []httpSample, s httpSample) []httpSample {
	start := s.at.Add(-httpWindow)
	i := 0
	for i+1 < len(samples) && !samples[i+1].at.After(start) {
		i++
	}
	samples = samples[i:]
	if len(samples) >= maxHTTPSamples {
		samples = samples[len(samples)-maxHTTPSamples+1:]
	}
	out := make([]httpSample, 0, len(samples)+1)
	return append(append(out, samples...), s)
}

// ViewHTTP are the HTTP figures of a service, one of its ends, or one
// edge. Requests and Errors are totals since the agents started; the rest
// are over the last Window seconds (0 while the coordinator has only one
// report: then P50MS and P99MS come from the totals and there is no rate).
type ViewHTTP struct {
	Requests  int64   `json:"requests"`
	Errors    int64   `json:"errors"`
	Window    float64 `json:"window_s"`
	RPS       float64 `json:"rps"`
	ErrorRate float64 `json:"error_rate"`
	P50MS     float64 `json:"p50_ms"`
	P99MS     float64 `json:"p99_ms"`
	// Over says p99 is past the last bucket bound (10 s): at least that.
	Over bool `json:"p99_over,omitempty"`
}

// ViewEdge is one consumer site's requests to one provider site of a
// service, as the consumer reported them (or the provider, when the
// viewer does not see the consumer's report).
type ViewEdge struct {
	Service      string      `json:"service"`
	Consumer     wire.NodeID `json:"consumer"`
	ConsumerName string      `json:"consumer_name"`
	Provider     wire.NodeID `json:"provider"`
	ProviderName string      `json:"provider_name"`
	// ReportedBy is the role of the node whose figures these are.
	ReportedBy wire.ServiceRole `json:"reported_by"`
	ViewHTTP
}

// httpFigures accumulates one edge's or several edges' window.
type httpFigures struct {
	requests, errors int64 // totals
	dReq, dErr       int64 // in the window
	buckets          [wire.HTTPBuckets]int64
	window           time.Duration // 0: no window, buckets hold totals
}

func (f *httpFigures) add(g *httpFigures) {
	f.requests += g.requests
	f.errors += g.errors
	f.dReq += g.dReq
	f.dErr += g.dErr
	for i := range f.buckets {
		f.buckets[i] += g.buckets[i]
	}
	// Several nodes' windows differ a little; the longest stands for all.
	f.window = max(f.window, g.window)
}

// view turns f into what the console shows. The rate of a sum of edges is
// the sum of their rates.
func (f *httpFigures) view(rps float64) ViewHTTP {
	v := ViewHTTP{Requests: f.requests, Errors: f.errors, Window: f.window.Seconds(), RPS: rps}
	if f.dReq > 0 {
		v.ErrorRate = float64(f.dErr) / float64(f.dReq)
	}
	v.P50MS, _ = quantileMS(f.buckets[:], 0.5)
	v.P99MS, v.Over = quantileMS(f.buckets[:], 0.99)
	return v
}

func (f *httpFigures) rps() float64 {
	if f.window <= 0 {
		return 0
	}
	return float64(f.dReq) / f.window.Seconds()
}

// quantileMS estimates the q-quantile of the durations counted in buckets
// (wire.HTTPLatencyBounds), in milliseconds, interpolating linearly inside
// a bucket as Prometheus' histogram_quantile does; over says it fell in the
// last, unbounded bucket (the result is then the last bound). 0 for no
// requests.
func quantileMS(buckets []int64, q float64) (ms float64, over bool) {
	var total int64
	for _, b := range buckets {
		total += b
	}
	if total == 0 {
		return 0, false
	}
	rank := q * float64(total)
	var cum int64
	for i, b := range buckets {
		if b == 0 || float64(cum+b) < rank {
			cum += b
			continue
		}
		if i == len(wire.HTTPLatencyBounds) {
			return msOf(wire.HTTPLatencyBounds[i-1]), true
		}
		lo := 0.0
		if i > 0 {
			lo = msOf(wire.HTTPLatencyBounds[i-1])
		}
		hi := msOf(wire.HTTPLatencyBounds[i])
		return lo + (hi-lo)*(rank-float64(cum))/float64(b), false
	}
	return msOf(wire.HTTPLatencyBounds[len(wire.HTTPLatencyBounds)-1]), true
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

type httpEdgeKey struct {
	service            string
	consumer, provider wire.NodeID
}

// httpEdges computes every edge's figures from the nodes' samples, keyed
// by (service, consumer, provider). An edge both ends report is taken from
// its consumer: what the app saw, the mesh's own latency included. Only
// the samples of nodes that report(id) allows count.
func httpEdges(stats map[wire.NodeID]nodeStats, report func(wire.NodeID) bool) (map[httpEdgeKey]*httpFigures, map[httpEdgeKey]wire.ServiceRole) {
	figs := map[httpEdgeKey]*httpFigures{}
	by := map[httpEdgeKey]wire.ServiceRole{}
	for id, st := range stats {
		if !report(id) || len(st.http) == 0 {
			continue
		}
		newest := st.http[len(st.http)-1]
		base := st.http[0]
		window := newest.at.Sub(base.at)
		old := map[httpEdgeKey]*wire.HTTPStats{}
		if window > 0 {
			for i := range base.http {
				h := &base.http[i]
				old[edgeKeyOf(id, h)] = h
			}
		}
		for i := range newest.http {
			h := &newest.http[i]
			k := edgeKeyOf(id, h)
			if prev, ok := by[k]; ok && (prev == wire.RoleConsumer || h.Role == wire.RoleProvider) {
				continue // the consumer's report of this edge wins
			}
			f := &httpFigures{requests: h.Requests, errors: h.Errors}
			if window > 0 {
				f.window = window
				p := old[k]
				if p != nil && p.Requests <= h.Requests && len(p.Buckets) == len(h.Buckets) {
					f.dReq, f.dErr = h.Requests-p.Requests, max(h.Errors-p.Errors, 0)
					for j := range f.buckets {
						f.buckets[j] = max(h.Buckets[j]-p.Buckets[j], 0)
					}
				} else {
					// New in the window, or the agent restarted: all of
					// its counts are recent.
					f.dReq, f.dErr = h.Requests, h.Errors
					copy(f.buckets[:], h.Buckets)
				}
			} else {
				f.dReq, f.dErr = h.Requests, h.Errors
				copy(f.buckets[:], h.Buckets)
			}
			figs[k], by[k] = f, h.Role
		}
	}
	return figs, by
}

func edgeKeyOf(reporter wire.NodeID, h *wire.HTTPStats) httpEdgeKey {
	if h.Role == wire.RoleConsumer {
		return httpEdgeKey{h.Service, reporter, h.Peer}
	}
	return httpEdgeKey{h.Service, h.Peer, reporter}
}

// addHTTP fills snap's HTTP figures: per edge, per service and per end.
func (c *Console) addHTTP(snap *Snapshot, stats map[wire.NodeID]nodeStats, visible func(wire.NodeID) bool, names map[wire.NodeID]string, online map[wire.NodeID]bool) {
	figs, by := httpEdges(stats, visible)
	if len(figs) == 0 {
		return
	}
	type endKey struct {
		service string
		node    wire.NodeID
	}
	service, prov, cons := map[string]*httpFigures{}, map[endKey]*httpFigures{}, map[endKey]*httpFigures{}
	rps := map[any]float64{}
	sum := func(m map[string]*httpFigures, k string, f *httpFigures) {
		if m[k] == nil {
			m[k] = &httpFigures{}
		}
		m[k].add(f)
		rps[k] += f.rps()
	}
	sumEnd := func(m map[endKey]*httpFigures, k endKey, role string, f *httpFigures) {
		if m[k] == nil {
			m[k] = &httpFigures{}
		}
		m[k].add(f)
		rps[[2]any{role, k}] += f.rps()
	}
	for k, f := range figs {
		sum(service, k.service, f)
		sumEnd(prov, endKey{k.service, k.provider}, "p", f)
		sumEnd(cons, endKey{k.service, k.consumer}, "c", f)
		if !visible(k.consumer) || !visible(k.provider) {
			continue
		}
		snap.Edges = append(snap.Edges, ViewEdge{Service: k.service, Consumer: k.consumer, ConsumerName: names[k.consumer],
			Provider: k.provider, ProviderName: names[k.provider], ReportedBy: by[k], ViewHTTP: f.view(f.rps())})
	}
	slices.SortFunc(snap.Edges, func(a, b ViewEdge) int {
		return cmp.Or(cmp.Compare(a.Service, b.Service), cmp.Compare(a.ConsumerName, b.ConsumerName), cmp.Compare(a.ProviderName, b.ProviderName))
	})
	for i := range snap.Services {
		vs := &snap.Services[i]
		if f := service[vs.Name]; f != nil {
			v := f.view(rps[vs.Name])
			vs.HTTP = &v
		}
		for j := range vs.Providers {
			k := endKey{vs.Name, vs.Providers[j].Node}
			if f := prov[k]; f != nil {
				v := f.view(rps[[2]any{"p", k}])
				vs.Providers[j].HTTP = &v
			}
		}
		listed := map[wire.NodeID]bool{}
		for j := range vs.Consumers {
			listed[vs.Consumers[j].Node] = true
			k := endKey{vs.Name, vs.Consumers[j].Node}
			if f := cons[k]; f != nil {
				v := f.view(rps[[2]any{"c", k}])
				vs.Consumers[j].HTTP = &v
			}
		}
		// A consumer whose connection counters did not list the service
		// still shows, by its requests.
		var extra []ViewEnd
		for k, f := range cons {
			if k.service != vs.Name || listed[k.node] || !visible(k.node) {
				continue
			}
			v := f.view(rps[[2]any{"c", k}])
			extra = append(extra, ViewEnd{Node: k.node, Name: names[k.node], Online: online[k.node], HTTP: &v})
		}
		slices.SortFunc(extra, func(a, b ViewEnd) int { return cmp.Compare(a.Name, b.Name) })
		vs.Consumers = append(vs.Consumers, extra...)
	}
}
