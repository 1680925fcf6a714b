package bind_test

// Attacks on the bind, performed: spoofed and replayed disco pings, and a
// relay that claims source keys it has no right to. Each runs in a synctest
// bubble on the in-memory network, bounded in count and in (fake) time.

import (
	"crypto/rand"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
)

// sentCounter counts what one address sends, by destination.
type sentCounter struct {
	mu   sync.Mutex // guards the fields below
	from netip.AddrPort
	to   map[netip.AddrPort]int
}

func countSent(h *harness, from netip.AddrPort, also func(src, dst netip.AddrPort, pkt []byte)) *sentCounter {
	c := &sentCounter{from: from, to: map[netip.AddrPort]int{}}
	h.net.TapSent(func(src, dst netip.AddrPort, pkt []byte) {
		if src == from {
			c.mu.Lock()
			c.to[dst]++
			c.mu.Unlock()
		}
		if also != nil {
			also(src, dst, pkt)
		}
	})
	return c
}

// total is the packets sent to destinations for which keep holds, and
// how many such destinations.
func (c *sentCounter) total(keep func(netip.AddrPort) bool) (pkts, dsts int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for d, n := range c.to {
		if keep(d) {
			pkts += n
			dsts++
		}
	}
	return pkts, dsts
}

func spoofed(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), uint16(40000+i))
}

func isSpoofed(a netip.AddrPort) bool {
	return netip.MustParsePrefix("198.18.0.0/15").Contains(a.Addr())
}

// TestSpoofedPingsBounded: a hostile member, holding its own node key,
// sends the victim 2,000 fresh, validly sealed pings from 2,000 spoofed
// addresses, and answers every ping the victim sends to one of them. The
// victim answers only a small budget of them, keeps at most 8 learnt paths,
// and 40 s later is still sending next to nothing to those addresses.
func TestSpoofedPingsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		const n = 2000
		evil := key.NewPrivate()
		evilAt := a4 // the member's real address, from the map
		v := h.addNode("victim", b4)
		v.b.SetPeers([]bind.PeerConfig{{Key: evil.Public(), Name: "evil", Endpoints: []netip.AddrPort{evilAt}}})
		// The attacker answers the victim's pings to its spoofed addresses,
		// so that they would become paths if the victim let them.
		var pongs atomic.Int64
		sent := countSent(h, b4, func(src, dst netip.AddrPort, pkt []byte) {
			if src != b4 || !isSpoofed(dst) {
				return
			}
			if _, typ, txid, ok := bind.OpenDisco(evil, pkt); ok && typ == bind.DiscoPing {
				h.net.Inject(dst, b4, bind.SealDisco(evil, v.pub, bind.DiscoPong, txid, b4, time.Now().Add(time.Millisecond+time.Duration(pongs.Add(1)))))
			}
		})
		start := time.Now() // the fake clock stands still: stamps 1 ns apart
		for i := range n {
			var txid [12]byte
			rand.Read(txid[:])
			h.net.Inject(spoofed(i), b4, bind.SealDisco(evil, v.pub, bind.DiscoPing, txid, netip.AddrPort{}, start.Add(time.Duration(i))))
			if i%200 == 199 {
				synctest.Wait() // let the victim read them: queues hold 1024
			}
		}
		synctest.Wait()
		d := v.b.Drops()
		pkts, dsts := sent.total(isSpoofed)
		t.Logf("at once: %d packets to %d spoofed addresses; %d pings over budget; drops %+v", pkts, dsts, d.Limited, d)
		if d.Limited < n-16 {
			t.Errorf("only %d of %d spoofed pings refused for budget", d.Limited, n)
		}
		// Stays a sleep: in the bubble it advances the fake clock, and 40 s
		// of the victim's timers with the attacker answering is what is
		// tested (that nothing much is sent); there is nothing to wait for.
		time.Sleep(40 * time.Second)
		synctest.Wait()
		pkts, dsts = sent.total(isSpoofed)
		t.Logf("after 40 s: %d packets to %d spoofed addresses", pkts, dsts)
		if pkts > 64 || dsts > 8 {
			t.Errorf("victim sent %d packets to %d spoofed addresses in 40 s, want at most 64 to 8", pkts, dsts)
		}
		learnt := 0
		for _, c := range pathOf(v, &node{pub: evil.Public()}).Candidates {
			if isSpoofed(c) {
				learnt++
			}
		}
		t.Logf("paths at spoofed addresses: %d", learnt)
		if learnt > 8 {
			t.Errorf("victim holds %d paths at spoofed addresses, want at most 8", learnt)
		}
	})
}

// TestReplayedPingIgnored: a ping captured on the wire between two honest
// nodes, replayed 500 times from another address and from its own, gets no
// pong, teaches no path, and makes the victim send nothing to the replayer.
func TestReplayedPingIgnored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		var mu sync.Mutex
		var captured []byte
		h.net.Tap(func(src, dst netip.AddrPort, pkt []byte) {
			mu.Lock()
			defer mu.Unlock()
			if captured == nil && src == a4 && dst == b4 {
				if _, typ, _, ok := bind.OpenDisco(b.priv, pkt); ok && typ == bind.DiscoPing {
					captured = slices.Clone(pkt)
				}
			}
		})
		// b knows a before a pings: the captured ping is one b took (a
		// ping b never saw is, rightly, no replay to it).
		peer(b, a, a4)
		peer(a, b, b4)
		tstest.WaitFor(t, 5*time.Second, "a and b find direct paths to each other", func() bool {
			return pathOf(a, b).Path == bind.PathDirect && pathOf(b, a).Path == bind.PathDirect
		})
		mu.Lock()
		ping := captured
		mu.Unlock()
		if ping == nil {
			t.Fatal("no ping from a to b captured")
		}
		replayer := netip.MustParseAddrPort("203.0.113.9:4000")
		sent := countSent(h, b4, nil)
		before := b.b.Drops().Replayed
		for i := range 500 {
			from := replayer
			if i%2 == 1 {
				from = a4
			}
			h.net.Inject(from, b4, ping)
			if i%100 == 99 {
				synctest.Wait()
			}
		}
		settle()
		toReplayer, _ := sent.total(func(d netip.AddrPort) bool { return d == replayer })
		replayed := b.b.Drops().Replayed - before
		t.Logf("500 replays: %d refused as replays, %d packets to the replayer", replayed, toReplayer)
		if toReplayer != 0 {
			t.Errorf("b sent %d packets to the replayer's address", toReplayer)
		}
		if replayed != 500 {
			t.Errorf("%d of 500 replays refused as such", replayed)
		}
		if slices.Contains(pathOf(b, a).Candidates, replayer) {
			t.Errorf("b learnt the replayer's address as a path to a: %v", pathOf(b, a).Candidates)
		}
		if pp := pathOf(b, a); pp.Path != bind.PathDirect || pp.Addr != a4 {
			t.Errorf("b's path to a = %v %v, want direct %v", pp.Path, pp.Addr, a4)
		}
	})
}

// TestRelayForgedSource: a relay claims, in frames it forwards, a key that
// is no peer of ours and the key of a peer that is not on it. The first is
// dropped (WireGuard never sees it) and counted; the second does not move
// the peer's traffic to that relay: it keeps arriving over the relay the
// peer is on.
func TestRelayForgedSource(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		r1, r2 := h.addRelay("r1"), h.addRelay("r2")
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		peer(a, b) // no direct address: relays only
		peer(b, a)
		a.b.SetRelays([]bind.RelayConfig{relayConfig(r1), relayConfig(r2)})
		b.b.SetRelays([]bind.RelayConfig{relayConfig(r1)}) // b is not on r2
		tstest.WaitFor(t, time.Second, "a's relays connect", func() bool {
			rs := a.b.Relays()
			return len(rs) == 2 && rs[0].Connected && rs[1].Connected
		})
		seq := 0
		next := func() int {
			seq++
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatal(err)
			}
			return seq
		}
		b.expect(t, next(), time.Second)

		stranger := key.NewPrivate().Public()
		if !r2.Inject(stranger, a.pub, data(1000)) {
			t.Fatal("r2: a not connected")
		}
		garbage := make([]byte, 148)
		garbage[0] = 1 // a WireGuard initiation that is not one
		if !r2.Inject(b.pub, a.pub, garbage) {
			t.Fatal("r2: a not connected")
		}
		settle()
		var handed int
		for len(a.got) > 0 {
			p := <-a.got
			if s, ok := seqOf(p); ok && s == 1000 {
				t.Errorf("a handed WireGuard a packet from %s, not a peer", fmt.Sprint(stranger)[:8])
			}
			handed++
		}
		if got := a.b.Drops().Foreign; got != 1 {
			t.Errorf("Drops().Foreign = %d, want 1", got)
		}
		if handed != 1 {
			t.Errorf("a handed WireGuard %d packets, want just the one claiming b's key", handed)
		}
		if pp := pathOf(a, b); pp.Relay != "r1" {
			t.Errorf("after r2's forged frame, b would be reached via %q, want r1", pp.Relay)
		}
		for range 5 {
			s := next()
			b.expect(t, s, time.Second)
			settle()
			if got := h.wire.of(s); !slices.Equal(got, []string{"relay r1"}) {
				t.Errorf("packet %d went %v, want relay r1", s, got)
			}
		}
	})
}
