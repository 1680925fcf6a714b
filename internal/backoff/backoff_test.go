package backoff

import (
	"context"
	"testing"
	"time"
)

func TestNext(t *testing.T) {
	const ms = time.Millisecond
	for _, tc := range []struct {
		name     string
		min, max time.Duration
		want     []time.Duration
	}{
		{"doubles to the cap", 100 * ms, 500 * ms, []time.Duration{100 * ms, 200 * ms, 400 * ms, 500 * ms, 500 * ms}},
		{"cap below min", 100 * ms, 50 * ms, []time.Duration{100 * ms, 50 * ms, 50 * ms}},
		{"zero never waits", 0, 0, []time.Duration{0, 0}},
		{"huge cap does not overflow", time.Second, 1<<63 - 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := Backoff{Min: tc.min, Max: tc.max}
			for i, want := range tc.want {
				if got := b.Next(); got != want {
					t.Fatalf("delay %d = %v, want %v", i, got, want)
				}
			}
			for range 100 {
				if d := b.Next(); d < 0 {
					t.Fatalf("negative delay %v", d)
				}
			}
			b.Reset()
			if got := b.Next(); got != tc.min {
				t.Fatalf("after Reset: %v, want %v", got, tc.min)
			}
		})
	}
}

func TestJitter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		j      Jitter
		lo, hi time.Duration // for d = 1s, inclusive
	}{
		{"equal", EqualJitter, 500 * time.Millisecond, time.Second},
		{"spread 20%", Spread(0.2), 800 * time.Millisecond, 1200 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seen := map[time.Duration]bool{}
			for range 1000 {
				d := tc.j(time.Second)
				if d < tc.lo || d > tc.hi {
					t.Fatalf("jittered 1s to %v, want in [%v, %v]", d, tc.lo, tc.hi)
				}
				seen[d] = true
			}
			if len(seen) < 100 {
				t.Fatalf("only %d distinct delays in 1000: not random", len(seen))
			}
		})
	}
	b := Backoff{Min: time.Second, Max: time.Minute, Jitter: EqualJitter}
	b.Next()
	if d := b.Next(); d < time.Second || d > 2*time.Second {
		t.Fatalf("second jittered delay %v, want in [1s, 2s]", d)
	}
}

func TestSleep(t *testing.T) {
	if !Sleep(context.Background(), time.Millisecond) {
		t.Fatal("Sleep without a cancelled context reported false")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep with a cancelled context reported true")
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("Sleep ignored its context for %v", el)
	}
}
