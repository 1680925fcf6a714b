package store

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// This file holds the SQL implementation of Store that SQLite and
// PostgreSQL share: the queries are written once, with ? placeholders, and
// each database's dialect adapts them (numbered placeholders, the lock that
// serialises write transactions). Each database has its own migration list
// (sqlite.go, postgres.go) describing the same schema.

// Options tune a store; the zero value is the default for each.
type Options struct {
	// Now is the clock of idle and removal times; nil is time.Now.
	Now func() time.Time
	// MaxServicesPerNode bounds the services one node provides; exposing
	// one more is a *QuotaError. 0: no bound but the VIP space.
	MaxServicesPerNode int
	// NodeQuarantine is how long the addresses of a removed node stay
	// unused, so that no new node gets an address an old peer may still
	// route to the removed one; default DefaultNodeQuarantine.
	NodeQuarantine time.Duration
	// NodePoolSize bounds the node address indices handed out (1 to
	// NodePoolSize); 0 or more than wire.NodePrefix4 holds is all of it.
	// Tests make it small.
	NodePoolSize int64
}

// DefaultNodeQuarantine is the default Options.NodeQuarantine.
const DefaultNodeQuarantine = 24 * time.Hour

// maxNodePool is the number of node addresses in wire.NodePrefix4 (less
// the network and broadcast addresses).
var maxNodePool = int64(1)<<(32-wire.NodePrefix4.Bits()) - 2

// QuotaError refuses a node a service over Options.MaxServicesPerNode.
type QuotaError struct {
	Limit int
}

func (e *QuotaError) Error() string {
	return fmt.Sprintf("store: the node provides %d services, the limit", e.Limit)
}

// sqlStore is the Store over a database/sql handle; SQLite and Postgres
// wrap it.
type sqlStore struct {
	db         *dbConn
	opts       Options  // defaults applied; read-only after open
	migrations []string // this database's migration list
	// w, when set (SQLite), is the one writer, which commits the queued
	// writes together (writer.go); PostgreSQL: nil, each write its own
	// transaction on the pool.
	w *batchWriter
	// nodes, when set (SQLite, whose one coordinator makes every write),
	// caches nodes by ID and holds their coalesced last-seen and network
	// updates (nodecache.go).
	nodes *nodeCache
	// events queues the event log's writes (events.go).
	events *eventQueue
}

// exec runs one write statement (through the batch writer, if any).
func (s *sqlStore) exec(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if s.w == nil {
		return s.db.ExecContext(ctx, query, args...)
	}
	var res sql.Result
	err := s.w.do(ctx, func(tx *dbTx) error {
		var err error
		res, err = tx.ExecContext(ctx, query, args...)
		return err
	})
	return res, err
}

func (o *Options) applyDefaults() {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.NodeQuarantine <= 0 {
		o.NodeQuarantine = DefaultNodeQuarantine
	}
	if o.NodePoolSize <= 0 || o.NodePoolSize > maxNodePool {
		o.NodePoolSize = maxNodePool
	}
	if o.MaxServicesPerNode < 0 {
		o.MaxServicesPerNode = 0
	}
}

// dialect is what differs between the databases for the shared queries.
type dialect struct {
	// numbered: placeholders are $1, $2 … (PostgreSQL) rather than ?.
	numbered bool
	// txLock, when set, is run first in every transaction: it serialises
	// writers the way SQLite's BEGIN IMMEDIATE does, so that the
	// read-check-write sequences (a single-use token, the lowest free VIP,
	// the next node address) stay atomic across connections and across
	// coordinators sharing the database.
	txLock string
	// retryable reports an error after which the whole transaction may be
	// run again (a serialization failure or a deadlock).
	retryable func(error) bool
	// bigint is the type of a column holding nanoseconds.
	bigint string
	cache  *sync.Map // query → rebound query
}

// rebind turns the ? and ?N placeholders of q into the dialect's.
func (d dialect) rebind(q string) string {
	if !d.numbered {
		return q
	}
	if v, ok := d.cache.Load(q); ok {
		return v.(string)
	}
	var b strings.Builder
	n := 0
	for i := 0; i < len(q); i++ {
		if q[i] != '?' {
			b.WriteByte(q[i])
			continue
		}
		j := i + 1
		for j < len(q) && q[j] >= '0' && q[j] <= '9' {
			j++
		}
		b.WriteByte('$')
		if j > i+1 {
			b.WriteString(q[i+1 : j])
		} else {
			n++
			b.WriteString(strconv.Itoa(n))
		}
		i = j - 1
	}
	out := b.String()
	d.cache.Store(q, out)
	return out
}

// dbConn is a database handle whose queries take ? placeholders whatever
// the database.
type dbConn struct {
	*sql.DB
	d dialect
	// stmts, when set, keeps every query prepared (SQLite: stmtcache.go).
	stmts *stmtCache
}

func (c *dbConn) stmt(q string) *sql.Stmt {
	if c.stmts == nil {
		return nil
	}
	return c.stmts.get(q)
}

func (c *dbConn) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	q = c.d.rebind(q)
	if st := c.stmt(q); st != nil {
		return st.ExecContext(ctx, args...)
	}
	return c.DB.ExecContext(ctx, q, args...)
}

func (c *dbConn) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	q = c.d.rebind(q)
	if st := c.stmt(q); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return c.DB.QueryContext(ctx, q, args...)
}

func (c *dbConn) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	q = c.d.rebind(q)
	if st := c.stmt(q); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return c.DB.QueryRowContext(ctx, q, args...)
}

// Close closes the kept statements, then the database.
func (c *dbConn) Close() error {
	if c.stmts != nil {
		c.stmts.close()
	}
	return c.DB.Close()
}

// beginTx starts a transaction; ctx, when not nil, is the one every
// statement of it runs on (dbTx.ctx).
func (c *dbConn) beginTx(ctx, stmtCtx context.Context) (*dbTx, error) {
	stx, err := c.DB.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	return &dbTx{Tx: stx, d: c.d, ctx: stmtCtx, conn: c}, nil
}

// dbTx is a transaction of a dbConn.
type dbTx struct {
	*sql.Tx
	d dialect
	// ctx, when set, replaces the context of every statement: a
	// transaction the batch writer shares between callers must not be
	// interrupted by one caller's cancellation (SQLite rolls the whole
	// transaction back on an interrupted write).
	ctx context.Context
	// conn is the handle the transaction belongs to, for its kept
	// statements; stmts, those bound to this transaction so far.
	conn  *dbConn
	stmts map[*sql.Stmt]*sql.Stmt
}

func (t *dbTx) c(ctx context.Context) context.Context {
	if t.ctx != nil {
		return t.ctx
	}
	return ctx
}

// stmt returns q prepared and bound to the transaction, or nil.
func (t *dbTx) stmt(ctx context.Context, q string) *sql.Stmt {
	if t.conn == nil {
		return nil
	}
	st := t.conn.stmt(q)
	if st == nil {
		return nil
	}
	if ts := t.stmts[st]; ts != nil {
		return ts
	}
	if t.stmts == nil {
		t.stmts = map[*sql.Stmt]*sql.Stmt{}
	}
	ts := t.Tx.StmtContext(ctx, st)
	t.stmts[st] = ts
	return ts
}

func (t *dbTx) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	ctx, q = t.c(ctx), t.d.rebind(q)
	if st := t.stmt(ctx, q); st != nil {
		return st.ExecContext(ctx, args...)
	}
	return t.Tx.ExecContext(ctx, q, args...)
}

func (t *dbTx) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	ctx, q = t.c(ctx), t.d.rebind(q)
	if st := t.stmt(ctx, q); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return t.Tx.QueryContext(ctx, q, args...)
}

func (t *dbTx) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	ctx, q = t.c(ctx), t.d.rebind(q)
	if st := t.stmt(ctx, q); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return t.Tx.QueryRowContext(ctx, q, args...)
}

// ErrSchemaNewer refuses a database a newer meshlink has migrated.
var ErrSchemaNewer = errors.New("store: the database was migrated by a newer meshlink")

// SchemaVersion returns the number of applied migrations.
func (s *sqlStore) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}

func (s *sqlStore) migrate(ctx context.Context) error {
	// In a transaction of its own, so that coordinators starting together
	// on one PostgreSQL database create it once (txLock).
	if err := s.tx(ctx, func(tx *dbTx) error {
		_, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, applied `+s.db.d.bigint+` NOT NULL)`)
		return err
	}); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	v, err := s.SchemaVersion(ctx)
	if err != nil {
		return fmt.Errorf("read the schema version: %w", err)
	}
	if v > len(s.migrations) {
		return fmt.Errorf("%w: it is at schema version %d, this meshlink knows %d; run the newer meshlink, or restore a backup from before the upgrade",
			ErrSchemaNewer, v, len(s.migrations))
	}
	for i, m := range s.migrations {
		version := i + 1
		err := s.tx(ctx, func(tx *dbTx) error {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations WHERE version = ?`, version).Scan(&n); err != nil {
				return err
			}
			if n > 0 {
				return nil
			}
			if _, err := tx.ExecContext(ctx, m); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied) VALUES (?, ?)`, version, time.Now().UnixNano())
			return err
		})
		if err != nil {
			return fmt.Errorf("migration %d: %w", version, err)
		}
	}
	return nil
}

// maxTxAttempts bounds the runs of a transaction that keeps failing with
// a retryable error.
const maxTxAttempts = 5

// tx runs f in a write transaction, again (up to maxTxAttempts) when the
// database says it may be retried; f must therefore set its results
// afresh on each run.
func (s *sqlStore) tx(ctx context.Context, f func(*dbTx) error) error {
	if s.w != nil {
		return s.w.do(ctx, f)
	}
	var err error
	for attempt := 1; attempt <= maxTxAttempts; attempt++ {
		err = s.tx1(ctx, f)
		if err == nil || s.db.d.retryable == nil || !s.db.d.retryable(err) || ctx.Err() != nil {
			return err
		}
	}
	return err
}

func (s *sqlStore) tx1(ctx context.Context, f func(*dbTx) error) error {
	tx, err := s.db.beginTx(ctx, nil)
	if err != nil {
		return err
	}
	if s.db.d.txLock != "" {
		if _, err := tx.ExecContext(ctx, s.db.d.txLock); err != nil {
			tx.Rollback()
			return err
		}
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Close writes what is queued and closes the database.
func (s *sqlStore) Close() error {
	if s.events != nil {
		s.events.close()
	}
	if s.nodes != nil {
		s.nodes.close()
	}
	if s.w != nil {
		s.w.close()
	}
	return s.db.Close()
}

// isUniqueViolation reports whether err is the database refusing a row
// that would repeat the value of a UNIQUE column or of a primary key.
func isUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "23505" // unique_violation
	}
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	switch se.Code() {
	case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
		return true
	}
	return false
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func jsonText(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// CreateUser implements Store.
func (s *sqlStore) CreateUser(ctx context.Context, u User) (User, error) {
	if u.Created.IsZero() {
		u.Created = time.Now()
	}
	err := s.tx(ctx, func(tx *dbTx) error {
		return tx.QueryRowContext(ctx, `INSERT INTO users (username, password_hash, admin, created, must_change_password, pending) VALUES (?, ?, ?, ?, ?, ?) RETURNING id`,
			u.Username, u.PasswordHash, b2i(u.Admin), unixNano(u.Created), b2i(u.MustChangePassword), b2i(u.Pending)).Scan(&u.ID)
	})
	if isUniqueViolation(err) {
		return u, fmt.Errorf("store: create user %q: %w", u.Username, ErrExists)
	}
	if err != nil {
		return u, fmt.Errorf("store: create user %q: %w", u.Username, err)
	}
	return u, nil
}

// GetUser implements Store.
func (s *sqlStore) GetUser(ctx context.Context, username string) (User, error) {
	u, err := scanUser(s.db.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE username = ?`, username))
	if errors.Is(err, sql.ErrNoRows) {
		return u, fmt.Errorf("user %q: %w", username, ErrNotFound)
	}
	return u, err
}

// SetPassword implements Store.
func (s *sqlStore) SetPassword(ctx context.Context, id int64, hash string, keep []byte) error {
	err := s.tx(ctx, func(tx *dbTx) error {
		res, err := tx.ExecContext(ctx, `UPDATE users SET password_hash = ?, must_change_password = 0 WHERE id = ?`, hash, id)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("user %d: %w", id, ErrNotFound)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM sessions WHERE user_id = ? AND id_hash != ?`, id, nonNilBytes(keep)); err != nil {
			return fmt.Errorf("end sessions: %w", err)
		}
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return err
	} else if err != nil {
		return fmt.Errorf("store: set password of user %d: %w", id, err)
	}
	return nil
}

// ApproveUser implements Store.
func (s *sqlStore) ApproveUser(ctx context.Context, id int64) error {
	res, err := s.exec(ctx, `UPDATE users SET pending = 0 WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("store: approve user %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("user %d: %w", id, ErrNotFound)
	}
	return nil
}

// DeleteUser implements Store.
func (s *sqlStore) DeleteUser(ctx context.Context, id int64) ([]string, error) {
	var revoked []string
	err := s.tx(ctx, func(tx *dbTx) error {
		revoked = nil
		var admin int
		if err := tx.QueryRowContext(ctx, `SELECT admin FROM users WHERE id = ?`, id).Scan(&admin); errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("user %d: %w", id, ErrNotFound)
		} else if err != nil {
			return err
		}
		if admin != 0 {
			var others int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM users WHERE admin != 0 AND id != ?`, id).Scan(&others); err != nil {
				return err
			}
			if others == 0 {
				return ErrLastAdmin
			}
		}
		rows, err := tx.QueryContext(ctx, `UPDATE tokens SET revoked = 1 WHERE owner_id = ? AND revoked = 0 RETURNING id`, id)
		if err != nil {
			return err
		}
		for rows.Next() {
			var tid string
			if err := rows.Scan(&tid); err != nil {
				rows.Close()
				return err
			}
			revoked = append(revoked, tid)
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM sessions WHERE user_id = ?`, id); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE services SET owner_id = 0 WHERE owner_id = ?`, id); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM users WHERE id = ?`, id)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("store: delete user %d: %w", id, err)
	}
	return revoked, nil
}

func nonNilBytes(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// CountUsers implements Store.
func (s *sqlStore) CountUsers(ctx context.Context) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM users`).Scan(&n)
	return n, err
}

// CreateToken implements Store.
func (s *sqlStore) CreateToken(ctx context.Context, t Token) error {
	if t.Created.IsZero() {
		t.Created = time.Now()
	}
	_, err := s.exec(ctx, `INSERT INTO tokens (id, secret_hash, reusable, ephemeral, tags, expires, uses, revoked, created, owner_id, relay, key_expiry)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		t.ID, t.SecretHash, b2i(t.Reusable), b2i(t.Ephemeral), jsonText(nonNil(t.Tags)), unixNano(t.Expires), t.Uses, b2i(t.Revoked), unixNano(t.Created), t.OwnerID, b2i(t.Relay), int64(t.KeyExpiry))
	if err != nil {
		return fmt.Errorf("store: create token: %w", err)
	}
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

type scanner interface{ Scan(...any) error }

// queryAll runs q and scans every row with scan.
func queryAll[T any](ctx context.Context, db *dbConn, scan func(scanner) (T, error), q string, args ...any) ([]T, error) {
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

const tokenCols = `id, secret_hash, reusable, ephemeral, tags, expires, uses, revoked, created, owner_id, relay, key_expiry`

func scanToken(r scanner) (Token, error) {
	var t Token
	var reusable, ephemeral, revoked, relay int
	var tags string
	var expires, created, keyExpiry int64
	if err := r.Scan(&t.ID, &t.SecretHash, &reusable, &ephemeral, &tags, &expires, &t.Uses, &revoked, &created, &t.OwnerID, &relay, &keyExpiry); err != nil {
		return t, err
	}
	t.KeyExpiry = time.Duration(keyExpiry)
	t.Reusable, t.Ephemeral, t.Revoked, t.Relay = reusable != 0, ephemeral != 0, revoked != 0, relay != 0
	t.Expires, t.Created = fromUnixNano(expires), fromUnixNano(created)
	_ = json.Unmarshal([]byte(tags), &t.Tags)
	return t, nil
}

type querier interface {
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
}

func getToken(ctx context.Context, q querier, id string) (Token, error) {
	t, err := scanToken(q.QueryRowContext(ctx, `SELECT `+tokenCols+` FROM tokens WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return t, fmt.Errorf("token %q: %w", id, ErrNotFound)
	}
	return t, err
}

// GetToken implements Store.
func (s *sqlStore) GetToken(ctx context.Context, id string) (Token, error) {
	return getToken(ctx, s.db, id)
}

// ListTokens implements Store.
func (s *sqlStore) ListTokens(ctx context.Context) ([]Token, error) {
	return queryAll(ctx, s.db, scanToken, `SELECT `+tokenCols+` FROM tokens ORDER BY created`)
}

// RevokeToken implements Store.
func (s *sqlStore) RevokeToken(ctx context.Context, id string) error {
	res, err := s.exec(ctx, `UPDATE tokens SET revoked = 1 WHERE id = ?`, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("token %q: %w", id, ErrNotFound)
	}
	return nil
}

const nodeCols = `id, name, hostname, wg_key, ipv4, ipv6, secret_hash, token_id, tags, ephemeral, created, last_seen, listen_port, endpoints, owner_id, key_expiry, key_lifetime, region, heartbeat`

func scanNode(r scanner) (Node, error) {
	var n Node
	var id int64
	var key, v4, v6, tags, eps string
	var eph int
	var created, lastSeen, keyExpiry, keyLifetime, heartbeat int64
	var port int
	if err := r.Scan(&id, &n.Name, &n.Hostname, &key, &v4, &v6, &n.SecretHash, &n.TokenID, &tags, &eph, &created, &lastSeen, &port, &eps, &n.OwnerID, &keyExpiry, &keyLifetime, &n.Region, &heartbeat); err != nil {
		return n, err
	}
	n.Heartbeat = fromUnixNano(heartbeat)
	n.KeyExpiry, n.KeyLifetime = fromUnixNano(keyExpiry), time.Duration(keyLifetime)
	n.ID, n.Key, n.Ephemeral = wire.NodeID(id), storedKey(key), eph != 0
	n.Created, n.LastSeen, n.ListenPort = fromUnixNano(created), fromUnixNano(lastSeen), uint16(port)
	n.IPv4, _ = netip.ParseAddr(v4)
	n.IPv6, _ = netip.ParseAddr(v6)
	_ = json.Unmarshal([]byte(tags), &n.Tags)
	_ = json.Unmarshal([]byte(eps), &n.Endpoints)
	return n, nil
}

func getNode(ctx context.Context, q querier, where string, arg any) (Node, error) {
	n, err := scanNode(q.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE `+where, arg))
	if errors.Is(err, sql.ErrNoRows) {
		return n, fmt.Errorf("node %v: %w", arg, ErrNotFound)
	}
	return n, err
}

// GetNode implements Store.
func (s *sqlStore) GetNode(ctx context.Context, id wire.NodeID) (Node, error) {
	if s.nodes == nil {
		return getNode(ctx, s.db, "id = ?", int64(id))
	}
	n, ok, epoch, o := s.nodes.get(id)
	if ok {
		return n, nil
	}
	n, err := getNode(ctx, s.db, "id = ?", int64(id))
	if err != nil {
		return n, err
	}
	s.nodes.fill(n, epoch)
	o.apply(&n)
	return n, nil
}

// ListNodes implements Store.
func (s *sqlStore) ListNodes(ctx context.Context) ([]Node, error) {
	if s.nodes == nil {
		return queryAll(ctx, s.db, scanNode, `SELECT `+nodeCols+` FROM nodes ORDER BY id`)
	}
	return s.nodes.list(ctx)
}

// invalidate tells the node cache, if any, that the rows of ids were
// written; network: their listen port and endpoints too.
func (s *sqlStore) invalidate(network bool, ids ...wire.NodeID) {
	if s.nodes != nil {
		s.nodes.invalidate(network, ids...)
	}
}

// allocNodeAddrs hands out the addresses of a new node: a never-used index
// while the pool has one, then the addresses of the node removed longest
// ago, once its quarantine has passed.
func (s *sqlStore) allocNodeAddrs(ctx context.Context, tx *dbTx, now time.Time) (v4, v6 netip.Addr, err error) {
	var idx int64
	err = tx.QueryRowContext(ctx, `UPDATE counters SET value = value + 1 WHERE name = 'node_addr' AND value < ? RETURNING value`,
		s.opts.NodePoolSize).Scan(&idx)
	if err == nil {
		return NodeAddrs(idx)
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return v4, v6, err
	}
	var id int64
	var a4, a6 string
	err = tx.QueryRowContext(ctx, `SELECT id, ipv4, ipv6 FROM removed_nodes
		WHERE ipv4 != '' AND removed <= ? AND ipv4 NOT IN (SELECT ipv4 FROM nodes)
		ORDER BY removed, id LIMIT 1`, unixNano(now.Add(-s.opts.NodeQuarantine))).Scan(&id, &a4, &a6)
	if errors.Is(err, sql.ErrNoRows) {
		return v4, v6, ErrExhausted
	} else if err != nil {
		return v4, v6, err
	}
	// The tombstone stays (its node's calls still get node_removed); its
	// addresses are the new node's now.
	if _, err := tx.ExecContext(ctx, `UPDATE removed_nodes SET ipv4 = '', ipv6 = '' WHERE id = ?`, id); err != nil {
		return v4, v6, err
	}
	if v4, err = netip.ParseAddr(a4); err != nil {
		return v4, v6, fmt.Errorf("removed node %d: stored address: %w", id, err)
	}
	if v6, err = netip.ParseAddr(a6); err != nil {
		return v4, v6, fmt.Errorf("removed node %d: stored address: %w", id, err)
	}
	return v4, v6, nil
}

func deleteNode(ctx context.Context, tx *dbTx, n Node, now time.Time) error {
	// Services this node was the last provider of begin their grace.
	if _, err := tx.ExecContext(ctx, `UPDATE services SET idle_since = ?
		WHERE idle_since = 0 AND name IN (SELECT service FROM providers WHERE node_id = ?)
		AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.service = services.name AND p.node_id != ?)`,
		unixNano(now), int64(n.ID), int64(n.ID)); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM nodes WHERE id = ?`, int64(n.ID)); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO removed_nodes (id, name, secret_hash, removed, ipv4, ipv6) VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET name = excluded.name, secret_hash = excluded.secret_hash, removed = excluded.removed,
		ipv4 = excluded.ipv4, ipv6 = excluded.ipv6`,
		int64(n.ID), n.Name, n.SecretHash, unixNano(now), addrText(n.IPv4), addrText(n.IPv6))
	return err
}

func addrText(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// RegisterNode implements Store.
func (s *sqlStore) RegisterNode(ctx context.Context, r Registration) (RegisterResult, error) {
	var res RegisterResult
	if r.Now.IsZero() {
		r.Now = s.opts.Now()
	}
	err := s.tx(ctx, func(tx *dbTx) error {
		res = RegisterResult{}
		var tok Token
		if a := r.Approval; a != nil {
			// An approved node is owned by its approver and carries no
			// token, tags or ephemerality.
			tok = Token{OwnerID: a.OwnerID}
		} else {
			var err error
			tok, err = getToken(ctx, tx, r.TokenID)
			if errors.Is(err, ErrNotFound) {
				return ErrTokenInvalid
			} else if err != nil {
				return err
			}
			if !HashMatches(tok.SecretHash, r.TokenSecret) {
				return ErrTokenInvalid
			}
			if tok.Revoked {
				return ErrTokenRevoked
			}
			if tok.Relay {
				return ErrTokenKind
			}
		}
		existing, err := getNode(ctx, tx, "name = ?", r.Name)
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return err
		case existing.Key == r.Key:
			// The same node again (its state was lost, or an answer was):
			// keep its identity, hand it a new secret — only to whoever
			// holds its private key, and only with its owner's authority.
			if err := mayRenew(ctx, tx, existing, tok, r); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE nodes SET secret_hash = ?, hostname = ?, listen_port = ?, endpoints = ? WHERE id = ?`,
				r.SecretHash, r.Hostname, int(r.ListenPort), jsonText(r.Endpoints), int64(existing.ID)); err != nil {
				return err
			}
			existing.SecretHash, existing.Hostname, existing.ListenPort, existing.Endpoints = r.SecretHash, r.Hostname, r.ListenPort, r.Endpoints
			res.Node, res.Existing = existing, true
			return nil
		case r.CanReplace != nil && r.CanReplace(existing):
			if err := deleteNode(ctx, tx, existing, r.Now); err != nil {
				return err
			}
			res.Replaced = existing.ID
		default:
			return ErrNameInUse
		}
		if _, err := getNode(ctx, tx, "wg_key = ?", r.Key.String()); err == nil {
			return ErrKeyInUse
		} else if !errors.Is(err, ErrNotFound) {
			return err
		}
		if r.Approval == nil {
			if err := consume(ctx, tx, tok, r); err != nil {
				return err
			}
		}
		v4, v6, err := s.allocNodeAddrs(ctx, tx, r.Now)
		if err != nil {
			return err
		}
		n := Node{
			Name: r.Name, Hostname: r.Hostname, Key: r.Key, IPv4: v4, IPv6: v6,
			SecretHash: r.SecretHash, TokenID: tok.ID, Tags: tok.Tags, Ephemeral: tok.Ephemeral,
			Created: r.Now, ListenPort: r.ListenPort, Endpoints: r.Endpoints, OwnerID: tok.OwnerID,
			KeyLifetime: tok.KeyExpiry,
		}
		if l := KeyLifetime(r.KeyLifetime, n.KeyLifetime); l > 0 {
			n.KeyExpiry = r.Now.Add(l)
		}
		var id int64
		err = tx.QueryRowContext(ctx, `INSERT INTO nodes (name, hostname, wg_key, ipv4, ipv6, secret_hash, token_id, tags, ephemeral, created, last_seen, listen_port, endpoints, owner_id, key_expiry, key_lifetime)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?) RETURNING id`,
			n.Name, n.Hostname, n.Key.String(), v4.String(), v6.String(), n.SecretHash, n.TokenID, jsonText(nonNil(n.Tags)),
			b2i(n.Ephemeral), unixNano(n.Created), int(n.ListenPort), jsonText(n.Endpoints), n.OwnerID, unixNano(n.KeyExpiry), int64(n.KeyLifetime)).Scan(&id)
		if err != nil {
			return err
		}
		n.ID = wire.NodeID(id)
		res.Node = n
		return nil
	})
	if err == nil {
		s.invalidate(true, res.Node.ID, res.Replaced)
	}
	return res, err
}

// mayRenew decides whether r may renew existing, the node of the same name
// and key: the registrant proved it holds the key, and either a person who
// owns the node (or an admin) approved it, or the token is the node's owner's
// and valid now — the node's own token need not have uses left (the use was
// this node's), any other token is checked and spends a use.
func mayRenew(ctx context.Context, tx *dbTx, existing Node, tok Token, r Registration) error {
	if !r.KeyProven {
		return ErrKeyUnproven
	}
	if a := r.Approval; a != nil {
		if !a.Admin && existing.OwnerID != a.OwnerID {
			return ErrNameInUse
		}
		return nil
	}
	if tok.OwnerID != existing.OwnerID {
		return ErrNameInUse
	}
	if existing.TokenID != tok.ID {
		return consume(ctx, tx, tok, r)
	}
	if !tok.Expires.IsZero() && !r.Now.Before(tok.Expires) {
		return ErrTokenExpired
	}
	return nil
}

// consume checks tok for a new use and takes one, atomically with the
// caller's transaction.
func consume(ctx context.Context, tx *dbTx, tok Token, r Registration) error {
	return consumeToken(ctx, tx, tok, r.TokenSecret, r.Now)
}

// consumeToken checks tok against secret at now and spends one use of it.
func consumeToken(ctx context.Context, tx *dbTx, tok Token, secret string, now time.Time) error {
	if err := tok.Check(secret, now); err != nil {
		return err
	}
	res, err := tx.ExecContext(ctx, `UPDATE tokens SET uses = uses + 1 WHERE id = ? AND revoked = 0 AND (reusable = 1 OR uses = 0)`, tok.ID)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return ErrTokenUsed
	}
	return nil
}

// UpdateNodeNetwork implements Store.
func (s *sqlStore) UpdateNodeNetwork(ctx context.Context, id wire.NodeID, k key.Public, listenPort uint16, eps []netip.AddrPort) error {
	if s.nodes != nil && k.IsZero() {
		// Held and written with the next flush (nodecache.go).
		if _, err := s.GetNode(ctx, id); err != nil {
			return err
		}
		s.nodes.holdNetwork(id, listenPort, eps)
		return nil
	}
	defer s.invalidate(true, id)
	res, err := s.exec(ctx, `UPDATE nodes SET wg_key = CASE WHEN ? = '' THEN wg_key ELSE ? END, listen_port = ?, endpoints = ? WHERE id = ?`,
		k.String(), k.String(), int(listenPort), jsonText(eps), int64(id))
	if isUniqueViolation(err) {
		// wg_key is the only UNIQUE column this sets.
		return fmt.Errorf("store: update node %d: %w", id, ErrKeyInUse)
	}
	if err != nil {
		return fmt.Errorf("store: update node %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

// UpdateNodeKey implements Store.
func (s *sqlStore) UpdateNodeKey(ctx context.Context, id wire.NodeID, k key.Public, expiry time.Time) error {
	if k.IsZero() {
		return fmt.Errorf("store: update node %d: no key", id)
	}
	defer s.invalidate(false, id)
	res, err := s.exec(ctx, `UPDATE nodes SET wg_key = ?, key_expiry = ? WHERE id = ?`, k.String(), unixNano(expiry), int64(id))
	if isUniqueViolation(err) {
		return fmt.Errorf("store: update node %d: %w", id, ErrKeyInUse)
	}
	if err != nil {
		return fmt.Errorf("store: update node %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

// SetNodeKeyExpiry implements Store.
func (s *sqlStore) SetNodeKeyExpiry(ctx context.Context, id wire.NodeID, expiry time.Time) error {
	defer s.invalidate(false, id)
	res, err := s.exec(ctx, `UPDATE nodes SET key_expiry = ? WHERE id = ?`, unixNano(expiry), int64(id))
	if err != nil {
		return fmt.Errorf("store: update node %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

// SetHeartbeat implements Store.
func (s *sqlStore) SetHeartbeat(ctx context.Context, id wire.NodeID, t time.Time) error {
	defer s.invalidate(false, id)
	_, err := s.exec(ctx, `UPDATE nodes SET heartbeat = ? WHERE id = ?`, unixNano(t), int64(id))
	return err
}

// SetLastSeen implements Store.
func (s *sqlStore) SetLastSeen(ctx context.Context, id wire.NodeID, t time.Time) error {
	if s.nodes != nil {
		s.nodes.holdLastSeen(id, t) // written with the next flush
		return nil
	}
	_, err := s.exec(ctx, `UPDATE nodes SET last_seen = ? WHERE id = ?`, unixNano(t), int64(id))
	return err
}

// DeleteNode implements Store.
func (s *sqlStore) DeleteNode(ctx context.Context, id wire.NodeID) error {
	defer s.invalidate(true, id)
	return s.tx(ctx, func(tx *dbTx) error {
		n, err := getNode(ctx, tx, "id = ?", int64(id))
		if err != nil {
			return err
		}
		return deleteNode(ctx, tx, n, s.opts.Now())
	})
}

// RemovedNodeSecretHash implements Store.
func (s *sqlStore) RemovedNodeSecretHash(ctx context.Context, id wire.NodeID) ([]byte, error) {
	var h []byte
	err := s.db.QueryRowContext(ctx, `SELECT secret_hash FROM removed_nodes WHERE id = ?`, int64(id)).Scan(&h)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("removed node %d: %w", id, ErrNotFound)
	}
	return h, err
}

func scanService(r scanner) (Service, error) {
	var sv Service
	var vip string
	var port int
	var created int64
	if err := r.Scan(&sv.Name, &vip, &port, &created, &sv.OwnerID); err != nil {
		return sv, err
	}
	sv.VIP, _ = netip.ParseAddr(vip)
	sv.Port, sv.Created = uint16(port), fromUnixNano(created)
	return sv, nil
}

// GetPolicy implements Store.
func (s *sqlStore) GetPolicy(ctx context.Context) (StoredPolicy, error) {
	var p StoredPolicy
	var updated int64
	err := s.db.QueryRowContext(ctx, `SELECT text, updated, updated_by FROM policy WHERE id = 1`).Scan(&p.Text, &updated, &p.UpdatedBy)
	if errors.Is(err, sql.ErrNoRows) {
		return p, ErrNotFound
	} else if err != nil {
		return p, fmt.Errorf("store: get policy: %w", err)
	}
	p.Updated = fromUnixNano(updated)
	return p, nil
}

// SetPolicy implements Store.
func (s *sqlStore) SetPolicy(ctx context.Context, p StoredPolicy) error {
	_, err := s.exec(ctx, `INSERT INTO policy (id, text, updated, updated_by) VALUES (1, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET text = excluded.text, updated = excluded.updated, updated_by = excluded.updated_by`,
		p.Text, unixNano(p.Updated), p.UpdatedBy)
	if err != nil {
		return fmt.Errorf("store: set policy: %w", err)
	}
	return nil
}

// ExposeService implements Store.
func (s *sqlStore) ExposeService(ctx context.Context, name string, nodeID wire.NodeID, port uint16) (Service, error) {
	return s.ExposeServiceAs(ctx, name, nodeID, port, false)
}

// ExposeServiceAs implements Store.
func (s *sqlStore) ExposeServiceAs(ctx context.Context, name string, nodeID wire.NodeID, port uint16, policyOwned bool) (Service, error) {
	var sv Service
	err := s.tx(ctx, func(tx *dbTx) error {
		var owner int64
		if err := tx.QueryRowContext(ctx, `SELECT owner_id FROM nodes WHERE id = ?`, int64(nodeID)).Scan(&owner); errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		} else if err != nil {
			return err
		}
		if max := s.opts.MaxServicesPerNode; max > 0 {
			// Counted inside the write transaction, so racing exposes
			// cannot overshoot; re-exposing a service it provides (a new
			// port) is not one more.
			var others int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM providers WHERE node_id = ? AND service != ?`, int64(nodeID), name).Scan(&others); err != nil {
				return err
			}
			if others >= max {
				return &QuotaError{Limit: max}
			}
		}
		var err error
		sv, err = scanService(tx.QueryRowContext(ctx, `SELECT name, vip, port, created, owner_id FROM services WHERE name = ?`, name))
		if errors.Is(err, sql.ErrNoRows) {
			vip, err := lowestFreeVIP(ctx, tx)
			if err != nil {
				return err
			}
			sv = Service{Name: name, VIP: vip, Port: port, Created: s.opts.Now(), OwnerID: owner}
			if _, err := tx.ExecContext(ctx, `INSERT INTO services (name, vip, port, created, owner_id) VALUES (?, ?, ?, ?, ?)`,
				name, vip.String(), int(port), unixNano(sv.Created), owner); err != nil {
				return err
			}
		} else if err != nil {
			return err
		} else if sv.OwnerID == 0 {
			// Unowned (its providers were all ownerless): the first owner
			// to provide it takes it.
			sv.OwnerID = owner
			if _, err := tx.ExecContext(ctx, `UPDATE services SET owner_id = ? WHERE name = ?`, owner, name); err != nil {
				return err
			}
		} else if sv.OwnerID != owner && !policyOwned {
			return &NotOwnerError{Service: name, OwnerID: sv.OwnerID}
		}
		if _, err := tx.ExecContext(ctx, `UPDATE services SET idle_since = 0 WHERE name = ? AND idle_since != 0`, name); err != nil {
			return err
		}
		if sv.Port != port {
			// A new --port from the service's only provider is the port
			// consumers use from now on; with other providers the service
			// keeps its port (each provider has its own).
			var others int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM providers WHERE service = ? AND node_id != ?`, name, int64(nodeID)).Scan(&others); err != nil {
				return err
			}
			if others == 0 {
				sv.Port = port
				if _, err := tx.ExecContext(ctx, `UPDATE services SET port = ? WHERE name = ?`, int(port), name); err != nil {
					return err
				}
			}
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO providers (service, node_id, port) VALUES (?, ?, ?)
			ON CONFLICT (service, node_id) DO UPDATE SET port = excluded.port`, name, int64(nodeID), int(port))
		return err
	})
	if err != nil {
		return sv, fmt.Errorf("store: expose %q: %w", name, err)
	}
	return sv, nil
}

// vipSpace is the number of service VIPs (ServiceVIP's indices).
var vipSpace = int64(1) << (32 - wire.ServicePrefix.Bits()) / 256 * 254

// serviceVIPIndex inverts ServiceVIP.
func serviceVIPIndex(a netip.Addr) (int64, bool) {
	if !a.Is4() || !wire.ServicePrefix.Contains(a) {
		return 0, false
	}
	b, base := a.As4(), wire.ServicePrefix.Addr().As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	m := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	off := n - m
	third, fourth := int64(off>>8), int64(off&0xff)
	if fourth == 0 || fourth == 255 {
		return 0, false
	}
	return third*254 + fourth - 1, true
}

// lowestFreeVIP returns the VIP of the lowest index no service holds, so
// that the VIPs of deleted services are reused. New services are rare
// (bounded per node), so a scan of the VIP column is cheap enough.
func lowestFreeVIP(ctx context.Context, tx *dbTx) (netip.Addr, error) {
	rows, err := tx.QueryContext(ctx, `SELECT vip FROM services`)
	if err != nil {
		return netip.Addr{}, err
	}
	defer rows.Close()
	used := make([]bool, vipSpace)
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return netip.Addr{}, err
		}
		if a, err := netip.ParseAddr(v); err == nil {
			if i, ok := serviceVIPIndex(a); ok && i < vipSpace {
				used[i] = true
			}
		}
	}
	if err := rows.Err(); err != nil {
		return netip.Addr{}, err
	}
	for i, u := range used {
		if !u {
			return ServiceVIP(int64(i))
		}
	}
	return netip.Addr{}, ErrExhausted
}

// UnexposeService implements Store.
func (s *sqlStore) UnexposeService(ctx context.Context, name string, nodeID wire.NodeID) error {
	err := s.tx(ctx, func(tx *dbTx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM providers WHERE service = ? AND node_id = ?`, name, int64(nodeID))
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("provider of %q: %w", name, ErrNotFound)
		}
		_, err = tx.ExecContext(ctx, `UPDATE services SET idle_since = ? WHERE name = ? AND idle_since = 0
			AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.service = services.name)`, unixNano(s.opts.Now()), name)
		return err
	})
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("store: unexpose %q: %w", name, err)
	}
	return err
}

// DeleteIdleServices implements Store.
func (s *sqlStore) DeleteIdleServices(ctx context.Context, grace time.Duration) ([]string, error) {
	now := s.opts.Now()
	var names []string
	err := s.tx(ctx, func(tx *dbTx) error {
		names = nil
		// Services without providers and no stamp (from before migration
		// 8) start their grace now.
		if _, err := tx.ExecContext(ctx, `UPDATE services SET idle_since = ? WHERE idle_since = 0
			AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.service = services.name)`, unixNano(now)); err != nil {
			return err
		}
		rows, err := tx.QueryContext(ctx, `DELETE FROM services WHERE idle_since != 0 AND idle_since <= ?
			AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.service = services.name) RETURNING name`, unixNano(now.Add(-grace)))
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var n string
			if err := rows.Scan(&n); err != nil {
				return err
			}
			names = append(names, n)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("store: delete idle services: %w", err)
	}
	return names, nil
}

// ListServices implements Store.
func (s *sqlStore) ListServices(ctx context.Context) ([]Service, error) {
	return queryAll(ctx, s.db, scanService, `SELECT name, vip, port, created, owner_id FROM services ORDER BY name`)
}

// ListProviders implements Store.
func (s *sqlStore) ListProviders(ctx context.Context) ([]Provider, error) {
	return queryAll(ctx, s.db, scanProvider, `SELECT service, node_id, port, priority, weight, version, protocol, udp_idle, agent_protocol FROM providers ORDER BY service, node_id`)
}

// SetProviderTraffic implements Store.
func (s *sqlStore) SetProviderTraffic(ctx context.Context, service string, nodeID wire.NodeID, t Traffic) error {
	res, err := s.exec(ctx, `UPDATE providers SET priority = ?, weight = ?, version = ?, protocol = ?, udp_idle = ?, agent_protocol = ? WHERE service = ? AND node_id = ?`,
		t.Priority, t.Weight, t.Version, t.Protocol, t.UDPIdle, t.AgentProtocol, service, int64(nodeID))
	if err != nil {
		return fmt.Errorf("store: provider %q of node %d: %w", service, nodeID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("provider %q of node %d: %w", service, nodeID, ErrNotFound)
	}
	return nil
}

// SetNodeRegion implements Store.
func (s *sqlStore) SetNodeRegion(ctx context.Context, id wire.NodeID, region string) error {
	defer s.invalidate(false, id)
	res, err := s.exec(ctx, `UPDATE nodes SET region = ? WHERE id = ?`, region, int64(id))
	if err != nil {
		return fmt.Errorf("store: node %d region: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

func scanProvider(r scanner) (Provider, error) {
	var p Provider
	var id int64
	var port int
	if err := r.Scan(&p.Service, &id, &port, &p.Priority, &p.Weight, &p.Version, &p.Protocol, &p.UDPIdle, &p.AgentProtocol); err != nil {
		return p, err
	}
	p.NodeID, p.Port = wire.NodeID(id), uint16(port)
	return p, nil
}

const relayCols = `id, name, url, fingerprint, relay_key, secret_hash, token_id, created`

func scanRelay(r scanner) (Relay, error) {
	var rl Relay
	var key string
	var created int64
	if err := r.Scan(&rl.ID, &rl.Name, &rl.URL, &rl.Fingerprint, &key, &rl.SecretHash, &rl.TokenID, &created); err != nil {
		return rl, err
	}
	rl.Key, rl.Created = storedKey(key), fromUnixNano(created)
	return rl, nil
}

func getRelay(ctx context.Context, q querier, where string, arg any) (Relay, error) {
	rl, err := scanRelay(q.QueryRowContext(ctx, `SELECT `+relayCols+` FROM relays WHERE `+where, arg))
	if errors.Is(err, sql.ErrNoRows) {
		return rl, fmt.Errorf("relay %v: %w", arg, ErrNotFound)
	}
	return rl, err
}

// RegisterRelay implements Store.
func (s *sqlStore) RegisterRelay(ctx context.Context, r RelayRegistration) (Relay, error) {
	if r.Now.IsZero() {
		r.Now = time.Now()
	}
	var out Relay
	err := s.tx(ctx, func(tx *dbTx) error {
		tok, err := getToken(ctx, tx, r.TokenID)
		if errors.Is(err, ErrNotFound) {
			return ErrTokenInvalid
		} else if err != nil {
			return err
		}
		if !HashMatches(tok.SecretHash, r.TokenSecret) {
			return ErrTokenInvalid
		}
		if !tok.Relay {
			return ErrTokenKind
		}
		existing, err := getRelay(ctx, tx, "name = ?", r.Name)
		switch {
		case errors.Is(err, ErrNotFound):
			if err := consumeToken(ctx, tx, tok, r.TokenSecret, r.Now); err != nil {
				return err
			}
			var id int64
			if err := tx.QueryRowContext(ctx, `INSERT INTO relays (name, url, fingerprint, relay_key, secret_hash, token_id, created) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id`,
				r.Name, r.URL, r.Fingerprint, r.Key.String(), r.SecretHash, tok.ID, unixNano(r.Now)).Scan(&id); err != nil {
				return err
			}
			out = Relay{ID: id, Name: r.Name, URL: r.URL, Fingerprint: r.Fingerprint, Key: r.Key, SecretHash: r.SecretHash, TokenID: tok.ID, Created: r.Now}
			return nil
		case err != nil:
			return err
		case existing.Key != r.Key:
			return ErrNameInUse
		}
		// The same relay again (its answer was lost, or its state wiped
		// but not its key): a new secret, and a use only from another token.
		if existing.TokenID != tok.ID {
			if err := consumeToken(ctx, tx, tok, r.TokenSecret, r.Now); err != nil {
				return err
			}
		} else if err := tok.Check(r.TokenSecret, r.Now); err != nil && !errors.Is(err, ErrTokenUsed) {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE relays SET url = ?, fingerprint = ?, secret_hash = ?, token_id = ? WHERE id = ?`,
			r.URL, r.Fingerprint, r.SecretHash, tok.ID, existing.ID); err != nil {
			return err
		}
		existing.URL, existing.Fingerprint, existing.SecretHash, existing.TokenID = r.URL, r.Fingerprint, r.SecretHash, tok.ID
		out = existing
		return nil
	})
	return out, err
}

// UpdateRelay implements Store.
func (s *sqlStore) UpdateRelay(ctx context.Context, id int64, url, fingerprint string, k key.Public) error {
	res, err := s.exec(ctx, `UPDATE relays SET url = ?, fingerprint = ?, relay_key = ? WHERE id = ?`, url, fingerprint, k.String(), id)
	if err != nil {
		return fmt.Errorf("store: update relay %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("relay %d: %w", id, ErrNotFound)
	}
	return nil
}

// GetRelay implements Store.
func (s *sqlStore) GetRelay(ctx context.Context, id int64) (Relay, error) {
	return getRelay(ctx, s.db, "id = ?", id)
}

// ListRelays implements Store.
func (s *sqlStore) ListRelays(ctx context.Context) ([]Relay, error) {
	return queryAll(ctx, s.db, scanRelay, `SELECT `+relayCols+` FROM relays ORDER BY id`)
}

// DeleteRelay implements Store.
func (s *sqlStore) DeleteRelay(ctx context.Context, name string) error {
	res, err := s.exec(ctx, `DELETE FROM relays WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("store: delete relay %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("relay %s: %w", name, ErrNotFound)
	}
	return nil
}

// storedKey reads a key column. Keys are checked when they arrive, so a
// stored one is taken as it is (rows written before the low-order check
// still load, and such a node can then be removed).
func storedKey(s string) key.Public {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != key.Len {
		return key.Public{}
	}
	return key.PublicFromRaw([key.Len]byte(b))
}
