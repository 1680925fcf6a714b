package store

import (
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/meshlink/meshlink/test/pgtest"
)

// TestCopyCoversEveryTable: Copy's table list is the schema's.
func TestCopyCoversEveryTable(t *testing.T) {
	s, err := OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rows, err := s.db.Query(`SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations'`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var tables []string
	for rows.Next() {
		var n string
		rows.Scan(&n)
		tables = append(tables, n)
	}
	slices.Sort(tables)
	want := slices.Sorted(slices.Values(copyTables))
	if !slices.Equal(tables, want) {
		t.Fatalf("schema tables %v, Copy copies %v", tables, want)
	}
}

// fillStore fills s with one of everything: a user with a session, tokens,
// nodes (one removed), services, a relay, events, the policy.
func fillStore(t *testing.T, s Store) {
	t.Helper()
	ctx := context.Background()
	u, err := s.CreateUser(ctx, User{Username: "admin", PasswordHash: "x", Admin: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSession(ctx, Session{IDHash: HashSecret("sess"), UserID: u.ID, CSRF: "c", Expires: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	mkToken(t, s, "r", true, time.Time{})
	for _, n := range []string{"a", "b", "c"} {
		if _, err := reg(s, "r", n, "k"+n); err != nil {
			t.Fatal(err)
		}
	}
	nodes, _ := s.ListNodes(ctx)
	if _, err := s.ExposeService(ctx, "db", nodes[0].ID, 5432); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteNode(ctx, nodes[2].ID); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateToken(ctx, Token{ID: "rl", SecretHash: HashSecret("secret-rl"), Relay: true, Reusable: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RegisterRelay(ctx, RelayRegistration{TokenID: "rl", TokenSecret: "secret-rl", Name: "r1", URL: "https://r1", Key: testKey("relay"), SecretHash: HashSecret("x")}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPolicy(ctx, StoredPolicy{Text: "# policy\n", Updated: time.Now(), UpdatedBy: "admin"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddEvent(ctx, Event{Kind: EventLogin, Actor: "admin", Message: "signed in"}); err != nil {
		t.Fatal(err)
	}
}

// TestCopySQLiteToPostgres: every row arrives (the lists read through the
// Store are equal), the copy refuses a non-empty destination unless told
// to replace it, and the copied PostgreSQL store keeps working: a new node
// gets a fresh ID and fresh addresses.
func TestCopySQLiteToPostgres(t *testing.T) {
	ctx := context.Background()
	lite, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer lite.Close()
	fillStore(t, lite)
	pg, err := OpenPostgres(ctx, pgtest.DB(t), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()

	counts, err := Copy(ctx, lite, pg, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("copied %v", counts)
	same := func(name string, f func(Store) (any, error)) {
		a, err := f(lite)
		if err != nil {
			t.Fatal(err)
		}
		b, err := f(pg)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(a, b) {
			t.Errorf("%s differ after the copy:\nSQLite:     %+v\nPostgreSQL: %+v", name, a, b)
		}
	}
	same("nodes", func(s Store) (any, error) { return s.ListNodes(ctx) })
	same("users", func(s Store) (any, error) { return s.ListUsers(ctx) })
	same("tokens", func(s Store) (any, error) { return s.ListTokens(ctx) })
	same("services", func(s Store) (any, error) { return s.ListServices(ctx) })
	same("providers", func(s Store) (any, error) { return s.ListProviders(ctx) })
	same("relays", func(s Store) (any, error) { return s.ListRelays(ctx) })
	same("events", func(s Store) (any, error) { return s.ListEvents(ctx, 0, 0) })
	same("policy", func(s Store) (any, error) { return s.GetPolicy(ctx) })
	same("session", func(s Store) (any, error) { return s.GetSession(ctx, HashSecret("sess"), time.Now()) })

	if _, err := Copy(ctx, lite, pg, false); !errors.Is(err, ErrNotEmpty) {
		t.Fatalf("a second copy into the filled database: %v, want ErrNotEmpty", err)
	}
	if _, err := Copy(ctx, lite, pg, true); err != nil {
		t.Fatalf("copy with replace: %v", err)
	}

	r, err := reg(pg, "r", "d", "kd")
	if err != nil {
		t.Fatalf("registering after the copy: %v", err)
	}
	nodes, _ := lite.ListNodes(ctx)
	for _, n := range nodes {
		if r.Node.ID <= n.ID+1 || r.Node.IPv4 == n.IPv4 { // +1: the removed node's ID
			t.Fatalf("new node %d %v collides with copied node %d %v", r.Node.ID, r.Node.IPv4, n.ID, n.IPv4)
		}
	}
	if _, err := pg.CreateUser(ctx, User{Username: "second", PasswordHash: "x"}); err != nil {
		t.Fatalf("a new user after the copy: %v", err)
	}
}
