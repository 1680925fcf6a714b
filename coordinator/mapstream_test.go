package coordinator

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// A message encoded once and framed per stream decodes as the agent
// expects: its own seq and time, the shared changes.
func TestFrameDecodes(t *testing.T) {
	m := wire.MapResponse{
		PeersChanged:    []wire.Node{{ID: 2, Name: "b", Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.2/32")}, Online: true}},
		PeersRemoved:    []wire.NodeID{3},
		ServicesRemoved: []string{"db"},
	}
	body, err := encodeBody(&m)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 1, 10, 0, 0, 123, time.UTC)
	for _, c := range []struct {
		name string
		body []byte
		want wire.MapResponse
	}{
		{"delta", body, wire.MapResponse{Seq: 7, PeersChanged: m.PeersChanged, PeersRemoved: m.PeersRemoved, ServicesRemoved: m.ServicesRemoved, SentAt: now}},
		{"keep-alive", keepAliveBody, wire.MapResponse{Seq: 7, SentAt: now}},
	} {
		line := frame(c.body, 7, now)
		if line[len(line)-1] != '\n' {
			t.Errorf("%s: %q does not end a line", c.name, line)
		}
		var got wire.MapResponse
		if err := json.Unmarshal(line, &got); err != nil {
			t.Fatalf("%s: %q: %v", c.name, line, err)
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}

// The keep-alive interval follows what each agent says it waits on a
// silent stream (half of it), within Config.KeepAlive, and is named in the
// stream's header; a node asking for a tiny wait (to have the coordinator
// write to it every few milliseconds) gets the floor, an older agent that
// says nothing gets 30 s (it waits 60 s).
func TestKeepAliveNegotiated(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.KeepAlive = time.Hour })
	c := pinnedClient(t, s.Fingerprint(), true)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	for i, tc := range []struct {
		idle int
		want string
	}{
		{0, "30"},               // before protocol version 15: a 60 s watchdog
		{120, "60"},             // the agent's default
		{1, "5"},                // below minMapIdle
		{-7, "30"},              // nonsense: as if unsaid
		{math.MaxInt32, "3600"}, // Config.KeepAlive bounds it
		{24 * 3600, "3600"},     // likewise
	} {
		_, cr := register(t, c, jt, fmt.Sprintf("n%d", i))
		st := openMapReq(t, c, s.URL(), cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, MapIdle: tc.idle})
		if got := st.header.Get(wire.HeaderKeepAlive); got != tc.want {
			t.Errorf("MapIdle %d: %s %q, want %q", tc.idle, wire.HeaderKeepAlive, got, tc.want)
		}
		st.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
		st.close()
	}
	// The coordinator's own bound wins when it is shorter, in whole
	// seconds rounded up.
	s2 := startServer(t, t.TempDir(), func(c *Config) { c.KeepAlive = 1500 * time.Millisecond })
	c2 := pinnedClient(t, s2.Fingerprint(), true)
	_, cr := register(t, c2, mustToken(t, s2, TokenOptions{}), "short")
	st := openMapReq(t, c2, s2.URL(), cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, MapIdle: 120})
	if got := st.header.Get(wire.HeaderKeepAlive); got != "2" {
		t.Errorf("KeepAlive 1.5s: %s %q, want \"2\"", wire.HeaderKeepAlive, got)
	}
	// And its keep-alives come that often.
	st.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
	waitKeepAlive(t, st, 5*time.Second)
	// The agent's word sets the timer too, not only the header: with
	// Config.KeepAlive an hour, an agent waiting 10 s gets one within 5 s.
	_, cr = register(t, c, jt, "ten")
	st = openMapReq(t, c, s.URL(), cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, MapIdle: 10})
	st.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
	waitKeepAlive(t, st, 8*time.Second)
}

// waitKeepAlive waits up to d for a keep-alive on st.
func waitKeepAlive(t *testing.T, st *stream, d time.Duration) {
	t.Helper()
	tstest.WaitFor(t, d, "a keep-alive", func() bool {
		select {
		case m := <-st.msgs:
			return m.IsKeepAlive()
		default:
			return false
		}
	})
}

// deadlineRecorder is a ResponseWriter that records the write deadlines
// set through its http.ResponseController.
type deadlineRecorder struct {
	http.ResponseWriter
	sets     int
	deadline time.Time
}

func (d *deadlineRecorder) SetWriteDeadline(t time.Time) error {
	d.sets++
	d.deadline = t
	return nil
}

func (d *deadlineRecorder) Flush() {}

// After every keep-alive the write deadline is at least twice the interval
// and 15 s ahead (what the agent waits), so a keep-alive delayed by a full
// interval, or a stream waiting for a send slot, is never cut off before
// the agent would give up; and at the mean jitter about one keep-alive in
// two leaves the deadline alone.
func TestKeepAliveDeadline(t *testing.T) {
	const ka = 55 * time.Second
	rec := &deadlineRecorder{ResponseWriter: httptest.NewRecorder()}
	sw := &streamWriter{w: rec, rc: http.NewResponseController(rec)}
	floor := 2*ka + 15*time.Second
	// run sends n keep-alives, each as if step after the one before (the
	// deadline drawn nearer by step), and checks the floor after each.
	run := func(n int, step time.Duration) {
		t.Helper()
		for i := 0; i < n; i++ {
			if err := sw.keepAlive([]byte("{}\n"), ka); err != nil {
				t.Fatal(err)
			}
			if left := time.Until(rec.deadline); left < floor-time.Second {
				t.Fatalf("keep-alive %d, %v apart: deadline %v ahead, want at least %v", i, step, left.Round(time.Second), floor)
			}
			if !rec.deadline.Equal(sw.deadline) {
				t.Fatalf("keep-alive %d: set %v, recorded %v", i, rec.deadline, sw.deadline)
			}
			sw.deadline = sw.deadline.Add(-step)
			rec.deadline = sw.deadline
		}
	}
	run(20, ka) // the longest interval jitter allows
	sets := rec.sets
	run(20, ka*7/8) // the mean one
	if n := rec.sets - sets; n > 11 {
		t.Errorf("%d deadline changes for 20 keep-alives at the mean interval, want about half", n)
	}
	// A map write clears it; the next keep-alive arms it again.
	if err := sw.write([]byte("{}\n")); err != nil {
		t.Fatal(err)
	}
	if !rec.deadline.IsZero() || !sw.deadline.IsZero() {
		t.Fatalf("after a map write: deadline %v (kept %v), want none", rec.deadline, sw.deadline)
	}
	sets = rec.sets
	if err := sw.keepAlive([]byte("{}\n"), ka); err != nil {
		t.Fatal(err)
	}
	if rec.sets != sets+1 || time.Until(rec.deadline) < floor {
		t.Fatalf("keep-alive after a map write: %d changes, deadline %v ahead", rec.sets-sets, time.Until(rec.deadline))
	}
}
