package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// copyTables are the tables Copy moves, parents before children (foreign
// keys); schema_migrations is not copied, both ends being migrated to the
// same version when opened. TestCopyCoversEveryTable keeps the list whole.
var copyTables = []string{
	"users", "tokens", "counters", "nodes", "services", "providers", "removed_nodes",
	"sessions", "events", "relays", "policy",
}

// identityTables have ids PostgreSQL generates: after rows with explicit
// ids arrive, the generator must continue past them (and, for nodes, past
// the ids of removed nodes, which are never handed out again).
var identityTables = map[string]string{
	"users":  "SELECT MAX(id) FROM users",
	"nodes":  "SELECT GREATEST((SELECT MAX(id) FROM nodes), (SELECT MAX(id) FROM removed_nodes))",
	"events": "SELECT MAX(id) FROM events",
	"relays": "SELECT MAX(id) FROM relays",
}

// TableCount is the number of rows of one table.
type TableCount struct {
	Table string `json:"table"`
	Rows  int64  `json:"rows"`
}

// ErrNotEmpty refuses to copy into a store that holds data already.
var ErrNotEmpty = errors.New("store: the destination is not empty")

// sqlOf returns the SQL store under s.
func sqlOf(s Store) (*sqlStore, error) {
	switch v := s.(type) {
	case *SQLite:
		return v.sqlStore, nil
	case *Postgres:
		return v.sqlStore, nil
	}
	return nil, fmt.Errorf("store: cannot copy a %T", s)
}

// Copy copies every row of from into to, in one transaction of to, and
// then checks that each table holds as many rows at both ends. A
// destination holding data is ErrNotEmpty unless replace is set, which
// deletes its content first. Both stores must be at the same schema
// version (opening them migrates both to this meshlink's). Run it with
// no coordinator using either.
func Copy(ctx context.Context, from, to Store, replace bool) ([]TableCount, error) {
	src, err := sqlOf(from)
	if err != nil {
		return nil, err
	}
	dst, err := sqlOf(to)
	if err != nil {
		return nil, err
	}
	vs, err := src.SchemaVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: copy: source schema version: %w", err)
	}
	vd, err := dst.SchemaVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: copy: destination schema version: %w", err)
	}
	if vs != vd {
		return nil, fmt.Errorf("store: copy: the source is at schema version %d, the destination at %d; open both with the same meshlink", vs, vd)
	}
	err = dst.tx(ctx, func(tx *dbTx) error {
		if !replace {
			var held []string
			for _, t := range copyTables {
				if t == "counters" {
					continue // seeded by the first migration
				}
				var n int64
				if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+t).Scan(&n); err != nil {
					return err
				}
				if n > 0 {
					held = append(held, fmt.Sprintf("%d %s", n, t))
				}
			}
			if len(held) > 0 {
				return fmt.Errorf("%w: it holds %s; copy into a new, empty database, or pass --force to replace its content", ErrNotEmpty, strings.Join(held, ", "))
			}
		}
		for i := len(copyTables) - 1; i >= 0; i-- {
			if _, err := tx.ExecContext(ctx, `DELETE FROM `+copyTables[i]); err != nil {
				return fmt.Errorf("empty %s: %w", copyTables[i], err)
			}
		}
		for _, t := range copyTables {
			if err := copyTable(ctx, src, tx, t); err != nil {
				return fmt.Errorf("copy %s: %w", t, err)
			}
		}
		if dst.db.d.numbered {
			for t, q := range identityTables {
				if _, err := tx.ExecContext(ctx, `SELECT setval(pg_get_serial_sequence('`+t+`', 'id'), COALESCE((`+q+`), 0) + 1, false)`); err != nil {
					return fmt.Errorf("advance the ids of %s: %w", t, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrNotEmpty) {
			return nil, err
		}
		return nil, fmt.Errorf("store: copy: %w", err)
	}
	if dst.nodes != nil {
		dst.nodes.reset() // its nodes are the source's now
	}
	// Verify: the same number of rows at both ends, table by table.
	var counts []TableCount
	for _, t := range copyTables {
		var a, b int64
		if err := src.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+t).Scan(&a); err != nil {
			return nil, fmt.Errorf("store: copy: count %s: %w", t, err)
		}
		if err := dst.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+t).Scan(&b); err != nil {
			return nil, fmt.Errorf("store: copy: count %s: %w", t, err)
		}
		if a != b {
			return counts, fmt.Errorf("store: copy: %s has %d rows at the source but %d at the destination (was a coordinator running?); stop every coordinator and copy again with --force", t, a, b)
		}
		counts = append(counts, TableCount{Table: t, Rows: a})
	}
	return counts, nil
}

// copyTable inserts every row of table t of src through tx, column by
// column as the source names them.
func copyTable(ctx context.Context, src *sqlStore, tx *dbTx, t string) error {
	rows, err := src.db.QueryContext(ctx, `SELECT * FROM `+t)
	if err != nil {
		return err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return err
	}
	ph := strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", ")
	ins := `INSERT INTO ` + t + ` (` + strings.Join(cols, ", ") + `) VALUES (` + ph + `)`
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, ins, vals...); err != nil {
			return err
		}
	}
	return rows.Err()
}
