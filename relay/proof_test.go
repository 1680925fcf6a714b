package relay

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"

	"github.com/meshlink/meshlink/internal/key"
)

func TestProofRoundTrip(t *testing.T) {
	node := key.NewPrivate()
	nodePub := node.Public()
	rel := key.NewPrivate()
	relPub := rel.Public()
	secret := bytes.Repeat([]byte{7}, proofSecretLen)
	p, err := makeProof(secret, node, relPub)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkProof(p, secret, nodePub, rel); err != nil {
		t.Fatalf("genuine proof refused: %v", err)
	}
	other := bytes.Repeat([]byte{8}, proofSecretLen)
	if err := checkProof(p, other, nodePub, rel); err == nil {
		t.Fatal("proof accepted for another session")
	}
	if err := checkProof(p, secret, relPub, rel); err == nil {
		t.Fatal("proof accepted for another node key")
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.key")
	k1, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, %v; want 0600", fi.Mode(), err)
	}
	k2, err := LoadOrCreateKey(path)
	if err != nil || k2 != k1 {
		t.Fatalf("reload: %v, same key %v", err, k2 == k1)
	}
	os.Chmod(path, 0o644)
	if _, err := LoadOrCreateKey(path); err == nil {
		t.Fatal("a key file readable by others was accepted")
	}
	os.Chmod(path, 0o600)
	os.WriteFile(path, []byte("garbage"), 0o600)
	if _, err := LoadOrCreateKey(path); err == nil {
		t.Fatal("a damaged key file was accepted")
	}
}

// FuzzCheckProof: whatever a client sends as its proof, the check answers
// without panicking and never accepts what it did not seal.
func FuzzCheckProof(f *testing.F) {
	node := key.NewPrivate()
	nodePub := node.Public()
	rel := key.NewPrivate()
	relPub := rel.Public()
	secret := bytes.Repeat([]byte{1}, proofSecretLen)
	good, _ := makeProof(secret, node, relPub)
	goodRaw, _ := base64.StdEncoding.DecodeString(good)
	f.Add(good)
	f.Add("")
	f.Add("AAAA")
	f.Fuzz(func(t *testing.T, proof string) {
		err := checkProof(proof, secret, nodePub, rel)
		raw, _ := base64.StdEncoding.DecodeString(proof)
		if err == nil && !bytes.Equal(raw, goodRaw) {
			// Another valid box of the same secret is possible only with
			// the node's key; the fuzzer does not have it.
			t.Fatalf("accepted a proof not made by the node: %q", proof)
		}
	})
}
