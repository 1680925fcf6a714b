package coordinator

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// Node keys expire (Config.NodeKeyExpiry, a token's shorter one): every
// registration and rotation sets a node's expiry to now plus its lifetime.
// An expired node is left out of every other node's map and of the keys the
// relays serve (snapshot.expired), and its calls are refused with
// wire.ErrCodeKeyExpired. expireKeys turns the passing of an expiry into a
// change of the mesh, so that its peers drop it when it passes.

// keyLifetime is the lifetime of a key of a node whose token set node (0:
// none): the coordinator's, capped by the token's; 0 is never.
func (s *Server) keyLifetime(node time.Duration) time.Duration {
	return store.KeyLifetime(max(s.cfg.NodeKeyExpiry, 0), node)
}

// keyExpiryFrom is when a key of n given at now expires; zero: never.
func (s *Server) keyExpiryFrom(n store.Node, now time.Time) time.Time {
	if l := s.keyLifetime(n.KeyLifetime); l > 0 {
		return now.Add(l)
	}
	return time.Time{}
}

// keyExpired is the answer to a call of a node whose key has expired.
func keyExpired(n store.Node) *apiError {
	return apiErr(http.StatusForbidden, wire.ErrCodeKeyExpired,
		"this node's key expired at %s; join again: meshlink agent --join TOKEN with a new --state directory (the name %q is free for its owner's tokens), or by web login (meshlink agent --coordinator URL)",
		n.KeyExpiry.UTC().Format(time.RFC3339), n.Name)
}

// wakeExpiry tells expireKeys that an expiry moved (a registration, a
// rotation, an admin's expire).
func (s *Server) wakeExpiry() {
	s.expiryMu.Lock()
	s.expiryNext = time.Time{}
	s.expiryMu.Unlock()
	select {
	case s.expiryWake <- struct{}{}:
	default:
	}
}

// wakeExpiryFor is wakeExpiry for a node whose key now expires at t
// (zero: never): only when that is before expireKeys looks anyway. A
// join of a fleet then costs no listing of every node per node.
func (s *Server) wakeExpiryFor(t time.Time) {
	s.expiryMu.Lock()
	next := s.expiryNext
	s.expiryMu.Unlock()
	if t.IsZero() || !next.IsZero() && !t.Before(next) {
		return
	}
	s.wakeExpiry()
}

// maxExpiryWait bounds how long expireKeys sleeps, so that a clock that
// jumped is noticed.
const maxExpiryWait = time.Minute

// expireKeys runs until the server closes. It first fits the expiries
// stored to the configured lifetimes (a node from before expiries gets
// one; a shorter --node-key-expiry applies at once; 0 clears them), then
// commits a change, with an event, whenever a node's key expires.
func (s *Server) expireKeys() {
	s.fitKeyExpiries(s.ctx)
	first := true
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		case <-s.expiryWake:
		}
		nodes, err := s.store.ListNodes(s.ctx)
		if err != nil {
			if s.ctx.Err() == nil {
				s.log.Warn("checking key expiries", "err", err)
			}
			t.Reset(maxExpiryWait)
			continue
		}
		now := time.Now()
		next := now.Add(maxExpiryWait)
		seen := make(map[wire.NodeID]bool, len(nodes))
		for _, n := range nodes {
			seen[n.ID] = true
			if n.KeyExpiry.IsZero() {
				continue
			}
			if !n.KeyExpired(now) {
				if n.KeyExpiry.Before(next) {
					next = n.KeyExpiry
				}
				continue
			}
			if !s.announceExpiry(n) {
				continue
			}
			if first {
				// Expired while the coordinator was down: the snapshot
				// leaves it out already; say so once, without an event.
				s.log.Info("node key expired", "node_id", n.ID, "name", n.Name, "expired", n.KeyExpiry)
				continue
			}
			s.disconnectRelay(n.Key)
			s.commit(change{log: "node key expired; its peers drop it", attrs: []any{"node_id", n.ID, "name", n.Name, "expired", n.KeyExpiry},
				event: store.Event{Kind: store.EventKeyExpired, Actor: "coordinator", Node: n.Name, OwnerID: n.OwnerID,
					Message: fmt.Sprintf("%s's key expired at %s before it was rotated; its peers dropped it, it must join again", n.Name, n.KeyExpiry.UTC().Format(time.RFC3339))}})
		}
		s.expiryMu.Lock()
		for id, at := range s.expiryAnnounced {
			if !seen[id] || !at.Before(now) {
				delete(s.expiryAnnounced, id) // removed, or its expiry moved
			}
		}
		first = false
		s.expiryNext = next
		s.expiryMu.Unlock()
		t.Reset(max(time.Until(next), 0))
	}
}

// announceExpiry reports whether n's expiry is yet to be announced, and
// marks it announced.
func (s *Server) announceExpiry(n store.Node) bool {
	s.expiryMu.Lock()
	defer s.expiryMu.Unlock()
	if at, ok := s.expiryAnnounced[n.ID]; ok && at.Equal(n.KeyExpiry) {
		return false
	}
	s.expiryAnnounced[n.ID] = n.KeyExpiry
	return true
}

// fitKeyExpiries makes every stored expiry agree with the lifetimes now
// configured: none when keys never expire, else at most now plus the
// node's lifetime (and that for a node that had none).
func (s *Server) fitKeyExpiries(ctx context.Context) {
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		s.log.Warn("fitting key expiries to --node-key-expiry", "err", err)
		return
	}
	now := time.Now()
	changed := 0
	for _, n := range nodes {
		if n.KeyExpired(now) {
			continue // expired stays expired
		}
		want := s.keyExpiryFrom(n, now)
		if want.IsZero() == n.KeyExpiry.IsZero() && (want.IsZero() || !want.Before(n.KeyExpiry)) {
			continue
		}
		if err := s.store.SetNodeKeyExpiry(ctx, n.ID, want); err != nil {
			s.log.Warn("setting a node's key expiry", "node_id", n.ID, "err", err)
			continue
		}
		changed++
	}
	if changed > 0 {
		s.commit(change{log: "node key expiries fitted to --node-key-expiry", attrs: []any{"nodes", changed, "node_key_expiry", s.keyLifetime(0)}})
	}
}

// ExpireNode makes the key of the node called name expire now (`meshlink
// nodes expire`, by actor as the event log names it): its peers drop it
// within seconds and it must join again. A node expired already is left
// as it is.
func (s *Server) ExpireNode(ctx context.Context, name, actor string) error {
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return err
	}
	name = wire.NormalizeName(name)
	for _, n := range nodes {
		if n.Name != name {
			continue
		}
		now := time.Now()
		if n.KeyExpired(now) {
			return nil
		}
		if err := s.store.SetNodeKeyExpiry(ctx, n.ID, now); err != nil {
			return err
		}
		n.KeyExpiry = now
		s.announceExpiry(n)
		s.disconnectRelay(n.Key)
		s.commit(change{log: "node key expired by admin; its peers drop it", attrs: []any{"node_id", n.ID, "name", n.Name},
			event: store.Event{Kind: store.EventKeyExpired, Actor: actor, Node: n.Name, OwnerID: n.OwnerID,
				Message: fmt.Sprintf("%s expired %s's key; its peers dropped it, it must join again", actor, n.Name)}})
		return nil
	}
	return fmt.Errorf("no node named %q: %w", name, store.ErrNotFound)
}
