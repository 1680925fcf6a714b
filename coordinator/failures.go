package coordinator

import (
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
)

// Refused registrations come from anyone who can reach the port, so they
// are not written one event each: the first refusal from a source in a
// window is recorded as it happens (an honest agent's mistake shows at
// once, with its reason), and the rest of the window's refusals from that
// source become one event when it ends. Sources beyond maxFailSources in a
// window are counted together. At most 2*maxFailSources+1 events a window.
const (
	failWindow     = time.Minute
	maxFailSources = 1024
)

type failCount struct {
	n    int    // refusals after the first
	last string // the last one's message
}

// joinFailures coalesces refused registrations per source and window.
type joinFailures struct {
	mu       sync.Mutex // guards the fields below
	bySource map[netip.Prefix]*failCount
	others   int // refusals from sources beyond maxFailSources
	otherSrc int // how many such sources (a lower bound: not deduplicated)
}

// add counts a refusal from src and says whether to record it now.
func (f *joinFailures) add(src netip.Prefix, msg string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.bySource == nil {
		f.bySource = map[netip.Prefix]*failCount{}
	}
	if c := f.bySource[src]; c != nil {
		c.n++
		c.last = msg
		return false
	}
	if len(f.bySource) >= maxFailSources {
		f.others++
		return false
	}
	f.bySource[src] = &failCount{}
	return true
}

// flush ends the window: it returns the events summing up what add did
// not record, and starts a new window.
func (f *joinFailures) flush(window time.Duration) []store.Event {
	f.mu.Lock()
	by, others := f.bySource, f.others
	f.bySource, f.others = nil, 0
	f.mu.Unlock()
	var evs []store.Event
	for src, c := range by {
		if c.n == 0 {
			continue
		}
		evs = append(evs, store.Event{Kind: store.EventRegisterFailed, Actor: sourceName(src),
			Message: fmt.Sprintf("%d more failed joins from %s in the last %v; the last: %s", c.n, sourceName(src), window, c.last)})
	}
	if others > 0 {
		evs = append(evs, store.Event{Kind: store.EventRegisterFailed, Actor: "many addresses",
			Message: fmt.Sprintf("%d failed joins from more than %d other addresses in the last %v", others, maxFailSources, window)})
	}
	return evs
}

// sourceName is a source as people read it: the address alone for one
// address, else the prefix.
func sourceName(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// recordJoinFailure records a refused registration from remote (a
// RemoteAddr) in the console's event log, coalesced.
func (s *Server) recordJoinFailure(remote, msg string) {
	src := sourceOf(addrString(remote))
	if !s.joinFails.add(src, msg) {
		return
	}
	s.console.Record(store.Event{Kind: store.EventRegisterFailed, Actor: sourceName(src), Message: msg})
}

// flushJoinFailures writes the window's summaries.
func (s *Server) flushJoinFailures() {
	for _, e := range s.joinFails.flush(failWindow) {
		s.console.Record(e)
	}
}

// summarizeJoinFailures flushes every failWindow until the server closes,
// then once more; and writes the denials whose window has passed
// (flushDenials) every tenth of a denialWindow.
func (s *Server) summarizeJoinFailures() {
	defer s.wg.Done()
	t := time.NewTicker(failWindow)
	defer t.Stop()
	dt := time.NewTicker(denialWindow / 10)
	defer dt.Stop()
	for {
		select {
		case <-t.C:
			s.flushJoinFailures()
		case <-dt.C:
			s.flushDenials()
		case <-s.ctx.Done():
			s.flushJoinFailures()
			s.flushDenials()
			return
		}
	}
}

// addrString is a net.Addr of a request's RemoteAddr.
type addrString string

func (a addrString) Network() string { return "tcp" }
func (a addrString) String() string  { return string(a) }
