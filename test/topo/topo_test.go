package topo_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/topo"
)

// TestMain lets the test binary serve as the tiny client and server the
// tests run inside namespaces: neither nc nor python is on every machine.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "topo-helper" {
		if err := helper(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "topo-helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// helperLife bounds a helper server, so one that nobody kills still stops.
const helperLife = 2 * time.Minute

func helper(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: topo-helper tcp-serve|tcp-dial|udp-serve|udp-dial ADDR")
	}
	mode, addr := args[0], args[1]
	switch mode {
	case "tcp-serve": // tell every client the source address it came from
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		time.AfterFunc(helperLife, func() { ln.Close() })
		for {
			c, err := ln.Accept()
			if err != nil {
				return nil
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintln(c, host)
			c.Close()
		}
	case "tcp-dial":
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		fmt.Print(line)
		return nil
	case "udp-serve": // echo
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		time.AfterFunc(helperLife, func() { pc.Close() })
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return nil
			}
			pc.WriteTo(buf[:n], from)
		}
	case "udp-dial":
		c, err := net.Dial("udp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		fmt.Print(string(buf[:n]))
		return nil
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// helperRun runs the test binary as a helper inside h and returns its output.
func helperRun(ctx context.Context, t *testing.T, h *topo.Host, mode, addr string) (string, error) {
	t.Helper()
	out, err := h.Run(ctx, exe(t), "topo-helper", mode, addr)
	return strings.TrimSpace(string(out)), err
}

// startServer starts a helper server in h that lives until the test ends.
func startServer(t *testing.T, h *topo.Host, mode, addr string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, exe(t), "topo-helper", mode, addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start %s in %s: %v", mode, h.Name(), err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
}

func exe(t *testing.T) string {
	t.Helper()
	p, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// eventually polls f, each try bounded by 5s, until it succeeds or
// timeout passes, and returns the last error. Servers started with Command
// need a moment to listen, and a fresh veth a moment to come up: poll
// instead of sleeping.
func eventually(timeout time.Duration, f func(ctx context.Context) error) error {
	return tstest.Poll(timeout, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return f(ctx)
	})
}

// never checks that f keeps failing for the whole window: what a blocked
// path must do.
func never(window time.Duration, f func(ctx context.Context) error) error {
	deadline := time.Now().Add(window)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := f(ctx)
		cancel()
		if err == nil {
			return errors.New("got through")
		}
	}
	return nil
}

func TestSwitchPing(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	sw := n.Switch("lan")
	a, b := n.Host("a"), n.Host("b")
	n.Link(a, sw, "10.99.0.1/24")
	n.Link(b, sw, "10.99.0.2/24")
	if got := a.Addr().String(); got != "10.99.0.1" {
		t.Errorf("a.Addr() = %s, want 10.99.0.1", got)
	}

	if _, err := exec.LookPath("ping"); err == nil {
		for _, c := range []struct {
			from *topo.Host
			to   string
		}{{a, "10.99.0.2"}, {b, "10.99.0.1"}} {
			err := eventually(10*time.Second, func(ctx context.Context) error {
				_, err := c.from.Run(ctx, "ping", "-c", "1", "-W", "1", c.to)
				return err
			})
			if err != nil {
				t.Errorf("ping %s -> %s: %v", c.from.Name(), c.to, err)
			}
		}
	} else {
		t.Log("ping not installed; checking reachability over TCP only")
	}

	startServer(t, b, "tcp-serve", "10.99.0.2:7001")
	var got string
	err := eventually(10*time.Second, func(ctx context.Context) (err error) {
		got, err = helperRun(ctx, t, a, "tcp-dial", "10.99.0.2:7001")
		return err
	})
	if err != nil {
		t.Fatalf("tcp a -> b: %v", err)
	}
	if got != "10.99.0.1" {
		t.Errorf("b saw a as %q, want 10.99.0.1", got)
	}
}

func TestRouterNAT(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	wan, lan := n.Switch("wan"), n.Switch("lan")
	server := n.Host("server")
	n.Link(server, wan, "192.168.200.10/24")
	n.Router("router", wan, "192.168.200.1/24", lan, "10.77.0.1/24")
	client := n.Host("client")
	n.Link(client, lan, "10.77.0.2/24")
	client.DefaultRoute("10.77.0.1")

	startServer(t, server, "tcp-serve", "192.168.200.10:7002")
	var got string
	err := eventually(10*time.Second, func(ctx context.Context) (err error) {
		got, err = helperRun(ctx, t, client, "tcp-dial", "192.168.200.10:7002")
		return err
	})
	if err != nil {
		t.Fatalf("client behind NAT -> server: %v", err)
	}
	if got != "192.168.200.1" {
		t.Errorf("server saw the client as %q, want the router's WAN address 192.168.200.1", got)
	}

	// The LAN stays private: the server has no route into it.
	startServer(t, client, "tcp-serve", "10.77.0.2:7003")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if out, err := helperRun(ctx, t, server, "tcp-dial", "10.77.0.2:7003"); err == nil {
		t.Errorf("server reached a LAN host behind the NAT: %q", out)
	}
}

func TestDropUDP(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	wan, lan := n.Switch("wan"), n.Switch("lan")
	server := n.Host("server")
	n.Link(server, wan, "192.168.201.10/24")
	router := n.Router("router", wan, "192.168.201.1/24", lan, "10.78.0.1/24")
	client := n.Host("client")
	n.Link(client, lan, "10.78.0.2/24")
	client.DefaultRoute("10.78.0.1")
	startServer(t, server, "udp-serve", "192.168.201.10:7004")
	startServer(t, server, "tcp-serve", "192.168.201.10:7005")

	udp := func(ctx context.Context) error {
		_, err := helperRun(ctx, t, client, "udp-dial", "192.168.201.10:7004")
		return err
	}
	tcp := func(ctx context.Context) error {
		_, err := helperRun(ctx, t, client, "tcp-dial", "192.168.201.10:7005")
		return err
	}
	if err := eventually(10*time.Second, udp); err != nil {
		t.Fatalf("udp before DropUDP: %v", err)
	}
	if err := router.DropUDP(); err != nil {
		t.Fatal(err)
	}
	if err := router.DropUDP(); err != nil { // idempotent
		t.Fatalf("second DropUDP: %v", err)
	}
	if err := never(time.Second, udp); err != nil {
		t.Errorf("udp through a router that drops UDP: %v", err)
	}
	if err := eventually(10*time.Second, tcp); err != nil {
		t.Errorf("tcp while UDP is dropped: %v", err)
	}
	if err := router.AllowUDP(); err != nil {
		t.Fatal(err)
	}
	if err := eventually(10*time.Second, udp); err != nil {
		t.Errorf("udp after AllowUDP: %v", err)
	}
}

func TestLinkDownAndLoss(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	sw := n.Switch("lan")
	a, b := n.Host("a"), n.Host("b")
	aIf := n.Link(a, sw, "10.98.0.1/24")
	n.Link(b, sw, "10.98.0.2/24")
	startServer(t, b, "tcp-serve", "10.98.0.2:7006")
	dial := func(ctx context.Context) error {
		_, err := helperRun(ctx, t, a, "tcp-dial", "10.98.0.2:7006")
		return err
	}
	if err := eventually(10*time.Second, dial); err != nil {
		t.Fatalf("before loss: %v", err)
	}

	if err := a.SetLinkUp(aIf, false); err != nil {
		t.Fatal(err)
	}
	if err := never(time.Second, dial); err != nil {
		t.Errorf("with the link down: %v", err)
	}
	if err := a.SetLinkUp(aIf, true); err != nil {
		t.Fatal(err)
	}
	if err := eventually(10*time.Second, dial); err != nil {
		t.Errorf("after the link came back: %v", err)
	}

	if err := a.Loss(aIf, 100); errors.Is(err, errors.ErrUnsupported) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	if err := never(time.Second, dial); err != nil {
		t.Errorf("with 100%% loss: %v", err)
	}
	if err := a.Loss(aIf, 0); err != nil {
		t.Fatal(err)
	}
	if err := eventually(10*time.Second, dial); err != nil {
		t.Errorf("after loss removed: %v", err)
	}
}

func TestNetem(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	sw := n.Switch("lan")
	a := n.Host("a")
	aIf := n.Link(a, sw, "10.97.0.1/24")
	err := a.Netem(aIf, "delay 20ms loss 1%")
	if errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("kernel without netem: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := a.Run(ctx, "tc", "qdisc", "show", "dev", aIf)
	if err != nil || !strings.Contains(string(out), "netem") {
		t.Errorf("tc qdisc show = %q, %v; want a netem qdisc", out, err)
	}
	if err := a.ClearNetem(aIf); err != nil {
		t.Error(err)
	}
}

// TestDelay: Delay holds what leaves a's interface for the given time, so
// a UDP round trip from a to b's echo takes at least that long; a second
// call changes it, 0 removes it, and the Net's Close stops a reader still
// running.
func TestDelay(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	sw := n.Switch("lan")
	a, b := n.Host("a"), n.Host("b")
	aIf := n.Link(a, sw, "10.95.0.1/24")
	n.Link(b, sw, "10.95.0.2/24")
	startServer(t, b, "udp-serve", "10.95.0.2:7008")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, "udp", "10.95.0.2:7008")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var seq int
	// rtt times one echo. Each probe carries a number, so that a late
	// answer to an earlier probe is not taken for this one's.
	rtt := func(ctx context.Context) (time.Duration, error) {
		seq++
		msg := fmt.Sprintf("probe %d", seq)
		deadline, _ := ctx.Deadline()
		c.SetDeadline(deadline)
		start := time.Now()
		if _, err := c.Write([]byte(msg)); err != nil {
			return 0, err
		}
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return 0, err
			}
			if string(buf[:n]) == msg {
				return time.Since(start), nil
			}
		}
	}
	// minRTT is the least of a few round trips: the delay is a floor, and
	// the least is the one a busy machine disturbed least.
	minRTT := func() (time.Duration, error) {
		best := time.Duration(-1)
		for range 5 {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			d, err := rtt(ctx)
			cancel()
			if err != nil {
				return 0, err
			}
			if best < 0 || d < best {
				best = d
			}
		}
		return best, nil
	}
	// The echo server needs a moment to listen.
	if err := eventually(10*time.Second, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		_, err := rtt(ctx)
		return err
	}); err != nil {
		t.Fatalf("echo before the delay: %v", err)
	}
	base, err := minRTT()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("round trip without delay: %v", base)

	const delay = 50 * time.Millisecond
	if err := a.Delay(aIf, delay); errors.Is(err, errors.ErrUnsupported) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	// Active as soon as Delay returns: the rule goes in last.
	got, err := minRTT()
	if err != nil {
		t.Fatalf("echo with %v delay: %v", delay, err)
	}
	t.Logf("round trip with %v delay on %s: %v", delay, aIf, got)
	if got < delay || got > time.Second {
		t.Errorf("round trip with %v delay = %v, want %v to 1s", delay, got, delay)
	}
	// TCP goes through too (handshake and answer, all held on a's side).
	startServer(t, b, "tcp-serve", "10.95.0.2:7009")
	if err := eventually(10*time.Second, func(ctx context.Context) error {
		_, err := helperRun(ctx, t, a, "tcp-dial", "10.95.0.2:7009")
		return err
	}); err != nil {
		t.Errorf("tcp with %v delay: %v", delay, err)
	}

	const longer = 150 * time.Millisecond
	if err := a.Delay(aIf, longer); err != nil {
		t.Fatal(err)
	}
	if got, err := minRTT(); err != nil || got < longer || got > time.Second {
		t.Errorf("round trip with the delay changed to %v = %v, %v; want %v to 1s", longer, got, err, longer)
	}

	if err := a.Delay(aIf, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Delay(aIf, 0); err != nil { // idempotent
		t.Fatalf("second Delay(0): %v", err)
	}
	if got, err := minRTT(); err != nil || got >= delay {
		t.Errorf("round trip after the delay was removed = %v, %v; want under %v", got, err, delay)
	}
	out, err := a.Run(ctx, "nft", "list", "tables")
	if err != nil || strings.Contains(string(out), "topo_delay") {
		t.Errorf("nft list tables after Delay(0) = %q, %v; want no topo_delay table", out, err)
	}

	// A delay still on when the Net closes: Close stops its reader.
	if err := a.Delay(aIf, delay); err != nil {
		t.Fatal(err)
	}
	if got, err := minRTT(); err != nil || got < delay {
		t.Errorf("round trip with the delay back = %v, %v; want at least %v", got, err, delay)
	}
	closed := make(chan error, 1)
	go func() { closed <- n.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Close with a delay on did not return")
	}
	if err := a.Delay(aIf, delay); err == nil {
		t.Error("Delay on a closed Net succeeded")
	}
}

func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	n := topo.New(t)
	sw := n.Switch("lan")
	h := n.Host("a")
	n.Link(h, sw, "10.96.0.1/24")
	// A process nobody stops: Close must kill it along with the namespace.
	cmd := h.Command(context.Background(), exe(t), "topo-helper", "tcp-serve", "10.96.0.1:7007")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	if err := n.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("process in a closed Net still running")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{h.Namespace()} {
		if strings.Contains(string(out), ns) {
			t.Errorf("namespace %s still listed after Close", ns)
		}
	}
}
