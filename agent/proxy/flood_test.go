package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/netstack/nettest"
)

// countingBackend is a real target that counts the connections it got and
// how many are still open; each is greeted with "db\n", then echoed.
type countingBackend struct {
	addr                 string
	mu                   sync.Mutex // guards the fields below
	accepted, open, peak int
}

func newCountingBackend(t *testing.T) *countingBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	b := &countingBackend{addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.accepted++
			b.open++
			b.peak = max(b.peak, b.open)
			b.mu.Unlock()
			go func() {
				defer func() {
					c.Close()
					b.mu.Lock()
					b.open--
					b.mu.Unlock()
				}()
				io.WriteString(c, "db\n")
				io.Copy(c, c)
			}()
		}
	}()
	return b
}

func (b *countingBackend) counts() (accepted, open, peak int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.accepted, b.open, b.peak
}

// TestSYNFloodBounded performs a SYN flood over the mesh: hostile peers send
// SYNs to an exported service and never ACK the SYN-ACK. Each SYN the
// provider takes makes it dial the real target, so without bounds 200 SYNs
// held 200 backend connections for the two minutes gVisor retransmits
// SYN-ACKs. Now at most the per-peer (or per-export) bound of backend
// connections is opened, the rest are refused at once, every one is closed
// within the handshake timeout, and an honest consumer is served meanwhile.
func TestSYNFloodBounded(t *testing.T) {
	const handshake = 2 * time.Second
	cases := []struct {
		name      string
		attackers int
		perPeer   int // SYNs from each attacker
		want      int // most backend connections the flood may open
		honest    bool
	}{
		{"one peer", 1, 200, DefaultMaxPendingPerPeer, true},
		{"many peers", 5, 60, DefaultMaxPendingPerExport, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pair := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{HandshakeTimeout: handshake})
			backend := newCountingBackend(t)
			prov := NewProvider(ProviderConfig{Logger: tstest.Logger(t), Policy: func(netip.Addr, string) (string, bool) { return "peer", true }})
			t.Cleanup(prov.Close)
			// No health checks: the backend counts only the flood's connections.
			prov.SetExports([]Export{{Name: "db", Target: backend.addr, Port: 5432, Health: HealthNone}})
			pair.B.SetTCPHandler(prov.HandleTCP)
			dst := netip.AddrPortFrom(nettest.AddrB4, 5432)

			start := time.Now()
			total := 0
			for a := range tc.attackers {
				// Mesh addresses WireGuard routes nowhere: the SYN-ACKs
				// are dropped, as a peer that never ACKs would.
				src := netip.AddrFrom4([4]byte{100, 96, 0, byte(66 + a)})
				var syns [][]byte
				for i := range tc.perPeer {
					syns = append(syns, nettest.SYN(netip.AddrPortFrom(src, uint16(10000+i)), dst))
				}
				pair.B.Write(syns, 0)
				total += len(syns)
			}
			busy := func() int64 { return prov.Status()[0].Busy }
			tstest.WaitFor(t, 10*time.Second, "every SYN of the flood dialed or refused", func() bool {
				accepted, _, _ := backend.counts()
				return int64(accepted)+busy() == int64(total)
			})
			accepted, _, peak := backend.counts()
			t.Logf("%d SYNs: %d backend connections (peak %d open), %d refused", total, accepted, peak, busy())
			if accepted > tc.want || peak > tc.want {
				t.Fatalf("%d SYNs opened %d backend connections (peak %d), want at most %d", total, accepted, peak, tc.want)
			}

			if tc.honest {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := pair.A.DialTCP(ctx, dst)
				if err != nil {
					t.Fatalf("honest consumer refused during the flood: %v", err)
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				r := bufio.NewReader(c)
				if line, err := r.ReadString('\n'); err != nil || line != "db\n" {
					t.Fatalf("honest consumer got %q, %v during the flood", line, err)
				}
				io.WriteString(c, "ping\n")
				if line, err := r.ReadString('\n'); err != nil || strings.TrimSpace(line) != "ping" {
					t.Fatalf("honest consumer echo %q, %v", line, err)
				}
				c.Close()
			}

			tstest.WaitFor(t, handshake+5*time.Second, "the flood's backend connections to close", func() bool {
				_, open, _ := backend.counts()
				return open == 0
			})
			t.Logf("all backend connections closed %v after the flood began (handshake timeout %v)", time.Since(start).Round(10*time.Millisecond), handshake)
		})
	}
}
