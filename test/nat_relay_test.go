package test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/topo"
)

// TestNATStandaloneRelay: the coordinator's own relay is off
// (--relay=false) and a `meshlink relay` runs on a host of its own on the
// WAN. Neither site may use UDP, so everything crosses that relay; status
// and ping name it. The relay registered with a relay token and learned the
// sites' keys from the coordinator; it never saw their credentials.
func TestNATStandaloneRelay(t *testing.T) {
	const relayAddr = "10.99.0.4"
	m := newNATMesh(t, "--relay=false")
	relayHost := m.net.Host("relay")
	m.net.Link(relayHost, m.wan, relayAddr+"/24")

	var tok string
	tstest.WaitForNil(t, 20*time.Second, "a relay token", func() error {
		out, err := m.run(m.coord, "token", "create", "--relay", "--data", m.data)
		tok = strings.TrimSpace(string(out))
		return err
	})
	startProc(t, relayHost, "relay", m.bin, "relay", "--join", tok, "--name", "wanrelay",
		"--listen", relayAddr+":8444", "--state", filepath.Join(m.dir, "relay"), "--log-level", "debug")

	for _, h := range []*topo.Host{m.siteA, m.siteB} {
		if err := h.DropUDP(); err != nil {
			t.Fatal(err)
		}
	}
	m.startAgents()
	m.firstFetch()
	t.Logf("standalone relay carried the first byte after %v", m.since())
	m.upload(t, 4<<20, 0, 30*time.Second)
	p := m.waitPath("relay", 10*time.Second, func(p localapi.Peer) error {
		if p.Relay != "wanrelay" || !strings.HasPrefix(p.RelayURL, "https://"+relayAddr+":8444") {
			return fmt.Errorf("relayed via %q (%s), want wanrelay at %s", p.Relay, p.RelayURL, relayAddr)
		}
		if p.RelayedBytes < 4<<20 {
			return fmt.Errorf("only %d bytes relayed", p.RelayedBytes)
		}
		return nil
	})
	t.Logf("status at A: path %s via %s (%s), relayed %d B", p.Path, p.Relay, p.RelayURL, p.RelayedBytes)
	out := m.ping()
	t.Logf("meshlink ping siteb: %s", out)
	if !strings.Contains(out, "via relay wanrelay") {
		t.Fatalf("ping: want pongs via relay wanrelay, got:\n%s", out)
	}
}
