//go:build !agentonly

package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/test/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// TestStoreCopy: meshlink store copy moves a coordinator's SQLite
// database into PostgreSQL, says the counts match, and refuses to copy
// over what it copied unless --force.
func TestStoreCopy(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, err := store.OpenSQLite(ctx, filepath.Join(dir, store.DefaultSQLiteFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateUser(ctx, store.User{Username: "admin", PasswordHash: "x", Admin: true}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	db := pgtest.DB(t)

	out, errOut, code := runMain(t, "store", "copy", "--from", "sqlite:"+dir, "--to", db)
	if code != 0 || !strings.Contains(out, "copied, and the row counts match: users 1,") {
		t.Fatalf("copy: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	_, errOut, code = runMain(t, "store", "copy", "--from", "sqlite:"+dir, "--to", db)
	if code != 1 || !strings.Contains(errOut, "it holds 1 users; copy into a new, empty database, or pass --force") {
		t.Fatalf("copy into a filled database: exit %d, stderr %s", code, errOut)
	}
	if _, errOut, code = runMain(t, "store", "copy", "--from", "sqlite:"+dir, "--to", db, "--force"); code != 0 {
		t.Fatalf("copy --force: exit %d, stderr %s", code, errOut)
	}
	_, errOut, code = runMain(t, "store", "copy", "--from", "sqlite:"+filepath.Join(dir, "none"), "--to", db)
	if code != 1 || !strings.Contains(errOut, "no database there") {
		t.Fatalf("copy from nothing: exit %d, stderr %s", code, errOut)
	}
}
