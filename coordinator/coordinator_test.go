package coordinator

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tlscert"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/pgtest"
	"github.com/meshlink/meshlink/wire"
)

func TestRegister(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), false)
	base := s.URL()
	ctx := context.Background()

	once := mustToken(t, s, TokenOptions{})
	reusable := mustToken(t, s, TokenOptions{Reusable: true, Tags: []string{"tag:web"}})
	used := mustToken(t, s, TokenOptions{})
	register(t, c, used, "first")
	expiredSecret := "expired-secret-0123456789"
	if err := s.Store().CreateToken(ctx, store.Token{ID: "expired1", SecretHash: store.HashSecret(expiredSecret), Expires: time.Now().Add(-time.Second)}); err != nil {
		t.Fatal(err)
	}
	takenPriv := key.NewPrivate()
	takenKey := takenPriv.Public()
	if st, b := call(t, c, base, wire.PathRegister, nil, wire.RegisterRequest{Version: 1, TokenID: reusable.ID, TokenSecret: reusable.Secret, Name: "taken", NodeKey: takenKey}); st != 200 {
		t.Fatalf("register taken: %d %s", st, b)
	}

	req := func(tok wire.JoinToken, name string) wire.RegisterRequest {
		return wire.RegisterRequest{Version: wire.ProtocolVersion, TokenID: tok.ID, TokenSecret: tok.Secret, Name: name, NodeKey: newKey(t), ListenPort: 5555}
	}
	tests := []struct {
		name       string
		body       any
		wantStatus int
		wantCode   string
	}{
		{"ok single-use", req(once, "alpha"), 200, ""},
		{"ok reusable", req(reusable, "Beta "), 200, ""},
		{"wrong secret", func() any { r := req(reusable, "gamma"); r.TokenSecret = "not-the-secret-xxxxxxxx"; return r }(), 401, wire.ErrCodeTokenInvalid},
		{"unknown token", func() any { r := req(reusable, "gamma"); r.TokenID = "ffffffffffffffff"; return r }(), 401, wire.ErrCodeTokenInvalid},
		{"expired", wire.RegisterRequest{Version: 1, TokenID: "expired1", TokenSecret: expiredSecret, Name: "gamma", NodeKey: newKey(t)}, 401, wire.ErrCodeTokenExpired},
		{"used up", req(used, "gamma"), 401, wire.ErrCodeTokenUsed},
		{"malformed json", []byte(`{"version":1,"token_id":`), 400, wire.ErrCodeBadRequest},
		{"not json", []byte("hello"), 400, wire.ErrCodeBadRequest},
		{"empty body", []byte(""), 400, wire.ErrCodeBadRequest},
		{"trailing garbage", []byte(`{"version":1} {}`), 400, wire.ErrCodeBadRequest},
		{"version zero", func() any { r := req(reusable, "gamma"); r.Version = 0; return r }(), 426, wire.ErrCodeVersion},
		{"version from the future", func() any { r := req(reusable, "gamma"); r.Version = wire.ProtocolVersion + 1; return r }(), 426, wire.ErrCodeVersion},
		{"bad name", req(reusable, "no_underscores"), 400, wire.ErrCodeBadRequest},
		{"bad key", withKey(req(reusable, "gamma"), "abc"), 400, wire.ErrCodeBadRequest},
		// The all-zero key is a low-order point: whoever registers it can be
		// impersonated by anyone (a relay proof for it needs no private key).
		{"all-zero key", withKey(req(reusable, "gamma"), "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="), 400, wire.ErrCodeBadRequest},
		{"no key", withKey(req(reusable, "gamma"), ""), 400, wire.ErrCodeBadRequest},
		{"name in use", req(reusable, "taken"), 409, wire.ErrCodeNameInUse},
		{"same key again without proof", wire.RegisterRequest{Version: 1, TokenID: reusable.ID, TokenSecret: reusable.Secret, Name: "taken", NodeKey: takenKey}, 409, wire.ErrCodeNameInUse},
		{"same key again with proof renews", wire.RegisterRequest{Version: wire.ProtocolVersion, TokenID: reusable.ID, TokenSecret: reusable.Secret, Name: "taken", NodeKey: takenKey,
			KeyProof: keyProof(takenPriv, serverKey(t, c, base), "taken", time.Now())}, 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, body := call(t, c, base, wire.PathRegister, nil, tc.body)
			if st != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", st, tc.wantStatus, body)
			}
			if tc.wantCode != "" {
				if got := errCode(t, body); got != tc.wantCode {
					t.Fatalf("code %q, want %q (%s)", got, tc.wantCode, body)
				}
				return
			}
			var rr wire.RegisterResponse
			if err := json.Unmarshal(body, &rr); err != nil {
				t.Fatal(err)
			}
			if rr.NodeSecret == "" || rr.Domain != wire.DefaultDomain || len(rr.Node.Addresses) != 2 ||
				!wire.NodePrefix4.Contains(rr.Node.Addresses[0].Addr()) || !wire.NodePrefix6.Contains(rr.Node.Addresses[1].Addr()) {
				t.Fatalf("bad response %+v", rr)
			}
			if len(rr.Node.Endpoints) > 0 && rr.Node.Endpoints[0].Addr().String() != "127.0.0.1" {
				t.Fatalf("first endpoint should be the observed address: %v", rr.Node.Endpoints)
			}
		})
	}

	nodes, err := s.Store().ListNodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(nodes); n != 4 {
		t.Fatalf("%d nodes, want 4 (first, taken, alpha, beta)", n)
	}
	for _, n := range nodes {
		if n.Name == "beta" && (len(n.Tags) != 1 || n.Tags[0] != "tag:web") {
			t.Fatalf("beta did not get the token's tags: %+v", n)
		}
	}
}

func TestAuthenticatedCalls(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, a := register(t, c, jt, "a")
	_, b := register(t, c, jt, "b")
	base := s.URL()

	tests := []struct {
		name       string
		path       string
		cr         *creds
		body       any
		wantStatus int
		wantCode   string
	}{
		{"no credentials", wire.PathServices, nil, wire.ServiceRequest{Version: 1, Name: "db", Port: 5432}, 401, wire.ErrCodeUnauthorized},
		{"wrong secret", wire.PathServices, &creds{a.ID, "nope"}, wire.ServiceRequest{Version: 1, Name: "db", Port: 5432}, 401, wire.ErrCodeUnauthorized},
		{"expose", wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "db", Port: 5432}, 200, ""},
		{"expose again", wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "db", Port: 5433}, 200, ""},
		{"expose port 0", wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "web"}, 400, wire.ErrCodeBadRequest},
		{"expose bad name", wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "-web", Port: 80}, 400, wire.ErrCodeBadRequest},
		{"unexpose not provided", wire.PathServices, &b, wire.ServiceRequest{Version: 1, Name: "db", Remove: true}, 404, wire.ErrCodeNotFound},
		{"services version", wire.PathServices, &a, wire.ServiceRequest{Version: wire.ProtocolVersion + 1, Name: "db", Port: 1}, 426, wire.ErrCodeVersion},
		{"endpoints", wire.PathEndpoints, &b, wire.EndpointsRequest{Version: 1, ListenPort: 1000}, 200, ""},
		{"endpoints garbled", wire.PathEndpoints, &b, []byte("{{"), 400, wire.ErrCodeBadRequest},
		{"leave", wire.PathLeave, &b, wire.LeaveRequest{Version: 1}, 200, ""},
		{"after leave", wire.PathEndpoints, &b, wire.EndpointsRequest{Version: 1}, 401, wire.ErrCodeNodeRemoved},
		{"inspect", wire.PathTokenInspect, nil, wire.TokenInspectRequest{TokenID: jt.ID, TokenSecret: jt.Secret}, 200, ""},
		{"inspect wrong secret", wire.PathTokenInspect, nil, wire.TokenInspectRequest{TokenID: jt.ID, TokenSecret: "x"}, 401, wire.ErrCodeTokenInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, body := call(t, c, base, tc.path, tc.cr, tc.body)
			if st != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", st, tc.wantStatus, body)
			}
			if tc.wantCode != "" {
				if got := errCode(t, body); got != tc.wantCode {
					t.Fatalf("code %q, want %q (%s)", got, tc.wantCode, body)
				}
			}
		})
	}
	// Its only provider's new --port is the service's port now; it kept
	// the first VIP.
	st, body := call(t, c, base, wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "db", Port: 6000})
	var sr wire.ServiceResponse
	json.Unmarshal(body, &sr)
	if st != 200 || sr.Service.VIP.String() != "100.100.0.1" || sr.Service.Port != 6000 || len(sr.Service.Providers) != 1 || sr.Service.Providers[0].Port != 6000 {
		t.Fatalf("service: %d %s", st, body)
	}
	var info wire.TokenInfo
	_, body = call(t, c, base, wire.PathTokenInspect, nil, wire.TokenInspectRequest{TokenID: jt.ID, TokenSecret: jt.Secret})
	json.Unmarshal(body, &info)
	if !info.Reusable || info.UsesLeft != -1 {
		t.Fatalf("token info %+v", info)
	}

	resp, err := c.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS.Version != 0x0304 {
		t.Fatalf("healthz: %d, TLS %x", resp.StatusCode, resp.TLS.Version)
	}
}

func TestMapStream(t *testing.T) {
	for _, tc := range []struct {
		name string
		h2   bool
	}{{"http1", false}, {"http2", true}} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(c *Config) { c.KeepAlive = 100 * time.Millisecond })
			c := pinnedClient(t, s.Fingerprint(), tc.h2)
			base := s.URL()
			jt := mustToken(t, s, TokenOptions{Reusable: true})
			ra, a := register(t, c, jt, "a")
			_, b := register(t, c, jt, "b")

			sa := openMap(t, c, base, a)
			full := sa.next(t, time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
			if full.Seq != 1 || full.Full.Self.ID != ra.Node.ID || !full.Full.Self.Online || len(full.Full.Peers) != 1 ||
				full.Full.Peers[0].Name != "b" || full.Full.Peers[0].Online || full.Full.Domain != wire.DefaultDomain {
				t.Fatalf("bad full map: %+v", full.Full)
			}

			// A keep-alive arrives on an idle stream.
			tstest.WaitFor(t, 2*time.Second, "keep-alive", func() bool {
				select {
				case m := <-sa.msgs:
					return m.IsKeepAlive()
				default:
					return false
				}
			})

			// b exposes a service: a learns it within a second.
			start := time.Now()
			if st, body := call(t, c, base, wire.PathServices, &b, wire.ServiceRequest{Version: 1, Name: "db", Port: 5432}); st != 200 {
				t.Fatalf("expose: %d %s", st, body)
			}
			m := sa.next(t, time.Second, "ServicesChanged", func(m wire.MapResponse) bool { return len(m.ServicesChanged) > 0 })
			sv := m.ServicesChanged[0]
			if sv.Name != "db" || sv.VIP.String() != "100.100.0.1" || sv.Port != 5432 || len(sv.Providers) != 1 || sv.Providers[0].Node != b.ID || sv.AllowedNodes[0] != "*" {
				t.Fatalf("bad service %+v", sv)
			}
			t.Logf("expose reached the stream in %v", time.Since(start))

			// A third node joins: PeersChanged.
			rc, cc := register(t, c, jt, "c")
			sa.next(t, time.Second, "PeersChanged with c", func(m wire.MapResponse) bool {
				n, ok := nodeNamed(m.PeersChanged, "c")
				return ok && n.ID == rc.Node.ID && len(n.Addresses) == 2
			})

			// b comes online, then its stream closes: a sees both.
			sb := openMap(t, c, base, b)
			sb.next(t, time.Second, "b full map", func(m wire.MapResponse) bool { return m.Full != nil && len(m.Full.Services) == 1 })
			sa.next(t, time.Second, "b online", func(m wire.MapResponse) bool { n, ok := nodeNamed(m.PeersChanged, "b"); return ok && n.Online })
			sb.close()
			sa.next(t, time.Second, "b offline", func(m wire.MapResponse) bool {
				n, ok := nodeNamed(m.PeersChanged, "b")
				return ok && !n.Online && !n.LastSeen.IsZero()
			})

			// b unexposes: the service disappears from the map (its VIP is kept).
			if st, body := call(t, c, base, wire.PathServices, &b, wire.ServiceRequest{Version: 1, Name: "db", Remove: true}); st != 200 {
				t.Fatalf("unexpose: %d %s", st, body)
			}
			sa.next(t, time.Second, "ServicesRemoved", func(m wire.MapResponse) bool { return len(m.ServicesRemoved) == 1 && m.ServicesRemoved[0] == "db" })

			// c leaves: PeersRemoved.
			if st, body := call(t, c, base, wire.PathLeave, &cc, wire.LeaveRequest{Version: 1}); st != 200 {
				t.Fatalf("leave: %d %s", st, body)
			}
			sa.next(t, time.Second, "PeersRemoved c", func(m wire.MapResponse) bool { return len(m.PeersRemoved) == 1 && m.PeersRemoved[0] == rc.Node.ID })

			// a's own endpoints change: Self.
			if st, body := call(t, c, base, wire.PathEndpoints, &a, wire.EndpointsRequest{Version: 1, ListenPort: 999}); st != 200 {
				t.Fatalf("endpoints: %d %s", st, body)
			}
			sa.next(t, time.Second, "Self", func(m wire.MapResponse) bool { return m.Self != nil && m.Self.Endpoints[0].Port() == 999 })

			// A second stream for a replaces the first.
			sa2 := openMap(t, c, base, a)
			sa2.next(t, time.Second, "full map on new stream", func(m wire.MapResponse) bool { return m.Full != nil })
			select {
			case <-sa.done:
			case <-time.After(2 * time.Second):
				t.Fatal("old stream was not closed when replaced")
			}

			// Sequence numbers grow by one per change on a stream.
			_ = sa2
		})
	}
}

func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	s1 := startServer(t, dir)
	c := pinnedClient(t, s1.Fingerprint(), false)
	jt := mustToken(t, s1, TokenOptions{Reusable: true})
	ra, a := register(t, c, jt, "a")
	call(t, c, s1.URL(), wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "web", Port: 80})
	st, body := call(t, c, s1.URL(), wire.PathServices, &a, wire.ServiceRequest{Version: 1, Name: "db", Port: 5432})
	var db1 wire.ServiceResponse
	json.Unmarshal(body, &db1)
	if st != 200 {
		t.Fatal(st, string(body))
	}
	fp := s1.Fingerprint()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	s2 := startServer(t, dir)
	if s2.Fingerprint() != fp {
		t.Fatalf("fingerprint changed across restart: %s -> %s", fp, s2.Fingerprint())
	}
	c2 := pinnedClient(t, fp, false)
	// The old node's credentials still work and its map is intact.
	sa := openMap(t, c2, s2.URL(), a)
	full := sa.next(t, time.Second, "full map", func(m wire.MapResponse) bool { return m.Full != nil })
	if full.Full.Self.ID != ra.Node.ID || full.Full.Self.Addresses[0] != ra.Node.Addresses[0] || len(full.Full.Services) != 2 {
		t.Fatalf("state lost on restart: %+v", full.Full)
	}
	for _, sv := range full.Full.Services {
		if sv.Name == "db" && sv.VIP != db1.Service.VIP {
			t.Fatalf("VIP changed: %v -> %v", db1.Service.VIP, sv.VIP)
		}
	}
	// The token survived too (the URL moved with the new port).
	jt.URL = s2.URL()
	register(t, c2, jt, "b")
	sa.next(t, time.Second, "b joined", func(m wire.MapResponse) bool { _, ok := nodeNamed(m.PeersChanged, "b"); return ok })
}

func TestEphemeralNodeRemovedAfterGrace(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.EphemeralGrace = 100 * time.Millisecond })
	c := pinnedClient(t, s.Fingerprint(), false)
	base := s.URL()
	_, a := register(t, c, mustToken(t, s, TokenOptions{}), "a")
	eph := mustToken(t, s, TokenOptions{Ephemeral: true, Reusable: true})
	re, e := register(t, c, eph, "ci-job")
	if !re.Node.Ephemeral {
		t.Fatal("node from ephemeral token is not ephemeral")
	}
	call(t, c, base, wire.PathServices, &e, wire.ServiceRequest{Version: 1, Name: "cache", Port: 6379})
	sa := openMap(t, c, base, a)
	sa.next(t, time.Second, "full", func(m wire.MapResponse) bool { return m.Full != nil && len(m.Full.Services) == 1 })
	se := openMap(t, c, base, e)
	sa.next(t, time.Second, "ephemeral online", func(m wire.MapResponse) bool { n, ok := nodeNamed(m.PeersChanged, "ci-job"); return ok && n.Online })
	se.close()
	m := sa.next(t, 2*time.Second, "ephemeral removed", func(m wire.MapResponse) bool { return len(m.PeersRemoved) == 1 })
	if m.PeersRemoved[0] != re.Node.ID {
		t.Fatalf("removed %v", m.PeersRemoved)
	}
	if len(m.ServicesRemoved) != 1 {
		sa.next(t, time.Second, "its service removed", func(m wire.MapResponse) bool { return len(m.ServicesRemoved) == 1 })
	}
	// The name is free again.
	register(t, c, eph, "ci-job")
}

func TestEphemeralOfflineNameIsReplaced(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.EphemeralGrace = time.Hour })
	c := pinnedClient(t, s.Fingerprint(), false)
	eph := mustToken(t, s, TokenOptions{Ephemeral: true, Reusable: true})
	r1, _ := register(t, c, eph, "sidecar")
	r2, _ := register(t, c, eph, "sidecar")
	if r1.Node.ID == r2.Node.ID {
		t.Fatal("offline ephemeral node was not replaced")
	}
}

// TestEphemeralOnlineNameReplacedBySameToken: a pod recreated under the
// same name while its predecessor still looks online (its network went
// away with it) replaces it with the very token that joined it; another
// ephemeral token of the same owner does not, and gets name_in_use.
func TestEphemeralOnlineNameReplacedBySameToken(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.EphemeralGrace = time.Hour })
	c := pinnedClient(t, s.Fingerprint(), false)
	eph := mustToken(t, s, TokenOptions{Ephemeral: true, Reusable: true})
	other := mustToken(t, s, TokenOptions{Ephemeral: true, Reusable: true})
	r1, cr1 := register(t, c, eph, "web-0")
	st1 := openMap(t, c, eph.URL, cr1)
	st1.next(t, 5*time.Second, "the first map", func(m wire.MapResponse) bool { return m.Full != nil })

	st, body := call(t, c, other.URL, wire.PathRegister, nil, wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: other.ID, TokenSecret: other.Secret, Name: "web-0", NodeKey: newKey(t), ListenPort: 41641,
	})
	if st != http.StatusConflict || errCode(t, body) != wire.ErrCodeNameInUse {
		t.Fatalf("another token on an online ephemeral name: %d %s; want 409 name_in_use", st, body)
	}
	r2, _ := register(t, c, eph, "web-0")
	if r2.Node.ID == r1.Node.ID {
		t.Fatal("the online ephemeral node was not replaced by its own token")
	}
	// The old stream ends: its node is gone.
	deadline := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-st1.msgs:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("the replaced node's map stream did not end")
		}
	}
}

func TestAdminSocket(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	if _, err := NewAdminClient(dir).CreateToken(ctx, TokenOptions{}); err == nil || !strings.Contains(err.Error(), "no coordinator is running with --data "+dir) {
		t.Fatalf("missing socket: %v", err)
	}
	// A stale socket file nobody answers on is cleaned up.
	ln, err := net.Listen("unix", filepath.Join(dir, adminSocket))
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := NewAdminClient(dir).CreateToken(ctx, TokenOptions{}); err == nil || !strings.Contains(err.Error(), "no coordinator is running") {
		t.Fatalf("stale socket: %v", err)
	}

	s := startServer(t, dir)
	fi, err := os.Stat(filepath.Join(dir, adminSocket))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode: %v %v", fi.Mode(), err)
	}
	str, err := NewAdminClient(dir).CreateToken(ctx, TokenOptions{Reusable: true, Expires: time.Hour, Tags: []string{"tag:ci"}})
	if err != nil {
		t.Fatal(err)
	}
	jt, err := wire.ParseToken(str)
	if err != nil {
		t.Fatal(err)
	}
	if jt.Fingerprint != s.Fingerprint() || jt.URL != s.URL() || jt.ExpiresAt().IsZero() {
		t.Fatalf("token %+v does not match server %s %s", jt, s.URL(), s.Fingerprint())
	}
	c := pinnedClient(t, jt.Fingerprint, false)
	register(t, c, jt, "via-admin")

	nodes, err := NewAdminClient(dir).Nodes(ctx)
	if err != nil || len(nodes) != 1 || nodes[0].Name != "via-admin" || nodes[0].Tags[0] != "tag:ci" {
		t.Fatalf("list nodes: %+v %v", nodes, err)
	}
	if err := NewAdminClient(dir).RemoveNode(ctx, "nope"); err == nil {
		t.Fatal("removing an unknown node succeeded")
	}
	if err := NewAdminClient(dir).RemoveNode(ctx, "via-admin"); err != nil {
		t.Fatal(err)
	}
	if nodes, _ := NewAdminClient(dir).Nodes(ctx); len(nodes) != 0 {
		t.Fatalf("node not removed: %+v", nodes)
	}
	if svcs, err := NewAdminClient(dir).Services(ctx); err != nil || len(svcs) != 0 {
		t.Fatalf("services: %v %v", svcs, err)
	}

	// A second coordinator on the same data directory refuses to start.
	s2, err := New(Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if err := s2.Start(ctx); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second coordinator: %v", err)
	}
}

func TestStartErrors(t *testing.T) {
	s := startServer(t, t.TempDir())
	busy := s.Addr().String()
	s2, err := New(Config{Listen: busy, DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	err = s2.Start(context.Background())
	want := "coordinator: listen " + busy + ": address already in use; choose another --listen"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}

	if os.Geteuid() != 0 {
		ro := t.TempDir()
		os.Chmod(ro, 0o500)
		defer os.Chmod(ro, 0o700)
		if _, err := New(Config{Listen: "127.0.0.1:0", DataDir: ro}); err == nil || !strings.Contains(err.Error(), ro) {
			t.Fatalf("read-only data dir: %v", err)
		}
	}
	if _, err := New(Config{Listen: "127.0.0.1:0", DataDir: "/proc/meshlink-nope"}); err == nil || !strings.Contains(err.Error(), "/proc/meshlink-nope") {
		t.Fatalf("uncreatable data dir: %v", err)
	}
}

func TestFirstStartOutput(t *testing.T) {
	dir := t.TempDir()
	var out strings.Builder
	s, err := New(Config{Listen: "127.0.0.1:0", DataDir: dir, Out: &out})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	first := out.String()
	// The output names the password's file, never the password.
	pwFile := filepath.Join(dir, AdminPasswordFile)
	b, err := os.ReadFile(pwFile)
	pw := strings.TrimSpace(string(b))
	if fi, serr := os.Stat(pwFile); err != nil || serr != nil || fi.Mode().Perm() != 0o600 || len(pw) < 16 {
		t.Fatalf("admin password file %s: %v %v %v", pwFile, fi.Mode(), err, serr)
	}
	u, err := s.Store().GetUser(context.Background(), "admin")
	if err != nil || !u.Admin || !u.MustChangePassword || bcrypt.CompareHashAndPassword([]byte(u.PasswordHash), []byte(pw)) != nil {
		t.Fatalf("admin account does not match the password file: %+v %v", u, err)
	}
	s.Close()
	if strings.Contains(first, pw) || !strings.Contains(first, "admin account: username admin, password in "+pwFile+"\n") ||
		!strings.Contains(first, "meshlink coordinator listening on "+s.URL()+" (fingerprint "+s.Fingerprint()+")") {
		t.Fatalf("first start output: %q", first)
	}
	for _, f := range []string{"key.pem", "meshlink.db"} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || f == "key.pem" && fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, fi.Mode(), err)
		}
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 && !strings.HasPrefix(dir, os.TempDir()) {
		t.Fatalf("data dir mode %v", fi.Mode())
	}
	out.Reset()
	s, err = New(Config{Listen: "127.0.0.1:0", DataDir: dir, Out: &out})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if strings.Contains(out.String(), "password") || !strings.Contains(out.String(), "listening on") {
		t.Fatalf("second start output: %q", out.String())
	}
}

func TestMain(m *testing.M) { tstest.Main(m, pgtest.Stop) }

func TestConcurrentRegistrationSingleUseToken(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	jt := mustToken(t, s, TokenOptions{})
	const n = 8
	codes := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i], _ = call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{
				Version: 1, TokenID: jt.ID, TokenSecret: jt.Secret, Name: fmt.Sprintf("racer%d", i), NodeKey: newKey(t),
			})
		}()
	}
	wg.Wait()
	ok := 0
	for _, c := range codes {
		if c == 200 {
			ok++
		} else if c != 401 {
			t.Errorf("unexpected status %d", c)
		}
	}
	nodes, _ := s.Store().ListNodes(context.Background())
	if ok != 1 || len(nodes) != 1 {
		t.Fatalf("%d registrations succeeded and %d nodes exist; want 1", ok, len(nodes))
	}
}

func TestAdminRemoveEndsStreamAndRevokes(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	ctx := context.Background()
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, a := register(t, c, jt, "a")
	_, b := register(t, c, jt, "b")
	sa := openMap(t, c, s.URL(), a)
	sb := openMap(t, c, s.URL(), b)
	sa.next(t, time.Second, "full", func(m wire.MapResponse) bool { return m.Full != nil })
	sb.next(t, time.Second, "full", func(m wire.MapResponse) bool { return m.Full != nil })
	if err := NewAdminClient(dir).RemoveNode(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	sa.next(t, time.Second, "b removed", func(m wire.MapResponse) bool { return len(m.PeersRemoved) == 1 && m.PeersRemoved[0] == b.ID })
	select {
	case <-sb.done:
	case <-time.After(2 * time.Second):
		t.Fatal("removed node's stream still open")
	}
	st, body := call(t, c, s.URL(), wire.PathMap, &b, wire.MapRequest{Version: 1})
	if st != 401 || errCode(t, body) != wire.ErrCodeNodeRemoved {
		t.Fatalf("removed node's map call: %d %s", st, body)
	}

	toks, err := NewAdminClient(dir).Tokens(ctx)
	if err != nil || len(toks) != 1 || toks[0].ID != jt.ID || toks[0].UsesLeft != -1 {
		t.Fatalf("tokens: %+v %v", toks, err)
	}
	if err := NewAdminClient(dir).RevokeToken(ctx, jt.ID); err != nil {
		t.Fatal(err)
	}
	st, body = call(t, c, s.URL(), wire.PathRegister, nil, wire.RegisterRequest{Version: 1, TokenID: jt.ID, TokenSecret: jt.Secret, Name: "late", NodeKey: newKey(t)})
	if st != 401 || errCode(t, body) != wire.ErrCodeTokenInvalid || !strings.Contains(string(body), "revoked") {
		t.Fatalf("revoked token: %d %s", st, body)
	}
}

// BenchmarkUpdateLatency measures how long an expose takes to reach another
// node's map stream.
func BenchmarkUpdateLatency(b *testing.B) {
	dir := b.TempDir()
	s, err := New(Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	tt := b
	c := pinnedClient(tt, s.Fingerprint(), true)
	jt := mustToken(tt, s, TokenOptions{Reusable: true})
	_, a := register(tt, c, jt, "a")
	_, p := register(tt, c, jt, "p")
	sa := openMap(tt, c, s.URL(), a)
	defer sa.close()
	<-sa.msgs
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		call(tt, c, s.URL(), wire.PathServices, &p, wire.ServiceRequest{Version: 1, Name: "svc", Port: uint16(1000 + i%2), Remove: i%2 == 1})
		for m := range sa.msgs {
			if !m.IsKeepAlive() {
				break
			}
		}
		total += time.Since(start)
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Microseconds())/float64(b.N), "µs/update")
}

func TestCertificateAndURL(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, func(c *Config) { c.Listen = "0.0.0.0:0" })
	u, err := url.Parse(s.URL())
	if err != nil || u.Scheme != "https" || u.Hostname() == "0.0.0.0" || u.Port() != strconv.Itoa(int(s.Addr().Port())) {
		t.Fatalf("URL %q for a wildcard listener", s.URL())
	}
	if u.Hostname() != tlscert.DefaultHostIP().String() {
		t.Fatalf("URL host %s, want %s", u.Hostname(), tlscert.DefaultHostIP())
	}
	raw, err := os.ReadFile(filepath.Join(dir, "cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(raw)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if wire.CertFingerprint(cert.Raw) != s.Fingerprint() {
		t.Fatal("fingerprint is not the certificate's")
	}
	for _, h := range []string{"localhost", "127.0.0.1", "::1", u.Hostname()} {
		if err := cert.VerifyHostname(h); err != nil {
			t.Errorf("certificate SANs: %v", err)
		}
	}
	if pk, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || pk.Curve.Params().Name != "P-256" {
		t.Errorf("key is not ECDSA P-256: %T", cert.PublicKey)
	}
	if years := cert.NotAfter.Sub(cert.NotBefore).Hours() / 24 / 365; years < 9.9 {
		t.Errorf("certificate valid for %.1f years", years)
	}
	// New refuses an explicit URL that is not https.
	if _, err := New(Config{DataDir: t.TempDir(), URL: "http://x"}); err == nil {
		t.Error("accepted a non-https URL")
	}
}

// withKey is r as JSON with node_key replaced by k, which need not be a key.
func withKey(r wire.RegisterRequest, k string) []byte {
	b, _ := json.Marshal(r)
	var m map[string]any
	json.Unmarshal(b, &m)
	m["node_key"] = k
	b, _ = json.Marshal(m)
	return b
}
