package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/device"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/dns"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// errNoChanges is what apply reports when everything desired is applied
// already.
var errNoChanges = errors.New("agent: no changes")

// The parts an applier configures, as it uses them; *netstack.Stack,
// *device.Device, *bind.Bind, *proxy.Consumer, *proxy.Provider and
// *dns.Server in the agent, fakes in tests.
type (
	addrSetter interface {
		SetAddrs([]netip.Addr) error
	}
	// uapiDevice is a WireGuard device's configuration interface. IpcSet
	// may have applied part of its input when it fails.
	uapiDevice interface {
		IpcSet(string) error
		IpcGet() (string, error)
	}
	bindConfigurer interface {
		SetPeers([]bind.PeerConfig)
		SetRelays([]bind.RelayConfig)
		SetSTUN([]netip.AddrPort)
	}
	// The proxies also close the connections of peers that left the map
	// (closeLeft).
	// Bound says where each listening service is served (its address, or
	// its proxy.FallbackPort), for the DNS zone's SRV ports.
	consumerConfigurer interface {
		Reconfig([]proxy.ServiceConfig) error
		Bound() map[string]netip.AddrPort
		CloseTo(keep func(wire.NodeID) bool) int
	}
	// The provider closes the inbound connections policy no longer
	// allows (enforce): why returns the reason, "" to keep one.
	exportSetter interface {
		SetExports([]proxy.Export)
		CloseIf(why func(src netip.Addr, service string) string) int
	}
	zoneSetter interface {
		SetZone(dns.Zone)
	}
)

// applier writes a Desired to the live parts of the agent, only what
// differs from what it applied before. What fails is not recorded as
// applied, so the next apply tries it again. Not safe for concurrent use:
// the agent calls it under its mutex.
type applier struct {
	log      *slog.Logger
	stack    addrSetter
	dev      uapiDevice
	kicked   bool // handshake has run for the first peers after a start
	bind     bindConfigurer
	consumer consumerConfigurer
	provider exportSetter
	dns      zoneSetter // nil when DNS is off

	// policy is what the provider consults for each connection, read
	// without the agent's lock.
	policy atomic.Pointer[policy]

	applied Desired // what the parts are known to be configured with
}

// apply configures every part whose desired state differs from what is
// applied. It reports errNoChanges when nothing differed, and the failed
// parts (which it will try again) joined in one error.
func (ap *applier) apply(next Desired) error {
	prev := &ap.applied
	oldPolicy, oldExports := prev.Policy, prev.Exports
	var errs []error
	changed := false
	// step applies one part when it differs, and records it only if that
	// worked.
	step := func(name string, same bool, set func() error, record func()) {
		if same {
			return
		}
		changed = true
		if err := set(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			return
		}
		record()
	}
	ok := func(f func()) func() error { return func() error { f(); return nil } }

	step("mesh addresses", slices.Equal(prev.Addrs, next.Addrs),
		func() error { return ap.stack.SetAddrs(next.Addrs) },
		func() { prev.Addrs = next.Addrs })
	// The bind learns of peers before WireGuard sends to them.
	step("bind peers", reflect.DeepEqual(prev.BindPeers, next.BindPeers),
		ok(func() { ap.bind.SetPeers(next.BindPeers) }),
		func() { prev.BindPeers = next.BindPeers })
	step("relays", slices.Equal(prev.Relays, next.Relays),
		ok(func() { ap.bind.SetRelays(next.Relays) }),
		func() { prev.Relays = next.Relays })
	step("STUN servers", slices.Equal(prev.STUN, next.STUN),
		ok(func() { ap.bind.SetSTUN(next.STUN) }),
		func() { prev.STUN = next.STUN })
	added := newPeers(prev.WireGuard, next.WireGuard)
	step("WireGuard peers", wgcfg.Diff(&prev.WireGuard, &next.WireGuard) == "",
		func() error { return ap.setWireGuard(next.WireGuard) },
		func() { prev.WireGuard = next.WireGuard.Clone() })
	// Only the peers of the first WireGuard configuration after a start:
	// they may hold a session with this node from before it restarted.
	// A peer added later is new to both sides, and two handshakes started
	// at once from both ends can cost the first packet.
	if !ap.kicked {
		ap.kicked = true
		ap.handshake(added)
	}
	// Policy before exports: a new export is never served under an old
	// policy.
	step("policy", reflect.DeepEqual(prev.Policy, next.Policy),
		ok(func() { ap.policy.Store(next.Policy) }),
		func() { prev.Policy = next.Policy })
	step("exports", slices.Equal(prev.Exports, next.Exports),
		ok(func() { ap.provider.SetExports(next.Exports) }),
		func() { prev.Exports = next.Exports })
	step("consumed services", reflect.DeepEqual(prev.Services, next.Services),
		func() error { return ap.consumer.Reconfig(next.Services) },
		func() { prev.Services = next.Services })
	// After the services: SRV answers give the port each is served on.
	zone := zoneWithBound(next.Zone, ap.consumer.Bound())
	step("DNS zone", reflect.DeepEqual(prev.Zone, zone),
		ok(func() {
			if ap.dns != nil {
				ap.dns.SetZone(zone)
			}
		}),
		func() { prev.Zone = zone })
	prev.SkippedRelays = next.SkippedRelays
	// Last, when the new policy and targets are in place, so nothing new
	// reaches a peer that left, or is no longer allowed, while its
	// connections are closed.
	ap.closeLeft(oldPolicy, next.Policy)
	ap.enforce(oldPolicy, next.Policy, oldExports, next.Exports)

	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if !changed {
		return errNoChanges
	}
	return nil
}

// zoneWithBound is z with each service's port replaced by the port its
// local listener is bound to, where that differs (a privileged port served
// on its proxy.FallbackPort): an SRV answer then names the port that works.
func zoneWithBound(z dns.Zone, bound map[string]netip.AddrPort) dns.Zone {
	changed := false
	for name, svc := range z.Services {
		if b, ok := bound[name]; ok && b.Port() != svc.Port {
			changed = true
		}
	}
	if !changed {
		return z
	}
	out := z
	out.Services = make(map[string]dns.Service, len(z.Services))
	for name, svc := range z.Services {
		if b, ok := bound[name]; ok {
			svc.Port = b.Port()
		}
		out.Services[name] = svc
	}
	return out
}

// closeLeft closes the consumer's connections to the peers in old that are
// not in next: a node removed from the mesh is cut off at once, not when
// its TCP connections time out (WireGuard forgetting a peer closes nothing
// in the netstack). The connections from them are enforce's. A nil next
// (no map) closes nothing.
func (ap *applier) closeLeft(old, next *policy) {
	if old == nil || next == nil {
		return
	}
	var left []string
	for _, p := range old.peers {
		if !next.hasNode(p.id) && !slices.Contains(left, p.name) {
			left = append(left, p.name)
		}
	}
	goneAddr := false
	for a := range old.peers {
		if _, ok := next.peers[a]; !ok {
			goneAddr = true
		}
	}
	if len(left) == 0 && !goneAddr {
		return
	}
	if out := ap.consumer.CloseTo(next.hasNode); out > 0 && ap.log != nil {
		ap.log.Info("closed the connections to peers that left the network map", "peers", left, "outbound", out)
	}
}

// enforce closes the inbound connections that the policy or the exports
// in force before allowed and next no longer do: a connection is checked
// when it is accepted, and again whenever a map may change the answer. The
// provider logs each closure with its service, node and reason. A nil
// next (no map) closes nothing; nor does a map that only adds (peers,
// services, exports), so the common change costs no walk of the table.
func (ap *applier) enforce(old, next *policy, oldExports, nextExports []proxy.Export) {
	if old == nil || next == nil || (!next.narrower(old) && !exportGone(oldExports, nextExports)) {
		return
	}
	in := ap.provider.CloseIf(func(src netip.Addr, service string) string {
		return next.closeReason(src, service, nextExports)
	})
	if in > 0 && ap.log != nil {
		ap.log.Info("closed inbound connections the network map no longer allows", "connections", in)
	}
}

// exportGone reports whether a service of old is not in next.
func exportGone(old, next []proxy.Export) bool {
	for _, o := range old {
		if !slices.ContainsFunc(next, func(e proxy.Export) bool { return e.Name == o.Name }) {
			return true
		}
	}
	return false
}

// maxHandshakeKicks bounds the handshakes one apply starts (a fresh node
// with many peers starts the rest on demand, as WireGuard does).
const maxHandshakeKicks = 256

// handshaker is the part of a WireGuard device that starts a handshake.
type handshaker interface {
	LookupPeer(device.NoisePublicKey) *device.Peer
}

// newPeers returns the keys of next's peers that prev lacks.
func newPeers(prev, next wgcfg.Config) []key.Public {
	had := make(map[key.Public]bool, len(prev.Peers))
	for _, p := range prev.Peers {
		had[p.PublicKey] = true
	}
	var out []key.Public
	for _, p := range next.Peers {
		if !had[p.PublicKey] {
			out = append(out, p.PublicKey)
		}
	}
	return out
}

// handshake starts a WireGuard handshake with each newly added peer at
// once. A peer that still holds a session with this node from before it
// restarted would otherwise keep sending over that dead session, which
// this fresh device cannot decrypt, until its own rekey timers run out
// (15 s and more); a handshake from here replaces it now.
func (ap *applier) handshake(keys []key.Public) {
	h, ok := ap.dev.(handshaker)
	if !ok {
		return
	}
	for i, k := range keys {
		if i == maxHandshakeKicks {
			break
		}
		if p := h.LookupPeer(device.NoisePublicKey(k.Raw())); p != nil {
			p.SendHandshakeInitiation(false)
		}
	}
}

// setWireGuard sends the device the difference between what it has and
// want. A failed set may have been applied in part, so what the device
// then reports becomes the state the next attempt diffs against.
func (ap *applier) setWireGuard(want wgcfg.Config) error {
	err := ap.dev.IpcSet(wgcfg.Diff(&ap.applied.WireGuard, &want))
	if err == nil {
		return nil
	}
	if get, gerr := ap.dev.IpcGet(); gerr == nil {
		if d, perr := wgcfg.Parse(get); perr == nil {
			ap.applied.WireGuard = wgcfg.Config{Peers: d.Config().Peers}
		}
	}
	return err
}
