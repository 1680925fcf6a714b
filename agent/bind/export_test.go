package bind

import (
	"net/netip"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/key"
)

// Disco messages as an attacker holding a peer's key (or a capture of its
// messages) would make them, for the tests of package bind_test.

// DiscoPing and DiscoPong are the disco message types.
const (
	DiscoPing = discoPing
	DiscoPong = discoPong
)

// SealDisco seals a disco message from priv to pub, stamped at the time.
func SealDisco(priv key.Private, pub key.Public, typ byte, txid [12]byte, observed netip.AddrPort, at time.Time) []byte {
	var shared [32]byte
	peerPub, pr := pub.Raw(), priv.Raw()
	box.Precompute(&shared, &peerPub, &pr)
	m := discoMsg{typ: typ, txid: txid, stamp: uint64(at.UnixNano()), observed: observed}
	return sealDisco(priv.Public(), &shared, &m)
}

// OpenDisco opens a disco message to priv: its sender, type and txid.
func OpenDisco(priv key.Private, pkt []byte) (from key.Public, typ byte, txid [12]byte, ok bool) {
	if !isDisco(pkt) {
		return from, 0, txid, false
	}
	from = discoSender(pkt)
	var shared [32]byte
	peerPub, pr := from.Raw(), priv.Raw()
	box.Precompute(&shared, &peerPub, &pr)
	m, err := openDisco(pkt, &shared)
	if err != nil {
		return from, 0, txid, false
	}
	return from, m.typ, m.txid, true
}
