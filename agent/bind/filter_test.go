package bind

import (
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/internal/key"
)

// TestFilterPongMidBatch: the receive filter looks a source's peer up once
// per run of packets from it, so a disco pong in the middle of a batch
// that proves the path (and gives the address to the peer) must not leave
// the data packets after it with the lookup made before it: they carry the
// peer's endpoint, which wireguard-go then answers through.
func TestFilterPongMidBatch(t *testing.T) {
	priv, peerPriv := key.NewPrivate(), key.NewPrivate()
	b := New(Config{PrivateKey: priv})
	src := netip.MustParseAddrPort("192.0.2.7:41641")             // only a value in memory: nothing is sent
	b.SetPeers([]PeerConfig{{Key: peerPriv.Public(), Name: "p"}}) // src is no address of its yet

	txid := [12]byte{1, 2, 3}
	now := time.Now()
	b.mu.Lock()
	p := b.peers[peerPriv.Public()]
	p.pings[txid] = sentPing{addr: src, at: now}
	b.mu.Unlock()
	pong := SealDisco(peerPriv, priv.Public(), DiscoPong, txid, src, now)

	data := make([]byte, 64)
	data[0] = 4 // a WireGuard transport-data message
	batch := [][]byte{data, pong, data, data}
	fn := b.filter(func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i, pkt := range batch {
			sizes[i] = copy(packets[i], pkt)
			eps[i] = &conn.StdNetEndpoint{AddrPort: src}
		}
		return len(batch), nil
	})
	packets := make([][]byte, len(batch))
	for i := range packets {
		packets[i] = make([]byte, 256)
	}
	sizes, eps := make([]int, len(batch)), make([]conn.Endpoint, len(batch))
	if _, err := fn(packets, sizes, eps); err != nil {
		t.Fatal(err)
	}
	if sizes[1] != 0 {
		t.Fatalf("the pong reached WireGuard (size %d)", sizes[1])
	}
	if _, ok := eps[0].(*conn.StdNetEndpoint); !ok {
		t.Errorf("packet before the pong: %T, want the plain source (the path was not proven yet)", eps[0])
	}
	for _, i := range []int{2, 3} {
		if eps[i] != conn.Endpoint(p.ep) {
			t.Errorf("packet %d after the pong: endpoint %v, want the peer's", i, eps[i])
		}
	}
	if got := p.rxDirect.Load(); got != 2*64 {
		t.Errorf("rxDirect %d, want %d (the two packets after the pong)", got, 2*64)
	}
}
