package store

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/meshlink/meshlink/test/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// backend is one database the Store contract tests run against.
type backend struct {
	name string
	// place returns where a new, empty store lives: a file path or a
	// database URL.
	place func(t *testing.T) string
	// open opens the store at place (again, for a reopen).
	open func(t *testing.T, place string, o Options) *sqlStore
}

var backends = []backend{
	{
		name:  "sqlite",
		place: func(t *testing.T) string { return filepath.Join(t.TempDir(), "meshlink.db") },
		open: func(t *testing.T, place string, o Options) *sqlStore {
			t.Helper()
			s, err := OpenSQLiteOptions(context.Background(), place, o)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s.sqlStore
		},
	},
	{
		name:  "postgres",
		place: func(t *testing.T) string { return pgtest.DB(t) },
		open: func(t *testing.T, place string, o Options) *sqlStore {
			t.Helper()
			s, err := OpenPostgres(context.Background(), place, o)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s.sqlStore
		},
	},
}

// opener opens a fresh store of the backend under test.
type opener func(t *testing.T, o Options) *sqlStore

// eachStore runs f against every backend, as subtests named after them.
func eachStore(t *testing.T, f func(t *testing.T, b backend, open opener)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			f(t, b, func(t *testing.T, o Options) *sqlStore { return b.open(t, b.place(t), o) })
		})
	}
}
