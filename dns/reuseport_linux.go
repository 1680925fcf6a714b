package dns

import (
	"errors"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

var errNoReusePort = errors.New("dns: SO_REUSEPORT not available")

// udpSockets is how many UDP sockets (each read by its own goroutine, which
// answers prepared names itself) serve queries: one per CPU, at most 4.
func udpSockets() int { return min(runtime.GOMAXPROCS(0), 4) }

// setReusePort is a net.ListenConfig Control that sets SO_REUSEPORT.
func setReusePort(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return errors.Join(errNoReusePort, serr)
	}
	return nil
}
