package bind

import (
	"net/netip"
	"testing"

	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
)

func newKey(t testing.TB) (key.Private, key.Public) {
	priv := key.NewPrivate()
	return priv, priv.Public()
}

// precompute is the shared box key from priv to pub.
func precompute(shared *[32]byte, pub key.Public, priv key.Private) {
	pr, pu := priv.Raw(), pub.Raw()
	box.Precompute(shared, &pu, &pr)
}

func TestDiscoSealOpen(t *testing.T) {
	aPriv, aPub := newKey(t)
	bPriv, bPub := newKey(t)
	var ab, ba [32]byte
	precompute(&ab, bPub, aPriv)
	precompute(&ba, aPub, bPriv)
	for _, m := range []discoMsg{
		{typ: discoPing, txid: [12]byte{1, 2, 3}},
		{typ: discoPong, txid: [12]byte{9}, observed: netip.MustParseAddrPort("203.0.113.7:41641")},
		{typ: discoPong, txid: [12]byte{8}, observed: netip.MustParseAddrPort("[2001:db8::1]:5")},
	} {
		pkt := sealDisco(aPub, &ab, &m)
		if !isDisco(pkt) || discoSender(pkt) != aPub {
			t.Fatalf("not recognised as disco from a")
		}
		got, err := openDisco(pkt, &ba)
		if err != nil || got != m {
			t.Fatalf("open: %+v, %v; want %+v", got, err, m)
		}
		pkt[len(pkt)-1] ^= 1
		if _, err := openDisco(pkt, &ba); err == nil {
			t.Fatal("tampered message accepted")
		}
	}
	// WireGuard and STUN messages are never mistaken for disco.
	wg := make([]byte, 148)
	wg[0] = 1
	if isDisco(wg) {
		t.Fatal("WireGuard initiation taken for disco")
	}
}

func FuzzDisco(f *testing.F) {
	aPriv, aPub := newKey(f)
	bPriv, bPub := newKey(f)
	var ab [32]byte
	precompute(&ab, bPub, aPriv)
	f.Add(sealDisco(aPub, &ab, &discoMsg{typ: discoPing}))
	f.Add(sealDisco(aPub, &ab, &discoMsg{typ: discoPong, observed: netip.MustParseAddrPort("1.2.3.4:5")}))
	f.Add([]byte(discoMagic))
	b := New(Config{PrivateKey: bPriv})
	b.SetPeers([]PeerConfig{{Key: aPub, Name: "a", Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}})
	// A relay that never connects: replies over it are dropped.
	rc := &relayConn{cfg: RelayConfig{Name: "r"}, client: relay.NewClient(relay.ClientConfig{})}
	f.Fuzz(func(t *testing.T, pkt []byte) {
		_ = isDisco(pkt)
		if isDisco(pkt) {
			b.handleDisco(pkt, netip.MustParseAddrPort("127.0.0.1:9"), nil)
			b.handleDisco(pkt, netip.AddrPort{}, rc)
		}
		parseDisco(pkt)
		b.handleSTUN(pkt, netip.MustParseAddrPort("127.0.0.1:3478"))
	})
}
