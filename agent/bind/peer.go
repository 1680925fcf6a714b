package bind

import (
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/nacl/box"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/internal/key"
)

// Timing of path discovery. A direct path is trusted while pongs keep
// coming; past trustFor without one, traffic falls back to the relay.
const (
	searchEvery = 2 * time.Second  // ping all candidates while no path is known
	keepEvery   = 3 * time.Second  // ping the chosen path to keep it (and the NAT) alive
	rescanEvery = 30 * time.Second // ping the others now and then for a better path
	trustFor    = 7 * time.Second
	pingsFor    = 10 * time.Second // an unanswered ping is forgotten after this

	// A peer we keep sending to that has sent nothing back over the direct
	// path for silentFor (TCP would have acknowledged) is probed at once;
	// without a pong within probeWait the path is dropped, sooner than
	// trustFor, so open connections move to the relay before TCP's
	// retransmission timer has backed off far.
	silentFor = 1500 * time.Millisecond
	probeWait = time.Second

	// A candidate that has never answered is pinged at doubling intervals
	// (up to maxBackoff) once freeMisses pings went unanswered: an address
	// someone published that is not the peer's is not pinged for ever at
	// the search rate. A path that once answered keeps the search rate, so
	// it is found again within searchEvery when it comes back.
	freeMisses = 4
	maxBackoff = 8 * time.Second

	// maxMapEndpoints bounds the candidates the network map gives a peer.
	maxMapEndpoints = 32
)

// PeerConfig is what the network map says about a peer.
type PeerConfig struct {
	Key       key.Public
	Name      string
	Endpoints []netip.AddrPort
}

// peer is the bind's state for one peer. Its plain fields are guarded by
// Bind.mu; key, ep and shared are set once when it is made; the byte
// counters are atomic.
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
	// viaProbeAt is when we last pinged the peer over a relay its packets
	// came over that is not via (onRelayPacket).
	viaProbeAt time.Time
	// pending holds the last packets sent while no path at all existed
	// (the first handshake of a fresh agent, before its relays connect),
	// flushed when a relay comes up instead of waiting for WireGuard's 5 s
	// handshake retry.
	pending   [][]byte
	pendingAt time.Time
	// unconfirmed holds the last packets sent over unconfirmedVia while no
	// relay is confirmed for the peer (via is nil): if that relay answers
	// that the peer is not on it, they go again over the next one at once,
	// instead of waiting for WireGuard's 5 s handshake retry. A relay is
	// confirmed only by an authenticated disco message, never by a frame
	// claiming the peer's key.
	unconfirmed    [][]byte
	unconfirmedVia *relayConn
	unconfirmedAt  time.Time

	// replay refuses disco messages seen before; unknownCredit and
	// unknownAt are the budget of answers to pings from new addresses.
	replay        replayWindow
	unknownCredit int
	unknownAt     time.Time

	lastScan time.Time
	// lastRx and lastTx are when data last came from and went to the peer
	// over a direct path; probeAt when the peer went silent and was probed.
	lastRx, lastTx, probeAt time.Time

	txDirect, rxDirect, txRelay, rxRelay atomic.Uint64
}

// path is one candidate direct address of a peer; addr and ep are set once,
// the rest is guarded by Bind.mu.
type path struct {
	addr     netip.AddrPort
	ep       *conn.StdNetEndpoint
	fromMap  bool // the network map lists it (else learnt from a ping)
	lastPing time.Time
	lastPong time.Time
	rtt      time.Duration
	misses   int  // pings sent since the last pong
	proven   bool // it answered once
}

// backedOff reports whether a scan skips pa now: it never answered and
// freeMisses pings went unanswered, and its doubling wait is not over.
func (pa *path) backedOff(now time.Time) bool {
	if pa.proven || pa.misses < freeMisses {
		return false
	}
	wait := min(searchEvery<<min(pa.misses-freeMisses+1, 8), maxBackoff)
	return now.Sub(pa.lastPing) < wait
}

func newPath(a netip.AddrPort) *path {
	return &path{addr: a, ep: &conn.StdNetEndpoint{AddrPort: a}}
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

// directRx notes WireGuard data from src over a direct path and returns the
// peer it came from, or nil.
func (b *Bind) directRx(src netip.AddrPort, now time.Time) *peer {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.byAddr[src]
	if p != nil {
		p.lastRx = now
	}
	return p
}

// mapEndpoints returns the endpoints of p's addresses from the network map,
// to which packets go while no direct path is proven.
func (b *Bind) mapEndpoints(p *peer) []*conn.StdNetEndpoint {
	b.mu.Lock()
	defer b.mu.Unlock()
	var eps []*conn.StdNetEndpoint
	for _, pa := range p.paths {
		if pa.fromMap {
			eps = append(eps, pa.ep)
		}
	}
	return eps
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
		eps := pc.Endpoints
		if len(eps) > maxMapEndpoints {
			eps = eps[:maxMapEndpoints]
		}
		fresh := false
		for _, a := range eps {
			a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
			if !a.IsValid() || a.Port() == 0 {
				continue
			}
			inMap[a] = true
			if p.paths[a] == nil {
				p.paths[a] = newPath(a)
				// A new candidate (the peer's fresh STUN address, say)
				// is tried at once: the peer is punching towards us now.
				p.lastScan = time.Time{}
				fresh = true
			}
			p.paths[a].fromMap = true
			b.byAddr[a] = p
		}
		for a, pa := range p.paths {
			if !inMap[a] {
				if pa.fromMap && fresh {
					// The map listed it and now lists other addresses in
					// its place: the peer moved (it restarted on another
					// port, say). Its old path is not trusted any more,
					// so packets go to the new addresses and the relay
					// at once instead of into the old one until it has
					// been silent for seconds; a pong makes it good again.
					pa.lastPong = time.Time{}
				}
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

// maintainPeerLocked appends to out the pings due to p now: the silence
// probe of its best path (dropping that path when the probe goes
// unanswered), the keep-alive of the best path, and a scan of all
// candidates while none is trusted or now and then for a better one.
// Caller holds b.mu.
func (b *Bind) maintainPeerLocked(p *peer, now time.Time, out []outgoing) []outgoing {
	for id, sp := range p.pings {
		if now.Sub(sp.at) > pingsFor {
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
			pkt, _ := b.pingLocked(p, best.addr, nil, now)
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
		due := scan && !pa.backedOff(now) || (pa == best && now.Sub(pa.lastPing) >= keepEvery)
		if !due {
			continue
		}
		pa.lastPing = now
		pkt, _ := b.pingLocked(p, pa.addr, nil, now)
		out = append(out, outgoing{pkt, pa.ep})
	}
	return out
}
