package bind

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/conn"

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

// TestSendRuns checks that a batch reaches the socket whole and in order,
// in runs of one packet size (the last may be shorter) that each stay under
// maxSendRun bytes and whose first buffer has room for the whole run (the
// standard bind coalesces into it), and that the caller's slice is left as
// it was.
func TestSendRuns(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sizes []int
		runs  int
	}{
		{"empty", nil, 0},
		{"one", []int{100}, 1},
		{"full wireguard batch of MTU packets", repeat(1452, 128), 3},
		{"exactly the cap", repeat(16000, 4), 1},
		{"one byte over", append(repeat(16000, 4), 1), 2},
		{"a packet larger than the cap", []int{70000, 10, 70000}, 3},
		{"mixed", []int{1452, 1452, 80, 1452, 60000, 3000, 32}, 4},
		{"short tail ends a run", append(repeat(1452, 10), 100, 1452, 1452), 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var bufs [][]byte
			for i, n := range tc.sizes {
				b := make([]byte, n, n+16) // WireGuard's buffers: one packet and a little
				for j := range b {
					b[j] = byte(i*31 + j)
				}
				bufs = append(bufs, b)
			}
			orig := append([][]byte(nil), bufs...)
			var got [][]byte
			runs := 0
			err := sendRuns(bufs, nil, func(run [][]byte, _ conn.Endpoint) error {
				runs++
				size := 0
				for i, b := range run {
					size += len(b)
					if i > 0 && (len(b) > len(run[0]) || len(run[i-1]) != len(run[0])) {
						t.Errorf("run of sizes mixed at packet %d", i)
					}
				}
				if len(run) == 0 || (len(run) > 1 && size > maxSendRun) {
					t.Errorf("run of %d packets, %d bytes", len(run), size)
				}
				if len(run) > 1 && cap(run[0]) < size {
					t.Errorf("run of %d bytes, first buffer's capacity %d", size, cap(run[0]))
				}
				for _, b := range run {
					got = append(got, append([]byte(nil), b...))
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if runs != tc.runs {
				t.Errorf("%d runs, want %d", runs, tc.runs)
			}
			if len(got) != len(bufs) {
				t.Fatalf("%d packets sent, want %d", len(got), len(bufs))
			}
			for i := range bufs {
				if !bytes.Equal(got[i], orig[i]) {
					t.Fatalf("packet %d changed or out of order", i)
				}
				if len(bufs[i]) > 0 && &bufs[i][0] != &orig[i][0] {
					t.Fatalf("caller's buffer %d replaced", i)
				}
			}
		})
	}
	// The first error ends the send.
	calls := 0
	err := sendRuns([][]byte{make([]byte, 60000), make([]byte, 60000)}, nil, func([][]byte, conn.Endpoint) error {
		calls++
		return net.ErrClosed
	})
	if !errors.Is(err, net.ErrClosed) || calls != 1 {
		t.Fatalf("err %v after %d calls; want net.ErrClosed after 1", err, calls)
	}
}

func repeat(n, k int) []int {
	out := make([]int, k)
	for i := range out {
		out[i] = n
	}
	return out
}
