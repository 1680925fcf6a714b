package relay

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

func TestMain(m *testing.M) { tstest.Main(m) }

// logBuf keeps a test relay's logs for the test to search.
type logBuf struct{ tstest.Buffer }

func (l *logBuf) contains(s string) bool { return strings.Contains(l.String(), s) }

// newLog logs to t's output and to a buffer the test can search.
func newLog(t testing.TB) (*slog.Logger, *logBuf) {
	lb := &logBuf{}
	return tstest.NewLogger(t, tstest.LogOptions{Tee: lb}), lb
}

func selfSigned(t testing.TB) tls.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "relay test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

// node is a test node's key pair.
type node struct {
	priv key.Private
	key  key.Public
}

// testRelay is a relay.Server behind a real HTTPS server whose nodes are
// a fixed table.
type testRelay struct {
	t     testing.TB
	cert  tls.Certificate
	fp    string
	nodes map[key.Public]node
	priv  key.Private  // the relay's key
	pub   key.Public   // its public half
	auths atomic.Int64 // Verify calls: proofs that checked out
	log   *slog.Logger
	logs  *logBuf

	httpMod func(*http.Server) // applied before each start

	relay *Server
	http  *http.Server
	addr  string
	done  chan struct{}
}

func newNodes(n int) []node {
	ns := make([]node, n)
	for i := range ns {
		priv := key.NewPrivate()
		pub := priv.Public()
		ns[i] = node{priv: priv, key: pub}
	}
	return ns
}

func startRelay(t testing.TB, nodes []node, mod ...func(*ServerConfig)) *testRelay {
	t.Helper()
	return startRelayHTTP(t, nodes, nil, mod...)
}

func startRelayHTTP(t testing.TB, nodes []node, httpMod func(*http.Server), mod ...func(*ServerConfig)) *testRelay {
	t.Helper()
	log, logs := newLog(t)
	tr := &testRelay{t: t, cert: selfSigned(t), nodes: map[key.Public]node{}, log: log, logs: logs, httpMod: httpMod}
	tr.priv = key.NewPrivate()
	tr.pub = tr.priv.Public()
	tr.fp = wire.CertFingerprint(tr.cert.Certificate[0])
	for _, n := range nodes {
		tr.nodes[n.key] = n
	}
	tr.start("127.0.0.1:0", mod...)
	t.Cleanup(tr.stop)
	return tr
}

func (tr *testRelay) start(addr string, mod ...func(*ServerConfig)) {
	t := tr.t
	t.Helper()
	cfg := ServerConfig{Logger: tr.log, PrivateKey: tr.priv, Verify: tr.verify}
	for _, m := range mod {
		m(&cfg)
	}
	tr.relay = NewServer(cfg)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tr.addr = ln.Addr().String()
	mux := http.NewServeMux()
	mux.Handle(Path, tr.relay)
	// The same timeouts as the coordinator, to show they spare hijacked
	// connections.
	tr.http = &http.Server{
		Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{tr.cert}},
		ErrorLog:  slog.NewLogLogger(tr.log.Handler(), slog.LevelDebug),
	}
	if tr.httpMod != nil {
		tr.httpMod(tr.http)
	}
	tr.done = make(chan struct{})
	go func(srv *http.Server, done chan struct{}) {
		defer close(done)
		srv.ServeTLS(ln, "", "")
	}(tr.http, tr.done)
}

func (tr *testRelay) stop() {
	if tr.http == nil {
		return
	}
	tr.relay.Close()
	tr.http.Close()
	<-tr.done
	tr.http = nil
}

func (tr *testRelay) url() string { return "https://" + tr.addr }

func (tr *testRelay) verify(k key.Public) error {
	tr.auths.Add(1)
	if _, ok := tr.nodes[k]; !ok {
		return errors.New("not a node of this mesh")
	}
	return nil
}

// rx collects what a client receives.
type rx struct {
	mu   sync.Mutex
	pkts []received
	gone []key.Public
}

type received struct {
	src key.Public
	pkt []byte
}

func (r *rx) onPacket(src key.Public, pkt []byte) {
	r.mu.Lock()
	r.pkts = append(r.pkts, received{src, bytes.Clone(pkt)})
	r.mu.Unlock()
}

func (r *rx) onPeerGone(dst key.Public) {
	r.mu.Lock()
	r.gone = append(r.gone, dst)
	r.mu.Unlock()
}

func (r *rx) packets() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.pkts...)
}

func (r *rx) peersGone() []key.Public {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]key.Public(nil), r.gone...)
}

func (tr *testRelay) client(t testing.TB, n node, mod ...func(*ClientConfig)) (*Client, *rx) {
	t.Helper()
	r := &rx{}
	cfg := ClientConfig{
		URL: tr.url(), Fingerprint: tr.fp, RelayKey: tr.pub, PrivateKey: n.priv, Logger: tr.log,
		OnPacket: r.onPacket, OnPeerGone: r.onPeerGone, RetryMin: 10 * time.Millisecond, RetryMax: 100 * time.Millisecond,
	}
	for _, m := range mod {
		m(&cfg)
	}
	c := NewClient(cfg)
	c.Start()
	t.Cleanup(func() { c.Close() })
	return c, r
}

// rawConn is a hand-driven relay connection.
type rawConn struct {
	net.Conn
	br  *bufio.Reader
	buf []byte
}

// dialRaw upgrades a connection as node n and returns it after the server
// info frame, or the HTTP status of a refusal.
func (tr *testRelay) dialRaw(t *testing.T, n node) (*rawConn, int) {
	t.Helper()
	conn, err := tls.Dial("tcp", tr.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	req, _ := http.NewRequest(http.MethodGet, tr.url()+Path, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", Protocol)
	cs := conn.ConnectionState()
	secret, err := sessionSecret(&cs)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := makeProof(secret, n.priv, tr.pub)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set(HeaderNodeKey, n.key.String())
	req.Header.Set(HeaderProof, proof)
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, resp.StatusCode
	}
	rc := &rawConn{Conn: conn, br: br, buf: make([]byte, MaxPayload)}
	if typ, p := rc.read(t); typ != FrameServerInfo || !bytes.Contains(p, []byte(`"version":1`)) {
		t.Fatalf("first frame: type %d %q, want server info", typ, p)
	}
	return rc, resp.StatusCode
}

func (rc *rawConn) read(t *testing.T) (byte, []byte) {
	t.Helper()
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, p, err := readFrame(rc.br, rc.buf)
	if err != nil {
		t.Fatalf("read frame: %v", err)
	}
	return typ, p
}

// readPacket skips keep-alives.
func (rc *rawConn) readPacket(t *testing.T) (byte, []byte) {
	t.Helper()
	for {
		typ, p := rc.read(t)
		if typ != FrameKeepAlive {
			return typ, p
		}
	}
}

func (rc *rawConn) write(t *testing.T, f []byte) {
	t.Helper()
	rc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := rc.Write(f); err != nil {
		t.Fatal(err)
	}
}

func TestPacketsBothWays(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	a, ra := tr.client(t, ns[0])
	b, rb := tr.client(t, ns[1])
	tstest.WaitFor(t, 5*time.Second, "both connected", func() bool { return a.Connected() && b.Connected() })

	sizes := []int{0, 1, 148, 1420, 9000, MaxPacket}
	var want [][]byte
	for i, n := range sizes {
		p := make([]byte, n)
		rand.Read(p)
		want = append(want, p)
		if err := a.Send(ns[1].key, p); err != nil {
			t.Fatalf("a send %d: %v", i, err)
		}
		if err := b.Send(ns[0].key, p); err != nil {
			t.Fatalf("b send %d: %v", i, err)
		}
	}
	if err := a.Send(ns[1].key, make([]byte, MaxPacket+1)); !errors.Is(err, ErrPacketTooLarge) {
		t.Fatalf("oversized send: %v, want ErrPacketTooLarge", err)
	}
	for _, c := range []struct {
		name string
		rx   *rx
		src  key.Public
	}{{"b", rb, ns[0].key}, {"a", ra, ns[1].key}} {
		tstest.WaitFor(t, 5*time.Second, c.name+" receives all packets", func() bool { return len(c.rx.packets()) >= len(want) })
		got := c.rx.packets()
		if len(got) != len(want) {
			t.Fatalf("%s got %d packets, want %d", c.name, len(got), len(want))
		}
		for i, p := range got {
			if p.src != c.src || !bytes.Equal(p.pkt, want[i]) {
				t.Fatalf("%s packet %d: src %v, %d bytes; want src %v, %d bytes", c.name, i, p.src, len(p.pkt), c.src, len(want[i]))
			}
		}
	}
	st := a.Stats()
	if st.PacketsSent != uint64(len(want)) || st.PacketsReceived != uint64(len(want)) || st.Connects != 1 {
		t.Fatalf("client stats %+v", st)
	}
	// The relay counts a packet after handing it to the receiver's writer,
	// so a packet can arrive before it is counted.
	tstest.WaitFor(t, 5*time.Second, "the relay to count every packet", func() bool {
		return tr.relay.Stats().PacketsRelayed >= 2*uint64(len(want))
	})
	if ss := tr.relay.Stats(); ss.Clients != 2 || ss.PacketsRelayed != 2*uint64(len(want)) {
		t.Fatalf("server stats %+v", ss)
	}
}

func TestSourceCannotBeSpoofed(t *testing.T) {
	ns := newNodes(3)
	tr := startRelay(t, ns)
	_, rb := tr.client(t, ns[1])
	tstest.WaitFor(t, 5*time.Second, "b connected", func() bool { return tr.relay.Stats().Clients == 1 })
	a, _ := tr.dialRaw(t, ns[0])
	// A frame claiming to come from c, in the server's own direction: the
	// server must ignore it.
	a.write(t, packetFrame(FrameRecvPacket, ns[2].key, []byte("forged")))
	// A send whose payload starts with c's key: the source is still a.
	a.write(t, packetFrame(FrameSendPacket, ns[1].key, append(ns[2].key.AppendTo(nil), "inner"...)))
	tstest.WaitFor(t, 5*time.Second, "b receives", func() bool { return len(rb.packets()) >= 1 })
	got := rb.packets()
	if len(got) != 1 || got[0].src != ns[0].key || !bytes.Equal(got[0].pkt, append(ns[2].key.AppendTo(nil), "inner"...)) {
		t.Fatalf("b got %+v, want one packet from a", got)
	}
}

func TestPeerGone(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	a, ra := tr.client(t, ns[0])
	tstest.WaitFor(t, 5*time.Second, "a connected", a.Connected)
	if err := a.Send(ns[1].key, []byte("hello?")); err != nil {
		t.Fatal(err)
	}
	tstest.WaitFor(t, 5*time.Second, "peer gone", func() bool { return len(ra.peersGone()) == 1 })
	if g := ra.peersGone()[0]; g != ns[1].key {
		t.Fatalf("peer gone for %v, want %v", g, ns[1].key)
	}
	if st := tr.relay.Stats(); st.PeerGone != 1 || st.PacketsRelayed != 0 {
		t.Fatalf("server stats %+v", st)
	}
}

func TestPolicyDrops(t *testing.T) {
	ns := newNodes(3)
	tr := startRelay(t, ns, func(c *ServerConfig) {
		c.Allowed = func(src, dst key.Public) bool { return src != ns[0].key || dst != ns[1].key }
	})
	a, _ := tr.client(t, ns[0])
	_, rb := tr.client(t, ns[1])
	c, _ := tr.client(t, ns[2])
	tstest.WaitFor(t, 5*time.Second, "all connected", func() bool { return tr.relay.Stats().Clients == 3 && a.Connected() && c.Connected() })
	a.Send(ns[1].key, []byte("denied"))
	c.Send(ns[1].key, []byte("allowed"))
	tstest.WaitFor(t, 5*time.Second, "c's packet", func() bool { return len(rb.packets()) >= 1 })
	tstest.WaitFor(t, 5*time.Second, "a's packet dropped", func() bool { return tr.relay.Stats().Dropped == 1 })
	if got := rb.packets(); len(got) != 1 || string(got[0].pkt) != "allowed" {
		t.Fatalf("b got %+v", got)
	}
}

func TestSecondConnectionReplacesFirst(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	first, _ := tr.dialRaw(t, ns[0])
	second, _ := tr.dialRaw(t, ns[0])
	first.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, _, err := readFrame(first.br, first.buf); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("first connection still open after the second connected")
			}
			break
		}
	}
	b, _ := tr.dialRaw(t, ns[1])
	b.write(t, packetFrame(FrameSendPacket, ns[0].key, []byte("to a")))
	typ, p := second.readPacket(t)
	if typ != FrameRecvPacket || key.PublicFromRaw([KeyLen]byte(p)) != ns[1].key || string(p[KeyLen:]) != "to a" {
		t.Fatalf("second connection got type %d %q", typ, p)
	}
	if st := tr.relay.Stats(); st.Clients != 2 || st.Accepted != 3 {
		t.Fatalf("server stats %+v", st)
	}
}

func TestMalformedFrameClosesConnection(t *testing.T) {
	ns := newNodes(1)
	tr := startRelay(t, ns)
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"keep-alive with payload", []byte{FrameKeepAlive, 0, 1, 'x'}},
		{"send shorter than a key", []byte{FrameSendPacket, 0, 3, 1, 2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := tr.dialRaw(t, ns[0])
			// An unknown frame type is skipped...
			c.write(t, []byte{200, 0, 2, 'h', 'i'})
			c.write(t, tc.frame)
			// ...the malformed one closes the connection.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				_, _, err := readFrame(c.br, c.buf)
				if err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatal("connection still open")
					}
					break
				}
			}
		})
	}
	tstest.WaitFor(t, 5*time.Second, "protocol error logged", func() bool { return tr.logs.contains("protocol error") })
}

func TestServerRestartReconnects(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	a, _ := tr.client(t, ns[0])
	b, rb := tr.client(t, ns[1])
	tstest.WaitFor(t, 5*time.Second, "both connected", func() bool { return a.Connected() && b.Connected() })
	addr := tr.addr
	tr.stop()
	tstest.WaitFor(t, 5*time.Second, "clients notice", func() bool { return !a.Connected() && !b.Connected() })
	if err := a.Send(ns[1].key, []byte("x")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("send while down: %v, want ErrNotConnected", err)
	}
	tr.start(addr)
	tstest.WaitFor(t, 10*time.Second, "both reconnected", func() bool { return a.Connected() && b.Connected() && tr.relay.Stats().Clients == 2 })
	if err := a.Send(ns[1].key, []byte("after restart")); err != nil {
		t.Fatal(err)
	}
	tstest.WaitFor(t, 5*time.Second, "packet after restart", func() bool { return len(rb.packets()) == 1 })
	if st := a.Stats(); st.Reconnects < 1 || st.Connects < 2 {
		t.Fatalf("client stats %+v", st)
	}
}

func TestUnknownKeyRefused(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns[:1])
	stranger := ns[1] // a valid key pair the mesh does not know
	if _, status := tr.dialRaw(t, stranger); status != http.StatusForbidden {
		t.Fatalf("upgrade by a key outside the mesh: %d, want 403", status)
	}
	before := tr.auths.Load()
	c, _ := tr.client(t, stranger)
	tstest.WaitFor(t, 5*time.Second, "several attempts", func() bool { return tr.auths.Load() >= before+3 })
	if c.Connected() {
		t.Fatal("connected with a key outside the mesh")
	}
	if e := c.Stats().LastError; !strings.Contains(e, "not a node of this mesh") || !strings.Contains(e, "403") {
		t.Fatalf("last error %q", e)
	}
	if !tr.logs.contains("relay connection failed; retrying") || !tr.logs.contains("relay upgrade refused") {
		t.Fatal("no clear log of the refusal")
	}
	if err := c.Send(ns[0].key, []byte("x")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("send: %v", err)
	}
}

// TestProofCannotBeForgedOrReplayed: claiming another node's key without its
// private key, proving to another relay key, and replaying a proof from
// another TLS session are all refused before Verify is asked.
func TestProofCannotBeForgedOrReplayed(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	victim, attacker := ns[0], ns[1]

	upgrade := func(t *testing.T, claim string, proof func(secret []byte) string) int {
		t.Helper()
		conn, err := tls.Dial("tcp", tr.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		cs := conn.ConnectionState()
		secret, err := sessionSecret(&cs)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest(http.MethodGet, tr.url()+Path, nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", Protocol)
		req.Header.Set(HeaderNodeKey, claim)
		req.Header.Set(HeaderProof, proof(secret))
		if err := req.Write(conn); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	otherRelay := key.NewPrivate()
	otherPub := otherRelay.Public()
	var stale string // a valid proof from an earlier session
	if st := upgrade(t, victim.key.String(), func(secret []byte) string {
		stale, _ = makeProof(secret, victim.priv, tr.pub)
		return stale
	}); st != http.StatusSwitchingProtocols {
		t.Fatalf("genuine proof: %d", st)
	}
	before := tr.auths.Load()
	for _, tc := range []struct {
		name  string
		proof func(secret []byte) string
	}{
		{"attacker's key claiming the victim", func(s []byte) string { p, _ := makeProof(s, attacker.priv, tr.pub); return p }},
		{"made for another relay", func(s []byte) string { p, _ := makeProof(s, victim.priv, otherPub); return p }},
		{"replayed from another session", func([]byte) string { return stale }},
		{"garbage", func([]byte) string { return "not base64!" }},
		{"empty", func([]byte) string { return "" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if st := upgrade(t, victim.key.String(), tc.proof); st != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", st)
			}
		})
	}
	if tr.auths.Load() != before {
		t.Fatal("Verify asked about a key whose proof failed")
	}

	// The all-zero key is a low-order point: a box to or from it is sealed
	// with an all-zero shared key whatever the private key, so anyone can
	// make a proof that opens. Even with the key in the relay's table, the
	// claim is refused at parse time.
	var zero key.Public
	tr.nodes[zero] = node{key: zero}
	zeroB64 := base64.StdEncoding.EncodeToString(make([]byte, key.Len))
	forged := func(secret []byte) string {
		var nonce [24]byte
		var zeroPub [32]byte
		attackerPriv := attacker.priv.Raw()
		return base64.StdEncoding.EncodeToString(box.Seal(nonce[:], secret, &nonce, &zeroPub, &attackerPriv))
	}
	// The forgery itself is sound: it opens under any private key.
	var nonce [24]byte
	anyPriv := key.NewPrivate().Raw()
	var zeroPub [32]byte
	sealed, _ := base64.StdEncoding.DecodeString(forged([]byte("secret")))
	if _, ok := box.Open(nil, sealed[24:], &nonce, &zeroPub, &anyPriv); !ok {
		t.Fatal("the zero-key forgery does not open; the attack test is broken")
	}
	if st := upgrade(t, zeroB64, forged); st != http.StatusUnauthorized {
		t.Fatalf("all-zero key with a forged proof: status %d, want 401", st)
	}
	if tr.auths.Load() != before {
		t.Fatal("Verify asked about the all-zero key")
	}
}

func TestWrongFingerprint(t *testing.T) {
	ns := newNodes(1)
	tr := startRelay(t, ns)
	before := tr.auths.Load()
	c, _ := tr.client(t, ns[0], func(c *ClientConfig) { c.Fingerprint = strings.Repeat("ab", 32) })
	tstest.WaitFor(t, 5*time.Second, "error", func() bool { return strings.Contains(c.Stats().LastError, "fingerprint") })
	if tr.auths.Load() != before {
		t.Fatal("a proof reached a server with the wrong certificate")
	}
}

func TestHTTPRefusals(t *testing.T) {
	ns := newNodes(1)
	tr := startRelay(t, ns)
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}}
	defer cl.CloseIdleConnections()
	for _, tc := range []struct {
		name, method string
		upgrade      bool
		want         int
	}{
		{"post", http.MethodPost, true, http.StatusMethodNotAllowed},
		{"no upgrade (h2)", http.MethodGet, false, http.StatusHTTPVersionNotSupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, tr.url()+Path, nil)
			resp, err := cl.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
}

func TestCloseLeavesNoGoroutines(t *testing.T) {
	ns := newNodes(2)
	tr := startRelay(t, ns)
	a, _ := tr.client(t, ns[0])
	b, _ := tr.client(t, ns[1])
	tstest.WaitFor(t, 5*time.Second, "both connected", func() bool { return a.Connected() && b.Connected() })
	a.Close()
	a.Close() // idempotent
	if err := a.Send(ns[1].key, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("send after close: %v", err)
	}
	tr.stop()
	b.Close()
	tstest.WaitGoroutinesGone(t)
	// A client that never connected closes too.
	c := NewClient(ClientConfig{URL: "https://127.0.0.1:1", RetryMin: time.Millisecond})
	c.Start()
	c.Close()
	tstest.WaitGoroutinesGone(t)
}

func TestKeepAlive(t *testing.T) {
	ns := newNodes(1)
	tr := startRelay(t, ns, func(c *ServerConfig) { c.KeepAlive = 20 * time.Millisecond })
	c, _ := tr.dialRaw(t, ns[0])
	if typ, _ := c.read(t); typ != FrameKeepAlive {
		t.Fatalf("frame type %d, want keep-alive", typ)
	}
}

// The relay connection outlives the HTTP server's header, idle and write
// timeouts: the handler clears the deadlines after hijacking.
func TestSurvivesHTTPServerTimeouts(t *testing.T) {
	ns := newNodes(2)
	const short = 50 * time.Millisecond
	tr := startRelayHTTP(t, ns, func(s *http.Server) {
		s.ReadHeaderTimeout, s.ReadTimeout, s.WriteTimeout, s.IdleTimeout = short, short, short, short
	})
	a, _ := tr.client(t, ns[0])
	b, rb := tr.client(t, ns[1])
	tstest.WaitFor(t, 5*time.Second, "both connected", func() bool { return a.Connected() && b.Connected() })
	// Stays a sleep: outliving the timeouts is the point of the test, and
	// what it proves is that nothing happens (no drop, no reconnect), which
	// no event announces. The connections run over real loopback sockets,
	// which a synctest bubble cannot carry; 6× leaves the client time to
	// notice a drop, if the server's deadlines were still set.
	time.Sleep(6 * short)
	if err := a.Send(ns[1].key, []byte("still here")); err != nil {
		t.Fatal(err)
	}
	tstest.WaitFor(t, 5*time.Second, "packet", func() bool { return len(rb.packets()) == 1 })
	if a.Stats().Connects != 1 || b.Stats().Connects != 1 {
		t.Fatalf("a connection was dropped: %+v %+v", a.Stats(), b.Stats())
	}
}

// BenchmarkRelay measures one-way throughput of 1400-byte packets between
// two clients through a relay on loopback, keeping a bounded window in
// flight so that nothing is dropped.
func BenchmarkRelay(b *testing.B) {
	ns := newNodes(2)
	tr := startRelay(b, ns)
	tr.log = slog.New(slog.DiscardHandler)
	var got atomic.Int64
	a, _ := tr.client(b, ns[0])
	tr.client(b, ns[1], func(c *ClientConfig) { c.OnPacket = func(key.Public, []byte) { got.Add(1) } })
	tstest.WaitFor(b, 5*time.Second, "both clients connected", func() bool { return tr.relay.Stats().Clients >= 2 && a.Connected() })
	pkt := make([]byte, 1400)
	const window = 128
	b.SetBytes(int64(len(pkt)))
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		for int64(i)-got.Load() >= window {
			runtime.Gosched()
		}
		for a.Send(ns[1].key, pkt) != nil {
			runtime.Gosched()
		}
	}
	for got.Load() < int64(b.N) {
		runtime.Gosched()
	}
	el := time.Since(start)
	b.ReportMetric(float64(b.N)/el.Seconds(), "pkts/s")
}

// TestClientRequiresTLS13: relays speak TLS 1.3 only, so a server that
// offers at most TLS 1.2 is an impostor or a downgrade; the client refuses
// it in the handshake, before its key proof is sent.
func TestClientRequiresTLS13(t *testing.T) {
	ns := newNodes(1)
	tr := startRelayHTTP(t, ns, func(s *http.Server) { s.TLSConfig.MaxVersion = tls.VersionTLS12 })
	c, _ := tr.client(t, ns[0])
	tstest.WaitFor(t, 5*time.Second, "a refused handshake", func() bool { return strings.Contains(c.Stats().LastError, "protocol version") })
	if c.Connected() || tr.auths.Load() != 0 {
		t.Fatalf("the client spoke to a TLS 1.2 relay: connected %v, proofs checked %d", c.Connected(), tr.auths.Load())
	}
}
