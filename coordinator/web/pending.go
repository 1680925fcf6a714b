package web

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

const (
	pendingTTL   = 15 * time.Minute
	maxPending   = 1000 // in all
	maxPendingIP = 20   // from one source address
)

// ErrTooManyPending is returned by StartPending when the console holds as
// many waiting registrations as it allows.
var ErrTooManyPending = errors.New("web: too many registrations are waiting for approval; try again later")

// PendingRequest is an agent asking to join without a token.
type PendingRequest struct {
	Name       string
	Hostname   string
	Key        key.Public
	ListenPort uint16
	Endpoints  []netip.AddrPort
	RemoteIP   string
	// KeyProven says the agent proved it holds Key's private key when it
	// asked (wire.RegisterRequest.KeyProof): without it no approval can
	// renew an existing node.
	KeyProven bool
}

// Approved is a pending request a person approved: they own the node.
type Approved struct {
	PendingRequest
	By      string // the approver's username
	ByID    int64
	ByAdmin bool // may renew a node of the same name and key that another user owns
}

type pendingState int

const (
	waiting pendingState = iota
	approved
	denied
	failed
)

// pending is one registration waiting for a person. Only the hash of the
// poll id is kept; the code in the URL is a different, shorter secret that
// is only useful to someone logged in.
type pending struct {
	code     string
	pollHash string
	req      PendingRequest
	expires  time.Time
	done     chan struct{} // closed once decided

	// Set once, before done is closed.
	state    pendingState
	resp     wire.RegisterResponse
	decider  string
	failCode string
	failMsg  string
}

type pendingSet struct {
	mu     sync.Mutex // guards the maps
	byCode map[string]*pending
	byPoll map[string]*pending
}

func newPendingSet() *pendingSet {
	return &pendingSet{byCode: map[string]*pending{}, byPoll: map[string]*pending{}}
}

func pollHash(id string) string {
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:])
}

// codeAlphabet has no 0/O, 1/I/L: codes are read and typed by people.
const codeAlphabet = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"

func newCode() string {
	b := make([]byte, 8)
	rand.Read(b)
	var sb strings.Builder
	for i, x := range b {
		if i == 4 {
			sb.WriteByte('-')
		}
		sb.WriteByte(codeAlphabet[int(x)%len(codeAlphabet)])
	}
	return sb.String()
}

// sweep drops expired entries; called with mu held.
func (ps *pendingSet) sweep(now time.Time) {
	for k, p := range ps.byCode {
		if now.After(p.expires) {
			delete(ps.byCode, k)
			delete(ps.byPoll, p.pollHash)
		}
	}
}

func (ps *pendingSet) byCodeGet(code string, now time.Time) *pending {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p := ps.byCode[strings.ToUpper(code)]
	if p == nil || now.After(p.expires) {
		return nil
	}
	return p
}

// StartPending records a registration waiting for approval and returns
// what the agent is told: the page to open and the id to poll with.
func (c *Console) StartPending(req PendingRequest) (wire.RegisterPending, error) {
	now := c.now()
	ps := c.pending
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.sweep(now)
	fromIP := 0
	for _, p := range ps.byCode {
		if p.req.RemoteIP == req.RemoteIP {
			fromIP++
		}
	}
	if len(ps.byCode) >= maxPending || fromIP >= maxPendingIP {
		return wire.RegisterPending{}, ErrTooManyPending
	}
	pollID := randomString(32)
	p := &pending{code: newCode(), pollHash: pollHash(pollID), req: req, expires: now.Add(pendingTTL), done: make(chan struct{})}
	for ps.byCode[p.code] != nil {
		p.code = newCode()
	}
	ps.byCode[p.code] = p
	ps.byPoll[p.pollHash] = p
	c.log.Info("registration waiting for approval", "name", req.Name, "remote", req.RemoteIP, "key", req.Key.Fingerprint())
	return wire.RegisterPending{
		AuthURL: strings.TrimRight(c.cfg.URL(), "/") + "/approve/" + p.code,
		PollID:  pollID,
		Expires: p.expires,
	}, nil
}

// Poll waits (up to Config.PollWait, or until ctx ends) for a decision on
// the registration with pollID, and returns the HTTP status and JSON body
// to answer: 200 wire.RegisterResponse, 202 wire.RegisterPending, or an
// error status with a wire.Error.
func (c *Console) Poll(ctx context.Context, pollID string) (int, any) {
	ps := c.pending
	ps.mu.Lock()
	p := ps.byPoll[pollHash(pollID)]
	ps.mu.Unlock()
	if p == nil || c.now().After(p.expires) {
		return http.StatusForbidden, wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: "this login request is unknown or has expired; start the agent again to get a new login URL"}
	}
	t := time.NewTimer(c.cfg.PollWait)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
	case <-ctx.Done():
	}
	select {
	case <-p.done:
	default:
		if c.now().After(p.expires) {
			return http.StatusForbidden, wire.Error{Code: wire.ErrCodeUnauthorized,
				Message: "nobody approved this node in time; start the agent again to get a new login URL"}
		}
		return http.StatusAccepted, wire.RegisterPending{AuthURL: strings.TrimRight(c.cfg.URL(), "/") + "/approve/" + p.code, PollID: pollID, Expires: p.expires}
	}
	switch p.state {
	case approved:
		return http.StatusOK, p.resp
	case denied:
		return http.StatusForbidden, wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: fmt.Sprintf("%s denied this node in the console; ask them, or join with a token", p.decider)}
	default:
		return http.StatusConflict, wire.Error{Code: p.failCode, Message: p.failMsg}
	}
}

// decide approves or denies p as v. It returns an error message for the
// person when the registration cannot be made.
func (c *Console) decide(ctx context.Context, p *pending, v *viewer, approve bool) (string, error) {
	ps := c.pending
	ps.mu.Lock()
	defer ps.mu.Unlock()
	select {
	case <-p.done:
		return "This node was already decided on.", nil
	default:
	}
	p.decider = v.Username
	if !approve {
		p.state = denied
		close(p.done)
		c.log.Info("registration denied", "name", p.req.Name, "by", v.Username)
		c.Record(store.Event{Kind: store.EventDeny, Actor: v.Username, Node: p.req.Name, Message: "denied node " + p.req.Name + " from " + p.req.RemoteIP, OwnerID: v.ID})
		return "", nil
	}
	resp, err := c.mesh.RegisterNode(ctx, Approved{PendingRequest: p.req, By: v.Username, ByID: v.ID, ByAdmin: v.Admin})
	var refused *wire.Error
	switch {
	case err == nil:
	case errors.As(err, &refused):
		p.state, p.failCode, p.failMsg = failed, refused.Code, refused.Message
		close(p.done)
		switch refused.Code {
		case wire.ErrCodeNameInUse:
			return fmt.Sprintf("The name %q is taken by another node; the agent was told to choose another name.", p.req.Name), nil
		case wire.ErrCodeConflict:
			return "This node's key is already registered under another name.", nil
		}
		return "The node could not be registered; the agent was told: " + refused.Message, nil
	default:
		return "", err
	}
	p.state = approved
	p.resp = resp
	close(p.done)
	return "", nil
}
