package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/stun"
	"github.com/meshlink/meshlink/wire"
)

type relayRx struct {
	mu   sync.Mutex
	src  []key.Public
	pkts [][]byte
}

func (r *relayRx) on(src key.Public, pkt []byte) {
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

// keyedNode is a registered node with its private key, which relays need
// (nodes prove their keys to them).
type keyedNode struct {
	rr   wire.RegisterResponse
	cr   creds
	priv key.Private
	pub  key.Public
}

func registerKeyed(t *testing.T, c *http.Client, jt wire.JoinToken, name string) keyedNode {
	t.Helper()
	priv := key.NewPrivate()
	pub := priv.Public()
	st, body := call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: jt.ID, TokenSecret: jt.Secret, Name: name, NodeKey: pub, ListenPort: 41641,
	})
	if st != http.StatusOK {
		t.Fatalf("register %s: %d %s", name, st, body)
	}
	var rr wire.RegisterResponse
	if err := json.Unmarshal(body, &rr); err != nil {
		t.Fatal(err)
	}
	return keyedNode{rr: rr, cr: creds{rr.Node.ID, rr.NodeSecret}, priv: priv, pub: pub}
}

func relayClient(t *testing.T, r wire.Relay, priv key.Private, rx *relayRx) *relay.Client {
	t.Helper()
	rk := r.Key
	c := relay.NewClient(relay.ClientConfig{
		URL: r.URL, Fingerprint: r.Fingerprint, RelayKey: rk, PrivateKey: priv,
		Logger:   tstest.Logger(t),
		OnPacket: rx.on, RetryMin: 10 * time.Millisecond, RetryMax: 100 * time.Millisecond,
	})
	c.Start()
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRelayThroughCoordinator(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	na := registerKeyed(t, c, jt, "a")
	nb := registerKeyed(t, c, jt, "b")

	// Every full map names the coordinator's relay, with its key.
	sa := openMap(t, c, jt.URL, na.cr)
	full := sa.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
	if len(full.Full.Relays) != 1 {
		t.Fatalf("relays %+v, want the embedded one", full.Full.Relays)
	}
	emb := full.Full.Relays[0]
	if emb.Name != EmbeddedRelayName || emb.URL != s.URL() || emb.Fingerprint != s.Fingerprint() || emb.Key.IsZero() {
		t.Fatalf("embedded relay %+v", emb)
	}

	var rxa, rxb relayRx
	a := relayClient(t, emb, na.priv, &rxa)
	b := relayClient(t, emb, nb.priv, &rxb)
	tstest.WaitFor(t, 5*time.Second, "both relay clients connected", func() bool { return a.Connected() && b.Connected() })
	pkt := make([]byte, 1420)
	rand.Read(pkt)
	if err := a.Send(nb.pub, pkt); err != nil {
		t.Fatal(err)
	}
	if err := b.Send(na.pub, pkt[:100]); err != nil {
		t.Fatal(err)
	}
	tstest.WaitFor(t, 5*time.Second, "packets both ways", func() bool { return rxa.n() == 1 && rxb.n() == 1 })
	if rxb.src[0] != na.pub || !bytes.Equal(rxb.pkts[0], pkt) || rxa.src[0] != nb.pub || !bytes.Equal(rxa.pkts[0], pkt[:100]) {
		t.Fatal("packets arrived altered or with the wrong source key")
	}

	// A node that leaves loses its relay connection and cannot come back.
	if st, body := call(t, c, jt.URL, wire.PathLeave, &nb.cr, wire.LeaveRequest{Version: wire.ProtocolVersion}); st != http.StatusOK {
		t.Fatalf("leave: %d %s", st, body)
	}
	tstest.WaitFor(t, 5*time.Second, "b's relay connection closed", func() bool { return !b.Connected() })
	tstest.WaitFor(t, 5*time.Second, "b refused", func() bool { return strings.Contains(b.Stats().LastError, "not a node of this mesh") })

	// Close ends relay connections (hijacked, unseen by http.Server) promptly.
	done := make(chan struct{})
	go func() { s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs with relay connections open")
	}
	tstest.WaitFor(t, 5*time.Second, "a disconnected", func() bool { return !a.Connected() })
}

func TestRelayRefusesKeysOutsideTheMesh(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	jt := mustToken(t, s, TokenOptions{})
	na := registerKeyed(t, c, jt, "a")
	sa := openMap(t, c, jt.URL, na.cr)
	emb := sa.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil }).Full.Relays[0]

	stranger := key.NewPrivate()
	var rx relayRx
	cl := relayClient(t, emb, stranger, &rx)
	tstest.WaitFor(t, 5*time.Second, "refusal", func() bool { return strings.Contains(cl.Stats().LastError, "403") })
	if cl.Connected() {
		t.Fatal("a key outside the mesh connected to the relay")
	}
	if !strings.Contains(cl.Stats().LastError, "not a node of this mesh") {
		t.Fatalf("unclear error %q", cl.Stats().LastError)
	}
	// The right key with the wrong relay key (a stale map): 401, not in.
	wrong := emb
	other := key.NewPrivate()
	otherPub := other.Public()
	wrong.Key = otherPub
	cl2 := relayClient(t, wrong, na.priv, &rx)
	tstest.WaitFor(t, 5*time.Second, "refusal", func() bool { return strings.Contains(cl2.Stats().LastError, "401") })
	if cl2.Connected() {
		t.Fatal("connected with a proof made for another relay key")
	}
}

// relayCall POSTs to a relay endpoint with relay credentials.
func relayCall(t *testing.T, c *http.Client, base, path string, id uint64, secret string, body any) (int, []byte) {
	t.Helper()
	raw, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, base+path, bytes.NewReader(raw))
	if secret != "" {
		req.Header.Set(wire.HeaderRelayID, strconv.FormatUint(id, 10))
		req.Header.Set(wire.HeaderRelaySecret, secret)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// openRelayNodes opens the node-key stream a standalone relay holds; cancel
// ends it (the coordinator then unlists the relay).
func openRelayNodes(t *testing.T, c *http.Client, base string, rr wire.RelayRegisterResponse) (*http.Response, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	raw, _ := json.Marshal(wire.RelayNodesRequest{Version: wire.ProtocolVersion})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+wire.PathRelayNodes, bytes.NewReader(raw))
	req.Header.Set(wire.HeaderRelayID, strconv.FormatUint(rr.ID, 10))
	req.Header.Set(wire.HeaderRelaySecret, rr.Secret)
	resp, err := c.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		cancel()
		t.Fatalf("relay nodes stream: %v %v", resp, err)
	}
	t.Cleanup(func() { cancel(); resp.Body.Close() })
	return resp, cancel
}

func TestStandaloneRelayRegistration(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.NoEmbeddedRelay = true })
	c := pinnedClient(t, s.Fingerprint(), false)
	nodeTok := mustToken(t, s, TokenOptions{Reusable: true})
	relayTok := mustToken(t, s, TokenOptions{Relay: true})

	// Tokens of the wrong kind are refused both ways, and say so.
	relayKey := key.NewPrivate()
	relayPub := relayKey.Public()
	reg := wire.RelayRegisterRequest{Version: wire.ProtocolVersion, TokenID: nodeTok.ID, TokenSecret: nodeTok.Secret,
		Name: "eu1", URL: "https://127.0.0.1:9443", Fingerprint: strings.Repeat("ab", 32), Key: relayPub}
	if st, body := relayCall(t, c, s.URL(), wire.PathRelayRegister, 0, "", reg); st != http.StatusUnauthorized || !strings.Contains(string(body), "wrong kind") {
		t.Fatalf("relay registered with a node token: %d %s", st, body)
	}
	if st, body := call(t, c, s.URL(), wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion,
		TokenID: relayTok.ID, TokenSecret: relayTok.Secret, Name: "x", NodeKey: newKey(t)}); st != http.StatusUnauthorized || !strings.Contains(string(body), "wrong kind") {
		t.Fatalf("node joined with a relay token: %d %s", st, body)
	}
	// Malformed registrations.
	for _, bad := range []func(*wire.RelayRegisterRequest){
		func(r *wire.RelayRegisterRequest) { r.URL = "http://127.0.0.1:9443" },
		func(r *wire.RelayRegisterRequest) { r.URL = "https://relay.example" },
		func(r *wire.RelayRegisterRequest) { r.Key = key.Public{} },
		func(r *wire.RelayRegisterRequest) { r.Fingerprint = "ab" },
		func(r *wire.RelayRegisterRequest) { r.Name = "Not A Name!" },
	} {
		r := reg
		r.TokenID, r.TokenSecret = relayTok.ID, relayTok.Secret
		bad(&r)
		if st, body := relayCall(t, c, s.URL(), wire.PathRelayRegister, 0, "", r); st != http.StatusBadRequest {
			t.Fatalf("malformed %+v: %d %s", r, st, body)
		}
	}

	reg.TokenID, reg.TokenSecret = relayTok.ID, relayTok.Secret
	st, body := relayCall(t, c, s.URL(), wire.PathRelayRegister, 0, "", reg)
	if st != http.StatusOK {
		t.Fatalf("relay register: %d %s", st, body)
	}
	var rr wire.RelayRegisterResponse
	json.Unmarshal(body, &rr)
	if rr.ID == 0 || rr.Secret == "" {
		t.Fatalf("register answer %s", body)
	}
	// The single-use token is spent; the relay refreshes with its secret.
	if st, _ := relayCall(t, c, s.URL(), wire.PathRelayRegister, 0, "", func() wire.RelayRegisterRequest { r := reg; r.Name = "eu2"; return r }()); st != http.StatusUnauthorized {
		t.Fatalf("second relay with a used token: %d", st)
	}
	refresh := reg
	refresh.TokenID, refresh.TokenSecret = "", ""
	refresh.URL = "https://127.0.0.1:9444"
	if st, body := relayCall(t, c, s.URL(), wire.PathRelayRegister, rr.ID, rr.Secret, refresh); st != http.StatusOK {
		t.Fatalf("refresh: %d %s", st, body)
	}
	if st, _ := relayCall(t, c, s.URL(), wire.PathRelayRegister, rr.ID, "wrong", refresh); st != http.StatusUnauthorized {
		t.Fatalf("refresh with a wrong secret: %d", st)
	}

	// No embedded relay, and the standalone one is listed only while its
	// stream is open.
	na := registerKeyed(t, c, nodeTok, "a")
	sa := openMap(t, c, s.URL(), na.cr)
	if full := sa.next(t, 5*time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil }); len(full.Full.Relays) != 0 {
		t.Fatalf("relays %+v with the embedded relay off and no relay online", full.Full.Relays)
	}
	resp, cancel := openRelayNodes(t, c, s.URL(), rr)
	var rn wire.RelayNodes
	if err := json.NewDecoder(resp.Body).Decode(&rn); err != nil || len(rn.Keys) != 1 || rn.Keys[0] != na.pub {
		t.Fatalf("relay nodes %+v %v, want a's key", rn, err)
	}
	m := sa.next(t, 5*time.Second, "relay listed", func(m wire.MapResponse) bool { return m.Relays != nil && len(*m.Relays) == 1 })
	if got := (*m.Relays)[0]; got.Name != "eu1" || got.URL != "https://127.0.0.1:9444" || got.Key != relayPub {
		t.Fatalf("listed relay %+v", got)
	}
	cancel()
	sa.next(t, 5*time.Second, "relay unlisted", func(m wire.MapResponse) bool { return m.Relays != nil && len(*m.Relays) == 0 })
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
