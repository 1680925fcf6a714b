package store

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/test/pgtest"
)

// TestMigrationListsDescribeOneSchema: the SQLite and PostgreSQL migration
// lists have as many entries and leave the same tables with the same
// columns, read from each database's own catalog.
func TestMigrationListsDescribeOneSchema(t *testing.T) {
	if len(migrations) != len(pgMigrations) {
		t.Fatalf("%d SQLite migrations, %d PostgreSQL ones: append the missing ones to the other list", len(migrations), len(pgMigrations))
	}
	ctx := context.Background()
	lite, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer lite.Close()
	pg, err := OpenPostgres(ctx, pgtest.DB(t), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	read := func(s *sqlStore, q string) []string {
		rows, err := s.db.QueryContext(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var out []string
		for rows.Next() {
			var tbl, col string
			if err := rows.Scan(&tbl, &col); err != nil {
				t.Fatal(err)
			}
			out = append(out, tbl+"."+col)
		}
		slices.Sort(out)
		return out
	}
	a := read(lite.sqlStore, `SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
		WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'`)
	b := read(pg.sqlStore, `SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'`)
	if !slices.Equal(a, b) {
		t.Fatalf("schemas differ:\nSQLite:     %v\nPostgreSQL: %v", a, b)
	}
	if len(a) < 60 {
		t.Fatalf("only %d columns read: %v", len(a), a)
	}
	va, _ := lite.SchemaVersion(ctx)
	vb, _ := pg.SchemaVersion(ctx)
	if va != len(migrations) || vb != len(migrations) {
		t.Fatalf("schema versions %d and %d, want %d", va, vb, len(migrations))
	}
}

// TestNewerSchemaRefused: a database a newer meshlink migrated is refused
// with what to do, not used with columns this one does not know.
func TestNewerSchemaRefused(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		place := be.place(t)
		s := be.open(t, place, Options{})
		if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied) VALUES (?, 0)`, len(s.migrations)+1); err != nil {
			t.Fatal(err)
		}
		s.Close()
		var err error
		if be.name == "sqlite" {
			_, err = OpenSQLite(ctx, place)
		} else {
			_, err = OpenPostgres(ctx, place, Options{})
		}
		if !errors.Is(err, ErrSchemaNewer) || !strings.Contains(err.Error(), "run the newer meshlink") {
			t.Fatalf("opening a newer schema: %v", err)
		}
	})
}

// TestPostgresBadURLs: a malformed URL and an unreachable server each get
// an error that says what to check.
func TestPostgresBadURLs(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct{ name, url, want string }{
		{"malformed", "postgres://meshlink@host:notaport/db", "write it as postgres://"},
		{"unreachable", "postgres://meshlink:hunter2@127.0.0.1:1/db?connect_timeout=2", "cannot reach PostgreSQL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := OpenPostgres(ctx, tc.url, Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("the password is in the error: %v", err)
			}
		})
	}
}

// TestPostgresTwoHandlesSerialise: two stores on one database (two
// coordinators) racing registrations: a single-use token still makes one
// node, and a reusable one gives every node its own addresses.
func TestPostgresTwoHandlesSerialise(t *testing.T) {
	ctx := context.Background()
	url := pgtest.DB(t)
	var stores [2]*Postgres
	for i := range stores {
		s, err := OpenPostgres(ctx, url, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		stores[i] = s
	}
	mkToken(t, stores[0], "once", false, time.Time{})
	mkToken(t, stores[0], "many", true, time.Time{})
	const n = 16
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := 0; i < n; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := reg(stores[i%2], "once", fmt.Sprintf("once%d", i), fmt.Sprintf("ko%d", i))
			errs <- err
		}()
		go func() {
			defer wg.Done()
			_, err := reg(stores[(i+1)%2], "many", fmt.Sprintf("many%d", i), fmt.Sprintf("km%d", i))
			if err != nil {
				t.Errorf("reusable token: %v", err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		if err == nil {
			ok++
		} else if !errors.Is(err, ErrTokenUsed) {
			t.Errorf("single-use token: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("a single-use token made %d nodes across two coordinators", ok)
	}
	nodes, err := stores[1].ListNodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]bool{}
	for _, nd := range nodes {
		if seen[nd.IPv4] {
			t.Fatalf("address %v given twice", nd.IPv4)
		}
		seen[nd.IPv4] = true
	}
	if len(nodes) != n+1 {
		t.Fatalf("%d nodes, want %d", len(nodes), n+1)
	}
}
