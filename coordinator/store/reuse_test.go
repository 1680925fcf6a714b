package store

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock for Options.Now.
type fakeClock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestServiceQuotaPerNode(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{MaxServicesPerNode: 3})
		mkToken(t, s, "r", true, time.Time{})
		a, err := reg(s, "r", "a", "ka")
		if err != nil {
			t.Fatal(err)
		}
		b, err := reg(s, "r", "b", "kb")
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			if _, err := s.ExposeService(ctx, fmt.Sprintf("s%d", i), a.Node.ID, 80); err != nil {
				t.Fatal(err)
			}
		}
		var qe *QuotaError
		if _, err := s.ExposeService(ctx, "s3", a.Node.ID, 80); !errors.As(err, &qe) || qe.Limit != 3 {
			t.Fatalf("4th service of a node: %v, want a QuotaError of 3", err)
		}
		// The refused expose left no service behind.
		if svcs, _ := s.ListServices(ctx); len(svcs) != 3 {
			t.Fatalf("services after refusal: %+v", svcs)
		}
		// A new port for a service it already provides is not one more; other
		// nodes have their own quota.
		if _, err := s.ExposeService(ctx, "s0", a.Node.ID, 8080); err != nil {
			t.Fatalf("re-expose at the limit: %v", err)
		}
		if _, err := s.ExposeService(ctx, "s3", b.Node.ID, 80); err != nil {
			t.Fatalf("another node: %v", err)
		}
		// Unexposing one makes room.
		if err := s.UnexposeService(ctx, "s1", a.Node.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := s.ExposeService(ctx, "s4", a.Node.ID, 80); err != nil {
			t.Fatalf("after unexpose: %v", err)
		}
	})
}

func TestIdleServicesDeletedAndVIPsReused(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		clk := &fakeClock{t: time.Unix(1_700_000_000, 0)}
		s := open(t, Options{Now: clk.Now})
		mkToken(t, s, "r", true, time.Time{})
		a, _ := reg(s, "r", "a", "ka")
		b, _ := reg(s, "r", "b", "kb")
		const grace = 24 * time.Hour
		web, _ := s.ExposeService(ctx, "web", a.Node.ID, 80)
		db, _ := s.ExposeService(ctx, "db", b.Node.ID, 5432)
		if err := s.UnexposeService(ctx, "web", a.Node.ID); err != nil {
			t.Fatal(err)
		}
		// Within the grace period the service and its VIP stay, and a provider
		// coming back gets the same VIP.
		clk.Advance(grace - time.Minute)
		if gone, err := s.DeleteIdleServices(ctx, grace); err != nil || len(gone) != 0 {
			t.Fatalf("deleted within grace: %v %v", gone, err)
		}
		if sv, _ := s.ExposeService(ctx, "web", b.Node.ID, 80); sv.VIP != web.VIP {
			t.Fatalf("VIP changed within grace: %v, was %v", sv.VIP, web.VIP)
		}
		// Coming back reset the grace: leaving again starts it anew.
		if err := s.UnexposeService(ctx, "web", b.Node.ID); err != nil {
			t.Fatal(err)
		}
		clk.Advance(2 * time.Minute)
		if gone, _ := s.DeleteIdleServices(ctx, grace); len(gone) != 0 {
			t.Fatalf("grace not restarted: deleted %v", gone)
		}
		clk.Advance(grace)
		if gone, err := s.DeleteIdleServices(ctx, grace); err != nil || len(gone) != 1 || gone[0] != "web" {
			t.Fatalf("after grace: deleted %v %v, want [web]", gone, err)
		}
		// A service with a provider is never deleted, however old.
		svcs, _ := s.ListServices(ctx)
		if len(svcs) != 1 || svcs[0].Name != "db" || svcs[0].VIP != db.VIP {
			t.Fatalf("services: %+v", svcs)
		}
		// The freed VIP (the lowest) goes to the next new service.
		if sv, _ := s.ExposeService(ctx, "cache", a.Node.ID, 6379); sv.VIP != web.VIP {
			t.Fatalf("new service got %v, want the freed %v", sv.VIP, web.VIP)
		}
		// Removing a node starts the grace of the services only it provided.
		if err := s.DeleteNode(ctx, b.Node.ID); err != nil {
			t.Fatal(err)
		}
		clk.Advance(grace)
		if gone, _ := s.DeleteIdleServices(ctx, grace); len(gone) != 1 || gone[0] != "db" {
			t.Fatalf("after its node was removed: deleted %v, want [db]", gone)
		}
	})
}

func TestNodeAddressesReusedAfterQuarantine(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		clk := &fakeClock{t: time.Unix(1_700_000_000, 0)}
		const pool, quarantine = 3, time.Hour
		s := open(t, Options{Now: clk.Now, NodePoolSize: pool, NodeQuarantine: quarantine})
		mkToken(t, s, "r", true, time.Time{})
		var live []Node
		inPool := map[netip.Addr]bool{}
		for i := 0; i < pool; i++ {
			r, err := reg(s, "r", fmt.Sprintf("n%d", i), fmt.Sprintf("k%d", i))
			if err != nil {
				t.Fatal(err)
			}
			live = append(live, r.Node)
			inPool[r.Node.IPv4] = true
		}
		if _, err := reg(s, "r", "full", "kfull"); !errors.Is(err, ErrExhausted) {
			t.Fatalf("pool of %d full: %v", pool, err)
		}
		// Inside the quarantine a removed node's address is not handed out.
		if err := s.DeleteNode(ctx, live[0].ID); err != nil {
			t.Fatal(err)
		}
		clk.Advance(quarantine - time.Second)
		if r, err := reg(s, "r", "early", "kearly"); !errors.Is(err, ErrExhausted) {
			t.Fatalf("address reused inside quarantine: %v %v", r.Node.IPv4, err)
		}
		clk.Advance(time.Second)
		r, err := reg(s, "r", "late", "klate")
		if err != nil || r.Node.IPv4 != live[0].IPv4 || r.Node.IPv6 != live[0].IPv6 {
			t.Fatalf("after quarantine: %v %v %v, want %v", r.Node.IPv4, r.Node.IPv6, err, live[0].IPv4)
		}
		// The removed node is still told it was removed.
		if _, err := s.RemovedNodeSecretHash(ctx, live[0].ID); err != nil {
			t.Fatalf("tombstone lost on reuse: %v", err)
		}
		live[0] = r.Node

		// Churn far beyond the pool: every join succeeds once a quarantine
		// has passed, and no two live nodes share an address.
		for i := 0; i < 10*pool; i++ {
			if err := s.DeleteNode(ctx, live[0].ID); err != nil {
				t.Fatal(err)
			}
			live = live[1:]
			clk.Advance(quarantine)
			r, err := reg(s, "r", fmt.Sprintf("c%d", i), fmt.Sprintf("kc%d", i))
			if err != nil {
				t.Fatalf("join %d of the churn: %v", i, err)
			}
			live = append(live, r.Node)
			seen := map[netip.Addr]bool{}
			for _, n := range live {
				if seen[n.IPv4] || seen[n.IPv6] || !inPool[n.IPv4] {
					t.Fatalf("join %d: address %v twice or outside the pool: %+v", i, n.IPv4, live)
				}
				seen[n.IPv4], seen[n.IPv6] = true, true
			}
		}
	})
}

func TestServiceVIPIndexInvertsServiceVIP(t *testing.T) {
	for _, i := range []int64{0, 1, 253, 254, 255, 1000, vipSpace - 1} {
		v, err := ServiceVIP(i)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := serviceVIPIndex(v); !ok || got != i {
			t.Errorf("serviceVIPIndex(%v) = %d %v, want %d", v, got, ok, i)
		}
	}
	for _, a := range []string{"100.100.1.0", "100.100.1.255", "100.96.0.1", "::1"} {
		if _, ok := serviceVIPIndex(netip.MustParseAddr(a)); ok {
			t.Errorf("%s is not a VIP", a)
		}
	}
}
