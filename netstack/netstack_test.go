package netstack_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/netstack"
	"github.com/meshlink/meshlink/netstack/nettest"
)

// stream is a deterministic pseudo-random byte stream of n bytes.
type stream struct {
	rng *rand.ChaCha8
	n   int64
}

func newStream(seed byte, n int64) *stream {
	var s [32]byte
	s[0] = seed
	return &stream{rng: rand.NewChaCha8(s), n: n}
}

func (s *stream) Read(p []byte) (int, error) {
	if s.n == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > s.n {
		p = p[:s.n]
	}
	s.rng.Read(p)
	s.n -= int64(len(p))
	return len(p), nil
}

func sumOf(r io.Reader) ([32]byte, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, n, err
}

type closeWriter interface{ CloseWrite() error }

// exchange writes out to c, then half-closes, while reading everything c
// sends back; it returns the digest of what was read.
func exchange(c net.Conn, out io.Reader) ([32]byte, int64, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, out)
		if err == nil {
			err = c.(closeWriter).CloseWrite()
		}
		werr <- err
	}()
	sum, n, rerr := sumOf(c)
	if err := <-werr; err != nil {
		return sum, n, err
	}
	return sum, n, rerr
}

func TestTCPStream(t *testing.T) {
	const size = 4 << 20
	p := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{})
	want := func(seed byte) [32]byte {
		s, _, _ := sumOf(newStream(seed, size))
		return s
	}
	wantAB, wantBA := want(1), want(2)

	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		sum, n, err := exchange(c, newStream(2, size))
		got <- result{sum, n, err}
	})

	for _, tc := range []struct {
		name string
		dst  netip.Addr
	}{
		{"IPv4", nettest.AddrB4},
		{"IPv6", nettest.AddrB6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := p.A.DialTCP(ctx, netip.AddrPortFrom(tc.dst, 8080))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// Before the exchange: once both sides have closed, gVisor no
			// longer knows the remote address and RemoteAddr returns nil.
			want := netip.AddrPortFrom(tc.dst, 8080)
			if got := c.RemoteAddr(); got == nil || got.String() != net.TCPAddrFromAddrPort(want).String() {
				t.Errorf("RemoteAddr = %v, want %v", got, want)
			}
			c.SetDeadline(time.Now().Add(60 * time.Second))
			sum, n, err := exchange(c, newStream(1, size))
			if err != nil {
				t.Fatalf("dialer side: %v", err)
			}
			if n != size || sum != wantBA {
				t.Errorf("A received %d bytes, digest match %v; want %d bytes intact", n, sum == wantBA, size)
			}
			r := <-got
			if r.err != nil {
				t.Fatalf("acceptor side: %v", r.err)
			}
			if r.n != size || r.sum != wantAB {
				t.Errorf("B received %d bytes, digest match %v; want %d bytes intact", r.n, r.sum == wantAB, size)
			}
		})
	}
}

func TestTCPRequestAddrs(t *testing.T) {
	p := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{})
	reqs := make(chan *netstack.TCPRequest, 1)
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		reqs <- r
		r.Reject()
	})
	_, err := p.A.DialTCP(context.Background(), netip.AddrPortFrom(nettest.AddrB6, 443))
	if !errors.Is(err, netstack.ErrConnRefused) {
		t.Fatalf("dial: %v, want refused", err)
	}
	r := <-reqs
	if r.Src.Addr() != nettest.AddrA6 || r.Dst != netip.AddrPortFrom(nettest.AddrB6, 443) {
		t.Errorf("request %v -> %v, want from %v to [%v]:443", r.Src, r.Dst, nettest.AddrA6, nettest.AddrB6)
	}
}

func TestTCPRefused(t *testing.T) {
	p := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{HandlerTimeout: 200 * time.Millisecond})
	dst := netip.AddrPortFrom(nettest.AddrB4, 5432)
	for _, tc := range []struct {
		name    string
		handler func(*netstack.TCPRequest)
		maxWait time.Duration
	}{
		{"no handler", nil, 5 * time.Second},
		{"reject", func(r *netstack.TCPRequest) { r.Reject() }, 5 * time.Second},
		{"reject port", func(r *netstack.TCPRequest) {
			if r.Dst.Port() == 5432 {
				r.Reject()
				return
			}
			if c, err := r.Accept(); err == nil {
				c.Close()
			}
		}, 5 * time.Second},
		{"handler forgets", func(*netstack.TCPRequest) {}, 5 * time.Second},
		{"handler hangs", func(r *netstack.TCPRequest) { <-r.Context().Done() }, 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p.B.SetTCPHandler(tc.handler)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			start := time.Now()
			c, err := p.A.DialTCP(ctx, dst)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want connection refused")
			}
			if !errors.Is(err, netstack.ErrConnRefused) || !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("dial: %v, want ErrConnRefused", err)
			}
			if d := time.Since(start); d > tc.maxWait {
				t.Errorf("refusal took %v, want < %v", d, tc.maxWait)
			}
		})
	}
	// The port-specific handler still accepts other ports.
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		if r.Dst.Port() == 5432 {
			r.Reject()
			return
		}
		c, err := r.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	})
	c, err := p.A.DialTCP(context.Background(), netip.AddrPortFrom(nettest.AddrB4, 80))
	if err != nil {
		t.Fatalf("dial accepted port: %v", err)
	}
	c.Close()
}

func TestUDPEcho(t *testing.T) {
	p := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{})
	p.B.SetUDPHandler(func(r *netstack.UDPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 2048)
		for {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
	})
	for _, dst := range []netip.Addr{nettest.AddrB4, nettest.AddrB6} {
		t.Run(dst.String(), func(t *testing.T) {
			c, err := p.A.DialUDP(context.Background(), netip.AddrPortFrom(dst, 53))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 2048)
			for i := range 5 {
				msg := bytes.Repeat([]byte{byte('a' + i)}, 100+i*200)
				// The first datagrams travel before the WireGuard
				// handshake completes and may be lost: retry with a
				// bounded number of attempts.
				var n int
				deadline := time.Now().Add(20 * time.Second)
				for {
					if _, err := c.Write(msg); err != nil {
						t.Fatal(err)
					}
					c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
					n, err = c.Read(buf)
					if err == nil || time.Now().After(deadline) {
						break
					}
				}
				if err != nil {
					t.Fatalf("echo %d: %v", i, err)
				}
				if !bytes.Equal(buf[:n], msg) {
					t.Fatalf("echo %d: got %d bytes, want %d identical", i, n, len(msg))
				}
			}
		})
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	s, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrA4}})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-s.Events(); ev != 1 /* tun.EventUp */ {
		t.Fatalf("first event %v, want EventUp", ev)
	}
	errc := make(chan error, 1)
	go func() {
		bufs := [][]byte{make([]byte, 1500)}
		_, err := s.Read(bufs, make([]int, 1), 0)
		errc <- err
	}()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Read after Close: %v, want os.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
	if _, err := s.Write([][]byte{make([]byte, 40)}, 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Write after Close: %v, want os.ErrClosed", err)
	}
	if _, ok := <-s.Events(); ok {
		t.Fatal("Events not closed")
	}
	if _, err := s.DialTCP(context.Background(), netip.MustParseAddrPort("100.96.0.9:80")); err == nil {
		t.Fatal("dial after Close succeeded")
	}
}

func TestCloseFailsPendingDial(t *testing.T) {
	// No WireGuard: the SYN sits in the queue unanswered.
	s, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrA4}})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := s.DialTCP(context.Background(), netip.MustParseAddrPort("100.96.0.9:80"))
		errc <- err
	}()
	// Wait until the SYN is out, so the dial is really pending.
	bufs := [][]byte{make([]byte, 1500)}
	if _, err := s.Read(bufs, make([]int, 1), 0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("pending dial succeeded after Close")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("pending dial still blocked after Close")
	}
}

func TestDialHonoursContext(t *testing.T) {
	s, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrA4, nettest.AddrA6}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = s.DialTCP(ctx, netip.MustParseAddrPort("[fd7a:6d65:7368::9]:80"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial: %v, want context.DeadlineExceeded", err)
	}
}

func TestDialNoAddressOfFamily(t *testing.T) {
	s, err := netstack.New(netstack.Config{Addrs: []netip.Addr{nettest.AddrA4}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.DialTCP(context.Background(), netip.MustParseAddrPort("[fd7a:6d65:7368::9]:80")); err == nil {
		t.Fatal("IPv6 dial without an IPv6 address succeeded")
	}
}

func TestSetAddrs(t *testing.T) {
	p := nettest.NewPairConfig(t, netstack.Config{}, netstack.Config{})
	p.B.SetTCPHandler(func(r *netstack.TCPRequest) {
		if c, err := r.Accept(); err == nil {
			c.Close()
		}
	})
	dial := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := p.A.DialTCP(ctx, netip.AddrPortFrom(nettest.AddrB4, 1))
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := dial(); err != nil {
		t.Fatalf("dial before SetAddrs: %v", err)
	}
	// B drops its IPv4 address: SYNs to it are no longer accepted.
	if err := p.B.SetAddrs([]netip.Addr{nettest.AddrB6}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err == nil {
		t.Fatal("dial to a removed address succeeded")
	}
	if err := p.B.SetAddrs([]netip.Addr{nettest.AddrB4, nettest.AddrB6}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err != nil {
		t.Fatalf("dial after restoring the address: %v", err)
	}
}
