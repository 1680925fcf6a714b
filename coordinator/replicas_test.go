package coordinator

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

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
	for _, st := range []*stream{stA, stB} {
		st.next(t, 10*time.Second, "full map with both nodes", func(m wire.MapResponse) bool {
			return m.Full != nil && len(m.Full.Peers) == 1
		})
	}

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
