package test

// "Any network, any topology": the built binary as real processes in
// network namespaces, two sites each behind its own NAT router, a
// coordinator on the "internet" between them, and what users meet — a
// strict firewall, a bare NAT box, a symmetric NAT, a NAT that changes
// ports, no UDP at all, a direct path that dies mid-transfer, a lossy WAN. Each test asserts what a user sees (the
// service answers, every byte arrives, `status` and `ping` tell the path)
// and logs how long the paths took to come up.
//
//	            coord 10.99.0.1 (API, relay, STUN on :8443)
//	                     |
//	  ------------------ wan ------------------
//	  |                                       |
//	routera 10.99.0.2                   routerb 10.99.0.3      (masquerade)
//	  | 192.168.1.1                           | 192.168.2.1
//	sitea 192.168.1.2                   siteb 192.168.2.2
//	  consumes web, sink                  hello :8000, sink :9000, exposes both
//
// Both routers are home routers: they masquerade and drop what arrives
// unsolicited on the WAN side (homeFirewall), as shipped home routers do.
// topo's Router alone is a bare NAT box, which behaves differently in a way
// that matters here; see homeFirewall and TestNATStatefulFirewall.

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/test/topo"
)

// Addresses of the topology; they exist only inside the test's namespaces.
const (
	natCoord  = "10.99.0.1"
	natListen = natCoord + ":8443"
	natWANA   = "10.99.0.2" // router A's public address
	natWANB   = "10.99.0.3" // router B's public address
)

// directWithin is how long two sites may take to find a direct path: STUN,
// publishing the candidates through the coordinator, then disco pings
// every 2 s, five rounds of them. It is kept under the coordinator's 15 s
// keep-alive on purpose: a path that only comes up once the agents
// reconnect their map stream was found late.
const directWithin = 10 * time.Second

// reportWithin is how long a test that only reports the path gives hole
// punching: six rounds of pings, where two sites that can see each other
// need one or two.
const reportWithin = 12 * time.Second

// natMesh is the topology above with the coordinator and site B's servers
// running; the agents start with startAgents, so that a test can break the
// network before or after.
type natMesh struct {
	t                                     *testing.T
	coord, routerA, routerB, siteA, siteB *topo.Host
	net                                   *topo.Net
	wan                                   *topo.Switch
	bin, dir, data                        string
	sink                                  *sinkServer

	started time.Time // when the agents were started
	web     string    // site A's local proxy for web (hello)
	sinkAt  string    // site A's local proxy for sink
}

func newNATMesh(t *testing.T, coordArgs ...string) *natMesh {
	t.Helper()
	n := topo.New(t)
	m := &natMesh{t: t, net: n, bin: harness.Binary(t), dir: t.TempDir()}
	hello := harness.Build(t, "./examples/hello")

	wan, lanA, lanB := n.Switch("wan"), n.Switch("lana"), n.Switch("lanb")
	m.wan = wan
	m.coord = n.Host("coord")
	n.Link(m.coord, wan, natCoord+"/24")
	m.routerA = n.Router("routera", wan, natWANA+"/24", lanA, "192.168.1.1/24")
	m.routerB = n.Router("routerb", wan, natWANB+"/24", lanB, "192.168.2.1/24")
	m.siteA, m.siteB = n.Host("sitea"), n.Host("siteb")
	n.Link(m.siteA, lanA, "192.168.1.2/24")
	n.Link(m.siteB, lanB, "192.168.2.2/24")
	m.siteA.DefaultRoute("192.168.1.1")
	m.siteB.DefaultRoute("192.168.2.1")
	for _, r := range []*topo.Host{m.routerA, m.routerB} {
		if err := applyNft(r, homeFirewall); err != nil {
			t.Fatal(err)
		}
	}

	m.data = filepath.Join(m.dir, "coord")
	startProc(t, m.coord, "coordinator", m.bin, append([]string{"coordinator", "--listen", natListen, "--data", m.data}, coordArgs...)...)
	startProc(t, m.siteB, "hello", hello, "--listen", "127.0.0.1:8000", "--site", "siteb")
	m.sink = startSink(t, m.siteB, "127.0.0.1:9000")
	return m
}

func (m *natMesh) state(site string) string { return filepath.Join(m.dir, site) }

// run runs the meshlink CLI in h and returns its standard output.
func (m *natMesh) run(h *topo.Host, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return h.Run(ctx, m.bin, args...)
}

// token mints a single-use token, as a careful operator would per site.
func (m *natMesh) token() string {
	m.t.Helper()
	var tok string
	tstest.WaitForNil(m.t, 20*time.Second, "a join token", func() error {
		out, err := m.run(m.coord, "token", "create", "--data", m.data)
		tok = strings.TrimSpace(string(out))
		return err
	})
	return tok
}

// startAgents starts site B's agent, exporting web and sink, and site A's,
// then waits until site A has both services' proxies listening.
func (m *natMesh) startAgents() {
	m.t.Helper()
	tokA, tokB := m.token(), m.token()
	m.started = time.Now()
	startProc(m.t, m.siteB, "agent-b", m.bin, "agent", "--join", tokB, "--name", "siteb", "--state", m.state("b"),
		"--dns", "off", "--log-level", "debug", "--expose", "web=127.0.0.1:8000", "--expose", "sink=127.0.0.1:9000")
	startProc(m.t, m.siteA, "agent-a", m.bin, "agent", "--join", tokA, "--name", "sitea", "--state", m.state("a"),
		"--dns", "off", "--log-level", "debug")
	tstest.WaitForNil(m.t, 30*time.Second, "web and sink at site A", func() error {
		out, err := m.run(m.siteA, "services", "--json", "--state", m.state("a"))
		if err != nil {
			return err
		}
		var s localapi.Services
		if err := json.Unmarshal(out, &s); err != nil {
			return err
		}
		m.web, m.sinkAt = "", ""
		for _, sv := range s.Consumed {
			if !sv.Listening || len(sv.Providers) != 1 {
				continue
			}
			switch sv.Name {
			case "web":
				m.web = sv.Local.String()
			case "sink":
				m.sinkAt = sv.Local.String()
			}
		}
		if m.web == "" || m.sinkAt == "" {
			return fmt.Errorf("services: %s", out)
		}
		return nil
	})
	m.t.Logf("services at site A after %v: web %s, sink %s", m.since(), m.web, m.sinkAt)
}

func (m *natMesh) since() time.Duration { return time.Since(m.started).Round(10 * time.Millisecond) }

// peer is site B as `meshlink status --json` shows it at site A.
func (m *natMesh) peer() (localapi.Peer, error) {
	out, err := m.run(m.siteA, "status", "--json", "--state", m.state("a"))
	if err != nil {
		return localapi.Peer{}, err
	}
	var st localapi.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return localapi.Peer{}, err
	}
	for _, p := range st.Peers {
		if p.Name == "siteb" {
			return p, nil
		}
	}
	return localapi.Peer{}, fmt.Errorf("no peer siteb in %s", out)
}

// waitPath waits until site A's status shows site B on path want and cond
// (if any) holds, and returns the peer as last seen.
func (m *natMesh) waitPath(want string, within time.Duration, cond func(localapi.Peer) error) localapi.Peer {
	m.t.Helper()
	var p localapi.Peer
	tstest.WaitForNil(m.t, within, "path "+want+" to siteb", func() error {
		var err error
		if p, err = m.peer(); err != nil {
			return err
		}
		if p.Path != want {
			return fmt.Errorf("path %q (endpoint %q, candidates %v)", p.Path, p.Endpoint, p.Candidates)
		}
		if cond != nil {
			return cond(p)
		}
		return nil
	})
	return p
}

// waitDirectToB waits for a direct path whose endpoint is router B's public
// address: the hole punched through both NATs.
func (m *natMesh) waitDirectToB(within time.Duration) localapi.Peer {
	m.t.Helper()
	return m.waitPath("direct", within, func(p localapi.Peer) error {
		if !strings.HasPrefix(p.Endpoint, natWANB+":") {
			return fmt.Errorf("direct endpoint %q, want router B's %s:PORT", p.Endpoint, natWANB)
		}
		return nil
	})
}

// get fetches hello through site A's proxy, the way a program at site A
// would.
func (m *natMesh) get(ctx context.Context) (string, error) {
	c := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return m.siteA.Dial(ctx, network, addr)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+m.web+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(string(b), "hello from siteb, through meshlink") {
		return "", fmt.Errorf("GET: %s: %q", resp.Status, b)
	}
	return strings.TrimSpace(string(b)), nil
}

// firstFetch waits for the first answer of hello through the mesh and logs
// how long it took from the agents' start and the path that carried it.
func (m *natMesh) firstFetch() {
	m.t.Helper()
	var body string
	tstest.WaitForNil(m.t, 20*time.Second, "hello through the mesh", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var err error
		body, err = m.get(ctx)
		return err
	})
	at := m.since()
	p, err := m.peer()
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Logf("first byte through the mesh after %v (path then: %s; relayed %d B, direct %d B): %s",
		at, p.Path, p.RelayedBytes, p.DirectBytes, body)
}

// ping runs `meshlink ping -c 1 siteb` at site A. The flags come first:
// the CLI parses none after the node name (README and the usage message
// show `meshlink ping siteb --state DIR`, which fails with the usage error).
func (m *natMesh) ping() string {
	m.t.Helper()
	out, err := m.run(m.siteA, "ping", "--state", m.state("a"), "-c", "1", "siteb")
	if err != nil {
		m.t.Fatalf("meshlink ping siteb: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// homeFirewall makes one of topo's routers a home router: what arrives on
// the WAN side ("eth0") passes only if it belongs to a flow the LAN started
// (or to one related to it, such as an ICMP error); the rest is dropped.
//
// topo's Router alone is a bare NAT box: it drops nothing, so an
// unsolicited UDP packet to its WAN address reaches its own stack (which
// answers port unreachable) and conntrack records that flow. When a peer's
// first hole-punching ping arrives before the site behind has sent its own,
// that record holds the very tuple the site's answer needs (same addresses,
// same ports), so masquerade gives the answer another source port: the
// router acts as a symmetric NAT for that peer, and every further ping keeps
// the record alive. A packet dropped by the filter is never recorded, hence
// this firewall. TestNATStatefulFirewall covers bare routers.
const homeFirewall = `table inet home {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "eth0" ct state established,related accept
		iifname "eth0" drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "eth0" ct state established,related accept
		iifname "eth0" drop
	}
}
`

// bareNAT removes homeFirewall from router r: unsolicited packets then
// reach the router's own stack.
func bareNAT(r *topo.Host) error {
	return applyNft(r, "table inet home {}\ndelete table inet home\n")
}

// reportPath gives hole punching up to within to find a direct path where
// it may be impossible, and returns site B as site A then sees it.
func (m *natMesh) reportPath(within time.Duration) localapi.Peer {
	m.t.Helper()
	var p localapi.Peer
	deadline := time.Now().Add(within)
	tstest.WaitForNil(m.t, within+5*time.Second, "a direct path or the deadline", func() error {
		var err error
		if p, err = m.peer(); err != nil {
			return err
		}
		if p.Path == "direct" || time.Now().After(deadline) {
			return nil
		}
		return errors.New("path " + p.Path)
	})
	if p.Path != "direct" && p.Path != "relay" {
		m.t.Fatalf("path %q: want direct or relay", p.Path)
	}
	return p
}

// applyNft loads an nftables script into h's namespace.
func applyNft(h *topo.Host, script string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := h.Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", h.Name(), err, out)
	}
	return nil
}

// TestNATBothSites: two sites, each behind its own NAT router. The service
// works at once (over the relay if need be) and the sites punch a direct
// path through both NATs: site A reaches site B at router B's public
// address.
func TestNATBothSites(t *testing.T) {
	m := newNATMesh(t)
	m.startAgents()
	m.firstFetch()
	m.upload(t, 4<<20, 0, 30*time.Second)

	p := m.waitDirectToB(directWithin)
	t.Logf("direct path up after %v: endpoint %s rtt %v candidates %v", m.since(), p.Endpoint, time.Duration(p.RTT), p.Candidates)

	out := m.ping()
	t.Logf("meshlink ping siteb: %s", out)
	if !strings.Contains(out, "via direct "+natWANB+":") {
		t.Fatalf("ping: want a pong via direct %s:PORT, got:\n%s", natWANB, out)
	}
	// Traffic after the path is up goes direct.
	before := p.DirectBytes
	m.upload(t, 4<<20, 0, 30*time.Second)
	if p, err := m.peer(); err != nil || p.Path != "direct" || p.DirectBytes < before+4<<20 {
		t.Fatalf("after 4 MB more: %+v, %v; want path direct and >= %d direct bytes", p, err, before+4<<20)
	}
}

// TestNATStatefulFirewall: site A's router admits inbound UDP only as
// replies to what left first (homeFirewall, the default of this topology:
// masquerade alone does not do it, see homeFirewall), and site B's is a bare
// NAT box. Whether hole punching succeeds then depends on whose first ping
// crosses first: if site A's reaches router B before site B has sent
// anything, router B remaps site B's answers to a new port and router A
// drops them. The service must work either way; the test reports the path.
// With both routers bare the same holds in both directions.
func TestNATStatefulFirewall(t *testing.T) {
	for _, tc := range []struct {
		name string
		bare []func(*natMesh) *topo.Host
	}{
		{"firewall-and-bare-nat", []func(*natMesh) *topo.Host{func(m *natMesh) *topo.Host { return m.routerB }}},
		{"both-bare-nat", []func(*natMesh) *topo.Host{
			func(m *natMesh) *topo.Host { return m.routerA }, func(m *natMesh) *topo.Host { return m.routerB }}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newNATMesh(t)
			for _, r := range tc.bare {
				if err := bareNAT(r(m)); err != nil {
					t.Fatal(err)
				}
			}
			m.startAgents()
			m.firstFetch()
			p := m.reportPath(reportWithin)
			t.Logf("%s after %v: path %s (endpoint %q, candidates %v)", tc.name, m.since(), p.Path, p.Endpoint, p.Candidates)
			m.upload(t, 4<<20, 0, 30*time.Second)
		})
	}
}

// TestNATSymmetric: site B's router is a symmetric ("hard") NAT: each new
// destination gets a new random public port, so the port STUN saw is not
// the one site A would have to answer to, and site A's router filters by
// address and port. No direct path can be found without guessing ports;
// the service must work anyway, and the test reports the path it got.
func TestNATSymmetric(t *testing.T) {
	m := newNATMesh(t)
	if err := applyNft(m.routerB, `table ip topo_nat {}
delete table ip topo_nat
table ip topo_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "eth0" masquerade random
	}
}
`); err != nil {
		t.Fatal(err)
	}
	m.startAgents()
	m.firstFetch()
	p := m.reportPath(reportWithin)
	t.Logf("behind a symmetric NAT after %v: path %s (endpoint %q, candidates %v, relayed %d B, direct %d B)",
		m.since(), p.Path, p.Endpoint, p.Candidates, p.RelayedBytes, p.DirectBytes)
	m.upload(t, 4<<20, 0, 30*time.Second)
}

// TestNATNoUDP: site A's host drops all UDP, as a firewall that lets only
// TCP out does. Everything goes through the relay, over the coordinator's
// TCP port, and both `status` and `ping` say so.
func TestNATNoUDP(t *testing.T) {
	m := newNATMesh(t)
	if err := m.siteA.DropUDP(); err != nil {
		t.Fatal(err)
	}
	m.startAgents()
	m.firstFetch()
	t.Logf("relay carried the first byte after %v", m.since())
	m.upload(t, 4<<20, 0, 30*time.Second)
	p := m.waitPath("relay", 10*time.Second, func(p localapi.Peer) error {
		if p.RelayedBytes < 4<<20 {
			return fmt.Errorf("only %d bytes relayed", p.RelayedBytes)
		}
		return nil
	})
	t.Logf("status at A: path %s relay %s relayed %d B", p.Path, p.Relay, p.RelayedBytes)
	out := m.ping()
	t.Logf("meshlink ping siteb: %s", out)
	if !strings.Contains(out, "via relay") || strings.Contains(out, "via direct") {
		t.Fatalf("ping: want pongs via relay only, got:\n%s", out)
	}
}

// TestNATDirectPathDies: a 30 MB upload runs over the direct path; a third
// of the way in, router A starts dropping all UDP (TCP to the coordinator,
// and with it the relay, still passes). The same TCP connection must carry
// on over the relay; once UDP passes again the path goes back to direct
// and carries the rest. The sink checks every byte (SHA-256).
func TestNATDirectPathDies(t *testing.T) {
	const (
		dropAt = 8 << 20  // received by the sink when UDP is cut
		hold   = 20 << 20 // sent before the writer waits for the direct path to return
		total  = 30 << 20
		// The writer is paced so that UDP is cut while bytes are flowing,
		// not after the stream is done.
		rate = 16 << 20 // bytes/s
	)
	m := newNATMesh(t)
	m.startAgents()
	p := m.waitDirectToB(directWithin)
	t.Logf("direct path up after %v: %s", m.since(), p.Endpoint)

	up, err := m.openUpload(m.sinkAt, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer up.c.Close()
	gate := make(chan struct{})
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(gate) }) }
	defer release() // a test that failed early lets the writer run into the closed connection
	done := make(chan error, 1)
	go func() {
		if err := up.write(hold, rate); err != nil {
			done <- err
			return
		}
		<-gate
		if err := up.write(total-hold, 0); err != nil {
			done <- err
			return
		}
		done <- up.finish()
	}()

	select {
	case <-m.sink.reached(dropAt):
	case err := <-done:
		t.Fatalf("upload ended before UDP was cut: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("the sink got only %d bytes in 30 s", m.sink.total.Load())
	}
	if p, err = m.peer(); err != nil {
		t.Fatal(err)
	}
	if p.Path != "direct" {
		t.Fatalf("path %q when UDP was to be cut, want direct", p.Path)
	}
	relayedAtCut, directAtCut := p.RelayedBytes, p.DirectBytes
	// What the polls below saw, shown if the test fails.
	var trace []string
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("after the cut (time, path, bytes since the cut at the sink, relayed, direct):\n%s", strings.Join(trace, "\n"))
		}
	})
	if err := m.routerA.DropUDP(); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	t.Logf("UDP cut at router A with %d bytes at the sink", m.sink.total.Load())
	receivedAtCut := m.sink.total.Load()

	// The stream resumes over the relay: status says relay and the sink
	// gets more bytes, carried by the relay.
	var onRelay time.Duration // when status first said relay
	sample := func(p localapi.Peer) {
		trace = append(trace, fmt.Sprintf("%7.2fs %-6s sink +%d relayed +%d direct +%d", time.Since(cut).Seconds(), p.Path,
			m.sink.total.Load()-receivedAtCut, p.RelayedBytes-relayedAtCut, p.DirectBytes-directAtCut))
	}
	p = m.waitPath("relay", 30*time.Second, func(p localapi.Peer) error {
		sample(p)
		if onRelay == 0 {
			onRelay = time.Since(cut)
		}
		if got := m.sink.total.Load() - receivedAtCut; got < 1<<20 || p.RelayedBytes-relayedAtCut < 1<<20 {
			return fmt.Errorf("since the cut: %d bytes at the sink, %d relayed", got, p.RelayedBytes-relayedAtCut)
		}
		return nil
	})
	// The stall is the trust window of the dead path (7 s without a pong)
	// plus however long the connection's TCP then waits for its next
	// retransmission timeout, which doubles while nothing gets through.
	t.Logf("status said relay %v after the cut; relay carried the stream %v after the cut (relayed %d B since)",
		onRelay.Round(10*time.Millisecond), time.Since(cut).Round(10*time.Millisecond), p.RelayedBytes-relayedAtCut)
	tstest.WaitForNil(t, 40*time.Second, "the first 20 MB at the sink", func() error {
		if p, err := m.peer(); err == nil {
			sample(p)
		}
		select {
		case err := <-done:
			return fmt.Errorf("upload ended early: %v", err)
		default:
		}
		if n := m.sink.total.Load(); n < hold {
			return fmt.Errorf("%d bytes", n)
		}
		return nil
	})
	if p, err = m.peer(); err != nil {
		t.Fatal(err)
	}
	if p.RelayedBytes-relayedAtCut < hold-dropAt-(4<<20) {
		t.Errorf("only %d bytes relayed since the cut, want most of the %d sent after it", p.RelayedBytes-relayedAtCut, hold-dropAt)
	}

	if err := m.routerA.AllowUDP(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	p = m.waitDirectToB(directWithin)
	t.Logf("direct path back %v after UDP returned: %s", time.Since(back).Round(10*time.Millisecond), p.Endpoint)
	directBefore := p.DirectBytes
	release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("upload did not finish; sink has %d bytes", m.sink.total.Load())
	}
	t.Logf("%d MB arrived intact (SHA-256) across direct -> relay -> direct", total>>20)
	if p, err = m.peer(); err != nil {
		t.Fatal(err)
	}
	if p.DirectBytes-directBefore < total-hold {
		t.Errorf("the last %d MB: only %d bytes went direct (path %s)", (total-hold)>>20, p.DirectBytes-directBefore, p.Path)
	}
}

// TestNATLossyWAN: 5% of the packets leaving each router onto the WAN are
// lost, both directions of every flow between the sites, and 50 ms of
// delay are added each way (by netem, or by topo's NFQUEUE delay where the
// kernel has no netem). A 20 MB upload still arrives intact through the
// mesh. For scale, the same upload over plain kernel TCP along the same
// lossy path (site A to a sink on router B's WAN address) is timed first.
func TestNATLossyWAN(t *testing.T) {
	const size = 20 << 20
	m := newNATMesh(t)
	// One wire packet per skb, so that the loss below drops 5% of the
	// packets and not 5% of 64 KB bursts (see topo.Host.NoGSO).
	for _, h := range []*topo.Host{m.siteA, m.siteB} {
		if err := h.NoGSO("eth0"); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []*topo.Host{m.routerA, m.routerB} {
		if err := r.Loss("eth0", 5); err != nil {
			t.Fatal(err)
		}
		err := r.Netem("eth0", "delay 50ms")
		if errors.Is(err, errors.ErrUnsupported) {
			// No netem in this kernel: the packets wait in an NFQUEUE
			// that the test process releases 50 ms later instead.
			err = r.Delay("eth0", 50*time.Millisecond)
		}
		if errors.Is(err, errors.ErrUnsupported) {
			t.Logf("no delay on %s: neither netem nor NFQUEUE (%v); loss only", r.Name(), err)
		} else if err != nil {
			t.Fatal(err)
		}
	}

	// The baseline: router B's firewall lets this one port in.
	base := startSink(t, m.routerB, natWANB+":9999")
	if err := applyNft(m.routerB, "insert rule inet home input tcp dport 9999 accept\n"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := m.uploadTo(natWANB+":9999", base, size, 0, 60*time.Second); err != nil {
		t.Fatalf("kernel TCP baseline: %v", err)
	}
	baseline := time.Since(start)
	t.Logf("kernel TCP over the same lossy path: %d MB in %v (%.1f MB/s)", size>>20, baseline.Round(10*time.Millisecond), size/baseline.Seconds()/1e6)

	m.startAgents()
	m.firstFetch()
	p := m.waitDirectToB(directWithin)
	t.Logf("direct path up after %v over the lossy WAN", m.since())
	start = time.Now()
	// The mesh's TCP (gVisor, tuned in netstack/tcp.go) recovers from
	// random loss far more slowly than kernel TCP: ~0.07 MB/s over 5% loss
	// and 100 ms RTT (20 MB in ~5 min) where kernel TCP does 3-6 MB/s, a
	// known gap. The deadline lets the 20 MB arrive with room to spare on
	// a loaded machine.
	err := m.uploadTo(m.sinkAt, m.sink, size, 0, 9*time.Minute)
	el := time.Since(start)
	p2, perr := m.peer()
	if perr != nil {
		t.Fatal(perr)
	}
	t.Logf("through the mesh: path %s -> %s, direct %d B, relayed %d B during the upload",
		p.Path, p2.Path, p2.DirectBytes-p.DirectBytes, p2.RelayedBytes-p.RelayedBytes)
	if err != nil {
		t.Fatalf("%d MB through the mesh over 5%% loss: %v; kernel TCP took %v", size>>20, err, baseline.Round(10*time.Millisecond))
	}
	t.Logf("%d MB intact through the mesh over 5%% loss in %v (%.1f MB/s; kernel TCP %v)",
		size>>20, el.Round(10*time.Millisecond), size/el.Seconds()/1e6, baseline.Round(10*time.Millisecond))
}

// TestNATPortChangingNAT: router B maps site B's UDP port to another one
// (30000), the same for every destination: an endpoint-independent
// mapping, the easy kind for hole punching, as long as site B learns its
// public port by STUN and publishes it. The address the coordinator sees
// the agent's TCP connection come from, with the agent's own port, is not
// enough here. The path must be direct, at router B's port 30000.
func TestNATPortChangingNAT(t *testing.T) {
	m := newNATMesh(t)
	if err := applyNft(m.routerB, `table ip topo_nat {}
delete table ip topo_nat
table ip topo_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "eth0" meta l4proto udp masquerade to :30000
		oifname "eth0" masquerade
	}
}
`); err != nil {
		t.Fatal(err)
	}
	m.startAgents()
	m.firstFetch()
	want := natWANB + ":30000"
	p := m.waitPath("direct", directWithin, func(p localapi.Peer) error {
		if p.Endpoint != want {
			return fmt.Errorf("direct at %q, want %s", p.Endpoint, want)
		}
		return nil
	})
	t.Logf("direct path up after %v at %s", m.since(), p.Endpoint)
	m.upload(t, 4<<20, 0, 30*time.Second)
}

// sinkServer is site B's byte sink: it reads a connection to its end, then
// answers the byte count (8 bytes) and the SHA-256 of what it read.
type sinkServer struct {
	ln    net.Listener
	total atomic.Int64 // bytes received over all connections

	mu    sync.Mutex // guards the fields below
	conns map[net.Conn]bool
	marks []sinkMark
}

type sinkMark struct {
	n  int64
	ch chan struct{}
}

func startSink(t *testing.T, h *topo.Host, addr string) *sinkServer {
	t.Helper()
	ln, err := h.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &sinkServer{ln: ln, conns: map[net.Conn]bool{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = true
			s.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.serve(c)
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		wg.Wait()
	})
	return s
}

func (s *sinkServer) serve(c net.Conn) {
	defer c.Close()
	sum := sha256.New()
	buf := make([]byte, 64<<10)
	var n int64
	for {
		k, err := c.Read(buf)
		sum.Write(buf[:k])
		n += int64(k)
		s.add(int64(k))
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return
		}
	}
	var out [8 + sha256.Size]byte
	binary.BigEndian.PutUint64(out[:8], uint64(n))
	sum.Sum(out[8:8])
	c.Write(out[:])
}

func (s *sinkServer) add(k int64) {
	now := s.total.Add(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := s.marks[:0]
	for _, mk := range s.marks {
		if now >= mk.n {
			close(mk.ch)
		} else {
			kept = append(kept, mk)
		}
	}
	s.marks = kept
}

// reached is closed once n more bytes than now have arrived in all.
func (s *sinkServer) reached(n int64) <-chan struct{} {
	ch := make(chan struct{})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.marks = append(s.marks, sinkMark{n: s.total.Load() + n, ch: ch})
	return ch
}

// upload is one connection from site A to the sink through the mesh,
// carrying pseudo-random bytes whose hash it keeps.
type upload struct {
	c    net.Conn
	sum  hash.Hash
	src  *rand.ChaCha8
	sent int64
}

// openUpload connects from site A to a sink at addr (site A's proxy for
// sink, or a sink elsewhere for comparison).
func (m *natMesh) openUpload(addr string, within time.Duration) (*upload, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := m.siteA.Dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(within))
	var seed [32]byte
	binary.BigEndian.PutUint64(seed[:], uint64(time.Now().UnixNano()))
	return &upload{c: c, sum: sha256.New(), src: rand.NewChaCha8(seed)}, nil
}

// write sends n more bytes, at most rate bytes/s if rate > 0.
func (u *upload) write(n int64, rate float64) error {
	buf := make([]byte, 64<<10)
	start := time.Now()
	for done := int64(0); done < n; {
		k := min(int64(len(buf)), n-done)
		u.src.Read(buf[:k])
		u.sum.Write(buf[:k])
		if _, err := u.c.Write(buf[:k]); err != nil {
			return fmt.Errorf("upload: write after %d bytes: %w", u.sent, err)
		}
		done += k
		u.sent += k
		if rate > 0 {
			// Pacing, not waiting for a condition: the writer keeps to a
			// schedule so that the stream is still running when the test
			// breaks the path.
			if ahead := time.Duration(float64(done)/rate*float64(time.Second)) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
	}
	return nil
}

// finish half-closes the connection and checks the sink's count and hash.
func (u *upload) finish() error {
	if err := u.c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	var ack [8 + sha256.Size]byte
	if _, err := io.ReadFull(u.c, ack[:]); err != nil {
		return fmt.Errorf("upload: sink's answer after %d bytes sent: %w", u.sent, err)
	}
	if got := int64(binary.BigEndian.Uint64(ack[:8])); got != u.sent {
		return fmt.Errorf("upload: sink got %d bytes, sent %d", got, u.sent)
	}
	if want := u.sum.Sum(nil); string(ack[8:]) != string(want) {
		return fmt.Errorf("upload: %d bytes arrived corrupted: sha256 %x, sent %x", u.sent, ack[8:], want)
	}
	return nil
}

// upload sends n bytes to the sink through the mesh and fails the test
// unless all of them arrive intact within the time given.
func (m *natMesh) upload(t *testing.T, n int64, rate float64, within time.Duration) {
	t.Helper()
	if err := m.uploadTo(m.sinkAt, m.sink, n, rate, within); err != nil {
		t.Fatal(err)
	}
}

// uploadTo sends n bytes to sink s at addr and checks they all arrived
// intact; the error says how far the stream got.
func (m *natMesh) uploadTo(addr string, s *sinkServer, n int64, rate float64, within time.Duration) error {
	start, atSink := time.Now(), s.total.Load()
	up, err := m.openUpload(addr, within)
	if err != nil {
		return err
	}
	defer up.c.Close()
	err = up.write(n, rate)
	if err == nil {
		err = up.finish()
	}
	if err != nil {
		got := s.total.Load() - atSink
		return fmt.Errorf("%w (the sink got %d of %d bytes in %v, %.2f MB/s)", err, got, n,
			time.Since(start).Round(10*time.Millisecond), float64(got)/time.Since(start).Seconds()/1e6)
	}
	return nil
}
