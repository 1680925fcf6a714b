package netstack_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

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
