package tstest

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeTB records what a helper reports instead of failing the real test.
type fakeTB struct {
	testing.TB
	mu       sync.Mutex
	failures []string
	cleanups []func()
}

func (f *fakeTB) Helper() {}

func (f *fakeTB) Errorf(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failures = append(f.failures, fmt.Sprintf(format, args...))
}

func (f *fakeTB) Fatalf(format string, args ...any) {
	f.Errorf(format, args...)
	runtime.Goexit()
}

func (f *fakeTB) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }

// run calls fn(f) on a goroutine of its own, as Fatalf ends it, and
// returns what was reported.
func (f *fakeTB) run(fn func(testing.TB)) []string {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failures
}

func TestPoll(t *testing.T) {
	n := 0
	if err := Poll(5*time.Second, func() error {
		if n++; n < 5 {
			return errors.New("not yet")
		}
		return nil
	}); err != nil || n != 5 {
		t.Fatalf("Poll = %v after %d tries, want nil after 5", err, n)
	}
	start := time.Now()
	err := Poll(100*time.Millisecond, func() error { return fmt.Errorf("try at %v", time.Since(start)) })
	el := time.Since(start)
	if err == nil || el < 100*time.Millisecond || el > 2*time.Second {
		t.Fatalf("Poll of a failing condition: %v after %v, want its last error after 100ms", err, el)
	}
}

func TestWaitForFails(t *testing.T) {
	f := &fakeTB{TB: t}
	got := f.run(func(tb testing.TB) { WaitFor(tb, 20*time.Millisecond, "the impossible", func() bool { return false }) })
	if len(got) != 1 || !strings.Contains(got[0], "waiting for the impossible") {
		t.Fatalf("WaitFor on a false condition reported %q", got)
	}
	f = &fakeTB{TB: t}
	got = f.run(func(tb testing.TB) {
		WaitForNil(tb, 20*time.Millisecond, "a reply", func() error { return errors.New("connection refused") })
	})
	if len(got) != 1 || !strings.Contains(got[0], "waiting for a reply: connection refused") {
		t.Fatalf("WaitForNil on a failing condition reported %q", got)
	}
	f = &fakeTB{TB: t}
	calls := 0
	got = f.run(func(tb testing.TB) {
		WaitFor(tb, 5*time.Second, "the third call", func() bool { calls++; return calls == 3 })
	})
	if len(got) != 0 {
		t.Fatalf("WaitFor on a condition that comes true reported %q", got)
	}
}

func TestCheckGoroutines(t *testing.T) {
	release := make(chan struct{})
	go func() { <-release }()
	f := &fakeTB{TB: t}
	CheckGoroutines(f)
	got := f.run(func(testing.TB) { f.cleanups[0]() })
	if len(got) != 1 || !strings.Contains(got[0], "tstest.TestCheckGoroutines.func1") {
		t.Fatalf("a goroutine left running was reported as %q", got)
	}
	close(release)
	f = &fakeTB{TB: t}
	CheckGoroutines(f)
	if got := f.run(func(testing.TB) { f.cleanups[0]() }); len(got) != 0 {
		t.Fatalf("goroutines that ended were reported: %q", got)
	}
}

// panicWriter is t.Output() once the test has ended.
type panicWriter struct{ n int }

func (p *panicWriter) Write([]byte) (int, error) {
	p.n++
	panic("Write called after the test has completed")
}

func TestWriterAfterTheTest(t *testing.T) {
	var tee bytes.Buffer
	pw := &panicWriter{}
	w := &testWriter{out: pw, prefix: []byte("node1: ")}
	for range 2 {
		if n, err := fmt.Fprintf(w, "late line\n"); n != len("late line\n") || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if pw.n != 1 {
		t.Fatalf("%d writes reached the ended test, want 1", pw.n)
	}
	var out bytes.Buffer
	w = &testWriter{out: &out, prefix: []byte("node1: ")}
	log := NewLogger(t, LogOptions{Tee: &tee})
	log.Info("hello", "k", "v")
	fmt.Fprintf(w, "x=1\n")
	if out.String() != "node1: x=1\n" || !strings.Contains(tee.String(), "msg=hello k=v") {
		t.Fatalf("wrote %q and teed %q", out.String(), tee.String())
	}
}
