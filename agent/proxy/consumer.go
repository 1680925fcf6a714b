package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/wire"
)

// Dialer opens TCP connections across the mesh; *netstack.Stack is one.
type Dialer interface {
	DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error)
}

// Target is one provider of a service as a consumer sees it.
type Target struct {
	// Node identifies the provider across reconfigs, so health and
	// open-connection counts survive a new network map.
	Node wire.NodeID
	Name string
	// Addr is the provider's mesh address and port.
	Addr netip.AddrPort
	// Online is the coordinator's view: an offline provider gets no new
	// connections (unless it is this node itself, Local).
	Online bool
	// Local, when set, means this node provides the service itself: dial
	// this host:port directly instead of going through the mesh.
	Local string
	// Priority, Weight and Version are the export's (wire.Provider).
	Priority int
	Weight   int
	Version  string
	// Health is what the provider reported of its target
	// (wire.HealthUnhealthy skips it), HealthError why.
	Health      string
	HealthError string
	// Region is the provider node's region.
	Region string
	// Protocol is what the provider carries (wire.Provider.Protocol; ""
	// is TCP); UDPIdle its flows' idle timeout in seconds.
	Protocol string
	UDPIdle  int
}

// ServiceConfig is the desired state of one consumed service.
type ServiceConfig struct {
	Name    string
	Listen  netip.AddrPort
	Targets []Target
	// Split, Locality and Affinity are the service's traffic policy
	// (wire.Service); Region is this node's own, for Locality.
	Split    map[string]int
	Locality string
	Affinity string
	Region   string
	// Protocol is what the service carries (wire.Service.Protocol): a
	// TCP listener, a UDP socket at the same address, or both.
	Protocol string
	// HTTP, when set, makes the service HTTP (wire.Service.HTTP): its
	// connections go to ConsumerConfig.HTTP, which carries each request
	// to a provider of its own (Pick). Without ConsumerConfig.HTTP the
	// service is carried as TCP.
	HTTP *wire.ServiceHTTP
}

// HTTPHandler serves the local connections of HTTP services request by
// request; httpmesh.Consumer is one.
type HTTPHandler interface {
	// SetServices gets the HTTP services by name, whole, at every
	// Reconfig, before their connections are served.
	SetServices(map[string]*wire.ServiceHTTP)
	// ServeConn serves one accepted local connection of service until it
	// ends; the Consumer closes conn when it closes.
	ServeConn(service string, conn net.Conn)
}

// ConsumerConfig configures a Consumer.
type ConsumerConfig struct {
	Dialer Dialer
	Logger *slog.Logger
	// DialTimeout bounds one attempt to reach one provider; default
	// DefaultDialTimeout. A provider that does not answer within it is
	// marked failing and the connection moves to the next.
	DialTimeout time.Duration
	// LastDialTimeout bounds the attempt to reach the last provider left
	// to try, when it has not failed lately; default
	// DefaultLastDialTimeout. With nothing to fail over to, giving up
	// after DialTimeout only turns a lost SYN or handshake on a lossy
	// path into a refused connection.
	LastDialTimeout time.Duration
	// Now is the clock of passive health; nil is time.Now.
	Now func() time.Time
	// Rand is the randomness of provider choice; nil is a random seed.
	Rand *rand.Rand
	// Listen opens the local listener; default net.Listen("tcp", …). Tests
	// and platforms without 127/8 may replace it.
	Listen func(addr netip.AddrPort) (net.Listener, error)
	// ListenUDP opens a UDP service's local socket; default a UDP
	// socket with SO_REUSEADDR (as Go's TCP listeners have).
	ListenUDP func(addr netip.AddrPort) (*net.UDPConn, error)
	// MaxUDPFlows bounds the UDP flows of one service: a new client
	// beyond it evicts the least recently active. Default
	// DefaultMaxUDPFlows.
	MaxUDPFlows int
	// UDPSweep is how often idle UDP flows are looked for; default a
	// second, so a flow lives at most that much past its idle timeout.
	UDPSweep time.Duration
	// HTTP serves HTTP services (ServiceConfig.HTTP); nil carries them
	// as TCP.
	HTTP HTTPHandler
}

// Consumer runs a local listener per consumed service and carries each
// accepted connection to a provider.
type Consumer struct {
	cfg ConsumerConfig
	log *slog.Logger
	// ctx is cancelled by Close: dials to providers in flight give up.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex // guards the fields below
	services map[string]*service
	health   map[wire.NodeID]*health // by Target.Node; survives reconfigs
	// conns holds every open connection, with the provider it was
	// carried to once one accepted it (CloseTo, Reconfig); one per
	// accepted local connection or DialService.
	conns  map[*openConn]struct{}
	closed bool

	randMu sync.Mutex // guards cfg.Rand, which is not safe for concurrent use

	wg sync.WaitGroup // accept loops and connections
}

type service struct {
	name     string
	protocol string         // ServiceConfig.Protocol
	listen   netip.AddrPort // the address the network map asks for
	bound    netip.AddrPort // where ln listens: listen, or its FallbackPort
	ln       net.Listener
	err      error                    // why the listener is not up
	targets  atomic.Pointer[[]Target] // swapped by Reconfig, read per connection
	pol      atomic.Pointer[choosePolicy]
	http     atomic.Bool // ServiceConfig.HTTP is set
	open     atomic.Int64
	total    atomic.Int64
	failed   atomic.Int64
	refused  atomic.Int64 // refused at once: no healthy provider
	ctr      Counters
	udp      *udpService // guarded by Consumer.mu; nil without UDP
	udpCtr   UDPCounters

	selMu sync.Mutex // guards the fields below
	// recent holds the providers of the last len(recent) connections,
	// a ring: the share each received lately.
	recent   [recentConns]wire.NodeID
	nrecent  int
	selected map[wire.NodeID]int64 // connections each provider took, in all
	lastWhy  string                // the last refusal logged
	lastLog  time.Time
}

// recentConns is how many of the latest connections the recent share of
// each provider is computed over.
const recentConns = 1000

// DefaultDialTimeout is ConsumerConfig.DialTimeout's default: a provider
// a few milliseconds away answers well within it, and a dead one costs a
// connection no more than this before the next is tried.
const DefaultDialTimeout = time.Second

// DefaultLastDialTimeout is ConsumerConfig.LastDialTimeout's default: long
// enough for netstack's SYN to be sent again three times (after 1, 2 and
// 4 s) and for WireGuard to repeat a lost handshake initiation (5 s), as
// a kernel client's connect would wait, far longer, on a direct path.
const DefaultLastDialTimeout = 10 * time.Second

// openConn is one open connection as CloseTo and Reconfig see it.
type openConn struct {
	service string
	local   net.Conn // the application's side; nil for DialService
	remote  net.Conn // nil until a provider accepted it
	target  Target
}

// close ends the connection at both ends: the application sees it end
// (for DialService, its user does, at its next read or write).
func (oc *openConn) close() {
	if oc.local != nil {
		oc.local.Close()
	}
	if oc.remote != nil {
		oc.remote.Close()
	}
}

// health is passive health of one provider.
type health struct {
	open      atomic.Int64
	mu        sync.Mutex // guards the fields below
	failUntil time.Time
	fails     int
	lastErr   string
	// gone is cancelled when the map shows the provider went offline or
	// unhealthy: dials to it in flight give up at once and the
	// connection moves on, rather than waiting out the connect timeout.
	goneCtx  context.Context
	markGone context.CancelFunc
	// slots holds one token per dial in flight to the provider
	// (MaxDialsPerProvider); made on first use.
	slots chan struct{}
}

// MaxDialsPerProvider bounds the dials one consumer has in flight to one
// provider. A provider refuses half-open connections from one peer past
// its MaxPendingPerPeer with a RST; a burst of new connections (a
// thousand clients at once) waits here for a slot instead of being
// refused there. It is half the provider's default, leaving room for the
// local proxies' and other agents' dials that share the source address.
const MaxDialsPerProvider = DefaultMaxPendingPerPeer / 2

// DialQueueWait bounds how long a new connection waits for one of the
// MaxDialsPerProvider slots before that provider is passed over for it.
const DialQueueWait = 10 * time.Second

// errDialQueue is a dial that found every slot to the provider taken for
// DialQueueWait: the provider is busy, not failing.
var errDialQueue = errors.New("proxy: too many connections being opened to this provider at once")

// acquireDial waits for a dial slot to the provider, at most DialQueueWait
// and while ctx lasts; release gives it back.
func (h *health) acquireDial(ctx context.Context) (release func(), err error) {
	h.mu.Lock()
	if h.slots == nil {
		h.slots = make(chan struct{}, MaxDialsPerProvider)
	}
	slots := h.slots
	h.mu.Unlock()
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	default:
	}
	t := time.NewTimer(DialQueueWait)
	defer t.Stop()
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.C:
		return nil, errDialQueue
	}
}

// goneContext is the context cancelled when the provider is next seen
// gone in the map.
func (h *health) goneContext() context.Context {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.goneCtx == nil {
		h.goneCtx, h.markGone = context.WithCancel(context.Background())
	}
	return h.goneCtx
}

// wentAway cancels the dials in flight to the provider.
func (h *health) wentAway() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.markGone != nil {
		h.markGone()
		h.goneCtx, h.markGone = nil, nil
	}
}

// NewConsumer returns a Consumer with no services.
func NewConsumer(cfg ConsumerConfig) *Consumer {
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.LastDialTimeout <= 0 {
		cfg.LastDialTimeout = DefaultLastDialTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if cfg.Listen == nil {
		cfg.Listen = func(a netip.AddrPort) (net.Listener, error) { return net.Listen("tcp", a.String()) }
	}
	if cfg.ListenUDP == nil {
		cfg.ListenUDP = listenUDP
	}
	if cfg.UDPSweep <= 0 {
		cfg.UDPSweep = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Consumer{
		cfg:      cfg,
		log:      log.With("subsystem", "proxy"),
		ctx:      ctx,
		cancel:   cancel,
		services: map[string]*service{},
		health:   map[wire.NodeID]*health{},
		conns:    map[*openConn]struct{}{},
	}
	c.wg.Add(1)
	go c.sweepUDP()
	return c
}

// Reconfig applies the desired set of services whole: listeners for services
// that went away are closed, new ones are opened, and target lists are
// swapped in place. Open connections carried to a provider that is no
// longer a target of their service (the provider left, stopped providing
// it, or the service left the map) are closed at both ends: they would
// otherwise hang until TCP gives up on a provider that no longer answers,
// or go on where policy no longer lets them. Everything else is applied
// even when a listener cannot be opened; the error names those that could
// not, and calling Reconfig again retries them.
func (c *Consumer) Reconfig(want []ServiceConfig) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	var errs []error
	keep := map[string]bool{}
	if c.cfg.HTTP != nil {
		hs := map[string]*wire.ServiceHTTP{}
		for _, w := range want {
			if w.HTTP != nil {
				hs[w.Name] = w.HTTP
			}
		}
		c.cfg.HTTP.SetServices(hs)
	}
	for _, w := range want {
		keep[w.Name] = true
		s := c.services[w.Name]
		if s != nil && (s.listen != w.Listen || s.protocol != w.Protocol) {
			c.stopLocked(s)
			s = nil
		}
		if s == nil {
			s = &service{name: w.Name, protocol: w.Protocol, listen: w.Listen, selected: map[wire.NodeID]int64{}}
			c.services[w.Name] = s
		}
		t := slices.Clone(w.Targets)
		if old := s.targets.Load(); old != nil {
			c.recoveredLocked(*old, t)
		}
		s.targets.Store(&t)
		s.pol.Store(&choosePolicy{Split: w.Split, Locality: w.Locality, Affinity: w.Affinity, Region: w.Region})
		s.http.Store(w.HTTP != nil && c.cfg.HTTP != nil)
		for _, tg := range t {
			if c.health[tg.Node] == nil {
				c.health[tg.Node] = &health{}
			}
		}
		s.selMu.Lock()
		for id := range s.selected {
			if !slices.ContainsFunc(t, func(x Target) bool { return x.Node == id }) {
				delete(s.selected, id)
			}
		}
		s.selMu.Unlock()
		if s.udp == nil && wire.HasUDP(w.Protocol) {
			if err := c.startUDPLocked(s); err != nil {
				if s.err == nil || s.err.Error() != err.Error() {
					c.log.Error("cannot listen on UDP for service; will retry", "service", w.Name, "addr", w.Listen, "err", err)
				}
				s.err = err
				errs = append(errs, fmt.Errorf("proxy: service %s: udp: %w", w.Name, err))
				continue
			}
			s.err = nil
		}
		if s.ln == nil && wire.HasTCP(w.Protocol) {
			// Retried on every reconfig until it works: a port taken by
			// another program is reported in status, not fatal.
			addr := w.Listen
			if s.udp != nil {
				addr = s.udp.bound // tcp+udp: one address, the fallback port too
			}
			ln, err := c.listen(w.Name, addr)
			if err != nil {
				if s.err == nil || s.err.Error() != err.Error() {
					c.log.Error("cannot listen for service; will retry", "service", w.Name, "addr", w.Listen, "err", err)
				}
				s.err = err
				errs = append(errs, fmt.Errorf("proxy: service %s: %w", w.Name, err))
				continue
			}
			s.ln, s.err = ln, nil
			s.bound = addrPortOf(ln.Addr(), w.Listen)
			c.wg.Add(1)
			go c.acceptLoop(s, ln)
			c.log.Debug("consuming service", "service", w.Name, "addr", s.bound)
		}
	}
	for name, s := range c.services {
		if !keep[name] {
			c.stopLocked(s)
			delete(c.services, name)
		}
	}
	c.closeGoneTargetsLocked(want)
	return errors.Join(errs...)
}

// FallbackPort is where a service whose port p needs privileges (below
// 1024) listens when this process may not bind p: p+10000, so port 80 is
// served on 10080, 22 on 10022, 443 on 10443. The rule is fixed so that
// the port stays the same across restarts and on every site; other ports
// are returned unchanged.
func FallbackPort(p uint16) uint16 {
	if p == 0 || p >= 1024 {
		return p
	}
	return p + 10000
}

// SetcapHint is the command that lets meshlink bind ports below 1024
// itself, for messages that explain a FallbackPort.
const SetcapHint = "sudo setcap cap_net_bind_service=+ep $(command -v meshlink)"

// listen opens the local listener of a service at addr or, when its port
// needs privileges this process lacks, at the same address on
// FallbackPort. The errors say which flag or command helps.
func (c *Consumer) listen(name string, addr netip.AddrPort) (net.Listener, error) {
	ln, err := c.cfg.Listen(addr)
	if err == nil {
		return ln, nil
	}
	if !errors.Is(err, syscall.EACCES) || FallbackPort(addr.Port()) == addr.Port() {
		return nil, listenError(addr, err)
	}
	alt := netip.AddrPortFrom(addr.Addr(), FallbackPort(addr.Port()))
	ln, err2 := c.cfg.Listen(alt)
	if err2 != nil {
		return nil, fmt.Errorf("port %d needs privileges and the fallback port %d is not free either (%w); free %s, or let meshlink bind low ports: %s",
			addr.Port(), alt.Port(), err2, alt, SetcapHint)
	}
	c.log.Warn("service port needs privileges; serving it on the fallback port instead (SRV answers and `meshlink services` say so)",
		"service", name, "port", addr.Port(), "serving", alt.String(), "for_the_real_port", SetcapHint)
	return ln, nil
}

// listenError explains why a service's local address cannot be opened.
func listenError(addr netip.AddrPort, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("%s is already in use by another program or agent; give each agent on a host its own --proxy-range (e.g. 127.101.0.0/16): %w", addr, err)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("not allowed to listen on %s: %w", addr, err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("address %s is not on this host (only Linux serves all of 127/8); choose another --proxy-range: %w", addr, err)
	}
	return fmt.Errorf("listen on %s: %w", addr, err)
}

// addrPortOf is the address a listener reports, or def if it is not TCP.
func addrPortOf(a net.Addr, def netip.AddrPort) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return def
}

// Bound reports where each listening service is served, by name: its
// address from the network map, or the same address on FallbackPort.
func (c *Consumer) Bound() map[string]netip.AddrPort {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]netip.AddrPort, len(c.services))
	for name, s := range c.services {
		if s.ln != nil {
			out[name] = s.bound
		} else if s.udp != nil {
			out[name] = s.udp.bound
		}
	}
	return out
}

// closeGoneTargetsLocked closes the open connections whose provider is no
// longer among their service's targets in want.
func (c *Consumer) closeGoneTargetsLocked(want []ServiceConfig) {
	targets := make(map[string]map[wire.NodeID]bool, len(want))
	for _, w := range want {
		m := make(map[wire.NodeID]bool, len(w.Targets))
		for _, t := range w.Targets {
			m[t.Node] = true
		}
		targets[w.Name] = m
	}
	for oc := range c.conns {
		if oc.remote == nil {
			continue
		}
		nodes, ok := targets[oc.service]
		reason := ""
		switch {
		case !ok:
			reason = "the service left the network map"
		case !nodes[oc.target.Node]:
			reason = "the provider no longer provides the service to this node"
		default:
			continue
		}
		oc.close()
		delete(c.conns, oc)
		c.log.Info("closed a connection to a provider that is gone", "service", oc.service, "provider", oc.target.Name, "node", oc.target.Node, "reason", reason)
	}
	c.closeUDPFlowsLocked(func(s *service, f *udpFlow) string {
		if f.target.Local != "" || targets[s.name][f.target.Node] {
			return ""
		}
		return "the provider no longer provides the service to this node"
	})
}

// recoveredLocked forgets the consumer's own dial failures of a provider
// that the map now shows back (online again, or healthy again): it gets
// new connections at once rather than after its backoff.
func (c *Consumer) recoveredLocked(old, cur []Target) {
	for _, t := range cur {
		i := slices.IndexFunc(old, func(o Target) bool { return o.Node == t.Node })
		if i < 0 {
			continue
		}
		o := old[i]
		gone := (o.Online && !t.Online && t.Local == "") || (o.Health != wire.HealthUnhealthy && t.Health == wire.HealthUnhealthy)
		if h := c.health[t.Node]; gone && h != nil {
			h.wentAway()
		}
		back := (!o.Online && t.Online) || (o.Health == wire.HealthUnhealthy && t.Health != wire.HealthUnhealthy)
		if h := c.health[t.Node]; back && h != nil {
			h.mu.Lock()
			h.fails, h.failUntil, h.lastErr = 0, time.Time{}, ""
			h.mu.Unlock()
		}
	}
}

func (c *Consumer) stopLocked(s *service) {
	if s.ln != nil {
		s.ln.Close()
		s.ln = nil
	}
	c.stopUDPLocked(s)
}

func (c *Consumer) acceptLoop(s *service, ln net.Listener) {
	defer c.wg.Done()
	// Temporary errors (EMFILE): back off instead of spinning. The sleep
	// needs no context: Close closes ln, which ends the loop at the next
	// Accept, at most a second later.
	bo := backoff.Backoff{Min: 5 * time.Millisecond, Max: time.Second}
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			c.log.Warn("accept failed", "service", s.name, "err", err)
			time.Sleep(bo.Next())
			continue
		}
		bo.Reset()
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			conn.Close()
			return
		}
		oc := &openConn{service: s.name, local: conn}
		c.conns[oc] = struct{}{}
		c.wg.Add(1)
		c.mu.Unlock()
		go func() {
			defer c.wg.Done()
			c.serve(s, conn, oc)
			c.mu.Lock()
			delete(c.conns, oc)
			c.mu.Unlock()
		}()
	}
}

// serve carries one local connection to the first provider that accepts it.
func (c *Consumer) serve(s *service, local net.Conn, oc *openConn) {
	s.total.Add(1)
	s.open.Add(1)
	defer s.open.Add(-1)
	if s.http.Load() {
		c.cfg.HTTP.ServeConn(s.name, local)
		return
	}
	remote, t, h, err := c.dialAny(c.ctx, s, clientAddr(local))
	if err != nil {
		s.failed.Add(1)
		if errors.Is(err, ErrNoHealthyProvider) {
			s.refused.Add(1)
			c.logRefusal(s, err)
		} else {
			c.log.Warn("no provider could take the connection; refusing it", "service", s.name, "err", err)
		}
		// A reset, not a FIN: the client learns at once that nothing
		// answered, as if the service itself had refused.
		if tc, ok := local.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		local.Close()
		return
	}
	defer h.open.Add(-1)
	if why := c.attach(oc, remote, t); why != "" {
		remote.Close()
		local.Close()
		c.log.Info("closed a connection to a provider that is gone", "service", s.name, "provider", t.Name, "node", t.Node, "reason", why)
		return
	}
	c.log.Debug("connection", "service", s.name, "provider", t.Name, "from", local.RemoteAddr())
	Splice(local, remote, &s.ctr)
}

// attach records that oc was carried to t over remote, unless the
// consumer closed or t stopped being a target of the service while it was
// dialed (Reconfig skips connections without a provider yet, so it is
// checked again here, under the same lock): then it says why, and the
// caller closes it.
func (c *Consumer) attach(oc *openConn, remote net.Conn, t Target) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return "the proxy is closing"
	}
	s := c.services[oc.service]
	if s == nil {
		return "the service left the network map while it was dialed"
	}
	if !slices.ContainsFunc(*s.targets.Load(), func(x Target) bool { return x.Node == t.Node }) {
		return "the provider left the service while it was dialed"
	}
	oc.remote, oc.target = remote, t
	return ""
}

// logRefusal logs why connections are refused, once per reason and then
// at most every 10 s: a client retrying in a loop must not flood the log.
func (c *Consumer) logRefusal(s *service, err error) {
	now := c.cfg.Now()
	s.selMu.Lock()
	why := err.Error()
	log := why != s.lastWhy || now.Sub(s.lastLog) >= 10*time.Second
	if log {
		s.lastWhy, s.lastLog = why, now
	}
	s.selMu.Unlock()
	if log {
		c.log.Warn("connection refused: no healthy provider; see `meshlink services`", "service", s.name, "why", why, "refused", s.refused.Load())
	}
}

// clientAddr is the address a local connection came from.
func clientAddr(c net.Conn) netip.Addr {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		if ap := ta.AddrPort(); ap.IsValid() {
			return ap.Addr().Unmap()
		}
	}
	return netip.Addr{}
}

// dialAny tries the providers in order of preference; the returned health's
// open count has been incremented for the caller. With no usable provider
// it fails at once with ErrNoHealthyProvider, without dialing.
func (c *Consumer) dialAny(ctx context.Context, s *service, client netip.Addr) (net.Conn, Target, *health, error) {
	targets, err := c.order(s, client, false)
	if err != nil {
		return nil, Target{}, nil, err
	}
	var errs []error
	for i, t := range targets {
		h := c.healthOf(t.Node)
		h.open.Add(1)
		conn, err := c.dial(ctx, t, h, i == len(targets)-1)
		if err == nil {
			h.mu.Lock()
			h.fails, h.failUntil, h.lastErr = 0, time.Time{}, ""
			h.mu.Unlock()
			s.noteSelected(t.Node)
			return conn, t, h, nil
		}
		h.open.Add(-1)
		if ctx.Err() != nil {
			return nil, Target{}, nil, err // the caller gave up; not the provider's fault
		}
		c.noteDialFailure(s.name, t, h, err)
		errs = append(errs, fmt.Errorf("%s: %w", t.Name, err))
	}
	return nil, Target{}, nil, errors.Join(errs...)
}

// dialTimeout is how long one attempt at a provider may take: the short
// DialTimeout when another provider is left to fail over to or this one
// failed lately (a provider known dead costs each connection no more),
// the longer LastDialTimeout otherwise.
func (c *Consumer) dialTimeout(h *health, last bool) time.Duration {
	if !last {
		return c.cfg.DialTimeout
	}
	h.mu.Lock()
	failing := h.fails > 0
	h.mu.Unlock()
	if failing {
		return c.cfg.DialTimeout
	}
	return max(c.cfg.LastDialTimeout, c.cfg.DialTimeout)
}

// noteDialFailure marks a provider that did not answer a dial as failing
// for a while (passive health).
func (c *Consumer) noteDialFailure(service string, t Target, h *health, err error) {
	if errors.Is(err, errDialQueue) {
		c.log.Info("provider busy opening connections, trying the next", "service", service, "provider", t.Name)
		return
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		// The provider answered at once and refused this connection
		// (its target refused, or its policy): it is reachable, so
		// it is not marked failing; its health checks report a dead
		// target. This connection moves on.
		c.log.Debug("provider refused the connection, trying the next", "service", service, "provider", t.Name)
		return
	}
	h.mu.Lock()
	h.fails++
	// A provider that does not answer is skipped for a while, growing
	// with repeated failures; it gets another chance after that, or
	// at once when the map shows it back (recoveredLocked).
	h.failUntil = c.cfg.Now().Add(min(time.Second<<min(h.fails-1, 6), time.Minute))
	h.lastErr = shortErr(err)
	h.mu.Unlock()
	c.log.Info("provider failed, trying the next", "service", service, "provider", t.Name, "err", err)
}

// Pick orders the providers of the consumed service for one HTTP request,
// best first, exactly as for a new connection (health, priority, weight,
// load), except that split, when not nil, replaces the service's split
// (an HTTP route's) and the providers skip reports true for are left out
// (ejected by outlier detection) unless every one would be.
func (c *Consumer) Pick(service string, client netip.Addr, split map[string]int, skip func(wire.NodeID) bool) ([]Target, error) {
	c.mu.Lock()
	s := c.services[service]
	c.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownService, service)
	}
	var ts []Target
	for _, t := range *s.targets.Load() {
		if wire.HasTCP(t.Protocol) {
			ts = append(ts, t)
		}
	}
	cs := c.candidates(ts)
	if skip != nil {
		for i := range cs {
			if skip(cs[i].Node) {
				cs[i].failing, cs[i].failErr = true, "ejected: too many errors in a row"
			}
		}
	}
	pol := *s.pol.Load()
	if split != nil {
		pol.Split = split
	}
	c.randMu.Lock()
	defer c.randMu.Unlock()
	return choose(cs, pol, client, c.cfg.Rand)
}

// Providers is the service's providers as the map lists them.
func (c *Consumer) Providers(service string) []Target {
	c.mu.Lock()
	s := c.services[service]
	c.mu.Unlock()
	if s == nil {
		return nil
	}
	return *s.targets.Load()
}

// Begin counts one request that went to provider t of service, for its
// share in status and for the least-loaded choice; done ends it.
func (c *Consumer) Begin(service string, t Target) (done func()) {
	c.mu.Lock()
	s := c.services[service]
	c.mu.Unlock()
	if s != nil {
		s.noteSelected(t.Node)
	}
	h := c.healthOf(t.Node)
	h.open.Add(1)
	return func() { h.open.Add(-1) }
}

// DialTarget opens a connection to provider t of service, with the
// consumer's connect timeout; a provider that does not answer is marked
// failing as for a connection's dial.
func (c *Consumer) DialTarget(ctx context.Context, service string, t Target) (net.Conn, error) {
	h := c.healthOf(t.Node)
	conn, err := c.dial(ctx, t, h, false)
	if err != nil {
		if ctx.Err() == nil && c.ctx.Err() == nil {
			c.noteDialFailure(service, t, h, err)
		}
		return nil, err
	}
	h.mu.Lock()
	h.fails, h.failUntil, h.lastErr = 0, time.Time{}, ""
	h.mu.Unlock()
	return conn, nil
}

// shortErr is the end of a dial error, what a person needs to read
// ("connection refused", "i/o timeout").
func shortErr(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "no answer within the connect timeout"
	case errors.Is(err, context.Canceled):
		return "went offline or unhealthy while being dialed"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// noteSelected counts a connection that provider node took.
func (s *service) noteSelected(node wire.NodeID) {
	s.selMu.Lock()
	s.recent[s.nrecent%recentConns] = node
	s.nrecent++
	s.selected[node]++
	s.selMu.Unlock()
}

func (c *Consumer) dial(ctx context.Context, t Target, h *health, last bool) (net.Conn, error) {
	// Close cancels dials in flight whatever context the caller passed,
	// and so does the map showing the provider gone: the wait for a
	// slot as much as the dial.
	ctx, cancelAll := context.WithCancel(ctx)
	defer cancelAll()
	stop := context.AfterFunc(c.ctx, cancelAll)
	defer stop()
	stopGone := context.AfterFunc(h.goneContext(), cancelAll)
	defer stopGone()
	if t.Local != "" {
		ctx, cancel := context.WithTimeout(ctx, c.dialTimeout(h, last))
		defer cancel()
		var d net.Dialer
		return d.DialContext(ctx, "tcp", t.Local)
	}
	release, err := h.acquireDial(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	// The timeout is the dial's own, not the wait's, and chosen once the
	// slot is held: a dial that waited behind others that failed gets the
	// short one.
	ctx, cancel := context.WithTimeout(ctx, c.dialTimeout(h, last))
	defer cancel()
	return c.cfg.Dialer.DialTCP(ctx, t.Addr)
}

// ErrUnknownService is returned by DialService for a name the network map
// does not list as a consumed service.
var ErrUnknownService = errors.New("proxy: unknown service")

// DialService opens a connection to a provider of the consumed service
// name, chosen and failed over exactly as for a connection accepted by the
// service's local listener, and counted in its status. The connection
// counts as open at its provider until it is closed. Local proxies (SOCKS5,
// HTTP) use it so that every path into the mesh shares one provider choice.
func (c *Consumer) DialService(ctx context.Context, name string) (net.Conn, error) {
	c.mu.Lock()
	s := c.services[name]
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return nil, net.ErrClosed
	}
	if s == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownService, name)
	}
	s.total.Add(1)
	remote, t, h, err := c.dialAny(ctx, s, netip.Addr{})
	if err != nil {
		s.failed.Add(1)
		return nil, fmt.Errorf("proxy: service %s: %w", name, err)
	}
	oc := &openConn{service: name}
	c.mu.Lock()
	c.conns[oc] = struct{}{}
	c.mu.Unlock()
	if why := c.attach(oc, remote, t); why != "" {
		c.mu.Lock()
		delete(c.conns, oc)
		c.mu.Unlock()
		remote.Close()
		h.open.Add(-1)
		return nil, fmt.Errorf("proxy: service %s: %s", name, why)
	}
	s.open.Add(1)
	return &serviceConn{Conn: remote, done: func() {
		c.mu.Lock()
		delete(c.conns, oc)
		c.mu.Unlock()
		s.open.Add(-1)
		h.open.Add(-1)
	}}, nil
}

// serviceConn gives back its counts once, at the first Close.
type serviceConn struct {
	net.Conn
	once sync.Once
	done func()
}

func (sc *serviceConn) Close() error {
	err := sc.Conn.Close()
	sc.once.Do(sc.done)
	return err
}

// CloseWrite passes a half-close on when the connection supports it (Splice).
func (sc *serviceConn) CloseWrite() error {
	if cw, ok := sc.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return sc.Conn.Close()
}

func (c *Consumer) healthOf(node wire.NodeID) *health {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.health[node]
	if h == nil {
		h = &health{}
		c.health[node] = h
	}
	return h
}

// candidates is the service's providers with the consumer's own view.
func (c *Consumer) candidates(ts []Target) []candidate {
	now := c.cfg.Now()
	cs := make([]candidate, len(ts))
	for i, t := range ts {
		h := c.healthOf(t.Node)
		h.mu.Lock()
		cs[i] = candidate{Target: t, failing: now.Before(h.failUntil), failErr: h.lastErr}
		h.mu.Unlock()
		cs[i].open = h.open.Load()
	}
	return cs
}

// order is the providers a new connection (udp false) or flow (udp
// true) is offered to, best first (choose): those carrying its protocol.
func (c *Consumer) order(s *service, client netip.Addr, udp bool) ([]Target, error) {
	var ts []Target
	for _, t := range *s.targets.Load() {
		if udp && wire.HasUDP(t.Protocol) || !udp && wire.HasTCP(t.Protocol) {
			ts = append(ts, t)
		}
	}
	cs := c.candidates(ts)
	c.randMu.Lock()
	defer c.randMu.Unlock()
	return choose(cs, *s.pol.Load(), client, c.cfg.Rand)
}

// CloseTo closes every open connection carried through the mesh to a
// provider node keep rejects, both the local application's side and the
// mesh side, and reports how many it closed. Connections to a provider on
// this node itself (Target.Local) are never closed. The agent calls it
// when peers leave the network map: a removed provider's connections
// would otherwise hang until TCP gives up, since WireGuard forgetting the
// peer closes nothing.
func (c *Consumer) CloseTo(keep func(node wire.NodeID) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for oc := range c.conns {
		if oc.remote == nil || oc.target.Local != "" || keep(oc.target.Node) {
			continue
		}
		oc.close()
		delete(c.conns, oc)
		c.log.Info("closed a connection to a provider that is gone", "service", oc.service, "provider", oc.target.Name, "node", oc.target.Node, "reason", "the provider left the network map")
		n++
	}
	n += c.closeUDPFlowsLocked(func(_ *service, f *udpFlow) string {
		if f.target.Local != "" || keep(f.target.Node) {
			return ""
		}
		return "the provider left the network map"
	})
	return n
}

// ServiceStatus describes one consumed service.
type ServiceStatus struct {
	Name string
	// Listen is where the service is served: Wanted, or Wanted's address
	// on FallbackPort when its port needs privileges this process lacks.
	Listen    netip.AddrPort
	Wanted    netip.AddrPort
	Listening bool
	Error     string
	Open      int64
	Total     int64
	Failed    int64
	// Refused counts connections refused at once for want of a healthy
	// provider; Refusing, when set, says why new ones would be now.
	Refused   int64
	Refusing  string
	Sent      int64
	Received  int64
	Providers []ProviderStatus
	// Split, Locality and Affinity are the service's traffic policy.
	Split    map[string]int
	Locality string
	Affinity string
	// Protocol is what the service carries ("" is TCP); UDP counts its
	// flows and datagrams.
	Protocol string
	UDP      UDPStats
	// HTTP is set when its connections are served request by request.
	HTTP bool
}

// ProviderStatus is a consumer's view of one provider.
type ProviderStatus struct {
	Name      string
	Addr      netip.AddrPort
	Local     bool
	Online    bool
	Healthy   bool
	Open      int64
	LastError string
	// Health says in words whether new connections may go there: "ok",
	// "unhealthy (connection refused)", "not answering (…)".
	Health   string
	Priority int
	Weight   int
	Version  string
	Region   string
	// Selected counts the connections it took; Share is its fraction of
	// the service's recent ones (the last recentConns).
	Selected int64
	Share    float64
}

// Status reports every consumed service, sorted by name.
func (c *Consumer) Status() []ServiceStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.cfg.Now()
	var out []ServiceStatus
	for _, s := range c.services {
		pol := *s.pol.Load()
		st := ServiceStatus{
			Name: s.name, Listen: s.listen, Wanted: s.listen, Listening: s.ln != nil,
			Open: s.open.Load(), Total: s.total.Load(), Failed: s.failed.Load(), Refused: s.refused.Load(),
			Sent: s.ctr.Sent.Load(), Received: s.ctr.Received.Load(),
			Split: pol.Split, Locality: pol.Locality, Affinity: pol.Affinity,
			Protocol: s.protocol, UDP: s.udpCtr.snapshot(), HTTP: s.http.Load(),
		}
		if s.ln != nil {
			st.Listen = s.bound
		} else if s.udp != nil {
			st.Listen, st.Listening = s.udp.bound, true
		}
		if s.err != nil {
			st.Error = s.err.Error()
		}
		s.selMu.Lock()
		share := map[wire.NodeID]int{}
		n := min(s.nrecent, recentConns)
		for _, id := range s.recent[:n] {
			share[id]++
		}
		selected := maps.Clone(s.selected)
		s.selMu.Unlock()
		usable := false
		ts := *s.targets.Load()
		var cds []candidate
		for _, t := range ts {
			h := c.health[t.Node]
			cd := candidate{Target: t}
			ps := ProviderStatus{Name: t.Name, Addr: t.Addr, Local: t.Local != "", Online: t.Online || t.Local != "",
				Priority: t.Priority, Weight: t.Weight, Version: t.Version, Region: t.Region, Selected: selected[t.Node]}
			if h != nil {
				h.mu.Lock()
				cd.failing, cd.failErr = now.Before(h.failUntil), h.lastErr
				ps.LastError = h.lastErr
				h.mu.Unlock()
				ps.Open = h.open.Load()
			}
			if ps.LastError == "" && t.Health == wire.HealthUnhealthy {
				ps.LastError = t.HealthError
			}
			ps.Healthy, ps.Health = cd.usable(), cd.why()
			cds = append(cds, cd)
			usable = usable || ps.Healthy
			if n > 0 {
				ps.Share = float64(share[t.Node]) / float64(n)
			}
			st.Providers = append(st.Providers, ps)
		}
		if !usable {
			_, err := choose(cds, pol, netip.Addr{}, rand.New(rand.NewPCG(0, 0)))
			if err != nil {
				st.Refusing = err.Error()
			}
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Close stops every listener, cancels dials in flight and closes every open
// connection; Wait then waits for their goroutines. It is idempotent.
func (c *Consumer) Close() {
	c.cancel()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	for _, s := range c.services {
		c.stopLocked(s)
	}
	for oc := range c.conns {
		if oc.local != nil {
			oc.local.Close()
		} else if oc.remote != nil {
			oc.remote.Close()
		}
	}
	c.mu.Unlock()
}

// Wait blocks until every accept loop and connection has ended.
func (c *Consumer) Wait() { c.wg.Wait() }
