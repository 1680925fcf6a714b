package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// errLeft refuses what a node that left the mesh can no longer do.
var errLeft = errors.New("this node has left the mesh; join it again with `meshlink agent --join TOKEN`")

// LeaveResult tells what Leave did.
type LeaveResult struct {
	// Name is the node that left.
	Name string `json:"name"`
	// Note is set when the coordinator could not be told (with force):
	// the node is then still listed there.
	Note string `json:"note,omitempty"`
}

// noteJoining records that the node is joining the coordinator at url,
// for Status.
func (a *Agent) noteJoining(url string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.joinURL = url
}

// noteRetry records why the coordinator could not be reached and when the
// next attempt is due, for Status.
func (a *Agent) noteRetry(url string, err error, in time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if url != "" {
		a.joinURL = url
	}
	if err != nil {
		a.lastErr = err.Error()
	}
	a.retryAt = time.Now().Add(in)
}

// Left is closed once Leave has removed this node from the mesh; the
// agent's owner should Close it then.
func (a *Agent) Left() <-chan struct{} { return a.leftCh }

// Leave removes this node from the mesh: the coordinator deletes it (its
// peers drop it within seconds), the data plane forgets every peer and
// service, and the node's key, credentials, exports and cached map are
// deleted from the state directory (the directory itself goes at Close,
// if nothing else is in it). If the coordinator cannot be told, Leave
// fails and keeps everything, unless force is set: then the local state
// goes anyway and the result's Note says to remove the node on the
// coordinator.
func (a *Agent) Leave(ctx context.Context, force bool) (LeaveResult, error) {
	a.leaveMu.Lock()
	defer a.leaveMu.Unlock()
	a.mu.Lock()
	node, cc, left := a.node, a.cc, a.left
	a.mu.Unlock()
	if left {
		return LeaveResult{}, errLeft
	}
	if node.ID == 0 || cc == nil {
		return LeaveResult{}, fmt.Errorf("this node has not joined a mesh yet; nothing to leave (stop the agent and delete %s)", a.cfg.StateDir)
	}
	res, err := tellLeave(ctx, cc, node, force)
	if err != nil {
		return res, err
	}
	a.mu.Lock()
	a.nm.Peers, a.nm.Services, a.nm.Relays = nil, nil, nil
	a.exports = nil
	a.reconfigLocked()
	a.left = true
	a.mu.Unlock()
	a.cancel() // the control, stats and retry loops end
	if err := removeNodeState(a.state); err != nil {
		return res, err
	}
	a.log.Info("left the mesh; state deleted", "name", node.Name, "node", node.ID, "state", a.cfg.StateDir)
	close(a.leftCh)
	return res, nil
}

// LeaveStateDir is Leave for a node whose agent is not running: it tells
// the coordinator with the credentials in dir and deletes the node's
// state there, dir too if that empties it.
func LeaveStateDir(ctx context.Context, dir string, force bool) (LeaveResult, error) {
	if _, err := os.Stat(dir); err != nil {
		return LeaveResult{}, fmt.Errorf("agent: state directory %s: %w; pass the --state of the node that should leave", dir, err)
	}
	sd := stateDir{dir: dir}
	var node nodeState
	ok, err := sd.loadJSON(fileNode, &node)
	if err != nil {
		return LeaveResult{}, err
	}
	if !ok || node.ID == 0 {
		return LeaveResult{}, fmt.Errorf("no node has joined with --state %s; nothing to leave", dir)
	}
	cc := newControlClient(node.URL, node.Fingerprint)
	cc.nodeID, cc.secret = node.ID, node.Secret
	res, err := tellLeave(ctx, cc, node, force)
	if err != nil {
		return res, err
	}
	if err := removeNodeState(sd); err != nil {
		return res, err
	}
	os.Remove(dir)
	return res, nil
}

// tellLeave asks the coordinator to delete node. A coordinator that no
// longer knows the node is as good as one that deleted it.
func tellLeave(ctx context.Context, cc *controlClient, node nodeState, force bool) (LeaveResult, error) {
	res := LeaveResult{Name: node.Name}
	err := cc.call(ctx, wire.PathLeave, wire.LeaveRequest{Version: wire.ProtocolVersion}, nil)
	var ae *apiError
	switch {
	case err == nil:
	case errors.As(err, &ae) && (ae.Code == wire.ErrCodeNodeRemoved || ae.Code == wire.ErrCodeUnauthorized):
	case force:
		res.Note = fmt.Sprintf("the coordinator %s could not be told (%v): remove the node there with `meshlink nodes remove %s`", node.URL, err, node.Name)
	default:
		return res, fmt.Errorf("leave: %w; the node is still in the mesh and its state is kept: retry once the coordinator is reachable, or pass --force to delete this site's state anyway", err)
	}
	return res, nil
}

// removeNodeState deletes what makes the state directory a node: its key,
// credentials, exports and cached network map.
func removeNodeState(sd stateDir) error {
	var errs []error
	for _, f := range []string{fileNode, fileKey, fileServices, fileNetmap} {
		if err := os.Remove(sd.path(f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("agent: left the mesh, but could not delete the state: %w; delete %s by hand", err, sd.dir)
	}
	return nil
}

// runtimeExports are the exports to save: those set at runtime, not the
// ones Config.Expose gives at every start.
func (a *Agent) runtimeExports(exports []Export) []Export {
	out := []Export{}
	for _, e := range exports {
		if !a.fromConfig[e.Name] && !a.fromFile[e.Name] {
			out = append(out, e)
		}
	}
	return out
}
