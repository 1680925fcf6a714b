package coordinator

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/pgtest"
	"github.com/meshlink/meshlink/wire"
)

// copyDataDir copies the files of a coordinator's data directory (its
// certificate and keys) but the database and the admin socket: what a
// second replica needs to present the same certificate and server key.
func copyDataDir(t *testing.T, from, to string) {
	t.Helper()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || e.Name() == dbFile || filepath.Ext(e.Name()) == ".sock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// startReplicas starts two coordinators on one PostgreSQL database, the
// second with a copy of the first's data directory.
func startReplicas(t *testing.T) (a, b *Server) {
	t.Helper()
	db := pgtest.DB(t)
	dirA, dirB := t.TempDir(), t.TempDir()
	a = startServer(t, dirA, func(c *Config) { c.Store = db })
	copyDataDir(t, dirA, dirB)
	b = startServer(t, dirB, func(c *Config) { c.Store = db })
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatalf("replicas present different certificates: %s, %s", a.Fingerprint(), b.Fingerprint())
	}
	return a, b
}

func hasService(ss []wire.Service, name string) bool {
	return slices.ContainsFunc(ss, func(s wire.Service) bool { return s.Name == name })
}

// TestReplicasShareOneMesh: two coordinators on one PostgreSQL database
// serve one mesh. A token minted on one joins nodes through both; a
// change made through either reaches the map streams held by the other
// within a second.
func TestReplicasShareOneMesh(t *testing.T) {
	tstest.CheckGoroutines(t)
	ra, rb := startReplicas(t)
	c := pinnedClient(t, ra.Fingerprint(), true)
	jt := mustToken(t, ra, TokenOptions{Reusable: true})
	_, credA := register(t, c, jt, "alpha") // through A
	jtB := jt
	jtB.URL = rb.URL()
	_, credB := register(t, c, jtB, "beta") // the same token, through B

	stA := openMap(t, c, ra.URL(), credA)
	stB := openMap(t, c, rb.URL(), credB)
	// Each map shows the peer on the other replica (A's, online): folded
	// from the stream, whether the full map already had it online or a
	// later delta brought it.
	mapOf(t, stB, "B's map with alpha", func(nm wire.NetworkMap) bool { return len(nm.Peers) == 1 })
	mapOf(t, stA, "beta online in A's map", func(nm wire.NetworkMap) bool { return len(nm.Peers) == 1 && nm.Peers[0].Online })

	// beta exposes a service through B: alpha's stream on A hears of it.
	start := time.Now()
	if st, body := call(t, c, rb.URL(), wire.PathServices, &credB, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "db", Port: 5432}); st != http.StatusOK {
		t.Fatalf("expose through B: %d %s", st, body)
	}
	stA.next(t, 5*time.Second, "service db on A's stream", func(m wire.MapResponse) bool { return hasService(m.ServicesChanged, "db") })
	bToA := time.Since(start)

	// alpha exposes one through A: beta's stream on B hears of it.
	start = time.Now()
	if st, body := call(t, c, ra.URL(), wire.PathServices, &credA, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "web", Port: 80}); st != http.StatusOK {
		t.Fatalf("expose through A: %d %s", st, body)
	}
	stB.next(t, 5*time.Second, "service web on B's stream", func(m wire.MapResponse) bool { return hasService(m.ServicesChanged, "web") })
	aToB := time.Since(start)

	// An admin expires beta's key through B: alpha, on A, drops it.
	start = time.Now()
	if err := rb.ExpireNode(context.Background(), "beta", "admin"); err != nil {
		t.Fatal(err)
	}
	stA.next(t, 5*time.Second, "beta removed from A's stream", func(m wire.MapResponse) bool { return slices.Contains(m.PeersRemoved, credB.ID) })
	removal := time.Since(start)

	t.Logf("cross-replica change latency: B→A %v, A→B %v, key expiry B→A %v", bToA, aToB, removal)
	for _, d := range []time.Duration{bToA, aToB, removal} {
		if d > time.Second {
			t.Errorf("a change took %v to reach the other replica's streams, want ≤ 1s", d)
		}
	}
}

// TestReplicaKeepsEphemeralNodesOfTheOther: a coordinator starting next
// to another gives every ephemeral node its grace period; one connected to
// the other coordinator is not reaped for being offline here. Once it
// leaves for good, it is removed.
func TestReplicaKeepsEphemeralNodesOfTheOther(t *testing.T) {
	const grace = time.Second
	fast := func(c *Config) { c.EphemeralGrace, c.KeepAlive = grace, 200*time.Millisecond }
	db := pgtest.DB(t)
	dirA, dirB := t.TempDir(), t.TempDir()
	ra := startServer(t, dirA, fast, func(c *Config) { c.Store = db })
	c := pinnedClient(t, ra.Fingerprint(), true)
	jt := mustToken(t, ra, TokenOptions{Reusable: true, Ephemeral: true})
	_, cred := register(t, c, jt, "sidecar")
	st := openMap(t, c, ra.URL(), cred)
	st.next(t, 10*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })

	copyDataDir(t, dirA, dirB)
	rb := startServer(t, dirB, fast, func(c *Config) { c.Store = db })
	// B schedules the reap of every ephemeral node at its start; it must
	// see the node's heartbeat through A. Waiting is the point here: the
	// reap would fire after grace.
	select {
	case <-time.After(4 * grace):
	case <-st.done:
		t.Fatal("the stream on A ended")
	}
	if _, err := rb.Store().GetNode(context.Background(), cred.ID); err != nil {
		t.Fatalf("B reaped an ephemeral node connected to A: %v", err)
	}
	st.close()
	tstest.WaitFor(t, 10*grace, "the node, gone from A, to be reaped", func() bool {
		_, err := rb.Store().GetNode(context.Background(), cred.ID)
		return errors.Is(err, store.ErrNotFound)
	})
}

// TestReplicasStartTogether: coordinators starting at the same moment on
// a fresh database all start; one of them makes the first admin.
func TestReplicasStartTogether(t *testing.T) {
	db := pgtest.DB(t)
	const n = 3
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		dir := t.TempDir()
		go func() {
			s, err := New(Config{Listen: "127.0.0.1:0", DataDir: dir, Store: db, Out: tstest.Writer(t)})
			if err == nil {
				t.Cleanup(func() { s.Close() })
				err = s.Start(context.Background())
			}
			errs <- err
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Errorf("a replica did not start: %v", err)
		}
	}
	st, err := store.OpenPostgres(context.Background(), db, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if users, _ := st.ListUsers(context.Background()); len(users) != 1 || users[0].Username != "admin" {
		t.Fatalf("users after starting together: %+v", users)
	}
}
