package coordinator

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// handshakeListener hands the HTTP server TLS connections whose handshake
// is done, each done on a goroutine of its own that ends with it.
//
// net/http does the handshake on the connection's goroutine, which then
// becomes the HTTP/2 serve loop and lives as long as the connection: the
// stack the handshake grew (ECDSA, X25519, the record layer) stays with
// every idle map stream. At 10,000 streams the goroutine stacks were a
// third of the coordinator's RSS (docs/control-plane-scale.md).
//
// A connection whose handshake fails or times out is closed here and
// never reaches the server; one that stalls holds only its own goroutine
// (and its slot in the limitListener underneath, which bounds them).
type handshakeListener struct {
	inner   net.Listener
	cfg     *tls.Config
	timeout time.Duration
	onFail  func(net.Conn, error)

	conns chan net.Conn
	errc  chan error
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup

	mu      sync.Mutex
	pending map[net.Conn]struct{} // in their handshake; closed by Close
	closed  bool
}

func newHandshakeListener(inner net.Listener, cfg *tls.Config, timeout time.Duration, onFail func(net.Conn, error)) *handshakeListener {
	l := &handshakeListener{
		inner: inner, cfg: cfg, timeout: timeout, onFail: onFail,
		conns:   make(chan net.Conn),
		errc:    make(chan error, 1),
		done:    make(chan struct{}),
		pending: map[net.Conn]struct{}{},
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

func (l *handshakeListener) acceptLoop() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := l.inner.Accept()
		if err != nil {
			// A temporary error (out of file descriptors) is retried after a
			// pause, as net/http's own loop does; any other ends the listener.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(backoff):
					continue
				case <-l.done:
					return
				}
			}
			select {
			case l.errc <- err:
			case <-l.done:
			}
			return
		}
		backoff = 0
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			c.Close()
			return
		}
		l.pending[c] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.handshake(c)
	}
}

func (l *handshakeListener) handshake(raw net.Conn) {
	defer l.wg.Done()
	c := tls.Server(raw, l.cfg)
	raw.SetDeadline(time.Now().Add(l.timeout))
	err := c.Handshake()
	raw.SetDeadline(time.Time{})
	l.mu.Lock()
	delete(l.pending, raw)
	l.mu.Unlock()
	if err != nil {
		if l.onFail != nil {
			l.onFail(raw, err)
		}
		c.Close()
		return
	}
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

// Accept returns the next connection whose TLS handshake is done.
func (l *handshakeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case err := <-l.errc:
		return nil, err
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops accepting, closes the connections still in their handshake
// and waits for their goroutines.
func (l *handshakeListener) Close() error {
	err := l.inner.Close()
	l.once.Do(func() { close(l.done) })
	l.mu.Lock()
	l.closed = true
	for c := range l.pending {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
	return err
}

func (l *handshakeListener) Addr() net.Addr { return l.inner.Addr() }
