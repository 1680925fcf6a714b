package wgcfg

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
)

// keys returns n public keys in ascending order, so expected UAPI text
// (written in key order) is easy to spell.
func keys(t *testing.T, n int) []key.Public {
	t.Helper()
	var out []key.Public
	for range n {
		out = append(out, key.NewPrivate().Public())
	}
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j].Compare(out[i]) < 0 {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func TestToUAPI(t *testing.T) {
	k := keys(t, 2)
	priv := key.NewPrivate()
	c := Config{PrivateKey: priv, ListenPort: 51820, Peers: []Peer{
		// Out of order: ToUAPI writes peers in key order.
		{PublicKey: k[1], AllowedIPs: pfx("100.96.0.3/32"), Endpoint: "ep-1"},
		{PublicKey: k[0], AllowedIPs: pfx("100.96.0.2/32", "fd7a:6d65:7368::2/128"), Endpoint: "ep-0"},
	}}
	want := "private_key=" + priv.UAPI() + "\n" +
		"listen_port=51820\n" +
		"replace_peers=true\n" +
		"public_key=" + k[0].UAPI() + "\nendpoint=ep-0\nreplace_allowed_ips=true\nallowed_ip=100.96.0.2/32\nallowed_ip=fd7a:6d65:7368::2/128\n" +
		"public_key=" + k[1].UAPI() + "\nendpoint=ep-1\nreplace_allowed_ips=true\nallowed_ip=100.96.0.3/32\n"
	if got := c.ToUAPI(); got != want {
		t.Fatalf("ToUAPI:\n%s\nwant:\n%s", got, want)
	}
	// A device with no peers yet: key and port only, port 0 picks one.
	if got, want := (&Config{PrivateKey: priv}).ToUAPI(), "private_key="+priv.UAPI()+"\nlisten_port=0\nreplace_peers=true\n"; got != want {
		t.Fatalf("ToUAPI of an empty config = %q, want %q", got, want)
	}
}

func TestDiff(t *testing.T) {
	k := keys(t, 3)
	a := Peer{PublicKey: k[0], AllowedIPs: pfx("100.96.0.1/32"), Endpoint: "ep-a"}
	b := Peer{PublicKey: k[1], AllowedIPs: pfx("100.96.0.2/32"), Endpoint: "ep-b"}
	c := Peer{PublicKey: k[2], AllowedIPs: pfx("100.96.0.3/32"), Endpoint: "ep-c"}
	section := func(p Peer, endpoint bool) string {
		s := "public_key=" + p.PublicKey.UAPI() + "\n"
		if endpoint {
			s += "endpoint=" + p.Endpoint + "\n"
		}
		s += "replace_allowed_ips=true\n"
		for _, ip := range p.AllowedIPs {
			s += "allowed_ip=" + ip.String() + "\n"
		}
		return s
	}
	bMoved := b
	bMoved.AllowedIPs = pfx("100.96.0.2/32", "fd7a:6d65:7368::2/128")
	bNewEndpoint := b
	bNewEndpoint.Endpoint = "ep-b2"
	aReordered := Peer{PublicKey: k[0], AllowedIPs: pfx("100.96.0.1/32", "fd7a:6d65:7368::1/128"), Endpoint: "ep-a"}
	aReordered2 := Peer{PublicKey: k[0], AllowedIPs: pfx("fd7a:6d65:7368::1/128", "100.96.0.1/32"), Endpoint: "ep-a"}
	priv := key.NewPrivate()

	cases := []struct {
		name       string
		prev, next Config
		want       string
	}{
		{"unchanged is empty", Config{Peers: []Peer{a, b}}, Config{Peers: []Peer{b, a}}, ""},
		{"both empty", Config{}, Config{}, ""},
		{"allowed IPs in another order are unchanged", Config{Peers: []Peer{aReordered}}, Config{Peers: []Peer{aReordered2}}, ""},
		{"add", Config{Peers: []Peer{a}}, Config{Peers: []Peer{a, c}}, section(c, true)},
		{"remove", Config{Peers: []Peer{a, b}}, Config{Peers: []Peer{a}}, "public_key=" + b.PublicKey.UAPI() + "\nremove=true\n"},
		{"change allowed IPs keeps the endpoint", Config{Peers: []Peer{a, b}}, Config{Peers: []Peer{a, bMoved}}, section(bMoved, false)},
		{"change endpoint", Config{Peers: []Peer{b}}, Config{Peers: []Peer{bNewEndpoint}}, section(bNewEndpoint, true)},
		{"remove before add", Config{Peers: []Peer{a}}, Config{Peers: []Peer{b}},
			"public_key=" + a.PublicKey.UAPI() + "\nremove=true\n" + section(b, true)},
		{"zero key and port are unchanged", Config{PrivateKey: priv, ListenPort: 7}, Config{}, ""},
		{"new key and port", Config{ListenPort: 7}, Config{PrivateKey: priv, ListenPort: 8}, "private_key=" + priv.UAPI() + "\nlisten_port=8\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Diff(&tc.prev, &tc.next); got != tc.want {
				t.Fatalf("Diff:\n%s\nwant:\n%s", got, tc.want)
			}
		})
	}
}

// A real wireguard-go "get" (private key and peer keys replaced).
func TestParse(t *testing.T) {
	k := keys(t, 2)
	get := strings.Join([]string{
		"private_key=" + key.NewPrivate().UAPI(),
		"listen_port=41641",
		"public_key=" + k[0].UAPI(),
		"endpoint=mesh:abc",
		"allowed_ip=100.96.0.2/32",
		"allowed_ip=fd7a:6d65:7368::2/128",
		"last_handshake_time_sec=1700000000",
		"last_handshake_time_nsec=5",
		"rx_bytes=1024",
		"tx_bytes=2048",
		"persistent_keepalive_interval=0",
		"public_key=" + k[1].UAPI(),
		"last_handshake_time_sec=0",
		"last_handshake_time_nsec=0",
		"rx_bytes=0",
		"tx_bytes=0",
		"protocol_version=1",
		"errno=0",
		"", "",
	}, "\n")
	d, err := Parse(get)
	if err != nil {
		t.Fatal(err)
	}
	if d.ListenPort != 41641 || len(d.Peers) != 2 {
		t.Fatalf("parsed %+v", d)
	}
	p0, p1 := d.Peers[0], d.Peers[1]
	if p0.PublicKey != k[0] || p0.Endpoint != "mesh:abc" || !p0.Equal(Peer{PublicKey: k[0], Endpoint: "mesh:abc", AllowedIPs: pfx("100.96.0.2/32", "fd7a:6d65:7368::2/128")}) ||
		!p0.LastHandshake.Equal(time.Unix(1700000000, 5)) || p0.RxBytes != 1024 || p0.TxBytes != 2048 {
		t.Fatalf("first peer %+v", p0)
	}
	if p1.PublicKey != k[1] || !p1.LastHandshake.IsZero() || p1.RxBytes != 0 || len(p1.AllowedIPs) != 0 {
		t.Fatalf("second peer %+v", p1)
	}
	// What was parsed diffs to nothing against what configured it.
	cfg := d.Config()
	want := Config{Peers: []Peer{p0.Peer, {PublicKey: k[1]}}}
	if s := Diff(&cfg, &want); s != "" {
		t.Fatalf("parsed config differs from its source: %q", s)
	}

	for _, bad := range []string{"public_key=zz", "listen_port=70000", "rx_bytes=1", "public_key=" + k[0].UAPI() + "\nallowed_ip=nope"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("listen_port=1\npublic_key=" + strings.Repeat("ab", 32) + "\nallowed_ip=10.0.0.1/32\nrx_bytes=3\n")
	f.Add("errno=0\n")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse(s)
		if err != nil {
			return
		}
		// Whatever parses turns back into a config that diffs to nothing
		// against itself.
		c := d.Config()
		if got := Diff(&c, &c); got != "" {
			t.Fatalf("Diff of a config with itself = %q", got)
		}
	})
}
