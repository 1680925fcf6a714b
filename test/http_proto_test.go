package test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"
	"golang.org/x/net/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// h2cClient speaks HTTP/2 with prior knowledge only.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: &p}}
}

// waitHTTP waits until the consumer treats service (at base) as HTTP
// (its map said so).
func waitHTTP(t *testing.T, cons *agent.Agent, base, service string) {
	t.Helper()
	tstest.WaitFor(t, 5*time.Second, "the service to be HTTP at the consumer", func() bool {
		get(keepAliveClient(), base+"/warm")
		return httpRequests(t, cons, "role", "consumer", "service", service) > 0
	})
}

// TestHTTPServiceH2C: HTTP/2 with prior knowledge through an HTTP
// service: many requests multiplexed at once on the client's one
// connection are answered over HTTP/2, and reach the target as HTTP/1.1
// (only gRPC goes as HTTP/2 beyond the consumer), here a server that also
// speaks h2c; and one that speaks only HTTP/1.1 serves h2c clients too.
func TestHTTPServiceH2C(t *testing.T) {
	m := harness.NewMesh(t)
	web := startHTTPBackend(t, "h2")
	cons := meteredAgent(t, m, "site-a", harness.AgentOptions{})
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr(), Protocol: "http"}}})
	svc := waitProviders(t, cons, "web", 1)
	base := "http://" + svc.Local.String()
	waitHTTP(t, cons, base, "web")
	c := h2cClient()
	errs := make(chan error, 50)
	for i := range 50 {
		go func() {
			code, body, _, err := get(c, fmt.Sprintf("%s/h2/%d", base, i))
			if want := fmt.Sprintf("h2 HTTP/1.1 GET /h2/%d host=%s body=", i, svc.Local); err != nil || code != 200 || body != want {
				err = fmt.Errorf("h2c GET %d: %d %q %v; want %q", i, code, body, err, want)
			}
			errs <- err
		}()
	}
	for range 50 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := httpRequests(t, cons, "role", "consumer", "service", "web", "code", "200", "method", "GET"); got < 50 {
		t.Fatalf("consumer counted %v requests, want at least 50", got)
	}
	resp, err := c.Get(base + "/proto")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("the consumer answered an h2c client with %s", resp.Proto)
	}

	// A target that speaks HTTP/1.1 only.
	h1 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "h1 %s", r.Proto) }))
	defer h1.Close()
	m.AddAgent("site-c", harness.AgentOptions{Expose: []agent.Export{{Name: "old", Target: h1.Listener.Addr().String(), Protocol: "http"}}})
	old := waitProviders(t, cons, "old", 1)
	waitHTTP(t, cons, "http://"+old.Local.String(), "old")
	if code, body, _, err := get(c, "http://"+old.Local.String()+"/"); err != nil || code != 200 || body != "h1 HTTP/1.1" {
		t.Fatalf("h2c client, HTTP/1.1 target: %d %q %v", code, body, err)
	}
}

// TestHTTPServiceGRPC: a real gRPC server (the standard health service)
// behind an HTTP service answers unary calls and streams its watch
// through the mesh; trailers (the gRPC status) come through.
func TestHTTPServiceGRPC(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)

	m := harness.NewMesh(t)
	cons := meteredAgent(t, m, "site-a", harness.AgentOptions{})
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "grpc", Target: ln.Addr().String(), Protocol: "http"}}})
	svc := waitProviders(t, cons, "grpc", 1)
	waitHTTP(t, cons, "http://"+svc.Local.String(), "grpc")

	cc, err := grpc.NewClient(svc.Local.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 20 {
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "echo"})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Check %d: %v %v", i, resp, err)
		}
	}
	// An error status travels in the trailers.
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"}); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Fatalf("Check of an unknown service: %v; want NotFound", err)
	}
	// A server stream: the watch sends the status, then every change.
	w, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", r, err)
	}
	hs.SetServingStatus("echo", healthpb.HealthCheckResponse_NOT_SERVING)
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("watch after the change: %v %v", r, err)
	}
	if got := httpRequests(t, cons, "role", "consumer", "service", "grpc", "method", "POST"); got < 21 {
		t.Fatalf("consumer counted %v gRPC calls, want at least 21", got)
	}
}

// TestHTTPServiceWebSocket: a WebSocket upgrade passes through an HTTP
// service as a stream: messages echo both ways over one connection.
func TestHTTPServiceWebSocket(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: websocket.Handler(func(ws *websocket.Conn) {
		for {
			var msg string
			if err := websocket.Message.Receive(ws, &msg); err != nil {
				return
			}
			websocket.Message.Send(ws, "echo: "+msg)
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	m := harness.NewMesh(t)
	cons := meteredAgent(t, m, "site-a", harness.AgentOptions{})
	m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "ws", Target: ln.Addr().String(), Protocol: "http"}}})
	svc := waitProviders(t, cons, "ws", 1)
	waitHTTP(t, cons, "http://"+svc.Local.String(), "ws")

	ws, err := websocket.Dial("ws://"+svc.Local.String()+"/echo", "", "http://"+svc.Local.String()+"/")
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.SetDeadline(time.Now().Add(10 * time.Second))
	for i := range 100 {
		msg := fmt.Sprintf("message %d %s", i, strings.Repeat("x", i*100))
		if err := websocket.Message.Send(ws, msg); err != nil {
			t.Fatal(err)
		}
		var got string
		if err := websocket.Message.Receive(ws, &got); err != nil || got != "echo: "+msg {
			t.Fatalf("message %d: %d bytes, %v", i, len(got), err)
		}
	}
	// The upgraded request is counted once its stream ends.
	ws.Close()
	tstest.WaitFor(t, 5*time.Second, "the upgrade counted with its 101", func() bool {
		return httpRequests(t, cons, "role", "consumer", "service", "ws", "code", "101") == 1
	})
}

// TestHTTPServiceFromTCPConsumer: a consumer that carries an HTTP service
// as plain TCP (as an agent older than protocol 12 does; here the SOCKS5
// proxy, which splices a connection to a provider) still reaches it: the
// provider parses what arrives as HTTP and forwards each request, counting
// them at its end.
func TestHTTPServiceFromTCPConsumer(t *testing.T) {
	m := harness.NewMesh(t)
	web := startHTTPBackend(t, "site-b")
	prov := meteredAgent(t, m, "site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: web.addr(), Protocol: "http"}}})
	cfg := m.AgentConfig("site-a", harness.AgentOptions{})
	cfg.SOCKS5, cfg.ProxyMeshOnly = "127.0.0.1:0", true
	a, err := harness.StartAgent(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	svc := waitProviders(t, a, "web", 1)
	d, err := xproxy.SOCKS5("tcp", a.SOCKS5Addr(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: d.(xproxy.ContextDialer).DialContext}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := range 20 {
		u := fmt.Sprintf("http://web.mesh.internal:%d/raw/%d", svc.Port, i)
		code, body, _, err := get(c, u)
		if err != nil || code != 200 || !strings.HasPrefix(body, fmt.Sprintf("site-b HTTP/1.1 GET /raw/%d ", i)) {
			t.Fatalf("GET %s: %d %q %v", u, code, body, err)
		}
	}
	if got := httpRequests(t, prov, "role", "provider", "service", "web", "code", "200"); got != 20 {
		t.Fatalf("the provider counted %v requests, want 20", got)
	}
}
