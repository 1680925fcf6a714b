package coordinator

import (
	"context"
	"slices"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
)

// This file lets several coordinators share one database (PostgreSQL):
// each announces its committed changes, and on hearing another's, reloads
// what it keeps in memory from the store and wakes its own map streams,
// which then send their deltas as if the change had been made here.

// replicaResync is how often a coordinator sharing its store rereads it
// unasked: the safety net for an announcement lost with a coordinator
// killed between its commit and its NOTIFY.
const replicaResync = 5 * time.Second

// notifyReplicas announces this coordinator's changes to the others, off
// the request path: commit only marks one pending (a burst coalesces into
// one announcement), and an unreachable database delays nothing but this.
// It also resyncs every replicaResync.
func (s *Server) notifyReplicas(n store.Notifier) {
	resync := time.NewTicker(replicaResync)
	defer resync.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-resync.C:
			s.replicaChanged()
			continue
		case <-s.notifyWake:
		}
		ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
		if err := n.NotifyChange(ctx); err != nil && s.ctx.Err() == nil {
			s.log.Warn("could not tell the other coordinators of a change; they see it at the next one", "err", err)
		}
		cancel()
	}
}

// replicaChanged is called when another coordinator on the database
// committed a change: the policy may be new, key expiries may have moved,
// and every map may differ.
func (s *Server) replicaChanged() {
	// Under SetPolicy's lock: a reload racing this coordinator's own
	// SetPolicy could otherwise put the older text back in force.
	s.policyMu.Lock()
	err := s.loadPolicy(s.ctx)
	s.policyMu.Unlock()
	if err != nil && s.ctx.Err() == nil {
		s.log.Warn("could not reload the access policy after another coordinator's change", "err", err)
	}
	select {
	case s.expiryWake <- struct{}{}:
	default:
	}
	s.hub.bump(false)
}

// coordinatorURLs is this coordinator's URL followed by its replicas'
// (--replica-urls, without this one's); nil when it has none.
func (s *Server) coordinatorURLs() []string {
	if len(s.cfg.ReplicaURLs) == 0 {
		return nil
	}
	own := s.URL()
	out := []string{own}
	for _, r := range s.cfg.ReplicaURLs {
		if r != own && !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out
}

// shared reports whether other coordinators may use the store too.
func (s *Server) shared() bool {
	_, ok := s.store.(store.Notifier)
	return ok
}

// onlineElsewhere reports whether n's map stream is open on another
// coordinator sharing the store: its heartbeat is fresh. A heartbeat
// stops with its coordinator, killed or not; after three keep-alive
// intervals without one the node counts as offline (a replica's own
// streams are counted by its hub).
func (s *Server) onlineElsewhere(n store.Node) bool {
	return s.shared() && !n.Heartbeat.IsZero() && time.Since(n.Heartbeat) < 3*s.heartbeat
}

// nodeOnline reports whether n has a map stream open on any coordinator.
func (s *Server) nodeOnline(n store.Node) bool {
	return s.hub.online(n.ID) || s.onlineElsewhere(n)
}
