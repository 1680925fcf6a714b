package test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

func peerOf(a *agent.Agent, name string) (localapi.Peer, bool) {
	for _, p := range a.Status().Peers {
		if p.Name == name {
			return p, true
		}
	}
	return localapi.Peer{}, false
}

// TestPaths: on loopback the direct path is found and used; an agent told to
// use only the relay still carries every byte intact, through the relay.
func TestPaths(t *testing.T) {
	m := harness.NewMesh(t)
	web := startBackend(t, "web")
	prov := m.AddAgent("prov", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr()}}})
	direct := m.AddAgent("direct", harness.AgentOptions{})
	cfg := m.AgentConfig("relayed", harness.AgentOptions{})
	cfg.RelayOnly = true
	relayed, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		a    *agent.Agent
		path string
	}{{direct, "direct"}, {relayed, "relay"}} {
		t.Run(tc.path, func(t *testing.T) {
			svc := waitProviders(t, tc.a, "web", 1)
			conn, who, err := dialGreeting(svc.Local.String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if who != "web" {
				t.Fatalf("greeting %q", who)
			}
			echoIntact(t, conn, 1<<20)
			tstest.WaitForNil(t, 10*time.Second, "path "+tc.path, func() error {
				p, ok := peerOf(tc.a, "prov")
				if !ok || p.Path != tc.path {
					return fmt.Errorf("peer prov: %+v", p)
				}
				if tc.path == "relay" && p.RelayedBytes < 1<<20 {
					return fmt.Errorf("only %d bytes relayed", p.RelayedBytes)
				}
				if tc.path == "direct" && p.DirectBytes < 1<<20 {
					return fmt.Errorf("only %d bytes direct", p.DirectBytes)
				}
				return nil
			})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			res, err := tc.a.Ping(ctx, "prov", 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, r := range res {
				paths = append(paths, r.Path)
			}
			t.Logf("ping prov: %v", res)
			if !strings.Contains(strings.Join(paths, ","), tc.path) {
				t.Fatalf("no pong over the %s path: %v", tc.path, paths)
			}
		})
	}
	_ = prov
}
