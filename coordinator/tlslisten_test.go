package coordinator

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tlscert"
	"github.com/meshlink/meshlink/internal/tstest"
)

// TestHandshakeListener attacks the listener the way a stranger can before
// TLS: a connection that never starts its handshake, and one that sends
// bytes that are not TLS. Neither holds up an honest client's connection,
// the stalled one is closed at the handshake timeout, the garbage one at
// once, and Close ends a handshake still in flight without waiting for it.
func TestHandshakeListener(t *testing.T) {
	cert, err := tlscert.LoadOrCreate(t.TempDir(), "coordinator", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const timeout = 2 * time.Second
	var failed atomic.Int32
	l := newHandshakeListener(inner, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}, timeout,
		func(format string, args ...any) {
			if strings.Contains(format, "TLS handshake error") {
				failed.Add(1)
			}
		})
	defer l.Close()
	addr := l.Addr().String()

	stalled, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	garbage, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer garbage.Close()
	if _, err := garbage.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}

	// An honest client is accepted, with its handshake done and h2 agreed,
	// while the other two are still open.
	clientErr := make(chan error, 1)
	go func() {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err == nil {
			_, err = c.Write([]byte("hello"))
			defer c.Close()
		}
		clientErr <- err
	}()
	type accepted struct {
		c   net.Conn
		err error
	}
	acc := make(chan accepted, 1)
	go func() {
		c, err := l.Accept()
		acc <- accepted{c, err}
	}()
	var a accepted
	select {
	case a = <-acc:
	case <-time.After(timeout / 2):
		t.Fatalf("an honest client waited longer than %v behind a stalled and a plain-HTTP connection", timeout/2)
	}
	if a.err != nil {
		t.Fatal(a.err)
	}
	tc, ok := a.c.(*tls.Conn)
	if !ok {
		t.Fatalf("Accept returned %T, want *tls.Conn (net/http looks for it)", a.c)
	}
	if st := tc.ConnectionState(); !st.HandshakeComplete || st.NegotiatedProtocol != "h2" {
		t.Fatalf("accepted connection: handshake complete %v, protocol %q; want true, h2", st.HandshakeComplete, st.NegotiatedProtocol)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(tc, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v; want hello", buf, err)
	}
	if err := <-clientErr; err != nil {
		t.Fatal(err)
	}
	tc.Close()

	// The plain HTTP request is told what it did, the stalled connection
	// closed at the timeout.
	garbage.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, err := io.ReadAll(garbage)
	if err != nil || !strings.Contains(string(answer), "400 Bad Request") || !strings.Contains(string(answer), "Client sent an HTTP request to an HTTPS server") {
		t.Fatalf("a plain HTTP request got %q, %v; want net/http's 400 and the connection closed", answer, err)
	}
	stalled.SetReadDeadline(time.Now().Add(timeout + 5*time.Second))
	if _, err := io.Copy(io.Discard, stalled); err != nil {
		t.Fatalf("stalled connection not closed by the server: %v", err)
	}
	if n := failed.Load(); n != 2 {
		t.Fatalf("%d failed handshakes logged, want 2", n)
	}

	// Close with a handshake in flight returns without waiting it out.
	l2 := newHandshakeListener(mustListen(t), &tls.Config{Certificates: []tls.Certificate{cert}}, time.Hour, nil)
	p2, err := net.Dial("tcp", l2.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	tstest.WaitForNil(t, 5*time.Second, "the connection in its handshake", func() error {
		l2.mu.Lock()
		defer l2.mu.Unlock()
		if len(l2.pending) != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	t0 := time.Now()
	l2.Close()
	if d := time.Since(t0); d > 2*time.Second {
		t.Fatalf("Close waited %v for a handshake that would time out in an hour", d)
	}
	if _, err := l2.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
	p2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, p2); err != nil {
		t.Fatalf("the connection in its handshake was not closed by Close: %v", err)
	}
}

func mustListen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// emfileOnce fails its first Accept the way a process out of file
// descriptors does.
type emfileOnce struct {
	net.Listener
	failed atomic.Bool
}

func (l *emfileOnce) Accept() (net.Conn, error) {
	if !l.failed.Swap(true) {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// TestHandshakeListenerOutOfFiles: running out of file descriptors is
// passing; the listener pauses, logs, and accepts again.
func TestHandshakeListenerOutOfFiles(t *testing.T) {
	cert, err := tlscert.LoadOrCreate(t.TempDir(), "coordinator", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	var logged atomic.Int32
	l := newHandshakeListener(&emfileOnce{Listener: mustListen(t)}, &tls.Config{Certificates: []tls.Certificate{cert}}, 5*time.Second,
		func(format string, args ...any) {
			if strings.Contains(format, "Accept error") {
				logged.Add(1)
			}
		})
	defer l.Close()
	go func() {
		if c, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{InsecureSkipVerify: true}); err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	got := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Accept after EMFILE: %v, want the next connection", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted after one EMFILE")
	}
	if logged.Load() != 1 {
		t.Fatalf("%d accept errors logged, want 1", logged.Load())
	}
}
