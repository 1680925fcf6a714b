package relayd

import (
	"crypto/tls"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
)

func TestMain(m *testing.M) { tstest.Main(m) }

// startRegistered starts a relay whose state says it is registered with a
// coordinator that is not there: it serves its listener all the same.
func startRegistered(t *testing.T) *Relay {
	t.Helper()
	dir := t.TempDir()
	b, _ := json.Marshal(creds{Coordinator: "https://127.0.0.1:1", ID: 1, Secret: "s", Name: "relay1"})
	if err := os.WriteFile(filepath.Join(dir, credsFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := New(Config{StateDir: dir, Name: "relay1", Listen: "127.0.0.1:0", Logger: tstest.NewLogger(t, tstest.LogOptions{}),
		RetryMin: time.Second, RetryMax: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestTLS12Refused: a standalone relay speaks TLS 1.3 only; a client that
// offers at most TLS 1.2 is refused in the handshake.
func TestTLS12Refused(t *testing.T) {
	r := startRegistered(t)
	addr := strings.TrimPrefix(r.Status().URL, "https://")
	old, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12})
	if err == nil {
		old.Close()
		t.Fatal("a TLS 1.2-only client completed a handshake with the relay")
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("TLS 1.2-only client: %v, want a protocol version alert", err)
	}
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatalf("TLS 1.3 client: %v", err)
	}
	defer conn.Close()
	if v := conn.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("negotiated %s, want TLS 1.3", tls.VersionName(v))
	}
}
