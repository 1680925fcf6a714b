package store

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

func openTest(t *testing.T, dir string) *SQLite {
	t.Helper()
	s, err := OpenSQLite(context.Background(), filepath.Join(dir, "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mkToken(t *testing.T, s Store, id string, reusable bool, expires time.Time) {
	t.Helper()
	if err := s.CreateToken(context.Background(), Token{ID: id, SecretHash: HashSecret("secret-" + id), Reusable: reusable, Expires: expires, Tags: []string{"tag:x"}}); err != nil {
		t.Fatal(err)
	}
}

// testKey is a distinct, stable public key for each name.
func testKey(name string) key.Public { return key.PublicFromRaw(sha256.Sum256([]byte(name))) }

func reg(s Store, tok, name, keyName string) (RegisterResult, error) {
	return s.RegisterNode(context.Background(), Registration{
		TokenID: tok, TokenSecret: "secret-" + tok, Name: name, Key: testKey(keyName), ListenPort: 41641,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}, SecretHash: HashSecret("node-" + name),
	})
}

func TestMigrationsApplyOnceAndReopenKeepsData(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		place := be.place(t)
		ctx := context.Background()
		s := be.open(t, place, Options{})
		mkToken(t, s, "t1", true, time.Time{})
		r, err := reg(s, "t1", "alpha", "keyA")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.ExposeService(ctx, "db", r.Node.ID, 5432); err != nil {
			t.Fatal(err)
		}
		v1, _ := s.SchemaVersion(ctx)
		if v1 != len(s.migrations) {
			t.Fatalf("schema version %d, want %d", v1, len(s.migrations))
		}
		s.Close()

		s2 := be.open(t, place, Options{})
		var rows int
		if err := s2.db.QueryRow(`SELECT COUNT(*) FROM schema_migrations`).Scan(&rows); err != nil || rows != len(s.migrations) {
			t.Fatalf("schema_migrations rows %d (%v), want %d", rows, err, len(s.migrations))
		}
		nodes, _ := s2.ListNodes(ctx)
		if len(nodes) != 1 || nodes[0].Name != "alpha" || nodes[0].IPv4 != r.Node.IPv4 || len(nodes[0].Endpoints) != 1 || nodes[0].Tags[0] != "tag:x" {
			t.Fatalf("nodes after reopen: %+v", nodes)
		}
		svcs, _ := s2.ListServices(ctx)
		if len(svcs) != 1 || svcs[0].VIP != netip.MustParseAddr("100.100.0.1") {
			t.Fatalf("services after reopen: %+v", svcs)
		}
		tok, err := s2.GetToken(ctx, "t1")
		if err != nil || tok.Uses != 1 {
			t.Fatalf("token after reopen: %+v %v", tok, err)
		}
	})
}

func TestAllocations(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		tests := []struct {
			name string
			idx  int64
			v4   string
			v6   string
		}{
			{"first", 1, "100.96.0.1", "fd7a:6d65:7368::1"},
			{"256th", 256, "100.96.1.0", "fd7a:6d65:7368::100"},
			{"last", 1<<18 - 2, "100.99.255.254", "fd7a:6d65:7368::3:fffe"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				v4, v6, err := NodeAddrs(tc.idx)
				if err != nil || v4.String() != tc.v4 || v6.String() != tc.v6 {
					t.Fatalf("NodeAddrs(%d) = %v %v %v", tc.idx, v4, v6, err)
				}
			})
		}
		if _, _, err := NodeAddrs(1<<18 - 1); !errors.Is(err, ErrExhausted) {
			t.Fatalf("broadcast address allocated: %v", err)
		}
		vips := []struct {
			idx int64
			vip string
		}{{0, "100.100.0.1"}, {253, "100.100.0.254"}, {254, "100.100.1.1"}, {254*256 - 1, "100.100.255.254"}}
		for _, tc := range vips {
			got, err := ServiceVIP(tc.idx)
			if err != nil || got.String() != tc.vip {
				t.Errorf("ServiceVIP(%d) = %v %v, want %s", tc.idx, got, err, tc.vip)
			}
		}
		if _, err := ServiceVIP(254 * 256); !errors.Is(err, ErrExhausted) {
			t.Errorf("VIP space should be exhausted: %v", err)
		}

		s := open(t, Options{})
		ctx := context.Background()
		mkToken(t, s, "r", true, time.Time{})
		seen := map[netip.Addr]bool{}
		var ids []wire.NodeID
		for i := 0; i < 5; i++ {
			r, err := reg(s, "r", fmt.Sprintf("n%d", i), (fmt.Sprintf("k%d", i)))
			if err != nil {
				t.Fatal(err)
			}
			if seen[r.Node.IPv4] || seen[r.Node.IPv6] {
				t.Fatalf("duplicate address %v", r.Node)
			}
			seen[r.Node.IPv4], seen[r.Node.IPv6] = true, true
			ids = append(ids, r.Node.ID)
		}
		// A deleted node's address is not handed out again.
		if err := s.DeleteNode(ctx, ids[4]); err != nil {
			t.Fatal(err)
		}
		r, err := reg(s, "r", "n5", "k5")
		if err != nil || seen[r.Node.IPv4] {
			t.Fatalf("re-used address: %v %v", r.Node.IPv4, err)
		}
		// Re-registering the same name and key renews the node, for a
		// registrant that proved it holds the key; the public key alone, which
		// every network map carries, renews nothing.
		if _, err := reg(s, "r", "n0", "k0"); !errors.Is(err, ErrKeyUnproven) {
			t.Fatalf("re-register without a key proof: %v", err)
		}
		again, err := s.RegisterNode(context.Background(), Registration{TokenID: "r", TokenSecret: "secret-r", Name: "n0", Key: testKey("k0"),
			SecretHash: HashSecret("node-n0-2"), KeyProven: true})
		if err != nil || !again.Existing || again.Node.ID != ids[0] {
			t.Fatalf("re-register: %+v %v", again, err)
		}
		if _, err := reg(s, "r", "n0", "other"); !errors.Is(err, ErrNameInUse) {
			t.Fatalf("name taken: %v", err)
		}
		// VIPs are stable when the last provider leaves and comes back.
		sv1, _ := s.ExposeService(ctx, "web", ids[0], 80)
		sv2, _ := s.ExposeService(ctx, "db", ids[1], 5432)
		if sv1.VIP == sv2.VIP {
			t.Fatal("same VIP twice")
		}
		if err := s.UnexposeService(ctx, "web", ids[0]); err != nil {
			t.Fatal(err)
		}
		if err := s.UnexposeService(ctx, "web", ids[0]); !errors.Is(err, ErrNotFound) {
			t.Fatalf("second unexpose: %v", err)
		}
		// The VIP stays; the port is the one its only provider names now.
		sv3, _ := s.ExposeService(ctx, "web", ids[2], 8080)
		if sv3.VIP != sv1.VIP || sv3.Port != 8080 {
			t.Fatalf("VIP changed or port not the only provider's: %+v vs %+v", sv3, sv1)
		}
		// A second provider on another port leaves the service's port alone.
		if sv4, _ := s.ExposeService(ctx, "web", ids[1], 9090); sv4.Port != 8080 {
			t.Fatalf("a second provider moved the port: %+v", sv4)
		}
		if err := s.UnexposeService(ctx, "web", ids[1]); err != nil {
			t.Fatal(err)
		}
		// Deleting a node removes its providers and leaves a tombstone.
		if err := s.DeleteNode(ctx, ids[1]); err != nil {
			t.Fatal(err)
		}
		ps, _ := s.ListProviders(ctx)
		for _, p := range ps {
			if p.NodeID == ids[1] {
				t.Fatal("provider of deleted node survived")
			}
		}
		if h, err := s.RemovedNodeSecretHash(ctx, ids[1]); err != nil || !HashMatches(h, "node-n1") {
			t.Fatalf("tombstone: %v", err)
		}
	})
}

func TestTokenChecks(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		s := open(t, Options{})
		mkToken(t, s, "once", false, time.Time{})
		mkToken(t, s, "old", true, time.Now().Add(-time.Minute))
		mkToken(t, s, "rev", true, time.Time{})
		if err := s.RevokeToken(context.Background(), "rev"); err != nil {
			t.Fatal(err)
		}
		if _, err := reg(s, "once", "a", "ka"); err != nil {
			t.Fatal(err)
		}
		tests := []struct {
			name string
			tok  string
			sec  string
			want error
		}{
			{"used", "once", "secret-once", ErrTokenUsed},
			{"expired", "old", "secret-old", ErrTokenExpired},
			{"revoked", "rev", "secret-rev", ErrTokenRevoked},
			{"wrong secret", "once", "nope", ErrTokenInvalid},
			{"unknown", "zzz", "secret-zzz", ErrTokenInvalid},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				_, err := s.RegisterNode(context.Background(), Registration{TokenID: tc.tok, TokenSecret: tc.sec, Name: "b", Key: testKey("kb"), SecretHash: HashSecret("x")})
				if !errors.Is(err, tc.want) {
					t.Fatalf("got %v, want %v", err, tc.want)
				}
			})
		}
	})
}

func TestConcurrentSingleUseToken(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		s := open(t, Options{})
		mkToken(t, s, "once", false, time.Time{})
		const n = 16
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = reg(s, "once", fmt.Sprintf("node%d", i), (fmt.Sprintf("key%d", i)))
			}()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, ErrTokenUsed):
			default:
				t.Errorf("unexpected error: %v", err)
			}
		}
		nodes, _ := s.ListNodes(context.Background())
		if ok != 1 || len(nodes) != 1 {
			t.Fatalf("%d registrations succeeded, %d nodes; want exactly 1", ok, len(nodes))
		}
	})
}

func TestApprovalSessionsAndEvents(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{})
		u, err := s.CreateUser(ctx, User{Username: "alice", PasswordHash: "x"})
		if err != nil {
			t.Fatal(err)
		}
		other, _ := s.CreateUser(ctx, User{Username: "bob", PasswordHash: "x"})
		r := Registration{Name: "laptop", Key: testKey("keyL"), SecretHash: HashSecret("s1"), Approval: &Approval{OwnerID: u.ID}, KeyProven: true}
		res, err := s.RegisterNode(ctx, r)
		if err != nil || res.Node.OwnerID != u.ID || res.Node.TokenID != "" {
			t.Fatalf("approved registration: %+v %v", res, err)
		}
		if n, _ := s.GetNode(ctx, res.Node.ID); n.OwnerID != u.ID {
			t.Fatalf("stored owner %d", n.OwnerID)
		}
		// Another member may not renew alice's node by naming its public key.
		r.Approval, r.SecretHash = &Approval{OwnerID: other.ID}, HashSecret("s2")
		if _, err := s.RegisterNode(ctx, r); !errors.Is(err, ErrNameInUse) {
			t.Fatalf("bob renewing alice's node: %v", err)
		}
		r.Approval, r.KeyProven = &Approval{OwnerID: u.ID}, false
		if _, err := s.RegisterNode(ctx, r); !errors.Is(err, ErrKeyUnproven) {
			t.Fatalf("alice renewing her node without a key proof: %v", err)
		}
		r.KeyProven = true
		if res2, err := s.RegisterNode(ctx, r); err != nil || !res2.Existing || res2.Node.ID != res.Node.ID {
			t.Fatalf("alice renewing her node: %+v %v", res2, err)
		}

		now := time.Now()
		se := Session{IDHash: HashSecret("sid"), UserID: u.ID, CSRF: "c", Created: now, Expires: now.Add(time.Hour)}
		if err := s.CreateSession(ctx, se); err != nil {
			t.Fatal(err)
		}
		if got, err := s.GetSession(ctx, se.IDHash, now); err != nil || got.UserID != u.ID || got.CSRF != "c" {
			t.Fatalf("session %+v %v", got, err)
		}
		if _, err := s.GetSession(ctx, se.IDHash, now.Add(2*time.Hour)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("expired session: %v", err)
		}
		if err := s.DeleteSession(ctx, se.IDHash); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetSession(ctx, se.IDHash, now); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleted session: %v", err)
		}

		for i, owner := range []int64{u.ID, other.ID, 0, u.ID} {
			if err := s.AddEvent(ctx, Event{Kind: "join", Message: fmt.Sprint(i), OwnerID: owner}); err != nil {
				t.Fatal(err)
			}
		}
		all, _ := s.ListEvents(ctx, 0, 10)
		mine, _ := s.ListEvents(ctx, u.ID, 10)
		if len(all) != 4 || all[0].Message != "3" || len(mine) != 2 || mine[0].Message != "3" || mine[1].Message != "0" {
			t.Fatalf("events all %+v mine %+v", all, mine)
		}
	})
}

// TestDatabaseFilesPrivate: SQLite would create the database 0644, readable
// by anyone who can enter the directory; it and its -wal and -shm must be
// 0600, also when an older version left them 0644.
func TestDatabaseFilesPrivate(t *testing.T) {
	for _, existing := range []bool{false, true} {
		dir := t.TempDir()
		db := filepath.Join(dir, "meshlink.db")
		if existing {
			s := openTest(t, dir)
			s.Close()
			for _, p := range []string{db, db + "-wal", db + "-shm"} {
				os.Chmod(p, 0o644)
			}
		}
		s := openTest(t, dir)
		mkToken(t, s, "t1", false, time.Now().Add(time.Hour)) // a write, so the WAL exists
		n := 0
		for _, p := range []string{db, db + "-wal", db + "-shm"} {
			fi, err := os.Stat(p)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			n++
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("existing %v: %s has mode %04o, want 0600", existing, filepath.Base(p), fi.Mode().Perm())
			}
		}
		if n < 2 {
			t.Fatalf("only %d database files found", n)
		}
	}
}

// TestEventRetentionPerClass floods the log with more refusals than it
// keeps: the sign-in and the approval recorded before stay, and the
// refusals are cut to MaxEvents, the oldest first.
func TestEventRetentionPerClass(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{})
		for _, e := range []Event{{Kind: EventLogin, Message: "signed in"}, {Kind: EventApprove, Message: "approved"}, {Kind: EventJoin, Message: "joined"}, {Kind: EventDenied, Message: "denied"}} {
			if err := s.AddEvent(ctx, e); err != nil {
				t.Fatal(err)
			}
		}
		start := time.Now()
		const flood = MaxEvents + 50
		for i := range flood {
			if err := s.AddEvent(ctx, Event{Kind: EventRegisterFailed, Actor: "192.0.2.1", Message: fmt.Sprint("refusal ", i)}); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%d refusals added in %v", flood, time.Since(start).Round(time.Millisecond))
		evs, err := s.ListEvents(ctx, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		kept := map[EventKind]int{}
		for _, e := range evs {
			kept[e.Kind]++
		}
		if kept[EventLogin] != 1 || kept[EventApprove] != 1 || kept[EventJoin] != 1 || kept[EventDenied] != 1 {
			t.Fatalf("after %d refusals the log keeps %v; want the sign-in, the approval, the join and the denial", flood, kept)
		}
		if kept[EventRegisterFailed] != MaxEvents || evs[len(evs)-5].Message != "refusal 50" {
			t.Fatalf("refusals kept: %d, oldest %q; want %d from refusal 50", kept[EventRegisterFailed], evs[len(evs)-5].Message, MaxEvents)
		}
	})
}

func TestSetPasswordClearsMustChange(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		s := open(t, Options{})
		ctx := context.Background()
		u, err := s.CreateUser(ctx, User{Username: "admin", PasswordHash: "old", Admin: true, MustChangePassword: true})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := s.GetUser(ctx, "admin"); err != nil || !got.MustChangePassword || got.PasswordHash != "old" {
			t.Fatalf("created %+v %v", got, err)
		}
		now := time.Now()
		for _, id := range []string{"this", "other"} {
			if err := s.CreateSession(ctx, Session{IDHash: HashSecret(id), UserID: u.ID, CSRF: "c", Expires: now.Add(time.Hour)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.SetPassword(ctx, u.ID, "new", HashSecret("this")); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetSession(ctx, HashSecret("this"), now); err != nil {
			t.Fatalf("the changing session ended: %v", err)
		}
		if _, err := s.GetSession(ctx, HashSecret("other"), now); !errors.Is(err, ErrNotFound) {
			t.Fatalf("another session of the user survived the change: %v", err)
		}
		if got, err := s.GetUserByID(ctx, u.ID); err != nil || got.MustChangePassword || got.PasswordHash != "new" {
			t.Fatalf("after SetPassword %+v %v", got, err)
		}
		if err := s.SetPassword(ctx, u.ID+100, "x", nil); !errors.Is(err, ErrNotFound) {
			t.Fatalf("SetPassword of no user: %v", err)
		}
	})
}
