package relay

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/atomicfile"
)

// A node proves to a relay that it holds the private WireGuard key it
// claims, without sending anything a relay could reuse: both ends export
// keying material from their TLS session (RFC 5705/8446, unique to this
// connection), and the node seals it in a NaCl box from its WireGuard key to
// the relay's key. Only the holder of the node's private key can make a box
// that opens with the node's public key, and a proof made for one TLS
// session is worthless on any other, so a relay cannot replay it elsewhere.
// This is why relays need no node credentials, and why a relay must
// terminate TLS itself (not behind a TLS-terminating proxy).

// proofLabel is the TLS exporter label of the relay proof.
const proofLabel = "EXPORTER-meshlink-relay-proof-v1"

const proofSecretLen = 32

// sessionSecret exports this TLS session's proof secret.
func sessionSecret(cs *tls.ConnectionState) ([]byte, error) {
	if cs == nil {
		return nil, errors.New("relay: not a TLS connection")
	}
	return cs.ExportKeyingMaterial(proofLabel, nil, proofSecretLen)
}

// PublicKey returns the Curve25519 public key of priv.
func PublicKey(priv Key) (Key, error) {
	var pub Key
	b, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return pub, err
	}
	copy(pub[:], b)
	return pub, nil
}

// NewPrivateKey returns a fresh Curve25519 private key, clamped as
// WireGuard clamps its keys.
func NewPrivateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return k, err
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// makeProof seals the session secret from the node's key to the relay's:
// base64(nonce || box).
func makeProof(secret []byte, nodePriv, relayPub Key) (string, error) {
	var nonce [24]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return "", err
	}
	sealed := box.Seal(nonce[:], secret, &nonce, (*[32]byte)(&relayPub), (*[32]byte)(&nodePriv))
	return base64.StdEncoding.EncodeToString(sealed), nil
}

// errProof is returned for every proof that does not check out; the reason
// stays in the relay's log, not in the answer.
var errProof = errors.New("relay: the node key proof does not verify")

// checkProof verifies a proof made by makeProof for this session.
func checkProof(proof string, secret []byte, nodePub, relayPriv Key) error {
	b, err := base64.StdEncoding.DecodeString(proof)
	if err != nil || len(b) != 24+proofSecretLen+box.Overhead {
		return fmt.Errorf("%w: %d bytes, want %d", errProof, len(b), 24+proofSecretLen+box.Overhead)
	}
	var nonce [24]byte
	copy(nonce[:], b)
	opened, ok := box.Open(nil, b[24:], &nonce, (*[32]byte)(&nodePub), (*[32]byte)(&relayPriv))
	if !ok {
		return fmt.Errorf("%w: box does not open", errProof)
	}
	if subtle.ConstantTimeCompare(opened, secret) != 1 {
		return fmt.Errorf("%w: made for another TLS session", errProof)
	}
	return nil
}

// LoadOrCreateKey returns the relay private key kept in path (base64, mode
// 0600), creating it on first use. A key file readable by others is refused.
func LoadOrCreateKey(path string) (Key, error) {
	var k Key
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if k, err = NewPrivateKey(); err != nil {
			return k, err
		}
		enc := base64.StdEncoding.EncodeToString(k[:]) + "\n"
		if err := atomicfile.WriteFile(path, []byte(enc), 0o600); err != nil {
			return k, fmt.Errorf("relay key: %w", err)
		}
		return k, nil
	}
	if err != nil {
		return k, fmt.Errorf("relay key: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return k, fmt.Errorf("relay key %s is readable by others (mode %v); run chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(raw) != KeyLen {
		return k, fmt.Errorf("relay key %s is damaged (want 32 bytes, base64); move it away to make a new one", path)
	}
	copy(k[:], raw)
	return k, nil
}
