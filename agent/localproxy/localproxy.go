// Package localproxy lets unprivileged applications reach the mesh through
// a SOCKS5 (RFC 1928) or HTTP proxy on a local address: mesh names are
// resolved by the agent and dialed through the mesh, other names go direct
// or are refused.
package localproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/netutil"

	"github.com/meshlink/meshlink/agent/proxy"
)

// Sentinel errors of Dial; the proxies map them to their protocol's replies.
var (
	// ErrNotAllowed: the name is not a mesh name and Config.MeshOnly is set.
	ErrNotAllowed = errors.New("localproxy: only mesh names are allowed (--proxy-mesh-only)")
	// ErrUnknownName: the name is in the mesh domain but names no service
	// or node of the network map.
	ErrUnknownName = errors.New("localproxy: no such service or node in the mesh")
)

// Mesh dials into the mesh; the agent implements it. Both methods return an
// error matching ErrUnknownName for a name the network map does not know.
type Mesh interface {
	// Domain is the mesh's DNS domain, e.g. "mesh.internal".
	Domain() string
	// DialService connects to a provider of service name on the
	// service's own port.
	DialService(ctx context.Context, name string) (net.Conn, error)
	// DialNode connects to port on the node's mesh address.
	DialNode(ctx context.Context, name string, port uint16) (net.Conn, error)
	// DialAddr connects to a mesh address (a node's IP, or a service's
	// VIP) through the mesh; ok is false when addr is no mesh address
	// (the caller then dials it directly, unless MeshOnly).
	DialAddr(ctx context.Context, addr netip.AddrPort) (c net.Conn, ok bool, err error)
}

// Defaults for Config fields left zero.
const (
	DefaultMaxConns         = 256
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 10 * time.Second
)

// Config configures a Server.
type Config struct {
	// SOCKS5 and HTTP are listen addresses ("127.0.0.1:1080"); "" is off.
	SOCKS5, HTTP string
	Mesh         Mesh
	// MeshOnly refuses every name outside the mesh domain.
	MeshOnly bool
	Logger   *slog.Logger
	// MaxConns bounds the connections each listener serves at once; more
	// wait to be accepted. Default DefaultMaxConns.
	MaxConns int
	// HandshakeTimeout bounds a client's request, from accept to the
	// proxied connection being set up (the dial included).
	HandshakeTimeout time.Duration
	// DialTimeout bounds a direct dial to a name outside the mesh.
	DialTimeout time.Duration
}

// Server runs the configured proxies. Create with New; Close stops it.
type Server struct {
	cfg  Config
	log  *slog.Logger
	ctx  context.Context
	stop context.CancelFunc

	socksLn, httpLn net.Listener
	httpSrv         *http.Server
	transport       *http.Transport

	mu     sync.Mutex // guards the fields below
	conns  map[net.Conn]struct{}
	closed bool

	wg sync.WaitGroup // accept loops and connections
}

// New opens the configured listeners and starts serving.
func New(cfg Config) (_ *Server, err error) {
	if cfg.Mesh == nil {
		return nil, errors.New("localproxy: no Mesh")
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, log: log.With("subsystem", "localproxy"), ctx: ctx, stop: stop, conns: map[net.Conn]struct{}{}}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if cfg.SOCKS5 != "" {
		ln, err := net.Listen("tcp", cfg.SOCKS5)
		if err != nil {
			return nil, fmt.Errorf("localproxy: --socks5 %s: %w; choose another address", cfg.SOCKS5, err)
		}
		s.socksLn = netutil.LimitListener(ln, cfg.MaxConns)
		s.wg.Add(1)
		go s.acceptSOCKS(s.socksLn)
		s.log.Info("SOCKS5 proxy listening", "addr", ln.Addr())
	}
	if cfg.HTTP != "" {
		ln, err := net.Listen("tcp", cfg.HTTP)
		if err != nil {
			return nil, fmt.Errorf("localproxy: --http-proxy %s: %w; choose another address", cfg.HTTP, err)
		}
		s.httpLn = netutil.LimitListener(ln, cfg.MaxConns)
		s.startHTTP()
		s.log.Info("HTTP proxy listening", "addr", ln.Addr())
	}
	return s, nil
}

// SOCKS5Addr is the SOCKS5 listener's address, nil when it is off.
func (s *Server) SOCKS5Addr() net.Addr {
	if s == nil || s.socksLn == nil {
		return nil
	}
	return s.socksLn.Addr()
}

// HTTPAddr is the HTTP proxy listener's address, nil when it is off.
func (s *Server) HTTPAddr() net.Addr {
	if s == nil || s.httpLn == nil {
		return nil
	}
	return s.httpLn.Addr()
}

// Close stops the listeners, closes every proxied connection and waits
// for the goroutines. It is idempotent.
func (s *Server) Close() error {
	s.stop()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	if s.socksLn != nil {
		s.socksLn.Close()
	}
	if s.httpSrv != nil {
		s.httpSrv.Close()
	}
	if s.transport != nil {
		s.transport.CloseIdleConnections()
	}
	s.wg.Wait()
	return nil
}

// track registers an open connection so Close can end it; false once
// closed (the caller closes c).
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Dial connects to host:port: a service or node name of the mesh through
// the mesh, anything else directly unless MeshOnly. A service name ignores
// port: the service's own port is used.
func (s *Server) Dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		c, ok, err := s.cfg.Mesh.DialAddr(ctx, netip.AddrPortFrom(ip.Unmap().WithZone(""), port))
		if ok {
			return c, err
		}
	}
	kind, name := classify(host, s.cfg.Mesh.Domain())
	switch kind {
	case nameService:
		return s.cfg.Mesh.DialService(ctx, name)
	case nameNode:
		return s.cfg.Mesh.DialNode(ctx, name, port)
	case nameUnknownMesh:
		return nil, fmt.Errorf("%w: %s", ErrUnknownName, host)
	}
	if s.cfg.MeshOnly {
		return nil, fmt.Errorf("%w: %s", ErrNotAllowed, host)
	}
	d := net.Dialer{Timeout: s.cfg.DialTimeout}
	return d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(int(port))))
}

type nameKind int

const (
	nameOther nameKind = iota
	nameService
	nameNode
	nameUnknownMesh // in the domain, but not a service or node name
)

// classify says what host names under domain: "NAME.DOMAIN" is a service,
// "NODE.node.DOMAIN" a node. Case and a final dot do not matter.
func classify(host, domain string) (nameKind, string) {
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	d := strings.Trim(strings.ToLower(domain), ".")
	if d == "" {
		return nameOther, ""
	}
	if h == d {
		return nameUnknownMesh, ""
	}
	rest, ok := strings.CutSuffix(h, "."+d)
	if !ok {
		return nameOther, ""
	}
	if node, ok := strings.CutSuffix(rest, ".node"); ok && node != "" && !strings.Contains(node, ".") {
		return nameNode, node
	}
	if rest != "" && !strings.Contains(rest, ".") {
		return nameService, rest
	}
	return nameUnknownMesh, ""
}

// splice carries a proxied connection and forgets both sides once done.
func (s *Server) splice(client, remote net.Conn) {
	if !s.track(remote) {
		remote.Close()
		return
	}
	defer s.untrack(remote)
	proxy.Splice(client, remote, &proxy.Counters{})
}

// goAdd counts a goroutine the Server must wait for at Close; false once
// Close has begun.
func (s *Server) goAdd() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}
