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

// serverKey fetches the coordinator's key as an agent does.
func serverKey(t *testing.T, c *http.Client, base string) key.Public {
	t.Helper()
	st, body := call(t, c, base, wire.PathServerKey, nil, wire.ServerKeyRequest{Version: wire.ProtocolVersion})
	var sk wire.ServerKey
	if st != http.StatusOK || json.Unmarshal(body, &sk) != nil || sk.Key.IsZero() {
		t.Fatalf("server key: %d %s", st, body)
	}
	return sk.Key
}

func keyProof(priv key.Private, server key.Public, name string, at time.Time) string {
	return base64.StdEncoding.EncodeToString(priv.SealTo(server, wire.KeyProofMessage(name, at)))
}

// TestNodeTakeoverRefused performs the takeover of issue 8: a member who
// knows a node's name and public key (both are in every network map) asks
// for a fresh secret for it with a token of their own, a reusable one, or
// the node's own used-up token. Every attempt without the node's private
// key is refused, the real node keeps working, and the genuine holder of
// the key can still renew it.
func TestNodeTakeoverRefused(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	base := s.URL()
	srvKey := serverKey(t, c, base)

	mallory, err := s.Store().CreateUser(ctx, store.User{Username: "mallory", PasswordHash: "x"})
	if err != nil {
		t.Fatal(err)
	}
	adminOnce := mustToken(t, s, TokenOptions{})
	adminReusable := mustToken(t, s, TokenOptions{Reusable: true})
	malloryTok := mustToken(t, s, TokenOptions{Reusable: true, Owner: mallory.ID})

	victimPriv := key.NewPrivate()
	victim := wire.RegisterRequest{Version: wire.ProtocolVersion, TokenID: adminOnce.ID, TokenSecret: adminOnce.Secret,
		Name: "siteb", NodeKey: victimPriv.Public(), ListenPort: 41641}
	st, body := call(t, c, base, wire.PathRegister, nil, victim)
	if st != http.StatusOK {
		t.Fatalf("victim joins: %d %s", st, body)
	}
	var vr wire.RegisterResponse
	json.Unmarshal(body, &vr)
	victimCreds := creds{vr.Node.ID, vr.NodeSecret}

	attacker := key.NewPrivate()
	now := time.Now()
	for _, tc := range []struct {
		name     string
		tok      wire.JoinToken
		proof    string
		status   int
		contains string
	}{
		{"member's own token, no proof", malloryTok, "", 409, "proof of its private key"},
		{"admin's reusable token, no proof", adminReusable, "", 409, "proof of its private key"},
		{"the node's own used-up token, no proof", adminOnce, "", 409, "proof of its private key"},
		{"proof sealed with the attacker's key", adminReusable, keyProof(attacker, srvKey, "siteb", now), 401, "does not verify"},
		{"proof made for another name", adminReusable, keyProof(victimPriv, srvKey, "other", now), 401, "does not verify"},
		{"proof from an hour ago", adminReusable, keyProof(victimPriv, srvKey, "siteb", now.Add(-time.Hour)), 401, "clock"},
		{"proof sealed to another coordinator", adminReusable, keyProof(victimPriv, key.NewPrivate().Public(), "siteb", now), 401, "does not verify"},
		{"garbage proof", adminReusable, "!!", 401, "does not verify"},
		// Even the genuine key cannot be renewed with another owner's token.
		{"genuine proof, another owner's token", malloryTok, keyProof(victimPriv, srvKey, "siteb", now), 409, "taken by another node"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := victim
			req.TokenID, req.TokenSecret, req.KeyProof = tc.tok.ID, tc.tok.Secret, tc.proof
			st, body := call(t, c, base, wire.PathRegister, nil, req)
			if st != tc.status || !strings.Contains(string(body), tc.contains) {
				t.Fatalf("got %d %s, want %d containing %q", st, body, tc.status, tc.contains)
			}
		})
	}
	// The real node's credentials still work: nobody got a new secret.
	if st, body := call(t, c, base, wire.PathEndpoints, &victimCreds, wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: 41641}); st != http.StatusOK {
		t.Fatalf("victim's secret after the attempts: %d %s", st, body)
	}

	// Whoever holds the key renews with the node's own (used-up) token.
	req := victim
	req.KeyProof = keyProof(victimPriv, srvKey, "siteb", time.Now())
	st, body = call(t, c, base, wire.PathRegister, nil, req)
	var rr wire.RegisterResponse
	if st != http.StatusOK || json.Unmarshal(body, &rr) != nil || rr.Node.ID != vr.Node.ID || rr.NodeSecret == vr.NodeSecret {
		t.Fatalf("genuine renewal: %d %s", st, body)
	}
	evs, _ := s.Store().ListEvents(ctx, 0, 20)
	found := false
	for _, e := range evs {
		found = found || e.Kind == store.EventRenew && strings.Contains(e.Message, "127.0.0.1")
	}
	if !found {
		t.Fatalf("no renew event with the source address in %+v", evs)
	}
}

// TestServiceHijackRefused: a member's node exposing a service name an
// admin's node provides is refused with the owner's name, is not made a
// provider, and the attempt is an event; the owner's other nodes may
// provide it too, and the member can use a name of their own.
func TestServiceHijackRefused(t *testing.T) {
	ctx := context.Background()
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), true)
	mallory, err := s.Store().CreateUser(ctx, store.User{Username: "mallory", PasswordHash: "x"})
	if err != nil {
		t.Fatal(err)
	}
	admin := mustToken(t, s, TokenOptions{Reusable: true})
	_, siteb := register(t, c, admin, "siteb")
	_, sitec := register(t, c, admin, "sitec")
	_, rogue := register(t, c, mustToken(t, s, TokenOptions{Owner: mallory.ID}), "rogue")
	expose := func(cr creds, name string) (int, []byte) {
		return call(t, c, s.URL(), wire.PathServices, &cr, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: name, Port: 8000})
	}
	if st, body := expose(siteb, "web"); st != 200 {
		t.Fatalf("owner exposes web: %d %s", st, body)
	}
	st, body := expose(rogue, "web")
	if st != http.StatusForbidden || errCode(t, body) != wire.ErrCodeNotOwner || !strings.Contains(string(body), "user admin") {
		t.Fatalf("member's node exposing web: %d %s, want 403 not_owner naming user admin", st, body)
	}
	if st, body := expose(sitec, "web"); st != 200 {
		t.Fatalf("the owner's second node: %d %s", st, body)
	}
	if st, body := expose(rogue, "mallweb"); st != 200 {
		t.Fatalf("member's own name: %d %s", st, body)
	}
	provs, err := s.Store().ListProviders(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range provs {
		if p.Service == "web" && p.NodeID == rogue.ID {
			t.Fatal("the rogue node became a provider of web")
		}
	}
	evs, _ := s.Store().ListEvents(ctx, 0, 50)
	found := false
	for _, e := range evs {
		found = found || e.Kind == store.EventExposeRefused && strings.Contains(e.Message, "rogue")
	}
	if !found {
		t.Fatalf("no expose_refused event in %+v", evs)
	}
}
