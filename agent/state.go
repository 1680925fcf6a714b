package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshlink/meshlink/internal/atomicfile"
	"github.com/meshlink/meshlink/internal/key"

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
	// fileUpstreams holds the resolvers last found in /etc/resolv.conf,
	// used once the agent's DNS is the system resolver (dns.Config.Remembered).
	fileUpstreams = "dns-upstreams.json"
)

// nodeState is what node.json holds.
type nodeState struct {
	ID     wire.NodeID `json:"id"`
	Name   string      `json:"name"`
	Secret string      `json:"secret"`
	URL    string      `json:"url"`
	// URLs are the mesh's other coordinators (same Fingerprint), from the
	// join token and then the network map, tried when URL fails.
	URLs        []string `json:"urls,omitempty"`
	Fingerprint string   `json:"fingerprint"`
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
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return stateDir{}, fmt.Errorf("agent: state directory %s: %w; or choose another --state", dir, err)
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
func (s stateDir) loadOrCreateKey() (key.Private, error) {
	k, err := key.LoadOrCreateFile(s.path(fileKey))
	switch {
	case errors.Is(err, key.ErrDamaged):
		return k, fmt.Errorf("agent: %s is corrupt; remove the state directory to start as a new node", s.path(fileKey))
	case errors.Is(err, key.ErrExposed):
		return k, fmt.Errorf("agent: %s is readable by others; run chmod 600 %s", s.path(fileKey), s.path(fileKey))
	case err != nil:
		return k, fmt.Errorf("agent: key: %w", err)
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
