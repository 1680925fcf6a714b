package bind

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net/netip"

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
// Payload: type (1) | txid (12) | [pong only: observed address (16 IP + 2 port)].
const (
	discoMagic    = "ML\xd1\x5c\x00\x01"
	discoHeader   = len(discoMagic) + 32 + 24
	discoPing     = 1
	discoPong     = 2
	maxDiscoPlain = 1 + 12 + 18
)

// isDisco reports whether b is a disco message. WireGuard messages start with
// a type 1-4 and three zero bytes, STUN with two zero bits and a cookie, so
// the magic cannot be confused with either.
func isDisco(b []byte) bool {
	return len(b) >= discoHeader+box.Overhead && string(b[:len(discoMagic)]) == discoMagic
}

type discoMsg struct {
	typ      byte
	txid     [12]byte
	observed netip.AddrPort // pong: where the pinger's packet came from
}

func (m *discoMsg) marshal() []byte {
	out := make([]byte, 1+12, maxDiscoPlain)
	out[0] = m.typ
	copy(out[1:], m.txid[:])
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
	if len(b) < 13 {
		return m, errDisco
	}
	m.typ = b[0]
	copy(m.txid[:], b[1:13])
	switch m.typ {
	case discoPing:
	case discoPong:
		if len(b) < 13+18 {
			return m, errDisco
		}
		var ip [16]byte
		copy(ip[:], b[13:29])
		m.observed = netip.AddrPortFrom(netip.AddrFrom16(ip).Unmap(), binary.BigEndian.Uint16(b[29:31]))
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
	var nonce [24]byte
	copy(nonce[:], b[len(discoMagic)+32:discoHeader])
	plain, ok := box.OpenAfterPrecomputation(nil, b[discoHeader:], &nonce, shared)
	if !ok {
		return discoMsg{}, errDisco
	}
	return parseDisco(plain)
}
