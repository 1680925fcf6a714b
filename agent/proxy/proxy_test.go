package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

// kernelDialer stands in for the netstack: mesh addresses map to real
// loopback listeners, or refuse.
type kernelDialer map[netip.AddrPort]string

func (d kernelDialer) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	real, ok := d[dst]
	if !ok {
		return nil, errors.New("connection refused")
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", real)
}

// greeter answers each connection with its name, then echoes.
func greeter(t *testing.T, name string) string {
	return tstest.Serve(t, func(c net.Conn) {
		defer c.Close()
		fmt.Fprintf(c, "%s\n", name)
		io.Copy(c, c)
	}).String()
}

func greet(t *testing.T, addr string) (net.Conn, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		t.Fatalf("greeting: %v", err)
	}
	return c, strings.TrimSpace(line)
}

func newConsumer(t *testing.T, d Dialer, targets []Target) string {
	return startConsumer(t, ConsumerConfig{Dialer: d, DialTimeout: time.Second}, targets)
}

// startConsumer is newConsumer with the whole configuration.
func startConsumer(t *testing.T, cfg ConsumerConfig, targets []Target) string {
	c := NewConsumer(cfg)
	t.Cleanup(func() { c.Close(); c.Wait() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	c.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: targets}})
	st := c.Status()
	if len(st) != 1 || !st[0].Listening {
		t.Fatalf("status %+v", st)
	}
	return listen.String()
}

func TestLeastOpenConnections(t *testing.T) {
	a, b := netip.MustParseAddrPort("100.96.0.1:80"), netip.MustParseAddrPort("100.96.0.2:80")
	d := kernelDialer{a: greeter(t, "a"), b: greeter(t, "b")}
	addr := newConsumer(t, d, []Target{{Node: 1, Name: "a", Addr: a, Online: true}, {Node: 2, Name: "b", Addr: b, Online: true}})
	seen := map[string]int{}
	for i := 0; i < 6; i++ {
		c, who := greet(t, addr)
		defer c.Close()
		seen[who]++
	}
	if seen["a"] != 3 || seen["b"] != 3 {
		t.Fatalf("held connections per provider %v, want 3 and 3", seen)
	}
}

func TestFailoverSkipsDeadProvider(t *testing.T) {
	dead, live := netip.MustParseAddrPort("100.96.0.9:80"), netip.MustParseAddrPort("100.96.0.2:80")
	d := kernelDialer{live: greeter(t, "live")}
	cons := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: time.Second})
	defer func() { cons.Close(); cons.Wait() }()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	cons.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{
		{Node: 9, Name: "dead", Addr: dead, Online: true}, {Node: 2, Name: "live", Addr: live, Online: true}}}})
	for i := 0; i < 5; i++ {
		c, who := greet(t, listen.String())
		c.Close()
		if who != "live" {
			t.Fatalf("connection %d answered by %q", i, who)
		}
	}
	for _, p := range cons.Status()[0].Providers {
		if p.Name == "dead" && (p.Healthy || p.LastError == "") {
			t.Fatalf("dead provider not marked failing: %+v", p)
		}
	}
}

func TestNoProviderClosesAtOnce(t *testing.T) {
	addr := newConsumer(t, kernelDialer{}, []Target{{Node: 1, Name: "x", Addr: netip.MustParseAddrPort("100.96.0.1:1"), Online: true}})
	// The first connection finds x refusing; the next ones are refused
	// without dialing, x being marked failing. Each is reset at once.
	for i := range 3 {
		start := time.Now()
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("connection %d: %v, want a reset at once", i, err)
		}
		t.Logf("connection %d reset after %v", i, time.Since(start).Round(time.Microsecond))
	}
}

// TestSpliceHalfClose: a client that shuts its write side still gets the
// whole answer, as HTTP/1.0 and many database clients expect.
func TestSpliceHalfClose(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	go func() {
		c, err := up.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until the client's half-close arrives
		fmt.Fprintf(c, "got %d bytes", len(b))
	}()
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	var ctr Counters
	go func() {
		a, err := front.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", up.Addr().String())
		if err != nil {
			a.Close()
			return
		}
		Splice(a, b, &ctr)
	}()
	c, err := net.Dial("tcp", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write(make([]byte, 100000))
	c.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "got 100000 bytes" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	if ctr.Sent.Load() != 100000 {
		t.Fatalf("counted %d bytes sent", ctr.Sent.Load())
	}
}

// blockingDialer never connects: a dial ends only when its context does.
type blockingDialer struct{ started chan struct{} }

func (d blockingDialer) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	d.started <- struct{}{}
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestCloseCancelsDials(t *testing.T) {
	d := blockingDialer{started: make(chan struct{}, 1)}
	c := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: time.Hour})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	if err := c.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{{Node: 1, Name: "slow", Addr: netip.MustParseAddrPort("100.96.0.1:80"), Online: true}}}}); err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", listen.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	<-d.started
	c.Close()
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close left a dial to a provider running")
	}
}

// TestDialService: the exported dial shares the listener's provider
// choice (failover past a dead provider, least open connections) and gives
// its open count back at Close; an unknown name is ErrUnknownService.
func TestDialService(t *testing.T) {
	dead, a, b := netip.MustParseAddrPort("100.96.0.9:80"), netip.MustParseAddrPort("100.96.0.1:80"), netip.MustParseAddrPort("100.96.0.2:80")
	d := kernelDialer{a: greeter(t, "a"), b: greeter(t, "b")}
	cons := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: time.Second})
	defer func() { cons.Close(); cons.Wait() }()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	cons.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{
		{Node: 9, Name: "dead", Addr: dead, Online: true}, {Node: 1, Name: "a", Addr: a, Online: true}, {Node: 2, Name: "b", Addr: b, Online: true}}}})
	ctx := context.Background()
	if _, err := cons.DialService(ctx, "nope"); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("DialService(nope) = %v, want ErrUnknownService", err)
	}
	seen := map[string]int{}
	var conns []net.Conn
	for i := 0; i < 4; i++ {
		c, err := cons.DialService(ctx, "web")
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		seen[strings.TrimSpace(line)]++
	}
	if seen["a"] != 2 || seen["b"] != 2 {
		t.Fatalf("connections per provider %v, want 2 and 2", seen)
	}
	if st := cons.Status()[0]; st.Open != 4 {
		t.Fatalf("open %d, want 4", st.Open)
	}
	for _, c := range conns {
		c.Close()
		c.Close() // counted back once
	}
	st := cons.Status()[0]
	if st.Open != 0 {
		t.Fatalf("open %d after Close, want 0", st.Open)
	}
	for _, p := range st.Providers {
		if p.Open != 0 {
			t.Fatalf("provider %s: %d open after Close", p.Name, p.Open)
		}
	}
}

// TestReconfigClosesConnectionsToGoneProvider: a connection through the
// listener and one from DialService to provider a, and one each to b. A
// map that drops a from the service closes a's two at once (the
// application reads EOF) while b's keep carrying bytes; a map without the
// service closes the rest.
func TestReconfigClosesConnectionsToGoneProvider(t *testing.T) {
	a, b := netip.MustParseAddrPort("100.96.0.1:80"), netip.MustParseAddrPort("100.96.0.2:80")
	d := kernelDialer{a: greeter(t, "a"), b: greeter(t, "b")}
	cons := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: time.Second})
	defer func() { cons.Close(); cons.Wait() }()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	ta, tb := Target{Node: 1, Name: "a", Addr: a, Online: true}, Target{Node: 2, Name: "b", Addr: b, Online: true}
	cons.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{ta, tb}}})
	byWho := map[string][]net.Conn{}
	for range 2 {
		c, who := greet(t, listen.String())
		defer c.Close()
		byWho[who] = append(byWho[who], c)
		dc, err := cons.DialService(context.Background(), "web")
		if err != nil {
			t.Fatal(err)
		}
		defer dc.Close()
		dc.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(dc).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		byWho[strings.TrimSpace(line)] = append(byWho[strings.TrimSpace(line)], dc)
	}
	if len(byWho["a"]) != 2 || len(byWho["b"]) != 2 {
		t.Fatalf("connections per provider: a %d, b %d; want 2 each", len(byWho["a"]), len(byWho["b"]))
	}
	closed := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		return err != nil && !(errors.As(err, &ne) && ne.Timeout())
	}
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return err
		}
		got := make([]byte, 5)
		_, err := io.ReadFull(c, got)
		if err == nil && string(got) != "ping\n" {
			err = fmt.Errorf("echoed %q", got)
		}
		return err
	}

	cons.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{tb}}})
	for i, c := range byWho["a"] {
		if !closed(c) {
			t.Fatalf("connection %d to a still open after a left the service", i)
		}
	}
	for i, c := range byWho["b"] {
		if err := echo(c); err != nil {
			t.Fatalf("connection %d to b broke when a left: %v", i, err)
		}
	}
	cons.Reconfig(nil)
	for i, c := range byWho["b"] {
		if !closed(c) {
			t.Fatalf("connection %d to b still open after the service left the map", i)
		}
	}
}

// gatedDialer counts the dials in flight and holds each until gate closes.
type gatedDialer struct {
	kernelDialer
	gate          chan struct{}
	inflight, max atomic.Int64
}

func (d *gatedDialer) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	n := d.inflight.Add(1)
	defer d.inflight.Add(-1)
	for m := d.max.Load(); n > m && !d.max.CompareAndSwap(m, n); m = d.max.Load() {
	}
	select {
	case <-d.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return d.kernelDialer.DialTCP(ctx, dst)
}

// TestDialBurstBounded: a burst of new connections to one provider opens
// at most MaxDialsPerProvider mesh connections at once (a provider refuses
// half-open connections past its own per-peer bound), and every one of
// the burst gets through once the dials in flight complete.
func TestDialBurstBounded(t *testing.T) {
	a := netip.MustParseAddrPort("100.96.0.1:80")
	d := &gatedDialer{kernelDialer: kernelDialer{a: greeter(t, "a")}, gate: make(chan struct{})}
	c := NewConsumer(ConsumerConfig{Dialer: d, DialTimeout: 30 * time.Second})
	t.Cleanup(func() { c.Close(); c.Wait() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	if err := c.Reconfig([]ServiceConfig{{Name: "web", Listen: listen, Targets: []Target{{Node: 1, Name: "a", Addr: a, Online: true}}}}); err != nil {
		t.Fatal(err)
	}
	const burst = 4 * MaxDialsPerProvider
	conns := make([]net.Conn, burst)
	for i := range conns {
		conn, err := net.DialTimeout("tcp", listen.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	tstest.WaitFor(t, 10*time.Second, "the first dials to start", func() bool { return d.inflight.Load() == MaxDialsPerProvider })
	close(d.gate)
	for i, conn := range conns {
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "a" {
			t.Fatalf("connection %d of the burst: %q, %v", i, line, err)
		}
	}
	if m := d.max.Load(); m > MaxDialsPerProvider {
		t.Fatalf("%d dials in flight to one provider at once, want at most %d", m, MaxDialsPerProvider)
	}
}

// slowDialer answers its first dial only after delay, as a provider does
// whose first SYN or WireGuard handshake was lost on the way.
type slowDialer struct {
	kernelDialer
	delay time.Duration
	first *atomic.Bool
}

func (d slowDialer) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if d.first.CompareAndSwap(true, false) {
		select {
		case <-time.After(d.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return d.kernelDialer.DialTCP(ctx, dst)
}

// TestLastProviderGetsLonger: with no other provider to fail over to, a
// provider that answers after the connect timeout still gets the
// connection (LastDialTimeout), instead of the client being reset.
func TestLastProviderGetsLonger(t *testing.T) {
	a := netip.MustParseAddrPort("100.96.0.1:80")
	first := &atomic.Bool{}
	first.Store(true)
	d := slowDialer{kernelDialer: kernelDialer{a: greeter(t, "a")}, delay: 600 * time.Millisecond, first: first}
	addr := startConsumer(t, ConsumerConfig{Dialer: d, DialTimeout: 100 * time.Millisecond, LastDialTimeout: 5 * time.Second},
		[]Target{{Node: 1, Name: "a", Addr: a, Online: true}})
	conn, who := greet(t, addr)
	conn.Close()
	if who != "a" {
		t.Fatalf("answered by %q", who)
	}
	if first.Load() {
		t.Fatal("the slow first dial was not the one that answered")
	}
}
