// Package dns is the agent's embedded DNS server.
//
// It answers names under the mesh domain (default mesh.internal) from a Zone
// that the agent swaps in whole on every network map:
//
//	NAME.mesh.internal          A/AAAA  the service's local proxy address(es)
//	_NAME._tcp.mesh.internal    SRV     port of the service, target NAME.mesh.internal.
//	NODE.node.mesh.internal     A/AAAA  the node's mesh IPs
//	PTR of a mesh address       PTR     NODE.node.mesh.internal. or NAME.mesh.internal.
//
// Reverse names inside Zone.Local (node, VIP and proxy ranges) are answered
// here, NXDOMAIN when unknown, and never forwarded. Every other name is forwarded to the upstream resolvers (by default those
// of /etc/resolv.conf), so the server can be the only resolver an
// application is given.
package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	mdns "github.com/miekg/dns"
)

// Defaults for Config fields left zero.
const (
	DefaultDomain          = "mesh.internal"
	DefaultUpstreamTimeout = 2 * time.Second
	DefaultResolvConf      = "/etc/resolv.conf"
)

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("dns: server closed")

// Config configures a Server.
type Config struct {
	// Addr is the listen address, e.g. "127.0.0.1:53" or "127.0.0.1:0".
	// UDP and TCP are served on the same port.
	Addr string
	// Domain is the mesh domain; default "mesh.internal".
	Domain string
	// Upstreams are "host:port" resolvers for names outside Domain (a
	// missing port means 53). If nil, the nameservers of ResolvConf are
	// used, minus any that is this server itself. If empty (or resolv.conf
	// names none), non-mesh names are answered SERVFAIL.
	Upstreams []string
	// UpstreamTimeout bounds each upstream's exchange (UDP plus a TCP retry
	// when the UDP reply is truncated); default 2s.
	UpstreamTimeout time.Duration
	// ResolvConf is read when Upstreams is nil; default /etc/resolv.conf.
	ResolvConf string
	// Remembered are upstreams an earlier run found in ResolvConf
	// (ResolvConfUpstreams; the agent keeps them in its state directory).
	// They are used when Upstreams is nil and ResolvConf names no resolver
	// but this server: once it is the system resolver, resolv.conf no
	// longer says where other names go.
	Remembered []string
	// Logger receives debug logs; nil discards.
	Logger *slog.Logger
	// Allow lists the networks whose hosts may query, besides loopback,
	// which always may. A query from elsewhere gets no answer over UDP
	// (answering a spoofed source would reflect at a victim) and REFUSED
	// over TCP. Without Allow, Addr must be a loopback address: New
	// refuses to make an open resolver.
	Allow []netip.Prefix
	// RateLimit and RateBurst bound the UDP responses to each
	// non-loopback source (per IPv6 /64): a token bucket refilled at
	// RateLimit per second holding up to RateBurst. Queries beyond it get
	// no answer. Defaults DefaultRateLimit and DefaultRateBurst.
	RateLimit, RateBurst int
}

// Service is what a service name resolves to: the local proxy address(es)
// (e.g. 127.100.0.7) and the port the proxy listens on.
type Service struct {
	Addrs []netip.Addr
	Port  uint16
	// VIP is the service's virtual IP on the mesh (100.100.X.Y); its PTR,
	// like that of each of Addrs, is NAME.DOMAIN.
	VIP netip.Addr
	// Protocol is what the service carries: "" or "tcp", "udp", or
	// "tcp+udp" (wire.Service.Protocol); SRV names _NAME._tcp and
	// _NAME._udp answer for the protocols it carries.
	Protocol string
}

// carries reports whether svc carries proto, "_tcp" or "_udp".
func (svc Service) carries(proto string) bool {
	switch proto {
	case "_tcp":
		return svc.Protocol != "udp"
	case "_udp":
		return svc.Protocol == "udp" || svc.Protocol == "tcp+udp"
	}
	return false
}

// Zone is the mesh's part of the name space, replaced whole by SetZone.
type Zone struct {
	Services map[string]Service      // key: service name, lowercase, e.g. "web"
	Nodes    map[string][]netip.Addr // key: node name, lowercase; mesh IPs (v4 and v6)
	// Local are the address ranges whose reverse names (PTR under
	// in-addr.arpa and ip6.arpa) are answered here and never forwarded:
	// the node prefixes, the service VIPs and the local proxy range. An
	// address in them with no service or node answers NXDOMAIN.
	Local []netip.Prefix
}

// Server is the embedded DNS server. Create it with New, then Start; Close
// releases everything. ServeDNS may also be driven directly (tests, fuzzing).
type Server struct {
	domain    string // canonical FQDN, lowercase, e.g. "mesh.internal."
	domLabels int
	mbox      string // SOA mailbox
	timeout   time.Duration
	cfg       Config
	log       *slog.Logger
	limit     *limiter

	zone   atomic.Pointer[zoneIndex]
	serial atomic.Uint32
	ups    atomic.Pointer[[]string] // upstream "host:port" list, set by New or Start
	// fromConf is what Start found in ResolvConf (never this server).
	fromConf atomic.Pointer[[]string]

	// ctx is cancelled by Close so that in-flight forwards stop waiting.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex // guards the fields below
	started bool
	closed  bool
	udp     []*mdns.Server // one per socket of the SO_REUSEPORT group
	tcp     *mdns.Server
	addr    netip.AddrPort
	wg      sync.WaitGroup // the ActivateAndServe goroutines
}

// New validates cfg and returns a server that is not yet listening.
func New(cfg Config) (*Server, error) {
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	domain := mdns.CanonicalName(strings.TrimSpace(cfg.Domain))
	if domain == "." {
		return nil, fmt.Errorf("dns: domain %q: must not be the root", cfg.Domain)
	}
	if _, ok := mdns.IsDomainName(domain); !ok {
		return nil, fmt.Errorf("dns: domain %q is not a valid domain name", cfg.Domain)
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = DefaultResolvConf
	}
	if err := CheckListen(cfg.Addr, cfg.Allow); err != nil {
		return nil, err
	}
	if cfg.RateLimit <= 0 {
		cfg.RateLimit = DefaultRateLimit
	}
	if cfg.RateBurst <= 0 {
		cfg.RateBurst = DefaultRateBurst
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		domain:    domain,
		domLabels: mdns.CountLabel(domain),
		timeout:   cfg.UpstreamTimeout,
		cfg:       cfg,
		log:       log.With("subsystem", "dns"),
		limit:     newLimiter(cfg.RateLimit, cfg.RateBurst, time.Now),
	}
	s.mbox = "hostmaster." + domain
	if len(s.mbox) > 254 {
		s.mbox = domain
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if cfg.Upstreams != nil {
		ups, err := normalizeUpstreams(cfg.Upstreams)
		if err != nil {
			return nil, err
		}
		s.ups.Store(&ups)
	} else {
		empty := []string{}
		s.ups.Store(&empty) // until Start reads resolv.conf
	}
	s.SetZone(Zone{})
	return s, nil
}

// Start binds UDP and TCP on the configured address and starts serving.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.started {
		return errors.New("dns: server already started")
	}
	pcs, ln, err := listen(s.cfg.Addr, udpSockets())
	if err != nil {
		return err
	}
	s.addr = pcs[0].LocalAddr().(*net.UDPAddr).AddrPort()
	s.addr = netip.AddrPortFrom(s.addr.Addr().Unmap(), s.addr.Port())

	s.ups.Store(new(s.pickUpstreams()))

	for _, pc := range pcs {
		s.udp = append(s.udp, &mdns.Server{PacketConn: pc, Handler: s, UDPSize: ednsSize, DecorateReader: func(next mdns.Reader) mdns.Reader {
			return &fastReader{s: s, next: next, buf: make([]byte, ednsSize), out: make([]byte, 0, mdns.MinMsgSize)}
		}})
	}
	s.tcp = &mdns.Server{Listener: ln, Handler: s}
	for _, srv := range append(slices.Clone(s.udp), s.tcp) {
		started := make(chan struct{})
		errc := make(chan error, 1)
		srv.NotifyStartedFunc = func() { close(started) }
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			errc <- srv.ActivateAndServe()
		}()
		// Wait until it serves, so that Close's Shutdown cannot race ahead of
		// ActivateAndServe and leave it running.
		select {
		case <-started:
		case err := <-errc:
			s.shutdownLocked()
			return fmt.Errorf("dns: serve on %s: %w", s.addr, err)
		}
	}
	s.started = true
	s.log.Debug("listening", "addr", s.addr.String(), "domain", s.domain, "upstreams", *s.ups.Load())
	return nil
}

// pickUpstreams decides, once the address is bound, where names outside
// the mesh go: Upstreams if given, else ResolvConf's resolvers, else the
// Remembered ones; never this server itself, which would loop. It warns
// when that leaves none.
func (s *Server) pickUpstreams() []string {
	drop := func(ups []string, why string) []string {
		out := []string{}
		for _, u := range ups {
			if ap, err := netip.ParseAddrPort(u); err == nil && isSelf(ap, s.addr) {
				s.log.Warn("leaving out an upstream resolver that is this server itself (it would loop)", "upstream", u, "from", why)
				continue
			}
			out = append(out, u)
		}
		return out
	}
	if s.cfg.Upstreams != nil {
		ups := drop(*s.ups.Load(), "--dns-upstream")
		if len(ups) == 0 && len(s.cfg.Upstreams) > 0 {
			s.log.Warn("no upstream resolver besides this server; names outside the mesh will fail (SERVFAIL); give another --dns-upstream", "domain", s.domain)
		}
		return ups
	}
	ups, err := upstreamsFromResolvConf(s.cfg.ResolvConf, s.addr)
	s.fromConf.Store(&ups)
	if len(ups) > 0 {
		return ups
	}
	if rem, rerr := normalizeUpstreams(s.cfg.Remembered); rerr == nil && len(rem) > 0 {
		if rem = drop(rem, "remembered"); len(rem) > 0 {
			s.log.Info("resolv.conf names no resolver but this server (it is the system resolver): forwarding other names to the upstreams found there before",
				"resolv_conf", s.cfg.ResolvConf, "upstreams", rem)
			return rem
		}
	}
	if err != nil {
		// Not fatal: mesh names still work; others get SERVFAIL.
		s.log.Warn("no upstream resolvers; names outside the mesh will fail (SERVFAIL); give --dns-upstream", "resolv_conf", s.cfg.ResolvConf, "err", err)
	} else {
		s.log.Warn("this server is the system resolver (resolv.conf names only it) and knows no other: names outside the mesh will fail (SERVFAIL); give --dns-upstream ADDR",
			"resolv_conf", s.cfg.ResolvConf, "domain", s.domain)
	}
	return []string{}
}

// ResolvConfUpstreams returns the resolvers Start found in ResolvConf,
// leaving out this server; nil when Upstreams was given. The agent
// remembers them for a later start (Config.Remembered).
func (s *Server) ResolvConfUpstreams() []string {
	if p := s.fromConf.Load(); p != nil {
		return slices.Clone(*p)
	}
	return nil
}

// Domain returns the mesh domain, without the trailing dot.
func (s *Server) Domain() string { return strings.TrimSuffix(s.domain, ".") }

// Upstreams returns where names outside the mesh are forwarded.
func (s *Server) Upstreams() []string { return slices.Clone(*s.ups.Load()) }

// listen binds n UDP sockets (an SO_REUSEPORT group, so that as many
// goroutines read queries; just one where the option is missing) then TCP,
// on the same port. With port 0 the kernel's UDP choice may be taken for
// TCP (on a busy machine half the ephemeral ports can be: 15,000 sockets
// in TIME_WAIT were seen failing eight tries), so that case retries up to
// 64 times, each a fresh port.
func listen(addr string, n int) ([]net.PacketConn, net.Listener, error) {
	if addr == "" {
		addr = "127.0.0.1:53"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns: listen address %q: %w; give host:port with --dns", addr, err)
	}
	const attempts = 64
	for i := 0; ; i++ {
		pcs, err := listenUDP(addr, n)
		if err != nil {
			return nil, nil, bindError("udp", addr, err)
		}
		p := pcs[0].LocalAddr().(*net.UDPAddr).Port
		ln, err := net.Listen("tcp", net.JoinHostPort(host, fmt.Sprint(p)))
		if err == nil {
			return pcs, ln, nil
		}
		for _, pc := range pcs {
			pc.Close()
		}
		if port != "0" || i+1 >= attempts || !errors.Is(err, syscall.EADDRINUSE) {
			return nil, nil, bindError("tcp", addr, err)
		}
	}
}

// listenUDP binds n UDP sockets on addr. A plain socket is bound first, so
// that an address another program holds (even with SO_REUSEPORT, as a
// second agent would) fails as before, and decides the port when addr's is
// 0; the group then takes its place. Where that cannot be done, one plain
// socket serves.
func listenUDP(addr string, n int) ([]net.PacketConn, error) {
	probe, err := net.ListenPacket("udp", addr)
	if err != nil || n <= 1 {
		if err != nil {
			return nil, err
		}
		return []net.PacketConn{probe}, nil
	}
	at := probe.LocalAddr().String()
	probe.Close()
	lc := net.ListenConfig{Control: setReusePort}
	var pcs []net.PacketConn
	for len(pcs) < n {
		pc, err := lc.ListenPacket(context.Background(), "udp", at)
		if err != nil {
			break
		}
		pcs = append(pcs, pc)
	}
	if len(pcs) == 0 { // taken in between, or no SO_REUSEPORT here
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, err
		}
		return []net.PacketConn{pc}, nil
	}
	return pcs, nil
}

func bindError(network, addr string, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("dns: %s address %s is already in use; pick another with --dns (e.g. --dns 127.0.0.1:5353): %w", network, addr, err)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("dns: not allowed to bind %s %s (ports below 1024 need privileges); pick another with --dns (e.g. --dns 127.0.0.1:5353): %w", network, addr, err)
	default:
		return fmt.Errorf("dns: listen %s %s: %w; pick another address with --dns", network, addr, err)
	}
}

// Addr returns the bound address (the zero value before Start).
func (s *Server) Addr() netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Close stops serving and waits for the server's goroutines. It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.cancel()
	s.shutdownLocked()
	return nil
}

// shutdownLocked stops both servers and waits for their goroutines; Close
// cancels s.ctx first so in-flight forwards give up.
func (s *Server) shutdownLocked() {
	for _, srv := range append(slices.Clone(s.udp), s.tcp) {
		if srv == nil {
			continue
		}
		// Shutdown waits for in-flight handlers; they return promptly since
		// s.ctx is cancelled. An error means it never started (its
		// goroutine has then already returned) or is already shut down.
		if err := srv.Shutdown(); err != nil {
			if srv.PacketConn != nil {
				srv.PacketConn.Close()
			}
			if srv.Listener != nil {
				srv.Listener.Close()
			}
		}
	}
	s.wg.Wait()
	s.udp, s.tcp = nil, nil
}
