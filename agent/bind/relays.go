package bind

import (
	"errors"
	"golang.org/x/crypto/nacl/box"
	"net/netip"
	"slices"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
)

// RelayConfig is one relay of the network map.
type RelayConfig struct {
	Name, URL, Fingerprint string
	// Key is the relay's public key, to which the node proves its own.
	Key key.Public
	// RetryMin and RetryMax bound the reconnect backoff (0: defaults).
	RetryMin, RetryMax time.Duration
}

// RelayClient is what the bind needs of one relay connection; *relay.Client
// is the real one (Config.NewRelayClient).
//
// The client is made from a relay.ClientConfig whose OnPacket, OnConnect
// and OnPeerGone the bind sets. Contract, as relay.Client keeps it: nothing
// happens before Start; the callbacks run on the client's own goroutines,
// never inside a call the bind makes to it, and none runs after Close
// returns; OnConnect runs each time a connection is up and Send works;
// OnPeerGone when the relay says a destination is not connected to it;
// OnPacket's pkt is valid only during the call. Send never blocks: it
// queues a copy or fails. Close is idempotent.
type RelayClient interface {
	Start()
	Send(dst key.Public, pkt []byte) error
	Connected() bool
	Stats() relay.ClientStats
	Close() error
}

var _ RelayClient = (*relay.Client)(nil)

// relayConn is one relay the bind keeps a connection to. Both fields are set
// once; its identity is the key of peer.gone.
type relayConn struct {
	cfg    RelayConfig
	client RelayClient
}

// goneFor is how long a relay that said a peer is not connected to it is
// passed over for that peer (another relay is tried meanwhile).
const goneFor = 5 * time.Second

// maxRelays bounds the relay connections a node keeps.
const maxRelays = 8

// maxPending and pendingFor bound the packets kept while no path exists.
const (
	maxPending = 8
	pendingFor = 2 * time.Second
)

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

// viaProbeEvery bounds the pings sent over a relay to confirm that a peer
// really is there when its packets arrive over another relay than before.
const viaProbeEvery = time.Second

// onRelayPacket is the relay clients' OnPacket. A relay can claim any
// source key, so packets from keys that are not our peers are dropped, and
// a peer's packets arriving over another relay do not move the peer's
// replies there until that relay carries an authenticated disco message of
// the peer (a pong to the ping sent here, or a ping of the peer's).
func (b *Bind) onRelayPacket(rc *relayConn, src key.Public, pkt []byte) {
	if isDisco(pkt) {
		b.handleDisco(pkt, netip.AddrPort{}, rc)
		return
	}
	var probe []byte
	now := time.Now()
	b.mu.Lock()
	p := b.peers[src]
	if p != nil {
		p.rxRelay.Add(uint64(len(pkt)))
		if p.via != rc && now.Sub(p.viaProbeAt) >= viaProbeEvery {
			p.viaProbeAt = now
			probe, _ = b.pingLocked(p, netip.AddrPort{}, rc, now)
		}
	}
	b.mu.Unlock()
	if p == nil {
		b.foreign.Add(1)
		return
	}
	if probe != nil {
		rc.client.Send(src, probe)
	}
	select {
	case b.relayCh <- relayPacket{src: src, pkt: slices.Clone(pkt)}:
	default:
		// WireGuard is not keeping up; drop like a full NIC queue would.
	}
}

// viaLocked makes rc the relay replies to p go over: rc just carried an
// authenticated message of p's. Caller holds b.mu.
func (b *Bind) viaLocked(p *peer, rc *relayConn) {
	if p.via != rc {
		p.via = rc
		delete(p.gone, rc)
	}
}

// onPeerGone is the relay clients' OnPeerGone: rc is passed over for dst
// for goneFor.
func (b *Bind) onPeerGone(rc *relayConn, dst key.Public) {
	now := time.Now()
	var resend [][]byte
	var next *relayConn
	b.mu.Lock()
	if p := b.peers[dst]; p != nil {
		p.gone[rc] = now
		if p.unconfirmedVia == rc && now.Sub(p.unconfirmedAt) < pendingFor {
			if next = b.relayFor(p, now); next != nil && next != rc {
				resend = p.unconfirmed
				p.txRelay.Add(sizeOf(resend))
			}
		}
		p.unconfirmed, p.unconfirmedVia = nil, nil
	}
	b.mu.Unlock()
	for _, pkt := range resend {
		next.client.Send(dst, pkt)
	}
}

// keepUnconfirmed remembers the last packets sent over rc while no relay
// is confirmed for p (see peer.unconfirmed). The caller holds b.mu.
func (p *peer) keepUnconfirmed(rc *relayConn, bufs [][]byte, now time.Time) {
	if p.unconfirmedVia != rc {
		p.unconfirmed = p.unconfirmed[:0]
	}
	for _, buf := range bufs {
		if len(p.unconfirmed) == maxPending {
			p.unconfirmed = p.unconfirmed[1:]
		}
		p.unconfirmed = append(p.unconfirmed, slices.Clone(buf))
	}
	p.unconfirmedVia, p.unconfirmedAt = rc, now
}

// holdPending keeps bufs for p, which has no path at all, until a relay
// connects (onRelayConnect); without any relay configured it fails.
func (b *Bind) holdPending(p *peer, bufs [][]byte, now time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.relays) == 0 {
		return errors.New("bind: no path to peer (no direct address and no relay)")
	}
	for _, buf := range bufs {
		if len(p.pending) == maxPending {
			p.pending = p.pending[1:]
		}
		p.pending = append(p.pending, slices.Clone(buf))
	}
	p.pendingAt = now
	return nil
}

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
		rc.client = b.newRelay(relay.ClientConfig{
			URL: cfg.URL, Fingerprint: cfg.Fingerprint, RelayKey: cfg.Key, PrivateKey: b.priv,
			Logger:     b.log.With("relay_name", cfg.Name),
			OnPacket:   func(src key.Public, pkt []byte) { b.onRelayPacket(rc, src, pkt) },
			OnConnect:  func() { b.onRelayConnect(rc) },
			OnPeerGone: func(dst key.Public) { b.onPeerGone(rc, dst) },
			RetryMin:   cfg.RetryMin, RetryMax: cfg.RetryMax,
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

// SetPrivateKey switches the bind to a new node key (a rotation): disco
// messages are sealed with it from now on, and every relay connection is
// opened again, authenticated by the new key (the relay serves the node
// under its new key only).
func (b *Bind) SetPrivateKey(k key.Private) {
	b.mu.Lock()
	if b.shutdown {
		b.mu.Unlock()
		return
	}
	b.priv, b.pub = k, k.Public()
	priv := k.Raw()
	for _, p := range b.peers {
		peerPub := p.key.Raw()
		box.Precompute(&p.shared, &peerPub, &priv)
	}
	cfgs := make([]RelayConfig, 0, len(b.relays))
	for _, rc := range b.relays {
		cfgs = append(cfgs, rc.cfg)
	}
	b.mu.Unlock()
	// Closing them all, then listing them again, makes SetRelays open a
	// fresh connection to each with the new key.
	b.SetRelays(nil)
	b.SetRelays(cfgs)
}
