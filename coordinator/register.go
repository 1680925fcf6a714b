package coordinator

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
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

// registration checks what a register request says about the node, its key
// proof if it carries one, and collects where the node may be reached; the
// caller adds the authority (a token or an approval).
func (s *Server) registration(r *http.Request, req wire.RegisterRequest) (store.Registration, *apiError) {
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
	proven := false
	if req.KeyProof != "" {
		if err := s.checkKeyProof(req.KeyProof, req.NodeKey, name); err != nil {
			return store.Registration{}, apiErr(http.StatusUnauthorized, wire.ErrCodeUnauthorized, "the node key proof does not verify: %v", err)
		}
		proven = true
	}
	return store.Registration{Name: name, Hostname: hostname, Key: req.NodeKey, ListenPort: req.ListenPort,
		Endpoints: s.endpoints(r, req.ListenPort, req.LocalEndpoints), KeyProven: proven}, nil
}

// checkKeyProof opens a wire.RegisterRequest.KeyProof: sealed from node's
// key to the coordinator's, for this name, recently.
func (s *Server) checkKeyProof(proof string, node key.Public, name string) error {
	msg, err := s.openProof(proof, node)
	if err != nil {
		return err
	}
	return wire.CheckKeyProofMessage(msg, name, time.Now())
}

// openProof opens a base64 sealed box from one node key to the
// coordinator's.
func (s *Server) openProof(proof string, from key.Public) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(proof)
	if err != nil || len(b) > 512 {
		return nil, errors.New("not base64 of a sealed box")
	}
	msg, ok := s.serverKey.OpenFrom(from, b)
	if !ok {
		return nil, errors.New("it was not sealed by that key to this coordinator's")
	}
	return msg, nil
}

// checkRekey authorises a key change on the map stream
// (wire.MapRequest.OldKeyProof and NewKeyProof): the node secret got the
// caller this far, but it is a bearer credential, so the change also needs
// the current key's holder to consent and the new key's holder to exist.
func (s *Server) checkRekey(node store.Node, req wire.MapRequest) *apiError {
	if req.OldKeyProof == "" || req.NewKeyProof == "" {
		return apiErr(http.StatusForbidden, wire.ErrCodeUnauthorized,
			"changing node %q's key needs proofs from both the current and the new key (old_key_proof, new_key_proof); the node secret alone is not enough: rotate with `meshlink rotate-key` on the node, or upgrade its agent", node.Name)
	}
	now := time.Now()
	for _, p := range []struct {
		which, proof string
		from         key.Public
	}{{"current", req.OldKeyProof, node.Key}, {"new", req.NewKeyProof, req.NodeKey}} {
		msg, err := s.openProof(p.proof, p.from)
		if err == nil {
			err = wire.CheckRekeyProofMessage(msg, node.Name, node.Key, req.NodeKey, now)
		}
		if err != nil {
			return apiErr(http.StatusForbidden, wire.ErrCodeUnauthorized, "changing node %q's key: the %s key's proof does not verify: %v", node.Name, p.which, err)
		}
	}
	return nil
}

// serveServerKey answers the coordinator's key, to which agents seal their
// key proofs; no credentials: it is public, and TLS vouches for it.
func (s *Server) serveServerKey(w http.ResponseWriter, r *http.Request) *apiError {
	var req wire.ServerKeyRequest
	if e := decodeVersioned(w, r, &req, &req.Version, "server key"); e != nil {
		return e
	}
	writeJSON(w, http.StatusOK, wire.ServerKey{Key: s.relayPub})
	return nil
}

// registerNode is the one place a node joins the mesh, by token or by
// approval: it stores the node with a fresh secret (the store checks the
// token or the approval in the same transaction), turns the store's
// refusals into the answer the agent gets, commits the change and returns
// the agent's credentials. A conflict (409) is for the agent to fix; any
// other error is the coordinator's.
//
// Renewing an existing node (the same name and key: its agent lost its
// state, or the answer to an earlier attempt) is decided by the store's
// mayRenew: the registrant proved it holds the node's private key
// (KeyProven, checked in registration), and the token is the owner's and
// valid, or the approver owns the node or is an admin. Each renewal is an
// event with the address it came from.
func (s *Server) registerNode(ctx context.Context, reg nodeRegistration) (wire.RegisterResponse, *apiError) {
	secret := randomSecret(32)
	r := reg.Registration
	r.Now = time.Now()
	r.SecretHash = store.HashSecret(secret)
	r.KeyLifetime = s.keyLifetime(0)
	res, err := s.store.RegisterNode(ctx, r)
	if e := registerRefusal(err, r); e != nil {
		return wire.RegisterResponse{}, e
	}
	if res.Replaced != 0 {
		s.log.Info("ephemeral node replaced", "node_id", res.Replaced, "name", r.Name)
	}
	c := change{lazy: true, log: "node registered", attrs: []any{"node_id", res.Node.ID, "name", r.Name, "existing", res.Existing}}
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
		c.attrs = append(c.attrs, "token_id", r.TokenID, "remote", reg.remoteIP)
		c.event = store.Event{Kind: store.EventRenew, Actor: "node " + r.Name, Node: r.Name, OwnerID: res.Node.OwnerID,
			Message: fmt.Sprintf("%s proved its key and renewed its secret with token %s from %s", r.Name, r.TokenID, reg.remoteIP)}
	}
	s.commit(c)
	s.wakeExpiryFor(res.Node.KeyExpiry)
	if res.Node.Ephemeral && !res.Existing {
		// Removed if it never connects, too.
		s.scheduleReap(res.Node.ID, res.Node.LastSeen)
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
	case errors.Is(err, store.ErrKeyUnproven):
		return apiErr(http.StatusConflict, wire.ErrCodeNameInUse, "the node %q already exists with this key; renewing it needs proof of its private key, which this agent did not send: upgrade meshlink, or join under another --name", r.Name)
	case errors.Is(err, store.ErrKeyInUse):
		return apiErr(http.StatusConflict, wire.ErrCodeConflict, "this node's key is already registered under another name; keep the old name or start with a fresh state directory")
	case errors.Is(err, store.ErrExhausted):
		return apiErr(http.StatusServiceUnavailable, wire.ErrCodeConflict, "no node address is free in %s (removed nodes' addresses are held for --node-address-quarantine); remove unused nodes, or retry once the quarantine has passed", wire.NodePrefix4)
	case errors.Is(err, context.Canceled):
		return apiErr(http.StatusServiceUnavailable, wire.ErrCodeInternal, "request canceled")
	default:
		return apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "register %q: %v", r.Name, err)
	}
}
