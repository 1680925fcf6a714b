package tstest

import (
	"io"
	"net"
	"net/netip"
	"testing"
)

// Serve hands every connection of a fresh loopback TCP listener to
// handle, each on a goroutine of its own, until the test ends; it returns
// the listener's address.
func Serve(t testing.TB, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// Echo is Serve with a handler that echoes what it reads, then closes.
func Echo(t testing.TB) netip.AddrPort {
	t.Helper()
	return Serve(t, func(c net.Conn) { io.Copy(c, c); c.Close() })
}
