package httpmesh

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Timeouts of the HTTP servers at both ends.
const (
	// readHeaderTimeout bounds the wait for a request's header (and for
	// the first bytes of a connection): a peer that sends nothing holds
	// a connection no longer.
	readHeaderTimeout = 30 * time.Second
	// idleTimeout closes keep-alive connections idle this long; the
	// transports' own idle timeout is shorter, so that a client rarely
	// reuses a connection the server is closing.
	idleTimeout        = 120 * time.Second
	clientIdleTimeout  = 90 * time.Second
	maxIdlePerProvider = 256
)

// server serves the connections handed to it (serveConn) with one
// http.Server, HTTP/1.1 and h2c with prior knowledge.
type server struct {
	srv *http.Server
	ln  *chanListener
	log *slog.Logger
	bad logLimiter
	// what says which end this is in the 400's log line.
	what string
	done chan struct{} // closed when Serve returned
}

func newServer(h http.Handler, log *slog.Logger, what string) *server {
	s := &server{ln: newChanListener(), log: log, what: what, done: make(chan struct{})}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	s.srv = &http.Server{
		Handler:           h,
		Protocols:         &protos,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          slogErrorLog(log),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if sc, ok := c.(*srvConn); ok {
				return context.WithValue(ctx, infoKey, sc.info)
			}
			return ctx
		},
	}
	go func() {
		defer close(s.done)
		s.srv.Serve(s.ln)
	}()
	return s
}

// serveConn sniffs conn, serves it until it is closed and returns then.
// Bytes that cannot start an HTTP request get a 400 and a log line.
func (s *server) serveConn(conn net.Conn, info *RequestInfo) {
	br := bufio.NewReaderSize(conn, 4096)
	conn.SetReadDeadline(time.Now().Add(readHeaderTimeout))
	if why := sniff(br); why != "" {
		conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: "+
			fmt.Sprint(len(badRequestBody))+"\r\n\r\n"+badRequestBody)
		conn.Close()
		if ok, n := s.bad.allow(time.Now()); ok {
			s.log.Warn("not HTTP on an HTTP service; answered 400 and closed", "end", s.what, "service", info.Service,
				"from", info.Client, "node", info.FromName, "why", why, "more_not_logged", n)
		}
		return
	}
	conn.SetReadDeadline(time.Time{})
	sc := &srvConn{Conn: conn, r: br, info: info, closed: make(chan struct{}), refused: func(status string) {
		if ok, n := s.bad.allow(time.Now()); ok {
			s.log.Warn("a request that is not valid HTTP on an HTTP service; answered and closed", "end", s.what, "service", info.Service,
				"from", info.Client, "node", info.FromName, "answer", status, "more_not_logged", n)
		}
	}}
	if !s.ln.push(sc) {
		conn.Close()
		return
	}
	<-sc.closed
}

const badRequestBody = "meshlink: this service speaks HTTP; the request could not be read as HTTP/1.1 or HTTP/2\n"

// sniff reads the start of a connection and says why it cannot be HTTP,
// or "" if it may be: a method token and a space, or the HTTP/2 preface.
// The bytes stay in br for the server.
func sniff(br *bufio.Reader) string {
	for n := 1; n <= 24; n++ {
		b, err := br.Peek(n)
		if err != nil {
			if errors.Is(err, io.EOF) && n == 1 {
				return "" // closed at once: the server sees it end
			}
			if errors.Is(err, io.EOF) {
				return "the connection ended inside the first line"
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return "no request within the header timeout"
			}
			return "" // the server will see the same error
		}
		c := b[n-1]
		if c == ' ' && n > 1 {
			return ""
		}
		if !isTokenChar(c) {
			return fmt.Sprintf("byte 0x%02x at offset %d cannot be part of a method", c, n-1)
		}
	}
	return "no method within the first 24 bytes"
}

func isTokenChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '!' || c == '#' || c == '$' || c == '%' || c == '&' || c == '\'' || c == '*' ||
		c == '+' || c == '-' || c == '.' || c == '^' || c == '_' || c == '`' || c == '|' || c == '~'
}

// close stops the server and closes every connection it holds.
func (s *server) close() {
	s.ln.Close()
	s.srv.Close()
	<-s.done
}

// srvConn is a connection handed to the server: the sniffed bytes first,
// what the handlers need to know in info, closed when the server (or a
// handler that hijacked it) closes it.
type srvConn struct {
	net.Conn
	r      *bufio.Reader
	info   *RequestInfo
	once   sync.Once
	closed chan struct{}
	// refused is told when net/http itself refuses a request it could
	// not parse (a malformed request line or header).
	refused func(status string)
}

func (c *srvConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Write spots net/http's own refusals of unparsable requests: a 4xx
// status line written without the Date header every handler's response
// carries.
func (c *srvConn) Write(p []byte) (int, error) {
	if len(p) > 10 && string(p[:10]) == "HTTP/1.1 4" && !bytes.Contains(p, []byte("\r\nDate: ")) {
		line, _, _ := bytes.Cut(p, []byte("\r\n"))
		c.refused(string(line[9:]))
	}
	return c.Conn.Write(p)
}

func (c *srvConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

// chanListener is a net.Listener fed by push.
type chanListener struct {
	ch     chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *chanListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.closed:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

// slogErrorLog routes net/http's own log lines to the agent's logger at
// debug level: they are about single connections a peer controls.
func slogErrorLog(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}

// bufferPool lends the ReverseProxies their copy buffers, which they
// would otherwise allocate (32 KiB) for every response.
type bufferPool struct{ p sync.Pool }

func newBufferPool() *bufferPool {
	return &bufferPool{p: sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}
}

func (bp *bufferPool) Get() []byte  { return *(bp.p.Get().(*[]byte)) }
func (bp *bufferPool) Put(b []byte) { bp.p.Put(&b) }

// transports are the pooled clients of one end: HTTP/1.1 and h2c, both
// dialing with dial.
type transports struct {
	h1, h2 *http.Transport
}

func newTransports(dial func(ctx context.Context, network, addr string) (net.Conn, error)) transports {
	var p1, p2 http.Protocols
	p1.SetHTTP1(true)
	p2.SetUnencryptedHTTP2(true)
	mk := func(p *http.Protocols) *http.Transport {
		return &http.Transport{
			DialContext:         dial,
			Protocols:           p,
			MaxIdleConns:        0, // bounded per host below
			MaxIdleConnsPerHost: maxIdlePerProvider,
			IdleConnTimeout:     clientIdleTimeout,
			DisableCompression:  true, // pass encodings through untouched
			ForceAttemptHTTP2:   false,
		}
	}
	return transports{h1: mk(&p1), h2: mk(&p2)}
}

// of is the transport for a request: gRPC, which needs HTTP/2 end to
// end, goes as h2c; everything else as HTTP/1.1, which every target and
// every older provider (splicing to its target) understands, whatever
// the client spoke.
func (t transports) of(r *http.Request) *http.Transport {
	if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		return t.h2
	}
	return t.h1
}

func (t transports) close() {
	t.h1.CloseIdleConnections()
	t.h2.CloseIdleConnections()
}
