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
// and measures it; a ping from an unknown address teaches a new path.

// sentPing is a ping awaiting its pong, by txid in peer.pings.
type sentPing struct {
	addr  netip.AddrPort // invalid for the relay
	at    time.Time
	relay bool
}

// pingLocked records and builds a ping to p over addr (or the relay).
// Caller holds b.mu.
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
				pa = newPath(src)
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
	var r RelayClient
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
