//go:build !linux

package dns

import (
	"errors"
	"syscall"
)

var errNoReusePort = errors.New("dns: SO_REUSEPORT not available")

// udpSockets is how many UDP sockets serve queries: one, where the
// kernel's SO_REUSEPORT balancing is not relied on.
func udpSockets() int { return 1 }

func setReusePort(network, address string, c syscall.RawConn) error { return errNoReusePort }
