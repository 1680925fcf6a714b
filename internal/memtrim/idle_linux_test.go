package memtrim

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlink/meshlink/internal/tstest"
)

// faultIn maps n fresh pages and touches each: n minor faults.
func faultIn(t *testing.T, n int) {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n*unix.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(b); i += unix.Getpagesize() {
		b[i] = 1
	}
	unix.Munmap(b)
}

// TestWhenIdle: a process that faulted pages in and then idles for an
// interval is trimmed; one that keeps a CPU busy is not, however many
// pages came back; one idle with nothing faulted back is left alone.
func TestWhenIdle(t *testing.T) {
	const every = 200 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var trims atomic.Int32
	var busy atomic.Bool
	busy.Store(true)
	spin := make(chan struct{})
	go func() {
		defer close(spin)
		for busy.Load() {
		}
	}()
	go WhenIdle(ctx, every, func(n int64, err error) {
		if err != nil || n == 0 {
			t.Errorf("trim: %d bytes advised, %v", n, err)
		}
		trims.Add(1)
	})
	// Busy for five intervals, faulting all along: no trim.
	for end := time.Now().Add(5 * every); time.Now().Before(end); {
		faultIn(t, 64)
		time.Sleep(every / 4) // the load's pace, not a wait for a condition
	}
	if n := trims.Load(); n != 0 {
		t.Fatalf("%d trims while a CPU was busy", n)
	}
	busy.Store(false)
	<-spin
	// Idle now, with pages faulted since: a trim within a few intervals.
	tstest.WaitFor(t, 20*every, "a trim once idle", func() bool { return trims.Load() > 0 })
	// Idle, nothing faulted back (at most the idle path's few pages): no
	// more trims over several intervals.
	n := trims.Load()
	time.Sleep(5 * every) // a window in which nothing may happen
	if got := trims.Load(); got > n+2 {
		t.Fatalf("%d more trims of an idle process with nothing to give back", got-n)
	}
}
