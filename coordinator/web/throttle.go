package web

import (
	"net/netip"
	"sync"
	"time"
)

// Sign-in throttling. Every password attempt is counted, before the
// password is hashed, against two keys: the pair (source, username) and the
// source alone. A key gets its free attempts without delay; after that each
// attempt must come a delay after the key's previous one, the delay
// doubling from loginDelayMin to loginDelayMax. The username alone is never
// a key, so that a stranger elsewhere cannot lock an account out: only the
// pair they guess from, and their own source, slow down.
const (
	loginFreePair   = 5  // per (source, username)
	loginFreeSource = 20 // per source, over all usernames
	loginDelayMin   = time.Minute
	loginDelayMax   = time.Hour
	// loginForget: a key with no attempt for this long starts over.
	loginForget  = 24 * time.Hour
	loginKeysMax = 10000
)

// throttle holds the attempt counts. Its memory is bounded by max keys:
// when full, forgotten keys are swept, then the key idle longest goes.
type throttle struct {
	freePair, freeSource int
	min, max, forget     time.Duration
	maxKeys              int

	mu      sync.Mutex // guards entries
	entries map[string]*strikes
}

type strikes struct {
	n    int       // attempts counted and not refunded
	last time.Time // the latest counted attempt
}

func newThrottle(maxKeys int) *throttle {
	return &throttle{
		freePair: loginFreePair, freeSource: loginFreeSource,
		min: loginDelayMin, max: loginDelayMax, forget: loginForget,
		maxKeys: maxKeys, entries: map[string]*strikes{},
	}
}

func pairKey(source, user string) string { return "p\x00" + source + "\x00" + user }
func sourceKey(source string) string     { return "s\x00" + source }

// wait is how long the key must still wait before its next attempt.
func (t *throttle) wait(e *strikes, free int, now time.Time) time.Duration {
	if e == nil || e.n < free {
		return 0
	}
	d := t.min
	for i := free; i < e.n && d < t.max; i++ {
		d *= 2
	}
	d = min(d, t.max)
	if until := e.last.Add(d); now.Before(until) {
		return until.Sub(now)
	}
	return 0
}

// reserve counts an attempt by source for user, or returns how long to wait
// when either key is still held back (and counts nothing). The check and
// the count happen under one lock, so parallel attempts cannot all pass a
// check before any of them is counted.
func (t *throttle) reserve(source, user string, now time.Time) (wait time.Duration, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pk, sk := pairKey(source, user), sourceKey(source)
	pe, se := t.get(pk, now), t.get(sk, now)
	wait = max(t.wait(pe, t.freePair, now), t.wait(se, t.freeSource, now))
	if wait > 0 {
		return wait, false
	}
	for _, k := range [...]string{pk, sk} {
		e := t.entries[k]
		if e == nil {
			t.makeRoom(now)
			e = &strikes{}
			t.entries[k] = e
		}
		e.n++
		e.last = now
	}
	return 0, true
}

// succeeded undoes the attempt reserve counted for a sign-in that worked:
// the pair starts over; the source gets back only that one attempt, so that
// signing in to one's own account does not clear guesses at others.
func (t *throttle) succeeded(source, user string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.entries, pairKey(source, user))
	if e := t.entries[sourceKey(source)]; e != nil && e.n > 0 {
		e.n--
	}
}

// get returns the entry of k, dropping it when forgotten.
func (t *throttle) get(k string, now time.Time) *strikes {
	e := t.entries[k]
	if e != nil && now.Sub(e.last) >= t.forget {
		delete(t.entries, k)
		return nil
	}
	return e
}

// makeRoom keeps len(entries) below maxKeys before an insert.
func (t *throttle) makeRoom(now time.Time) {
	if len(t.entries) < t.maxKeys {
		return
	}
	for k, e := range t.entries {
		if now.Sub(e.last) >= t.forget {
			delete(t.entries, k)
		}
	}
	for len(t.entries) >= t.maxKeys {
		var oldest string
		var at time.Time
		for k, e := range t.entries {
			if oldest == "" || e.last.Before(at) {
				oldest, at = k, e.last
			}
		}
		delete(t.entries, oldest)
	}
}

func (t *throttle) size() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}

// sourceOf is the source an attempt is counted against: the client's IPv4
// address, or the /64 of its IPv6 address (one subscriber commonly holds a
// whole /64).
func sourceOf(remoteAddr string) string {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	a := ap.Addr().Unmap()
	if a.Is4() {
		return a.String()
	}
	p, _ := a.WithZone("").Prefix(64)
	return p.String()
}
