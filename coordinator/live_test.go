package coordinator

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

// liveStatus opens GET /console/events and returns its status, the body
// of a refusal, and the function that closes it.
func liveStatus(t *testing.T, b *browser) (int, string, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.base+"/console/events", nil)
	resp, err := b.c.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	var body string
	if resp.StatusCode != http.StatusOK {
		raw, _ := io.ReadAll(resp.Body)
		body = string(raw)
	}
	closeFn := func() { cancel(); resp.Body.Close() }
	t.Cleanup(closeFn)
	return resp.StatusCode, body, closeFn
}

// TestLiveFeedsPerSession opens more live feeds in one session than it
// may hold: the one over the bound is 429 with a message, another session
// still gets one, and closing a feed frees its place.
func TestLiveFeedsPerSession(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "alice", "alice-pw", false)
	b := newBrowser(t, s)
	b.login("alice", "alice-pw")
	var first func()
	for i := range 8 {
		st, body, closeFn := liveStatus(t, b)
		if st != http.StatusOK {
			t.Fatalf("live feed %d: %d %s", i+1, st, body)
		}
		if i == 0 {
			first = closeFn
		}
	}
	for i := range 20 {
		st, body, _ := liveStatus(t, b)
		if st != http.StatusTooManyRequests || !strings.Contains(body, "close some console tabs") {
			t.Fatalf("live feed %d of one session: %d %q, want 429 saying to close tabs", 9+i, st, body)
		}
	}
	other := newBrowser(t, s)
	other.login("alice", "alice-pw")
	if st, body, _ := liveStatus(t, other); st != http.StatusOK {
		t.Fatalf("another session while one is at its bound: %d %s", st, body)
	}
	first()
	tstest.WaitForNil(t, 5*time.Second, "a feed after closing one", func() error {
		if st, body, closeFn := liveStatus(t, b); st != http.StatusOK {
			closeFn()
			return fmt.Errorf("%d %s", st, body)
		}
		return nil
	})
}
