package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

func (d kernelDialer) DialUDP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	real, ok := d[dst]
	if !ok {
		return nil, errors.New("no route")
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "udp", real)
}

// udpEcho answers each datagram with "NAME:" and the datagram.
func udpEcho(t *testing.T, name string) string {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(append([]byte(name+":"), buf[:n]...), from)
		}
	}()
	return pc.LocalAddr().String()
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestFlowTableIdle(t *testing.T) {
	ft := newFlowTable(10)
	t0 := time.Unix(1000, 0)
	a := &udpFlow{client: netip.MustParseAddrPort("127.0.0.1:1"), idle: time.Minute}
	b := &udpFlow{client: netip.MustParseAddrPort("127.0.0.1:2"), idle: 10 * time.Second}
	ft.add(a, t0)
	ft.add(b, t0)
	if got := ft.expire(t0.Add(9 * time.Second)); len(got) != 0 {
		t.Fatalf("expired %d flows before any idle timeout", len(got))
	}
	// a datagram on a keeps it; b is idle for its own, shorter timeout.
	if ft.get(a.client, t0.Add(50*time.Second)) != a {
		t.Fatal("flow a not found")
	}
	if got := ft.expire(t0.Add(70 * time.Second)); len(got) != 1 || got[0] != b {
		t.Fatalf("expired %v, want only b", got)
	}
	// a reply (touch without get) also keeps a flow.
	a.touch(t0.Add(100 * time.Second))
	if got := ft.expire(t0.Add(150 * time.Second)); len(got) != 0 {
		t.Fatal("a flow with a reply 50s ago expired after 60s idle")
	}
	if got := ft.expire(t0.Add(160 * time.Second)); len(got) != 1 || got[0] != a || ft.len() != 0 {
		t.Fatalf("expired %v, %d left; want a, none", got, ft.len())
	}
}

func TestFlowTableEvictsOldest(t *testing.T) {
	ft := newFlowTable(3)
	t0 := time.Unix(1000, 0)
	var fs []*udpFlow
	for i := range 3 {
		f := &udpFlow{client: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(i+1)), idle: time.Minute}
		if ev := ft.add(f, t0.Add(time.Duration(i)*time.Second)); ev != nil {
			t.Fatalf("evicted %v below the cap", ev.client)
		}
		fs = append(fs, f)
	}
	// The first client sends again: the second is now the oldest.
	ft.get(fs[0].client, t0.Add(5*time.Second))
	f4 := &udpFlow{client: netip.MustParseAddrPort("127.0.0.1:4"), idle: time.Minute}
	if ev := ft.add(f4, t0.Add(6*time.Second)); ev != fs[1] {
		t.Fatalf("evicted %v, want the least recently active %v", ev, fs[1].client)
	}
	if ft.len() != 3 || ft.get(fs[1].client, t0) != nil || ft.get(f4.client, t0) != f4 {
		t.Fatal("table after eviction is wrong")
	}
	if all := ft.closeAll(); len(all) != 3 {
		t.Fatalf("closeAll returned %d flows", len(all))
	}
	f5 := &udpFlow{client: netip.MustParseAddrPort("127.0.0.1:5")}
	if ft.add(f5, t0) != f5 {
		t.Fatal("a closed table took a flow")
	}
}

// udpClient is a client socket that sends and reads one reply.
func udpRoundTrip(t *testing.T, c *net.UDPConn, msg string) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reply to %q: %v", msg, err)
	}
	return string(buf[:n])
}

func startUDPConsumer(t *testing.T, cfg ConsumerConfig, sc ServiceConfig) (*Consumer, netip.AddrPort) {
	t.Helper()
	c := NewConsumer(cfg)
	t.Cleanup(func() { c.Close(); c.Wait() })
	if err := c.Reconfig([]ServiceConfig{sc}); err != nil {
		t.Fatal(err)
	}
	return c, c.Bound()[sc.Name]
}

// TestUDPFlowPerClient: each client address's datagrams go to one
// provider for the flow's life, replies come back to the right client,
// and different clients are shared between the providers.
func TestUDPFlowPerClient(t *testing.T) {
	tstest.CheckGoroutines(t)
	a, b := netip.MustParseAddrPort("100.96.0.2:53"), netip.MustParseAddrPort("100.96.0.3:53")
	dialer := kernelDialer{a: udpEcho(t, "a"), b: udpEcho(t, "b")}
	c, addr := startUDPConsumer(t, ConsumerConfig{Dialer: dialer}, ServiceConfig{Name: "dns",
		Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: wire.ProtocolUDP,
		Targets: []Target{{Node: 2, Name: "a", Addr: a, Online: true, Protocol: "udp"}, {Node: 3, Name: "b", Addr: b, Online: true, Protocol: "udp"},
			{Node: 4, Name: "tcp-only", Addr: netip.MustParseAddrPort("100.96.0.4:53"), Online: true}}})
	if !addr.IsValid() || addr.Port() == 0 {
		t.Fatalf("bound %v", addr)
	}
	used := map[string]int{}
	const clients = 24
	for i := range clients {
		cl, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		first := ""
		for j := range 3 {
			msg := fmt.Sprintf("client %d datagram %d", i, j)
			got := udpRoundTrip(t, cl, msg)
			who, body, _ := strings.Cut(got, ":")
			if body != msg {
				t.Fatalf("client %d got %q for %q", i, got, msg)
			}
			if j == 0 {
				first = who
			} else if who != first {
				t.Fatalf("client %d's flow moved from provider %s to %s", i, first, who)
			}
		}
		used[first]++
	}
	if used["a"] == 0 || used["b"] == 0 || used["tcp-only"] != 0 {
		t.Fatalf("flows per provider %v: want both UDP providers used, the TCP-only one never", used)
	}
	// A reply is counted after it is written to the client, and a
	// datagram sent after its write to the provider returns, which the
	// echo's reply can overtake: the last counts may land just after the
	// client read its reply.
	var st UDPStats
	tstest.WaitFor(t, 5*time.Second, "udp stats of 24 flows of 3 datagrams", func() bool {
		st = c.Status()[0].UDP
		return st.Received == 3*clients && st.Sent == 3*clients
	})
	if st.Flows != clients || st.FlowsTotal != clients || st.Sent != 3*clients || st.Dropped != 0 {
		t.Fatalf("udp stats %+v", st)
	}
}

// TestUDPFlowIdle: a flow idle for the provider's UDPIdle is forgotten
// (the gauge drops, the socket closes); the client's next datagram
// starts a new flow that works.
func TestUDPFlowIdle(t *testing.T) {
	tstest.CheckGoroutines(t)
	clock := &fakeClock{now: time.Unix(1000, 0)}
	a := netip.MustParseAddrPort("100.96.0.2:53")
	c, addr := startUDPConsumer(t, ConsumerConfig{Dialer: kernelDialer{a: udpEcho(t, "a")}, Now: clock.Now, UDPSweep: time.Hour},
		ServiceConfig{Name: "dns", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: wire.ProtocolUDP,
			Targets: []Target{{Node: 2, Name: "a", Addr: a, Online: true, Protocol: "udp", UDPIdle: 30}}})
	cl, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	udpRoundTrip(t, cl, "one")
	clock.Add(29 * time.Second)
	c.expireUDP()
	if st := c.Status()[0].UDP; st.Flows != 1 {
		t.Fatalf("flow gone before its idle timeout: %+v", st)
	}
	clock.Add(time.Second)
	c.expireUDP()
	if st := c.Status()[0].UDP; st.Flows != 0 || st.FlowsTotal != 1 {
		t.Fatalf("idle flow not expired: %+v", st)
	}
	if got := udpRoundTrip(t, cl, "two"); got != "a:two" {
		t.Fatalf("after expiry got %q", got)
	}
	if st := c.Status()[0].UDP; st.Flows != 1 || st.FlowsTotal != 2 {
		t.Fatalf("no new flow after expiry: %+v", st)
	}
}

// TestUDPFlowCap: the flow table of a service holds at most
// MaxUDPFlows; a new client evicts the least recently active one.
func TestUDPFlowCap(t *testing.T) {
	tstest.CheckGoroutines(t)
	a := netip.MustParseAddrPort("100.96.0.2:53")
	c, addr := startUDPConsumer(t, ConsumerConfig{Dialer: kernelDialer{a: udpEcho(t, "a")}, MaxUDPFlows: 4},
		ServiceConfig{Name: "dns", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: wire.ProtocolUDP,
			Targets: []Target{{Node: 2, Name: "a", Addr: a, Online: true, Protocol: "udp"}}})
	for i := range 10 {
		cl, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		if got := udpRoundTrip(t, cl, fmt.Sprint(i)); got != fmt.Sprintf("a:%d", i) {
			t.Fatalf("client %d got %q", i, got)
		}
	}
	tstest.WaitFor(t, 5*time.Second, "4 flows, 6 evicted", func() bool {
		st := c.Status()[0].UDP
		return st.Flows == 4 && st.Evicted == 6 && st.FlowsTotal == 10
	})
}

// TestUDPNoProvider: with no provider carrying UDP, datagrams are
// dropped and counted, and nothing is started.
func TestUDPNoProvider(t *testing.T) {
	tstest.CheckGoroutines(t)
	c, addr := startUDPConsumer(t, ConsumerConfig{Dialer: kernelDialer{}},
		ServiceConfig{Name: "dns", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: wire.ProtocolTCPUDP,
			Targets: []Target{{Node: 2, Name: "tcp", Addr: netip.MustParseAddrPort("100.96.0.2:53"), Online: true}}})
	cl, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for range 3 {
		cl.Write([]byte("x"))
	}
	tstest.WaitFor(t, 5*time.Second, "3 datagrams dropped", func() bool { return c.Status()[0].UDP.Dropped == 3 })
	if st := c.Status()[0]; st.UDP.Flows != 0 || !st.Listening {
		t.Fatalf("status %+v", st)
	}
	// The same address serves TCP too (tcp+udp).
	if ln, err := net.Listen("tcp", addr.String()); err == nil {
		ln.Close()
		t.Fatal("tcp+udp service does not listen on TCP at its UDP address")
	}
}
