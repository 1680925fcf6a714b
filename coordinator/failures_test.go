package coordinator

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// TestFailedJoinFlood sends 5,000 registrations with a wrong token from
// one address. The sign-in and the token minted before stay in the event
// log, and the flood leaves two events: the first refusal, and at the end
// of the window the count of the others.
func TestFailedJoinFlood(t *testing.T) {
	s := startServer(t, t.TempDir())
	addUser(t, s, "alice", "alice-pw", true)
	newBrowser(t, s).login("alice", "alice-pw")
	jt := mustToken(t, s, TokenOptions{})

	const n, workers = 5000, 8
	c := pinnedClient(t, s.Fingerprint(), true)
	var refused atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				st, _ := call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion,
					TokenID: jt.ID, TokenSecret: "wrong", Name: fmt.Sprint("n", i), NodeKey: newKey(t)})
				if st == http.StatusUnauthorized {
					refused.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if refused.Load() != n {
		t.Fatalf("%d of %d registrations with a wrong token refused", refused.Load(), n)
	}
	s.flushJoinFailures() // the window ends
	took := time.Since(start)
	t.Logf("%d failed joins in %v", n, took.Round(time.Millisecond))

	evs, err := s.Store().ListEvents(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[store.EventKind]int{}
	var summary string
	counted, firsts := 0, 0
	for _, e := range evs {
		kinds[e.Kind]++
		switch {
		case e.Kind != store.EventRegisterFailed:
		case strings.Contains(e.Message, "more failed joins from 127.0.0.1 in the last 1m0s"):
			summary = e.Message
			var k int
			fmt.Sscanf(e.Message, "%d more failed joins", &k)
			counted += k
		default:
			firsts++ // a window's first refusal, recorded as itself
		}
	}
	counted += firsts
	if kinds[store.EventLogin] != 1 || kinds[store.EventTokenCreated] != 1 {
		t.Fatalf("after the flood the log holds %v; want the sign-in and the minted token", kinds)
	}
	// The first refusal, then a count at each tick of the summary timer
	// (every failWindow) during the flood and one at its end: one count on
	// a quick machine; a slow one, under -race, may see a tick or two.
	windows := int(took/failWindow) + 2
	if got := kinds[store.EventRegisterFailed]; got < 2 || got > 2*windows || counted != n {
		t.Fatalf("%d failure events counting %d refusals (last summary %q) over %v; want at most %d (a first refusal and a count per window) counting all %d",
			got, counted, summary, took, 2*windows, n)
	}
	t.Logf("event log after %d failed joins: %v; %q", n, kinds, summary)
}
