// Package wgcfg is the agent's WireGuard configuration as typed values and
// its text form in wireguard-go's UAPI: a whole Config for a fresh device,
// the minimal update from one Config to the next, and the parse of the
// device's "get" output (ports, peers, counters).
package wgcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshlink/meshlink/internal/key"
)

// Config is one WireGuard device's configuration.
type Config struct {
	// PrivateKey is the device's key; zero leaves it unchanged in a Diff.
	PrivateKey key.Private
	// ListenPort is the UDP port; 0 asks for a free one in ToUAPI and
	// leaves the port unchanged in a Diff.
	ListenPort uint16
	// Peers in any order; keys are unique.
	Peers []Peer
}

// Peer is one WireGuard peer.
type Peer struct {
	PublicKey  key.Public
	AllowedIPs []netip.Prefix
	// Endpoint is the UAPI endpoint string handed to the device's bind
	// (meshlink's bind parses its own virtual endpoints); "" sets none.
	Endpoint string
}

// Equal reports whether two peers are configured alike. The order of
// allowed IPs does not matter.
func (p Peer) Equal(o Peer) bool {
	return p.PublicKey == o.PublicKey && p.Endpoint == o.Endpoint && samePrefixes(p.AllowedIPs, o.AllowedIPs)
}

// Clone returns a deep copy.
func (c *Config) Clone() Config {
	out := Config{PrivateKey: c.PrivateKey, ListenPort: c.ListenPort, Peers: make([]Peer, len(c.Peers))}
	for i, p := range c.Peers {
		p.AllowedIPs = slices.Clone(p.AllowedIPs)
		out.Peers[i] = p
	}
	return out
}

// ToUAPI is the whole config as one UAPI "set": it replaces every peer the
// device had.
func (c *Config) ToUAPI() string {
	var b strings.Builder
	if !c.PrivateKey.IsZero() {
		fmt.Fprintf(&b, "private_key=%s\n", c.PrivateKey.UAPI())
	}
	fmt.Fprintf(&b, "listen_port=%d\n", c.ListenPort)
	b.WriteString("replace_peers=true\n")
	for _, p := range sortedPeers(c.Peers) {
		writePeer(&b, p, true)
	}
	return b.String()
}

// Diff is the minimal UAPI "set" that turns a device configured with prev
// into one configured with next: removed peers are removed, new peers are
// added whole, and a changed peer gets what changed. It is "" when nothing
// changed. Peers are written in key order, so the text is deterministic.
func Diff(prev, next *Config) string {
	var b strings.Builder
	if !next.PrivateKey.IsZero() && !next.PrivateKey.Equal(prev.PrivateKey) {
		fmt.Fprintf(&b, "private_key=%s\n", next.PrivateKey.UAPI())
	}
	if next.ListenPort != 0 && next.ListenPort != prev.ListenPort {
		fmt.Fprintf(&b, "listen_port=%d\n", next.ListenPort)
	}
	old := map[key.Public]Peer{}
	for _, p := range prev.Peers {
		old[p.PublicKey] = p
	}
	want := map[key.Public]bool{}
	for _, p := range next.Peers {
		want[p.PublicKey] = true
	}
	for _, p := range sortedPeers(prev.Peers) {
		if !want[p.PublicKey] {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", p.PublicKey.UAPI())
		}
	}
	for _, p := range sortedPeers(next.Peers) {
		o, had := old[p.PublicKey]
		switch {
		case !had:
			writePeer(&b, p, true)
		case !o.Equal(p):
			writePeer(&b, p, o.Endpoint != p.Endpoint)
		}
	}
	return b.String()
}

// writePeer writes one peer's section. There is no persistent keepalive:
// it makes both sides initiate a handshake the moment they learn of each
// other, the two initiations cross and each invalidates the other, costing
// a 5 s rekey timeout before the first packet gets through. Handshakes are
// started by traffic.
func writePeer(b *strings.Builder, p Peer, endpoint bool) {
	fmt.Fprintf(b, "public_key=%s\n", p.PublicKey.UAPI())
	if endpoint && p.Endpoint != "" {
		fmt.Fprintf(b, "endpoint=%s\n", p.Endpoint)
	}
	b.WriteString("replace_allowed_ips=true\n")
	for _, ip := range p.AllowedIPs {
		fmt.Fprintf(b, "allowed_ip=%s\n", ip)
	}
}

func sortedPeers(ps []Peer) []Peer {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b Peer) int { return a.PublicKey.Compare(b.PublicKey) })
	return out
}

func samePrefixes(a, b []netip.Prefix) bool {
	if len(a) != len(b) {
		return false
	}
	cmp := func(x, y netip.Prefix) int {
		if c := x.Addr().Compare(y.Addr()); c != 0 {
			return c
		}
		return x.Bits() - y.Bits()
	}
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(a, b)
}

// Device is what a device reports of itself in a UAPI "get". The private
// key it also reports is skipped, so it is never held or logged here.
type Device struct {
	ListenPort uint16
	Peers      []PeerStatus // in the device's order
}

// PeerStatus is one peer of a UAPI "get".
type PeerStatus struct {
	Peer
	LastHandshake time.Time // zero: never
	RxBytes       uint64
	TxBytes       uint64
}

// Config returns the peers part of what the device reports, as a Config
// (no private key).
func (d *Device) Config() Config {
	c := Config{ListenPort: d.ListenPort}
	for _, p := range d.Peers {
		p.AllowedIPs = slices.Clone(p.AllowedIPs)
		c.Peers = append(c.Peers, p.Peer)
	}
	return c
}

// Parse reads the output of wireguard-go's IpcGet. Unknown keys are
// skipped, as are lines without "="; a malformed value of a known key is
// an error.
func Parse(get string) (Device, error) {
	var d Device
	var cur *PeerStatus
	var sec, nsec int64
	seen := map[key.Public]bool{}
	flush := func() {
		if cur != nil && (sec != 0 || nsec != 0) {
			cur.LastHandshake = time.Unix(sec, nsec)
		}
		sec, nsec = 0, 0
	}
	for _, line := range strings.Split(get, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		var err error
		switch k {
		case "listen_port":
			var p uint64
			p, err = strconv.ParseUint(v, 10, 16)
			d.ListenPort = uint16(p)
		case "public_key":
			flush()
			var pk key.Public
			if pk, err = key.ParsePublicUAPI(v); err != nil {
				return d, fmt.Errorf("wgcfg: public_key: %w", err)
			}
			if seen[pk] {
				return d, fmt.Errorf("wgcfg: peer %s listed twice", pk.Short())
			}
			seen[pk] = true
			// cur points into d.Peers; taken again after each append,
			// so a moved array never loses a write.
			d.Peers = append(d.Peers, PeerStatus{Peer: Peer{PublicKey: pk}})
			cur = &d.Peers[len(d.Peers)-1]
		case "endpoint", "allowed_ip", "last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes":
			if cur == nil {
				return d, fmt.Errorf("wgcfg: %s before any public_key", k)
			}
			switch k {
			case "endpoint":
				cur.Endpoint = v
			case "allowed_ip":
				var p netip.Prefix
				p, err = netip.ParsePrefix(v)
				cur.AllowedIPs = append(cur.AllowedIPs, p)
			case "last_handshake_time_sec":
				sec, err = strconv.ParseInt(v, 10, 64)
			case "last_handshake_time_nsec":
				nsec, err = strconv.ParseInt(v, 10, 64)
			case "rx_bytes":
				cur.RxBytes, err = strconv.ParseUint(v, 10, 64)
			case "tx_bytes":
				cur.TxBytes, err = strconv.ParseUint(v, 10, 64)
			}
		}
		if err != nil {
			return d, fmt.Errorf("wgcfg: %s: %w", k, err)
		}
	}
	flush()
	return d, nil
}
