package proxy

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"

	"github.com/meshlink/meshlink/wire"
)

// candidate is a provider as the chooser sees it: the map's view (Target)
// and the consumer's own (a recent dial failure, open connections).
type candidate struct {
	Target
	// failing is set while the consumer's own last dial to it failed
	// (passive health), with why.
	failing bool
	failErr string
	open    int64
}

// usable reports whether new connections may go to c at all: not
// reported unhealthy, not offline in the map (its agent is gone: a dial
// would only wait out the connect timeout), not failing the consumer's
// own dials.
func (c *candidate) usable() bool {
	return !c.failing && c.Health != wire.HealthUnhealthy && (c.Online || c.Local != "")
}

// why says why c is not usable, for status and logs.
func (c *candidate) why() string {
	switch {
	case c.Health == wire.HealthUnhealthy:
		if c.HealthError != "" {
			return "unhealthy (" + c.HealthError + ")"
		}
		return "unhealthy"
	case !c.Online && c.Local == "":
		return "offline"
	case c.failing:
		return "not answering (" + c.failErr + ")"
	}
	return "ok"
}

// choosePolicy is a service's traffic policy.
type choosePolicy struct {
	Split    map[string]int
	Locality string
	Affinity string
	// Region is the consumer's own region.
	Region string
}

// ErrNoHealthyProvider is what a connection is refused with when every
// provider of its service is unhealthy or not answering.
var ErrNoHealthyProvider = errors.New("no healthy provider")

// maxAttempts bounds the providers one connection is offered to: each may
// cost a connect timeout, and a failure marks the provider for the next.
const maxAttempts = 3

// choose orders the usable candidates best first: the first is where the
// connection goes, the others are where it fails over to. client is the
// connecting address (for Affinity); r supplies the randomness (a seeded
// source in tests).
//
// Usable candidates fall in tiers, tried in order: inside the preferred
// locality before outside it, then by priority, lower first. Inside the first tier the connection goes to a
// version drawn by the service's split (when it names a version of that
// tier), then to a provider drawn by weight when weights differ, else to
// the one with the fewest open connections. With client affinity every
// draw is a weighted rendezvous hash of the client's address, so one
// client stays on one provider while the set is unchanged.
func choose(cands []candidate, pol choosePolicy, client netip.Addr, r *rand.Rand) ([]Target, error) {
	var use []*candidate
	var why []string
	for i := range cands {
		c := &cands[i]
		if c.usable() {
			use = append(use, c)
		} else {
			why = append(why, c.Name+" "+c.why())
		}
	}
	if len(use) == 0 {
		if len(cands) == 0 {
			return nil, fmt.Errorf("%w: the service has no providers", ErrNoHealthyProvider)
		}
		return nil, fmt.Errorf("%w: %s", ErrNoHealthyProvider, strings.Join(why, "; "))
	}
	type tier struct{ away, prio int }
	tierOf := func(c *candidate) tier {
		t := tier{prio: c.Priority}
		switch pol.Locality {
		case wire.LocalitySameSite:
			if c.Local == "" {
				t.away = 1
			}
		case wire.LocalitySameRegion:
			if c.Local == "" && (pol.Region == "" || c.Region != pol.Region) {
				t.away = 1
			}
		}
		return t
	}
	less := func(a, b tier) bool {
		if a.away != b.away {
			return a.away < b.away
		}
		return a.prio < b.prio
	}
	// Least loaded first, ties at random: the order of failover.
	tie := make(map[*candidate]uint32, len(use))
	for _, c := range use {
		tie[c] = r.Uint32()
	}
	sort.SliceStable(use, func(i, j int) bool {
		ti, tj := tierOf(use[i]), tierOf(use[j])
		if ti != tj {
			return less(ti, tj)
		}
		if use[i].open != use[j].open {
			return use[i].open < use[j].open
		}
		return tie[use[i]] < tie[use[j]]
	})
	first := tierOf(use[0])
	n := 1
	for n < len(use) && tierOf(use[n]) == first {
		n++
	}
	best := pick(use[:n], pol, client, r)
	out := make([]Target, 0, min(len(use), maxAttempts))
	out = append(out, use[best].Target)
	for i, c := range use {
		if i != best && len(out) < maxAttempts {
			out = append(out, c.Target)
		}
	}
	return out, nil
}

// pick chooses inside one tier (sorted least loaded first) and returns
// the index.
func pick(set []*candidate, pol choosePolicy, client netip.Addr, r *rand.Rand) int {
	draw := func(key string) float64 { return r.Float64() }
	if pol.Affinity == wire.AffinityClient && client.IsValid() {
		draw = func(key string) float64 {
			h := fnv.New64a()
			h.Write(client.AsSlice())
			h.Write([]byte{0})
			h.Write([]byte(key))
			return (float64(h.Sum64()>>11) + 0.5) / (1 << 53)
		}
	}
	idx := make([]int, len(set))
	for i := range idx {
		idx[i] = i
	}
	// The split draws a version among those of this tier it names.
	if len(pol.Split) > 0 {
		present := map[string]bool{}
		for _, c := range set {
			if pol.Split[c.Version] > 0 {
				present[c.Version] = true
			}
		}
		if len(present) > 0 {
			var keys []string
			var ws []float64
			for v := range present {
				keys = append(keys, v)
			}
			sort.Strings(keys)
			for _, v := range keys {
				ws = append(ws, float64(pol.Split[v]))
			}
			v := keys[rendezvous(keys, ws, draw)]
			var in []int
			for i, c := range set {
				if c.Version == v {
					in = append(in, i)
				}
			}
			return leastLoaded(set, in, pol, draw)
		}
	}
	uniform := true
	for _, c := range set {
		if weightOf(c) != weightOf(set[0]) {
			uniform = false
		}
	}
	if !uniform {
		keys := make([]string, len(set))
		ws := make([]float64, len(set))
		for i, c := range set {
			keys[i], ws[i] = nodeKey(c), float64(weightOf(c))
		}
		return rendezvous(keys, ws, draw)
	}
	return leastLoaded(set, idx, pol, draw)
}

// leastLoaded picks among set[in...] the one with the fewest open
// connections (set is sorted that way, ties already shuffled); with
// client affinity, a rendezvous draw instead.
func leastLoaded(set []*candidate, in []int, pol choosePolicy, draw func(string) float64) int {
	if pol.Affinity == wire.AffinityClient {
		keys := make([]string, len(in))
		ws := make([]float64, len(in))
		for k, i := range in {
			keys[k], ws[k] = nodeKey(set[i]), 1
		}
		return in[rendezvous(keys, ws, draw)]
	}
	return in[0]
}

func nodeKey(c *candidate) string { return fmt.Sprint(uint64(c.Node)) }

func weightOf(c *candidate) int {
	if c.Weight <= 0 {
		return wire.DefaultWeight
	}
	return c.Weight
}

// rendezvous is weighted rendezvous hashing: key i wins with probability
// w[i]/sum(w) when draw is uniform in (0,1), and a given draw function
// (a client's hash) keeps choosing the same key while the set is the same.
func rendezvous(keys []string, w []float64, draw func(string) float64) int {
	best, bestScore := 0, math.Inf(1)
	for i, k := range keys {
		u := draw(k)
		if u <= 0 {
			u = math.SmallestNonzeroFloat64
		}
		if s := -math.Log(u) / w[i]; s < bestScore {
			best, bestScore = i, s
		}
	}
	return best
}
