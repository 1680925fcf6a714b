package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

// TestJoinErrors: every bad join gets an error that says what is wrong, and
// leaves nothing behind that breaks a later good join.
func TestJoinErrors(t *testing.T) {
	m := harness.NewMesh(t)
	good, err := wire.ParseToken(m.Token())
	if err != nil {
		t.Fatal(err)
	}
	unknown := good
	unknown.ID, unknown.Secret = "nosuchtoken", strings.Repeat("x", 32)
	foreign := good
	foreign.Fingerprint = strings.Repeat("ab", 32)
	wrongSecret := good
	wrongSecret.Secret = strings.Repeat("y", 32)

	single := m.TokenWith(coordinator.TokenOptions{})
	if _, err := m.StartAgent("first", harness.AgentOptions{Token: single}); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name  string
		token string
		want  string
	}{
		{"malformed", "hello", "malformed join token"},
		{"truncated", good.String()[:40], "malformed join token"},
		{"unknown token", unknown.String(), "not known to this coordinator"},
		{"wrong secret", wrongSecret.String(), "token"},
		{"foreign coordinator", foreign.String(), "does not match the pinned fingerprint"},
		{"used up", single, "used"},
		{"no token, no state", "-", "has not joined a mesh yet"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.StartAgent(fmt.Sprintf("bad%d", i), harness.AgentOptions{Token: tc.token})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			t.Logf("user sees: %v", err)
		})
	}

	t.Run("expired", func(t *testing.T) {
		tok := m.TokenWith(coordinator.TokenOptions{Expires: time.Millisecond})
		tstest.WaitForNil(t, 5*time.Second, "the token to expire", func() error {
			info, err := agent.InspectToken(context.Background(), mustParse(t, tok))
			if err != nil {
				return err
			}
			if time.Now().Before(info.Expires) {
				return errors.New("not yet")
			}
			return nil
		})
		_, err := m.StartAgent("late", harness.AgentOptions{Token: tok})
		if err == nil || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("error %v, want expired", err)
		}
	})

	t.Run("state not writable", func(t *testing.T) {
		f := filepath.Join(m.Dir(), "a-file")
		os.WriteFile(f, nil, 0o600)
		_, err := m.StartAgent("nostate", harness.AgentOptions{StateDir: filepath.Join(f, "state")})
		if err == nil || !strings.Contains(err.Error(), "--state") {
			t.Fatalf("error %v, want one naming --state", err)
		}
	})

	t.Run("udp port in use", func(t *testing.T) {
		pc, err := net.ListenPacket("udp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		cfg := m.AgentConfig("busyport", harness.AgentOptions{})
		cfg.ListenPort = uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		_, err = harness.StartAgent(t, cfg)
		if err == nil || !strings.Contains(err.Error(), "--listen-port") {
			t.Fatalf("error %v, want one naming --listen-port", err)
		}
	})

	t.Run("dns port in use", func(t *testing.T) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		cfg := m.AgentConfig("busydns", harness.AgentOptions{})
		cfg.DNS = pc.LocalAddr().String()
		_, err = harness.StartAgent(t, cfg)
		if err == nil || !strings.Contains(err.Error(), "--dns") {
			t.Fatalf("error %v, want one naming --dns", err)
		}
	})

	t.Run("bad expose", func(t *testing.T) {
		for _, s := range []string{"web", "web=", "web=127.0.0.1", "Web Site=127.0.0.1:80", "web=127.0.0.1:0", "web=127.0.0.1:99999"} {
			if _, err := agent.ParseExport(s); err == nil {
				t.Errorf("ParseExport(%q) accepted", s)
			}
		}
	})

	// After all that, a good join still works.
	if _, err := m.StartAgent("after", harness.AgentOptions{}); err != nil {
		t.Fatalf("good join after bad ones: %v", err)
	}
}

func mustParse(t *testing.T, s string) wire.JoinToken {
	t.Helper()
	tok, err := wire.ParseToken(s)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestRestartSameJoin: a container restarts with the same --state and the
// same single-use --join; it must come back as the same node without
// spending the token again.
func TestRestartSameJoin(t *testing.T) {
	m := harness.NewMesh(t)
	tok := m.TokenWith(coordinator.TokenOptions{})
	cfg := m.AgentConfig("sidecar", harness.AgentOptions{Token: tok})
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	before := a.Status().Self

	// Secrets at rest: 0600, and the private key is nowhere in the
	// coordinator's data.
	for _, f := range []string{"node.key", "node.json"} {
		fi, err := os.Stat(filepath.Join(cfg.StateDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	key, err := os.ReadFile(filepath.Join(cfg.StateDir, "node.key"))
	if err != nil {
		t.Fatal(err)
	}
	filepath.Walk(filepath.Join(m.Dir(), "coord"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, bytes.TrimSpace(key)) {
				t.Errorf("the node's private key is in the coordinator's %s", p)
			}
		}
		return nil
	})
	a.Close()
	for i := 0; i < 2; i++ {
		a, err = harness.StartAgent(t, cfg)
		if err != nil {
			t.Fatalf("restart %d: %v", i, err)
		}
		tstest.WaitForNil(t, 5*time.Second, "reconnect", func() error {
			if st := a.Status(); !st.Coordinator.Connected {
				return errors.New(st.Coordinator.LastError)
			}
			return nil
		})
		after := a.Status().Self
		if after.ID != before.ID || after.Addresses[0] != before.Addresses[0] {
			t.Fatalf("restart %d came back as %+v, was %+v", i, after, before)
		}
		a.Close()
	}
}

// TestRenewAfterLostCredentials: an agent that lost its node.json but kept
// its key comes back as the same node with its own used-up single-use
// token, by proving it holds the key (a name and public key alone no
// longer renew a node: issue 8's takeover).
func TestRenewAfterLostCredentials(t *testing.T) {
	m := harness.NewMesh(t)
	tok := m.TokenWith(coordinator.TokenOptions{})
	cfg := m.AgentConfig("laptop", harness.AgentOptions{Token: tok})
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	before := a.Status().Self
	a.Close()
	if err := os.Remove(filepath.Join(cfg.StateDir, "node.json")); err != nil {
		t.Fatal(err)
	}
	a, err = harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatalf("restart without node.json: %v", err)
	}
	defer a.Close()
	if after := a.Status().Self; after.ID != before.ID || after.Addresses[0] != before.Addresses[0] {
		t.Fatalf("came back as %+v, was %+v", after, before)
	}
}

// TestCoordinatorDownAtStart: an agent started before its coordinator keeps
// retrying and joins when the coordinator comes up.
func TestCoordinatorDownAtStart(t *testing.T) {
	m := harness.NewMesh(t)
	cfg := m.AgentConfig("early", harness.AgentOptions{})
	m.StopCoordinator()
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	done := make(chan error, 1)
	go func() { done <- a.Start(context.Background()) }()
	select {
	case err := <-done:
		t.Fatalf("Start returned while the coordinator was down: %v", err)
	case <-time.After(300 * time.Millisecond):
		// Still retrying, as it should.
	}
	m.StartCoordinator()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("agent did not join after the coordinator came up")
	}
}

// TestGarbage: random datagrams on the WireGuard port and junk on the local
// API do not disturb a working mesh.
func TestGarbage(t *testing.T) {
	m := harness.NewMesh(t)
	web := startBackend(t, "web")
	a := m.AddAgent("cons", harness.AgentOptions{})
	b := m.AddAgent("prov", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr()}}})
	svc := waitProviders(t, a, "web", 1)

	for _, ag := range []*agent.Agent{a, b} {
		c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", ag.ListenPort()))
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2000)
		for i := 0; i < 2000; i++ {
			rand.Read(buf)
			n := int(buf[0])<<3 | int(buf[1])&7
			// WireGuard message types 1-4 with junk after them, too.
			buf[0] = byte(i % 5)
			buf[1], buf[2], buf[3] = 0, 0, 0
			c.Write(buf[:n%len(buf)])
		}
		c.Close()
	}

	sock := filepath.Join(m.Dir(), "cons", localapi.SocketName)
	for _, junk := range []string{"\x00\x01garbage\r\n\r\n", "POST /v1/expose HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{{{{{"} {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(junk))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		reply := make([]byte, 512)
		n, _ := c.Read(reply)
		c.Close()
		if !strings.Contains(string(reply[:n]), "400") {
			t.Errorf("junk %q answered %q, want a 400", junk, reply[:n])
		}
	}
	cl := localapi.NewClient(filepath.Join(m.Dir(), "cons"))
	if _, err := cl.Expose(context.Background(), localapi.ExposeRequest{Name: "x", Target: "nohostport"}); err == nil {
		t.Error("expose of a bad target accepted")
	}
	if err := cl.Unexpose(context.Background(), "nosuch"); err == nil || !strings.Contains(err.Error(), "does not export") {
		t.Errorf("unexpose of an unknown service: %v", err)
	}
	if _, err := cl.Status(context.Background()); err != nil {
		t.Fatalf("status after junk: %v", err)
	}
	conn, who, err := dialGreeting(svc.Local.String())
	if err != nil {
		t.Fatalf("mesh after garbage: %v", err)
	}
	defer conn.Close()
	if who != "web" {
		t.Fatalf("greeting %q", who)
	}
	echoIntact(t, conn, 64<<10)
}
