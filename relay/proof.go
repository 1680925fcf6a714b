package relay

import (
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"

	"golang.org/x/crypto/nacl/box"

	"github.com/meshlink/meshlink/internal/key"
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

// makeProof seals the session secret from the node's key to the relay's:
// base64(nonce || box).
func makeProof(secret []byte, nodePriv key.Private, relayPub key.Public) (string, error) {
	return base64.StdEncoding.EncodeToString(nodePriv.SealTo(relayPub, secret)), nil
}

// errProof is returned for every proof that does not check out; the reason
// stays in the relay's log, not in the answer.
var errProof = errors.New("relay: the node key proof does not verify")

// checkProof verifies a proof made by makeProof for this session.
func checkProof(proof string, secret []byte, nodePub key.Public, relayPriv key.Private) error {
	b, err := base64.StdEncoding.DecodeString(proof)
	if err != nil || len(b) != 24+proofSecretLen+box.Overhead {
		return fmt.Errorf("%w: %d bytes, want %d", errProof, len(b), 24+proofSecretLen+box.Overhead)
	}
	opened, ok := relayPriv.OpenFrom(nodePub, b)
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
func LoadOrCreateKey(path string) (key.Private, error) {
	k, err := key.LoadOrCreateFile(path)
	switch {
	case errors.Is(err, key.ErrExposed):
		return k, fmt.Errorf("relay key %s is readable by others; run chmod 600 %s", path, path)
	case errors.Is(err, key.ErrDamaged):
		return k, fmt.Errorf("relay key %s is damaged (want 32 bytes, base64); move it away to make a new one", path)
	case err != nil:
		return k, fmt.Errorf("relay key: %w", err)
	}
	return k, nil
}
