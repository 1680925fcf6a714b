package httpmesh

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// onePicker is a Picker with one provider reached over loopback TCP.
type onePicker struct{ t proxy.Target }

func (p onePicker) Pick(string, netip.Addr, map[string]int, func(wire.NodeID) bool) ([]proxy.Target, error) {
	return []proxy.Target{p.t}, nil
}
func (p onePicker) Begin(string, proxy.Target) func() { return func() {} }
func (p onePicker) Providers(string) []proxy.Target   { return []proxy.Target{p.t} }
func (p onePicker) DialTarget(ctx context.Context, _ string, t proxy.Target) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", t.Addr.String())
}

type recorder struct {
	mu       sync.Mutex
	attempts []AttemptInfo
	done     []DoneInfo
}

func (r *recorder) Attempt(_ *http.Request, a AttemptInfo) {
	r.mu.Lock()
	r.attempts = append(r.attempts, a)
	r.mu.Unlock()
}

func (r *recorder) Done(_ *http.Request, d DoneInfo) {
	r.mu.Lock()
	r.done = append(r.done, d)
	r.mu.Unlock()
}

// TestHooks: the provider's authorizer refuses with its status and
// header, or lets a request through with a header it added; the
// consumer's middleware sees the request first and may add headers; the
// observers are told of the attempt and of the end at both ends.
func TestHooks(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "sub=%s trace=%s", r.Header.Get("X-Claim-Sub"), r.Header.Get("Traceparent"))
	}))
	defer backend.Close()

	var provObs, consObs recorder
	p := NewProvider(ProviderConfig{Observer: &provObs, Node: func() string { return "site-b" },
		Peer: func(netip.Addr) (wire.NodeID, string) { return 7, "site-a" }})
	defer p.Close()
	var from wire.NodeID
	p.SetAuthorizer("web", func(r *http.Request, node wire.NodeID) (int, http.Header, string, bool) {
		from = node
		if r.Header.Get("Authorization") != "Bearer good" {
			return http.StatusUnauthorized, http.Header{"Www-Authenticate": {`Bearer realm="web"`}}, "a valid token is needed", false
		}
		r.Header.Set("X-Claim-Sub", "alice")
		return 0, nil, "", true
	})
	export := proxy.Export{Name: "web", Target: backend.Listener.Addr().String(), Protocol: wire.ProtocolHTTP}
	provAddr := tstest.Serve(t, func(c net.Conn) { p.ServeConn(export, netip.MustParseAddr("100.96.0.7"), c) })

	var seen RequestInfo
	c := NewConsumer(ConsumerConfig{Observer: &consObs, Middleware: func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			seen, _ = Info(r.Context())
			r.Header.Set("Traceparent", "00-abc-def-01")
			next.ServeHTTP(w, r)
		})
	}})
	defer c.Close()
	c.Attach(onePicker{proxy.Target{Node: 2, Name: "site-b", Addr: provAddr, Online: true}})
	c.SetServices(map[string]*wire.ServiceHTTP{"web": {}})
	local := tstest.Serve(t, func(conn net.Conn) { c.ServeConn("web", conn) })

	do := func(auth string) (*http.Response, string) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+local.String()+"/x", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, body := do("")
	if resp.StatusCode != 401 || resp.Header.Get("Www-Authenticate") != `Bearer realm="web"` || body != "a valid token is needed\n" {
		t.Fatalf("refused: %d %v %q", resp.StatusCode, resp.Header, body)
	}
	if from != 7 {
		t.Fatalf("the authorizer was told node %d, want 7", from)
	}
	resp, body = do("Bearer good")
	if resp.StatusCode != 200 || body != "sub=alice trace=00-abc-def-01" {
		t.Fatalf("allowed: %d %q", resp.StatusCode, body)
	}
	if seen.Service != "web" || seen.Role != RoleConsumer {
		t.Fatalf("the middleware saw %+v", seen)
	}
	consObs.mu.Lock()
	defer consObs.mu.Unlock()
	if len(consObs.attempts) != 2 || consObs.attempts[1].Provider.Name != "site-b" || consObs.attempts[1].Code != 200 || consObs.attempts[0].Code != 401 {
		t.Fatalf("consumer attempts %+v", consObs.attempts)
	}
	if len(consObs.done) != 2 || consObs.done[1].Code != 200 || consObs.done[1].Provider != "site-b" || consObs.done[1].Attempts != 1 {
		t.Fatalf("consumer ends %+v", consObs.done)
	}
	provObs.mu.Lock()
	defer provObs.mu.Unlock()
	if len(provObs.done) != 2 || provObs.done[0].Code != 401 || provObs.done[0].From != 7 || provObs.done[0].FromName != "site-a" || provObs.done[1].Code != 200 {
		t.Fatalf("provider ends %+v", provObs.done)
	}
}

// TestNotHTTPLogged: what cannot start a request and a request net/http
// cannot parse both get a 4xx and a log line (one per 10 s: the second is
// counted, then named by the next line).
func TestNotHTTPLogged(t *testing.T) {
	for _, tc := range []struct{ in, status, log string }{
		{"\x16\x03\x01\x00\x05hello", "400 Bad Request", "not HTTP on an HTTP service"},
		{"hello there\r\n\r\n", "400 Bad Request", "not valid HTTP on an HTTP service"},
		{"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", "400 Bad Request", "not valid HTTP on an HTTP service"},
	} {
		var logs tstest.Buffer
		c := NewConsumer(ConsumerConfig{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		c.Attach(onePicker{})
		addr := tstest.Serve(t, func(conn net.Conn) { c.ServeConn("web", conn) })
		conn, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, tc.in)
		b, _ := io.ReadAll(conn)
		conn.Close()
		if !strings.HasPrefix(string(b), "HTTP/1.1 "+tc.status) {
			t.Errorf("%q: answered %q", tc.in, b)
		}
		// The line is logged after the 400 is written: the client may
		// read the answer first.
		tstest.WaitFor(t, 5*time.Second, fmt.Sprintf("%q logged as %q", tc.in, tc.log), func() bool {
			return strings.Contains(logs.String(), tc.log)
		})
		c.Close()
	}
}
