package agent

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/meshlink/meshlink/internal/atomicfile"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// fileKeyNext holds a rotation's new key until the coordinator took it;
// node.key keeps the old one until then, so a failed rotation leaves the
// node as it was.
const fileKeyNext = "node.key.next"

// rekey is a key rotation handed to controlLoop: it opens the next map
// stream with the new key and both proofs (wire.MapRequest), and switches
// the data plane once the coordinator accepted it.
type rekey struct {
	priv     key.Private
	old, new string     // wire.MapRequest.OldKeyProof and NewKeyProof
	done     chan error // buffered: nil once switched, or why not
}

// RotateKey gives the node a new WireGuard key: it proves the old and the
// new key to the coordinator, then switches the WireGuard device and the
// bind to the new key and saves it. Connections through the mesh survive:
// WireGuard handshakes again with each peer once the peer's map has the
// new public key. It returns the new public key.
func (a *Agent) RotateKey(ctx context.Context) (key.Public, error) {
	a.rotMu.Lock()
	defer a.rotMu.Unlock()
	cc := a.control()
	if cc == nil {
		return key.Public{}, errors.New("agent: rotate key: " + errNotJoined.Error())
	}
	var sk wire.ServerKey
	if err := cc.call(ctx, wire.PathServerKey, wire.ServerKeyRequest{Version: wire.ProtocolVersion}, &sk); err != nil || sk.Key.IsZero() {
		return key.Public{}, fmt.Errorf("agent: rotate key: cannot get the coordinator's key (%v); is the coordinator reachable and at protocol version %d?", err, wire.ProtocolVersion)
	}
	next := key.NewPrivate()
	if err := atomicfile.WriteFile(a.state.path(fileKeyNext), []byte(next.Base64()+"\n"), 0o600); err != nil {
		return key.Public{}, fmt.Errorf("agent: rotate key: save %s: %w", fileKeyNext, err)
	}
	a.mu.Lock()
	old := a.key
	name := a.node.Name
	msg := wire.RekeyProofMessage(wire.NormalizeName(name), old.Public(), next.Public(), time.Now())
	rk := &rekey{priv: next, done: make(chan error, 1),
		old: base64.StdEncoding.EncodeToString(old.SealTo(sk.Key, msg)),
		new: base64.StdEncoding.EncodeToString(next.SealTo(sk.Key, msg))}
	a.rekey = rk
	cancel := a.streamCancel
	a.mu.Unlock()
	if cancel != nil {
		cancel() // controlLoop reconnects at once with the new key
	}
	select {
	case err := <-rk.done:
		if err != nil {
			os.Remove(a.state.path(fileKeyNext))
			return key.Public{}, fmt.Errorf("agent: rotate key: the coordinator did not take the new key: %w; the node keeps its old key", err)
		}
		return next.Public(), nil
	case <-ctx.Done():
		// controlLoop still finishes it, or drops it on failure.
		return key.Public{}, fmt.Errorf("agent: rotate key: %w; `meshlink status` shows the key in use", ctx.Err())
	}
}

// switchKey makes rk's key the node's, once the coordinator accepted it:
// the WireGuard device (which drops its sessions and handshakes again),
// the bind, and the key file.
func (a *Agent) switchKey(rk *rekey) error {
	if err := a.dev.IpcSet("private_key=" + rk.priv.UAPI() + "\n"); err != nil {
		return fmt.Errorf("set the WireGuard key: %w", err)
	}
	a.bind.SetPrivateKey(rk.priv)
	a.mu.Lock()
	a.key = rk.priv
	a.mu.Unlock()
	if err := os.Rename(a.state.path(fileKeyNext), a.state.path(fileKey)); err != nil {
		return fmt.Errorf("save the new key: %w; it is in %s: move it to %s before the agent restarts", err, a.state.path(fileKeyNext), a.state.path(fileKey))
	}
	a.log.Info("node key rotated", "key", rk.priv.Public().Short())
	return nil
}
