package bind

import (
	"crypto/rand"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/stun"
)

// stunEvery is how often the public address is asked again.
const stunEvery = 23 * time.Second

// stunState is the STUN client's part of the bind, guarded by Bind.mu.
type stunState struct {
	servers []netip.AddrPort
	tx      map[[12]byte]time.Time // requests in flight, by transaction ID
	last    time.Time              // when requests last went out
	public  netip.AddrPort         // the address the servers saw
}

// SetSTUN sets the STUN servers used to learn the public address.
func (b *Bind) SetSTUN(servers []netip.AddrPort) {
	b.mu.Lock()
	b.stun.servers = slices.Clone(servers)
	b.stun.last = time.Time{}
	b.mu.Unlock()
	b.poke()
}

// PublicAddr is the node's UDP address as STUN saw it, if known.
func (b *Bind) PublicAddr() netip.AddrPort {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stun.public
}

// stunDueLocked appends to out the STUN requests due now. Caller holds b.mu.
func (b *Bind) stunDueLocked(now time.Time, out []outgoing) []outgoing {
	s := &b.stun
	if len(s.servers) == 0 || now.Sub(s.last) < stunEvery {
		return out
	}
	s.last = now
	for id, at := range s.tx {
		if now.Sub(at) > time.Minute {
			delete(s.tx, id)
		}
	}
	for _, srv := range s.servers {
		var tx [12]byte
		rand.Read(tx[:])
		s.tx[tx] = now
		out = append(out, outgoing{stun.Request(tx), &conn.StdNetEndpoint{AddrPort: srv}})
	}
	return out
}

// handleSTUN takes a STUN response from src: an answer to one of our
// requests that gives a new address is published (Config.OnPublicAddr).
func (b *Bind) handleSTUN(pkt []byte, src netip.AddrPort) {
	tx, addr, err := stun.ParseResponse(pkt)
	if err != nil {
		b.garbage.Add(1)
		b.log.Debug("bad STUN response", "from", src, "err", err)
		return
	}
	b.mu.Lock()
	_, ours := b.stun.tx[tx]
	delete(b.stun.tx, tx)
	changed := ours && addr != b.stun.public
	if changed {
		b.stun.public = addr
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
