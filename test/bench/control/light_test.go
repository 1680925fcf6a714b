package control

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

func lightSamples() []wire.MapResponse {
	k := key.NewPrivate().Public()
	node := func(id wire.NodeID, online bool) wire.Node {
		return wire.Node{ID: id, Name: "bench-7", Hostname: "h", Key: k, Online: online, LastSeen: time.Unix(1700000000, 5),
			Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.7/32"), netip.MustParsePrefix("fd7a:6d65:7368::7/128")},
			Endpoints: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:41641")}, Tags: []string{"tag:g1", "x\"y"},
			KeyExpiry: time.Unix(1800000000, 0), Region: "eu"}
	}
	svc := wire.Service{Name: "svc-50", VIP: netip.MustParseAddr("100.100.0.1"), Port: 2000, AllowedNodes: []string{"*"},
		Providers: []wire.Provider{{Node: 50, Port: 1000}}, Split: map[string]int{"a": 1}}
	self := node(3, true)
	return []wire.MapResponse{
		{},
		{Seq: 1, Full: &wire.NetworkMap{Self: self, Peers: []wire.Node{node(1, true), node(2, false)}, Services: []wire.Service{svc}, Domain: "mesh.internal"}},
		{Seq: 2, Full: &wire.NetworkMap{Self: self, Peers: []wire.Node{}, Services: []wire.Service{}}},
		{Seq: 3, Self: &self, PeersChanged: []wire.Node{node(9, true)}, PeersRemoved: []wire.NodeID{4, 5}, ServicesChanged: []wire.Service{svc},
			ServicesRemoved: []string{"svc-100"}, SentAt: time.Now()},
	}
}

// TestParseLight checks the generator's scanner against json.Unmarshal on
// the coordinator's encoding of every kind of message.
func TestParseLight(t *testing.T) {
	for i, m := range lightSamples() {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var want, got lightMsg
		if err := json.Unmarshal(b, &want); err != nil {
			t.Fatal(err)
		}
		if err := parseLight(append(b, '\n'), &got); err != nil {
			t.Fatalf("message %d: %v\n%s", i, err, b)
		}
		if !reflect.DeepEqual(lightNormal(got), lightNormal(want)) {
			t.Errorf("message %d: got %+v, want %+v\n%s", i, got, want, b)
		}
	}
	for _, bad := range []string{"", "{", `{"full":{"peers":[{"id":x}]}}`, `{"peers_removed":[1,}`, `{"a":1}x`, `{"services_changed":[{"port":70000}]}`} {
		var m lightMsg
		if err := parseLight([]byte(bad), &m); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// lightNormal makes empty lists nil: json.Unmarshal gives [] a non-nil
// empty slice, the scanner leaves it nil, and applyLight treats both alike.
func lightNormal(m lightMsg) lightMsg {
	if m.Full != nil {
		f := *m.Full
		if len(f.Peers) == 0 {
			f.Peers = nil
		}
		if len(f.Services) == 0 {
			f.Services = nil
		}
		m.Full = &f
	}
	if len(m.PeersChanged) == 0 {
		m.PeersChanged = nil
	}
	if len(m.PeersRemoved) == 0 {
		m.PeersRemoved = nil
	}
	if len(m.ServicesChanged) == 0 {
		m.ServicesChanged = nil
	}
	if len(m.ServicesRemoved) == 0 {
		m.ServicesRemoved = nil
	}
	return m
}

// FuzzParseLight: any input gives a message or an error, never a panic.
func FuzzParseLight(f *testing.F) {
	for _, m := range lightSamples() {
		b, _ := json.Marshal(m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var m lightMsg
		parseLight(b, &m)
	})
}
