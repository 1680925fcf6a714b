package coordinator

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// TestEndpointsNotOwn: a node publishes, among its endpoints, addresses
// that are nobody's in particular (loopback, link-local, multicast,
// unspecified) and far too many of them, to make every agent ping them.
// The map the other nodes get lists only its reachable ones, at most 16;
// and changing them in a loop is refused after a few, with a clear error.
func TestEndpointsNotOwn(t *testing.T) {
	for _, allow := range []bool{false, true} {
		t.Run(fmt.Sprintf("allow_loopback=%v", allow), func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(c *Config) { c.AllowLoopbackEndpoints = allow })
			c := pinnedClient(t, s.Fingerprint(), false)
			jt := mustToken(t, s, TokenOptions{Reusable: true})
			_, a := register(t, c, jt, "a")
			_, b := register(t, c, jt, "b")
			sa := openMap(t, c, s.URL(), a)
			sa.next(t, 5*time.Second, "a's full map", func(m wire.MapResponse) bool { return m.Full != nil })

			bad := []string{"127.0.0.1:41641", "127.8.9.10:1", "[::1]:41641", "169.254.7.7:41641", "[fe80::1]:41641",
				"224.0.0.251:5353", "239.1.2.3:41641", "[ff02::1]:41641", "[ff01::1]:41641", "0.0.0.0:41641", "[::]:41641"}
			var eps []netip.AddrPort
			for _, s := range bad {
				eps = append(eps, netip.MustParseAddrPort(s))
			}
			var good []netip.AddrPort
			for i := range 40 {
				good = append(good, netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), 41641))
			}
			eps = append(eps, good...)
			if st, body := call(t, c, s.URL(), wire.PathEndpoints, &b, wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: 41641, LocalEndpoints: eps}); st != http.StatusOK {
				t.Fatalf("endpoints: %d %s", st, body)
			}
			m := sa.next(t, 5*time.Second, "b's endpoints in a's map", func(m wire.MapResponse) bool {
				n, ok := nodeNamed(m.PeersChanged, "b")
				return ok && len(n.Endpoints) > 1
			})
			nb, _ := nodeNamed(m.PeersChanged, "b")
			t.Logf("b published %d endpoints; a's map lists %d: %v", len(eps), len(nb.Endpoints), nb.Endpoints)
			if len(nb.Endpoints) > 16 {
				t.Errorf("a's map lists %d endpoints of b, want at most 16", len(nb.Endpoints))
			}
			for _, ep := range nb.Endpoints {
				a := ep.Addr()
				if a.IsLoopback() && allow {
					continue
				}
				if !slices.Contains(good, ep) {
					t.Errorf("a's map lists b at %v, which b cannot be reached at", ep)
				}
			}
			// The observed address (loopback here) comes first when allowed.
			if allow && (len(nb.Endpoints) == 0 || !nb.Endpoints[0].Addr().IsLoopback()) {
				t.Errorf("with loopback allowed, b's first endpoint is %v, want the observed 127.0.0.1", nb.Endpoints)
			}

			// Republishing the same list is free; changing it in a loop is not.
			for range 3 {
				if st, body := call(t, c, s.URL(), wire.PathEndpoints, &b, wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: 41641, LocalEndpoints: eps}); st != http.StatusOK {
					t.Fatalf("same endpoints again: %d %s", st, body)
				}
			}
			var refused int
			var msg string
			for i := range 20 {
				req := wire.EndpointsRequest{Version: wire.ProtocolVersion, ListenPort: 41641,
					LocalEndpoints: []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)}), 41641)}}
				st, body := call(t, c, s.URL(), wire.PathEndpoints, &b, req)
				if st == http.StatusTooManyRequests {
					refused++
					msg = string(body)
				} else if st != http.StatusOK {
					t.Fatalf("change %d: %d %s", i, st, body)
				}
			}
			t.Logf("20 changes in a row: %d refused: %s", refused, msg)
			if refused < 20-endpointBurst || !strings.Contains(msg, "too often") {
				t.Errorf("%d of 20 rapid endpoint changes refused (%q), want at least %d with a clear error", refused, msg, 20-endpointBurst)
			}
		})
	}
}
