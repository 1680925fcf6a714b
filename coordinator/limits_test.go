package coordinator

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// slowBody opens a TLS connection that sends a request's headers and the
// first bytes of its body, then stalls.
func slowBody(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n{\"version\":", wire.PathRegister)
	return c
}

// TestSlowBodyCut performs a slow-body attack: 100 connections send
// headers and a few body bytes, then stall. Each is answered 408 and
// closed once the body deadline passes, while map streams, over HTTP/1
// and HTTP/2, stay open through the attack (idle for longer than the
// deadline) and still deliver updates.
func TestSlowBodyCut(t *testing.T) {
	const timeout = 500 * time.Millisecond
	s := startServer(t, t.TempDir(), func(c *Config) { c.BodyTimeout = timeout; c.KeepAlive = time.Hour })
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	var streams []*stream
	for _, h2 := range []bool{false, true} {
		c := pinnedClient(t, s.Fingerprint(), h2)
		_, cr := register(t, c, jt, fmt.Sprintf("idle-h2-%v", h2))
		st := openMap(t, c, jt.URL, cr)
		st.next(t, 5*time.Second, "first map", func(m wire.MapResponse) bool { return m.Full != nil })
		streams = append(streams, st)
	}

	const n = 100
	start := time.Now()
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = slowBody(t, s.Addr().String())
	}
	var wg sync.WaitGroup
	cut := make([]time.Duration, n)
	status := make([]string, n)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetReadDeadline(start.Add(timeout + 5*time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			status[i] = strings.TrimSpace(line)
			// The server closes the connection: the rest reads to EOF.
			if _, err := io.Copy(io.Discard, c); err != nil {
				status[i] += " (not closed: " + err.Error() + ")"
				return
			}
			cut[i] = time.Since(start)
		}()
	}
	wg.Wait()
	var worst time.Duration
	for i := range conns {
		if !strings.HasPrefix(status[i], "HTTP/1.1 408") || cut[i] == 0 {
			t.Fatalf("slow connection %d: got %q, want a 408 and the connection closed", i, status[i])
		}
		worst = max(worst, cut[i])
	}
	t.Logf("%d of %d slow-body connections cut; the last after %v (deadline %v)", n, n, worst.Round(time.Millisecond), timeout)

	// HTTP/2: the stream of a stalled body is answered 408.
	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequest(http.MethodPost, jt.URL+wire.PathRegister, pr)
	go pw.Write([]byte(`{"version":`))
	t0 := time.Now()
	resp, err := pinnedClient(t, s.Fingerprint(), true).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusRequestTimeout || errCode(t, body) != wire.ErrCodeBadRequest {
		t.Fatalf("HTTP/2 slow body: %s %d %s, want HTTP/2 408", resp.Proto, resp.StatusCode, body)
	}
	t.Logf("HTTP/2 slow body answered 408 after %v", time.Since(t0).Round(time.Millisecond))

	// The map streams, idle throughout, still work.
	register(t, pinnedClient(t, s.Fingerprint(), true), jt, "after-attack")
	for _, st := range streams {
		st.next(t, 5*time.Second, "the new node", func(m wire.MapResponse) bool {
			for _, p := range m.PeersChanged {
				if p.Name == "after-attack" {
					return true
				}
			}
			return false
		})
	}
}

// clientFrom is an HTTPS client whose connections come from local address
// ip (any of 127.0.0.0/8 on Linux), one connection per request.
func clientFrom(t *testing.T, fp, ip string) *http.Client {
	c := pinnedClient(t, fp, false)
	tr := c.Transport.(*http.Transport)
	tr.DisableKeepAlives = true
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	tr.DialContext = d.DialContext
	c.Timeout = 10 * time.Second
	return c
}

func healthz(c *http.Client, base string) error {
	resp, err := c.Get(base + "/healthz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthz: %s", resp.Status)
	}
	return nil
}

// TestConnCapPerSource holds the per-source cap of connections from one
// address: the next one from there is refused, another address still gets
// through, and a slot given back is usable again.
func TestConnCapPerSource(t *testing.T) {
	const perSource = 5
	s := startServer(t, t.TempDir(), func(c *Config) { c.MaxConnsPerSource = perSource })
	base := s.URL()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	var held []net.Conn
	for range perSource {
		c, err := d.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	attacker := clientFrom(t, s.Fingerprint(), "127.0.0.2")
	// The held connections are accepted in order, so the next one from
	// the same source is over the cap once they all are.
	tstest.WaitForNil(t, 5*time.Second, "a connection over the cap refused", func() error {
		if err := healthz(attacker, base); err == nil {
			return fmt.Errorf("connection %d from one source was served", perSource+1)
		}
		return nil
	})
	for range 20 {
		if err := healthz(attacker, base); err == nil {
			t.Fatalf("connection over the per-source cap of %d was served", perSource)
		}
	}
	if err := healthz(clientFrom(t, s.Fingerprint(), "127.0.0.1"), base); err != nil {
		t.Fatalf("another source refused while one is at its cap: %v", err)
	}
	held[0].Close()
	tstest.WaitForNil(t, 5*time.Second, "the source served again after closing a connection", func() error { return healthz(attacker, base) })
}
