package bind

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"

	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/key"
)

// Disco messages share the WireGuard UDP socket (and the relay). They let two
// agents find a UDP path between them: each side pings every candidate
// address of the other at once (which also opens both NATs), and a pong
// proves the path works in both directions and measures its round trip.
//
// Wire format: magic (6) | sender public key (32) | nonce (24) | box(payload).
// The box is NaCl crypto_box between the WireGuard static keys, so only the
// claimed sender can produce a message and only the receiver can read it.
// (Tailscale uses separate disco keys; reusing the static keys is safe for
// box's HSalsa20-derived key and keeps the network map unchanged — noted as
// a later refinement.)
//
// The last two bytes of the magic are the format's version:
//
//	1  payload: type (1) | txid (12) | [pong: observed address (16 IP + 2 port)]
//	2  payload: type (1) | txid (12) | stamp (8) | [pong: observed address]
//
// The stamp is the sender's clock in Unix nanoseconds, strictly increasing
// per sender; the receiver keeps a replay window per peer (replayWindow), so
// a captured message is accepted at most once. Version 1 messages are
// recognised (and so kept from WireGuard) but dropped: without a stamp they
// could be replayed. Agents of both versions still reach each other over
// the relay.
const (
	discoMagicPrefix = "ML\xd1\x5c"
	discoMagic       = discoMagicPrefix + "\x00\x02"
	discoHeader      = len(discoMagic) + 32 + 24
	discoPing        = 1
	discoPong        = 2
	discoBase        = 1 + 12 + 8 // type, txid, stamp
	maxDiscoPlain    = discoBase + 18
)

// isDisco reports whether b is a disco message of any version. WireGuard
// messages start with a type 1-4 and three zero bytes, STUN with two zero
// bits and a cookie, so the magic cannot be confused with either.
func isDisco(b []byte) bool {
	return len(b) >= discoHeader+box.Overhead && string(b[:len(discoMagicPrefix)]) == discoMagicPrefix
}

// isDiscoCurrent reports whether the disco message b is of the version this
// code speaks.
func isDiscoCurrent(b []byte) bool {
	return string(b[:len(discoMagic)]) == discoMagic
}

type discoMsg struct {
	typ      byte
	txid     [12]byte
	stamp    uint64         // sender's clock, Unix ns, strictly increasing
	observed netip.AddrPort // pong: where the pinger's packet came from
}

func (m *discoMsg) marshal() []byte {
	out := make([]byte, 1+12, maxDiscoPlain)
	out[0] = m.typ
	copy(out[1:], m.txid[:])
	out = binary.BigEndian.AppendUint64(out, m.stamp)
	if m.typ == discoPong {
		ip := m.observed.Addr().As16()
		out = append(out, ip[:]...)
		out = binary.BigEndian.AppendUint16(out, m.observed.Port())
	}
	return out
}

var errDisco = errors.New("bad disco message")

func parseDisco(b []byte) (discoMsg, error) {
	var m discoMsg
	if len(b) < discoBase {
		return m, errDisco
	}
	m.typ = b[0]
	copy(m.txid[:], b[1:13])
	m.stamp = binary.BigEndian.Uint64(b[13:21])
	switch m.typ {
	case discoPing:
	case discoPong:
		if len(b) < discoBase+18 {
			return m, errDisco
		}
		var ip [16]byte
		copy(ip[:], b[discoBase:discoBase+16])
		m.observed = netip.AddrPortFrom(netip.AddrFrom16(ip).Unmap(), binary.BigEndian.Uint16(b[discoBase+16:discoBase+18]))
	default:
		return m, errDisco
	}
	return m, nil
}

// seal builds a disco packet from us to the holder of shared.
func sealDisco(self key.Public, shared *[32]byte, m *discoMsg) []byte {
	var nonce [24]byte
	rand.Read(nonce[:])
	out := make([]byte, 0, discoHeader+maxDiscoPlain+box.Overhead)
	out = append(out, discoMagic...)
	out = self.AppendTo(out)
	out = append(out, nonce[:]...)
	return box.SealAfterPrecomputation(out, m.marshal(), &nonce, shared)
}

// discoSender returns the claimed sender key of a disco packet.
func discoSender(b []byte) key.Public {
	return key.PublicFromRaw([key.Len]byte(b[len(discoMagic):]))
}

// openDisco authenticates and decodes a disco packet with the shared key of
// its claimed sender.
func openDisco(b []byte, shared *[32]byte) (discoMsg, error) {
	if !isDisco(b) || !isDiscoCurrent(b) {
		return discoMsg{}, errDisco
	}
	var nonce [24]byte
	copy(nonce[:], b[len(discoMagic)+32:discoHeader])
	plain, ok := box.OpenAfterPrecomputation(nil, b[discoHeader:], &nonce, shared)
	if !ok {
		return discoMsg{}, errDisco
	}
	return parseDisco(plain)
}

// Replay window bounds. Pings of one burst go out within microseconds but
// over paths of different delay (and the relay), so they may arrive out of
// order: a stamp up to replaySpan older than the newest one seen is still
// accepted once. maxReplaySeen bounds the memory per peer; an honest peer
// sends far fewer messages in replaySpan (one per candidate per scan).
const (
	replaySpan    = 5e9 // ns
	maxReplaySeen = 128
)

// replayWindow accepts each stamp of one sender at most once, and none older
// than replaySpan before the newest accepted, as WireGuard does with the
// TAI64N stamps of handshake initiations. Like WireGuard's, the window lives
// in memory: after a restart of this agent a message captured within the
// last replaySpan could be accepted once more, until the peer's next message
// raises the window. Its fields are guarded by Bind.mu.
type replayWindow struct {
	floor uint64   // every stamp ≤ floor is refused
	high  uint64   // newest stamp accepted
	seen  []uint64 // accepted stamps > floor, at most maxReplaySeen
}

// accept reports whether stamp is new, and records it.
func (w *replayWindow) accept(stamp uint64) bool {
	if stamp <= w.floor || slices.Contains(w.seen, stamp) {
		return false
	}
	w.seen = append(w.seen, stamp)
	if stamp > w.high {
		w.high = stamp
		if w.high > replaySpan {
			w.floor = max(w.floor, w.high-replaySpan)
		}
		w.seen = slices.DeleteFunc(w.seen, func(s uint64) bool { return s <= w.floor })
	}
	if len(w.seen) > maxReplaySeen {
		i := slices.Index(w.seen, slices.Min(w.seen))
		w.floor = w.seen[i]
		w.seen = slices.Delete(w.seen, i, i+1)
	}
	return true
}
