package metricsserver

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func start(t *testing.T, ctx context.Context, addr string) (*Server, error) {
	t.Helper()
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "test_things_total", Help: "Things."})
	c.Add(3)
	reg.MustRegister(c)
	s, err := Start(ctx, Config{Addr: addr, Gatherer: reg, Subsystem: "test", Flag: "--metrics"})
	if s != nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

func get(url string) (int, string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func TestServes(t *testing.T) {
	s, err := start(t, context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if !s.Addr().Addr().Is4() || s.Addr().Port() == 0 {
		t.Fatalf("Addr() = %v", s.Addr())
	}
	code, body, err := get("http://" + s.Addr().String() + "/metrics")
	if err != nil || code != http.StatusOK || !strings.Contains(body, "test_things_total 3") {
		t.Fatalf("GET /metrics: %d %v\n%s", code, err, body)
	}
	if code, _, _ := get("http://" + s.Addr().String() + "/"); code != http.StatusNotFound {
		t.Fatalf("GET /: %d, want 404", code)
	}
	s.Close()
	s.Close()
	if _, _, err := get("http://" + s.Addr().String() + "/metrics"); err == nil {
		t.Fatal("still serving after Close")
	}
}

func TestPortInUse(t *testing.T) {
	a, err := start(t, context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, err = start(t, context.Background(), a.Addr().String())
	if err == nil {
		t.Fatal("second Start on the same address succeeded")
	}
	want := "test: metrics listen " + a.Addr().String() + ": address already in use; choose another --metrics address, or --metrics off"
	if err.Error() != want || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("got %q, want %q wrapping EADDRINUSE", err, want)
	}
	_, err = start(t, context.Background(), "no-port")
	if err == nil || !strings.Contains(err.Error(), "--metrics address (HOST:PORT)") {
		t.Fatalf("bad address: got %v, want an error naming --metrics and HOST:PORT", err)
	}
}

func TestStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s, err := start(t, ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatal("still serving 10s after its context ended")
	}
	s.Close()
}

func TestNilServer(t *testing.T) {
	var s *Server
	if s.Addr().IsValid() || s.Close() != nil {
		t.Fatal("a nil Server is not metrics turned off")
	}
	for addr, off := range map[string]bool{"": true, "off": true, "127.0.0.1:9090": false} {
		if Off(addr) != off {
			t.Errorf("Off(%q) = %v", addr, !off)
		}
	}
}
