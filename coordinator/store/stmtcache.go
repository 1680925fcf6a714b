package store

import (
	"context"
	"database/sql"
	"sync"
	"time"
)

// stmtCache keeps the store's statements prepared, by query. SQLite
// (modernc.org/sqlite) parses and plans a statement on every call that
// passes a query string: a registration runs about ten, and preparing them
// was most of the batch writer's time (70% of its CPU at 1,000 nodes
// joining). A prepared statement is reused on every connection it was
// prepared on; inside a transaction Tx.StmtContext binds it to the
// transaction's connection.
type stmtCache struct {
	db *sql.DB

	mu sync.Mutex // guards m
	m  map[string]*sql.Stmt
}

// maxCachedStmts bounds the statements kept: the store's queries are a
// fixed set, and a query past the bound runs unprepared as before.
const maxCachedStmts = 512

// prepareWait bounds how long preparing a statement waits for a free
// connection of the pool: the batch writer prepares while it holds one,
// and must never wait for the readers.
const prepareWait = 100 * time.Millisecond

func newStmtCache(db *sql.DB) *stmtCache {
	return &stmtCache{db: db, m: map[string]*sql.Stmt{}}
}

// get returns q prepared, or nil (the caller then runs q as a string): the
// cache is full, or preparing failed or found no free connection in time.
func (c *stmtCache) get(q string) *sql.Stmt {
	c.mu.Lock()
	st, ok := c.m[q]
	full := len(c.m) >= maxCachedStmts
	c.mu.Unlock()
	if ok || full {
		return st
	}
	ctx, cancel := context.WithTimeout(context.Background(), prepareWait)
	st, err := c.db.PrepareContext(ctx, q)
	cancel()
	if err != nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.m[q]; ok {
		st.Close() // prepared meanwhile by another caller
		return old
	}
	if len(c.m) >= maxCachedStmts {
		st.Close()
		return nil
	}
	c.m[q] = st
	return st
}

// close closes every statement kept.
func (c *stmtCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for q, st := range c.m {
		st.Close()
		delete(c.m, q)
	}
}
