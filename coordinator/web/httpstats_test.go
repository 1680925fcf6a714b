package web

import (
	"math"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// hist makes an HTTPStats entry with n requests of duration d each added
// to base.
func hist(base wire.HTTPStats, n int64, d time.Duration, errs int64) wire.HTTPStats {
	h := base
	h.Buckets = append(make([]int64, 0, wire.HTTPBuckets), base.Buckets...)
	if len(h.Buckets) == 0 {
		h.Buckets = make([]int64, wire.HTTPBuckets)
	}
	h.Buckets[wire.HTTPBucket(d)] += n
	h.Requests += n
	h.Errors += errs
	return h
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-6*max(1, math.Abs(b)) }

func TestQuantileMS(t *testing.T) {
	b := make([]int64, wire.HTTPBuckets)
	if q, _ := quantileMS(b, 0.5); q != 0 {
		t.Errorf("no requests: %v", q)
	}
	// 100 requests in (5ms, 10ms]: p50 is half-way, 7.5ms; p99 9.95ms.
	b[wire.HTTPBucket(7*time.Millisecond)] = 100
	if q, _ := quantileMS(b, 0.5); !near(q, 7.5) {
		t.Errorf("p50 %v, want 7.5", q)
	}
	if q, _ := quantileMS(b, 0.99); !near(q, 9.95) {
		t.Errorf("p99 %v, want 9.95", q)
	}
	// 98 fast ones and 2 past the last bound: p50 in the first bucket,
	// p99 "at least 10 s".
	b = make([]int64, wire.HTTPBuckets)
	b[0], b[wire.HTTPBuckets-1] = 98, 2
	if q, over := quantileMS(b, 0.5); !near(q, 50.0/98) || over {
		t.Errorf("p50 %v %v", q, over)
	}
	if q, over := quantileMS(b, 0.99); q != 10000 || !over {
		t.Errorf("p99 %v %v, want 10000 and over", q, over)
	}
}

func TestAddHTTPSampleKeepsTheWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var s []httpSample
	for i := range 20 {
		s = addHTTPSample(s, httpSample{at: t0.Add(time.Duration(i) * 10 * time.Second)})
	}
	// Newest at 190s: keep the one at 130s (the window's start) and after.
	if len(s) != 7 || !s[0].at.Equal(t0.Add(130*time.Second)) {
		t.Fatalf("%d samples from %v", len(s), s[0].at.Sub(t0))
	}
	// A node reporting every 100ms keeps maxHTTPSamples only.
	s = nil
	for i := range 100 {
		s = addHTTPSample(s, httpSample{at: t0.Add(time.Duration(i) * 100 * time.Millisecond)})
	}
	if len(s) != maxHTTPSamples {
		t.Fatalf("%d samples", len(s))
	}
	// The slice a reader holds is never changed under it.
	held := s
	first := held[0].at
	s = addHTTPSample(s, httpSample{at: t0.Add(time.Hour)})
	if !held[0].at.Equal(first) || len(s) != 2 {
		t.Errorf("held sample changed or window wrong: %v, %d", held[0].at, len(s))
	}
}

// TestHTTPAggregation: two consumers (a, b) of web, one provider (p).
// a's edge is reported by both ends (the consumer's figures win), b's by
// the provider only. Rates, error rates and quantiles come from the
// window between two reports; service and end figures sum the edges.
func TestHTTPAggregation(t *testing.T) {
	const a, b, p = wire.NodeID(1), wire.NodeID(2), wire.NodeID(3)
	t0 := time.Unix(5000, 0)
	edge := func(role wire.ServiceRole, peer wire.NodeID) wire.HTTPStats {
		return wire.HTTPStats{Service: "web", Role: role, Peer: peer}
	}
	// Before the window: a sent 1000 requests at 1ms (p saw them too).
	a0 := hist(edge(wire.RoleConsumer, p), 1000, time.Millisecond, 0)
	pa0 := hist(edge(wire.RoleProvider, a), 1000, 500*time.Microsecond, 0)
	pb0 := hist(edge(wire.RoleProvider, b), 10, time.Millisecond, 0)
	// In 10 s: a sends 200 more, 100 at 7ms and 100 at 70ms, 20 failing;
	// b 50 at 20ms, 5 failing.
	a1 := hist(hist(a0, 100, 7*time.Millisecond, 10), 100, 70*time.Millisecond, 10)
	pa1 := hist(pa0, 200, 3*time.Millisecond, 20)
	pb1 := hist(pb0, 50, 20*time.Millisecond, 5)

	stats := map[wire.NodeID]nodeStats{}
	for id, ss := range map[wire.NodeID][2][]wire.HTTPStats{a: {{a0}, {a1}}, p: {{pa0, pb0}, {pa1, pb1}}} {
		var s []httpSample
		s = addHTTPSample(s, httpSample{at: t0, http: ss[0]})
		s = addHTTPSample(s, httpSample{at: t0.Add(10 * time.Second), http: ss[1]})
		stats[id] = nodeStats{http: s}
	}
	for _, h := range append([]wire.HTTPStats{a1, pa1, pb1}, a0) {
		if err := h.Check(); err != nil {
			t.Fatal(err)
		}
	}
	names := map[wire.NodeID]string{a: "a", b: "b", p: "p"}
	all := func(wire.NodeID) bool { return true }
	snap := &Snapshot{Services: []ViewService{{Name: "web", Providers: []ViewEnd{{Node: p}}, Consumers: []ViewEnd{{Node: a}, {Node: b}}}}}
	(&Console{}).addHTTP(snap, stats, all, names, nil)

	if len(snap.Edges) != 2 {
		t.Fatalf("edges %+v", snap.Edges)
	}
	ea, eb := snap.Edges[0], snap.Edges[1]
	if ea.ConsumerName != "a" || ea.ProviderName != "p" || ea.ReportedBy != wire.RoleConsumer {
		t.Errorf("edge a: %+v", ea)
	}
	if !near(ea.RPS, 20) || !near(ea.ErrorRate, 0.1) || ea.Requests != 1200 || ea.Errors != 20 || ea.Window != 10 {
		t.Errorf("edge a figures: %+v", ea.ViewHTTP)
	}
	// p50 of the window: 100 in (5,10], 100 in (50,100]: rank 100 ends
	// the first: 10ms. p99: rank 198 of the second bucket: 50+50*98/100.
	if !near(ea.P50MS, 10) || !near(ea.P99MS, 99) {
		t.Errorf("edge a quantiles p50 %v p99 %v", ea.P50MS, ea.P99MS)
	}
	if eb.ConsumerName != "b" || eb.ReportedBy != wire.RoleProvider || !near(eb.RPS, 5) || !near(eb.ErrorRate, 0.1) {
		t.Errorf("edge b: %+v", eb)
	}
	sv := snap.Services[0].HTTP
	if sv == nil || !near(sv.RPS, 25) || !near(sv.ErrorRate, 25.0/250) || sv.Requests != 1260 {
		t.Fatalf("service figures %+v", sv)
	}
	if pv := snap.Services[0].Providers[0].HTTP; pv == nil || !near(pv.RPS, 25) {
		t.Errorf("provider end %+v", pv)
	}
	if cv := snap.Services[0].Consumers[1].HTTP; cv == nil || !near(cv.RPS, 5) || !near(cv.P50MS, 17.5) {
		t.Errorf("consumer b end %+v", cv)
	}

	// Consumers that only their requests name are listed too.
	snap = &Snapshot{Services: []ViewService{{Name: "web", Providers: []ViewEnd{{Node: p}}}}}
	(&Console{}).addHTTP(snap, stats, all, names, map[wire.NodeID]bool{a: true})
	if cs := snap.Services[0].Consumers; len(cs) != 2 || cs[0].Name != "a" || !cs[0].Online || cs[1].Name != "b" || cs[0].HTTP == nil {
		t.Errorf("consumers from requests: %+v", cs)
	}

	// A viewer who sees only a and p: b's edge is summed into the
	// service but not listed, since it names b.
	snap = &Snapshot{Services: []ViewService{{Name: "web"}}}
	(&Console{}).addHTTP(snap, stats, func(id wire.NodeID) bool { return id != b }, names, nil)
	if len(snap.Edges) != 1 || snap.Edges[0].ConsumerName != "a" {
		t.Errorf("edges for a viewer without b: %+v", snap.Edges)
	}

	// An agent restart (totals below the last report) counts its new
	// totals as the window's.
	s := stats[a].http
	s = addHTTPSample(s, httpSample{at: t0.Add(20 * time.Second), http: []wire.HTTPStats{hist(edge(wire.RoleConsumer, p), 30, time.Millisecond, 0)}})
	stats[a] = nodeStats{http: s}
	snap = &Snapshot{}
	(&Console{}).addHTTP(snap, map[wire.NodeID]nodeStats{a: stats[a]}, all, names, nil)
	if len(snap.Edges) != 1 || !near(snap.Edges[0].RPS, 30.0/20) || snap.Edges[0].Requests != 30 {
		t.Errorf("after a restart: %+v", snap.Edges)
	}
}
