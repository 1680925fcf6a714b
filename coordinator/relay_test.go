package coordinator

import (
	"bytes"
	"crypto/rand"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/relay"
	"github.com/meshlink/meshlink/coordinator/stun"
	"github.com/meshlink/meshlink/wire"
)

type relayRx struct {
	mu   sync.Mutex
	src  []relay.Key
	pkts [][]byte
}

func (r *relayRx) on(src relay.Key, pkt []byte) {
	r.mu.Lock()
	r.src = append(r.src, src)
	r.pkts = append(r.pkts, bytes.Clone(pkt))
	r.mu.Unlock()
}

func (r *relayRx) n() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pkts)
}

func relayClient(t *testing.T, s *Server, cr creds, rx *relayRx) *relay.Client {
	t.Helper()
	c := relay.NewClient(relay.ClientConfig{
		URL: s.URL(), Fingerprint: s.Fingerprint(), NodeID: cr.ID, Secret: cr.Secret,
		Logger:   slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		OnPacket: rx.on, RetryMin: 10 * time.Millisecond, RetryMax: 100 * time.Millisecond,
	})
	c.Start()
	t.Cleanup(func() { c.Close() })
	return c
}

func mustRelayKey(t *testing.T, k wire.Key) relay.Key {
	t.Helper()
	rk, err := relay.KeyFromWire(k)
	if err != nil {
		t.Fatal(err)
	}
	return rk
}

func TestRelayThroughCoordinator(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	ra, ca := register(t, c, jt, "a")
	rb, cb := register(t, c, jt, "b")

	// Every full map names the coordinator's relay.
	sa := openMap(t, c, jt.URL, ca)
	full := sa.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
	if want := (wire.Relay{URL: s.URL(), Fingerprint: s.Fingerprint()}); len(full.Full.Relays) != 1 || full.Full.Relays[0] != want {
		t.Fatalf("relays %+v, want [%+v]", full.Full.Relays, want)
	}

	var rxa, rxb relayRx
	a := relayClient(t, s, ca, &rxa)
	b := relayClient(t, s, cb, &rxb)
	waitFor(t, 5*time.Second, "both relay clients connected", func() bool { return a.Connected() && b.Connected() })
	ka, kb := mustRelayKey(t, ra.Node.Key), mustRelayKey(t, rb.Node.Key)
	pkt := make([]byte, 1420)
	rand.Read(pkt)
	if err := a.Send(kb, pkt); err != nil {
		t.Fatal(err)
	}
	if err := b.Send(ka, pkt[:100]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "packets both ways", func() bool { return rxa.n() == 1 && rxb.n() == 1 })
	if rxb.src[0] != ka || !bytes.Equal(rxb.pkts[0], pkt) || rxa.src[0] != kb || !bytes.Equal(rxa.pkts[0], pkt[:100]) {
		t.Fatal("packets arrived altered or with the wrong source key")
	}

	// A node that leaves loses its relay connection and cannot come back.
	if st, body := call(t, c, jt.URL, wire.PathLeave, &cb, wire.LeaveRequest{Version: wire.ProtocolVersion}); st != http.StatusOK {
		t.Fatalf("leave: %d %s", st, body)
	}
	waitFor(t, 5*time.Second, "b's relay connection closed", func() bool { return !b.Connected() })
	waitFor(t, 5*time.Second, "b refused", func() bool { return strings.Contains(b.Stats().LastError, wire.ErrCodeNodeRemoved) })

	// Close ends relay connections (hijacked, unseen by http.Server) promptly.
	done := make(chan struct{})
	go func() { s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs with relay connections open")
	}
	waitFor(t, 5*time.Second, "a disconnected", func() bool { return !a.Connected() })
}

func TestRelayBadCredentials(t *testing.T) {
	s := startServer(t, t.TempDir())
	var rx relayRx
	cl := relayClient(t, s, creds{ID: 12345, Secret: "nope"}, &rx)
	waitFor(t, 5*time.Second, "refusal", func() bool { return strings.Contains(cl.Stats().LastError, "401") })
	if cl.Connected() {
		t.Fatal("connected with bad credentials")
	}
	if !strings.Contains(cl.Stats().LastError, "credentials") {
		t.Fatalf("unclear error %q", cl.Stats().LastError)
	}
}

func TestSTUNOnCoordinatorPort(t *testing.T) {
	s := startServer(t, t.TempDir())
	sa := s.STUNAddr()
	if !sa.IsValid() {
		t.Skip("STUN port was taken on this host")
	}
	if sa.Port() != s.Addr().Port() || sa.Addr() != s.Addr().Addr() {
		t.Fatalf("STUN on %v, HTTPS on %v", sa, s.Addr())
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(sa))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var txid [12]byte
	rand.Read(txid[:])
	buf := make([]byte, 1500)
	for attempt := 0; ; attempt++ {
		conn.Write(stun.Request(txid))
		conn.SetReadDeadline(time.Now().Add(time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			if attempt < 5 {
				continue
			}
			t.Fatal(err)
		}
		got, addr, err := stun.ParseResponse(buf[:n])
		if err != nil || got != txid || addr != conn.LocalAddr().(*net.UDPAddr).AddrPort() {
			t.Fatalf("STUN answer %v %v, want %v", addr, err, conn.LocalAddr())
		}
		return
	}
}
