package agent

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/dns"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// node is a mesh node with a fresh key and addresses derived from its ID.
func node(id wire.NodeID, name string) wire.Node {
	return wire.Node{
		ID: id, Name: name, Key: key.NewPrivate().Public(), Online: true,
		Addresses: []netip.Prefix{
			netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 96, 0, byte(id)}), 32),
			netip.MustParsePrefix("fd7a:6d65:7368::" + string(rune('0'+id)) + "/128"),
		},
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(id)}), 41641)},
	}
}

var testCfg = Config{ProxyRange: netip.MustParsePrefix(DefaultProxyRange), RetryMin: time.Second, RetryMax: 30 * time.Second}

func TestDesiredConfig(t *testing.T) {
	self, b, c := node(1, "self"), node(2, "b"), node(3, "c")
	keyless := node(4, "keyless")
	keyless.Key = key.Public{}
	relayKey := key.NewPrivate().Public()
	stun := []netip.AddrPort{netip.MustParseAddrPort("203.0.113.1:443")}
	web := wire.Service{Name: "web", VIP: netip.MustParseAddr("100.100.0.7"), Port: 80,
		Providers: []wire.Provider{{Node: 2, Port: 8080}, {Node: 3, Port: 80}}, AllowedNodes: []string{"*"}}
	webTargets := []proxy.Target{
		{Node: 2, Name: "b", Addr: netip.MustParseAddrPort("100.96.0.2:8080"), Online: true},
		{Node: 3, Name: "c", Addr: netip.MustParseAddrPort("100.96.0.3:80"), Online: true},
	}
	wgPeer := func(n wire.Node) wgcfg.Peer {
		return wgcfg.Peer{PublicKey: n.Key, AllowedIPs: n.Addresses, Endpoint: bind.EndpointString(n.Key)}
	}

	cases := []struct {
		name    string
		nm      *wire.NetworkMap
		exports []Export
		joined  bool
		check   func(t *testing.T, d Desired)
	}{
		{
			name: "no map yet: exports and STUN only", exports: []Export{{Name: "db", Target: "127.0.0.1:5432", Port: 5432}}, joined: true,
			check: func(t *testing.T, d Desired) {
				want := Desired{Exports: []Export{{Name: "db", Target: "127.0.0.1:5432", Port: 5432}}, STUN: stun}
				if !reflect.DeepEqual(d, want) {
					t.Fatalf("got %+v, want %+v", d, want)
				}
			},
		},
		{
			name: "peers become WireGuard and bind peers, self skipped",
			nm:   &wire.NetworkMap{Self: self, Peers: []wire.Node{self, b, c}}, joined: true,
			check: func(t *testing.T, d Desired) {
				if want := []netip.Addr{self.Addresses[0].Addr(), self.Addresses[1].Addr()}; !slices.Equal(d.Addrs, want) {
					t.Errorf("netstack addresses %v, want %v", d.Addrs, want)
				}
				want := wgcfg.Config{Peers: []wgcfg.Peer{wgPeer(b), wgPeer(c)}}
				if s := wgcfg.Diff(&want, &d.WireGuard); s != "" || len(d.WireGuard.Peers) != 2 {
					t.Errorf("WireGuard peers %+v differ from the map's: %s", d.WireGuard.Peers, s)
				}
				if !d.WireGuard.PrivateKey.IsZero() || d.WireGuard.ListenPort != 0 {
					t.Errorf("desired WireGuard config sets the device's key or port")
				}
				wantBind := []bind.PeerConfig{{Key: b.Key, Name: "b", Endpoints: b.Endpoints}, {Key: c.Key, Name: "c", Endpoints: c.Endpoints}}
				if !reflect.DeepEqual(d.BindPeers, wantBind) {
					t.Errorf("bind peers %+v, want %+v", d.BindPeers, wantBind)
				}
			},
		},
		{
			name: "peer without a key skipped, but still named in DNS",
			nm:   &wire.NetworkMap{Self: self, Peers: []wire.Node{b, keyless}}, joined: true,
			check: func(t *testing.T, d Desired) {
				if len(d.WireGuard.Peers) != 1 || d.WireGuard.Peers[0].PublicKey != b.Key || len(d.BindPeers) != 1 {
					t.Errorf("peers %+v / %+v, want only b", d.WireGuard.Peers, d.BindPeers)
				}
				if _, ok := d.Policy.peers[keyless.Addresses[0].Addr()]; ok {
					t.Errorf("a keyless peer is in the policy table")
				}
				if len(d.Zone.Nodes["keyless"]) != 2 || len(d.Zone.Nodes["self"]) != 2 {
					t.Errorf("DNS nodes %v", d.Zone.Nodes)
				}
			},
		},
		{
			name: "service with VIP and port gets a listener, providers as targets",
			nm:   &wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{web}}, joined: true,
			check: func(t *testing.T, d Desired) {
				want := []proxy.ServiceConfig{{Name: "web", Listen: netip.MustParseAddrPort("127.100.0.7:80"), Targets: webTargets}}
				if !reflect.DeepEqual(d.Services, want) {
					t.Errorf("services %+v, want %+v", d.Services, want)
				}
				wantZone := dns.Service{Addrs: []netip.Addr{netip.MustParseAddr("127.100.0.7")}, Port: 80, VIP: web.VIP}
				if got := d.Zone.Services["web"]; !reflect.DeepEqual(got, wantZone) {
					t.Errorf("DNS for web %+v, want %+v", got, wantZone)
				}
				// PTRs of node, VIP and proxy addresses stay local.
				for _, a := range []string{"100.96.0.9", "fd7a:6d65:7368::9", "100.100.0.7", "127.100.0.7"} {
					if !slices.ContainsFunc(d.Zone.Local, func(p netip.Prefix) bool { return p.Contains(netip.MustParseAddr(a)) }) {
						t.Errorf("zone's local ranges %v leave out %s", d.Zone.Local, a)
					}
				}
			},
		},
		{
			name: "services without a VIP or a port are not consumed",
			nm: &wire.NetworkMap{Self: self, Peers: []wire.Node{b}, Services: []wire.Service{
				{Name: "novip", Port: 80, Providers: []wire.Provider{{Node: 2, Port: 80}}},
				{Name: "badvip", VIP: netip.MustParseAddr("10.0.0.1"), Port: 80, Providers: []wire.Provider{{Node: 2, Port: 80}}},
				{Name: "noport", VIP: netip.MustParseAddr("100.100.0.8"), Providers: []wire.Provider{{Node: 2, Port: 80}}},
			}}, joined: true,
			check: func(t *testing.T, d Desired) {
				if len(d.Services) != 0 || len(d.Zone.Services) != 0 {
					t.Errorf("services %+v, zone %+v; want none", d.Services, d.Zone.Services)
				}
			},
		},
		{
			name: "providers that are unknown or keyless are not targets",
			nm: &wire.NetworkMap{Self: self, Peers: []wire.Node{b, keyless}, Services: []wire.Service{
				{Name: "web", VIP: netip.MustParseAddr("100.100.0.7"), Port: 80, Providers: []wire.Provider{{Node: 2, Port: 80}, {Node: 4, Port: 80}, {Node: 9, Port: 80}}},
			}}, joined: true,
			check: func(t *testing.T, d Desired) {
				if len(d.Services) != 1 || len(d.Services[0].Targets) != 1 || d.Services[0].Targets[0].Node != 2 {
					t.Errorf("services %+v, want web with only b", d.Services)
				}
			},
		},
		{
			name: "a local export is dialed directly; a stale self-provider is dropped",
			nm: &wire.NetworkMap{Self: self, Peers: []wire.Node{b}, Services: []wire.Service{
				{Name: "db", VIP: netip.MustParseAddr("100.100.0.9"), Port: 5432, Providers: []wire.Provider{{Node: 1, Port: 5432}, {Node: 2, Port: 5432}}},
				{Name: "gone", VIP: netip.MustParseAddr("100.100.0.10"), Port: 80, Providers: []wire.Provider{{Node: 1, Port: 80}}},
			}},
			exports: []Export{{Name: "db", Target: "127.0.0.1:5432", Port: 5432}}, joined: true,
			check: func(t *testing.T, d Desired) {
				want := []proxy.ServiceConfig{
					{Name: "db", Listen: netip.MustParseAddrPort("127.100.0.9:5432"), Targets: []proxy.Target{
						{Node: 1, Name: "self", Local: "127.0.0.1:5432", Online: true},
						{Node: 2, Name: "b", Addr: netip.MustParseAddrPort("100.96.0.2:5432"), Online: true}}},
					{Name: "gone", Listen: netip.MustParseAddrPort("127.100.0.10:80")},
				}
				if !reflect.DeepEqual(d.Services, want) {
					t.Errorf("services %+v, want %+v", d.Services, want)
				}
				if !slices.Equal(d.Exports, []Export{{Name: "db", Target: "127.0.0.1:5432", Port: 5432}}) {
					t.Errorf("exports %+v", d.Exports)
				}
			},
		},
		{
			name: "relays without a key are skipped",
			nm: &wire.NetworkMap{Self: self, Relays: []wire.Relay{
				{Name: "coordinator", URL: "https://c:443", Fingerprint: "fp", Key: relayKey},
				{Name: "broken", URL: "https://r:443"},
			}}, joined: true,
			check: func(t *testing.T, d Desired) {
				want := []bind.RelayConfig{{Name: "coordinator", URL: "https://c:443", Fingerprint: "fp", Key: relayKey, RetryMin: time.Second, RetryMax: 30 * time.Second}}
				if !slices.Equal(d.Relays, want) {
					t.Errorf("relays %+v, want %+v", d.Relays, want)
				}
				if len(d.SkippedRelays) != 1 || d.SkippedRelays[0].Name != "broken" {
					t.Errorf("skipped %+v, want broken", d.SkippedRelays)
				}
			},
		},
		{
			name: "no relays before the node has joined",
			nm:   &wire.NetworkMap{Self: self, Relays: []wire.Relay{{Name: "coordinator", URL: "https://c:443", Key: relayKey}}},
			check: func(t *testing.T, d Desired) {
				if len(d.Relays) != 0 {
					t.Errorf("relays %+v before joining", d.Relays)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := desiredConfig(desiredInput{Map: tc.nm, Exports: tc.exports, Config: testCfg, Joined: tc.joined, STUN: stun})
			if !slices.Equal(d.STUN, stun) {
				t.Errorf("STUN %v, want %v", d.STUN, stun)
			}
			tc.check(t, d)
		})
	}
}

// Two maps in a row: what WireGuard is told is exactly the change.
func TestDesiredPeerChanges(t *testing.T) {
	self, b, c, e := node(1, "self"), node(2, "b"), node(3, "c"), node(5, "e")
	desired := func(peers ...wire.Node) Desired {
		return desiredConfig(desiredInput{Map: &wire.NetworkMap{Self: self, Peers: peers}, Config: testCfg, Joined: true})
	}
	bMoved := b
	bMoved.Addresses = []netip.Prefix{netip.MustParsePrefix("100.96.0.22/32")}
	section := func(n wire.Node, endpoint bool) string {
		s := "public_key=" + n.Key.UAPI() + "\n"
		if endpoint {
			s += "endpoint=" + bind.EndpointString(n.Key) + "\n"
		}
		s += "replace_allowed_ips=true\n"
		for _, p := range n.Addresses {
			s += "allowed_ip=" + p.String() + "\n"
		}
		return s
	}
	cases := []struct {
		name       string
		prev, next Desired
		want       []string // sections, in any order
	}{
		{"peer added", desired(b), desired(b, c), []string{section(c, true)}},
		{"peer removed", desired(b, c), desired(b), []string{"public_key=" + c.Key.UAPI() + "\nremove=true\n"}},
		{"allowed IPs changed", desired(b, c), desired(bMoved, c), []string{section(bMoved, false)}},
		{"same map, no change", desired(b, c), desired(c, b), nil},
		{"online flag only, no change", desired(b), func() Desired { off := b; off.Online = false; return desired(off) }(), nil},
		{"one added, one removed", desired(b, c), desired(b, e), []string{"public_key=" + c.Key.UAPI() + "\nremove=true\n", section(e, true)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := wgcfg.Diff(&tc.prev.WireGuard, &tc.next.WireGuard)
			rest := got
			for _, s := range tc.want {
				i := strings.Index(rest, s)
				if i < 0 {
					t.Fatalf("update %q lacks %q", got, s)
				}
				rest = rest[:i] + rest[i+len(s):]
			}
			if rest != "" {
				t.Fatalf("update %q has more than wanted: %q", got, rest)
			}
		})
	}
}

func TestPolicy(t *testing.T) {
	self, b, c := node(1, "self"), node(2, "b"), node(3, "c")
	nm := &wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{
		{Name: "open", AllowedNodes: []string{"*"}},
		{Name: "by-name", AllowedNodes: []string{"b"}},
		{Name: "by-id", AllowedNodes: []string{"3"}},
		{Name: "closed"},
		{Name: "by-name", AllowedNodes: []string{"*"}}, // a second entry of a name is ignored
	}}
	p := desiredConfig(desiredInput{Map: nm, Config: testCfg}).Policy
	bAddr, cAddr6 := b.Addresses[0].Addr(), c.Addresses[1].Addr()
	cases := []struct {
		name    string
		pol     *policy
		src     netip.Addr
		service string
		peer    string
		want    bool
	}{
		{"anyone", p, bAddr, "open", "b", true},
		{"a name is no node ID", p, bAddr, "by-name", "b", false},
		{"not named", p, cAddr6, "by-name", "c", false},
		{"allowed by node ID over IPv6", p, cAddr6, "by-id", "c", true},
		{"nobody", p, bAddr, "closed", "b", false},
		{"unknown service", p, bAddr, "nope", "b", false},
		{"unknown address", p, netip.MustParseAddr("100.96.0.99"), "open", "", false},
		{"IPv4-mapped source", p, netip.AddrFrom16(bAddr.As16()), "open", "b", true},
		{"own address is not a peer", p, self.Addresses[0].Addr(), "open", "", false},
		{"no map yet", nil, bAddr, "open", "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			peer, ok := tc.pol.allow(tc.src, tc.service)
			if peer != tc.peer || ok != tc.want {
				t.Fatalf("allow(%s, %s) = %q, %v; want %q, %v", tc.src, tc.service, peer, ok, tc.peer, tc.want)
			}
		})
	}
}

// TestPolicyNodeNamedLikeAnID: AllowedNodes holds node IDs. A member who
// names its node after the decimal ID of a node the policy lets in ("3")
// must not be let in by its name: node names are chosen by whoever joins,
// IDs by the coordinator.
func TestPolicyNodeNamedLikeAnID(t *testing.T) {
	self, mallory, carol := node(1, "self"), node(2, "3"), node(3, "carol")
	nm := &wire.NetworkMap{Self: self, Peers: []wire.Node{mallory, carol}, Services: []wire.Service{
		{Name: "db", AllowedNodes: []string{"3"}}, // carol's ID
	}}
	p := desiredConfig(desiredInput{Map: nm, Config: testCfg}).Policy
	for _, a := range mallory.Addresses {
		if _, ok := p.allow(a.Addr(), "db"); ok {
			t.Errorf("node 2, named %q, reaches db (allowed: node ID 3) from %s", mallory.Name, a.Addr())
		}
		if why := p.closeReason(a.Addr(), "db", []proxy.Export{{Name: "db"}}); why == "" {
			t.Errorf("an open connection of node 2, named %q, to db is kept", mallory.Name)
		}
	}
	if _, ok := p.allow(carol.Addresses[0].Addr(), "db"); !ok {
		t.Error("carol (node 3) is refused db")
	}
}

// TestDesiredDropsExpiredPeers: a peer whose key expired more than the
// skew ago is left out of WireGuard, the bind, the policy and the
// services' targets, even though the map (the coordinator out of reach)
// still lists it; the next expiry among the others is reported.
func TestDesiredDropsExpiredPeers(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	self, old, soon, fresh := node(1, "self"), node(2, "old"), node(3, "soon"), node(4, "fresh")
	old.KeyExpiry = now.Add(-2 * time.Minute)
	soon.KeyExpiry = now.Add(-30 * time.Second) // expired, but within the skew
	fresh.KeyExpiry = now.Add(time.Hour)
	web := wire.Service{Name: "web", VIP: netip.MustParseAddr("100.100.0.7"), Port: 80,
		Providers: []wire.Provider{{Node: 2, Port: 80}, {Node: 4, Port: 80}}, AllowedNodes: []string{"*"}}
	nm := &wire.NetworkMap{Self: self, Peers: []wire.Node{old, soon, fresh}, Services: []wire.Service{web}, Domain: "mesh.internal"}
	d := desiredConfig(desiredInput{Map: nm, Config: testCfg, Joined: true, Now: now, ExpirySkew: time.Minute})
	if !slices.Equal(d.ExpiredPeers, []string{"old"}) {
		t.Errorf("expired peers %v, want [old]", d.ExpiredPeers)
	}
	var wg []key.Public
	for _, p := range d.WireGuard.Peers {
		wg = append(wg, p.PublicKey)
	}
	if slices.Contains(wg, old.Key) || !slices.Contains(wg, soon.Key) || !slices.Contains(wg, fresh.Key) {
		t.Errorf("WireGuard peers hold the expired one or lack a valid one")
	}
	if _, ok := d.Policy.allow(old.Addresses[0].Addr(), "web"); ok {
		t.Error("the policy still lets the expired peer in")
	}
	for _, s := range d.Services {
		for _, tg := range s.Targets {
			if tg.Node == old.ID {
				t.Errorf("service %s still targets the expired peer", s.Name)
			}
		}
	}
	if want := soon.KeyExpiry.Add(time.Minute); !d.NextExpiry.Equal(want) {
		t.Errorf("next expiry %v, want %v", d.NextExpiry, want)
	}
	// Without a clock (tests of other parts), nothing is dropped.
	if d := desiredConfig(desiredInput{Map: nm, Config: testCfg, Joined: true}); len(d.WireGuard.Peers) != 3 {
		t.Errorf("without Now: %d peers, want 3", len(d.WireGuard.Peers))
	}
}
