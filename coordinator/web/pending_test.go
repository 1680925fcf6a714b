package web

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func newTestConsole(now *time.Time) *Console {
	return New(Config{URL: func() string { return "https://mesh.example" }, Now: func() time.Time { return *now }})
}

// TestPendingFullSetMakesRoom fills the whole set from many networks at
// their cap; a request from a new network still gets in, in place of the
// oldest of a network holding the most, and a full network is refused.
func TestPendingFullSetMakesRoom(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	c := newTestConsole(&now)
	for g := range maxPending / maxPendingGroup {
		for i := range maxPendingGroup {
			if _, err := c.StartPending(PendingRequest{Name: "flood", RemoteIP: fmt.Sprintf("2001:db8:%x::%x", g, i+1)}); err != nil {
				t.Fatalf("network %d request %d: %v", g, i, err)
			}
			now = now.Add(time.Millisecond)
		}
	}
	if _, err := c.StartPending(PendingRequest{Name: "flood", RemoteIP: "2001:db8:0::99"}); !errors.Is(err, ErrTooManyPending) {
		t.Fatalf("a sixth request from a full /64: %v, want ErrTooManyPending", err)
	}
	p, err := c.StartPending(PendingRequest{Name: "honest", RemoteIP: "192.0.2.7"})
	if err != nil {
		t.Fatalf("a request from a new network into a full set: %v", err)
	}
	if got, _ := c.pending.byCodeGet(p.AuthURL[len("https://mesh.example/approve/"):], now); got == nil || got.req.Name != "honest" {
		t.Fatal("the new network's request is not waiting")
	}
	if n := len(c.pending.byCode); n != maxPending {
		t.Fatalf("%d requests waiting, bound %d", n, maxPending)
	}
}

// TestPendingUnopenedExpiresSooner: a request nobody opened is gone after
// unopenedTTL; one a signed-in person opened lasts pendingTTL.
func TestPendingUnopenedExpiresSooner(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	c := newTestConsole(&now)
	unopened, _ := c.StartPending(PendingRequest{Name: "a", RemoteIP: "192.0.2.1"})
	opened, _ := c.StartPending(PendingRequest{Name: "b", RemoteIP: "198.51.100.1"})
	code := func(p string) string { return p[len("https://mesh.example/approve/"):] }
	if p, exp := c.pending.byCodeGet(code(opened.AuthURL), now); p == nil || !exp.Equal(now.Add(pendingTTL)) {
		t.Fatalf("opened request: %v expires %v, want %v", p, exp, now.Add(pendingTTL))
	}
	now = now.Add(unopenedTTL + time.Second)
	if p, _ := c.pending.byCodeGet(code(unopened.AuthURL), now); p != nil {
		t.Fatalf("a request nobody opened is still waiting after %v", unopenedTTL+time.Second)
	}
	if p, _ := c.pending.byCodeGet(code(opened.AuthURL), now); p == nil {
		t.Fatal("an opened request expired before pendingTTL")
	}
}
