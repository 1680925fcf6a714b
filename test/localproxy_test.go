package test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/test/harness"
)

// TestLocalProxies: site B exports a web server; at site A an application
// without privileges or mesh DNS reaches it by name through A's SOCKS5 and
// HTTP proxies, and gets B's page intact. With --proxy-mesh-only a name
// outside the mesh is refused with each protocol's own answer.
func TestLocalProxies(t *testing.T) {
	// A body large enough to cross the tunnel in many packets.
	body := make([]byte, 256<<10)
	rand.Read(body)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer web.Close()

	m := harness.NewMesh(t)
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.Listener.Addr().String()}}})
	cfg := m.AgentConfig("site-a", harness.AgentOptions{})
	cfg.SOCKS5, cfg.HTTPProxy, cfg.ProxyMeshOnly = "127.0.0.1:0", "127.0.0.1:0", true
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitProviders(t, a, "web", 1)

	d, err := xproxy.SOCKS5("tcp", a.SOCKS5Addr(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	viaSOCKS := &http.Transport{DialContext: d.(xproxy.ContextDialer).DialContext}
	viaHTTP := &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: a.HTTPProxyAddr()})}
	defer viaSOCKS.CloseIdleConnections()
	defer viaHTTP.CloseIdleConnections()

	get := func(tr *http.Transport, u string) (int, []byte, error) {
		resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get(u)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}
	for _, tc := range []struct {
		name string
		tr   *http.Transport
	}{{"socks5", viaSOCKS}, {"http", viaHTTP}} {
		t.Run(tc.name, func(t *testing.T) {
			// Port 8000 is what the user types; the service's own port is
			// used whatever it is.
			code, got, err := get(tc.tr, "http://web.mesh.internal:8000/")
			if err != nil || code != 200 || !bytes.Equal(got, body) {
				t.Fatalf("GET web.mesh.internal through %s: %d, %d bytes, %v; want 200 and B's %d bytes intact", tc.name, code, len(got), err, len(body))
			}
			// A node name goes to the port asked for, at that node.
			_, port, _ := net.SplitHostPort(web.Listener.Addr().String())
			u := "http://site-b.node.mesh.internal:" + port + "/"
			code, got, err = get(tc.tr, u)
			if err != nil || code != 200 || !bytes.Equal(got, body) {
				t.Fatalf("GET %s through %s: %d, %d bytes, %v; want 200 and B's %d bytes intact", u, tc.name, code, len(got), err, len(body))
			}
			// So does its mesh IP, and the service's VIP.
			for _, host := range []string{meshIP(t, a, "site-b") + ":" + port, waitProviders(t, a, "web", 1).VIP.String() + ":8000"} {
				u := "http://" + host + "/"
				code, got, err = get(tc.tr, u)
				if err != nil || code != 200 || !bytes.Equal(got, body) {
					t.Fatalf("GET %s through %s: %d, %d bytes, %v; want 200 and B's %d bytes intact", u, tc.name, code, len(got), err, len(body))
				}
			}
		})
	}

	t.Run("mesh-only refuses other names", func(t *testing.T) {
		if code, _, err := get(viaHTTP, "http://example.com/"); err != nil || code != http.StatusForbidden {
			t.Errorf("HTTP proxy, example.com: %d %v, want 403", code, err)
		}
		_, err := d.Dial("tcp", "example.com:80")
		if err == nil || !isSOCKSReply(err, "connection not allowed by ruleset") {
			t.Errorf("SOCKS5, example.com: %v, want reply 0x02 (not allowed)", err)
		}
		if _, err := d.Dial("tcp", "nope.mesh.internal:80"); err == nil || !isSOCKSReply(err, "host unreachable") {
			t.Errorf("SOCKS5, unknown mesh name: %v, want reply 0x04 (host unreachable)", err)
		}
		if _, err := d.Dial("tcp", "100.96.3.3:80"); err == nil || !isSOCKSReply(err, "host unreachable") {
			t.Errorf("SOCKS5, a mesh address of no node: %v, want reply 0x04 (host unreachable)", err)
		}
		if code, _, err := get(viaHTTP, "http://nope.mesh.internal/"); err != nil || code != http.StatusBadGateway {
			t.Errorf("HTTP proxy, unknown mesh name: %d %v, want 502", code, err)
		}
	})
}

// isSOCKSReply reports whether err is x/net/proxy's message for a reply.
func isSOCKSReply(err error, msg string) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && bytes.Contains([]byte(fmt.Sprint(oe.Err)), []byte(msg))
}

// meshIP is the IPv4 mesh address of the peer called name in a's status.
func meshIP(t *testing.T, a *agent.Agent, name string) string {
	t.Helper()
	for _, p := range a.Status().Peers {
		if p.Name == name {
			for _, pfx := range p.Addresses {
				if pfx.Addr().Is4() {
					return pfx.Addr().String()
				}
			}
		}
	}
	t.Fatalf("no peer %s in %+v", name, a.Status().Peers)
	return ""
}
