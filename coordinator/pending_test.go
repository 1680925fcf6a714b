package coordinator

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/meshlink/meshlink/wire"
)

// TestPendingFloodFromOneNetwork performs the join-by-login flood: 1,000
// requests for approval from 50 addresses of one /24. That network gets
// only a handful of places, and an agent from another network still gets
// its login URL.
func TestPendingFloodFromOneNetwork(t *testing.T) {
	s := startServer(t, t.TempDir())
	ask := func(c *http.Client, name string) (int, []byte) {
		return call(t, c, s.URL(), wire.PathRegister, nil, wire.RegisterRequest{Version: wire.ProtocolVersion, Interactive: true, Name: name, NodeKey: newKey(t)})
	}
	waiting := 0
	for a := range 50 {
		c := clientFrom(t, s.Fingerprint(), fmt.Sprintf("127.0.0.%d", a+2))
		c.Transport.(*http.Transport).DisableKeepAlives = false
		for i := range 20 {
			switch st, body := ask(c, fmt.Sprintf("flood-%d-%d", a, i)); st {
			case http.StatusAccepted:
				waiting++
			case http.StatusTooManyRequests:
			default:
				t.Fatalf("flood request: %d %s", st, body)
			}
		}
	}
	if waiting > 5 {
		t.Fatalf("one /24 holds %d waiting requests, want at most 5", waiting)
	}
	st, body := ask(clientFrom(t, s.Fingerprint(), "127.0.1.1"), "honest")
	var p wire.RegisterPending
	if st != http.StatusAccepted || json.Unmarshal(body, &p) != nil || p.AuthURL == "" {
		t.Fatalf("a request from another network during the flood: %d %s; want 202 with a login URL", st, body)
	}
	t.Logf("1000 requests from 50 addresses of 127.0.0.0/24: %d waiting; 127.0.1.1 got %s", waiting, p.AuthURL)
}
