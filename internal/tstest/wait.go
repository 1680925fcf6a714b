// Package tstest is what meshlink's tests share: waiting for a condition
// with a deadline instead of sleeping, checking that no goroutine of the
// module outlives the tests, a logger that writes to the test's output,
// a buffer to search what loggers and agents wrote, and loopback servers
// (Serve, Echo).
// Model: tailscale tstest (WaitFor, ResourceCheck) and
// WhileTestRunningLogger.
package tstest

import (
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
)

// Poll calls try until it returns nil or timeout passes, and returns try's
// last error. Between calls it sleeps 1ms doubling to 50ms, never past the
// deadline, and tries a last time there.
func Poll(timeout time.Duration, try func() error) error {
	deadline := time.Now().Add(timeout)
	bo := backoff.Backoff{Min: time.Millisecond, Max: 50 * time.Millisecond}
	for {
		err := try()
		if err == nil {
			return nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return err
		}
		time.Sleep(min(bo.Next(), left)) // a polling interval, bounded by the deadline
	}
}

// WaitFor fails the test unless cond holds within timeout; what says what
// was awaited.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if Poll(timeout, func() error {
		if cond() {
			return nil
		}
		return errNotYet
	}) != nil {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
}

// WaitForNil fails the test unless cond returns nil within timeout, with
// cond's last error; what says what was awaited.
func WaitForNil(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
	}
}

type notYet struct{}

func (notYet) Error() string { return "not yet" }

var errNotYet error = notYet{}
