package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"

	_ "modernc.org/sqlite" // registers driver "sqlite"
)

// migrations are applied in order, each in its own transaction, and recorded
// in schema_migrations. Append only: never edit a migration that shipped.
var migrations = []string{
	// 1: the core schema.
	`CREATE TABLE users (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		username TEXT NOT NULL UNIQUE,
		password_hash TEXT NOT NULL,
		admin INTEGER NOT NULL DEFAULT 0,
		created INTEGER NOT NULL
	);
	CREATE TABLE tokens (
		id TEXT PRIMARY KEY,
		secret_hash BLOB NOT NULL,
		reusable INTEGER NOT NULL DEFAULT 0,
		ephemeral INTEGER NOT NULL DEFAULT 0,
		tags TEXT NOT NULL DEFAULT '[]',
		expires INTEGER NOT NULL DEFAULT 0,
		uses INTEGER NOT NULL DEFAULT 0,
		revoked INTEGER NOT NULL DEFAULT 0,
		created INTEGER NOT NULL
	);
	CREATE TABLE counters (
		name TEXT PRIMARY KEY,
		value INTEGER NOT NULL
	);
	INSERT INTO counters (name, value) VALUES ('node_addr', 0), ('service_vip', 0);
	CREATE TABLE nodes (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		name TEXT NOT NULL UNIQUE,
		hostname TEXT NOT NULL DEFAULT '',
		wg_key TEXT NOT NULL UNIQUE,
		ipv4 TEXT NOT NULL UNIQUE,
		ipv6 TEXT NOT NULL UNIQUE,
		secret_hash BLOB NOT NULL,
		token_id TEXT NOT NULL DEFAULT '',
		tags TEXT NOT NULL DEFAULT '[]',
		ephemeral INTEGER NOT NULL DEFAULT 0,
		created INTEGER NOT NULL,
		last_seen INTEGER NOT NULL DEFAULT 0,
		listen_port INTEGER NOT NULL DEFAULT 0,
		endpoints TEXT NOT NULL DEFAULT '[]'
	);
	CREATE TABLE services (
		name TEXT PRIMARY KEY,
		vip TEXT NOT NULL UNIQUE,
		port INTEGER NOT NULL,
		created INTEGER NOT NULL
	);
	CREATE TABLE providers (
		service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
		node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
		port INTEGER NOT NULL,
		PRIMARY KEY (service, node_id)
	);
	CREATE INDEX providers_node ON providers(node_id);`,
	// 2: tombstones, so a removed node's calls get "node_removed" rather
	// than a bare "unauthorized".
	`CREATE TABLE removed_nodes (
		id INTEGER PRIMARY KEY,
		name TEXT NOT NULL,
		secret_hash BLOB NOT NULL,
		removed INTEGER NOT NULL
	);`,
	// 3: ownership, console sessions and the event log. Rows from before
	// keep owner 0: only admins see them.
	`ALTER TABLE nodes ADD COLUMN owner_id INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE tokens ADD COLUMN owner_id INTEGER NOT NULL DEFAULT 0;
	CREATE INDEX nodes_owner ON nodes(owner_id);
	CREATE INDEX tokens_owner ON tokens(owner_id);
	CREATE TABLE sessions (
		id_hash BLOB PRIMARY KEY,
		user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
		csrf TEXT NOT NULL,
		created INTEGER NOT NULL,
		expires INTEGER NOT NULL
	);
	CREATE INDEX sessions_expires ON sessions(expires);
	CREATE TABLE events (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		at INTEGER NOT NULL,
		kind TEXT NOT NULL,
		actor TEXT NOT NULL DEFAULT '',
		node TEXT NOT NULL DEFAULT '',
		message TEXT NOT NULL DEFAULT '',
		owner_id INTEGER NOT NULL DEFAULT 0
	);
	CREATE INDEX events_owner ON events(owner_id, id);`,
	// 4: standalone relays and the relay join tokens that register them.
	`ALTER TABLE tokens ADD COLUMN relay INTEGER NOT NULL DEFAULT 0;
	CREATE TABLE relays (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		name TEXT NOT NULL UNIQUE,
		url TEXT NOT NULL,
		fingerprint TEXT NOT NULL,
		relay_key TEXT NOT NULL,
		secret_hash BLOB NOT NULL,
		token_id TEXT NOT NULL DEFAULT '',
		created INTEGER NOT NULL
	);`,
	// 5: services belong to the owner of their first provider; existing
	// ones to the owner of their lowest-numbered provider now.
	`ALTER TABLE services ADD COLUMN owner_id INTEGER NOT NULL DEFAULT 0;
	UPDATE services SET owner_id = COALESCE((SELECT n.owner_id FROM providers p JOIN nodes n ON n.id = p.node_id
		WHERE p.service = services.name ORDER BY n.id LIMIT 1), 0);`,
	// 6: events are kept per retention class (EventKind.Class), so that
	// refusals cannot push sign-ins and approvals out of the log; seq
	// numbers the events of a class, which makes keeping its newest a
	// range delete.
	`ALTER TABLE events ADD COLUMN class INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE events ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
	UPDATE events SET class = CASE
		WHEN kind IN ('register_failed', 'login_failed', 'expose_refused') THEN 2
		WHEN kind IN ('join', 'leave', 'expose', 'unexpose') THEN 1
		ELSE 0 END;
	UPDATE events SET seq = r.n FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY class ORDER BY id) AS n FROM events) AS r
		WHERE events.id = r.id;
	CREATE INDEX events_class ON events(class, seq);`,
	// 7: a password someone else chose (the first admin's, a member's
	// from the console) must be replaced at the next sign-in.
	`ALTER TABLE users ADD COLUMN must_change_password INTEGER NOT NULL DEFAULT 0;`,
	// 8: reuse of VIPs and node addresses. idle_since is when a service
	// lost its last provider (0: it has one, or was not stamped yet;
	// DeleteIdleServices stamps those); a tombstone keeps the removed
	// node's addresses for their quarantine ('' once they were reused, and
	// for nodes removed before this migration, whose addresses are never
	// reused).
	`ALTER TABLE services ADD COLUMN idle_since INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE removed_nodes ADD COLUMN ipv4 TEXT NOT NULL DEFAULT '';
	ALTER TABLE removed_nodes ADD COLUMN ipv6 TEXT NOT NULL DEFAULT '';
	CREATE INDEX services_idle ON services(idle_since);
	CREATE INDEX removed_nodes_removed ON removed_nodes(removed);`,
	// 9: accounts an OIDC sign-in created under --oidc-new-users=pending
	// wait for an admin's approval before they can sign in.
	`ALTER TABLE users ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;`,
	// 10: the access policy, one row: its text as set (comments kept),
	// when and by whom. No row: the allow-all default.
	`CREATE TABLE policy (
		id INTEGER PRIMARY KEY CHECK (id = 1),
		text TEXT NOT NULL,
		updated INTEGER NOT NULL,
		updated_by TEXT NOT NULL DEFAULT ''
	);`,
	// 11: node keys expire. nodes.key_expiry is when the node's key stops
	// being accepted (0: never), nodes.key_lifetime and tokens.key_expiry
	// the lifetime a token set for the nodes it joins (0: the
	// coordinator's), in nanoseconds.
	`ALTER TABLE nodes ADD COLUMN key_expiry INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE nodes ADD COLUMN key_lifetime INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE tokens ADD COLUMN key_expiry INTEGER NOT NULL DEFAULT 0;`,
	// 12: traffic management: each provider's priority, weight and
	// version label as its node announced them; each node's region.
	`ALTER TABLE providers ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE providers ADD COLUMN weight INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE providers ADD COLUMN version TEXT NOT NULL DEFAULT '';
	ALTER TABLE nodes ADD COLUMN region TEXT NOT NULL DEFAULT '';`,
	// 13: UDP services: what each provider carries on its port ('' is
	// TCP) and its UDP flows' idle timeout in seconds (0 the default).
	`ALTER TABLE providers ADD COLUMN protocol TEXT NOT NULL DEFAULT '';
	ALTER TABLE providers ADD COLUMN udp_idle INTEGER NOT NULL DEFAULT 0;`,
	// 14: nodes.heartbeat is when a coordinator sharing the store last
	// confirmed the node's map stream open (nanoseconds; 0: none open).
	`ALTER TABLE nodes ADD COLUMN heartbeat INTEGER NOT NULL DEFAULT 0;`,
	// 15: the wire protocol version of the agent that announced each
	// export (0: unknown), so that a provider too old to enforce a
	// service's request rules is not listed to its consumers.
	`ALTER TABLE providers ADD COLUMN agent_protocol INTEGER NOT NULL DEFAULT 0;`,
}

// SQLite is the embedded Store: one file in the coordinator's data
// directory.
type SQLite struct {
	*sqlStore
}

var _ Store = (*SQLite)(nil)

// sqliteDialect: ? placeholders; _txlock=immediate (below) serialises
// writers.
var sqliteDialect = dialect{bigint: "INTEGER"}

// OpenSQLite opens (creating if needed) the database at path and applies
// pending migrations.
func OpenSQLite(ctx context.Context, path string) (*SQLite, error) {
	return OpenSQLiteOptions(ctx, path, Options{})
}

// OpenSQLiteOptions is OpenSQLite with options.
func OpenSQLiteOptions(ctx context.Context, path string, o Options) (*SQLite, error) {
	o.applyDefaults()
	// _txlock=immediate: every transaction takes the write lock up front, so
	// two writers never deadlock upgrading read locks (SQLITE_BUSY); the
	// busy timeout makes the second one wait instead.
	q := url.Values{}
	q.Set("_busy_timeout", "10000")
	q.Set("_journal_mode", "WAL")
	q.Set("_foreign_keys", "1")
	q.Set("_synchronous", "NORMAL")
	q.Set("_txlock", "immediate")
	if err := privateDB(path); err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	// SQLite has one writer; a few readers are plenty at this scale.
	db.SetMaxOpenConns(4)
	db.SetMaxIdleConns(4)
	s := &SQLite{&sqlStore{db: &dbConn{DB: db, d: sqliteDialect, stmts: newStmtCache(db)}, opts: o, migrations: migrations}}
	s.w = newBatchWriter(s.db)
	s.nodes = newNodeCache(s.sqlStore)
	s.events = newEventQueue(s.sqlStore)
	if err := s.migrate(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	return s, nil
}

// privateDB creates the database file 0600 before SQLite does (it would use
// 0644 less the umask), and tightens an existing one and its -wal and -shm:
// SQLite gives those the database file's mode, and they hold every secret
// the database does.
func privateDB(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			if err := os.Chmod(p, 0o600); err != nil {
				return fmt.Errorf("%s is readable by others and cannot be made private: %w; run chmod 600 %s", p, err, p)
			}
		}
	}
	return nil
}
