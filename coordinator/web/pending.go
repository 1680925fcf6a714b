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

// Anyone who reaches the port can ask to join, so waiting requests are
// bounded per source network and in all, and one network's flood cannot
// keep another's request out: when the set is full, a request from a
// network holding fewer than the largest holder takes the place of that
// holder's oldest undecided request.
const (
	pendingTTL = 15 * time.Minute
	// unopenedTTL is the life of a request whose approval page no
	// signed-in person has opened; opening it extends it to pendingTTL.
	unopenedTTL     = 5 * time.Minute
	maxPending      = 1000 // in all
	maxPendingGroup = 5    // from one source network (pendingGroup)
)

// pendingGroup is the source network of a request: the /24 of an IPv4
// address, the /64 of an IPv6 one, which one party commonly holds whole.
func pendingGroup(remoteIP string) netip.Prefix {
	ip, err := netip.ParseAddr(remoteIP)
	if err != nil {
		return netip.Prefix{}
	}
	ip = ip.Unmap().WithZone("")
	bits := 24
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

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
	group    netip.Prefix
	created  time.Time
	done     chan struct{} // closed once decided

	// Guarded by pendingSet.mu.
	expires time.Time
	opened  bool // a signed-in person opened its approval page

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
	for _, p := range ps.byCode {
		if now.After(p.expires) {
			ps.remove(p)
		}
	}
}

// byCodeGet returns the request with code, unexpired, and its expiry. A
// signed-in person asking for it opens it.
func (ps *pendingSet) byCodeGet(code string, now time.Time) (*pending, time.Time) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p := ps.byCode[strings.ToUpper(code)]
	if p == nil || now.After(p.expires) {
		return nil, time.Time{}
	}
	if !p.opened {
		p.opened = true
		p.expires = p.created.Add(pendingTTL)
	}
	return p, p.expires
}

// expiry returns p's expiry.
func (ps *pendingSet) expiry(p *pending) time.Time {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return p.expires
}

// remove drops p; called with mu held.
func (ps *pendingSet) remove(p *pending) {
	delete(ps.byCode, p.code)
	delete(ps.byPoll, p.pollHash)
}

// makeRoom frees a place for a request from group in a full set, or says
// there is none: the group would then hold as many as the largest.
// Called with mu held.
func (ps *pendingSet) makeRoom(group netip.Prefix) bool {
	count := map[netip.Prefix]int{}
	for _, p := range ps.byCode {
		count[p.group]++
	}
	var victim *pending
	for _, p := range ps.byCode {
		select {
		case <-p.done:
			continue // decided: its agent is about to collect the answer
		default:
		}
		if count[p.group] <= count[group] {
			continue
		}
		if victim == nil || count[p.group] > count[victim.group] ||
			count[p.group] == count[victim.group] && p.created.Before(victim.created) {
			victim = p
		}
	}
	if victim == nil {
		return false
	}
	ps.remove(victim)
	return true
}

// StartPending records a registration waiting for approval and returns
// what the agent is told: the page to open and the id to poll with.
func (c *Console) StartPending(req PendingRequest) (wire.RegisterPending, error) {
	now := c.now()
	ps := c.pending
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.sweep(now)
	group := pendingGroup(req.RemoteIP)
	inGroup := 0
	for _, p := range ps.byCode {
		if p.group == group {
			inGroup++
		}
	}
	if inGroup >= maxPendingGroup || len(ps.byCode) >= maxPending && !ps.makeRoom(group) {
		return wire.RegisterPending{}, ErrTooManyPending
	}
	pollID := randomString(32)
	p := &pending{code: newCode(), pollHash: pollHash(pollID), req: req, group: group, created: now, expires: now.Add(unopenedTTL), done: make(chan struct{})}
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
	if p == nil || c.now().After(ps.expiry(p)) {
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
		exp := ps.expiry(p)
		if c.now().After(exp) {
			return http.StatusForbidden, wire.Error{Code: wire.ErrCodeUnauthorized,
				Message: "nobody approved this node in time; start the agent again to get a new login URL"}
		}
		ps.mu.Lock()
		gone := ps.byPoll[p.pollHash] != p
		ps.mu.Unlock()
		if gone {
			return http.StatusForbidden, wire.Error{Code: wire.ErrCodeUnauthorized,
				Message: "this login request was dropped to make room for others; start the agent again to get a new login URL"}
		}
		return http.StatusAccepted, wire.RegisterPending{AuthURL: strings.TrimRight(c.cfg.URL(), "/") + "/approve/" + p.code, PollID: pollID, Expires: exp}
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
