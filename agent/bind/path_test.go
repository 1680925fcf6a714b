package bind_test

// Path tests: two binds on an in-memory network (bindtest) with in-memory
// relays, each test inside a testing/synctest bubble so the bind's timers run
// on the fake clock: a test that waits 7 s of path timeouts takes
// milliseconds, and time.Sleep in a bubble only advances that clock. The
// tests look at what arrives at the other bind, byte for byte, and at which
// wire (a direct address or a relay) carried it.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/bind/bindtest"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
)

var (
	a4 = netip.MustParseAddrPort("10.0.0.1:51820")
	a6 = netip.MustParseAddrPort("[fd00::1]:51820")
	b4 = netip.MustParseAddrPort("10.0.0.2:51820")
	b6 = netip.MustParseAddrPort("[fd00::2]:51820")
)

// data is WireGuard-looking transport data (type 4) carrying seq.
func data(seq int) []byte {
	p := make([]byte, 64)
	p[0] = 4
	binary.BigEndian.PutUint64(p[16:], uint64(seq))
	for i := 24; i < len(p); i++ {
		p[i] = byte(seq*7 + i)
	}
	return p
}

// seqOf returns the seq of a packet made by data, or false.
func seqOf(p []byte) (int, bool) {
	if len(p) != 64 || p[0] != 4 {
		return 0, false
	}
	return int(binary.BigEndian.Uint64(p[16:])), true
}

// wire records which way each data packet went: "direct <dst>" or
// "relay <name>", in order of arrival.
type wire struct {
	mu     sync.Mutex // guards routes
	routes map[int][]string
}

func (w *wire) add(seq int, route string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.routes[seq] = append(w.routes[seq], route)
}

func (w *wire) of(seq int) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.routes[seq])
}

// harness is a network, its relays and the nodes on them.
type harness struct {
	t      *testing.T
	net    *bindtest.Network
	relays *bindtest.Relays
	wire   *wire
	nodes  []*node
}

func newHarness(t *testing.T) *harness {
	h := &harness{t: t, net: bindtest.NewNetwork(), relays: bindtest.NewRelays(), wire: &wire{routes: map[int][]string{}}}
	h.net.Tap(func(_, dst netip.AddrPort, pkt []byte) {
		if seq, ok := seqOf(pkt); ok {
			h.wire.add(seq, "direct "+dst.String())
		}
	})
	return h
}

func (h *harness) addRelay(name string) *bindtest.Relay {
	r := h.relays.Add(name, "https://"+name+".test")
	r.Tap(func(_, _ key.Public, pkt []byte) {
		if seq, ok := seqOf(pkt); ok {
			h.wire.add(seq, "relay "+name)
		}
	})
	return r
}

func relayConfig(r *bindtest.Relay) bind.RelayConfig {
	return bind.RelayConfig{Name: r.Name, URL: r.URL}
}

// close shuts every node down, then the network; synctest.Test then
// checks that no goroutine is left.
func (h *harness) close() {
	for _, n := range h.nodes {
		n.b.Shutdown()
		n.readers.Wait()
	}
	h.net.Close()
}

// node is one agent's bind, opened as WireGuard would, with what it
// received.
type node struct {
	name    string
	priv    key.Private
	pub     key.Public
	addrs   []netip.AddrPort
	b       *bind.Bind
	got     chan []byte
	readers sync.WaitGroup
}

func (h *harness) addNode(name string, addrs ...netip.AddrPort) *node {
	t := h.t
	n := &node{name: name, priv: key.NewPrivate(), addrs: addrs, got: make(chan []byte, 4096)}
	n.pub = n.priv.Public()
	n.b = bind.New(bind.Config{
		PrivateKey:     n.priv,
		Logger:         slog.New(slog.NewTextHandler(logWriter{t, name}, &slog.HandlerOptions{Level: slog.LevelInfo})),
		Inner:          h.net.NewSocket(addrs...),
		NewRelayClient: h.relays.NewClient,
	})
	fns, _, err := n.b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	for _, fn := range fns {
		n.readers.Go(func() { n.read(t, fn) })
	}
	h.nodes = append(h.nodes, n)
	return n
}

// read is one of WireGuard's receive goroutines.
func (n *node) read(t *testing.T, fn conn.ReceiveFunc) {
	bufs := [][]byte{make([]byte, 2048), make([]byte, 2048)}
	sizes := make([]int, len(bufs))
	eps := make([]conn.Endpoint, len(bufs))
	for {
		k, err := fn(bufs, sizes, eps)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			t.Errorf("%s: receive: %v", n.name, err)
			return
		}
		for i := range k {
			if sizes[i] == 0 {
				continue
			}
			select {
			case n.got <- bytes.Clone(bufs[i][:sizes[i]]):
			default:
				t.Errorf("%s: receive queue full", n.name)
			}
		}
	}
}

// peer makes each node the other's peer, reached at the addresses given
// (from the network map).
func peer(n *node, m *node, at ...netip.AddrPort) {
	n.b.SetPeers([]bind.PeerConfig{{Key: m.pub, Name: m.name, Endpoints: at}})
}

// send is WireGuard sending pkt to m.
func (n *node) send(t *testing.T, m *node, pkt []byte) error {
	t.Helper()
	ep, err := n.b.ParseEndpoint(bind.EndpointString(m.pub))
	if err != nil {
		t.Fatal(err)
	}
	return n.b.Send([][]byte{pkt}, ep)
}

// expect waits (on the fake clock) for packet seq to arrive at n, intact;
// earlier packets, and copies that came another way, are passed over.
func (n *node) expect(t *testing.T, seq int, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case p := <-n.got:
			s, ok := seqOf(p)
			if !ok || !bytes.Equal(p, data(s)) {
				t.Fatalf("%s: received a packet that was never sent (or was damaged): %x", n.name, p)
			}
			if s == seq {
				return
			}
		case <-deadline:
			t.Fatalf("%s: packet %d did not arrive within %v", n.name, seq, within)
		}
	}
}

// received drains what arrived at n: the seqs, in order, all intact.
func (n *node) received(t *testing.T) []int {
	t.Helper()
	var out []int
	for {
		select {
		case p := <-n.got:
			s, ok := seqOf(p)
			if !ok || !bytes.Equal(p, data(s)) {
				t.Fatalf("%s: received a packet that was never sent (or was damaged): %x", n.name, p)
			}
			out = append(out, s)
		default:
			return out
		}
	}
}

// settle lets every packet in flight land (links here are at most 20ms).
// The sleep stays: in the bubble it advances the fake clock, and a link's
// delay is a timer that only passing time fires (synctest.Wait alone
// returns while packets are still on the wire).
func settle() {
	time.Sleep(100 * time.Millisecond)
	synctest.Wait()
}

func pathOf(n, m *node) bind.PeerPath { return n.b.Path(m.pub) }

// TestIPv4First: when a peer answers on both an IPv4 and an IPv6 address,
// traffic takes IPv4 even though IPv6 has the shorter round trip.
func TestIPv4First(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		// IPv6 is the fast path: 1ms each way against 20ms.
		for _, a := range []netip.AddrPort{a4, b4} {
			h.net.SetDelay(a, 20*time.Millisecond)
		}
		for _, a := range []netip.AddrPort{a6, b6} {
			h.net.SetDelay(a, time.Millisecond)
		}
		a := h.addNode("a", a4, a6)
		b := h.addNode("b", b4, b6)
		peer(a, b, b4, b6)
		peer(b, a, a4, a6)
		tstest.WaitFor(t, 5*time.Second, "a finds a direct path to b", func() bool { return pathOf(a, b).Path == bind.PathDirect })

		// Both paths answer, IPv6 faster: what `meshlink ping` shows.
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		res, err := a.b.Ping(ctx, b.pub)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		rtt := map[netip.AddrPort]time.Duration{}
		for _, r := range res {
			rtt[r.Addr] = r.RTT
		}
		if rtt[b4] == 0 || rtt[b6] == 0 || rtt[b6] >= rtt[b4] {
			t.Fatalf("pongs %+v: want both b4 and b6 to answer, b6 faster", res)
		}

		pp := pathOf(a, b)
		if pp.Path != bind.PathDirect || pp.Addr != b4 {
			t.Fatalf("path to b = %v %v, want direct %v", pp.Path, pp.Addr, b4)
		}
		for seq := 1; seq <= 5; seq++ {
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatal(err)
			}
			b.expect(t, seq, time.Second)
		}
		settle()
		for seq := 1; seq <= 5; seq++ {
			if got, want := h.wire.of(seq), []string{"direct " + b4.String()}; !slices.Equal(got, want) {
				t.Errorf("packet %d went %v, want %v", seq, got, want)
			}
		}
	})
}

// TestSilentPathDropped: a direct path that stops answering while we send
// is probed and dropped well before its pongs would have expired (trustFor,
// 7s), and the traffic goes on over the relay, intact.
func TestSilentPathDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		r := h.addRelay("r1")
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		peer(a, b, b4)
		peer(b, a, a4)
		a.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		b.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		tstest.WaitFor(t, 5*time.Second, "a finds a direct path to b", func() bool { return pathOf(a, b).Path == bind.PathDirect })

		seq := 0
		next := func() int {
			seq++
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatal(err)
			}
			return seq
		}
		// A second of traffic over the direct path.
		for range 10 {
			b.expect(t, next(), time.Second)
			time.Sleep(100 * time.Millisecond) // fake time: traffic every 100 ms is the scenario
		}
		if got := h.wire.of(seq); !slices.Equal(got, []string{"direct " + b4.String()}) {
			t.Fatalf("before the cut, packet %d went %v", seq, got)
		}

		h.net.SetDown(b4, true)
		cut := time.Now()
		var moved time.Duration
		for moved == 0 {
			s := next()
			settle()
			if slices.Contains(h.wire.of(s), "relay r1") {
				moved = time.Since(cut)
			}
			if time.Since(cut) > 10*time.Second {
				t.Fatal("traffic never moved to the relay")
			}
		}
		t.Logf("traffic on the relay %v after the path went silent", moved)
		if limit := 4 * time.Second; moved > limit {
			t.Errorf("took %v to leave the silent path, want under %v (the silence probe, not trustFor)", moved, limit)
		}
		if pp := pathOf(a, b); pp.Path != bind.PathRelay || pp.Relay != "r1" {
			t.Errorf("path to b = %v via %q, want relay r1", pp.Path, pp.Relay)
		}
		b.received(t) // what came before, intact
		for range 5 {
			b.expect(t, next(), time.Second)
		}
	})
}

// TestRelayThenDirect: with UDP blocked, packets go over the relay; when
// UDP passes again the pair moves to the direct path and the relay carries
// nothing more.
func TestRelayThenDirect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		r := h.addRelay("r1")
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		h.net.SetDown(b4, true)
		peer(a, b, b4)
		peer(b, a, a4)
		a.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		b.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		tstest.WaitFor(t, 5*time.Second, "a reaches b over the relay", func() bool { return pathOf(a, b).Path == bind.PathRelay })

		seq := 0
		next := func() int {
			seq++
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatal(err)
			}
			return seq
		}
		for range 5 {
			s := next()
			b.expect(t, s, time.Second)
			settle()
			if got := h.wire.of(s); !slices.Equal(got, []string{"relay r1"}) {
				t.Fatalf("with UDP blocked, packet %d went %v", s, got)
			}
		}

		h.net.SetDown(b4, false)
		back := time.Now()
		for pathOf(a, b).Path != bind.PathDirect {
			b.expect(t, next(), time.Second)
			time.Sleep(100 * time.Millisecond) // fake time: traffic every 100 ms is the scenario
			if time.Since(back) > 5*time.Second {
				t.Fatal("never went back to the direct path")
			}
		}
		t.Logf("direct again %v after UDP came back", time.Since(back))
		if pp := pathOf(a, b); pp.Addr != b4 {
			t.Errorf("direct path to b is %v, want %v", pp.Addr, b4)
		}
		for range 5 {
			s := next()
			b.expect(t, s, time.Second)
			settle()
			if got := h.wire.of(s); !slices.Equal(got, []string{"direct " + b4.String()}) {
				t.Errorf("back on the direct path, packet %d went %v", s, got)
			}
		}
	})
}

// TestPendingFlushedOnRelayConnect: packets sent while no path exists are
// held (the last maxPending of them) and arrive, in order and intact, when
// a relay connects; held packets that have grown old are not sent.
func TestPendingFlushedOnRelayConnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		peer(a, b) // no direct address: the relay is the only way
		peer(b, a)
		if err := a.send(t, b, data(1)); err == nil || !strings.Contains(err.Error(), "no path") {
			t.Fatalf("send without any path or relay: %v, want a no-path error", err)
		}

		r := h.addRelay("r1")
		r.Refuse(a.pub)
		b.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		a.b.SetRelays([]bind.RelayConfig{relayConfig(r)})
		for seq := 1; seq <= 10; seq++ {
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatalf("send %d while the relay is not up: %v (want it held)", seq, err)
			}
		}
		settle()
		if got := b.received(t); len(got) != 0 {
			t.Fatalf("b received %v before a's relay connected", got)
		}
		time.Sleep(500 * time.Millisecond) // fake time: held 0.5 s, under pendingFor, they are still sent
		r.Admit(a.pub)
		synctest.Wait()
		if got, want := b.received(t), []int{3, 4, 5, 6, 7, 8, 9, 10}; !slices.Equal(got, want) {
			t.Fatalf("b received %v after the relay connected, want the last 8 held: %v", got, want)
		}

		// Held longer than pendingFor (2s): dropped, not sent late.
		r.Refuse(a.pub)
		if err := a.send(t, b, data(11)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second) // fake time: held past pendingFor (2 s), the point of this step
		r.Admit(a.pub)
		settle()
		if got := b.received(t); len(got) != 0 {
			t.Fatalf("b received %v: packets held 3s were sent", got)
		}
		// And the relay carries new traffic.
		if err := a.send(t, b, data(12)); err != nil {
			t.Fatal(err)
		}
		b.expect(t, 12, time.Second)
	})
}

// TestPeerGoneNextRelay: when the preferred relay answers that the peer is
// not connected to it, the next relay is used for that peer.
func TestPeerGoneNextRelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t)
		defer h.close()
		r1, r2 := h.addRelay("r1"), h.addRelay("r2")
		a := h.addNode("a", a4)
		b := h.addNode("b", b4)
		peer(a, b)
		peer(b, a)
		a.b.SetRelays([]bind.RelayConfig{relayConfig(r1), relayConfig(r2)})
		b.b.SetRelays([]bind.RelayConfig{relayConfig(r2)}) // b is not on r1
		tstest.WaitFor(t, time.Second, "a's relays connect", func() bool {
			rs := a.b.Relays()
			return len(rs) == 2 && rs[0].Connected && rs[1].Connected
		})
		if pp := pathOf(a, b); pp.Relay != "r1" {
			t.Fatalf("before any answer, b would be reached via %q, want r1 (the first)", pp.Relay)
		}

		// The first packet goes to r1, which says b is not there: it goes
		// again over r2 at once (no relay was confirmed for b yet), so a
		// handshake is not left to WireGuard's 5 s retry.
		if err := a.send(t, b, data(1)); err != nil {
			t.Fatal(err)
		}
		b.expect(t, 1, time.Second)
		settle()
		if got := h.wire.of(1); !slices.Equal(got, []string{"relay r2"}) {
			t.Errorf("packet 1 went %v, want relay r2 (r1 has no b)", got)
		}
		if got := b.received(t); len(got) != 0 {
			t.Fatalf("b received %v more: packet 1 arrived twice", got)
		}
		if pp := pathOf(a, b); pp.Path != bind.PathRelay || pp.Relay != "r2" {
			t.Fatalf("after r1 said b is not there, path to b = %v via %q, want relay r2", pp.Path, pp.Relay)
		}
		for seq := 2; seq <= 6; seq++ {
			if err := a.send(t, b, data(seq)); err != nil {
				t.Fatal(err)
			}
			b.expect(t, seq, time.Second)
			settle()
			if got := h.wire.of(seq); !slices.Equal(got, []string{"relay r2"}) {
				t.Errorf("packet %d went %v, want relay r2", seq, got)
			}
		}
	})
}

// TestPathKindText: the path words of `meshlink status` and its JSON.
func TestPathKindText(t *testing.T) {
	for _, tc := range []struct {
		k    bind.PathKind
		want string
	}{{bind.PathNone, "none"}, {bind.PathDirect, "direct"}, {bind.PathRelay, "relay"}, {bind.PathKind(9), "none"}} {
		t.Run(tc.want, func(t *testing.T) {
			if got := tc.k.String(); got != tc.want {
				t.Errorf("String() = %q, want %q", got, tc.want)
			}
			if got, _ := tc.k.MarshalText(); string(got) != tc.want {
				t.Errorf("MarshalText() = %q, want %q", got, tc.want)
			}
		})
	}
}

// logWriter sends a node's logs to the test log.
type logWriter struct {
	t    *testing.T
	name string
}

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(w.name + ": " + strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
