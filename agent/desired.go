package agent

import (
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/dns"
	"github.com/meshlink/meshlink/wire"
)

// Desired is the whole configuration of every part of the agent for one
// network map, as a value. desiredConfig computes it without touching a
// device; an applier writes what differs from what is applied.
type Desired struct {
	// Addrs are this node's mesh addresses, served by the netstack.
	Addrs []netip.Addr
	// WireGuard holds the peers; the device's key and port are set once
	// when it starts, and stay zero here.
	WireGuard wgcfg.Config
	// BindPeers are the peers' candidate UDP endpoints, for the bind.
	BindPeers []bind.PeerConfig
	// Relays the bind keeps connections to; only once the node has joined.
	Relays []bind.RelayConfig
	// STUN servers the bind learns its public address from.
	STUN []netip.AddrPort
	// Services are the consumed services: one local listener each.
	Services []proxy.ServiceConfig
	// Exports are the services this site provides.
	Exports []proxy.Export
	// Policy decides who may reach the exports.
	Policy *policy
	// Zone is the DNS server's mesh zone.
	Zone dns.Zone

	// SkippedRelays are relays of the map without a valid key: reported,
	// never used.
	SkippedRelays []wire.Relay
	// ExpiredPeers are the peers of the map left out because their keys
	// expired (plus the skew margin), though the map still lists them:
	// the coordinator is out of reach, and this site enforces expiry
	// itself. NextExpiry is when the next of the others expires (zero:
	// none does); the desired state must be computed again then.
	ExpiredPeers []string
	NextExpiry   time.Time
}

// desiredInput is everything the desired state is computed from.
type desiredInput struct {
	// Map is the network map; nil before the first one (or a cached one)
	// arrived, when only exports and STUN are configured.
	Map     *wire.NetworkMap
	Exports []Export
	Config  Config // ProxyRange, RetryMin, RetryMax
	// Joined is whether the node has an ID: relays need one.
	Joined bool
	// STUN is the coordinator's resolved STUN address, if any.
	STUN []netip.AddrPort
	// Now, when set, leaves out the peers whose keys expired more than
	// ExpirySkew ago (the margin for clocks that differ from the
	// coordinator's).
	Now        time.Time
	ExpirySkew time.Duration
}

// desiredConfig turns a network map, the site's exports and the agent's
// configuration into the desired state of every part. It is pure.
func desiredConfig(in desiredInput) Desired {
	d := Desired{Exports: slices.Clone(in.Exports), STUN: slices.Clone(in.STUN)}
	nm := in.Map
	if nm == nil {
		return d
	}
	for _, p := range nm.Self.Addresses {
		d.Addrs = append(d.Addrs, p.Addr())
	}

	// Peers: WireGuard, the bind and the policy's view of who is who.
	byID := map[wire.NodeID]*wire.Node{}
	pol := &policy{peers: map[netip.Addr]policyPeer{}, allowed: map[string][]string{}}
	for i := range nm.Peers {
		p := &nm.Peers[i]
		if p.ID == nm.Self.ID || p.Key.IsZero() {
			continue
		}
		if !in.Now.IsZero() && !p.KeyExpiry.IsZero() {
			if end := p.KeyExpiry.Add(in.ExpirySkew); !in.Now.Before(end) {
				d.ExpiredPeers = append(d.ExpiredPeers, p.Name)
				continue
			} else if d.NextExpiry.IsZero() || end.Before(d.NextExpiry) {
				d.NextExpiry = end
			}
		}
		byID[p.ID] = p
		for _, pfx := range p.Addresses {
			pol.peers[pfx.Addr()] = policyPeer{id: p.ID, name: p.Name}
		}
		// WireGuard gets one virtual endpoint per peer; the bind picks the
		// path (direct UDP or relay) for every packet.
		d.WireGuard.Peers = append(d.WireGuard.Peers, wgcfg.Peer{PublicKey: p.Key, AllowedIPs: p.Addresses, Endpoint: bind.EndpointString(p.Key)})
		d.BindPeers = append(d.BindPeers, bind.PeerConfig{Key: p.Key, Name: p.Name, Endpoints: p.Endpoints})
	}
	for _, s := range nm.Services {
		if _, dup := pol.allowed[s.Name]; !dup {
			pol.allowed[s.Name] = s.AllowedNodes
		}
		// The map makes an export HTTP (the policy file may declare it),
		// with the service's HTTP configuration.
		if s.HTTP != nil {
			for i := range d.Exports {
				if d.Exports[i].Name == s.Name && wire.HasTCP(d.Exports[i].Protocol) {
					d.Exports[i].HTTP = s.HTTP
				}
			}
		}
	}
	d.Policy = pol

	if in.Joined {
		for _, r := range nm.Relays {
			if r.Key.IsZero() {
				d.SkippedRelays = append(d.SkippedRelays, r)
				continue
			}
			d.Relays = append(d.Relays, bind.RelayConfig{Name: r.Name, URL: r.URL, Fingerprint: r.Fingerprint, Key: r.Key,
				RetryMin: in.Config.RetryMin, RetryMax: in.Config.RetryMax})
		}
	}

	// Consumed services and their names.
	local := map[string]Export{}
	for _, e := range in.Exports {
		local[e.Name] = e
	}
	// Reverse names of mesh addresses are answered by the agent alone.
	d.Zone = dns.Zone{Services: map[string]dns.Service{}, Nodes: map[string][]netip.Addr{},
		Local: []netip.Prefix{wire.NodePrefix4, wire.NodePrefix6, wire.ServicePrefix, in.Config.ProxyRange}}
	for _, s := range nm.Services {
		listen := proxyAddr(in.Config.ProxyRange, s.VIP)
		if !listen.IsValid() || s.Port == 0 {
			continue
		}
		sc := proxy.ServiceConfig{Name: s.Name, Listen: netip.AddrPortFrom(listen, s.Port),
			Split: s.Split, Locality: s.Locality, Affinity: s.Affinity, Region: nm.Self.Region, Protocol: s.Protocol, HTTP: s.HTTP}
		traffic := func(t proxy.Target, pr wire.Provider) proxy.Target {
			t.Priority, t.Weight, t.Version, t.Health, t.HealthError = pr.Priority, pr.Weight, pr.Version, pr.Health, pr.HealthError
			t.Protocol, t.UDPIdle = pr.Protocol, pr.UDPIdle
			return t
		}
		for _, pr := range s.Providers {
			if pr.Node == nm.Self.ID {
				if e, ok := local[s.Name]; ok {
					sc.Targets = append(sc.Targets, traffic(proxy.Target{Node: pr.Node, Name: nm.Self.Name, Local: e.Target, Online: true, Region: nm.Self.Region}, pr))
				}
				continue
			}
			p := byID[pr.Node]
			if p == nil {
				continue
			}
			if ip := nodeAddr4(p); ip.IsValid() {
				sc.Targets = append(sc.Targets, traffic(proxy.Target{Node: pr.Node, Name: p.Name, Addr: netip.AddrPortFrom(ip, pr.Port), Online: p.Online, Region: p.Region}, pr))
			}
		}
		d.Services = append(d.Services, sc)
		d.Zone.Services[s.Name] = dns.Service{Addrs: []netip.Addr{listen}, Port: s.Port, VIP: s.VIP, Protocol: s.Protocol}
	}
	for _, n := range append([]wire.Node{nm.Self}, nm.Peers...) {
		for _, p := range n.Addresses {
			d.Zone.Nodes[n.Name] = append(d.Zone.Nodes[n.Name], p.Addr())
		}
	}
	return d
}

func nodeAddr4(n *wire.Node) netip.Addr {
	for _, p := range n.Addresses {
		if p.Addr().Is4() {
			return p.Addr()
		}
	}
	if len(n.Addresses) > 0 {
		return n.Addresses[0].Addr()
	}
	return netip.Addr{}
}

// proxyAddr maps a service VIP into the proxy range rng, keeping the VIP's
// offset inside wire.ServicePrefix.
func proxyAddr(rng netip.Prefix, vip netip.Addr) netip.Addr {
	if !vip.Is4() || !wire.ServicePrefix.Contains(vip) || !rng.Addr().Is4() {
		return netip.Addr{}
	}
	v, base := vip.As4(), rng.Addr().As4()
	off := uint32(v[2])<<8 | uint32(v[3])
	n := (uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])) + off
	out := netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
	if !rng.Contains(out) {
		return netip.Addr{}
	}
	return out
}

// policy is the provider's access table. The source address of a mesh
// connection is bound to a WireGuard key by cryptokey routing, so it names
// the peer for certain.
type policy struct {
	peers   map[netip.Addr]policyPeer // by mesh address
	allowed map[string][]string       // service name -> wire.Service.AllowedNodes
}

type policyPeer struct {
	id   wire.NodeID
	name string
}

// hasNode reports whether the node with id is a peer in this policy.
func (p *policy) hasNode(id wire.NodeID) bool {
	for _, pp := range p.peers {
		if pp.id == id {
			return true
		}
	}
	return false
}

// allow reports the peer's name and whether it may reach service. A nil
// policy (no map yet) denies everything.
func (p *policy) allow(src netip.Addr, service string) (string, bool) {
	peer, _, ok := p.decide(src, service)
	return peer.name, ok
}

// decide reports who src is (known false: no peer of the map has it) and
// whether it may reach service.
func (p *policy) decide(src netip.Addr, service string) (peer policyPeer, known, ok bool) {
	if p == nil {
		return policyPeer{}, false, false
	}
	peer, known = p.peers[src.Unmap()]
	if !known {
		return peer, false, false
	}
	// AllowedNodes holds IDs, which the coordinator gives; never names,
	// which whoever joins a node chooses ("3" is a valid node name).
	id := strconv.FormatUint(uint64(peer.id), 10)
	for _, who := range p.allowed[service] {
		if who == "*" || who == id {
			return peer, true, true
		}
	}
	return peer, true, false
}

// narrower reports whether p may deny a connection old allowed: a peer
// address of old is gone or names another node, or a service's allowed
// nodes changed.
func (p *policy) narrower(old *policy) bool {
	for a, op := range old.peers {
		if np, ok := p.peers[a]; !ok || np != op {
			return true
		}
	}
	for svc, who := range old.allowed {
		if !slices.Equal(who, p.allowed[svc]) {
			return true
		}
	}
	return false
}

// closeReason says why a connection from src to service, open under an
// earlier policy, may not go on under p with exports, or "" if it may.
func (p *policy) closeReason(src netip.Addr, service string, exports []proxy.Export) string {
	if !slices.ContainsFunc(exports, func(e proxy.Export) bool { return e.Name == service }) {
		return "the service is no longer exported here"
	}
	_, known, ok := p.decide(src, service)
	switch {
	case !known:
		return "the peer left the network map"
	case !ok:
		return "the network map no longer allows this node to reach the service"
	}
	return ""
}
