package agent

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/dns"
	"github.com/meshlink/meshlink/wire"
)

// parts fakes every part an applier configures and records each call.
type parts struct {
	calls   []string // part names, in call order
	sets    []string // UAPI text of each IpcSet
	get     string   // what IpcGet reports
	setErr  error    // returned by the next IpcSet, then cleared
	listErr error    // returned by the next consumer Reconfig, then cleared
	zone    dns.Zone
	bound   map[string]netip.AddrPort // what Bound reports
	exports []proxy.Export
	// open and openFrom are the providers and sources of open proxied
	// connections; closedTo and closedFrom what the last close call cut.
	open       []wire.NodeID
	openFrom   []netip.Addr
	closedTo   []wire.NodeID
	closedFrom []netip.Addr
	// openService is the service of every connection in openFrom;
	// reasons are why each of closedFrom was closed.
	openService string
	reasons     []string
}

func (f *parts) SetAddrs([]netip.Addr) error { f.calls = append(f.calls, "addrs"); return nil }
func (f *parts) IpcSet(s string) error {
	f.calls = append(f.calls, "wireguard")
	f.sets = append(f.sets, s)
	err := f.setErr
	f.setErr = nil
	return err
}
func (f *parts) IpcGet() (string, error)      { return f.get, nil }
func (f *parts) SetPeers([]bind.PeerConfig)   { f.calls = append(f.calls, "bind peers") }
func (f *parts) SetRelays([]bind.RelayConfig) { f.calls = append(f.calls, "relays") }
func (f *parts) SetSTUN([]netip.AddrPort)     { f.calls = append(f.calls, "stun") }
func (f *parts) SetExports(es []proxy.Export) { f.calls = append(f.calls, "exports"); f.exports = es }
func (f *parts) SetZone(z dns.Zone)           { f.calls = append(f.calls, "dns"); f.zone = z }
func (f *parts) Reconfig([]proxy.ServiceConfig) error {
	f.calls = append(f.calls, "services")
	err := f.listErr
	f.listErr = nil
	return err
}

func (f *parts) Bound() map[string]netip.AddrPort { return f.bound }

func (f *parts) CloseTo(keep func(wire.NodeID) bool) int {
	f.calls = append(f.calls, "close to")
	f.closedTo = nil
	for _, id := range f.open {
		if !keep(id) {
			f.closedTo = append(f.closedTo, id)
		}
	}
	return len(f.closedTo)
}
func (f *parts) CloseIf(why func(netip.Addr, string) string) int {
	f.calls = append(f.calls, "close from")
	f.closedFrom = nil
	f.reasons = nil
	for _, a := range f.openFrom {
		if r := why(a, f.openService); r != "" {
			f.closedFrom = append(f.closedFrom, a)
			f.reasons = append(f.reasons, r)
		}
	}
	return len(f.closedFrom)
}

func (f *parts) take() []string { c := f.calls; f.calls = nil; return c }

func newTestApplier() (*applier, *parts) {
	f := &parts{}
	return &applier{stack: f, dev: f, bind: f, consumer: f, provider: f, dns: f}, f
}

func TestApply(t *testing.T) {
	self, b, c := node(1, "self"), node(2, "b"), node(3, "c")
	web := wire.Service{Name: "web", VIP: netip.MustParseAddr("100.100.0.7"), Port: 80, Providers: []wire.Provider{{Node: 2, Port: 80}}, AllowedNodes: []string{"*"}}
	nm := &wire.NetworkMap{Self: self, Peers: []wire.Node{b}, Services: []wire.Service{web}}
	stun := []netip.AddrPort{netip.MustParseAddrPort("203.0.113.1:443")}
	webExport := Export{Name: "web", Target: "127.0.0.1:8080", Port: 80}
	desired := func(nm *wire.NetworkMap, exports ...Export) Desired {
		return desiredConfig(desiredInput{Map: nm, Exports: exports, Config: testCfg, Joined: true, STUN: stun})
	}

	t.Run("first apply configures every part; the same again changes nothing", func(t *testing.T) {
		ap, f := newTestApplier()
		// No exports: the provider's initial state already.
		if err := ap.apply(desired(nm)); err != nil {
			t.Fatal(err)
		}
		want := []string{"addrs", "bind peers", "stun", "wireguard", "services", "dns"}
		if got := f.take(); !slices.Equal(got, want) {
			t.Fatalf("calls %v, want %v", got, want)
		}
		if _, ok := ap.policy.Load().allow(b.Addresses[0].Addr(), "web"); !ok {
			t.Fatal("policy not applied: b may not reach web")
		}
		if err := ap.apply(desired(nm)); !errors.Is(err, errNoChanges) {
			t.Fatalf("second apply: %v, want errNoChanges", err)
		}
		if got := f.take(); len(got) != 0 {
			t.Fatalf("unchanged state written again: %v", got)
		}
	})

	t.Run("SRV ports follow a privileged port's fallback", func(t *testing.T) {
		ap, f := newTestApplier()
		ap.apply(desired(nm))
		if got := f.zone.Services["web"].Port; got != 80 {
			t.Fatalf("zone port %d, want the service's 80", got)
		}
		f.take()
		// The consumer could not bind port 80 and serves 10080 instead.
		f.bound = map[string]netip.AddrPort{"web": netip.MustParseAddrPort("127.100.0.7:10080")}
		if err := ap.apply(desired(nm)); err != nil {
			t.Fatal(err)
		}
		if got := f.zone.Services["web"].Port; got != 10080 {
			t.Fatalf("zone port %d after the fallback, want 10080", got)
		}
		if got := f.take(); !slices.Equal(got, []string{"dns"}) {
			t.Fatalf("the fallback wrote %v, want the zone only", got)
		}
	})

	t.Run("only what changed is written", func(t *testing.T) {
		ap, f := newTestApplier()
		ap.apply(desired(nm))
		f.take()
		db := Export{Name: "db", Target: "127.0.0.1:5432", Port: 5432}
		if err := ap.apply(desired(nm, db)); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, []string{"exports"}) {
			t.Fatalf("adding an export wrote %v", got)
		}
		if !slices.Equal(f.exports, []Export{db}) {
			t.Fatalf("provider exports %+v", f.exports)
		}
		if err := ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{web}}, db)); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, []string{"bind peers", "wireguard", "dns"}) {
			t.Fatalf("adding a peer wrote %v", got)
		}
		if s := f.sets[len(f.sets)-1]; !strings.HasPrefix(s, "public_key="+c.Key.UAPI()+"\n") || strings.Contains(s, b.Key.UAPI()) {
			t.Fatalf("adding c sent WireGuard %q", s)
		}
	})

	t.Run("a failed WireGuard update is retried from what the device has", func(t *testing.T) {
		ap, f := newTestApplier()
		ap.apply(desired(&wire.NetworkMap{Self: self}))
		f.take()
		// The set fails after adding b (the device reports it) but before c.
		f.setErr = errors.New("boom")
		f.get = "listen_port=1\npublic_key=" + b.Key.UAPI() + "\nendpoint=" + bind.EndpointString(b.Key) + "\nallowed_ip=" + b.Addresses[0].String() + "\nallowed_ip=" + b.Addresses[1].String() + "\n"
		two := desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}})
		if err := ap.apply(two); err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("apply: %v, want the device's error", err)
		}
		f.take()
		// The next apply sends only what the device still lacks.
		if err := ap.apply(two); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, []string{"wireguard"}) {
			t.Fatalf("retry wrote %v, want only WireGuard", got)
		}
		if s := f.sets[len(f.sets)-1]; strings.Contains(s, b.Key.UAPI()) || !strings.Contains(s, c.Key.UAPI()) {
			t.Fatalf("retry sent %q, want c only", s)
		}
		if err := ap.apply(two); !errors.Is(err, errNoChanges) {
			t.Fatalf("after the retry: %v, want errNoChanges", err)
		}
	})

	t.Run("a peer a failed update left behind is removed", func(t *testing.T) {
		ap, f := newTestApplier()
		ap.apply(desired(&wire.NetworkMap{Self: self}))
		f.setErr = errors.New("boom")
		f.get = "public_key=" + b.Key.UAPI() + "\nallowed_ip=" + b.Addresses[0].String() + "\n"
		ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b}}))
		f.take()
		// b left the map before the retry; the device still has it.
		if err := ap.apply(desired(&wire.NetworkMap{Self: self})); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, []string{"bind peers", "wireguard", "dns", "close to", "close from"}) {
			t.Fatalf("calls %v", got)
		}
		if s, want := f.sets[len(f.sets)-1], "public_key="+b.Key.UAPI()+"\nremove=true\n"; s != want {
			t.Fatalf("sent %q, want %q", s, want)
		}
	})

	t.Run("a peer that leaves the map has its connections closed, the others keep theirs", func(t *testing.T) {
		ap, f := newTestApplier()
		both := &wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{web}}
		if err := ap.apply(desired(both, webExport)); err != nil {
			t.Fatal(err)
		}
		f.open = []wire.NodeID{b.ID, c.ID}
		f.openFrom = []netip.Addr{b.Addresses[0].Addr(), c.Addresses[0].Addr()}
		f.openService = "web"
		f.take()
		if err := ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{c}, Services: []wire.Service{web}}, webExport)); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(f.reasons, []string{"the peer left the network map"}) {
			t.Fatalf("reasons %q", f.reasons)
		}
		if !slices.Equal(f.closedTo, []wire.NodeID{b.ID}) || !slices.Equal(f.closedFrom, []netip.Addr{b.Addresses[0].Addr()}) {
			t.Fatalf("closed to %v from %v, want only b's", f.closedTo, f.closedFrom)
		}
		// A map that only adds peers closes nothing.
		f.take()
		if err := ap.apply(desired(both, webExport)); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); slices.Contains(got, "close to") || slices.Contains(got, "close from") {
			t.Fatalf("a peer joining closed connections: calls %v", got)
		}
	})

	t.Run("a node a service no longer allows has its connections to it closed, the others keep theirs", func(t *testing.T) {
		ap, f := newTestApplier()
		both := &wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{web}}
		if err := ap.apply(desired(both, webExport)); err != nil {
			t.Fatal(err)
		}
		f.openFrom = []netip.Addr{b.Addresses[0].Addr(), c.Addresses[0].Addr()}
		f.openService = "web"
		f.take()
		onlyC := web
		onlyC.AllowedNodes = []string{"3"} // c, by node ID
		if err := ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{onlyC}}, webExport)); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(f.closedFrom, []netip.Addr{b.Addresses[0].Addr()}) || len(f.closedTo) != 0 {
			t.Fatalf("closed from %v, to %v; want only b's inbound", f.closedFrom, f.closedTo)
		}
		if !slices.Equal(f.reasons, []string{"the network map no longer allows this node to reach the service"}) {
			t.Fatalf("reasons %q", f.reasons)
		}
		// Adding an export changes no one's access: nothing is checked.
		f.take()
		db := Export{Name: "db", Target: "127.0.0.1:5432", Port: 5432}
		ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{onlyC}}, webExport, db))
		if got := f.take(); slices.Contains(got, "close from") {
			t.Fatalf("adding an export checked open connections: calls %v", got)
		}
		// Withdrawing web closes what is left of it.
		f.openFrom = []netip.Addr{c.Addresses[0].Addr()}
		ap.apply(desired(&wire.NetworkMap{Self: self, Peers: []wire.Node{b, c}, Services: []wire.Service{onlyC}}, db))
		if !slices.Equal(f.closedFrom, f.openFrom) || !slices.Equal(f.reasons, []string{"the service is no longer exported here"}) {
			t.Fatalf("after unexposing web: closed %v for %q", f.closedFrom, f.reasons)
		}
	})

	t.Run("a listener that failed is retried; the rest is not rewritten", func(t *testing.T) {
		ap, f := newTestApplier()
		f.listErr = errors.New("address in use")
		if err := ap.apply(desired(nm)); err == nil {
			t.Fatal("listener failure not reported")
		}
		f.take()
		if err := ap.apply(desired(nm)); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, []string{"services"}) {
			t.Fatalf("retry wrote %v, want only the services", got)
		}
	})

	t.Run("DNS off", func(t *testing.T) {
		ap, f := newTestApplier()
		ap.dns = nil
		if err := ap.apply(desired(nm)); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(f.take(), "dns") {
			t.Fatal("zone set with DNS off")
		}
	})
}
