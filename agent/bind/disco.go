package bind

import (
	"context"
	"crypto/rand"
	"errors"
	"net/netip"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/internal/key"
)

// The ping/pong engine over the messages of discomsg.go: pings go out from
// the maintenance loop (peer.go) and from Ping; a pong proves a direct path
// and measures it; a ping from an unknown address is answered and pinged
// back, and becomes a path once it answers.

// sentPing is a ping awaiting its pong, by txid in peer.pings.
type sentPing struct {
	addr  netip.AddrPort // invalid for the relay
	at    time.Time
	relay *relayConn // the relay it went over, or nil
}

// What a peer — or anyone replaying its messages from other source
// addresses — can make us do is bounded: an address not among the peer's
// paths is answered (a pong and a ping of ours, to prove it) only while the
// peer's budget lasts, and becomes a path only once it answers that ping;
// at most maxLearned such learnt paths are kept per peer.
const (
	maxLearned   = 8
	unknownBurst = 8
	unknownEvery = 500 * time.Millisecond // one more answer to a new address per this
)

// sealLocked seals m to p, stamped with our clock (strictly increasing, as
// the peer's replay window wants). Caller holds b.mu.
func (b *Bind) sealLocked(p *peer, m *discoMsg, now time.Time) []byte {
	st := uint64(now.UnixNano())
	if st <= b.lastStamp {
		st = b.lastStamp + 1
	}
	b.lastStamp = st
	m.stamp = st
	return sealDisco(b.pub, &p.shared, m)
}

// pingLocked records and builds a ping to p over addr, or over relay rc
// when rc is not nil. Caller holds b.mu.
func (b *Bind) pingLocked(p *peer, addr netip.AddrPort, rc *relayConn, now time.Time) ([]byte, [12]byte) {
	m := discoMsg{typ: discoPing}
	rand.Read(m.txid[:])
	p.pings[m.txid] = sentPing{addr: addr, at: now, relay: rc}
	if pa := p.paths[addr]; pa != nil && rc == nil {
		pa.misses++
	}
	return b.sealLocked(p, &m, now), m.txid
}

// unknownAllowedLocked takes one answer to a new address from p's budget.
// Caller holds b.mu.
func (p *peer) unknownAllowedLocked(now time.Time) bool {
	if p.unknownAt.IsZero() {
		p.unknownCredit, p.unknownAt = unknownBurst, now
	}
	if n := int(now.Sub(p.unknownAt) / unknownEvery); n > 0 {
		p.unknownCredit += n
		p.unknownAt = p.unknownAt.Add(time.Duration(n) * unknownEvery)
		if p.unknownCredit >= unknownBurst {
			p.unknownCredit, p.unknownAt = unknownBurst, now
		}
	}
	if p.unknownCredit == 0 {
		return false
	}
	p.unknownCredit--
	return true
}

// learnLocked adds src, which answered our ping, as a path of p, evicting
// the least recently ponged learnt path beyond maxLearned. Caller holds b.mu.
func (b *Bind) learnLocked(p *peer, src netip.AddrPort) *path {
	var oldest *path
	n := 0
	for _, pa := range p.paths {
		if pa.fromMap {
			continue
		}
		n++
		if oldest == nil || pa.lastPong.Before(oldest.lastPong) {
			oldest = pa
		}
	}
	if n >= maxLearned && oldest != nil {
		delete(p.paths, oldest.addr)
		if b.byAddr[oldest.addr] == p {
			delete(b.byAddr, oldest.addr)
		}
	}
	pa := newPath(src)
	p.paths[src] = pa
	return pa
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
	if !p.replay.accept(m.stamp) {
		b.mu.Unlock()
		b.replayed.Add(1)
		return
	}
	now := time.Now()
	var reply []byte
	var pingBack []byte
	var pingTo *conn.StdNetEndpoint
	switch m.typ {
	case discoPing:
		if viaRelay {
			// An authenticated, fresh ping over rc: the peer is there.
			b.viaLocked(p, rc)
			reply = b.sealLocked(p, &discoMsg{typ: discoPong, txid: m.txid, observed: src}, now)
			break
		}
		pa := p.paths[src]
		if pa == nil {
			// A ping from an address we did not know may be a path the
			// peer found (peer-reflexive, through its NAT), or a replay
			// or spoof aimed at someone else: answer within the budget,
			// and learn it only when it answers our ping.
			if !p.unknownAllowedLocked(now) {
				b.limited.Add(1)
				break
			}
			reply = b.sealLocked(p, &discoMsg{typ: discoPong, txid: m.txid, observed: src}, now)
			pingBack, _ = b.pingLocked(p, src, nil, now)
			pingTo = &conn.StdNetEndpoint{AddrPort: src}
			break
		}
		reply = b.sealLocked(p, &discoMsg{typ: discoPong, txid: m.txid, observed: src}, now)
		if p.best(now) == nil && now.Sub(pa.lastPing) > time.Second/2 {
			pa.lastPing = now
			pingBack, _ = b.pingLocked(p, src, nil, now)
			pingTo = pa.ep
		}
	case discoPong:
		sp, ok := p.pings[m.txid]
		if !ok {
			break
		}
		delete(p.pings, m.txid)
		if sp.relay != rc {
			break // a pong to a ping sent another way
		}
		if viaRelay {
			b.viaLocked(p, rc)
		}
		rtt := now.Sub(sp.at)
		res := PingResult{Peer: p.name, RTT: rtt, Relay: viaRelay}
		if viaRelay {
			res.RelayName = rc.cfg.Name
		}
		if !viaRelay && sp.addr == src {
			pa := p.paths[src]
			if pa == nil {
				pa = b.learnLocked(p, src)
			}
			was := p.best(now)
			pa.lastPong, pa.rtt, pa.misses, pa.proven = now, rtt, 0, true
			b.byAddr[src] = p
			if was == nil {
				b.log.Info("direct path up", "peer", p.name, "addr", src, "rtt", rtt.Round(time.Microsecond))
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
		b.inner.Send([][]byte{pingBack}, pingTo)
	}
}

// Ping sends one disco ping to the peer over every known direct address and
// over the relay, and returns the pongs that arrive before ctx ends.
func (b *Bind) Ping(ctx context.Context, k key.Public) ([]PingResult, error) {
	return b.PingUntil(ctx, k, nil)
}

// PingUntil is Ping that returns as soon as enough(the pongs so far) is
// true, rather than waiting for every path (a relay that will not answer
// holds Ping until ctx ends). A nil enough waits for every path.
func (b *Bind) PingUntil(ctx context.Context, k key.Public, enough func([]PingResult) bool) ([]PingResult, error) {
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
		pkt, id := b.pingLocked(p, pa.addr, nil, now)
		ids = append(ids, id)
		out = append(out, outgoing{pkt, pa.ep})
	}
	var r RelayClient
	if rc := b.relayFor(p, now); rc != nil {
		r = rc.client
		var id [12]byte
		relayPkt, id = b.pingLocked(p, netip.AddrPort{}, rc, now)
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
			if enough != nil && enough(res) {
				return res, nil
			}
		case <-ctx.Done():
			return res, nil
		}
	}
	return res, nil
}
