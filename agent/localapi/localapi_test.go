package localapi

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

func TestMain(m *testing.M) { tstest.Main(m) }

// TestClientErrors: what the CLI prints when the agent is not there or
// refuses.
func TestClientErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	want := "no agent is running with --state " + dir + "; start one with `meshlink agent --state " + dir + "`"
	if _, err := NewClient(dir).Status(ctx); err == nil || err.Error() != want {
		t.Fatalf("no agent: %v, want %q", err, want)
	}

	ln, err := net.Listen("unix", filepath.Join(dir, SocketName))
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+PathExpose, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(Error{Message: "service name: too long"})
	})
	mux.HandleFunc("POST "+PathUnexpose, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
	})
	mux.HandleFunc("GET "+PathPing, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode([]PingResult{{Peer: r.URL.Query().Get("node"), Path: "relay", RTT: Duration(time.Millisecond)}})
	})
	srv := &http.Server{Handler: mux}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	defer func() {
		srv.Close()
		<-done
	}()

	c := NewClient(dir)
	if _, err := c.Expose(ctx, ExposeRequest{Name: "x"}); err == nil || err.Error() != "service name: too long" {
		t.Fatalf("refused with a message: %v", err)
	}
	if err := c.Unexpose(ctx, "x"); err == nil || err.Error() != "agent API answered 500 Internal Server Error" {
		t.Fatalf("refused without a message: %v", err)
	}
	res, err := c.Ping(ctx, "db", time.Second)
	if err != nil || len(res) != 1 || res[0].Peer != "db" || res[0].RTT != Duration(time.Millisecond) {
		t.Fatalf("ping: %+v %v", res, err)
	}
}
