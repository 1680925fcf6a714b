//go:build !unix

package proxy

import (
	"net"
	"net/netip"
)

// listenUDP is ConsumerConfig.ListenUDP's default.
func listenUDP(a netip.AddrPort) (*net.UDPConn, error) {
	return net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
}
