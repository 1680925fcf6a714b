package coordinator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// TestTLSCertFlags: --tls-cert/--tls-key serve the given certificate, and
// join tokens pin that one.
func TestTLSCertFlags(t *testing.T) {
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "coordinator.example"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"coordinator.example"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)

	s := startServer(t, filepath.Join(dir, "data"), func(c *Config) { c.TLSCert, c.TLSKey = certFile, keyFile })
	if s.Fingerprint() != wire.CertFingerprint(der) {
		t.Fatalf("fingerprint %s, want the given certificate's", s.Fingerprint())
	}
	conn, err := tls.Dial("tcp", s.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; got != "coordinator.example" {
		t.Fatalf("served certificate %q", got)
	}

	_, err = New(Config{Listen: "127.0.0.1:0", DataDir: filepath.Join(dir, "other"), TLSCert: certFile, TLSKey: filepath.Join(dir, "missing.pem")})
	if err == nil || !strings.Contains(err.Error(), "--tls-cert/--tls-key") {
		t.Fatalf("missing key file: %v", err)
	}
}

// TestTLS12Refused: the coordinator's HTTPS port (API, console and the
// embedded relay) speaks TLS 1.3 only; a client that offers at most TLS 1.2
// is refused in the handshake, before any request.
func TestTLS12Refused(t *testing.T) {
	s := startServer(t, t.TempDir())
	old, err := tls.Dial("tcp", s.Addr().String(), &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12})
	if err == nil {
		old.Close()
		t.Fatal("a TLS 1.2-only client completed a handshake with the coordinator")
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("TLS 1.2-only client: %v, want a protocol version alert", err)
	}
	conn, err := tls.Dial("tcp", s.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS 1.3 client: %v", err)
	}
	defer conn.Close()
	if v := conn.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("negotiated %s, want TLS 1.3", tls.VersionName(v))
	}
}

// TestDataDirPrivate: a --data directory made 0755 beforehand (mkdir, a
// volume mount) is tightened to 0700, and every file the coordinator
// writes in it is 0600: the database, the keys, the certificate's key. The
// certificate itself is public.
func TestDataDirPrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	startServer(t, dir)
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data directory mode %04o, %v; want 0700", fi.Mode().Perm(), err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := 0
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		files++
		if e.Name() == "cert.pem" {
			continue
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %04o, want 0600", e.Name(), fi.Mode().Perm())
		}
	}
	if files == 0 {
		t.Fatal("no files in the data directory")
	}
}
