package coordinator

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// registerKey registers name with priv's key and returns the answer.
func registerKey(t *testing.T, c *http.Client, jt wire.JoinToken, name string, priv key.Private) (wire.RegisterResponse, creds) {
	t.Helper()
	st, body := call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion,
		TokenID: jt.ID, TokenSecret: jt.Secret, Name: name, NodeKey: priv.Public(), ListenPort: 41641})
	var rr wire.RegisterResponse
	if st != http.StatusOK || json.Unmarshal(body, &rr) != nil {
		t.Fatalf("register %s: %d %s", name, st, body)
	}
	return rr, creds{rr.Node.ID, rr.NodeSecret}
}

// near reports whether got is within a minute of want.
func near(got, want time.Time) bool { d := got.Sub(want); return d < time.Minute && d > -time.Minute }

// TestTokenKeyExpiry: a node's key expires after the coordinator's
// --node-key-expiry, or after its token's --key-expiry when that is
// shorter; a longer one is capped to the coordinator's. The node learns it
// in its own record, `meshlink nodes --json` shows it, and a rotation
// starts the lifetime again. Without a coordinator expiry, a token's is
// still applied.
func TestTokenKeyExpiry(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := startServer(t, dir, func(c *Config) { c.NodeKeyExpiry = time.Hour })
	c := pinnedClient(t, s.Fingerprint(), true)
	now := time.Now()
	for _, tc := range []struct {
		name  string
		token time.Duration
		want  time.Duration
	}{
		{"coordinators", 0, time.Hour},
		{"shorter", 10 * time.Minute, 10 * time.Minute},
		{"capped", 10 * time.Hour, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			jt := mustToken(t, s, TokenOptions{KeyExpiry: tc.token})
			rr, _ := register(t, c, jt, tc.name)
			if !near(rr.Node.KeyExpiry, now.Add(tc.want)) {
				t.Fatalf("key expiry %v, want about now+%v", rr.Node.KeyExpiry, tc.want)
			}
			nodes, err := NewAdminClient(dir).Nodes(ctx)
			if err != nil {
				t.Fatal(err)
			}
			i := slices.IndexFunc(nodes, func(n NodeInfo) bool { return n.Name == tc.name })
			if i < 0 || nodes[i].KeyExpiry == nil || !nodes[i].KeyExpiry.Equal(rr.Node.KeyExpiry) {
				t.Fatalf("meshlink nodes lists %+v, want key_expiry %v", nodes, rr.Node.KeyExpiry)
			}
		})
	}
	if _, err := s.CreateToken(ctx, TokenOptions{KeyExpiry: time.Millisecond}); err == nil || !strings.Contains(err.Error(), "at least 1s") {
		t.Fatalf("a 1ms key expiry was not refused clearly: %v", err)
	}

	// A rotation starts the token's lifetime again.
	jt := mustToken(t, s, TokenOptions{KeyExpiry: 20 * time.Minute})
	oldPriv, newPriv := key.NewPrivate(), key.NewPrivate()
	rr, a := registerKey(t, c, jt, "rotates", oldPriv)
	s.Store().SetNodeKeyExpiry(ctx, a.ID, time.Now().Add(5*time.Minute)) // as if 15 minutes had passed
	srv := serverKey(t, c, s.URL())
	st := openMapReq(t, c, s.URL(), a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, NodeKey: newPriv.Public(),
		OldKeyProof: rekeyProof(oldPriv, srv, "rotates", oldPriv.Public(), newPriv.Public(), time.Now()),
		NewKeyProof: rekeyProof(newPriv, srv, "rotates", oldPriv.Public(), newPriv.Public(), time.Now())})
	full := st.next(t, 10*time.Second, "the rotated node's map", func(m wire.MapResponse) bool { return m.Full != nil })
	if full.Full.Self.Key != newPriv.Public() || !near(full.Full.Self.KeyExpiry, time.Now().Add(20*time.Minute)) || !full.Full.Self.KeyExpiry.After(rr.Node.KeyExpiry.Add(-time.Second)) {
		t.Fatalf("after the rotation Self has key %v expiry %v; want the new key, expiring about now+20m", full.Full.Self.Key.Short(), full.Full.Self.KeyExpiry)
	}
	st.close()

	// Keys that never expire (--node-key-expiry 0), unless a token says.
	dir2 := t.TempDir()
	s2 := startServer(t, dir2, func(c *Config) { c.NodeKeyExpiry = -1 })
	c2 := pinnedClient(t, s2.Fingerprint(), true)
	if rr, _ := register(t, c2, mustToken(t, s2, TokenOptions{}), "forever"); !rr.Node.KeyExpiry.IsZero() {
		t.Fatalf("key expiry %v with --node-key-expiry 0, want never", rr.Node.KeyExpiry)
	}
	if rr, _ := register(t, c2, mustToken(t, s2, TokenOptions{KeyExpiry: time.Hour}), "hour"); !near(rr.Node.KeyExpiry, time.Now().Add(time.Hour)) {
		t.Fatalf("key expiry %v with a token's 1h, want about now+1h", rr.Node.KeyExpiry)
	}
	nodes, err := NewAdminClient(dir2).Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(nodes)
	if !strings.Contains(string(b), `"name":"forever"`) || !strings.Contains(string(b), `"key_expiry":null`) {
		t.Fatalf("meshlink nodes --json: %s; want forever with key_expiry null", b)
	}
}

// TestExpiredNodeDropped lets a node's key expire (its token gave it 3s)
// and has an admin expire another's (`meshlink nodes expire`): each
// leaves its peers' maps within seconds, the relay no longer serves its
// key, its map stream ends, and its next map request and a rotation are
// refused with key_expired and what to do. The event log says so, and the
// owner's token joins the machine again under the same name.
func TestExpiredNodeDropped(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := startServer(t, dir)
	c := pinnedClient(t, s.Fingerprint(), true)
	base := s.URL()
	srv := serverKey(t, c, base)

	aPriv := key.NewPrivate()
	_, a := registerKey(t, c, mustToken(t, s, TokenOptions{KeyExpiry: 3 * time.Second}), "sitea", aPriv)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, b := register(t, c, jt, "siteb")
	cPriv := key.NewPrivate()
	_, cc := registerKey(t, c, jt, "sitec", cPriv)
	as := openMap(t, c, base, a)
	bs := openMap(t, c, base, b)
	full := bs.next(t, 10*time.Second, "siteb's full map", func(m wire.MapResponse) bool { return m.Full != nil })
	for _, name := range []string{"sitea", "sitec"} {
		if _, ok := nodeNamed(full.Full.Peers, name); !ok {
			t.Fatalf("siteb's map lacks %s before it expired: %+v", name, full.Full.Peers)
		}
	}

	checkExpired := func(t *testing.T, name string, cr creds, priv key.Private) {
		t.Helper()
		if err := s.relayVerify(priv.Public()); err == nil {
			t.Errorf("the relay still serves %s's expired key", name)
		}
		st, body := call(t, c, base, wire.PathMap, &cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, NodeKey: priv.Public()})
		if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeKeyExpired || !strings.Contains(string(body), "expired at") || !strings.Contains(string(body), "join again") {
			t.Fatalf("map request of expired %s answered %d %s; want 403 key_expired saying when and what to do", name, st, body)
		}
		next := key.NewPrivate()
		st, body = call(t, c, base, wire.PathMap, &cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, NodeKey: next.Public(),
			OldKeyProof: rekeyProof(priv, srv, name, priv.Public(), next.Public(), time.Now()),
			NewKeyProof: rekeyProof(next, srv, name, priv.Public(), next.Public(), time.Now())})
		if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeKeyExpired {
			t.Fatalf("rotation of expired %s answered %d %s; want 403 key_expired", name, st, body)
		}
		if n, err := s.Store().GetNode(ctx, cr.ID); err != nil || n.Key != priv.Public() {
			t.Fatalf("%s's stored key after a refused rotation: %v %v", name, n.Key.Short(), err)
		}
	}

	start := time.Now()
	bs.next(t, 15*time.Second, "sitea's removal from siteb's map", func(m wire.MapResponse) bool { return slices.Contains(m.PeersRemoved, a.ID) })
	t.Logf("sitea dropped by siteb %v after registering with a 3s key", time.Since(start).Round(time.Millisecond))
	for range as.msgs { // sitea's stream ends
	}
	checkExpired(t, "sitea", a, aPriv)

	if err := NewAdminClient(dir).ExpireNode(ctx, "nosuch"); err == nil || !strings.Contains(err.Error(), "no node named") {
		t.Fatalf("expiring an unknown node: %v", err)
	}
	if err := NewAdminClient(dir).ExpireNode(ctx, "sitec"); err != nil {
		t.Fatal(err)
	}
	bs.next(t, 5*time.Second, "sitec's removal from siteb's map", func(m wire.MapResponse) bool { return slices.Contains(m.PeersRemoved, cc.ID) })
	checkExpired(t, "sitec", cc, cPriv)

	nodes, err := NewAdminClient(dir).Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if i := slices.IndexFunc(nodes, func(n NodeInfo) bool { return n.Name == "sitea" }); i < 0 || nodes[i].KeyExpiry == nil || nodes[i].KeyExpiry.After(time.Now()) {
		t.Fatalf("meshlink nodes: %+v; want sitea listed with its past key expiry", nodes)
	}
	evs, err := s.Store().ListEvents(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var expired []string
	for _, e := range evs {
		if e.Kind == store.EventKeyExpired {
			expired = append(expired, e.Node)
		}
	}
	slices.Sort(expired)
	if !slices.Equal(expired, []string{"sitea", "sitec"}) {
		t.Fatalf("key_expired events for %v, want sitea and sitec once each: %+v", expired, evs)
	}

	// The machine joins again with a fresh key and its owner's token.
	_, a2 := register(t, c, jt, "sitea")
	if a2.ID == a.ID {
		t.Fatalf("sitea joined again under its old id %d", a.ID)
	}
	bs.next(t, 5*time.Second, "the new sitea in siteb's map", func(m wire.MapResponse) bool {
		n, ok := nodeNamed(m.PeersChanged, "sitea")
		return ok && n.ID == a2.ID
	})
}

// TestExpiredNodeStatsRefused: a node whose key expired is refused on
// every call but leave (and unexpose), stats reports too: its counters
// and paths would go on feeding the console as if it were on the mesh.
func TestExpiredNodeStatsRefused(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, a := register(t, c, jt, "sitea")
	_, b := register(t, c, jt, "siteb")
	report := wire.StatsReport{Version: wire.ProtocolVersion, Peers: []wire.PeerStats{{Node: b.ID, Path: "direct", DirectBytes: 1 << 30}}}
	if st, body := call(t, c, s.URL(), wire.PathStats, &a, report); st != http.StatusOK {
		t.Fatalf("stats before expiry: %d %s", st, body)
	}
	if err := s.ExpireNode(ctx, "sitea", "test"); err != nil {
		t.Fatal(err)
	}
	st, body := call(t, c, s.URL(), wire.PathStats, &a, report)
	if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeKeyExpired {
		t.Fatalf("stats of an expired node: %d %s; want 403 key_expired", st, body)
	}
}
