package agent

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/meshlink/meshlink/internal/atomicfile"
	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// fileKeyNext holds a rotation's new key until the coordinator took it;
// node.key keeps the old one until then, so a failed rotation leaves the
// node as it was. Found at start, it is a rotation that was interrupted
// (New resumes it).
const fileKeyNext = "node.key.next"

// rekey is a key rotation handed to controlLoop: it opens the next map
// stream with the new key and both proofs (wire.MapRequest), and switches
// the data plane once the coordinator accepted it. It stays pending across
// reconnects until the coordinator took the key or refused it for good:
// the coordinator may hold the new key even when its answer was lost, so a
// rotation is never dropped for an unreachable coordinator.
type rekey struct {
	priv key.Private
	// server is the coordinator's key the proofs are sealed to; zero
	// until fetched (a resumed rotation fetches it at its first attempt).
	server  key.Public
	resumed bool       // found in the state directory at start
	done    chan error // buffered: nil once switched, or the refusal
}

// mapRequest puts the rotation into a map request: the new key and fresh
// proofs by the node's current key (cur) and the new one.
func (rk *rekey) mapRequest(mr *wire.MapRequest, cur key.Private, name string) {
	msg := wire.RekeyProofMessage(wire.NormalizeName(name), cur.Public(), rk.priv.Public(), time.Now())
	mr.NodeKey = rk.priv.Public()
	mr.OldKeyProof = base64.StdEncoding.EncodeToString(cur.SealTo(rk.server, msg))
	mr.NewKeyProof = base64.StdEncoding.EncodeToString(rk.priv.SealTo(rk.server, msg))
}

// loadPendingRekey returns the rotation an earlier run left in the state
// directory, or nil. A damaged file is no rotation: the coordinator can
// only hold a key the agent had written whole (atomicfile) before it
// proved it.
func (s stateDir) loadPendingRekey(cur key.Private) (*rekey, error) {
	b, err := os.ReadFile(s.path(fileKeyNext))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("agent: read %s: %w", s.path(fileKeyNext), err)
	}
	next, err := key.ParsePrivate(strings.TrimSpace(string(b)))
	if err != nil || next.Equal(cur) {
		os.Remove(s.path(fileKeyNext))
		return nil, nil
	}
	return &rekey{priv: next, resumed: true, done: make(chan error, 1)}, nil
}

// RotateKey gives the node a new WireGuard key: it proves the old and the
// new key to the coordinator, then switches the WireGuard device and the
// bind to the new key and saves it. Connections through the mesh survive:
// WireGuard handshakes again with each peer once the peer's map has the
// new public key. It returns the new public key. A rotation already under
// way (an interrupted one resumed at start, or one waiting for the
// coordinator) is waited for rather than replaced.
func (a *Agent) RotateKey(ctx context.Context) (key.Public, error) {
	a.rotMu.Lock()
	defer a.rotMu.Unlock()
	a.mu.Lock()
	rk := a.rekey
	a.mu.Unlock()
	if rk == nil {
		cc := a.control()
		var sk wire.ServerKey
		if err := cc.call(ctx, wire.PathServerKey, wire.ServerKeyRequest{Version: wire.ProtocolVersion}, &sk); err != nil || sk.Key.IsZero() {
			if errors.Is(err, errNotJoined) {
				return key.Public{}, errors.New("agent: rotate key: " + errNotJoined.Error())
			}
			return key.Public{}, fmt.Errorf("agent: rotate key: cannot get the coordinator's key (%v); is the coordinator reachable and at protocol version %d?", err, wire.ProtocolVersion)
		}
		next := key.NewPrivate()
		if err := atomicfile.WriteFile(a.state.path(fileKeyNext), []byte(next.Base64()+"\n"), 0o600); err != nil {
			return key.Public{}, fmt.Errorf("agent: rotate key: save %s: %w", fileKeyNext, err)
		}
		rk = &rekey{priv: next, server: sk.Key, done: make(chan error, 1)}
		a.mu.Lock()
		a.rekey = rk
		cancel := a.streamCancel
		a.mu.Unlock()
		if cancel != nil {
			cancel() // controlLoop reconnects at once with the new key
		}
	}
	select {
	case err := <-rk.done:
		rk.done <- err // for the next waiter
		if err != nil {
			return key.Public{}, fmt.Errorf("agent: rotate key: the coordinator did not take the new key: %w; the node keeps its old key", err)
		}
		return rk.priv.Public(), nil
	case <-ctx.Done():
		a.mu.Lock()
		last := a.lastErr
		a.mu.Unlock()
		if last == "" {
			last = ctx.Err().Error()
		}
		return key.Public{}, fmt.Errorf("agent: rotate key: not finished yet (%s); the agent keeps trying with the new key until the coordinator takes or refuses it; `meshlink status` shows the key in use", last)
	}
}

// switchKey makes rk's key the node's, once the coordinator accepted it:
// the WireGuard device (which drops its sessions and handshakes again),
// the bind, and the key file, whose time is the key's start (keyLifetime).
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
	now := time.Now()
	os.Chtimes(a.state.path(fileKey), now, now)
	a.log.Info("node key rotated", "key", rk.priv.Public().Short(), "resumed", rk.resumed)
	return nil
}

// dropRekey discards a rotation the coordinator refused for good; the
// node keeps its current key.
func (a *Agent) dropRekey(rk *rekey, err error) {
	os.Remove(a.state.path(fileKeyNext))
	a.log.Warn("key rotation refused by the coordinator; keeping the current key", "new_key", rk.priv.Public().Short(), "resumed", rk.resumed, "err", err)
	rk.done <- err
}

// Automatic rotation: a key is rotated once less than a third of its
// lifetime is left (the lifetime runs from the key file's time, set when
// the key was made or took over, to the expiry in the map), a little
// earlier for some nodes than others (rotateJitter) so that a fleet
// joined at once does not rotate at once. Without a known lifetime (a key
// file newer than its expiry), it is rotated an hour before the expiry.
const (
	rotateJitter   = 0.2
	rotateFallback = time.Hour
)

// rotationDue is when the key with the given expiry, in use since since,
// is to be rotated; j in [0,1) places it in the jitter window.
func rotationDue(expiry, since time.Time, j float64) time.Time {
	left := rotateFallback
	if life := expiry.Sub(since); life > 0 {
		left = life / 3
	}
	return expiry.Add(-left + time.Duration(float64(left)*rotateJitter*j))
}

// keySince is when the node's current key was made or took over.
func (a *Agent) keySince() time.Time {
	fi, err := os.Stat(a.state.path(fileKey))
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}

// expiryChanged wakes rotateLoop (buffered: one pending is enough).
func (a *Agent) wakeRotation() {
	select {
	case a.expiryChanged <- struct{}{}:
	default:
	}
}

// rotateLoop rotates the node's key by itself before it expires, for the
// agent's lifetime, retrying with backoff while the coordinator does not
// take the new key.
func (a *Agent) rotateLoop() {
	bo := a.retryBackoff()
	j := rand.Float64()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		a.mu.Lock()
		expiry := a.nm.Self.KeyExpiry
		a.mu.Unlock()
		wait := time.Duration(-1) // until the expiry changes
		if !expiry.IsZero() {
			wait = time.Until(rotationDue(expiry, a.keySince(), j))
			if !time.Now().Before(expiry) {
				wait = -1 // expired: the coordinator refuses a rotation
			}
		}
		if wait >= 0 {
			t.Reset(wait)
		}
		select {
		case <-a.ctx.Done():
			return
		case <-a.expiryChanged:
			t.Stop()
			continue
		case <-t.C:
		}
		if wait < 0 {
			continue
		}
		a.log.Info("rotating the node key before it expires", "expiry", expiry.UTC().Format(time.RFC3339))
		ctx, cancel := context.WithTimeout(a.ctx, time.Minute)
		k, err := a.RotateKey(ctx)
		cancel()
		if a.ctx.Err() != nil {
			return
		}
		if err == nil {
			bo.Reset()
			j = rand.Float64()
			a.log.Info("node key rotated before its expiry", "key", k.Short())
			continue
		}
		d := bo.Next()
		a.log.Warn("automatic key rotation failed; will retry", "in", d.Round(time.Millisecond), "expiry", expiry.UTC().Format(time.RFC3339), "err", err)
		if !backoff.Sleep(a.ctx, d) {
			return
		}
	}
}
