package localproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"github.com/meshlink/meshlink/internal/tstest"
)

// fakeMesh serves service "web" and node "b" from one local HTTP server.
type fakeMesh struct{ target string }

func (m fakeMesh) Domain() string { return "mesh.internal" }

func (m fakeMesh) DialService(ctx context.Context, name string) (net.Conn, error) {
	if name != "web" || m.target == "" {
		return nil, fmt.Errorf("%w: service %q", ErrUnknownName, name)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", m.target)
}

// DialAddr: 100.96.0.2 is node b.
func (m fakeMesh) DialAddr(ctx context.Context, addr netip.AddrPort) (net.Conn, bool, error) {
	if addr.Addr() != netip.MustParseAddr("100.96.0.2") {
		return nil, false, nil
	}
	c, err := m.DialNode(ctx, "b", addr.Port())
	return c, true, err
}

func (m fakeMesh) DialNode(ctx context.Context, name string, port uint16) (net.Conn, error) {
	_, p, _ := net.SplitHostPort(m.target)
	if name != "b" || p != fmt.Sprint(port) {
		return nil, fmt.Errorf("%w: node %q", ErrUnknownName, name)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", m.target)
}

const page = "hello from site b\n"

// startWeb is the service behind the fake mesh; it echoes the request's
// Connection-listed and hop-by-hop headers so tests can see they were dropped.
func startWeb(t *testing.T) *httptest.Server {
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Saw-Proxy-Connection", r.Header.Get("Proxy-Connection"))
		w.Header().Set("X-Saw-Foo", r.Header.Get("X-Foo"))
		io.WriteString(w, page)
	}))
	t.Cleanup(web.Close)
	return web
}

func startServer(t *testing.T, meshOnly bool, target string) *Server {
	s, err := New(Config{SOCKS5: "127.0.0.1:0", HTTP: "127.0.0.1:0", Mesh: fakeMesh{target: target}, MeshOnly: meshOnly,
		Logger: tstest.Logger(t), HandshakeTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestReadRequest(t *testing.T) {
	req := func(atyp byte, addr ...byte) []byte {
		return append([]byte{5, 1, 0, atyp}, addr...)
	}
	name := func(s string) []byte { return append([]byte{byte(len(s))}, s...) }
	cases := []struct {
		name    string
		in      []byte
		want    socksRequest
		wantRep byte // reply to an error; 0 for none
		wantErr bool
	}{
		{name: "ipv4", in: req(1, 10, 1, 2, 3, 0x1f, 0x40), want: socksRequest{1, "10.1.2.3", 8000}},
		{name: "ipv6", in: req(4, append(net.ParseIP("fd00::1").To16(), 0, 80)...), want: socksRequest{1, "fd00::1", 80}},
		{name: "domain", in: req(3, append(name("web.mesh.internal"), 0x1f, 0x40)...), want: socksRequest{1, "web.mesh.internal", 8000}},
		{name: "bind command parses", in: []byte{5, 2, 0, 1, 1, 2, 3, 4, 0, 80}, want: socksRequest{2, "1.2.3.4", 80}},
		{name: "socks4", in: []byte{4, 1, 0, 80, 1, 2, 3, 4, 0}, wantRep: repFailure, wantErr: true},
		{name: "bad atyp", in: req(9, 1, 2, 3, 4, 0, 80), wantRep: repAtypUnsupp, wantErr: true},
		{name: "empty name", in: req(3, 0, 0, 80), wantRep: repHostUnreach, wantErr: true},
		{name: "name with NUL", in: req(3, append(name("a\x00b"), 0, 80)...), wantRep: repHostUnreach, wantErr: true},
		{name: "name with space", in: req(3, append(name("a b"), 0, 80)...), wantRep: repHostUnreach, wantErr: true},
		{name: "port 0", in: req(1, 1, 2, 3, 4, 0, 0), wantRep: repHostUnreach, wantErr: true},
		{name: "truncated name", in: req(3, 10, 'a', 'b'), wantErr: true},
		{name: "truncated port", in: req(1, 1, 2, 3, 4, 0), wantErr: true},
		{name: "empty", in: nil, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readRequest(bytes.NewReader(tc.in))
			if tc.wantErr {
				if err == nil {
					t.Fatalf("readRequest = %+v, want an error", got)
				}
				var se *socksError
				rep := byte(0)
				if errors.As(err, &se) {
					rep = se.rep
				}
				if rep != tc.wantRep {
					t.Fatalf("error %v: reply %#x, want %#x", err, rep, tc.wantRep)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("readRequest = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestReadGreeting(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"no-auth", []byte{5, 1, 0}, true},
		{"several", []byte{5, 3, 2, 1, 0}, true},
		{"no methods", []byte{5, 0}, false},
		{"socks4", []byte{4, 1, 0}, false},
		{"http", []byte("GET / HTTP/1.1\r\n"), false},
		{"truncated", []byte{5, 3, 0}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readGreeting(bytes.NewReader(tc.in))
			if (err == nil) != tc.ok {
				t.Fatalf("readGreeting(%q) = %v, want ok=%v", tc.in, err, tc.ok)
			}
		})
	}
}

// FuzzSOCKSRequest: any bytes from a client give a request or an error,
// never a panic, and an accepted request names a host and a port.
func FuzzSOCKSRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 17, 'w', 'e', 'b', '.', 'm', 'e', 's', 'h', '.', 'i', 'n', 't', 'e', 'r', 'n', 'a', 'l', 0x1f, 0x40})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 0})
	f.Add([]byte{5, 255})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		if _, err := readGreeting(r); err != nil {
			return
		}
		req, err := readRequest(r)
		if err != nil {
			return
		}
		if req.Host == "" || req.Port == 0 || !validHost([]byte(req.Host)) {
			t.Fatalf("accepted %+v", req)
		}
	})
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		host string
		kind nameKind
		name string
	}{
		{"web.mesh.internal", nameService, "web"},
		{"WEB.Mesh.Internal.", nameService, "web"},
		{"b.node.mesh.internal", nameNode, "b"},
		{"node.mesh.internal", nameService, "node"},
		{"a.b.mesh.internal", nameUnknownMesh, ""},
		{"x.a.node.mesh.internal", nameUnknownMesh, ""},
		{".node.mesh.internal", nameUnknownMesh, ""},
		{"mesh.internal", nameUnknownMesh, ""},
		{"example.com", nameOther, ""},
		{"webmesh.internal", nameOther, ""},
		{"10.0.0.1", nameOther, ""},
	} {
		kind, name := classify(tc.host, "mesh.internal")
		if kind != tc.kind || name != tc.name {
			t.Errorf("classify(%q) = %v %q, want %v %q", tc.host, kind, name, tc.kind, tc.name)
		}
	}
}

func getThrough(t *testing.T, tr *http.Transport, u string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	req.Header.Set("Proxy-Connection", "keep-alive")
	req.Header.Set("Connection", "X-Foo")
	req.Header.Set("X-Foo", "hop")
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestSOCKS5(t *testing.T) {
	web := startWeb(t)
	s := startServer(t, true, web.Listener.Addr().String())
	d, err := xproxy.SOCKS5("tcp", s.SOCKS5Addr().String(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: d.(xproxy.ContextDialer).DialContext}
	defer tr.CloseIdleConnections()
	// The port the client asks for a service name does not matter.
	for _, u := range []string{"http://web.mesh.internal:1/", "http://web.mesh.internal/", "http://b.node.mesh.internal:" + web.URL[strings.LastIndex(web.URL, ":")+1:] + "/"} {
		resp, body := getThrough(t, tr, u)
		if resp.StatusCode != 200 || body != page {
			t.Fatalf("GET %s through SOCKS5: %d %q, want 200 %q", u, resp.StatusCode, body, page)
		}
	}

	// Refusals, as the raw reply a client sees.
	domainReq := func(cmd byte, host string) []byte {
		return append(append([]byte{5, cmd, 0, 3, byte(len(host))}, host...), 0, 80)
	}
	for _, tc := range []struct {
		name string
		req  []byte
		rep  byte
	}{
		{"outside the mesh with mesh-only", domainReq(1, "example.com"), repNotAllowed},
		{"IP outside the mesh with mesh-only", []byte{5, 1, 0, 1, 127, 0, 0, 1, 0, 80}, repNotAllowed},
		{"unknown service", domainReq(1, "nope.mesh.internal"), repHostUnreach},
		{"unknown node", domainReq(1, "nope.node.mesh.internal"), repHostUnreach},
		{"bind", domainReq(2, "web.mesh.internal"), repCmdUnsupp},
		{"udp associate", domainReq(3, "web.mesh.internal"), repCmdUnsupp},
		{"bad address type", []byte{5, 1, 0, 7, 0, 80}, repAtypUnsupp},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rawSOCKS(t, s, []byte{5, 1, 0}, tc.req); got != tc.rep {
				t.Fatalf("reply %#x, want %#x", got, tc.rep)
			}
		})
	}
	t.Run("no acceptable method", func(t *testing.T) {
		c, err := net.Dial("tcp", s.SOCKS5Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{5, 1, 2}) // username/password only
		var b [2]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b != [2]byte{5, 0xff} {
			t.Fatalf("method reply %v %v, want 5 0xff", b, err)
		}
	})
}

// rawSOCKS sends a greeting and a request and returns the reply code.
func rawSOCKS(t *testing.T, s *Server, greeting, req []byte) byte {
	t.Helper()
	c, err := net.Dial("tcp", s.SOCKS5Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(greeting)
	var m [2]byte
	if _, err := io.ReadFull(c, m[:]); err != nil || m != [2]byte{5, 0} {
		t.Fatalf("method reply %v %v", m, err)
	}
	c.Write(req)
	var r [3]byte
	if _, err := io.ReadFull(c, r[:]); err != nil {
		t.Fatalf("read reply: %v", err)
	}
	return r[1]
}

func TestSOCKS5HandshakeDeadline(t *testing.T) {
	s, err := New(Config{SOCKS5: "127.0.0.1:0", Mesh: fakeMesh{}, HandshakeTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := net.Dial("tcp", s.SOCKS5Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{5, 1}) // and then nothing
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read from a stalled handshake: %v, want EOF (the proxy hung up)", err)
	}
}

func TestHTTPProxy(t *testing.T) {
	web := startWeb(t)
	s := startServer(t, true, web.Listener.Addr().String())
	pu := &url.URL{Scheme: "http", Host: s.HTTPAddr().String()}
	tr := &http.Transport{Proxy: http.ProxyURL(pu)}
	defer tr.CloseIdleConnections()

	resp, body := getThrough(t, tr, "http://web.mesh.internal:8000/")
	if resp.StatusCode != 200 || body != page {
		t.Fatalf("GET through the HTTP proxy: %d %q, want 200 %q", resp.StatusCode, body, page)
	}
	if v := resp.Header.Get("X-Saw-Proxy-Connection") + resp.Header.Get("X-Saw-Foo"); v != "" {
		t.Errorf("hop-by-hop headers reached the service: %q", v)
	}
	for _, tc := range []struct {
		url  string
		want int
	}{
		{"http://example.com/", http.StatusForbidden},
		{"http://nope.mesh.internal/", http.StatusBadGateway},
	} {
		resp, _ := getThrough(t, tr, tc.url)
		if resp.StatusCode != tc.want {
			t.Errorf("GET %s: %d, want %d", tc.url, resp.StatusCode, tc.want)
		}
	}

	// CONNECT: a tunnel, here carrying plain HTTP.
	for _, tc := range []struct {
		target string
		want   string
	}{
		{"web.mesh.internal:443", "200"},
		{"example.com:443", "403"},
		{"nope.mesh.internal:443", "502"},
		{"no-port", "400"},
	} {
		t.Run("CONNECT "+tc.target, func(t *testing.T) {
			c, err := net.Dial("tcp", s.HTTPAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			// The tunnelled request goes in the same write: bytes the proxy
			// buffered with the CONNECT must still arrive.
			fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", tc.target, tc.target)
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprint(resp.StatusCode); got != tc.want {
				t.Fatalf("CONNECT %s: %s, want %s", tc.target, got, tc.want)
			}
			if tc.want != "200" {
				return
			}
			inner, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(inner.Body)
			if string(b) != page {
				t.Fatalf("through the tunnel: %q, want %q", b, page)
			}
		})
	}

	t.Run("origin-form request", func(t *testing.T) {
		resp, err := http.Get("http://" + s.HTTPAddr().String() + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("GET / at the proxy: %d, want 400", resp.StatusCode)
		}
	})
}

// FuzzHTTPProxyRequest: whatever request a client sends, the handler
// answers with a status and does not panic. No network: the mesh knows no
// name and only mesh names are allowed.
func FuzzHTTPProxyRequest(f *testing.F) {
	f.Add("GET http://web.mesh.internal:8000/ HTTP/1.1\r\nHost: web.mesh.internal:8000\r\n\r\n")
	f.Add("CONNECT web.mesh.internal:443 HTTP/1.1\r\nHost: web.mesh.internal:443\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	f.Add("GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
	f.Add("CONNECT :0 HTTP/1.1\r\n\r\n")
	s := &Server{cfg: Config{Mesh: fakeMesh{}, MeshOnly: true, HandshakeTimeout: time.Second}, conns: map[net.Conn]struct{}{}}
	s.log = tstest.Logger(f)
	s.ctx, s.stop = context.WithCancel(context.Background())
	s.httpLn = nopListener{done: make(chan struct{})}
	s.startHTTP()
	h := s.httpSrv.Handler
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, raw string) {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code < 400 {
			t.Fatalf("%q: status %d, want an error status", raw, w.Code)
		}
	})
}

// nopListener accepts nothing until closed: the fuzz target calls the
// handler directly.
type nopListener struct{ done chan struct{} }

func (l nopListener) Accept() (net.Conn, error) { <-l.done; return nil, net.ErrClosed }
func (l nopListener) Close() error {
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}
func (nopListener) Addr() net.Addr { return &net.TCPAddr{} }

// TestCloseEndsTunnels: Close returns with tunnels open, and their clients
// see the connection end.
func TestCloseEndsTunnels(t *testing.T) {
	web := startWeb(t)
	s, err := New(Config{SOCKS5: "127.0.0.1:0", HTTP: "127.0.0.1:0", Mesh: fakeMesh{target: web.Listener.Addr().String()}, Logger: tstest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	d, _ := xproxy.SOCKS5("tcp", s.SOCKS5Addr().String(), nil, xproxy.Direct)
	socksConn, err := d.Dial("tcp", "web.mesh.internal:80")
	if err != nil {
		t.Fatal(err)
	}
	defer socksConn.Close()
	httpConn, err := net.Dial("tcp", s.HTTPAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer httpConn.Close()
	fmt.Fprintf(httpConn, "CONNECT web.mesh.internal:80 HTTP/1.1\r\nHost: web.mesh.internal:80\r\n\r\n")
	br := bufio.NewReader(httpConn)
	if resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	s.Close()
	s.Close() // idempotent
	for name, r := range map[string]io.Reader{"socks5": socksConn, "connect": br} {
		socksConn.SetReadDeadline(time.Now().Add(10 * time.Second))
		httpConn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := r.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("%s tunnel after Close: %v, want EOF", name, err)
		}
	}
}
