// Package backoff spaces out the attempts of a retry loop: delays that
// double from a minimum up to a maximum, with jitter so that a fleet
// restarted together does not retry in lockstep, and a sleep that ends when
// the loop's context does. Model: tailscale util/backoff.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff yields the delays of one retry loop. It belongs to that loop: it
// is not safe for concurrent use. The zero value never waits.
type Backoff struct {
	// Min is the first delay, and the first again after Reset.
	Min time.Duration
	// Max caps the doubling (jitter is applied after the cap).
	Max time.Duration
	// Jitter, if set, turns each delay into the one actually waited.
	Jitter Jitter

	cur time.Duration // the last delay before jitter; 0 before the first
}

// Next returns the delay to wait before the next attempt: Min the first
// time and after Reset, then twice the previous one up to Max, each passed
// through Jitter.
func (b *Backoff) Next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.Min
	case b.cur > b.Max/2: // doubling would pass Max (or overflow)
		b.cur = b.Max
	default:
		b.cur *= 2
	}
	if b.Jitter == nil {
		return b.cur
	}
	return b.Jitter(b.cur)
}

// Reset starts again from Min: call it once an attempt succeeded.
func (b *Backoff) Reset() { b.cur = 0 }

// Jitter maps a delay to the one to wait.
type Jitter func(time.Duration) time.Duration

// EqualJitter waits half of d plus a random part of the other half, a
// delay in [d/2, d]: it never waits longer than d, and never less than half
// ("equal jitter" in the AWS architecture blog's terms).
func EqualJitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// Spread returns a Jitter that scales each delay by a random factor in
// [1-f, 1+f): Spread(0.2) is ±20%.
func Spread(f float64) Jitter {
	return func(d time.Duration) time.Duration {
		return time.Duration(float64(d) * (1 - f + 2*f*rand.Float64()))
	}
}

// Sleep waits d or until ctx is done, and reports whether d elapsed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
