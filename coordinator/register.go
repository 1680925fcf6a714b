package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// A node joins in one of two ways: with a join token (serveRegister), or
// without one, approved by a person in the console (registerInteractive
// starts it, web.Console decides, consoleMesh.RegisterNode carries the
// approval here). Both end in registerNode.

// nodeRegistration is a node asking to join: the store's Registration with
// either TokenID and TokenSecret or Approval set, and, for an approval, who
// approved it and where the node asked from (for the console's event log).
type nodeRegistration struct {
	store.Registration
	approver, remoteIP string
}

// registration checks what a register request says about the node and
// collects where the node may be reached; the caller adds the authority
// (a token or an approval).
func registration(r *http.Request, req wire.RegisterRequest) (store.Registration, *apiError) {
	name, e := validName("node", req.Name)
	if e != nil {
		return store.Registration{}, e
	}
	if e := validKey(req.NodeKey); e != nil {
		return store.Registration{}, e
	}
	hostname := req.Hostname
	if len(hostname) > 255 {
		hostname = hostname[:255]
	}
	return store.Registration{Name: name, Hostname: hostname, Key: req.NodeKey, ListenPort: req.ListenPort,
		Endpoints: endpoints(r, req.ListenPort, req.LocalEndpoints)}, nil
}

// registerNode is the one place a node joins the mesh, by token or by
// approval: it stores the node with a fresh secret (the store checks the
// token or the approval in the same transaction), turns the store's
// refusals into the answer the agent gets, commits the change and returns
// the agent's credentials. A conflict (409) is for the agent to fix; any
// other error is the coordinator's.
//
// Issue 8 (not fixed yet; behaviour kept as it was): a token registration
// that repeats an existing node's name and public key gets that node a
// fresh secret (store.RegisterNode, "the same node again") with any valid
// token of any owner, which then only spends a use, or with the node's own
// token even once it has expired or been used up; yet a public key proves
// nothing, every network map carries it. Approvals already require the
// node's owner or an admin. Who may renew a node is to be decided here,
// once for both paths, and handed to the store with the Registration.
func (s *Server) registerNode(ctx context.Context, reg nodeRegistration) (wire.RegisterResponse, *apiError) {
	secret := randomSecret(32)
	r := reg.Registration
	r.Now = time.Now()
	r.SecretHash = store.HashSecret(secret)
	res, err := s.store.RegisterNode(ctx, r)
	if e := registerRefusal(err, r); e != nil {
		return wire.RegisterResponse{}, e
	}
	if res.Replaced != 0 {
		s.log.Info("ephemeral node replaced", "node_id", res.Replaced, "name", r.Name)
	}
	c := change{log: "node registered", attrs: []any{"node_id", res.Node.ID, "name", r.Name, "existing", res.Existing}}
	switch {
	case r.Approval != nil:
		c.attrs = append(c.attrs, "approved_by", reg.approver)
		c.event = store.Event{Kind: store.EventApprove, Actor: reg.approver, Node: r.Name, OwnerID: r.Approval.OwnerID,
			Message: "approved node " + r.Name + " from " + reg.remoteIP}
	case !res.Existing:
		c.attrs = append(c.attrs, "token_id", r.TokenID)
		c.event = store.Event{Kind: store.EventJoin, Actor: "node " + r.Name, Node: r.Name, OwnerID: res.Node.OwnerID,
			Message: fmt.Sprintf("%s joined with token %s", r.Name, r.TokenID)}
	default:
		c.attrs = append(c.attrs, "token_id", r.TokenID)
	}
	s.commit(c)
	if res.Node.Ephemeral && !res.Existing {
		// Removed if it never connects, too.
		s.scheduleReap(res.Node.ID)
	}
	return wire.RegisterResponse{
		Node:       wireNode(res.Node, s.hub.online(res.Node.ID)),
		NodeSecret: secret,
		Domain:     s.cfg.Domain,
	}, nil
}

// registerRefusal is the answer to a registration the store refused, nil
// if it did not.
func registerRefusal(err error, r store.Registration) *apiError {
	if err == nil {
		return nil
	}
	if e, ok := tokenRefusal(err, "meshlink token create"); ok {
		return e
	}
	switch {
	case errors.Is(err, store.ErrNameInUse):
		// Whoever runs an agent with a token may also remove the old
		// node; an agent waiting for approval is told the one thing
		// its user can do alone.
		fix := "choose another --name, or remove the old node on the coordinator"
		if r.Approval != nil {
			fix = "start the agent with another --name"
		}
		return apiErr(http.StatusConflict, wire.ErrCodeNameInUse, "the name %q is taken by another node; %s", r.Name, fix)
	case errors.Is(err, store.ErrKeyInUse):
		return apiErr(http.StatusConflict, wire.ErrCodeConflict, "this node's key is already registered under another name; keep the old name or start with a fresh state directory")
	case errors.Is(err, context.Canceled):
		return apiErr(http.StatusServiceUnavailable, wire.ErrCodeInternal, "request canceled")
	default:
		return apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "register %q: %v", r.Name, err)
	}
}
