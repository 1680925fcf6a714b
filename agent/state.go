package agent

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshlink/meshlink/internal/atomicfile"

	"golang.org/x/crypto/curve25519"

	"github.com/meshlink/meshlink/agent/proxy"

	"github.com/meshlink/meshlink/wire"
)

// Files in the state directory. Everything secret is written 0600.
const (
	fileKey      = "node.key"      // WireGuard private key, base64; never leaves the node
	fileNode     = "node.json"     // node identity and coordinator credentials
	fileServices = "services.json" // what this site exports
	fileNetmap   = "netmap.json"   // last network map, so the data plane starts without the coordinator
	fileAPI      = "api.sock"      // local API for the CLI
)

// privateKey is a Curve25519 private key as WireGuard uses it.
type privateKey [32]byte

func newPrivateKey() (privateKey, error) {
	var k privateKey
	if _, err := rand.Read(k[:]); err != nil {
		return k, err
	}
	// Clamp as RFC 7748 asks; wireguard-go would do it too.
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

func (k privateKey) public() [32]byte {
	pub, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil {
		panic("agent: X25519 with basepoint cannot fail: " + err.Error())
	}
	var p [32]byte
	copy(p[:], pub)
	return p
}

// PublicKey returns the key in the form the wire package carries.
func (k privateKey) PublicKey() wire.Key {
	p := k.public()
	return wire.Key(base64.StdEncoding.EncodeToString(p[:]))
}

func (k privateKey) hex() string { return hex.EncodeToString(k[:]) }

// keyHex converts a wire key (base64) to the hex form of wireguard-go's UAPI.
func keyHex(k wire.Key) (string, error) {
	b, err := base64.StdEncoding.DecodeString(string(k))
	if err != nil || len(b) != 32 {
		return "", fmt.Errorf("bad public key %q", k)
	}
	return hex.EncodeToString(b), nil
}

// nodeState is what node.json holds.
type nodeState struct {
	ID          wire.NodeID `json:"id"`
	Name        string      `json:"name"`
	Secret      string      `json:"secret"`
	URL         string      `json:"url"`
	Fingerprint string      `json:"fingerprint"`
	// TokenID records which token made this node, so that restarting with
	// the same --join never spends the token again.
	TokenID string `json:"token_id,omitempty"`
}

// Export is one service this site provides.
type Export = proxy.Export

// stateDir reads and writes the agent's state directory.
type stateDir struct{ dir string }

func openStateDir(dir string) (stateDir, error) {
	if dir == "" {
		return stateDir{}, errors.New("agent: no state directory given; pass --state DIR")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return stateDir{}, fmt.Errorf("agent: state directory %s: %w; choose a writable --state", dir, err)
	}
	// Prove it is writable now rather than after joining.
	probe := filepath.Join(dir, ".write-test")
	if err := os.WriteFile(probe, nil, 0o600); err != nil {
		return stateDir{}, fmt.Errorf("agent: state directory %s is not writable: %w; choose a writable --state", dir, err)
	}
	os.Remove(probe)
	return stateDir{dir: dir}, nil
}

func (s stateDir) path(name string) string { return filepath.Join(s.dir, name) }

// loadOrCreateKey returns the node's private key, creating it on first start.
func (s stateDir) loadOrCreateKey() (privateKey, error) {
	var k privateKey
	b, err := os.ReadFile(s.path(fileKey))
	if err == nil {
		raw, err := base64.StdEncoding.DecodeString(string(trimSpace(b)))
		if err != nil || len(raw) != 32 {
			return k, fmt.Errorf("agent: %s is corrupt; remove the state directory to start as a new node", s.path(fileKey))
		}
		copy(k[:], raw)
		return k, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return k, fmt.Errorf("agent: read key: %w", err)
	}
	k, err = newPrivateKey()
	if err != nil {
		return k, fmt.Errorf("agent: generate key: %w", err)
	}
	if err := atomicfile.WriteFile(s.path(fileKey), []byte(base64.StdEncoding.EncodeToString(k[:])+"\n"), 0o600); err != nil {
		return k, fmt.Errorf("agent: save key: %w", err)
	}
	return k, nil
}

func (s stateDir) loadJSON(name string, v any) (bool, error) {
	b, err := os.ReadFile(s.path(name))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("agent: read %s: %w", name, err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("agent: %s is corrupt (%v); fix or remove it", s.path(name), err)
	}
	return true, nil
}

func (s stateDir) saveJSON(name string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(s.path(name), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("agent: save %s: %w", name, err)
	}
	return nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
