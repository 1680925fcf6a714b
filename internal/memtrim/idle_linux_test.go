package memtrim

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
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

// rssFile is the process's file-backed resident memory in kB.
func rssFile(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// TestWhenIdle: a process that faulted pages in and then idles for an
// interval is trimmed (its file-backed resident memory drops); one that
// keeps a CPU busy is not, however many pages came back; an idle one with
// fewer faults than the bound since the last trim is left alone.
func TestWhenIdle(t *testing.T) {
	const every = 200 * time.Millisecond
	const bound = 4096 // faults: far more than the test's own idle ones
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var trims atomic.Int32
	var rssBefore, rssAfter atomic.Int64
	var busy atomic.Bool
	busy.Store(true)
	spin := make(chan struct{})
	go func() {
		defer close(spin)
		for busy.Load() {
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		whenIdle(ctx, every, bound, func(n int64, err error) {
			if err != nil || n == 0 {
				t.Errorf("trim: %d bytes advised, %v", n, err)
			}
			if trims.Add(1) == 1 {
				rssAfter.Store(int64(rssFile(t)))
			}
		})
	}()
	// Busy for five intervals, faulting all along: no trim.
	for end := time.Now().Add(5 * every); time.Now().Before(end); {
		faultIn(t, bound)
		time.Sleep(every / 4) // the load's pace, not a wait for a condition
	}
	if n := trims.Load(); n != 0 {
		t.Fatalf("%d trims while a CPU was busy", n)
	}
	busy.Store(false)
	<-spin
	// Idle now, with pages faulted since: a trim within a few intervals,
	// which gives back file-backed pages.
	rssBefore.Store(int64(rssFile(t)))
	tstest.WaitFor(t, 20*every, "a trim once idle", func() bool { return trims.Load() > 0 })
	if before, after := rssBefore.Load(), rssAfter.Load(); after >= before {
		t.Errorf("RssFile %d kB before the trim, %d kB after: nothing given back", before, after)
	}
	// Idle, fewer faults than the bound: no more trims over five intervals.
	n := trims.Load()
	time.Sleep(5 * every) // a window in which nothing may happen
	if got := trims.Load(); got != n {
		t.Fatalf("%d more trims of an idle process with nothing to give back", got-n)
	}
	// More faults than the bound, idle: trimmed again.
	faultIn(t, 2*bound)
	tstest.WaitFor(t, 20*every, "a trim after faults", func() bool { return trims.Load() > n })
}

// TestExecutableKeepsPrivateCopies: a read-only mapping of the executable
// that holds a page written before it was made read-only (as the RELRO
// segment of a relocated build does) keeps that page: dropping it would
// bring back the file's bytes in place of the written ones.
func TestExecutableKeepsPrivateCopies(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	page := unix.Getpagesize()
	b, err := unix.Mmap(int(f.Fd()), 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	orig := b[0]
	b[0] = ^orig // a private copy of the page, as relocation makes one
	if err := unix.Mprotect(b, unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	if _, err := Executable(); err != nil {
		t.Fatal(err)
	}
	if b[0] != ^orig {
		t.Fatalf("the written byte is %#x again (the file's), want %#x: a private page was dropped", b[0], ^orig)
	}
}

// TestHeapWhenIdle: an idle process that holds much free heap gives it back
// at the end of an interval, and one whose free heap is under MinFree does
// not.
func TestHeapWhenIdle(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	trims := make(chan int64, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		HeapWhenIdle(ctx, HeapConfig{Every: 100 * time.Millisecond, IdleCPU: 0.5, MinFree: 16 << 20}, func(n int64) { trims <- n })
	}()
	defer func() { cancel(); <-done }()
	garbage(64 << 20)
	select {
	case n := <-trims:
		if n < 16<<20 {
			t.Fatalf("trimmed %d bytes of about 64 MiB free", n)
		}
	case <-time.After(10 * time.Second):
		free, _ := heapState()
		t.Fatalf("no trim in 10 s with %d bytes of free heap", free)
	}
	// Now the free heap is small: ten intervals pass without a trim.
	select {
	case n := <-trims:
		free, _ := heapState()
		t.Fatalf("trimmed %d bytes again with no new garbage (%d bytes free now)", n, free)
	case <-time.After(time.Second):
	}
}
