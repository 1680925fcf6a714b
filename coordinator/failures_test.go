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
	t.Logf("%d failed joins in %v", n, time.Since(start).Round(time.Millisecond))

	evs, err := s.Store().ListEvents(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[store.EventKind]int{}
	var summary string
	for _, e := range evs {
		kinds[e.Kind]++
		if e.Kind == store.EventRegisterFailed && strings.Contains(e.Message, "more failed joins") {
			summary = e.Message
		}
	}
	if kinds[store.EventLogin] != 1 || kinds[store.EventTokenCreated] != 1 {
		t.Fatalf("after the flood the log holds %v; want the sign-in and the minted token", kinds)
	}
	if kinds[store.EventRegisterFailed] != 2 || !strings.HasPrefix(summary, fmt.Sprintf("%d more failed joins from 127.0.0.1 in the last 1m0s", n-1)) {
		t.Fatalf("%d failure events (summary %q); want the first refusal and one count of the %d others", kinds[store.EventRegisterFailed], summary, n-1)
	}
	t.Logf("event log after %d failed joins: %v; %q", n, kinds, summary)
}
