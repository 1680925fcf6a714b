package test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// TestAutomaticRotationKeepsStream runs a mesh whose keys live 12 s: each
// agent rotates its key by itself, a third of the lifetime before the end,
// while a TCP stream from site A to site B's echo service carries bytes
// without pause. Across A's rotations every byte comes back intact, A's
// key changes at the coordinator and in B's map, and no key expires.
func TestAutomaticRotationKeepsStream(t *testing.T) {
	const life = 12 * time.Second
	m := harness.NewMeshWith(t, func(c *coordinator.Config) { c.NodeKeyExpiry = life })
	srv := startStreamServer(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	a := m.AddAgent("site-a", harness.AgentOptions{})
	svc := waitProviders(t, a, "stream", 1)
	conn, greeting, err := dialGreeting(svc.Local.String())
	if err != nil || greeting != "hello" {
		t.Fatalf("connect through the mesh: %q %v", greeting, err)
	}
	echoed, waitEchoed, stop := runStream(t, conn)
	waitEchoed("256 KiB before any rotation", 256<<10)

	ctx := context.Background()
	id := wire.NodeID(a.Status().Self.ID)
	first, err := m.Coord.Store().GetNode(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if st := a.Status().Self; st.KeyExpiry.IsZero() || st.KeyExpiry.After(time.Now().Add(life)) {
		t.Fatalf("site-a's status shows key expiry %v; want within %v", st.KeyExpiry, life)
	}
	// Two rotations of A's key, each before its expiry.
	keys := []key.Public{first.Key}
	tstest.WaitForNil(t, 4*life, "two automatic rotations of site-a's key", func() error {
		n, err := m.Coord.Store().GetNode(ctx, id)
		if err != nil {
			return err
		}
		if n.Key != keys[len(keys)-1] {
			keys = append(keys, n.Key)
		}
		if n.KeyExpired(time.Now()) {
			t.Fatalf("site-a's key expired at %v without being rotated", n.KeyExpiry)
		}
		if len(keys) < 3 {
			return fmt.Errorf("%d rotations so far", len(keys)-1)
		}
		return nil
	})
	newKey := keys[len(keys)-1]
	tstest.WaitForNil(t, 10*time.Second, "site-a's newest key in its status and site-b's map", func() error {
		if a.Status().Self.Key != shortKeyOf(newKey) {
			return fmt.Errorf("site-a uses %s", a.Status().Self.Key)
		}
		for _, p := range b.Status().Peers {
			if p.Name == "site-a" && p.Key == shortKeyOf(newKey) {
				return nil
			}
		}
		return errors.New("site-b has not got the new key yet")
	})
	after := echoed.Load()
	waitEchoed("256 KiB more over the newest key", after+256<<10)
	stop()
	t.Logf("site-a rotated %d times in its 12 s key lifetime; %d bytes echoed intact", len(keys)-1, echoed.Load())
}

func shortKeyOf(k key.Public) string { return k.String()[:12] + "…" }

// TestExpiredAgentDropped expires site A's key, as `meshlink nodes expire`
// does: site B drops A from its map (and so from its WireGuard), A's open
// connection through the mesh ends, A can connect to nothing, and A's
// status and coordinator error say its key expired and to join again.
func TestExpiredAgentDropped(t *testing.T) {
	m, a, b, _, conn, local := revokeSetup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := coordinator.NewAdminClient(filepath.Join(m.Dir(), "coord")).ExpireNode(ctx, "site-a"); err != nil {
		t.Fatal(err)
	}
	tstest.WaitForNil(t, cutOffLimit, "site-b to drop site-a", func() error {
		if hasPeer(b, "site-a") {
			return errors.New("site-a is still a peer of site-b")
		}
		return nil
	})
	t.Logf("site-b dropped expired site-a after %v", time.Since(start).Round(time.Millisecond))
	waitAppClosed(t, conn, start)
	tstest.WaitForNil(t, cutOffLimit, "site-a to say its key expired", func() error {
		st := a.Status()
		if !st.Self.KeyExpired || st.Coordinator.Connected || !strings.Contains(st.Coordinator.LastError, "key expired at") ||
			!strings.Contains(st.Coordinator.LastError, "join again") {
			return fmt.Errorf("key expired %v, connected %v, last error %q", st.Self.KeyExpired, st.Coordinator.Connected, st.Coordinator.LastError)
		}
		return nil
	})
	if c, greeting, err := dialGreeting(local); err == nil {
		c.Close()
		t.Fatalf("expired site-a still reaches the service (greeting %q)", greeting)
	}
}

// agentState is what a stopped agent's state directory says about it.
type agentState struct {
	ID          wire.NodeID `json:"id"`
	Name        string      `json:"name"`
	Secret      string      `json:"secret"`
	URL         string      `json:"url"`
	Fingerprint string      `json:"fingerprint"`
	key         key.Private
}

func readAgentState(t *testing.T, dir string) agentState {
	t.Helper()
	var st agentState
	b, err := os.ReadFile(filepath.Join(dir, "node.json"))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil {
		t.Fatal(err)
	}
	st.key = readKeyFile(t, filepath.Join(dir, "node.key"))
	return st
}

func readKeyFile(t *testing.T, path string) key.Private {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	k, err := key.ParsePrivate(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// rekeyBehindAgent does what a stopped agent's rotation had done up to
// the coordinator's answer: it proves st's key and next to the
// coordinator on a map stream, which takes next, and hangs up.
func rekeyBehindAgent(t *testing.T, st agentState, next key.Private) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: wire.PinnedTLSConfig(st.Fingerprint)}}
	defer c.CloseIdleConnections()
	post := func(path string, body any, cr bool) *http.Response {
		raw, _ := json.Marshal(body)
		req, _ := http.NewRequest(http.MethodPost, st.URL+path, bytes.NewReader(raw))
		if cr {
			req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(st.ID), 10))
			req.Header.Set(wire.HeaderNodeSecret, st.Secret)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := post(wire.PathServerKey, wire.ServerKeyRequest{Version: wire.ProtocolVersion}, false)
	var sk wire.ServerKey
	if err := json.NewDecoder(resp.Body).Decode(&sk); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	msg := wire.RekeyProofMessage(st.Name, st.key.Public(), next.Public(), time.Now())
	resp = post(wire.PathMap, wire.MapRequest{Version: wire.ProtocolVersion, NodeKey: next.Public(),
		OldKeyProof: encodeProof(st.key.SealTo(sk.Key, msg)), NewKeyProof: encodeProof(next.SealTo(sk.Key, msg))}, true)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("rekey behind the agent: %s", resp.Status)
	}
}

// TestInterruptedRotationRecovered stops site A in the middle of a key
// rotation (the new key saved in node.key.next, node.key still the old
// one) and starts it again: whether the coordinator took the new key
// before the stop (the dangerous case: the old key no longer works), never
// heard of it, or refuses it, A comes back with the key the coordinator
// holds, node.key.next is gone, and bytes flow to site B.
func TestInterruptedRotationRecovered(t *testing.T) {
	m := harness.NewMesh(t)
	srv := startStreamServer(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	stateA := filepath.Join(m.Dir(), "site-a")
	cfg := m.AgentConfig("site-a", harness.AgentOptions{StateDir: stateA})
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitProviders(t, a, "stream", 1)
	// Restarts keep the UDP port, as with --listen-port: a new one leaves
	// site-b on the old direct path for seconds, which is not what this
	// test is about.
	cfg.ListenPort = a.ListenPort()
	bKey := readKeyFile(t, filepath.Join(m.Dir(), "site-b", "node.key"))
	ctx := context.Background()

	for _, tc := range []struct {
		name string
		// interrupt returns the key node.key.next gets, and does to the
		// coordinator what the rotation had done before the stop.
		interrupt func(t *testing.T, st agentState) key.Private
		finished  bool // the rotation ends with the new key, else the old
	}{
		{"coordinator took the new key", func(t *testing.T, st agentState) key.Private {
			next := key.NewPrivate()
			rekeyBehindAgent(t, st, next)
			return next
		}, true},
		{"coordinator never heard of it", func(t *testing.T, st agentState) key.Private { return key.NewPrivate() }, true},
		{"coordinator refuses it", func(t *testing.T, st agentState) key.Private { return bKey }, false}, // site-b's key: in use
	} {
		t.Run(tc.name, func(t *testing.T) {
			a.Close()
			st := readAgentState(t, stateA)
			next := tc.interrupt(t, st)
			if err := os.WriteFile(filepath.Join(stateA, "node.key.next"), []byte(next.Base64()+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			want := st.key.Public()
			if tc.finished {
				want = next.Public()
			}
			a, err = harness.StartAgent(t, cfg)
			if err != nil {
				t.Fatal(err)
			}
			tstest.WaitForNil(t, 15*time.Second, "site-a back with the key the coordinator holds", func() error {
				n, err := m.Coord.Store().GetNode(ctx, st.ID)
				if err != nil {
					return err
				}
				if n.Key != want {
					return fmt.Errorf("coordinator holds %s, want %s", n.Key.Short(), want.Short())
				}
				if s := a.Status(); !s.Coordinator.Connected || s.Self.Key != shortKeyOf(want) {
					return fmt.Errorf("site-a connected %v with key %s (%s)", s.Coordinator.Connected, s.Self.Key, s.Coordinator.LastError)
				}
				if _, err := os.Stat(filepath.Join(stateA, "node.key.next")); !errors.Is(err, os.ErrNotExist) {
					return fmt.Errorf("node.key.next still there (%v)", err)
				}
				if k := readKeyFile(t, filepath.Join(stateA, "node.key")); k.Public() != want {
					return fmt.Errorf("node.key holds %s", k.Public().Short())
				}
				for _, p := range b.Status().Peers {
					if p.Name == "site-a" && p.Key == shortKeyOf(want) {
						return nil
					}
				}
				return errors.New("site-b's map lacks site-a's key")
			})
			svc := waitProviders(t, a, "stream", 1)
			c, greeting, err := dialGreeting(svc.Local.String())
			if err != nil || greeting != "hello" {
				t.Fatalf("connect through the mesh after the recovery: %q %v", greeting, err)
			}
			echoIntact(t, c, 256<<10)
			c.Close()
		})
	}
}

func encodeProof(sealed []byte) string { return base64.StdEncoding.EncodeToString(sealed) }

// TestExpiredPeerDroppedWithoutCoordinator: the coordinator goes away,
// so nobody tells the sites that their keys expired (nor can they rotate
// them); each drops the other itself when the key's expiry (as its last
// map says) has passed, closing the open connection at both ends.
func TestExpiredPeerDroppedWithoutCoordinator(t *testing.T) {
	const life = 8 * time.Second
	m := harness.NewMeshWith(t, func(c *coordinator.Config) { c.NodeKeyExpiry = life })
	srv := startStreamServer(t)
	bcfg := m.AgentConfig("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "stream", Target: srv.ln.Addr().String()}}})
	bcfg.KeyExpirySkew = 100 * time.Millisecond
	b, err := harness.StartAgent(t, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	acfg := m.AgentConfig("site-a", harness.AgentOptions{})
	acfg.KeyExpirySkew = 100 * time.Millisecond
	a, err := harness.StartAgent(t, acfg)
	if err != nil {
		t.Fatal(err)
	}
	svc := waitProviders(t, a, "stream", 1)
	var conn net.Conn
	tstest.WaitForNil(t, 15*time.Second, "a connection through the mesh", func() error {
		c, greeting, err := dialGreeting(svc.Local.String())
		if err != nil {
			return err
		}
		if greeting != "hello" {
			c.Close()
			return fmt.Errorf("greeting %q", greeting)
		}
		conn = c
		return nil
	})
	defer conn.Close()
	var expiry time.Time
	for _, p := range b.Status().Peers {
		if p.Name == "site-a" {
			expiry = p.KeyExpiry
		}
	}
	if expiry.IsZero() {
		t.Fatalf("site-b's status shows no key expiry for site-a: %+v", b.Status().Peers)
	}
	m.StopCoordinator() // nobody rotates a's key, nobody tells b
	echoIntact(t, conn, 16<<10)
	tstest.WaitForNil(t, life+10*time.Second, "site-b to drop site-a once its key expired", func() error {
		if hasPeer(b, "site-a") {
			return errors.New("still a peer")
		}
		return nil
	})
	t.Logf("site-b dropped site-a %v after its key expired", time.Since(expiry).Round(time.Millisecond))
	// Site B closed the service's side at once; site A's application
	// sees its end when A, in turn, drops B (whose key expired too).
	waitServiceClosed(t, srv, time.Now())
	waitAppClosed(t, conn, time.Now())
}
