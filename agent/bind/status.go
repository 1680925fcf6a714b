package bind

import (
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
)

// PingResult is one pong.
type PingResult struct {
	Peer  string
	Addr  netip.AddrPort // direct path, or invalid for the relay
	Relay bool
	// RelayName names the relay the pong came over.
	RelayName string
	RTT       time.Duration
}

// PathKind is how a peer is reached. Its String is the word `meshlink
// status` and the local API show.
type PathKind uint8

const (
	PathNone   PathKind = iota // no path: "none"
	PathDirect                 // a direct UDP path: "direct"
	PathRelay                  // over a relay: "relay"
)

func (k PathKind) String() string {
	switch k {
	case PathDirect:
		return "direct"
	case PathRelay:
		return "relay"
	}
	return "none"
}

// MarshalText makes a PathKind read as its String in JSON and logs.
func (k PathKind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// PeerPath describes how a peer is reached right now.
type PeerPath struct {
	Path PathKind
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
		return PeerPath{Path: PathNone}
	}
	now := time.Now()
	pp := PeerPath{Path: PathNone, TxDirect: p.txDirect.Load(), RxDirect: p.rxDirect.Load(), TxRelay: p.txRelay.Load(), RxRelay: p.rxRelay.Load()}
	rc := b.relayFor(p, now)
	if rc != nil {
		pp.Relay, pp.RelayURL = rc.cfg.Name, rc.cfg.URL
	}
	if b.relayOnly {
		if rc != nil {
			pp.Path = PathRelay
		}
		return pp
	}
	for a := range p.paths {
		pp.Candidates = append(pp.Candidates, a)
	}
	sort.Slice(pp.Candidates, func(i, j int) bool { return pp.Candidates[i].String() < pp.Candidates[j].String() })
	if pa := p.best(now); pa != nil {
		pp.Path, pp.Addr, pp.RTT = PathDirect, pa.addr, pa.rtt
	} else if rc != nil {
		pp.Path = PathRelay
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

// DropStats counts input the bind refused, by reason.
type DropStats struct {
	// Garbage: disco or STUN packets that did not decode or authenticate.
	Garbage uint64
	// Replayed: disco messages seen before (a capture sent again).
	Replayed uint64
	// Limited: pings from addresses not among the peer's paths, beyond the
	// answers the peer is allowed.
	Limited uint64
	// Foreign: packets a relay said came from a key that is not our peer.
	Foreign uint64
}

// Drops reports what the bind refused so far.
func (b *Bind) Drops() DropStats {
	return DropStats{Garbage: b.garbage.Load(), Replayed: b.replayed.Load(), Limited: b.limited.Load(), Foreign: b.foreign.Load()}
}
