package store

import (
	"cmp"
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// A SQLite store has one coordinator, which makes every write: it keeps
// the nodes by ID in memory (every authenticated request looks its node
// up, and every change of the mesh lists them all), reading again from
// the database only the rows written since, and holds each node's last-seen time and network details
// (listen port, endpoints) until they are written together, every
// lazyFlush, only the latest of each node. Reads see the held values at
// once. A crash loses at most lazyFlush of them, which the agents resend
// when they reconnect.

// lazyFlush is how often the held last-seen and network updates are
// written.
const lazyFlush = time.Second

// maxCachedNodes bounds the cache; past it, lookups go to the database.
const maxCachedNodes = 1 << 20

type pendingNetwork struct {
	port uint16
	eps  []netip.AddrPort
}

type nodeCache struct {
	s     *sqlStore
	stopc chan struct{}
	wg    sync.WaitGroup

	mu sync.Mutex // guards the fields below
	// epoch grows with every invalidation: a lookup fills the cache only
	// if none happened while it read the database.
	epoch uint64
	byID  map[wire.NodeID]Node
	// complete: byID holds every node but those in dirty (written since
	// they were read, or new), so that a listing reads only those.
	complete bool
	dirty    map[wire.NodeID]bool
	lastSeen map[wire.NodeID]time.Time
	network  map[wire.NodeID]pendingNetwork
	closed   bool
}

func newNodeCache(s *sqlStore) *nodeCache {
	c := &nodeCache{s: s, stopc: make(chan struct{}), byID: map[wire.NodeID]Node{}, dirty: map[wire.NodeID]bool{},
		lastSeen: map[wire.NodeID]time.Time{}, network: map[wire.NodeID]pendingNetwork{}}
	c.wg.Add(1)
	go c.run()
	return c
}

// overlay is what the cache holds back of some nodes, taken before a read
// of the database so that a flush in between cannot hide it.
type overlay struct {
	lastSeen map[wire.NodeID]time.Time
	network  map[wire.NodeID]pendingNetwork
}

func (o overlay) apply(n *Node) {
	if t, ok := o.lastSeen[n.ID]; ok {
		n.LastSeen = t
	}
	if p, ok := o.network[n.ID]; ok {
		n.ListenPort, n.Endpoints = p.port, slices.Clone(p.eps)
	}
}

// get returns the cached node, or the epoch and overlay a database read
// must fill with.
func (c *nodeCache) get(id wire.NodeID) (n Node, ok bool, epoch uint64, o overlay) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o = overlay{lastSeen: map[wire.NodeID]time.Time{}, network: map[wire.NodeID]pendingNetwork{}}
	if t, ok := c.lastSeen[id]; ok {
		o.lastSeen[id] = t
	}
	if p, ok := c.network[id]; ok {
		o.network[id] = p
	}
	n, ok = c.byID[id]
	if ok {
		n.Tags, n.Endpoints, n.SecretHash = slices.Clone(n.Tags), slices.Clone(n.Endpoints), slices.Clone(n.SecretHash)
		o.apply(&n)
	}
	return n, ok, c.epoch, o
}

// fill caches n, read from the database at epoch.
func (c *nodeCache) fill(n Node, epoch uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.epoch == epoch && len(c.byID) < maxCachedNodes {
		n.Tags, n.Endpoints, n.SecretHash = slices.Clone(n.Tags), slices.Clone(n.Endpoints), slices.Clone(n.SecretHash)
		c.byID[n.ID] = n
		delete(c.dirty, n.ID)
	}
}

// list returns every node, by ID: from memory once a first listing filled
// it, reading from the database only the rows written since.
func (c *nodeCache) list(ctx context.Context) ([]Node, error) {
	for attempt := 0; attempt < 3; attempt++ {
		c.mu.Lock()
		o := overlay{lastSeen: maps(c.lastSeen), network: maps(c.network)}
		epoch, complete := c.epoch, c.complete
		var dirty []wire.NodeID
		for id := range c.dirty {
			dirty = append(dirty, id)
		}
		c.mu.Unlock()
		if !complete {
			nodes, err := queryAll(ctx, c.s.db, scanNode, `SELECT `+nodeCols+` FROM nodes ORDER BY id`)
			if err != nil {
				return nil, err
			}
			c.mu.Lock()
			if c.epoch == epoch && len(nodes) < maxCachedNodes {
				c.byID = make(map[wire.NodeID]Node, len(nodes))
				for _, n := range nodes {
					c.byID[n.ID] = n
				}
				c.complete, c.dirty = true, map[wire.NodeID]bool{}
			}
			c.mu.Unlock()
			return c.finish(nodes, o), nil
		}
		fresh := make(map[wire.NodeID]*Node, len(dirty))
		for _, id := range dirty {
			n, err := getNode(ctx, c.s.db, "id = ?", int64(id))
			switch {
			case err == nil:
				fresh[id] = &n
			case errors.Is(err, ErrNotFound):
				fresh[id] = nil
			default:
				return nil, err
			}
		}
		c.mu.Lock()
		if c.epoch != epoch {
			c.mu.Unlock()
			continue // written meanwhile: read what changed again
		}
		for id, n := range fresh {
			if n == nil {
				delete(c.byID, id)
			} else {
				c.byID[id] = *n
			}
			delete(c.dirty, id)
		}
		nodes := make([]Node, 0, len(c.byID))
		for _, n := range c.byID {
			nodes = append(nodes, n)
		}
		c.mu.Unlock()
		slices.SortFunc(nodes, func(a, b Node) int { return cmp.Compare(a.ID, b.ID) })
		return c.finish(nodes, o), nil
	}
	// Written to all the time: read it all.
	o := c.all()
	nodes, err := queryAll(ctx, c.s.db, scanNode, `SELECT `+nodeCols+` FROM nodes ORDER BY id`)
	if err != nil {
		return nil, err
	}
	return c.finish(nodes, o), nil
}

// finish gives nodes slices of their own and applies o.
func (c *nodeCache) finish(nodes []Node, o overlay) []Node {
	for i := range nodes {
		n := &nodes[i]
		n.Tags, n.Endpoints, n.SecretHash = slices.Clone(n.Tags), slices.Clone(n.Endpoints), slices.Clone(n.SecretHash)
		o.apply(n)
	}
	return nodes
}

// all is the overlay of every node, for a listing.
func (c *nodeCache) all() overlay {
	c.mu.Lock()
	defer c.mu.Unlock()
	return overlay{lastSeen: maps(c.lastSeen), network: maps(c.network)}
}

func maps[V any](m map[wire.NodeID]V) map[wire.NodeID]V {
	out := make(map[wire.NodeID]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// invalidate forgets the cached nodes ids after a write to their rows;
// network also drops their held network update (the write set it).
func (c *nodeCache) invalidate(network bool, ids ...wire.NodeID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.epoch++
	for _, id := range ids {
		if id == 0 {
			continue
		}
		delete(c.byID, id)
		if c.complete {
			c.dirty[id] = true
		}
		if network {
			delete(c.network, id)
		}
	}
}

// reset forgets everything cached and held (the table was replaced).
func (c *nodeCache) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.epoch++
	c.byID, c.dirty, c.complete = map[wire.NodeID]Node{}, map[wire.NodeID]bool{}, false
	c.lastSeen, c.network = map[wire.NodeID]time.Time{}, map[wire.NodeID]pendingNetwork{}
}

// holdLastSeen and holdNetwork take an update to write later.
func (c *nodeCache) holdLastSeen(id wire.NodeID, t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lastSeen[id] = t
}

func (c *nodeCache) holdNetwork(id wire.NodeID, port uint16, eps []netip.AddrPort) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.network[id] = pendingNetwork{port: port, eps: slices.Clone(eps)}
}

func (c *nodeCache) run() {
	defer c.wg.Done()
	t := time.NewTicker(lazyFlush)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			c.flush()
		case <-c.stopc:
			c.flush()
			return
		}
	}
}

// flush writes the held updates in one transaction. They stay held (and
// shown) until it committed; an update held again meanwhile stays for the
// next flush.
func (c *nodeCache) flush() {
	o := c.all()
	if len(o.lastSeen) == 0 && len(o.network) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := c.s.tx(ctx, func(tx *dbTx) error {
		for id, t := range o.lastSeen {
			if _, err := tx.ExecContext(ctx, `UPDATE nodes SET last_seen = ? WHERE id = ?`, unixNano(t), int64(id)); err != nil {
				return err
			}
		}
		for id, p := range o.network {
			if _, err := tx.ExecContext(ctx, `UPDATE nodes SET listen_port = ?, endpoints = ? WHERE id = ?`, int(p.port), jsonText(p.eps), int64(id)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return // held still: the next flush tries again
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// The rows hold the values now: so do the cached nodes.
	c.epoch++
	for id, t := range o.lastSeen {
		if n, ok := c.byID[id]; ok {
			n.LastSeen = t
			c.byID[id] = n
		}
		if c.lastSeen[id].Equal(t) {
			delete(c.lastSeen, id)
		}
	}
	for id, p := range o.network {
		if n, ok := c.byID[id]; ok {
			n.ListenPort, n.Endpoints = p.port, p.eps
			c.byID[id] = n
		}
		if q, ok := c.network[id]; ok && q.port == p.port && slices.Equal(q.eps, p.eps) {
			delete(c.network, id)
		}
	}
}

// close writes what is held and stops the flushes.
func (c *nodeCache) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.stopc)
	c.wg.Wait()
}
