package coordinator

import (
	"net/netip"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// Bounds on what a node may publish about where it is reached: every other
// agent pings each published endpoint, so a node could otherwise aim the
// whole mesh's pings at addresses that are not its own.
const (
	// maxNodeEndpoints bounds the endpoints kept per node.
	maxNodeEndpoints = 16
	// An agent publishes when its STUN address or its interfaces change;
	// endpointBurst changes at once, then one per endpointEvery.
	endpointBurst = 10
	endpointEvery = 6 * time.Second
	// maxEndpointLimiters bounds the limiter's table; past it, the
	// entries whose budget is whole again are forgotten.
	maxEndpointLimiters = 4096
)

// publishable reports whether other agents may be told to ping a: not an
// address of nobody in particular (unspecified, multicast, link-local, which
// every host has and no peer can reach by it) nor loopback, unless loopback
// is allowed for a mesh on one host (Config.AllowLoopbackEndpoints).
func publishable(a netip.Addr, allowLoopback bool) bool {
	switch {
	case !a.IsValid(), a.IsUnspecified(), a.IsMulticast(), a.IsLinkLocalUnicast(),
		a.IsLinkLocalMulticast(), a.IsInterfaceLocalMulticast():
		return false
	case a.IsLoopback():
		return allowLoopback
	}
	return true
}

// endpointLimiter is a token bucket per node for endpoint changes.
type endpointLimiter struct {
	// burst and every are the bucket's size and refill time; zero is
	// endpointBurst and endpointEvery.
	burst float64
	every time.Duration

	mu      sync.Mutex // guards buckets
	buckets map[wire.NodeID]*endpointBucket
}

type endpointBucket struct {
	tokens float64
	at     time.Time
}

// allow takes one change from node's budget at now.
func (l *endpointLimiter) allow(node wire.NodeID, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.buckets == nil {
		l.buckets = map[wire.NodeID]*endpointBucket{}
	}
	burst, every := l.burst, l.every
	if burst == 0 {
		burst, every = endpointBurst, endpointEvery
	}
	refill := func(b *endpointBucket) {
		b.tokens = min(burst, b.tokens+now.Sub(b.at).Seconds()/every.Seconds())
		b.at = now
	}
	b := l.buckets[node]
	if b == nil {
		if len(l.buckets) >= maxEndpointLimiters {
			for id, o := range l.buckets {
				if refill(o); o.tokens >= burst {
					delete(l.buckets, id)
				}
			}
		}
		b = &endpointBucket{tokens: burst, at: now}
		l.buckets[node] = b
	}
	refill(b)
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
