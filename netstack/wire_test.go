package netstack_test

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/netstack/nettest"
)

// wireConns joins two Stacks with a plain packet pump (no WireGuard), to
// separate the stack's cost from the tunnel's.
func wireConns(b *testing.B) (client, server net.Conn) {
	a, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrA4}})
	if err != nil {
		b.Fatal(err)
	}
	bb, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrB4}})
	if err != nil {
		b.Fatal(err)
	}
	pump := func(from, to *netstack.Stack) {
		bufs := make([][]byte, 128)
		for i := range bufs {
			bufs[i] = make([]byte, 2048)
		}
		sizes := make([]int, 128)
		for {
			n, err := from.Read(bufs, sizes, 0)
			if err != nil {
				return
			}
			out := make([][]byte, n)
			for i := range n {
				out[i] = bufs[i][:sizes[i]]
			}
			to.Write(out, 0)
		}
	}
	go pump(a, bb)
	go pump(bb, a)
	b.Cleanup(func() { a.Close(); bb.Close() })
	accepted := make(chan net.Conn, 1)
	bb.SetTCPHandler(func(r *netstack.TCPRequest) {
		c, _ := r.Accept()
		accepted <- c
	})
	c, err := a.DialTCP(context.Background(), netip.AddrPortFrom(nettest.AddrB4, 9000))
	if err != nil {
		b.Fatal(err)
	}
	s := <-accepted
	return c, s
}

// BenchmarkTCPWire is BenchmarkTCPThroughput without WireGuard: the cost of
// the two stacks alone.
func BenchmarkTCPWire(b *testing.B) {
	c, s := wireConns(b)
	benchStream(b, c, s)
}
