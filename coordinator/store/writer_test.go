package store

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
)

// TestConcurrentWritesFailAlone: writes racing through the store (batched
// into shared transactions on SQLite) each get their own answer: the ones
// that repeat a token id fail, every other one is stored, and a single-use
// token is spent by exactly one of the registrations racing for it.
func TestConcurrentWritesFailAlone(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		s := open(t, Options{})
		ctx := context.Background()
		const n = 200
		mkToken(t, s, "once", false, time.Time{})
		var wg sync.WaitGroup
		errs := make([]error, n)
		regs := make([]error, n)
		for i := range n {
			wg.Add(2)
			go func() {
				defer wg.Done()
				// Every tenth id is the one before it again: one of the two fails.
				id := fmt.Sprint("tok", i-i%10/9)
				errs[i] = s.CreateToken(ctx, Token{ID: id, SecretHash: HashSecret("x")})
			}()
			go func() {
				defer wg.Done()
				_, regs[i] = reg(s, "once", fmt.Sprint("node", i), fmt.Sprint("key", i))
			}()
		}
		wg.Wait()
		failed, joined := 0, 0
		for i, err := range errs {
			if err != nil {
				failed++
				if i%10 < 8 || !isUniqueViolation(errors.Unwrap(err)) && !isUniqueViolation(err) {
					t.Errorf("token %d: %v", i, err)
				}
			}
		}
		for i, err := range regs {
			switch {
			case err == nil:
				joined++
			case !errors.Is(err, ErrTokenUsed):
				t.Errorf("registration %d: %v; want ErrTokenUsed", i, err)
			}
		}
		if failed != n/10 || joined != 1 {
			t.Fatalf("%d token writes failed (want %d), %d nodes joined with a single-use token (want 1)", failed, n/10, joined)
		}
		toks, err := s.ListTokens(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(toks) != n-n/10+1 {
			t.Fatalf("%d tokens stored, want %d", len(toks), n-n/10+1)
		}
	})
}

// TestHeldNodeUpdates: last-seen times and endpoints are seen at once,
// survive a reopen (written at Close), and a cancelled caller's write does
// not undo the others of its batch.
func TestHeldNodeUpdates(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenSQLite(context.Background(), filepath.Join(dir, "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	mkToken(t, s, "t", true, time.Time{})
	r, err := reg(s, "t", "a", "a")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	seen := time.Unix(1700000000, 0)
	ep := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.7:41641")}
	if err := s.SetLastSeen(ctx, r.Node.ID, seen); err != nil {
		t.Fatal(err)
	}
	if err := s.UpdateNodeNetwork(ctx, r.Node.ID, key.Public{}, 4242, ep); err != nil {
		t.Fatal(err)
	}
	check := func(s Store, when string) {
		t.Helper()
		n, err := s.GetNode(ctx, r.Node.ID)
		if err != nil {
			t.Fatal(err)
		}
		ns, err := s.ListNodes(ctx)
		if err != nil || len(ns) != 1 {
			t.Fatal(ns, err)
		}
		for _, n := range []Node{n, ns[0]} {
			if !n.LastSeen.Equal(seen) || n.ListenPort != 4242 || len(n.Endpoints) != 1 || n.Endpoints[0] != ep[0] {
				t.Fatalf("%s: node %+v; want last seen %v, port 4242, endpoints %v", when, n, seen, ep)
			}
		}
	}
	check(s, "held")
	if err := s.UpdateNodeNetwork(ctx, 999, key.Public{}, 1, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("held update of an unknown node: %v; want ErrNotFound", err)
	}
	s.Close()
	s2, err := OpenSQLite(context.Background(), filepath.Join(dir, "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	check(s2, "after a reopen")
}

// TestNodeListingFollowsWrites: once a listing filled the node cache,
// every write shows in the next listing and lookup: a new node, a key
// change, a removal.
func TestNodeListingFollowsWrites(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		s := open(t, Options{})
		ctx := context.Background()
		mkToken(t, s, "t", true, time.Time{})
		a, err := reg(s, "t", "a", "a")
		if err != nil {
			t.Fatal(err)
		}
		names := func() []string {
			t.Helper()
			ns, err := s.ListNodes(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, n := range ns {
				out = append(out, n.Name+"="+n.Key.Short())
			}
			return out
		}
		if got := names(); len(got) != 1 {
			t.Fatalf("nodes %v", got)
		}
		b, err := reg(s, "t", "b", "b")
		if err != nil {
			t.Fatal(err)
		}
		if got := names(); len(got) != 2 {
			t.Fatalf("after a join: %v", got)
		}
		if err := s.UpdateNodeKey(ctx, a.Node.ID, testKey("a2"), time.Time{}); err != nil {
			t.Fatal(err)
		}
		if got := names(); got[0] != "a="+testKey("a2").Short() {
			t.Fatalf("after a key change: %v", got)
		}
		if n, err := s.GetNode(ctx, a.Node.ID); err != nil || n.Key != testKey("a2") {
			t.Fatalf("lookup after a key change: %v %v", n.Key.Short(), err)
		}
		if err := s.DeleteNode(ctx, b.Node.ID); err != nil {
			t.Fatal(err)
		}
		if got := names(); len(got) != 1 {
			t.Fatalf("after a removal: %v", got)
		}
		if _, err := s.GetNode(ctx, b.Node.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("lookup of a removed node: %v", err)
		}
	})
}
