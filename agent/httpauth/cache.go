package httpauth

import (
	"crypto/sha256"
	"sync"
	"time"
)

// Bounds of the cache of verified tokens.
const (
	// maxCached bounds the tokens remembered per service.
	maxCached = 1024
	// cacheFor bounds how long a verified token is taken on trust
	// without checking its signature again.
	cacheFor = time.Minute
)

// tokenCache remembers tokens whose signature and claims verified, so
// that a client sending one token on every request of a keep-alive
// connection costs one verification a minute, not one a request. An
// entry holds for cacheFor at most, never past the token's exp (plus
// Leeway), and only while the key set it was verified under is the one
// held. Oldest entries go first when it is full.
type tokenCache struct {
	mu    sync.Mutex // guards the fields below
	byKey map[[32]byte]cached
	order [][32]byte // insertion order, for eviction
}

type cached struct {
	claims map[string]any
	until  time.Time
	gen    uint64
}

func (c *tokenCache) get(raw string, now time.Time, gen uint64) (map[string]any, bool) {
	k := sha256.Sum256([]byte(raw))
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.byKey[k]
	if !ok || e.gen != gen || !now.Before(e.until) {
		return nil, false
	}
	return e.claims, true
}

func (c *tokenCache) put(raw string, claims map[string]any, until time.Time, gen uint64) {
	k := sha256.Sum256([]byte(raw))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byKey == nil {
		c.byKey = map[[32]byte]cached{}
	}
	if _, ok := c.byKey[k]; !ok {
		for len(c.order) >= maxCached {
			delete(c.byKey, c.order[0])
			c.order = c.order[1:]
		}
		c.order = append(c.order, k)
	}
	c.byKey[k] = cached{claims: claims, until: until, gen: gen}
}
