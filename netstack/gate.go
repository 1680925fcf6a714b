package netstack

import (
	"sync/atomic"
	"time"
)

// Gate bounds how many packets are inside wireguard-go's pipeline in one
// direction. wireguard-go carries every packet in a 64 KiB message buffer
// until it hands it on, so with nothing in front a bulk TCP stream parks its
// whole congestion window there at many times its size
// (see docs/netstack-tuning.md#pipeline-gate). Whoever feeds the pipeline
// calls Enter before handing packets over, whoever takes them out calls
// Leave; when the pipeline is full, Enter waits, so the feeder stops reading
// and the backlog stays where it costs its real size (the kernel's socket
// buffer, gVisor's send buffer) and TCP's congestion control sees it.
//
// Packets can leave the pipeline without Leave (wireguard-go drops some:
// keep-alives, packets that fail to decrypt, packets for unknown peers), so
// the count could drift up and block forever. Enter therefore waits at most
// MaxWait; past that it assumes the count leaked and starts again from
// zero. The bound is thus soft, but a lost count costs one short stall, not
// a dead link.
type Gate struct {
	limit   int64
	maxWait time.Duration
	n       atomic.Int64
	wake    chan struct{}

	stalls, resets atomic.Uint64
}

// NewGate returns a Gate admitting up to limit packets.
func NewGate(limit int, maxWait time.Duration) *Gate {
	return &Gate{limit: int64(limit), maxWait: maxWait, wake: make(chan struct{}, 1)}
}

// Enter records k packets entering the pipeline, first waiting (up to
// MaxWait) while it is full. A nil Gate admits everything.
func (g *Gate) Enter(k int) {
	if g == nil || k <= 0 {
		return
	}
	g.Wait()
	g.n.Add(int64(k))
}

// Add records k packets entering without waiting: for a feeder that called
// Wait before it knew how many packets it would hand over.
func (g *Gate) Add(k int) {
	if g == nil || k <= 0 {
		return
	}
	g.n.Add(int64(k))
}

// Wait waits (up to MaxWait) while the pipeline is full.
func (g *Gate) Wait() {
	if g == nil {
		return
	}
	if g.n.Load() >= g.limit {
		g.stalls.Add(1)
		t := time.NewTimer(g.maxWait)
		for g.n.Load() >= g.limit {
			select {
			case <-g.wake:
			case <-t.C:
				g.resets.Add(1)
				g.n.Store(0)
			}
		}
		t.Stop()
	}
}

// Leave records k packets leaving the pipeline.
func (g *Gate) Leave(k int) {
	if g == nil || k <= 0 {
		return
	}
	if g.n.Add(-int64(k)) < 0 {
		g.n.Store(0)
	}
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// GateStats are a Gate's counters.
type GateStats struct {
	InFlight int64
	// Stalls counts Enter calls that had to wait; Resets those that waited
	// MaxWait and reset the count.
	Stalls, Resets uint64
}

// Stats returns the Gate's counters.
func (g *Gate) Stats() GateStats {
	if g == nil {
		return GateStats{}
	}
	return GateStats{InFlight: g.n.Load(), Stalls: g.stalls.Load(), Resets: g.resets.Load()}
}
