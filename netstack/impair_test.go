package netstack_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/netstack/nettest"
)

// Loss and blackout recovery of TCP through the stack, over a WireGuard pair
// whose tunnel is impaired by nettest.Link. Measure with
//
//	go test ./netstack -run '^$' -bench 'Lossy|Blackout' -benchtime 1x -count 3
//
// (about 2.5 minutes per count; each run is bounded to well under a minute).
// Results vary from run to run, random loss being random: compare several.
// What they showed, per tuning choice: docs/netstack-tuning.md.
// To try other stack-wide TCP options without editing tuneTCP, set
// NETSTACK_TCP_OPTS, e.g. NETSTACK_TCP_OPTS=cc=cubic,minrto=200ms,recovery=1
// (see applyTCPOpts).

// path describes an impaired tunnel: random loss and fixed delay each way,
// and optionally a bottleneck rate (bytes/s) with a drop-tail queue of
// queue worth of packets, A to B only.
type path struct {
	loss  float64
	delay time.Duration
	rate  int64
	queue time.Duration
}

// pairConns returns a pair whose tunnel is impaired as pa says, and the two
// ends of a TCP connection from A to B set up over that path.
func pairConns(tb testing.TB, pa path) (p *nettest.Pair, client, server net.Conn) {
	tb.Helper()
	p = nettest.NewPairConfig(tb, netstack.Config{}, netstack.Config{})
	applyTCPOpts(tb, p.A)
	applyTCPOpts(tb, p.B)
	for _, l := range []*nettest.Link{p.AB, p.BA} {
		l.SetLoss(pa.loss)
		l.SetDelay(pa.delay)
	}
	p.AB.SetRate(pa.rate, pa.queue)

	accepted := make(chan net.Conn, 1)
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			tb.Error(err)
			close(accepted)
			return
		}
		accepted <- c
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := p.A.DialTCP(ctx, netip.AddrPortFrom(nettest.AddrB4, 9000))
	if err != nil {
		tb.Fatal(err)
	}
	var s net.Conn
	select {
	case s = <-accepted:
	case <-ctx.Done():
	}
	if s == nil {
		tb.Fatal("no accepted connection")
	}
	tb.Cleanup(func() { c.Close(); s.Close() })
	return p, c, s
}

// applyTCPOpts sets the stack-wide TCP options listed in $NETSTACK_TCP_OPTS
// (comma-separated key=value: cc=reno|cubic, recovery=<TCPRecovery bits>,
// minrto=<duration>, maxrto=<duration>, retries=<n>, sack=0|1,
// moderate=0|1) on s, overriding tuneTCP, for experiments.
func applyTCPOpts(tb testing.TB, s *netstack.Stack) {
	env := os.Getenv("NETSTACK_TCP_OPTS")
	if env == "" {
		return
	}
	for _, kv := range strings.Split(env, ",") {
		k, v, _ := strings.Cut(kv, "=")
		n, nerr := strconv.Atoi(v)
		d, derr := time.ParseDuration(v)
		var opt tcpip.SettableTransportProtocolOption
		switch {
		case k == "cc":
			o := tcpip.CongestionControlOption(v)
			opt = &o
		case k == "recovery" && nerr == nil:
			o := tcpip.TCPRecovery(n)
			opt = &o
		case k == "retries" && nerr == nil:
			o := tcpip.TCPMaxRetriesOption(n)
			opt = &o
		case k == "minrto" && derr == nil:
			o := tcpip.TCPMinRTOOption(d)
			opt = &o
		case k == "maxrto" && derr == nil:
			o := tcpip.TCPMaxRTOOption(d)
			opt = &o
		case k == "sack":
			o := tcpip.TCPSACKEnabled(v == "1")
			opt = &o
		case k == "moderate":
			o := tcpip.TCPModerateReceiveBufferOption(v == "1")
			opt = &o
		default:
			tb.Fatalf("NETSTACK_TCP_OPTS: cannot use %q", kv)
		}
		if err := netstack.SetTCPOption(s, opt); err != nil {
			tb.Fatalf("NETSTACK_TCP_OPTS %s: %v", kv, err)
		}
	}
}

// meter counts what a reader has received and when it first received
// something after a mark.
type meter struct {
	n          atomic.Int64
	mark       atomic.Int64 // UnixNano; 0 when unset
	firstAfter atomic.Int64 // UnixNano of the first read at or after mark
}

// setMark arms firstAfter for reads from t on.
func (m *meter) setMark(t time.Time) {
	m.firstAfter.Store(0)
	m.mark.Store(t.UnixNano())
}

// drain reads c until EOF or error, counting bytes.
func (m *meter) drain(c net.Conn) error {
	buf := make([]byte, 256<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			m.n.Add(int64(n))
			if mk := m.mark.Load(); mk != 0 && m.firstAfter.Load() == 0 {
				if now := time.Now().UnixNano(); now >= mk {
					m.firstAfter.CompareAndSwap(0, now)
				}
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// pump writes a stream of size bytes (unbounded when size < 0) to c, then
// half-closes c. It returns when done or when a write fails.
func pump(c net.Conn, size int64) error {
	chunk := make([]byte, 64<<10)
	for size != 0 {
		n := int64(len(chunk))
		if size > 0 && size < n {
			n = size
		}
		if _, err := c.Write(chunk[:n]); err != nil {
			return err
		}
		if size > 0 {
			size -= n
		}
	}
	return c.(closeWriter).CloseWrite()
}

// isTimeout reports whether err is a deadline expiring.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// transfer moves size bytes from client to server, giving up after limit;
// it returns how many bytes arrived and how long that took.
func transfer(tb testing.TB, client, server net.Conn, size int64, limit time.Duration) (int64, time.Duration) {
	deadline := time.Now().Add(limit)
	client.SetDeadline(deadline)
	server.SetDeadline(deadline)
	var m meter
	werr := make(chan error, 1)
	start := time.Now()
	go func() { werr <- pump(client, size) }()
	rerr := m.drain(server)
	elapsed := time.Since(start)
	if err := <-werr; err != nil && rerr == nil {
		rerr = err
	}
	n := m.n.Load()
	if rerr != nil && !isTimeout(rerr) {
		tb.Fatalf("moved %d of %d bytes in %v: %v", n, size, elapsed.Round(time.Millisecond), rerr)
	}
	return n, elapsed
}

// reportTCP reports A's retransmission timeouts and retransmitted segments
// over n runs.
func reportTCP(b *testing.B, timeouts, retransmits uint64) {
	b.ReportMetric(float64(timeouts)/float64(b.N), "timeouts")
	b.ReportMetric(float64(retransmits)/float64(b.N), "rexmits")
}

// lossyCases are the paths of BenchmarkLossyTransfer. Each moves size bytes
// (20 MB when 0) or stops after limit, whichever comes first.
var lossyCases = []struct {
	name  string
	path  path
	size  int64
	limit time.Duration
}{
	{"clean", path{}, 0, 20 * time.Second},
	{"loss=5%", path{loss: 0.05}, 0, 40 * time.Second},
	{"delay=25ms", path{delay: 25 * time.Millisecond}, 0, 20 * time.Second},
	{"loss=1%,delay=25ms", path{loss: 0.01, delay: 25 * time.Millisecond}, 0, 20 * time.Second},
	{"loss=5%,delay=25ms", path{loss: 0.05, delay: 25 * time.Millisecond}, 0, 20 * time.Second},
	// A congested long path: 20 MB/s bottleneck, 50 ms RTT, 25 ms of queue.
	// Losses come from the queue overflowing, so this measures how well the
	// window regrows after congestion (streams for 15 s).
	{"rate=20MB/s,delay=25ms", path{delay: 25 * time.Millisecond, rate: 20e6, queue: 25 * time.Millisecond}, 1 << 30, 15 * time.Second},
}

// BenchmarkLossyTransfer moves 20 MB from A to B through a tunnel that drops
// the given fraction of packets each way (at random) and delays each by the
// given time, and reports the throughput (MB/s), the time taken (s; the
// case's limit when the 20 MB did not all arrive in time), the MB moved, and
// A's retransmission timeouts and retransmitted segments.
func BenchmarkLossyTransfer(b *testing.B) {
	for _, tc := range lossyCases {
		b.Run(tc.name, func(b *testing.B) {
			size := int64(20 << 20)
			if tc.size > 0 {
				size = tc.size
			}
			var total time.Duration
			var moved int64
			var timeouts, rexmits uint64
			for range b.N {
				p, c, s := pairConns(b, tc.path)
				n, d := transfer(b, c, s, size, tc.limit)
				moved += n
				total += d
				st := netstack.TCPCounters(p.A)
				timeouts += st["timeouts"]
				rexmits += st["retransmits"]
			}
			b.ReportMetric(float64(moved)/total.Seconds()/1e6, "MB/s")
			b.ReportMetric(total.Seconds()/float64(b.N), "s")
			b.ReportMetric(float64(moved)/float64(b.N)/(1<<20), "MB")
			reportTCP(b, timeouts, rexmits)
			b.ReportMetric(0, "ns/op")
		})
	}
}

// blackoutResult is what one blackout run measures.
type blackoutResult struct {
	before float64       // MB/s in the warm-up before the blackout
	stall  time.Duration // from the link's return to the first byte received
	after  float64       // MB/s in the window after the link's return
}

// blackoutRun streams from A to B over pa, blacks out both directions for
// blackout after warmup, and measures the stream in the window after the
// link returns.
func blackoutRun(tb testing.TB, pa path, warmup, blackout, window time.Duration) (blackoutResult, *nettest.Pair) {
	p, c, s := pairConns(tb, pa)
	limit := warmup + blackout + window + 20*time.Second
	c.SetDeadline(time.Now().Add(limit))
	s.SetDeadline(time.Now().Add(limit))

	var m meter
	rdone := make(chan error, 1)
	go func() { rdone <- m.drain(s) }()
	go pump(c, -1) // returns with an error when the connections close

	wait := func(d time.Duration) {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case err := <-rdone:
			tb.Fatalf("receiver stopped early: %v", err)
		}
	}

	var res blackoutResult
	wait(warmup)
	res.before = float64(m.n.Load()) / warmup.Seconds() / 1e6
	up := p.AB.Blackout(blackout)
	p.BA.Blackout(blackout)
	m.setMark(up)
	wait(time.Until(up))
	n1 := m.n.Load()
	wait(window)
	res.after = float64(m.n.Load()-n1) / window.Seconds() / 1e6
	res.stall = window
	if first := m.firstAfter.Load(); first != 0 {
		res.stall = time.Unix(0, first).Sub(up)
	}
	return res, p
}

// blackoutCases are the paths and blackout lengths of BenchmarkBlackout.
// How long the stream stalls after the path returns depends on where in
// the retransmission timer's backoff the return falls, hence two lengths.
var blackoutCases = []struct {
	name     string
	path     path
	blackout time.Duration
}{
	{"clean", path{}, 6 * time.Second},
	{"clean,7s", path{}, 7 * time.Second},
	{"delay=25ms", path{delay: 25 * time.Millisecond}, 6 * time.Second},
	{"loss=1%,delay=25ms", path{loss: 0.01, delay: 25 * time.Millisecond}, 6 * time.Second},
}

// BenchmarkBlackout streams from A to B for 2 s, cuts the tunnel both ways
// for 6 s (7 s in one case; packets in flight are lost too), and reports the
// throughput before the cut (MB/s-before), in the 5 s after the tunnel comes
// back (MB/s-after), and how long after its return the first byte arrived
// (stall-s; 5 when nothing arrived).
func BenchmarkBlackout(b *testing.B) {
	for _, tc := range blackoutCases {
		b.Run(tc.name, func(b *testing.B) {
			var before, after, stall float64
			var timeouts, rexmits uint64
			for range b.N {
				r, p := blackoutRun(b, tc.path, 2*time.Second, tc.blackout, 5*time.Second)
				before += r.before
				after += r.after
				stall += r.stall.Seconds()
				st := netstack.TCPCounters(p.A)
				timeouts += st["timeouts"]
				rexmits += st["retransmits"]
			}
			n := float64(b.N)
			b.ReportMetric(before/n, "MB/s-before")
			b.ReportMetric(after/n, "MB/s-after")
			b.ReportMetric(stall/n, "stall-s")
			reportTCP(b, timeouts, rexmits)
			b.ReportMetric(0, "ns/op")
		})
	}
}

// TestLossyTransfer checks that a transfer through a lossy, delayed tunnel
// completes intact and in reasonable time, and that the Link really drops
// what it is told to.
func TestLossyTransfer(t *testing.T) {
	const size = 2 << 20
	p, c, s := pairConns(t, path{loss: 0.05, delay: 2 * time.Millisecond})
	deadline := time.Now().Add(30 * time.Second)
	c.SetDeadline(deadline)
	s.SetDeadline(deadline)
	want, _, _ := sumOf(newStream(7, size))
	werr := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := io.Copy(c, newStream(7, size))
		if err == nil {
			err = c.(closeWriter).CloseWrite()
		}
		werr <- err
	}()
	got, n, err := sumOf(s)
	if err != nil || n != size || got != want {
		t.Fatalf("received %d of %d bytes (digest match %v): %v", n, size, got == want, err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	t.Logf("%d bytes in %v; A: %v", size, elapsed.Round(time.Millisecond), netstack.TCPCounters(p.A))
	for name, l := range map[string]*nettest.Link{"A->B": p.AB, "B->A": p.BA} {
		st := l.Stats()
		if st.Dropped == 0 || st.Sent == 0 {
			t.Errorf("%s: %+v, want drops at 5%% loss", name, st)
		}
	}
	// The bound catches a return to the settings before the loss-recovery
	// tuning, not a slow machine
	// (see docs/netstack-tuning.md#the-loss-recovery-tuning-as-a-whole).
	if elapsed > 8*time.Second {
		t.Errorf("2 MB over a 5%%-loss tunnel took %v", elapsed)
	}
}

// TestBlackoutRecovery checks that a stream resumes within the maximum RTO
// after the tunnel was cut for 3 s.
func TestBlackoutRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("takes ~7 s")
	}
	r, _ := blackoutRun(t, path{}, 500*time.Millisecond, 3*time.Second, 3*time.Second)
	t.Logf("before %.1f MB/s, stall %v, after %.1f MB/s", r.before, r.stall.Round(time.Millisecond), r.after)
	if r.after == 0 || r.stall > 2500*time.Millisecond {
		t.Fatalf("stream did not resume in time after the blackout: stall %v, %.1f MB/s", r.stall, r.after)
	}
}
