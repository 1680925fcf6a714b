package netstack_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/netstack/nettest"
)

// benchChunk is what one benchmark iteration writes.
const benchChunk = 1 << 20

// meshConns returns the two ends of a TCP connection through a WireGuard
// pair of Stacks.
func meshConns(b *testing.B) (client, server net.Conn) {
	p := nettest.NewPairConfig(b, netstack.Config{}, netstack.Config{})
	accepted := make(chan net.Conn, 1)
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			b.Error(err)
			close(accepted)
			return
		}
		accepted <- c
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := p.A.DialTCP(ctx, netip.AddrPortFrom(nettest.AddrB4, 9000))
	if err != nil {
		b.Fatal(err)
	}
	s, ok := <-accepted
	if !ok {
		b.FailNow()
	}
	b.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// kernelConns returns the two ends of a kernel loopback TCP connection.
func kernelConns(b *testing.B) (client, server net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// benchStream sends b.N chunks from client to server and waits until the
// server has read all of them.
func benchStream(b *testing.B, client, server net.Conn) {
	done := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, server)
		done <- n
	}()
	chunk := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := client.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	client.(interface{ CloseWrite() error }).CloseWrite()
	n := <-done
	elapsed := time.Since(start)
	b.StopTimer()
	if n != int64(b.N)*benchChunk {
		b.Fatalf("server read %d bytes, want %d", n, int64(b.N)*benchChunk)
	}
	b.ReportMetric(float64(n)/elapsed.Seconds()/1e6, "MB/s")
}

// BenchmarkTCPThroughput streams data through two Stacks joined by
// wireguard-go over loopback UDP.
func BenchmarkTCPThroughput(b *testing.B) {
	c, s := meshConns(b)
	benchStream(b, c, s)
}

// BenchmarkTCPDirect is the baseline: the same stream over kernel loopback.
func BenchmarkTCPDirect(b *testing.B) {
	c, s := kernelConns(b)
	benchStream(b, c, s)
}

// benchRoundTrip measures 64-byte request/response latency.
func benchRoundTrip(b *testing.B, client, server net.Conn) {
	go func() {
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(server, buf); err != nil {
				return
			}
			if _, err := server.Write(buf); err != nil {
				return
			}
		}
	}()
	req, resp := make([]byte, 64), make([]byte, 64)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := client.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(client, resp); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(float64(len(lat))*p))].Nanoseconds()) / 1e3
	}
	b.ReportMetric(pct(0.50), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
}

// BenchmarkRoundTrip64 is a 64-byte ping-pong through the WireGuard pair.
func BenchmarkRoundTrip64(b *testing.B) {
	c, s := meshConns(b)
	benchRoundTrip(b, c, s)
}

// BenchmarkRoundTrip64Direct is the kernel loopback baseline.
func BenchmarkRoundTrip64Direct(b *testing.B) {
	c, s := kernelConns(b)
	benchRoundTrip(b, c, s)
}

// BenchmarkConnSetup opens, uses once and closes TCP connections through
// the WireGuard pair from connWorkers goroutines, the way test/bench's
// BenchmarkConnRate does through two agents: the handler dials a kernel
// echo server first and then accepts, as a provider does, and splices. It
// reports connections per second and, as p50 from the dial's start, when
// the handler had the SYN, when the dial returned (the SYN-ACK is back),
// when Accept returned (the ACK is there) and when the echoed byte was
// read; and the share of connections with a dial or first byte of 9 ms or
// more, with gVisor's retransmission timeouts per connection beside it
// (the minimum RTO is 10 ms, so a stall that long shows as timeouts).
func BenchmarkConnSetup(b *testing.B) {
	const connWorkers = 8
	p := nettest.NewPairConfig(b, netstack.Config{}, netstack.Config{})
	echo := tstest.Echo(b)
	var mu sync.Mutex                 // guards the map below
	seen := map[uint16][2]time.Time{} // by dialer port: handler called, Accept returned
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		t0 := time.Now()
		t, err := net.Dial("tcp", echo.String())
		if err != nil {
			r.Reject()
			return
		}
		defer t.Close()
		c, err := r.Accept()
		mu.Lock()
		seen[r.Src.Port()] = [2]time.Time{t0, time.Now()}
		mu.Unlock()
		if err != nil {
			return
		}
		defer c.Close()
		done := make(chan struct{})
		go func() { io.Copy(t, c); t.(*net.TCPConn).CloseWrite(); close(done) }()
		io.Copy(c, t)
		c.(interface{ CloseWrite() error }).CloseWrite()
		<-done
	})
	dst := netip.AddrPortFrom(nettest.AddrB4, 9000)
	type sample struct {
		start, dialed, read time.Time
		port                uint16
	}
	samples := make(chan sample, b.N)
	var next atomic.Int64
	before := netstack.TCPCounters(p.A)["timeouts"] + netstack.TCPCounters(p.B)["timeouts"]
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range connWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1)
			for next.Add(1) <= int64(b.N) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				t0 := time.Now()
				c, err := p.A.DialTCP(ctx, dst)
				cancel()
				if err != nil {
					b.Error(err)
					return
				}
				t1 := time.Now()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err = c.Write(buf)
				if err == nil {
					_, err = io.ReadFull(c, buf)
				}
				t2 := time.Now()
				port := uint16(c.LocalAddr().(*net.TCPAddr).Port)
				c.Close()
				if err != nil {
					b.Error(err)
					return
				}
				samples <- sample{t0, t1, t2, port}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	close(samples)
	timeouts := netstack.TCPCounters(p.A)["timeouts"] + netstack.TCPCounters(p.B)["timeouts"] - before
	var handler, dial, accepted, first []time.Duration
	stalls := 0
	mu.Lock()
	for s := range samples {
		d, f := s.dialed.Sub(s.start), s.read.Sub(s.dialed)
		dial, first = append(dial, d), append(first, s.read.Sub(s.start))
		if d >= 9*time.Millisecond || f >= 9*time.Millisecond {
			stalls++
		}
		if t, ok := seen[s.port]; ok {
			handler, accepted = append(handler, t[0].Sub(s.start)), append(accepted, t[1].Sub(s.start))
		}
	}
	mu.Unlock()
	p50 := func(l []time.Duration) float64 {
		if len(l) == 0 {
			return 0
		}
		slices.Sort(l)
		return float64(l[len(l)/2].Microseconds())
	}
	n := float64(len(dial))
	if n == 0 {
		return
	}
	b.ReportMetric(n/elapsed.Seconds(), "conn/s")
	b.ReportMetric(p50(handler), "syn-p50-µs")
	b.ReportMetric(p50(dial), "dialed-p50-µs")
	b.ReportMetric(p50(accepted), "accepted-p50-µs")
	b.ReportMetric(p50(first), "first-byte-p50-µs")
	b.ReportMetric(float64(stalls)/n, "stalled/conn")
	b.ReportMetric(float64(timeouts)/n, "rto/conn")
}
