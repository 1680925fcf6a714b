package coordinator

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

func rekeyProof(by key.Private, server key.Public, name string, oldKey, newKey key.Public, at time.Time) string {
	return base64.StdEncoding.EncodeToString(by.SealTo(server, wire.RekeyProofMessage(name, oldKey, newKey, at)))
}

// TestRekeyNeedsBothKeys performs the attack of issue 8: someone who stole
// a node's secret (but not its private key) opens a map stream announcing
// a key of their own, to have the node's mesh addresses routed to them.
// Every attempt is refused with a clear error, the stored key and the
// peers' maps keep the real key, and the refusals are in the event log;
// the holder of the current key, proving both keys, rotates, and the peer
// gets the new key.
func TestRekeyNeedsBothKeys(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	base := s.URL()
	srv := serverKey(t, c, base)
	jt := mustToken(t, s, TokenOptions{Reusable: true})

	oldPriv := key.NewPrivate()
	st, body := call(t, c, base, wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion,
		TokenID: jt.ID, TokenSecret: jt.Secret, Name: "sitea", NodeKey: oldPriv.Public(), ListenPort: 41641})
	var ar wire.RegisterResponse
	if st != http.StatusOK || json.Unmarshal(body, &ar) != nil {
		t.Fatalf("register sitea: %d %s", st, body)
	}
	a := creds{ar.Node.ID, ar.NodeSecret}
	_, b := register(t, c, jt, "siteb")
	bs := openMap(t, c, base, b)
	full := bs.next(t, 10*time.Second, "siteb's full map", func(m wire.MapResponse) bool { return m.Full != nil })
	if n, ok := nodeNamed(full.Full.Peers, "sitea"); !ok || n.Key != oldPriv.Public() {
		t.Fatalf("siteb's map before: sitea %+v %v", n, ok)
	}

	old := oldPriv.Public()
	mallory := key.NewPrivate()
	other := key.NewPrivate() // a second key the attacker holds
	now := time.Now()
	for _, tc := range []struct {
		name     string
		old, new string
	}{
		{"secret only", "", ""},
		{"new key's proof only", "", rekeyProof(mallory, srv, "sitea", old, mallory.Public(), now)},
		{"old proof sealed by the attacker's key", rekeyProof(mallory, srv, "sitea", old, mallory.Public(), now), rekeyProof(mallory, srv, "sitea", old, mallory.Public(), now)},
		{"old proof sealed by another key of his", rekeyProof(other, srv, "sitea", old, mallory.Public(), now), rekeyProof(mallory, srv, "sitea", old, mallory.Public(), now)},
		{"garbage", "not-base64!", "AAAA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, body := call(t, c, base, wire.PathMap, &a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641,
				NodeKey: mallory.Public(), OldKeyProof: tc.old, NewKeyProof: tc.new})
			if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeUnauthorized || !strings.Contains(string(body), "sitea") {
				t.Fatalf("attack answered %d %s; want 403 %s naming the node", st, body, wire.ErrCodeUnauthorized)
			}
			n, err := s.Store().GetNode(ctx, a.ID)
			if err != nil || n.Key != old {
				t.Fatalf("stored key after the attack: %v %v, want %v", n.Key, err, old)
			}
		})
	}

	// Genuine proofs, but replayed for another change or too old, do not
	// serve: each binds both keys, the name and the time.
	newPriv := key.NewPrivate()
	replays := []struct {
		name     string
		old, new string
		nodeKey  key.Public
	}{
		{"proofs for another new key", rekeyProof(oldPriv, srv, "sitea", old, newPriv.Public(), now), rekeyProof(newPriv, srv, "sitea", old, newPriv.Public(), now), mallory.Public()},
		{"proofs for another name", rekeyProof(oldPriv, srv, "siteb", old, newPriv.Public(), now), rekeyProof(newPriv, srv, "siteb", old, newPriv.Public(), now), newPriv.Public()},
		{"stale proofs", rekeyProof(oldPriv, srv, "sitea", old, newPriv.Public(), now.Add(-time.Hour)), rekeyProof(newPriv, srv, "sitea", old, newPriv.Public(), now.Add(-time.Hour)), newPriv.Public()},
		{"registration proof", keyProof(oldPriv, srv, "sitea", now), keyProof(newPriv, srv, "sitea", now), newPriv.Public()},
	}
	for _, tc := range replays {
		t.Run(tc.name, func(t *testing.T) {
			st, body := call(t, c, base, wire.PathMap, &a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641,
				NodeKey: tc.nodeKey, OldKeyProof: tc.old, NewKeyProof: tc.new})
			if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeUnauthorized {
				t.Fatalf("answered %d %s; want 403", st, body)
			}
		})
	}

	// The same key as stored needs no proof.
	same := openMapReq(t, c, base, a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, NodeKey: old})
	same.close()

	as := openMapReq(t, c, base, a, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641, NodeKey: newPriv.Public(),
		OldKeyProof: rekeyProof(oldPriv, srv, "sitea", old, newPriv.Public(), time.Now()),
		NewKeyProof: rekeyProof(newPriv, srv, "sitea", old, newPriv.Public(), time.Now())})
	defer as.close()
	if n, err := s.Store().GetNode(ctx, a.ID); err != nil || n.Key != newPriv.Public() {
		t.Fatalf("stored key after the rotation: %v %v", n.Key, err)
	}
	// siteb's stream carries sitea's new key next, and never the attacker's.
	bs.next(t, 10*time.Second, "sitea's new key in siteb's map", func(m wire.MapResponse) bool {
		peers := m.PeersChanged
		if m.Full != nil {
			peers = m.Full.Peers
		}
		n, ok := nodeNamed(peers, "sitea")
		if ok && n.Key == mallory.Public() {
			t.Fatalf("siteb's map carried the attacker's key for sitea")
		}
		return ok && n.Key == newPriv.Public()
	})

	evs, err := s.Store().ListEvents(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var rekeys, refused int
	for _, e := range evs {
		switch {
		case e.Kind == store.EventRekey && strings.Contains(e.Message, "127.0.0.1"):
			rekeys++
		case e.Kind == store.EventRekeyRefused && strings.Contains(e.Message, "127.0.0.1"):
			refused++
		}
	}
	if rekeys != 1 || refused != 9 {
		t.Fatalf("events: %d rekey, %d rekey_refused with the source address; want 1 and 9: %+v", rekeys, refused, evs)
	}
}
