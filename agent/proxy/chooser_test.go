package proxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

func cand(id wire.NodeID, name string, mods ...func(*candidate)) candidate {
	c := candidate{Target: Target{Node: id, Name: name, Online: true, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 96, 0, byte(id)}), 80)}}
	for _, m := range mods {
		m(&c)
	}
	return c
}

func prio(p int) func(*candidate)       { return func(c *candidate) { c.Priority = p } }
func weight(w int) func(*candidate)     { return func(c *candidate) { c.Weight = w } }
func version(v string) func(*candidate) { return func(c *candidate) { c.Version = v } }
func region(r string) func(*candidate)  { return func(c *candidate) { c.Region = r } }
func open(n int64) func(*candidate)     { return func(c *candidate) { c.open = n } }
func offline(c *candidate)              { c.Online = false }
func local(c *candidate)                { c.Local = "127.0.0.1:1" }
func unhealthy(c *candidate)            { c.Health, c.HealthError = wire.HealthUnhealthy, "connection refused" }
func failing(c *candidate)              { c.failing, c.failErr = true, "no answer within the connect timeout" }

// shares chooses n times and returns the fraction each provider got first.
func shares(t *testing.T, cs []candidate, pol choosePolicy, n int) map[string]float64 {
	t.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	got := map[string]int{}
	for range n {
		order, err := choose(cs, pol, netip.Addr{}, r)
		if err != nil {
			t.Fatal(err)
		}
		got[order[0].Name]++
	}
	out := map[string]float64{}
	for k, v := range got {
		out[k] = float64(v) / float64(n)
	}
	return out
}

func TestChoose(t *testing.T) {
	tests := []struct {
		name  string
		cands []candidate
		pol   choosePolicy
		// want maps each provider to its expected share of first choices
		// (±0.02 over 10,000 draws); absent ones must get none.
		want map[string]float64
		// order, if set, is the whole expected order of the first draw.
		order []string
	}{
		{"least loaded", []candidate{cand(1, "a", open(3)), cand(2, "b", open(1)), cand(3, "c", open(2))}, choosePolicy{},
			map[string]float64{"b": 1}, []string{"b", "c", "a"}},
		{"ties at random", []candidate{cand(1, "a"), cand(2, "b")}, choosePolicy{},
			map[string]float64{"a": .5, "b": .5}, nil},
		{"lowest priority first", []candidate{cand(1, "a", prio(1)), cand(2, "b", prio(0), open(50)), cand(3, "c", prio(2))}, choosePolicy{},
			map[string]float64{"b": 1}, []string{"b", "a", "c"}},
		{"unhealthy priority fails over", []candidate{cand(1, "a", prio(0), unhealthy), cand(2, "b", prio(1))}, choosePolicy{},
			map[string]float64{"b": 1}, []string{"b"}},
		{"failing one skipped", []candidate{cand(1, "a", failing), cand(2, "b", open(9))}, choosePolicy{},
			map[string]float64{"b": 1}, []string{"b"}},
		{"offline skipped", []candidate{cand(1, "a", offline), cand(2, "b", open(9), prio(5))}, choosePolicy{},
			map[string]float64{"b": 1}, []string{"b"}},
		{"local never offline", []candidate{cand(1, "me", offline, local, prio(1)), cand(2, "b", prio(2))}, choosePolicy{},
			map[string]float64{"me": 1}, []string{"me", "b"}},
		{"weights share a priority", []candidate{cand(1, "a", weight(3)), cand(2, "b", weight(1)), cand(3, "c", prio(1), weight(100))}, choosePolicy{},
			map[string]float64{"a": .75, "b": .25}, nil},
		{"split 90/10", []candidate{cand(1, "a", version("v1")), cand(2, "b", version("v1")), cand(3, "c", version("v2"), weight(50))},
			choosePolicy{Split: map[string]int{"v1": 90, "v2": 10}},
			map[string]float64{"a": .45, "b": .45, "c": .10}, nil},
		{"split version without providers", []candidate{cand(1, "a", version("v1")), cand(2, "b", version("v2"), unhealthy)},
			choosePolicy{Split: map[string]int{"v1": 10, "v2": 90}},
			map[string]float64{"a": 1}, nil},
		{"split names no version here", []candidate{cand(1, "a", version("x")), cand(2, "b", version("y"))},
			choosePolicy{Split: map[string]int{"v1": 100}},
			map[string]float64{"a": .5, "b": .5}, nil},
		{"same site preferred", []candidate{cand(1, "a"), cand(2, "me", local, open(9))}, choosePolicy{Locality: wire.LocalitySameSite},
			map[string]float64{"me": 1}, []string{"me", "a"}},
		{"same region preferred", []candidate{cand(1, "a", region("us")), cand(2, "b", region("eu"), open(9)), cand(3, "c", region("eu"), open(10))},
			choosePolicy{Locality: wire.LocalitySameRegion, Region: "eu"},
			map[string]float64{"b": 1}, []string{"b", "c", "a"}},
		{"region fails over", []candidate{cand(1, "a", region("us")), cand(2, "b", region("eu"), unhealthy)},
			choosePolicy{Locality: wire.LocalitySameRegion, Region: "eu"},
			map[string]float64{"a": 1}, []string{"a"}},
		{"locality before priority", []candidate{cand(1, "a", region("us"), prio(0)), cand(2, "b", region("eu"), prio(3))},
			choosePolicy{Locality: wire.LocalitySameRegion, Region: "eu"},
			map[string]float64{"b": 1}, []string{"b", "a"}},
		{"at most maxAttempts", []candidate{cand(1, "a"), cand(2, "b", open(1)), cand(3, "c", open(2)), cand(4, "d", open(3))}, choosePolicy{},
			map[string]float64{"a": 1}, []string{"a", "b", "c"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := shares(t, tc.cands, tc.pol, 10000)
			for name, share := range got {
				if want := tc.want[name]; share < want-0.02 || share > want+0.02 {
					t.Errorf("%s got %.3f of connections, want %.2f±0.02 (all: %v)", name, share, want, got)
				}
			}
			for name, want := range tc.want {
				if _, ok := got[name]; !ok && want > 0 {
					t.Errorf("%s got no connections, want %.2f", name, want)
				}
			}
			if tc.order != nil {
				order, err := choose(tc.cands, tc.pol, netip.Addr{}, rand.New(rand.NewPCG(3, 4)))
				if err != nil {
					t.Fatal(err)
				}
				var names []string
				for _, o := range order {
					names = append(names, o.Name)
				}
				if strings.Join(names, ",") != strings.Join(tc.order, ",") {
					t.Errorf("order %v, want %v", names, tc.order)
				}
			}
		})
	}
}

func TestChooseSplitReport(t *testing.T) {
	cs := []candidate{cand(1, "v1-a", version("v1")), cand(2, "v1-b", version("v1")), cand(3, "v2", version("v2"))}
	got := shares(t, cs, choosePolicy{Split: map[string]int{"v1": 90, "v2": 10}}, 10000)
	v1 := got["v1-a"] + got["v1-b"]
	t.Logf("90/10 split over 10,000 connections: v1 %.2f%% (v1-a %.2f%%, v1-b %.2f%%), v2 %.2f%%", v1*100, got["v1-a"]*100, got["v1-b"]*100, got["v2"]*100)
	if v1 < .88 || v1 > .92 {
		t.Errorf("v1 got %.3f, want 0.90±0.02", v1)
	}
}

func TestChooseNoHealthy(t *testing.T) {
	cs := []candidate{cand(1, "a", unhealthy), cand(2, "b", offline), cand(3, "c", failing)}
	_, err := choose(cs, choosePolicy{}, netip.Addr{}, rand.New(rand.NewPCG(1, 1)))
	if !errors.Is(err, ErrNoHealthyProvider) {
		t.Fatalf("err %v, want ErrNoHealthyProvider", err)
	}
	want := "no healthy provider: a unhealthy (connection refused); b offline; c not answering (no answer within the connect timeout)"
	if err.Error() != want {
		t.Errorf("error\n %q\nwant\n %q", err, want)
	}
	if _, err := choose(nil, choosePolicy{}, netip.Addr{}, rand.New(rand.NewPCG(1, 1))); !errors.Is(err, ErrNoHealthyProvider) || !strings.Contains(err.Error(), "no providers") {
		t.Errorf("no providers: %v", err)
	}
}

func TestChooseAffinity(t *testing.T) {
	cs := []candidate{cand(1, "a"), cand(2, "b"), cand(3, "c"), cand(4, "d")}
	pol := choosePolicy{Affinity: wire.AffinityClient}
	r := rand.New(rand.NewPCG(5, 6))
	seen := map[string]bool{}
	for i := range 200 {
		client := netip.AddrFrom4([4]byte{127, 0, byte(i / 256), byte(i)})
		first := ""
		for k := range 20 {
			// Load changes between connections must not move a client.
			cs[k%4].open = int64(k)
			order, err := choose(cs, pol, client, r)
			if err != nil {
				t.Fatal(err)
			}
			if first == "" {
				first = order[0].Name
			} else if order[0].Name != first {
				t.Fatalf("client %v went to %s, then %s", client, first, order[0].Name)
			}
		}
		seen[first] = true
	}
	if len(seen) != 4 {
		t.Errorf("200 clients spread over %v, want all 4 providers", seen)
	}
	// A provider going unhealthy moves only its own clients.
	client := netip.MustParseAddr("127.0.0.9")
	order, _ := choose(cs, pol, client, r)
	for i := range cs {
		if cs[i].Name == order[0].Name {
			cs[i].Health = wire.HealthUnhealthy
		}
	}
	order2, _ := choose(cs, pol, client, r)
	if order2[0].Name == order[0].Name {
		t.Errorf("client stayed on unhealthy %s", order[0].Name)
	}
}

// TestConsumerPassiveHealth drives the consumer's own failure marking
// with a fake clock: a provider that refused is skipped until its
// backoff ends, and taken back at once when the map shows it back.
func TestConsumerPassiveHealth(t *testing.T) {
	now := time.Unix(1000, 0)
	a := netip.MustParseAddrPort("100.96.0.1:80")
	b := netip.MustParseAddrPort("100.96.0.2:80")
	d := kernelDialer{b: greeter(t, "b")}
	c := NewConsumer(ConsumerConfig{Dialer: d, Now: func() time.Time { return now }, Rand: rand.New(rand.NewPCG(1, 1)),
		Listen: func(netip.AddrPort) (net.Listener, error) { return nil, errors.New("no listener in this test") }})
	t.Cleanup(func() { c.Close(); c.Wait() })
	targets := []Target{{Node: 1, Name: "a", Addr: a, Online: true}, {Node: 2, Name: "b", Addr: b, Online: true, Priority: 1}}
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: netip.MustParseAddrPort("127.0.0.1:1"), Targets: targets}})
	provider := func() string {
		t.Helper()
		for _, s := range c.Status() {
			for _, p := range s.Providers {
				if p.Name == "a" {
					return p.Health
				}
			}
		}
		return ""
	}
	conn, err := c.DialService(t.Context(), "web")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if h := provider(); !strings.HasPrefix(h, "not answering") {
		t.Fatalf("a after a refused dial: %q, want not answering", h)
	}
	now = now.Add(500 * time.Millisecond)
	if h := provider(); h == "ok" {
		t.Fatalf("a healthy again after 0.5 s")
	}
	now = now.Add(600 * time.Millisecond)
	if h := provider(); h != "ok" {
		t.Fatalf("a after its 1 s backoff: %q, want ok (tried again)", h)
	}
	// Failing again doubles the backoff; the map showing it back online
	// clears it.
	conn, _ = c.DialService(t.Context(), "web")
	conn.Close()
	targets[0].Online = false
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: netip.MustParseAddrPort("127.0.0.1:1"), Targets: targets}})
	targets = append([]Target(nil), targets...)
	targets[0].Online = true
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: netip.MustParseAddrPort("127.0.0.1:1"), Targets: targets}})
	if h := provider(); h != "ok" {
		t.Fatalf("a back online in the map: %q, want ok", h)
	}
}

// blackhole answers nothing: a dial waits until its context ends, as
// one to a dead peer over WireGuard does.
type blackhole struct {
	real    kernelDialer
	dialing chan netip.AddrPort
}

func (b blackhole) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if _, ok := b.real[dst]; ok {
		return b.real.DialTCP(ctx, dst)
	}
	b.dialing <- dst
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestDialGivesUpWhenProviderGone: a connection being dialed to a provider
// that the map then shows offline moves to the next at once, instead of
// waiting out the connect timeout.
func TestDialGivesUpWhenProviderGone(t *testing.T) {
	a := netip.MustParseAddrPort("100.96.0.1:80")
	b := netip.MustParseAddrPort("100.96.0.2:80")
	d := blackhole{real: kernelDialer{b: greeter(t, "b")}, dialing: make(chan netip.AddrPort, 1)}
	c := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: time.Minute,
		Listen: func(netip.AddrPort) (net.Listener, error) { return nil, errors.New("no listener in this test") }})
	t.Cleanup(func() { c.Close(); c.Wait() })
	listen := netip.MustParseAddrPort("127.0.0.1:1")
	targets := []Target{{Node: 1, Name: "a", Addr: a, Online: true}, {Node: 2, Name: "b", Addr: b, Online: true, Priority: 1}}
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: targets}})
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		conn, err := c.DialService(context.Background(), "web")
		if err == nil {
			conn.Close()
		}
		done <- err
	}()
	<-d.dialing // the dial to a is in flight
	gone := slices.Clone(targets)
	gone[0].Online = false
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: gone}})
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dial: %v, want b", err)
		}
		t.Logf("moved to b %v after a went offline mid-dial (connect timeout 1 min)", time.Since(start).Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the dial still waits on a 10 s after the map showed it offline")
	}
}
