package test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// startUDPEcho is a UDP server on loopback that sends every datagram
// back to its sender.
func startUDPEcho(t *testing.T) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return pc
}

// udpExchange sends payload from c and waits for the same bytes back;
// it reports what came back (nil on timeout).
func udpExchange(c *net.UDPConn, payload []byte, wait time.Duration) []byte {
	if _, err := c.Write(payload); err != nil {
		return nil
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		return nil
	}
	return buf[:n]
}

func exportUDP(a *agent.Agent, name string) (localapi.Export, bool) {
	for _, e := range a.Services().Exported {
		if e.Name == name && e.UDP != nil {
			return e, true
		}
	}
	return localapi.Export{}, false
}

// TestUDPService: site-b exports a UDP echo server as "echo"; site-a's
// clients send datagrams of many sizes through the mesh and get each one
// back intact, on their own flow; SRV _echo._udp answers at site-a.
// Then site-b's map allows no one: the open flow is closed at the
// provider, and a new client's datagrams are dropped there and counted
// as denied, none reaching the echo server.
func TestUDPService(t *testing.T) {
	m := harness.NewMesh(t)
	echo := startUDPEcho(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "echo", Target: echo.LocalAddr().String(), Protocol: "udp"}}})
	a := m.AddAgent("site-a", harness.AgentOptions{})
	svc := waitProviders(t, a, "echo", 1)
	if svc.Protocol != "udp" || svc.UDP == nil {
		t.Fatalf("site-a's view of echo: protocol %q udp %v", svc.Protocol, svc.UDP)
	}

	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(svc.Local))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// The first datagram may race the provider's netstack learning its
	// peer: a client resends, as every UDP client does.
	c1, c2 := dial(), dial()
	tstest.WaitFor(t, 10*time.Second, "a first datagram through the mesh and back", func() bool {
		return bytes.Equal(udpExchange(c1, []byte("ping"), 200*time.Millisecond), []byte("ping"))
	})
	sizes := []int{1, 64, 512, 1200, 1400, 4000, 16000}
	lost := 0
	for round := range 20 {
		for _, c := range []*net.UDPConn{c1, c2} {
			n := sizes[round%len(sizes)]
			p := make([]byte, n)
			rand.Read(p)
			var got []byte
			for try := 0; try < 3 && got == nil; try++ {
				got = udpExchange(c, p, 2*time.Second)
				if got == nil {
					lost++
				}
			}
			if !bytes.Equal(got, p) {
				t.Fatalf("round %d: %d bytes sent, %d came back (intact: %v)", round, n, len(got), bytes.Equal(got, p))
			}
		}
	}
	t.Logf("40 datagrams of 1 to 16000 bytes echoed intact through the mesh (%d resent)", lost)
	if st, _ := serviceOf(a, "echo"); st.UDP.Flows != 2 || st.UDP.Received < 40 {
		t.Fatalf("consumer udp stats %+v, want 2 flows", *st.UDP)
	}
	if e, ok := exportUDP(b, "echo"); !ok || e.UDP.Flows < 1 || e.UDP.Sent < 40 {
		t.Fatalf("provider udp stats %+v", e.UDP)
	}

	// SRV _echo._udp names the local address; _echo._tcp does not exist.
	srv := func(name string) (*mdns.Msg, error) {
		q := new(mdns.Msg)
		q.SetQuestion(name, mdns.TypeSRV)
		r, _, err := (&mdns.Client{Timeout: 3 * time.Second}).Exchange(q, a.DNSAddr())
		return r, err
	}
	r, err := srv("_echo._udp.mesh.internal.")
	if err != nil || len(r.Answer) != 1 || r.Answer[0].(*mdns.SRV).Port != svc.Local.Port() {
		t.Fatalf("SRV _echo._udp: %v %v", r, err)
	}
	if r, err := srv("_echo._tcp.mesh.internal."); err != nil || r.Rcode != mdns.RcodeNameError {
		t.Fatalf("SRV _echo._tcp of a UDP-only service: %v %v", r, err)
	}

	// No one may reach echo now: the provider closes the open flow.
	b.SetMapFilter(allowOnly("echo"))
	tstest.WaitFor(t, 5*time.Second, "the provider to close the open flows", func() bool {
		e, _ := exportUDP(b, "echo")
		return e.UDP.Flows == 0
	})
	before, _ := exportUDP(b, "echo")
	c3 := dial()
	for i := range 5 {
		if got := udpExchange(c3, []byte(fmt.Sprint("denied ", i)), 200*time.Millisecond); got != nil {
			t.Fatalf("a denied flow got %q back", got)
		}
	}
	if got := udpExchange(c1, []byte("old flow"), 200*time.Millisecond); got != nil {
		t.Fatalf("the closed flow got %q back", got)
	}
	tstest.WaitFor(t, 5*time.Second, "the provider to count the denied datagrams", func() bool {
		e, _ := exportUDP(b, "echo")
		return e.Denied >= before.Denied+6 && e.UDP.Dropped >= before.UDP.Dropped+6
	})
	after, _ := exportUDP(b, "echo")
	if after.UDP.Sent != before.UDP.Sent {
		t.Fatalf("%d datagrams reached the target after the map allowed no one", after.UDP.Sent-before.UDP.Sent)
	}
	t.Logf("provider after the denial: denied %d, udp %+v", after.Denied, *after.UDP)
}
