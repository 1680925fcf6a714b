package httpobs

import (
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// Stats counts requests per edge (service, role, peer node) for the
// coordinator's console: totals since the agent started, with the latency
// in wire.HTTPLatencyBounds' buckets. It keeps at most wire.MaxHTTPStats
// edges; requests of further edges are counted in Overflow only.
type Stats struct {
	mu    sync.Mutex // guards edges
	edges map[edgeKey]*edgeStats

	overflow atomic.Uint64
}

type edgeKey struct {
	service string
	role    wire.ServiceRole
	peer    wire.NodeID
}

type edgeStats struct {
	requests, errors atomic.Int64
	buckets          [wire.HTTPBuckets]atomic.Int64
}

// NewStats returns empty counters.
func NewStats() *Stats { return &Stats{edges: map[edgeKey]*edgeStats{}} }

// Observe counts one request that took d.
func (s *Stats) Observe(service string, role wire.ServiceRole, peer wire.NodeID, d time.Duration, failed bool) {
	k := edgeKey{service, role, peer}
	s.mu.Lock()
	e := s.edges[k]
	if e == nil {
		if len(s.edges) >= wire.MaxHTTPStats {
			s.mu.Unlock()
			s.overflow.Add(1)
			return
		}
		e = &edgeStats{}
		s.edges[k] = e
	}
	s.mu.Unlock()
	// Report takes the total from the buckets, so the order of these
	// adds does not matter to it.
	e.buckets[wire.HTTPBucket(d)].Add(1)
	if failed {
		e.errors.Add(1)
	}
	e.requests.Add(1)
}

// Overflow counts the requests of edges past wire.MaxHTTPStats; 0 for a
// nil Stats.
func (s *Stats) Overflow() uint64 {
	if s == nil {
		return 0
	}
	return s.overflow.Load()
}

// Report returns the counters as the coordinator takes them, sorted by
// service, role and peer; every entry passes wire.HTTPStats.Check. A nil
// Stats reports nothing.
func (s *Stats) Report() []wire.HTTPStats {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	out := make([]wire.HTTPStats, 0, len(s.edges))
	for k, e := range s.edges {
		h := wire.HTTPStats{Service: k.service, Role: k.role, Peer: k.peer, Buckets: make([]int64, wire.HTTPBuckets)}
		// The total is the buckets' sum, so that a request counted in
		// between never makes the entry fail Check.
		errs := e.errors.Load()
		var sum int64
		for i := range h.Buckets {
			h.Buckets[i] = e.buckets[i].Load()
			sum += h.Buckets[i]
		}
		h.Requests, h.Errors = sum, min(errs, sum)
		out = append(out, h)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		if a.Role != b.Role {
			return a.Role < b.Role
		}
		return a.Peer < b.Peer
	})
	return out
}
