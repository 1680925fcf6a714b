package agent

import (
	"cmp"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// Bounds of the denial table: a peer may cause any number of denials, so
// they are logged and reported per (service, node), not one by one.
const (
	// denialLogEvery is how often one (service, node) may log a line; the
	// line counts the denials suppressed since the last.
	denialLogEvery = 10 * time.Second
	// denialForget is how long a quiet (service, node) is remembered and
	// reported; after it, its count starts again (a new wire.Denial.First).
	denialForget = 2 * time.Minute
	// maxDenialKeys bounds the table; the least recent goes first.
	maxDenialKeys = 1024
)

type denialKey struct {
	service string
	node    wire.NodeID // 0: the source is no peer of the map
	src     netip.Addr  // only when node is 0
}

type denialEntry struct {
	name        string // the peer's name, for logs
	count       int64  // since first
	first, last time.Time
	logged      time.Time // the last line logged
	suppressed  int64     // denials since that line
}

// denials counts the connections the provider refused by policy, for the
// log (rate-limited) and the coordinator (StatsReport.Denials).
type denials struct {
	log *slog.Logger
	now func() time.Time

	mu    sync.Mutex // guards byKey
	byKey map[denialKey]*denialEntry
}

func newDenials(log *slog.Logger, now func() time.Time) *denials {
	return &denials{log: log, now: now, byKey: map[denialKey]*denialEntry{}}
}

// add counts one denial of service to peer (known: the source is a peer
// of the map; otherwise only its address src is known), and logs it unless
// a line for the same pair was logged in the last denialLogEvery.
func (d *denials) add(service string, peer policyPeer, known bool, src netip.Addr) {
	k := denialKey{service: service, node: peer.id}
	name := peer.name
	if !known {
		k = denialKey{service: service, src: src.Unmap()}
		name = "(not a peer)"
	}
	now := d.now()
	d.mu.Lock()
	e := d.byKey[k]
	if e != nil && now.Sub(e.last) > denialForget {
		e = nil // quiet long enough: a new series
	}
	if e == nil {
		d.makeRoomLocked(now)
		e = &denialEntry{name: name, first: now}
		d.byKey[k] = e
	}
	e.count++
	e.last = now
	logNow := e.logged.IsZero() || now.Sub(e.logged) >= denialLogEvery
	suppressed, total := e.suppressed, e.count
	if logNow {
		e.logged, e.suppressed = now, 0
	} else {
		e.suppressed++
	}
	d.mu.Unlock()
	if logNow {
		d.log.Warn("connection denied by policy", "service", service, "node", name, "node_id", uint64(peer.id), "from", src.Unmap(),
			"suppressed", suppressed, "total", total)
	}
}

// makeRoomLocked drops forgotten entries when the table is full, and then,
// if it still is, the least recent one.
func (d *denials) makeRoomLocked(now time.Time) {
	if len(d.byKey) < maxDenialKeys {
		return
	}
	var oldest denialKey
	var oldestAt time.Time
	for k, e := range d.byKey {
		if now.Sub(e.last) > denialForget {
			delete(d.byKey, k)
			continue
		}
		if oldestAt.IsZero() || e.last.Before(oldestAt) {
			oldest, oldestAt = k, e.last
		}
	}
	if len(d.byKey) >= maxDenialKeys {
		delete(d.byKey, oldest)
	}
}

// report returns the recent denials of peers (sources that are no peer
// have no ID to report), most recent first, at most wire.MaxDenials.
func (d *denials) report() []wire.Denial {
	now := d.now()
	d.mu.Lock()
	var out []wire.Denial
	for k, e := range d.byKey {
		if now.Sub(e.last) > denialForget {
			delete(d.byKey, k)
			continue
		}
		if k.node == 0 {
			continue
		}
		out = append(out, wire.Denial{Service: k.service, Node: k.node, Count: e.count, First: e.first, Last: e.last})
	}
	d.mu.Unlock()
	slices.SortFunc(out, func(a, b wire.Denial) int {
		if c := b.Last.Compare(a.Last); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.Service, b.Service), cmp.Compare(a.Node, b.Node))
	})
	if len(out) > wire.MaxDenials {
		out = out[:wire.MaxDenials]
	}
	return out
}
