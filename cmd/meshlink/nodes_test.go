//go:build !agentonly

package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/wire"
)

func TestWriteNodes(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	nodes := []coordinator.NodeInfo{
		{Node: wire.Node{ID: 1, Name: "db-1", Online: true, Tags: []string{"tag:db", "tag:prod"},
			Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.1/32"), netip.MustParsePrefix("fd7a:115c:a1e0::1/128")}},
			Owner: "alice"},
		{Node: wire.Node{ID: 2, Name: "laptop", LastSeen: now.Add(-90 * time.Minute),
			Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.2/32")}}},
	}
	soon, past := now.Add(30*24*time.Hour), now.Add(-time.Minute)
	expiring := []coordinator.NodeInfo{
		{Node: wire.Node{ID: 3, Name: "ci", Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.3/32")}}, KeyExpiry: &soon},
		{Node: wire.Node{ID: 4, Name: "old", Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.4/32")}}, KeyExpiry: &past},
	}
	tests := []struct {
		name  string
		nodes []coordinator.NodeInfo
		want  []string // lines, with runs of spaces squeezed to one
	}{
		{"two nodes", nodes, []string{
			"NAME OWNER TAGS ADDRESSES ONLINE LAST SEEN KEY EXPIRY",
			"db-1 alice tag:db,tag:prod 100.96.0.1,fd7a:115c:a1e0::1 yes now never",
			"laptop - - 100.96.0.2 no 1h ago never",
		}},
		{"key expiry", expiring, []string{
			"NAME OWNER TAGS ADDRESSES ONLINE LAST SEEN KEY EXPIRY",
			"ci - - 100.96.0.3 no never 2026-05-31T12:00:00Z",
			"old - - 100.96.0.4 no never 2026-05-01T11:59:00Z (expired)",
		}},
		{"none", nil, []string{"no nodes yet; join one with `meshlink token create` and `meshlink agent --join TOKEN`"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := writeNodes(&buf, tt.nodes, false, now); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, l := range strings.Split(strings.TrimRight(buf.String(), "\n"), "\n") {
				got = append(got, strings.Join(strings.Fields(l), " "))
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Fatalf("got\n%s\nwant\n%s", buf.String(), strings.Join(tt.want, "\n"))
			}
		})
	}

	t.Run("json", func(t *testing.T) {
		var buf bytes.Buffer
		if err := writeNodes(&buf, nodes, true, now); err != nil {
			t.Fatal(err)
		}
		var got []map[string]any
		if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, buf.String())
		}
		if len(got) != 2 || got[0]["name"] != "db-1" || got[0]["owner"] != "alice" || got[0]["online"] != true {
			t.Fatalf("got %v", got)
		}
		if v, ok := got[1]["key_expiry"]; !ok || v != nil {
			t.Fatalf("key_expiry %v (present %v), want null for never", v, ok)
		}
		if addrs, _ := got[0]["addresses"].([]any); len(addrs) != 2 || addrs[0] != "100.96.0.1/32" {
			t.Fatalf("addresses %v", got[0]["addresses"])
		}
		buf.Reset()
		if err := writeNodes(&buf, expiring, true, now); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(buf.String(), `"key_expiry": "2026-05-31T12:00:00Z"`) {
			t.Fatalf("key_expiry not RFC 3339 in\n%s", buf.String())
		}
		buf.Reset()
		if err := writeNodes(&buf, nil, true, now); err != nil || strings.TrimSpace(buf.String()) != "[]" {
			t.Fatalf("no nodes as JSON: %q %v, want []", buf.String(), err)
		}
	})
}
