//go:build unix

package proxy

import (
	"context"
	"net"
	"net/netip"
	"syscall"
)

// listenUDP is ConsumerConfig.ListenUDP's default. It sets SO_REUSEADDR,
// as Go does for every TCP listener: a program on the same host that
// binds the service's port on the wildcard address (a UDP server that
// sets it too, as iperf3 does) may then start beside the service's
// local address, and each gets the datagrams for its own address.
func listenUDP(a netip.AddrPort) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp", a.String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}
