package topo

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Sockets opened inside a host's namespace by the test process itself: a
// socket belongs for its whole life to the namespace it was created in, so a
// listener or connection made here can then be used from any goroutine like
// any other, with no helper process, nc or python inside the namespace.

// inNS runs fn on an OS thread that has entered the host's network
// namespace.
func (h *Host) inNS(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: when this goroutine returns, the
		// runtime ends the thread instead of handing a thread in a foreign
		// namespace to other goroutines.
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", h.ns))
		if err != nil {
			errc <- fmt.Errorf("topo: %s: %w", h.name, err)
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("topo: %s: setns: %w", h.name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Listen opens a listener inside the host's namespace, such as a TCP server
// on the host's loopback that an agent there exports.
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := h.inNS(func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Dial connects from inside the host's namespace, such as to a consumer
// proxy on the host's loopback. addr must be a literal address: name
// resolution would run on other threads, outside the namespace.
func (h *Host) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.inNS(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
