package localproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"time"
)

func (s *Server) startHTTP() {
	s.transport = &http.Transport{
		Proxy: nil, // never chain to a proxy from the environment
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			host, port, err := splitHostPort(addr)
			if err != nil {
				return nil, err
			}
			ctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
			defer cancel()
			return s.Dial(ctx, host, port)
		},
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     90 * time.Second,
		MaxConnsPerHost:     s.cfg.MaxConns,
	}
	rp := &httputil.ReverseProxy{
		// The request already names its target (absolute-URI form);
		// Rewrite mode drops hop-by-hop and X-Forwarded-* headers.
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL = pr.In.URL
			pr.Out.Host = pr.In.Host
		},
		Transport: s.transport,
		ErrorLog:  slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.log.Info("HTTP proxy request failed", "to", r.Host, "err", err)
			http.Error(w, err.Error(), httpStatusFor(err))
		},
	}
	s.httpSrv = &http.Server{
		Handler:           &httpHandler{s: s, rp: rp},
		ReadHeaderTimeout: s.cfg.HandshakeTimeout,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.httpSrv.Serve(s.httpLn)
	}()
}

// httpStatusFor maps a dial error to the proxy's response status.
func httpStatusFor(err error) int {
	if errors.Is(err, ErrNotAllowed) {
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

// splitHostPort splits HOST:PORT with a port of 1-65535.
func splitHostPort(addr string) (string, uint16, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return "", 0, fmt.Errorf("localproxy: %q is not HOST:PORT", addr)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return "", 0, fmt.Errorf("localproxy: port %q must be 1-65535", port)
	}
	return host, uint16(p), nil
}

type httpHandler struct {
	s  *Server
	rp *httputil.ReverseProxy
}

func (h *httpHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// http.Server.Close does not wait for handlers: the Server does, and
	// its ctx (BaseContext) ends their dials and forwards.
	if !h.s.goAdd() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer h.s.wg.Done()
	if r.Method == http.MethodConnect {
		h.s.connect(w, r)
		return
	}
	if !r.URL.IsAbs() || r.URL.Scheme != "http" || r.URL.Host == "" {
		http.Error(w, "this is a proxy: send CONNECT host:port, or a request for an absolute http:// URL (curl -x http://ADDR URL)", http.StatusBadRequest)
		return
	}
	if !validHost([]byte(r.URL.Hostname())) {
		http.Error(w, fmt.Sprintf("invalid host name %q", r.URL.Hostname()), http.StatusBadRequest)
		return
	}
	h.rp.ServeHTTP(w, r)
}

// connect tunnels a CONNECT request: 200, then the bytes both ways.
func (s *Server) connect(w http.ResponseWriter, r *http.Request) {
	host, port, err := splitHostPort(r.Host)
	if err == nil && !validHost([]byte(host)) {
		err = fmt.Errorf("localproxy: invalid host name %q", host)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "CONNECT needs HTTP/1.1", http.StatusHTTPVersionNotSupported)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.HandshakeTimeout)
	remote, err := s.Dial(ctx, host, port)
	cancel()
	if err != nil {
		s.log.Info("HTTP CONNECT refused", "to", r.Host, "err", err)
		http.Error(w, err.Error(), httpStatusFor(err))
		return
	}
	// A hijacked connection is no longer the http.Server's: the Server
	// tracks it from here, and Close ends it.
	c, rw, err := hj.Hijack()
	if err != nil {
		remote.Close()
		return
	}
	if !s.track(c) {
		c.Close()
		remote.Close()
		return
	}
	defer s.untrack(c)
	c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		c.Close()
		remote.Close()
		return
	}
	var client net.Conn = c
	if rw.Reader.Buffered() > 0 {
		client = &bufferedConn{Conn: c, r: rw.Reader}
	}
	s.splice(client, remote)
}

// bufferedConn reads what the HTTP server had already buffered first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *bufferedConn) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return b.Conn.Close()
}
