package agent

import (
	"testing"
	"time"
)

// An agent waits on a silent map stream as long as the coordinator's named
// keep-alive interval allows (twice it and 15 s), never longer than its own
// MapIdle, and 60 s when the coordinator names none (before protocol
// version 15: keep-alives every 30 s) or names nonsense.
func TestStreamIdle(t *testing.T) {
	for _, tc := range []struct {
		idle   time.Duration
		header string
		want   time.Duration
	}{
		{120 * time.Second, "55", 120 * time.Second},
		{120 * time.Second, "30", 75 * time.Second},
		{120 * time.Second, "2", 19 * time.Second},
		{120 * time.Second, "", 60 * time.Second},
		{120 * time.Second, "0", 60 * time.Second},
		{120 * time.Second, "-5", 60 * time.Second},
		{120 * time.Second, "1e9", 60 * time.Second},
		{120 * time.Second, "99999999999999999999", 60 * time.Second},
		{30 * time.Second, "55", 30 * time.Second},
		{30 * time.Second, "", 30 * time.Second},
	} {
		if got := streamIdle(tc.idle, tc.header); got != tc.want {
			t.Errorf("streamIdle(%v, %q) = %v, want %v", tc.idle, tc.header, got, tc.want)
		}
	}
}

// FuzzStreamIdle: whatever a coordinator (or a proxy in between) puts in
// the keep-alive header, the agent waits no longer than its own MapIdle
// and no less than a one-second interval allows.
func FuzzStreamIdle(f *testing.F) {
	for _, s := range []string{"55", "", "0", "-1", "1", "86400", "86401", " 5", "5s", "99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		const idle = 120 * time.Second
		got := streamIdle(idle, header)
		if got > idle || got < 17*time.Second {
			t.Fatalf("streamIdle(%v, %q) = %v, want within [17s, %v]", idle, header, got, idle)
		}
	})
}
