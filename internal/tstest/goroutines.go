package tstest

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// module prefixes the functions of this module in a goroutine dump.
const module = "github.com/meshlink/meshlink/"

// leakGrace is how long goroutines get to exit after the tests that
// started them: some end asynchronously, after a Close has returned.
const leakGrace = 5 * time.Second

// moduleGoroutines returns the stacks of the goroutines other than the
// caller's that run this module's code or were started by it, leaving out
// the test runner's goroutines (tests in progress, and their parents).
func moduleGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var own []string
	// The caller's goroutine comes first.
	for _, g := range strings.Split(string(buf), "\n\n")[1:] {
		if strings.Contains(g, module) && !strings.Contains(g, "\ntesting.tRunner(") {
			own = append(own, g)
		}
	}
	return own
}

// leakedGoroutines polls until no goroutine of the module is left, and
// returns the stacks of those still there after leakGrace.
func leakedGoroutines() string {
	var left []string
	Poll(leakGrace, func() error {
		if left = moduleGoroutines(); len(left) > 0 {
			return errors.New("goroutines left")
		}
		return nil
	})
	return strings.Join(left, "\n\n")
}

// CheckGoroutines fails t at its end if goroutines that run this module's
// code (or that it started) are still running then, after a grace for
// those that end asynchronously. Call it first, so that its check runs
// after every other cleanup of t. Tests of the package must not run in
// parallel with t.
func CheckGoroutines(t testing.TB) {
	t.Helper()
	t.Cleanup(func() { WaitGoroutinesGone(t) })
}

// WaitGoroutinesGone fails t unless every goroutine that runs this
// module's code (or that it started), other than those of running tests,
// ends within a grace: what a Close that waits for its goroutines
// promises.
func WaitGoroutinesGone(t testing.TB) {
	t.Helper()
	if leaked := leakedGoroutines(); leaked != "" {
		t.Fatalf("goroutines still running %v later:\n%s", leakGrace, leaked)
	}
}

// Main runs a package's tests and, if they pass, fails the run when
// goroutines that run this module's code are still running after them:
//
//	func TestMain(m *testing.M) { tstest.Main(m) }
//
// Each after func runs once the tests are done, before the check (to stop
// servers the tests shared, such as pgtest's PostgreSQL).
func Main(m *testing.M, after ...func()) {
	code := m.Run()
	for _, f := range after {
		f()
	}
	if code == 0 {
		if leaked := leakedGoroutines(); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines still running %v after the tests:\n%s\n", leakGrace, leaked)
			code = 1
		}
	}
	os.Exit(code)
}
