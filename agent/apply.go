package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"sync/atomic"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/agent/wgcfg"
	"github.com/meshlink/meshlink/dns"
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
	consumerConfigurer interface {
		Reconfig([]proxy.ServiceConfig) error
	}
	exportSetter interface {
		SetExports([]proxy.Export)
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
	step("WireGuard peers", wgcfg.Diff(&prev.WireGuard, &next.WireGuard) == "",
		func() error { return ap.setWireGuard(next.WireGuard) },
		func() { prev.WireGuard = next.WireGuard.Clone() })
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
	step("DNS zone", reflect.DeepEqual(prev.Zone, next.Zone),
		ok(func() {
			if ap.dns != nil {
				ap.dns.SetZone(next.Zone)
			}
		}),
		func() { prev.Zone = next.Zone })
	prev.SkippedRelays = next.SkippedRelays

	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if !changed {
		return errNoChanges
	}
	return nil
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
