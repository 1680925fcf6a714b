package coordinator

import (
	"crypto/tls"
	"errors"
	"io"
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
// never reaches the server (a plain HTTP request is answered 400 first,
// as net/http does); one that stalls holds only its own goroutine, and
// its slot in the limitListener underneath, which bounds them.
type handshakeListener struct {
	inner   net.Listener
	cfg     *tls.Config
	timeout time.Duration // of a handshake; 0: none
	log     func(format string, args ...any)

	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup

	// failed is closed when the inner listener has failed for good; err
	// is its error, which every Accept from then on returns.
	failed chan struct{}
	err    error

	mu      sync.Mutex
	pending map[net.Conn]struct{} // in their handshake; closed by Close
	closed  bool
}

// newHandshakeListener serves inner's connections with cfg; log, if not
// nil, receives the lines net/http would write to its ErrorLog.
func newHandshakeListener(inner net.Listener, cfg *tls.Config, timeout time.Duration, log func(format string, args ...any)) *handshakeListener {
	if log == nil {
		log = func(string, ...any) {}
	}
	l := &handshakeListener{
		inner: inner, cfg: cfg, timeout: timeout, log: log,
		conns:   make(chan net.Conn),
		done:    make(chan struct{}),
		failed:  make(chan struct{}),
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
			// A temporary error (out of file descriptors: EMFILE is
			// Temporary, not Timeout) is retried after a pause, as
			// net/http's own loop does; any other ends the listener.
			if temporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				l.log("http: Accept error: %v; retrying in %v", err, backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-l.done:
					return
				}
			}
			l.err = err
			close(l.failed)
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

// temporary reports whether an Accept error is worth retrying.
func temporary(err error) bool {
	var te interface{ Temporary() bool }
	var to interface{ Timeout() bool }
	return errors.As(err, &te) && te.Temporary() || errors.As(err, &to) && to.Timeout()
}

func (l *handshakeListener) handshake(raw net.Conn) {
	defer l.wg.Done()
	c := tls.Server(raw, l.cfg)
	if l.timeout > 0 {
		raw.SetDeadline(time.Now().Add(l.timeout))
	}
	err := c.Handshake()
	raw.SetDeadline(time.Time{})
	l.mu.Lock()
	delete(l.pending, raw)
	l.mu.Unlock()
	if err != nil {
		var re tls.RecordHeaderError
		if errors.As(err, &re) && re.Conn != nil && looksLikeHTTP(re.RecordHeader) {
			// Someone typed http:// — tell them, as net/http does.
			io.WriteString(re.Conn, "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
		}
		l.log("http: TLS handshake error from %s: %v", raw.RemoteAddr(), err)
		c.Close()
		return
	}
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

// looksLikeHTTP reports whether a TLS record header is the start of a
// plain HTTP request.
func looksLikeHTTP(hdr [5]byte) bool {
	switch string(hdr[:]) {
	case "GET /", "HEAD ", "POST ", "PUT /", "OPTIO":
		return true
	}
	return false
}

// Accept returns the next connection whose TLS handshake is done.
func (l *handshakeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.failed:
		return nil, l.err
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
