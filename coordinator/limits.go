package coordinator

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"time"
)

// Connection and request-body bounds of the HTTPS listener. Every peer,
// member and stranger may be hostile: a connection that sends its headers
// and then trickles (or stalls) its body must not hold a handler and a
// socket forever, and one source must not take every socket.
const (
	defaultBodyTimeout       = 10 * time.Second
	defaultMaxConns          = 8192
	defaultMaxConnsPerSource = 256
)

// Bounds of what nodes hold in the store: one node must not take every
// service VIP (each is also a listener on every agent), and services left
// without providers must not hold theirs forever.
const (
	defaultMaxServicesPerNode = 64
	// maxServicesPerNode is the number of service VIPs.
	maxServicesPerNode  = 254 * 256
	defaultServiceGrace = 24 * time.Hour
)

// sourceOf groups a remote address for the per-source connection cap: an
// IPv4 address (a NAT may hide a whole site behind one), or the /64 of an
// IPv6 address (whoever has one address of a /64 usually has all of it).
func sourceOf(a net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// limitListener caps the connections it has accepted and not yet closed:
// in all, and per source (sourceOf). A connection over either cap is
// closed as soon as it is accepted, before TLS, so that refusing costs
// almost nothing.
type limitListener struct {
	net.Listener
	total, perSource int
	log              *slog.Logger

	mu       sync.Mutex // guards the fields below
	n        int
	bySource map[netip.Prefix]int
	lastWarn time.Time
}

func newLimitListener(ln net.Listener, total, perSource int, log *slog.Logger) *limitListener {
	return &limitListener{Listener: ln, total: total, perSource: perSource, log: log, bySource: map[netip.Prefix]int{}}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := sourceOf(c.RemoteAddr())
		if l.acquire(src, c.RemoteAddr()) {
			return &limitConn{Conn: c, l: l, src: src}, nil
		}
		c.Close()
	}
}

// acquire counts a new connection from src, or says it is over a cap.
func (l *limitListener) acquire(src netip.Prefix, remote net.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n >= l.total || l.bySource[src] >= l.perSource {
		// One line per 10 s at most: a flood of refusals must not become
		// a flood of logs.
		if now := time.Now(); now.Sub(l.lastWarn) >= 10*time.Second {
			l.lastWarn = now
			l.log.Warn("connection refused: over the connection cap", "remote", remote.String(),
				"source_conns", l.bySource[src], "source_cap", l.perSource, "conns", l.n, "cap", l.total)
		}
		return false
	}
	l.n++
	l.bySource[src]++
	return true
}

func (l *limitListener) release(src netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if l.bySource[src]--; l.bySource[src] <= 0 {
		delete(l.bySource, src)
	}
}

// limitConn gives its slot back once, on the first Close (also of a
// connection the relay hijacked).
type limitConn struct {
	net.Conn
	l    *limitListener
	src  netip.Prefix
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.src) })
	return err
}

// limitBody gives a request with a body d to send all of it; after the
// body's end the deadline is lifted, so that a long poll or a stream
// (the map stream, the relay's node list) stays open as long as it likes.
// Headers are bounded by the server's ReadHeaderTimeout. Over HTTP/1 the
// deadline is the connection's, and the server closes the connection of a
// body cut short; over HTTP/2 the stream's.
func limitBody(d time.Duration, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
			rc := http.NewResponseController(w)
			if rc.SetReadDeadline(time.Now().Add(d)) == nil {
				r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
			}
		}
		h.ServeHTTP(w, r)
	})
}

// deadlineBody lifts the read deadline when the body has been read to its
// end. It is not lifted when the handler gives up early: over HTTP/1 the
// server then discards the rest of the body, under the same deadline.
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// isDeadline says a body read failed on limitBody's deadline.
func isDeadline(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
