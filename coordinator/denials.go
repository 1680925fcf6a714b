package coordinator

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// Providers report the connections they refused by policy
// (wire.StatsReport.Denials), every few seconds and as running totals. They
// become console events, at most one per (provider, service, source node)
// and denialWindow: the first denial of a pair is recorded when it is
// reported, later ones are counted into the pair's next event, written
// when the window has passed (by the next report or flushDenials).
const (
	denialWindow = time.Minute
	// denialKeep is how long a pair without new denials is remembered,
	// to tell a repeated report from new denials; well beyond the time an
	// agent goes on reporting a quiet pair.
	denialKeep = 10 * time.Minute
	// maxDenialPairs bounds the table; denials of pairs beyond it (a mesh
	// with very many of them at once) are dropped with a log line.
	maxDenialPairs = 8192
	// maxDenialPairsPerProvider bounds one provider's share of the
	// table, so that a node reporting denials for every pair it can name
	// does not crowd out the real ones of the others.
	maxDenialPairsPerProvider = 256
	// maxDenialCount bounds one reported count: more than any agent could
	// refuse, small enough that sums cannot overflow.
	maxDenialCount = 1 << 40
)

type denialPair struct {
	provider, source wire.NodeID
	service          string
}

type denialState struct {
	first   time.Time // the agent's series (wire.Denial.First)
	seen    int64     // the series' count at the last report
	evented time.Time // when the last event was recorded
	pending int64     // denials since, not in an event yet
	touched time.Time // the last report that counted new denials
	names   denialNames
}

// denialEvents coalesces reported denials into events.
type denialEvents struct {
	mu     sync.Mutex // guards the fields below
	byPair map[denialPair]*denialState
	// perProvider counts byPair's pairs by provider.
	perProvider map[wire.NodeID]int
}

// denialNames is who a denial concerns, for the event.
type denialNames struct {
	provider, source string
	owner            int64 // the provider's owner
	// rule says which rule of the policy in force decides, as
	// policyVerdict words it.
	rule string
}

// add folds one checked denial into the table at now and returns the
// event to record now, if one is due, and how many denials were new. full
// is true when a new pair found no room.
func (d *denialEvents) add(p denialPair, dn wire.Denial, names denialNames, now time.Time) (ev store.Event, record, full bool, n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.byPair == nil {
		d.byPair = map[denialPair]*denialState{}
		d.perProvider = map[wire.NodeID]int{}
	}
	st := d.byPair[p]
	if st == nil {
		if len(d.byPair) >= maxDenialPairs || d.perProvider[p.provider] >= maxDenialPairsPerProvider {
			d.expireLocked(now)
			if len(d.byPair) >= maxDenialPairs || d.perProvider[p.provider] >= maxDenialPairsPerProvider {
				return store.Event{}, false, true, 0
			}
		}
		st = &denialState{}
		d.byPair[p] = st
		d.perProvider[p.provider]++
	}
	n = dn.Count
	if st.first.Equal(dn.First) && dn.Count >= st.seen {
		n = dn.Count - st.seen // the same series: only what is new
	}
	st.first, st.seen = dn.First, dn.Count
	if n == 0 {
		return store.Event{}, false, false, 0
	}
	st.touched, st.names = now, names
	st.pending += n
	if !st.evented.IsZero() && now.Sub(st.evented) < denialWindow {
		return store.Event{}, false, false, n
	}
	return st.takeLocked(p, now), true, false, n
}

// takeLocked returns the pair's event for its pending count and starts a
// new window.
func (st *denialState) takeLocked(p denialPair, now time.Time) store.Event {
	n := st.names
	what := "connections"
	if st.pending == 1 {
		what = "connection"
	}
	ev := store.Event{Kind: store.EventDenied, Actor: "node " + n.provider, Node: n.source, OwnerID: n.owner,
		Message: fmt.Sprintf("%s refused %d %s from %s to %s: %s", n.provider, st.pending, what, n.source, p.service, n.rule)}
	st.evented, st.pending = now, 0
	return ev
}

// flush returns the events of pairs whose window has passed with denials
// pending, and forgets pairs quiet for denialKeep.
func (d *denialEvents) flush(now time.Time) []store.Event {
	d.mu.Lock()
	defer d.mu.Unlock()
	var evs []store.Event
	for p, st := range d.byPair {
		if st.pending > 0 && now.Sub(st.evented) >= denialWindow {
			evs = append(evs, st.takeLocked(p, now))
		}
	}
	d.expireLocked(now)
	return evs
}

func (d *denialEvents) expireLocked(now time.Time) {
	for p, st := range d.byPair {
		if st.pending == 0 && now.Sub(st.touched) >= denialKeep {
			delete(d.byPair, p)
			if d.perProvider[p.provider]--; d.perProvider[p.provider] <= 0 {
				delete(d.perProvider, p.provider)
			}
		}
	}
}

// len is the number of pairs remembered.
func (d *denialEvents) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.byPair)
}

// recordDenials checks the denials node reported against the mesh as the
// coordinator knows it and records what is due. An agent's report is
// never trusted: an entry must name a service node provides and a peer of
// its map, with a sane count and times; other entries are
// dropped, with one log line per report.
func (s *Server) recordDenials(node store.Node, snap *snapshot, ds []wire.Denial) {
	provides := map[string]bool{}
	for _, sv := range snap.services {
		for _, p := range sv.Providers {
			if p.Node == node.ID {
				provides[sv.Name] = true
			}
		}
	}
	now := time.Now()
	verdict := s.policyVerdicts(snap.gen)
	seen := map[denialPair]bool{}
	var dropped int
	var why string
	drop := func(reason string) {
		if dropped == 0 {
			why = reason
		}
		dropped++
	}
	for _, dn := range ds {
		i, known := snap.byID[dn.Node]
		p := denialPair{provider: node.ID, source: dn.Node, service: dn.Service}
		switch {
		case !provides[dn.Service]:
			drop(fmt.Sprintf("service %.63q is not one the node provides", dn.Service))
			continue
		case !known || dn.Node == node.ID:
			drop(fmt.Sprintf("node %d is not another node of the mesh", dn.Node))
			continue
		case !snap.peerOf(node.ID, dn.Node):
			// Only a peer's packets reach the provider; naming another
			// node would tell its owner what the map hides.
			drop(fmt.Sprintf("node %d is no peer of the node", dn.Node))
			continue
		case dn.Count < 1 || dn.Count > maxDenialCount:
			drop(fmt.Sprintf("count %d is out of range", dn.Count))
			continue
		case dn.First.IsZero() || dn.Last.Before(dn.First):
			drop("its times are missing or out of order")
			continue
		case seen[p]:
			drop("it repeats a pair of the same report")
			continue
		}
		seen[p] = true
		names := denialNames{provider: node.Name, source: snap.nodes[i].Name, owner: node.OwnerID, rule: verdict(snap.nodes[i].Name, dn.Service)}
		ev, record, full, n := s.denials.add(p, dn, names, now)
		if full {
			drop(fmt.Sprintf("more than %d pairs of provider, service and source are tracked (%d of one provider)", maxDenialPairs, maxDenialPairsPerProvider))
			continue
		}
		if n > 0 {
			s.metrics.denied.WithLabelValues(dn.Service).Add(float64(n))
		}
		if record {
			s.console.Record(ev)
		}
	}
	if dropped > 0 {
		s.log.Warn("ignored denials in a stats report", "node", node.Name, "ignored", dropped, "of", len(ds), "first_reason", why)
	}
}

// peerOf reports whether id is a peer in of's map: not expired, and
// linked to it by the policy when the policy filters maps.
func (sn *snapshot) peerOf(of, id wire.NodeID) bool {
	if sn.expired[id] {
		return false
	}
	return sn.access == nil || sn.access.peers[of][id]
}

// flushDenials records the events whose window has passed.
func (s *Server) flushDenials() {
	for _, e := range s.denials.flush(time.Now()) {
		s.console.Record(e)
	}
}

// verdictDir caches the directory policyVerdicts reads, per map
// generation: stats reports (every agent's, every few seconds) then cost
// no store scan while the mesh does not change.
type verdictDir struct {
	mu  sync.Mutex // guards the fields below
	gen uint64
	dir *directory
}

// policyVerdicts returns a function that says, in words for the event
// log, which rule of the policy in force denies node the service, for
// the mesh at generation gen; the mesh is read lazily, once a generation.
func (s *Server) policyVerdicts(gen uint64) func(node, service string) string {
	var dir *directory
	var derr error
	return func(node, service string) string {
		if dir == nil && derr == nil {
			s.verdicts.mu.Lock()
			if s.verdicts.dir != nil && s.verdicts.gen == gen {
				dir = s.verdicts.dir
			} else {
				ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
				dir, derr = s.directory(ctx)
				cancel()
				if derr == nil {
					s.verdicts.gen, s.verdicts.dir = gen, dir
				}
			}
			s.verdicts.mu.Unlock()
		}
		if derr != nil {
			return "the policy does not allow it"
		}
		// A copy: the cached directory is shared by concurrent reports.
		d0 := *dir
		dir := &d0
		dir.pol = s.currentPolicy().p
		pr, err := dir.Principal("node:" + node)
		if err != nil {
			return "the policy does not allow it"
		}
		d := dir.pol.Decide(pr, service, dir.ServiceOwner(service))
		switch {
		case d.Allow:
			return "the policy in force allows it (the provider still had an older map)"
		case d.Rule >= 0:
			return fmt.Sprintf("denied by rule %d (line %d) of the policy: %s", d.Rule+1, d.Line, d.Why)
		}
		return d.Why
	}
}
