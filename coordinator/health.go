package coordinator

import (
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// Bounds on health reports: a provider reports when its target's health
// changes (and when its map stream reconnects), so a burst of healthBurst
// reports, then one per healthEvery, is plenty; more is a flapping target
// or a hostile node, and each accepted change rebuilds every node's map.
const (
	healthBurst = 10
	healthEvery = time.Second
)

// healthTable holds what providers last reported of their own exports'
// targets. It lives in memory only: health is a live signal, dropped when
// the node's map stream ends (offline says more then) and reported again
// by the agent whenever its stream opens. Entries exist only for services
// the node provides, so the table is bounded by the providers table.
type healthTable struct {
	mu     sync.Mutex // guards byNode
	byNode map[wire.NodeID]map[string]wire.ServiceHealth
}

// set replaces node's reports by those of rep that name services it
// provides (provides), and reports whether anything changed.
func (h *healthTable) set(node wire.NodeID, rep []wire.ServiceHealth, provides func(string) bool) bool {
	m := map[string]wire.ServiceHealth{}
	for _, sh := range rep {
		if !provides(sh.Name) {
			continue
		}
		sh.Error = cleanHealthError(sh.Error)
		if sh.Healthy {
			sh.Error = ""
		}
		m[sh.Name] = sh
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.byNode == nil {
		h.byNode = map[wire.NodeID]map[string]wire.ServiceHealth{}
	}
	old := h.byNode[node]
	same := len(old) == len(m)
	for k, v := range m {
		if old[k] != v {
			same = false
		}
	}
	if len(m) == 0 {
		delete(h.byNode, node)
	} else {
		h.byNode[node] = m
	}
	return !same
}

// forget drops node's reports; it reports whether there were any.
func (h *healthTable) forget(node wire.NodeID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, had := h.byNode[node]
	delete(h.byNode, node)
	return had
}

// get returns the health of node's export of service: wire.HealthHealthy,
// wire.HealthUnhealthy with why, or "" if never reported.
func (h *healthTable) get(node wire.NodeID, service string) (string, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	sh, ok := h.byNode[node][service]
	switch {
	case !ok:
		return "", ""
	case sh.Healthy:
		return wire.HealthHealthy, ""
	}
	return wire.HealthUnhealthy, sh.Error
}

// cleanHealthError bounds a reported error and keeps it printable: it is
// shown in other nodes' `meshlink services` and the console.
func cleanHealthError(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > wire.MaxHealthError {
		s = strings.ToValidUTF8(s[:wire.MaxHealthError], "")
	}
	return strings.TrimSpace(s)
}

// serveHealth takes a provider's health report of its own exports.
func (s *Server) serveHealth(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.HealthReport
	node, e := s.authDecode(w, r, &req, &req.Version, "health")
	if e != nil {
		return e
	}
	if len(req.Services) > wire.MaxHealthServices {
		return apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "a health report names at most %d services, not %d", wire.MaxHealthServices, len(req.Services))
	}
	if !s.healthLimit.allow(node.ID, time.Now()) {
		return apiErr(http.StatusTooManyRequests, wire.ErrCodeConflict,
			"node %s reported health too often (at most %d at once, then one per %v); is its target flapping?", node.Name, healthBurst, healthEvery)
	}
	snap, err := s.current(r.Context())
	if err != nil {
		return storeErr("health", err)
	}
	provides := func(name string) bool {
		sv, ok := snap.service(name)
		return ok && slices.ContainsFunc(sv.Providers, func(p wire.Provider) bool { return p.Node == node.ID })
	}
	if s.health.set(node.ID, req.Services, provides) {
		var bad []string
		for _, sh := range req.Services {
			if !sh.Healthy && provides(sh.Name) {
				bad = append(bad, sh.Name)
			}
		}
		s.commit(change{log: "provider health changed", attrs: []any{"node", node.Name, "unhealthy", bad}})
	}
	writeJSON(w, http.StatusOK, struct{}{})
	return nil
}
