package coordinator

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// A message encoded once and framed per stream decodes as the agent
// expects: its own seq and time, the shared changes.
func TestFrameDecodes(t *testing.T) {
	m := wire.MapResponse{
		PeersChanged:    []wire.Node{{ID: 2, Name: "b", Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.2/32")}, Online: true}},
		PeersRemoved:    []wire.NodeID{3},
		ServicesRemoved: []string{"db"},
	}
	body, err := encodeBody(&m)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 1, 10, 0, 0, 123, time.UTC)
	for _, c := range []struct {
		name string
		body []byte
		want wire.MapResponse
	}{
		{"delta", body, wire.MapResponse{Seq: 7, PeersChanged: m.PeersChanged, PeersRemoved: m.PeersRemoved, ServicesRemoved: m.ServicesRemoved, SentAt: now}},
		{"keep-alive", keepAliveBody, wire.MapResponse{Seq: 7, SentAt: now}},
	} {
		line := frame(c.body, 7, now)
		if line[len(line)-1] != '\n' {
			t.Errorf("%s: %q does not end a line", c.name, line)
		}
		var got wire.MapResponse
		if err := json.Unmarshal(line, &got); err != nil {
			t.Fatalf("%s: %q: %v", c.name, line, err)
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}
