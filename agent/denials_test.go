package agent

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// TestDenialsRateLimited: a burst of denials from one node to one service
// logs one line per denialLogEvery, the next line counting those
// suppressed; each pair logs on its own; the report carries the count.
func TestDenialsRateLimited(t *testing.T) {
	var out bytes.Buffer
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	d := newDenials(slog.New(slog.NewTextHandler(&out, nil)), func() time.Time { return now })
	a := policyPeer{id: 2, name: "site-a"}
	src := netip.MustParseAddr("100.96.0.2")
	for range 50 {
		d.add("db", a, true, src)
		now = now.Add(10 * time.Millisecond)
	}
	lines := func() []string { return strings.Split(strings.TrimSpace(out.String()), "\n") }
	if l := lines(); len(l) != 1 || !strings.Contains(l[0], "service=db node=site-a node_id=2") || !strings.Contains(l[0], "suppressed=0") {
		t.Fatalf("log after a burst of 50:\n%s", out.String())
	}
	d.add("web", a, true, src) // another service: its own line
	now = now.Add(denialLogEvery)
	d.add("db", a, true, src)
	if l := lines(); len(l) != 3 || !strings.Contains(l[2], "service=db") || !strings.Contains(l[2], "suppressed=49") || !strings.Contains(l[2], "total=51") {
		t.Fatalf("log after the interval:\n%s", out.String())
	}
	rep := d.report()
	if len(rep) != 2 || rep[0].Service != "db" || rep[0].Count != 51 || rep[0].Node != 2 || rep[1].Service != "web" || rep[1].Count != 1 {
		t.Fatalf("report %+v", rep)
	}
	// A source that is no peer is logged, never reported (it has no ID).
	d.add("db", policyPeer{}, false, netip.MustParseAddr("100.96.0.9"))
	if l := lines(); len(l) != 4 || !strings.Contains(l[3], "not a peer") {
		t.Fatalf("unknown source not logged:\n%s", out.String())
	}
	if len(d.report()) != 2 {
		t.Fatalf("an unknown source was reported: %+v", d.report())
	}
	// Quiet long enough, a pair is forgotten; its next denial starts a new
	// series.
	now = now.Add(denialForget + time.Second)
	if rep := d.report(); len(rep) != 0 {
		t.Fatalf("quiet pairs still reported: %+v", rep)
	}
	d.add("db", a, true, src)
	if rep := d.report(); len(rep) != 1 || rep[0].Count != 1 || !rep[0].First.Equal(now) {
		t.Fatalf("new series %+v", rep)
	}
}

// TestDenialsBounded: the table and the report stay within their bounds
// however many pairs are denied.
func TestDenialsBounded(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	d := newDenials(slog.New(slog.DiscardHandler), func() time.Time { return now })
	src := netip.MustParseAddr("100.96.0.2")
	for i := range 3 * maxDenialKeys {
		d.add(fmt.Sprint("svc", i%7), policyPeer{id: wire.NodeID(i + 2), name: "n"}, true, src)
		now = now.Add(time.Millisecond)
	}
	if n := len(d.byKey); n > maxDenialKeys {
		t.Fatalf("%d pairs tracked, more than %d", n, maxDenialKeys)
	}
	rep := d.report()
	if len(rep) != wire.MaxDenials || rep[0].Node != wire.NodeID(3*maxDenialKeys+1) {
		t.Fatalf("report of %d, first %+v; want the %d most recent", len(rep), rep[0], wire.MaxDenials)
	}
}
