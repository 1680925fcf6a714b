// Package bind is the agent's conn.Bind: it carries WireGuard packets to each
// peer over the best path it can find — a direct UDP path found by disco
// pings through NATs (hole punching), or the relay over one outbound TLS
// connection when UDP cannot pass — and moves between them without
// WireGuard noticing, so open TCP connections survive a path change.
//
// WireGuard sees one virtual Endpoint per peer; Send picks the path per call.
// Disco and STUN packets share the UDP socket with WireGuard and are
// filtered out of the receive path.
package bind

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/nacl/box"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/stun"
)

// Timing of path discovery. A direct path is trusted while pongs keep
// coming; past trustFor without one, traffic falls back to the relay.
const (
	searchEvery = 2 * time.Second  // ping all candidates while no path is known
	keepEvery   = 3 * time.Second  // ping the chosen path to keep it (and the NAT) alive
	rescanEvery = 30 * time.Second // ping the others now and then for a better path
	trustFor    = 7 * time.Second
	stunEvery   = 23 * time.Second
	tick        = 500 * time.Millisecond

	// A peer we keep sending to that has sent nothing back over the direct
	// path for silentFor (TCP would have acknowledged) is probed at once;
	// without a pong within probeWait the path is dropped, sooner than
	// trustFor, so open connections move to the relay before TCP's
	// retransmission timer has backed off far.
	silentFor = 1500 * time.Millisecond
	probeWait = time.Second
)

// Config configures a Bind.
type Config struct {
	// PrivateKey is the node's WireGuard private key, used to authenticate
	// disco messages; it never leaves the process.
	PrivateKey key.Private
	Logger     *slog.Logger
	// OnPublicAddr is called (on the bind's goroutine) when STUN learns the
	// node's public UDP address, to publish it in the network map.
	OnPublicAddr func(netip.AddrPort)
	// RelayOnly never uses direct UDP paths: for diagnosis and for
	// measuring the relay.
	RelayOnly bool
	// Inbound, if set, is entered by the WireGuard data packets this bind
	// hands to WireGuard (the device's TUN writes leave it); Outbound is
	// left by the data packets WireGuard sends. See netstack.Gate.
	Inbound, Outbound Gate
}

// Gate bounds the packets inside WireGuard's pipeline (netstack.Gate).
type Gate interface {
	Enter(k int)
	Leave(k int)
}

// isData reports whether p is a WireGuard transport-data message that
// carries a packet (type 4, longer than an empty keep-alive): one that ends
// up written to the TUN device.
func isData(p []byte) bool {
	return len(p) > 32 && p[0] == 4 && p[1] == 0 && p[2] == 0 && p[3] == 0
}

// dataPackets counts the messages of pkts for which isData holds.
func dataPackets(pkts [][]byte) int {
	n := 0
	for _, p := range pkts {
		if isData(p) {
			n++
		}
	}
	return n
}

// PeerConfig is what the network map says about a peer.
type PeerConfig struct {
	Key       key.Public
	Name      string
	Endpoints []netip.AddrPort
}

// RelayConfig is one relay of the network map.
type RelayConfig struct {
	Name, URL, Fingerprint string
	// Key is the relay's public key, to which the node proves its own.
	Key key.Public
	// RetryMin and RetryMax bound the reconnect backoff (0: defaults).
	RetryMin, RetryMax time.Duration
}

// relayConn is one relay the bind keeps a connection to.
type relayConn struct {
	cfg    RelayConfig
	client *relay.Client
}

// goneFor is how long a relay that said a peer is not connected to it is
// passed over for that peer (another relay is tried meanwhile).
const goneFor = 5 * time.Second

// Bind implements conn.Bind.
type Bind struct {
	inner  conn.Bind
	log    *slog.Logger
	priv   key.Private
	pub    key.Public
	onAddr func(netip.AddrPort)
	// relayOnly disables direct paths (Config.RelayOnly).
	relayOnly bool
	// in and out gate the pipeline (Config.Inbound, Config.Outbound).
	in, out Gate

	relayCh chan relayPacket
	kick    chan struct{}

	mu       sync.Mutex // guards the fields below
	peers    map[key.Public]*peer
	byAddr   map[netip.AddrPort]*peer
	relays   []*relayConn // in the network map's order of preference
	stunSrv  []netip.AddrPort
	stunTx   map[[12]byte]time.Time
	lastStun time.Time
	public   netip.AddrPort
	waiters  map[[12]byte]chan PingResult
	openDone chan struct{} // closed by Close; nil while not open
	loopDone chan struct{}
	shutdown bool
	garbage  atomic.Uint64
}

type relayPacket struct {
	src key.Public
	pkt []byte
}

type peer struct {
	key    key.Public
	name   string
	ep     *Endpoint
	shared [32]byte
	paths  map[netip.AddrPort]*path
	pings  map[[12]byte]sentPing
	// via is the relay the peer's packets last came over: the reply goes
	// back the same way. gone holds relays that said the peer is not on
	// them, and when.
	via  *relayConn
	gone map[*relayConn]time.Time
	// pending holds the last packets sent while no path at all existed
	// (the first handshake of a fresh agent, before its relays connect),
	// flushed when a relay comes up instead of waiting for WireGuard's 5 s
	// handshake retry.
	pending   [][]byte
	pendingAt time.Time

	lastScan                             time.Time
	txDirect, rxDirect, txRelay, rxRelay atomic.Uint64
	// lastRx and lastTx are when data last came from and went to the peer
	// over a direct path; probeAt when the peer went silent and was probed.
	lastRx, lastTx, probeAt time.Time
}

type path struct {
	addr     netip.AddrPort
	ep       *conn.StdNetEndpoint
	fromMap  bool
	lastPing time.Time
	lastPong time.Time
	rtt      time.Duration
}

type sentPing struct {
	addr  netip.AddrPort // invalid for the relay
	at    time.Time
	relay bool
}

// New returns a Bind over the standard UDP socket.
func New(cfg Config) *Bind {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Bind{
		inner:     conn.NewStdNetBind(),
		log:       log.With("subsystem", "bind"),
		priv:      cfg.PrivateKey,
		onAddr:    cfg.OnPublicAddr,
		relayOnly: cfg.RelayOnly,
		in:        cfg.Inbound,
		out:       cfg.Outbound,
		relayCh:   make(chan relayPacket, 1024),
		kick:      make(chan struct{}, 1),
		peers:     map[key.Public]*peer{},
		byAddr:    map[netip.AddrPort]*peer{},
		stunTx:    map[[12]byte]time.Time{},
		waiters:   map[[12]byte]chan PingResult{},
	}
	b.pub = cfg.PrivateKey.Public()
	return b
}

// Endpoint is WireGuard's handle for a peer: whichever path carries the
// packets, WireGuard sees the same endpoint, so its roaming never fights the
// path choice.
type Endpoint struct {
	key key.Public
	b   *Bind
}

const endpointPrefix = "mlpeer:"

// EndpointString is what to give WireGuard's UAPI as a peer's endpoint.
func EndpointString(k key.Public) string {
	raw := k.Raw()
	return endpointPrefix + base64.RawURLEncoding.EncodeToString(raw[:])
}

func (e *Endpoint) ClearSrc()           {}
func (e *Endpoint) SrcToString() string { return "" }
func (e *Endpoint) DstToString() string { return EndpointString(e.key) }
func (e *Endpoint) DstToBytes() []byte  { return e.key.AppendTo(nil) }
func (e *Endpoint) SrcIP() netip.Addr   { return netip.Addr{} }
func (e *Endpoint) DstIP() netip.Addr {
	if a, _ := e.b.bestDirect(e.key); a.IsValid() {
		return a.Addr()
	}
	return netip.Addr{}
}

// ParseEndpoint implements conn.Bind: our peer endpoints, or a plain ip:port.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	if rest, ok := strings.CutPrefix(s, endpointPrefix); ok {
		raw, err := base64.RawURLEncoding.DecodeString(rest)
		if err != nil || len(raw) != 32 {
			return nil, fmt.Errorf("bind: bad endpoint %q", s)
		}
		return b.endpointFor(key.PublicFromRaw([key.Len]byte(raw))), nil
	}
	return b.inner.ParseEndpoint(s)
}

func (b *Bind) endpointFor(k key.Public) *Endpoint {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p := b.peers[k]; p != nil {
		return p.ep
	}
	return &Endpoint{key: k, b: b}
}

// BatchSize implements conn.Bind.
func (b *Bind) BatchSize() int { return b.inner.BatchSize() }

// SetMark implements conn.Bind.
func (b *Bind) SetMark(mark uint32) error { return b.inner.SetMark(mark) }

// Open implements conn.Bind: the UDP socket's receive functions, filtered,
// plus one that yields packets arriving from the relay.
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.inner.Open(port)
	if err != nil {
		return nil, 0, err
	}
	b.mu.Lock()
	done := make(chan struct{})
	b.openDone = done
	loopDone := make(chan struct{})
	b.loopDone = loopDone
	b.mu.Unlock()
	out := make([]conn.ReceiveFunc, 0, len(fns)+1)
	for _, fn := range fns {
		out = append(out, b.filter(fn))
	}
	out = append(out, func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		return b.receiveRelay(done, packets, sizes, eps)
	})
	go func() {
		defer close(loopDone)
		b.loop(done)
	}()
	return out, actual, nil
}

// Close implements conn.Bind. The relay connection stays up (WireGuard
// closes and reopens the bind when its port changes); Shutdown ends it.
func (b *Bind) Close() error {
	b.mu.Lock()
	done, loopDone := b.openDone, b.loopDone
	b.openDone, b.loopDone = nil, nil
	b.mu.Unlock()
	if done != nil {
		close(done)
		<-loopDone
	}
	return b.inner.Close()
}

// Shutdown closes the bind and the relay clients for good.
func (b *Bind) Shutdown() {
	b.Close()
	b.mu.Lock()
	rs := b.relays
	b.relays = nil
	b.shutdown = true
	b.mu.Unlock()
	for _, rc := range rs {
		rc.client.Close()
	}
}

// relayFor picks the relay to reach p by: the one its packets came over,
// else the first connected relay that has not just said p is not on it,
// else the first connected one. Caller holds b.mu.
func (b *Bind) relayFor(p *peer, now time.Time) *relayConn {
	if p == nil {
		return nil
	}
	if v := p.via; v != nil && v.client.Connected() && now.Sub(p.gone[v]) > goneFor {
		return v
	}
	var fallback *relayConn
	for _, rc := range b.relays {
		if !rc.client.Connected() {
			continue
		}
		if now.Sub(p.gone[rc]) > goneFor {
			return rc
		}
		if fallback == nil {
			fallback = rc
		}
	}
	return fallback
}

// anyRelayConnected reports whether some relay is up. Caller holds b.mu.
func (b *Bind) anyRelayConnected() bool {
	for _, rc := range b.relays {
		if rc.client.Connected() {
			return true
		}
	}
	return false
}

// filter wraps a UDP receive function: disco and STUN are handled here and
// hidden from WireGuard; WireGuard packets from a known path are tagged with
// their peer's endpoint.
func (b *Bind) filter(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for {
			n, err := fn(packets, sizes, eps)
			if err != nil {
				return n, err
			}
			kept := 0
			now := time.Now()
			for i := 0; i < n; i++ {
				if sizes[i] == 0 {
					continue
				}
				se, ok := eps[i].(*conn.StdNetEndpoint)
				if !ok {
					kept++
					continue
				}
				src := netip.AddrPortFrom(se.AddrPort.Addr().Unmap(), se.AddrPort.Port())
				pkt := packets[i][:sizes[i]]
				switch {
				case isDisco(pkt):
					b.handleDisco(pkt, src, nil)
					sizes[i] = 0
				case stun.IsSTUN(pkt):
					b.handleSTUN(pkt, src)
					sizes[i] = 0
				default:
					b.mu.Lock()
					p := b.byAddr[src]
					if p != nil {
						p.lastRx = now
					}
					b.mu.Unlock()
					if p != nil {
						eps[i] = p.ep
						p.rxDirect.Add(uint64(sizes[i]))
					}
					kept++
				}
			}
			if kept > 0 {
				b.enter(packets[:n], sizes[:n])
				return n, nil
			}
		}
	}
}

func (b *Bind) receiveRelay(done chan struct{}, packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	var first relayPacket
	select {
	case first = <-b.relayCh:
	case <-done:
		return 0, net.ErrClosed
	}
	n := 0
	put := func(rp relayPacket) {
		if len(rp.pkt) > len(packets[n]) {
			return
		}
		sizes[n] = copy(packets[n], rp.pkt)
		eps[n] = b.endpointFor(rp.src)
		n++
	}
	put(first)
	for n < len(packets) {
		select {
		case rp := <-b.relayCh:
			put(rp)
			continue
		default:
		}
		break
	}
	b.enter(packets[:n], sizes[:n])
	return n, nil
}

// enter waits at the inbound gate for the data packets about to be handed
// to WireGuard.
func (b *Bind) enter(packets [][]byte, sizes []int) {
	if b.in == nil {
		return
	}
	k := 0
	for i, p := range packets {
		if isData(p[:sizes[i]]) {
			k++
		}
	}
	b.in.Enter(k)
}

// onRelayPacket is the relay clients' callback.
func (b *Bind) onRelayPacket(rc *relayConn, src key.Public, pkt []byte) {
	if isDisco(pkt) {
		b.handleDisco(pkt, netip.AddrPort{}, rc)
		return
	}
	b.mu.Lock()
	if p := b.peers[src]; p != nil {
		p.rxRelay.Add(uint64(len(pkt)))
		if p.via != rc {
			p.via = rc
			delete(p.gone, rc)
		}
	}
	b.mu.Unlock()
	select {
	case b.relayCh <- relayPacket{src: src, pkt: slices.Clone(pkt)}:
	default:
		// WireGuard is not keeping up; drop like a full NIC queue would.
	}
}

// Send implements conn.Bind.
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if b.out != nil {
		b.out.Leave(dataPackets(bufs))
	}
	e, ok := ep.(*Endpoint)
	if !ok {
		return b.inner.Send(bufs, ep)
	}
	now := time.Now()
	b.mu.Lock()
	p := b.peers[e.key]
	var direct *path
	if p != nil && !b.relayOnly {
		direct = p.best(now)
		if direct != nil {
			p.lastTx = now
		}
	}
	var r *relay.Client
	if rc := b.relayFor(p, now); rc != nil {
		r = rc.client
	}
	b.mu.Unlock()
	if direct != nil {
		err := b.inner.Send(bufs, direct.ep)
		if err == nil && p != nil {
			p.txDirect.Add(sizeOf(bufs))
		}
		return err
	}
	// No proven direct path: send over the relay and, like Tailscale does
	// until a path is trusted, to the addresses the network map gave as
	// well. Whichever arrives first wins; a plain LAN then needs no relay,
	// and a relay on which the peer is not (yet) connected loses nothing.
	sent := false
	if r != nil {
		var rerr error
		for _, buf := range bufs {
			if err := r.Send(e.key, buf); err != nil {
				rerr = err
				break
			}
		}
		if rerr == nil {
			sent = true
			if p != nil {
				p.txRelay.Add(sizeOf(bufs))
			}
		}
	}
	if p != nil && !b.relayOnly {
		b.mu.Lock()
		var eps []*conn.StdNetEndpoint
		for _, pa := range p.paths {
			if pa.fromMap {
				eps = append(eps, pa.ep)
			}
		}
		b.mu.Unlock()
		for _, pep := range eps {
			if b.inner.Send(bufs, pep) == nil {
				sent = true
			}
		}
		if len(eps) > 0 {
			p.txDirect.Add(sizeOf(bufs))
		}
	}
	if sent {
		return nil
	}
	if p != nil {
		b.mu.Lock()
		if len(b.relays) == 0 {
			b.mu.Unlock()
			return errors.New("bind: no path to peer (no direct address and no relay)")
		}
		for _, buf := range bufs {
			if len(p.pending) == maxPending {
				p.pending = p.pending[1:]
			}
			p.pending = append(p.pending, slices.Clone(buf))
		}
		p.pendingAt = now
		b.mu.Unlock()
		return nil
	}
	return errors.New("bind: no path to peer (not in the network map)")
}

func sizeOf(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

// best returns the direct path to use, or nil: IPv4 before IPv6, then the
// lowest round trip. (Measured in the namespace tests: fresh agents that
// picked a host's IPv6 address lost their first handshake or SYN 1 time in
// 6; none did over IPv4.) Caller holds b.mu.
func (p *peer) best(now time.Time) *path {
	var out *path
	for _, pa := range p.paths {
		if now.Sub(pa.lastPong) > trustFor {
			continue
		}
		if out == nil || better(pa, out) {
			out = pa
		}
	}
	return out
}

func better(a, b *path) bool {
	if a4, b4 := a.addr.Addr().Is4(), b.addr.Addr().Is4(); a4 != b4 {
		return a4
	}
	return a.rtt < b.rtt
}

func (b *Bind) bestDirect(k key.Public) (netip.AddrPort, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p := b.peers[k]; p != nil {
		if pa := p.best(time.Now()); pa != nil {
			return pa.addr, pa.rtt
		}
	}
	return netip.AddrPort{}, 0
}

// SetPeers replaces the set of peers and their candidate addresses whole.
func (b *Bind) SetPeers(ps []PeerConfig) {
	b.mu.Lock()
	want := map[key.Public]bool{}
	for _, pc := range ps {
		want[pc.Key] = true
		p := b.peers[pc.Key]
		if p == nil {
			p = &peer{key: pc.Key, paths: map[netip.AddrPort]*path{}, pings: map[[12]byte]sentPing{}, gone: map[*relayConn]time.Time{}}
			p.ep = &Endpoint{key: pc.Key, b: b}
			peerPub, priv := p.key.Raw(), b.priv.Raw()
			box.Precompute(&p.shared, &peerPub, &priv)
			b.peers[pc.Key] = p
		}
		p.name = pc.Name
		inMap := map[netip.AddrPort]bool{}
		for _, a := range pc.Endpoints {
			a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
			if !a.IsValid() || a.Port() == 0 {
				continue
			}
			inMap[a] = true
			if p.paths[a] == nil {
				p.paths[a] = &path{addr: a, ep: &conn.StdNetEndpoint{AddrPort: a}}
				// A new candidate (the peer's fresh STUN address, say)
				// is tried at once: the peer is punching towards us now.
				p.lastScan = time.Time{}
			}
			p.paths[a].fromMap = true
			b.byAddr[a] = p
		}
		for a, pa := range p.paths {
			if !inMap[a] {
				pa.fromMap = false
				if time.Since(pa.lastPong) > trustFor {
					delete(p.paths, a)
					if b.byAddr[a] == p {
						delete(b.byAddr, a)
					}
				}
			}
		}
	}
	for k, p := range b.peers {
		if !want[k] {
			for a := range p.paths {
				if b.byAddr[a] == p {
					delete(b.byAddr, a)
				}
			}
			delete(b.peers, k)
		}
	}
	b.mu.Unlock()
	b.poke()
}

// maxRelays bounds the relay connections a node keeps.
const maxRelays = 8

// maxPending and pendingFor bound the packets kept while no path exists.
const (
	maxPending = 8
	pendingFor = 2 * time.Second
)

// onRelayConnect sends what waited for a path over the relay just up.
func (b *Bind) onRelayConnect(rc *relayConn) {
	type flush struct {
		key  key.Public
		pkts [][]byte
	}
	var out []flush
	now := time.Now()
	b.mu.Lock()
	for _, p := range b.peers {
		if len(p.pending) > 0 && now.Sub(p.pendingAt) < pendingFor {
			out = append(out, flush{p.key, p.pending})
			p.txRelay.Add(sizeOf(p.pending))
		}
		p.pending = nil
	}
	b.mu.Unlock()
	for _, f := range out {
		for _, pkt := range f.pkts {
			rc.client.Send(f.key, pkt)
		}
	}
}

// SetRelays keeps one connection to each relay listed (up to maxRelays),
// reusing those that did not change and closing the others.
func (b *Bind) SetRelays(cfgs []RelayConfig) {
	if len(cfgs) > maxRelays {
		cfgs = cfgs[:maxRelays]
	}
	b.mu.Lock()
	if b.shutdown {
		b.mu.Unlock()
		return
	}
	old := map[RelayConfig]*relayConn{}
	for _, rc := range b.relays {
		old[rc.cfg] = rc
	}
	next := make([]*relayConn, 0, len(cfgs))
	for _, cfg := range cfgs {
		if rc := old[cfg]; rc != nil {
			delete(old, cfg)
			next = append(next, rc)
			continue
		}
		rc := &relayConn{cfg: cfg}
		rc.client = relay.NewClient(relay.ClientConfig{
			URL: cfg.URL, Fingerprint: cfg.Fingerprint, RelayKey: cfg.Key, PrivateKey: b.priv,
			Logger:    b.log.With("relay_name", cfg.Name),
			OnPacket:  func(src key.Public, pkt []byte) { b.onRelayPacket(rc, src, pkt) },
			OnConnect: func() { b.onRelayConnect(rc) },
			OnPeerGone: func(dst key.Public) {
				b.mu.Lock()
				if p := b.peers[dst]; p != nil {
					p.gone[rc] = time.Now()
				}
				b.mu.Unlock()
			},
			RetryMin: cfg.RetryMin, RetryMax: cfg.RetryMax,
		})
		rc.client.Start()
		next = append(next, rc)
	}
	b.relays = next
	removed := map[*relayConn]bool{}
	for _, rc := range old {
		removed[rc] = true
	}
	for _, p := range b.peers {
		if removed[p.via] {
			p.via = nil
		}
		for rc := range p.gone {
			if removed[rc] {
				delete(p.gone, rc)
			}
		}
	}
	b.mu.Unlock()
	for rc := range removed {
		rc.client.Close()
	}
}

// SetSTUN sets the STUN servers used to learn the public address.
func (b *Bind) SetSTUN(servers []netip.AddrPort) {
	b.mu.Lock()
	b.stunSrv = slices.Clone(servers)
	b.lastStun = time.Time{}
	b.mu.Unlock()
	b.poke()
}

// PublicAddr is the node's UDP address as STUN saw it, if known.
func (b *Bind) PublicAddr() netip.AddrPort {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.public
}

func (b *Bind) poke() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// loop sends disco pings and STUN requests while the bind is open.
func (b *Bind) loop(done chan struct{}) {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		b.maintain(time.Now())
		select {
		case <-done:
			return
		case <-t.C:
		case <-b.kick:
		}
	}
}

type outgoing struct {
	pkt []byte
	to  *conn.StdNetEndpoint
}

func (b *Bind) maintain(now time.Time) {
	var out []outgoing
	b.mu.Lock()
	for _, p := range b.peers {
		if b.relayOnly {
			continue
		}
		for id, sp := range p.pings {
			if now.Sub(sp.at) > 10*time.Second {
				delete(p.pings, id)
			}
		}
		best := p.best(now)
		if best != nil && now.Sub(p.lastTx) < silentFor && now.Sub(p.lastRx) > silentFor {
			answered := best.lastPong.After(p.probeAt)
			switch {
			case p.probeAt.IsZero() || p.probeAt.Before(p.lastRx) || answered && now.Sub(p.probeAt) > silentFor:
				// Silent while we send: probe the path now (again, if
				// the last probe was answered and the silence goes on).
				p.probeAt = now
				best.lastPing = now
				pkt, _ := b.pingLocked(p, best.addr, false, now)
				out = append(out, outgoing{pkt, best.ep})
			case !answered && now.Sub(p.probeAt) > probeWait:
				b.log.Info("direct path silent; falling back to the relay", "peer", p.name, "addr", best.addr,
					"silent", now.Sub(p.lastRx).Round(time.Millisecond))
				best.lastPong = time.Time{}
				best = nil
			}
		}
		scan := best == nil && now.Sub(p.lastScan) >= searchEvery || now.Sub(p.lastScan) >= rescanEvery
		if scan {
			p.lastScan = now
		}
		for _, pa := range p.paths {
			due := scan || (pa == best && now.Sub(pa.lastPing) >= keepEvery)
			if !due {
				continue
			}
			pa.lastPing = now
			pkt, _ := b.pingLocked(p, pa.addr, false, now)
			out = append(out, outgoing{pkt, pa.ep})
		}
	}
	if len(b.stunSrv) > 0 && now.Sub(b.lastStun) >= stunEvery {
		b.lastStun = now
		for id, at := range b.stunTx {
			if now.Sub(at) > time.Minute {
				delete(b.stunTx, id)
			}
		}
		for _, s := range b.stunSrv {
			var tx [12]byte
			rand.Read(tx[:])
			b.stunTx[tx] = now
			out = append(out, outgoing{stun.Request(tx), &conn.StdNetEndpoint{AddrPort: s}})
		}
	}
	b.mu.Unlock()
	for _, o := range out {
		if err := b.inner.Send([][]byte{o.pkt}, o.to); err != nil {
			b.log.Debug("disco/STUN send failed", "to", o.to.AddrPort, "err", err)
		}
	}
}

// pingLocked records and builds a ping to p over addr (or the relay).
func (b *Bind) pingLocked(p *peer, addr netip.AddrPort, viaRelay bool, now time.Time) ([]byte, [12]byte) {
	m := discoMsg{typ: discoPing}
	rand.Read(m.txid[:])
	p.pings[m.txid] = sentPing{addr: addr, at: now, relay: viaRelay}
	return sealDisco(b.pub, &p.shared, &m), m.txid
}

// handleDisco handles a disco message from src, or over relay rc when rc is
// not nil.
func (b *Bind) handleDisco(pkt []byte, src netip.AddrPort, rc *relayConn) {
	viaRelay := rc != nil
	sender := discoSender(pkt)
	b.mu.Lock()
	p := b.peers[sender]
	if p == nil {
		b.mu.Unlock()
		b.garbage.Add(1)
		return
	}
	m, err := openDisco(pkt, &p.shared)
	if err != nil {
		b.mu.Unlock()
		b.garbage.Add(1)
		return
	}
	now := time.Now()
	var reply []byte
	var pingBack []byte
	var pa *path
	switch m.typ {
	case discoPing:
		pong := discoMsg{typ: discoPong, txid: m.txid, observed: src}
		reply = sealDisco(b.pub, &p.shared, &pong)
		if !viaRelay {
			// A ping from an address we did not know is a path the peer
			// found (peer-reflexive, through its NAT): learn it and prove it
			// from our side too.
			pa = p.paths[src]
			if pa == nil {
				pa = &path{addr: src, ep: &conn.StdNetEndpoint{AddrPort: src}}
				p.paths[src] = pa
				b.byAddr[src] = p
			}
			if p.best(now) == nil && now.Sub(pa.lastPing) > time.Second/2 {
				pa.lastPing = now
				pingBack, _ = b.pingLocked(p, src, false, now)
			}
		}
	case discoPong:
		sp, ok := p.pings[m.txid]
		if !ok {
			break
		}
		delete(p.pings, m.txid)
		rtt := now.Sub(sp.at)
		res := PingResult{Peer: p.name, RTT: rtt, Relay: viaRelay}
		if viaRelay {
			res.RelayName = rc.cfg.Name
		}
		if !viaRelay && sp.addr == src {
			pa = p.paths[src]
			if pa != nil {
				was := p.best(now)
				pa.lastPong, pa.rtt = now, rtt
				b.byAddr[src] = p
				if was == nil {
					b.log.Info("direct path up", "peer", p.name, "addr", src, "rtt", rtt.Round(time.Microsecond))
				}
			}
			res.Addr = src
		}
		if w := b.waiters[m.txid]; w != nil {
			select {
			case w <- res:
			default:
			}
		}
	}
	b.mu.Unlock()
	if reply != nil {
		if viaRelay {
			rc.client.Send(sender, reply)
		} else {
			b.inner.Send([][]byte{reply}, &conn.StdNetEndpoint{AddrPort: src})
		}
	}
	if pingBack != nil {
		b.inner.Send([][]byte{pingBack}, pa.ep)
	}
}

func (b *Bind) handleSTUN(pkt []byte, src netip.AddrPort) {
	tx, addr, err := stun.ParseResponse(pkt)
	if err != nil {
		b.garbage.Add(1)
		b.log.Debug("bad STUN response", "from", src, "err", err)
		return
	}
	b.mu.Lock()
	_, ours := b.stunTx[tx]
	delete(b.stunTx, tx)
	changed := ours && addr != b.public
	if changed {
		b.public = addr
	}
	cb := b.onAddr
	b.mu.Unlock()
	if changed {
		b.log.Info("public UDP address (STUN)", "addr", addr, "server", src)
		if cb != nil {
			cb(addr)
		}
	}
}

// PingResult is one pong.
type PingResult struct {
	Peer  string
	Addr  netip.AddrPort // direct path, or invalid for the relay
	Relay bool
	// RelayName names the relay the pong came over.
	RelayName string
	RTT       time.Duration
}

// Ping sends one disco ping to the peer over every known direct address and
// over the relay, and returns the pongs that arrive before ctx ends.
func (b *Bind) Ping(ctx context.Context, k key.Public) ([]PingResult, error) {
	b.mu.Lock()
	p := b.peers[k]
	if p == nil {
		b.mu.Unlock()
		return nil, errors.New("not a peer of this node")
	}
	now := time.Now()
	ch := make(chan PingResult, len(p.paths)+1)
	var out []outgoing
	var relayPkt []byte
	var ids [][12]byte
	for _, pa := range p.paths {
		if b.relayOnly {
			break
		}
		pkt, id := b.pingLocked(p, pa.addr, false, now)
		ids = append(ids, id)
		out = append(out, outgoing{pkt, pa.ep})
	}
	var r *relay.Client
	if rc := b.relayFor(p, now); rc != nil {
		r = rc.client
		var id [12]byte
		relayPkt, id = b.pingLocked(p, netip.AddrPort{}, true, now)
		ids = append(ids, id)
	}
	for _, id := range ids {
		b.waiters[id] = ch
	}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		for _, id := range ids {
			delete(b.waiters, id)
		}
		b.mu.Unlock()
	}()
	for _, o := range out {
		b.inner.Send([][]byte{o.pkt}, o.to)
	}
	if relayPkt != nil {
		r.Send(k, relayPkt)
	}
	var res []PingResult
	for len(res) < len(ids) {
		select {
		case pr := <-ch:
			res = append(res, pr)
		case <-ctx.Done():
			return res, nil
		}
	}
	return res, nil
}

// PeerPath describes how a peer is reached right now.
type PeerPath struct {
	// Path is "direct", "relay" or "none".
	Path string
	Addr netip.AddrPort
	// Relay names the relay used (or to be used) for the peer.
	Relay      string
	RelayURL   string
	RTT        time.Duration
	Candidates []netip.AddrPort
	TxDirect   uint64
	RxDirect   uint64
	TxRelay    uint64
	RxRelay    uint64
}

// Path reports the current path to a peer.
func (b *Bind) Path(k key.Public) PeerPath {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.peers[k]
	if p == nil {
		return PeerPath{Path: "none"}
	}
	now := time.Now()
	pp := PeerPath{Path: "none", TxDirect: p.txDirect.Load(), RxDirect: p.rxDirect.Load(), TxRelay: p.txRelay.Load(), RxRelay: p.rxRelay.Load()}
	rc := b.relayFor(p, now)
	if rc != nil {
		pp.Relay, pp.RelayURL = rc.cfg.Name, rc.cfg.URL
	}
	if b.relayOnly {
		if rc != nil {
			pp.Path = "relay"
		}
		return pp
	}
	for a := range p.paths {
		pp.Candidates = append(pp.Candidates, a)
	}
	sort.Slice(pp.Candidates, func(i, j int) bool { return pp.Candidates[i].String() < pp.Candidates[j].String() })
	if pa := p.best(now); pa != nil {
		pp.Path, pp.Addr, pp.RTT = "direct", pa.addr, pa.rtt
	} else if rc != nil {
		pp.Path = "relay"
	}
	return pp
}

// RelayStatus is one relay connection.
type RelayStatus struct {
	Name, URL string
	Connected bool
	Stats     relay.ClientStats
}

// Relays reports the relay connections, in order of preference.
func (b *Bind) Relays() []RelayStatus {
	b.mu.Lock()
	rs := slices.Clone(b.relays)
	b.mu.Unlock()
	out := make([]RelayStatus, 0, len(rs))
	for _, rc := range rs {
		out = append(out, RelayStatus{Name: rc.cfg.Name, URL: rc.cfg.URL, Connected: rc.client.Connected(), Stats: rc.client.Stats()})
	}
	return out
}

var _ conn.Bind = (*Bind)(nil)
