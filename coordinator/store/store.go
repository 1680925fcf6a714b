// Package store holds the coordinator's durable state: users, join tokens,
// nodes, services and their providers. Store is the contract; SQLite (the
// embedded default) and Postgres (one database several coordinators share)
// implement it with the same queries (sql.go).
package store

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// Sentinel errors. Implementations wrap them so callers can errors.Is them.
var (
	ErrNotFound     = errors.New("store: not found")
	ErrTokenInvalid = errors.New("store: token unknown or secret wrong")
	ErrTokenExpired = errors.New("store: token expired")
	ErrTokenUsed    = errors.New("store: token already used")
	ErrTokenRevoked = errors.New("store: token revoked")
	ErrNameInUse    = errors.New("store: name in use by another node")
	ErrKeyInUse     = errors.New("store: key registered by another node")
	// ErrKeyUnproven refuses to renew a node for a registrant that did not
	// prove it holds the node's private key.
	ErrKeyUnproven = errors.New("store: renewing a node needs proof of its private key")
	ErrExhausted   = errors.New("store: address space exhausted")
	ErrExists      = errors.New("store: already exists")
	// ErrTokenKind: a relay token used to join a node, or a node token
	// used to register a relay.
	ErrTokenKind = errors.New("store: token is of the wrong kind")
	// ErrLastAdmin refuses to remove the only admin account: nobody could
	// manage users, approve nodes or mint tokens for others any more.
	ErrLastAdmin = errors.New("store: the last admin cannot be removed")
)

// User is a local account.
type User struct {
	ID           int64
	Username     string
	PasswordHash string
	Admin        bool
	Created      time.Time
	// MustChangePassword: the password was chosen by someone else (the
	// first admin's at first start, a member's by an admin); the console
	// shows nothing but "choose a new password" until it is replaced.
	MustChangePassword bool
	// Pending: created by an OIDC sign-in under --oidc-new-users=pending;
	// it cannot sign in until an admin approves it (ApproveUser).
	Pending bool
}

// Token is a join token as stored: only the SHA-256 of its secret is kept.
type Token struct {
	ID         string
	SecretHash []byte
	Reusable   bool
	Ephemeral  bool
	Tags       []string
	Expires    time.Time // zero: never
	Uses       int
	Revoked    bool
	Created    time.Time
	// OwnerID is the user who minted the token; nodes it creates belong to
	// them. 0 means no owner (rows older than ownership): admins only.
	OwnerID int64
	// Relay marks a token that registers a standalone relay, not a node.
	Relay bool
	// KeyExpiry is the key lifetime of the nodes the token joins, when
	// shorter than the coordinator's (KeyLifetime); 0: the coordinator's.
	KeyExpiry time.Duration
}

// Check validates t for a new registration at now with the given secret.
func (t Token) Check(secret string, now time.Time) error {
	if !HashMatches(t.SecretHash, secret) {
		return ErrTokenInvalid
	}
	if t.Revoked {
		return ErrTokenRevoked
	}
	if !t.Expires.IsZero() && !now.Before(t.Expires) {
		return ErrTokenExpired
	}
	if !t.Reusable && t.Uses > 0 {
		return ErrTokenUsed
	}
	return nil
}

// Node is a registered node.
type Node struct {
	ID         wire.NodeID
	Name       string
	Hostname   string
	Key        key.Public
	IPv4       netip.Addr
	IPv6       netip.Addr
	SecretHash []byte
	TokenID    string // the token that created it
	Tags       []string
	Ephemeral  bool
	Created    time.Time
	LastSeen   time.Time
	ListenPort uint16
	Endpoints  []netip.AddrPort
	// OwnerID is the user the node belongs to: the owner of the token that
	// created it, or the person who approved it. 0: admins only.
	OwnerID int64
	// KeyExpiry is when the node's key stops being accepted; zero: never.
	// Registration and every rekey set it to now plus the node's lifetime
	// (KeyLifetime).
	KeyExpiry time.Time
	// KeyLifetime is the key lifetime the node's token set (0: the
	// coordinator's); the coordinator's caps it.
	KeyLifetime time.Duration
	// Region is the label the node joined with ("" if none).
	Region string
	// Heartbeat is when a coordinator sharing the store last confirmed
	// the node's map stream open (SetHeartbeat); zero: none is.
	Heartbeat time.Time
}

// KeyExpired reports whether n's key has expired at now.
func (n Node) KeyExpired(now time.Time) bool {
	return !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry)
}

// KeyLifetime is the lifetime of a node's key: the coordinator's
// (0: never) capped by the node's own from its token (0: none); 0 is never.
func KeyLifetime(coordinator, node time.Duration) time.Duration {
	switch {
	case node <= 0:
		return max(coordinator, 0)
	case coordinator <= 0:
		return node
	default:
		return min(coordinator, node)
	}
}

// Service is a named service. Its row and VIP outlive its providers for a
// grace period (DeleteIdleServices) so that the VIP stays stable across
// unexpose/expose and restarts.
type Service struct {
	Name    string
	VIP     netip.Addr
	Port    uint16
	Created time.Time
	// OwnerID is the user who owns the name: the owner of its first
	// provider. Only nodes of that user may provide it.
	OwnerID int64
}

// NotOwnerError refuses a node providing a service another user owns.
type NotOwnerError struct {
	Service string
	OwnerID int64
}

func (e *NotOwnerError) Error() string {
	return fmt.Sprintf("store: service %q is owned by user %d", e.Service, e.OwnerID)
}

// Provider is one node's export of a service.
type Provider struct {
	Service string
	NodeID  wire.NodeID
	Port    uint16
	Traffic
}

// Traffic is how consumers choose a provider (wire.Provider's fields of
// the same names), as its node announced it.
type Traffic struct {
	Priority int
	Weight   int
	Version  string
	// Protocol is what the provider carries (wire.Provider.Protocol;
	// "" is TCP), UDPIdle its UDP flows' idle timeout in seconds.
	Protocol string
	UDPIdle  int
	// AgentProtocol is the wire protocol version of the agent that
	// announced the export (0: announced before the coordinator kept it).
	// Request-level rules need a provider of version 13 or later.
	AgentProtocol int
}

// Registration describes a node joining, with a token or by approval.
type Registration struct {
	TokenID     string
	TokenSecret string
	Now         time.Time
	Name        string
	Hostname    string
	Key         key.Public
	ListenPort  uint16
	Endpoints   []netip.AddrPort
	SecretHash  []byte // hash of the new node secret
	// CanReplace is asked, inside the transaction, whether an existing node
	// holding Name with a different key may be removed to make room (the
	// coordinator answers yes for an ephemeral node that is offline). Nil
	// means never.
	CanReplace func(existing Node) bool
	// Approval, when set, replaces the token: a logged-in person approved
	// the node interactively. TokenID and TokenSecret are ignored.
	Approval *Approval
	// KeyLifetime is the coordinator's key lifetime (0: never): a new
	// node's key expires at Now plus it, or plus its token's shorter one.
	KeyLifetime time.Duration
	// KeyProven says the registrant proved it holds Key's private key.
	// Renewing an existing node (same name and key) needs it: the public
	// key is in every network map, so by itself it proves nothing.
	KeyProven bool
}

// Approval is the authority for a registration without a token.
type Approval struct {
	// OwnerID is the approving user, who owns the new node.
	OwnerID int64
	// Admin lets the approver renew (a new secret, same name and key) a
	// node that another user owns; members may only renew their own.
	Admin bool
}

// Relay is a registered standalone relay.
type Relay struct {
	ID          int64
	Name        string
	URL         string
	Fingerprint string
	Key         key.Public // its Curve25519 public key
	SecretHash  []byte
	TokenID     string
	Created     time.Time
}

// RelayRegistration describes a relay registering with a relay token.
type RelayRegistration struct {
	TokenID, TokenSecret string
	Now                  time.Time
	Name, URL            string
	Fingerprint          string
	Key                  key.Public
	SecretHash           []byte // hash of the new relay secret
}

// Session is a console login. Only the SHA-256 of its id is stored.
type Session struct {
	IDHash  []byte
	UserID  int64
	CSRF    string // per-session token echoed in every form
	Created time.Time
	// Expires moves forward while the session is used (idle timeout).
	Expires time.Time
}

// EventKind says what an Event records. The values are stored and shown
// in the console (and name its CSS classes): never change one.
type EventKind string

// The kinds of Event.
const (
	EventJoin            EventKind = "join"            // a node joined with a token
	EventLeave           EventKind = "leave"           // a node left, or an ephemeral one was reaped
	EventRemove          EventKind = "remove"          // a person removed a node
	EventExpose          EventKind = "expose"          // a node began providing a service
	EventExposeRefused   EventKind = "expose_refused"  // a node tried to provide a service another user owns
	EventUnexpose        EventKind = "unexpose"        // a node stopped providing a service
	EventRegisterFailed  EventKind = "register_failed" // a registration was refused: bad token, name or key taken
	EventApprove         EventKind = "approve"         // a person approved a node that joined without a token
	EventRenew           EventKind = "renew"           // a node proved its key and got a new secret with a token
	EventDeny            EventKind = "deny"            // a person denied one
	EventLogin           EventKind = "login"
	EventLoginFailed     EventKind = "login_failed"
	EventTokenCreated    EventKind = "token_created"
	EventTokenRevoked    EventKind = "token_revoked"
	EventUserCreated     EventKind = "user_created"
	EventPasswordChanged EventKind = "password_changed"
	EventUserRemoved     EventKind = "user_removed"
	EventUserApproved    EventKind = "user_approved"
	EventRelay           EventKind = "relay"         // a standalone relay registered or was removed
	EventRekey           EventKind = "rekey"         // a node proved its old and new key and rotated
	EventRekeyRefused    EventKind = "rekey_refused" // a key change without valid proofs of both keys
	EventPolicy          EventKind = "policy"        // a person set the access policy
	EventTokenRefused    EventKind = "token_refused" // a token with tags its minter may not give
	EventDenied          EventKind = "denied"        // a provider refused connections by policy (coalesced per minute)
	EventKeyExpired      EventKind = "key_expired"   // a node's key expired (or an admin expired it): its peers dropped it
)

// StoredPolicy is the access policy's text as set, with when and by whom.
type StoredPolicy struct {
	Text      string
	Updated   time.Time
	UpdatedBy string
}

// Event is one entry of the event log shown in the console.
type Event struct {
	ID   int64
	At   time.Time
	Kind EventKind
	// Actor is who did it: a username, "node NAME", "relay NAME", "admin"
	// or "admin socket" (the CLI), "coordinator" (itself), or the address
	// of an unauthenticated caller.
	Actor   string
	Node    string // node name concerned, if any
	Message string
	// OwnerID is the user the event concerns (who may see it besides the
	// admins); 0 means admins only.
	OwnerID int64
}

// EventClass sorts events for retention: each class keeps its newest
// MaxEvents, so that a flood of one class (refusals anyone may cause, or a
// member's nodes joining and leaving) cannot push another out of the log.
// The values are stored: never change one.
type EventClass int

// The classes of Event.
const (
	// ClassSecurity: sign-ins, approvals and denials, renewals, tokens,
	// users, relays, removals, and any kind not listed below.
	ClassSecurity EventClass = 0
	// ClassActivity: nodes joining and leaving, services coming and going.
	ClassActivity EventClass = 1
	// ClassFailure: refusals of unauthenticated or hostile callers.
	ClassFailure EventClass = 2
	// ClassDenied: connections providers refused by policy, which any
	// member's node can cause: kept apart so that they cannot push the
	// sign-in failures out of the log.
	ClassDenied EventClass = 3
)

// eventClasses is how many classes there are.
const eventClasses = 4

// Class is the retention class of events of kind k.
func (k EventKind) Class() EventClass {
	switch k {
	case EventRegisterFailed, EventLoginFailed, EventExposeRefused, EventRekeyRefused, EventTokenRefused:
		return ClassFailure
	case EventDenied:
		return ClassDenied
	case EventJoin, EventLeave, EventExpose, EventUnexpose:
		return ClassActivity
	}
	return ClassSecurity
}

// MaxEvents bounds each class of the event log (EventClass); older entries
// of the class are dropped.
const MaxEvents = 10000

// RegisterResult says what RegisterNode did.
type RegisterResult struct {
	Node Node
	// Existing is true when the same name and key were already registered;
	// the node kept its ID and addresses and got a new secret.
	Existing bool
	// Replaced is the ID of a node removed to free the name, or 0.
	Replaced wire.NodeID
}

// Store is the coordinator's persistence. All methods are safe for
// concurrent use. Methods that look a single row up return an error wrapping
// ErrNotFound when it does not exist.
type Store interface {
	CreateUser(ctx context.Context, u User) (User, error)
	GetUser(ctx context.Context, username string) (User, error)
	CountUsers(ctx context.Context) (int, error)
	GetUserByID(ctx context.Context, id int64) (User, error)
	ListUsers(ctx context.Context) ([]User, error)
	// SetPassword replaces the password hash of user id, clears
	// MustChangePassword and ends every session of the user but the one
	// whose id hash is keep (the session that changed it; nil: none).
	SetPassword(ctx context.Context, id int64, hash string, keep []byte) error
	// ApproveUser clears Pending: the user may sign in from now on.
	ApproveUser(ctx context.Context, id int64) error
	// DeleteUser removes user id in one transaction: its tokens are
	// revoked, its sessions end, and services it owned become unowned
	// (the next owner to provide one takes it). Its nodes stay and keep
	// OwnerID id, for the caller to remove. Removing the last admin is
	// ErrLastAdmin. It returns the ids of the tokens it revoked.
	DeleteUser(ctx context.Context, id int64) (revoked []string, err error)

	// CreateSession stores a new console session.
	CreateSession(ctx context.Context, s Session) error
	// GetSession returns the unexpired session with the id hash; ErrNotFound
	// if none.
	GetSession(ctx context.Context, idHash []byte, now time.Time) (Session, error)
	// TouchSession moves the session's expiry.
	TouchSession(ctx context.Context, idHash []byte, expires time.Time) error
	DeleteSession(ctx context.Context, idHash []byte) error
	// DeleteExpiredSessions removes sessions expired before now.
	DeleteExpiredSessions(ctx context.Context, now time.Time) error

	// AddEvent appends to the event log, keeping only the newest MaxEvents
	// of the event's class.
	AddEvent(ctx context.Context, e Event) error
	// ListEvents returns up to limit events, newest first; ownerID > 0
	// restricts them to the events of that user.
	ListEvents(ctx context.Context, ownerID int64, limit int) ([]Event, error)

	CreateToken(ctx context.Context, t Token) error
	GetToken(ctx context.Context, id string) (Token, error)
	ListTokens(ctx context.Context) ([]Token, error)
	RevokeToken(ctx context.Context, id string) error

	// RegisterNode validates the token (or the Approval) and creates the
	// node in one transaction, consuming one use of the token: a
	// single-use token creates at most one node, however many
	// registrations race. Re-registering the same name and key renews the
	// node (a new secret, the same ID and addresses) only for a registrant
	// that proved it holds the key (KeyProven) and with the owner's
	// authority: the token that created it, unexpired (its use was this
	// node's), another valid token of the same owner (one use), or an
	// approval by the owner or an admin; else ErrKeyUnproven or
	// ErrNameInUse.
	RegisterNode(ctx context.Context, r Registration) (RegisterResult, error)
	GetNode(ctx context.Context, id wire.NodeID) (Node, error)
	ListNodes(ctx context.Context) ([]Node, error)
	// UpdateNodeNetwork sets key (if non-empty), listen port and endpoints;
	// a key another node holds is ErrKeyInUse.
	UpdateNodeNetwork(ctx context.Context, id wire.NodeID, k key.Public, listenPort uint16, eps []netip.AddrPort) error
	// UpdateNodeKey sets the node's key and its expiry (zero: never) at
	// once, for a rotation; a key another node holds is ErrKeyInUse.
	UpdateNodeKey(ctx context.Context, id wire.NodeID, k key.Public, expiry time.Time) error
	// SetNodeKeyExpiry sets when the node's key expires (zero: never).
	SetNodeKeyExpiry(ctx context.Context, id wire.NodeID, expiry time.Time) error
	SetLastSeen(ctx context.Context, id wire.NodeID, t time.Time) error
	// SetHeartbeat records that the node's map stream is open at t (zero:
	// it closed), for the other coordinators sharing the store.
	SetHeartbeat(ctx context.Context, id wire.NodeID, t time.Time) error
	// DeleteNode removes the node and its providers, leaving a tombstone so
	// that its later calls can be told it was removed; the tombstone holds
	// the node's addresses through their quarantine, after which a new
	// node may get them once the pool has no never-used address left.
	DeleteNode(ctx context.Context, id wire.NodeID) error
	// RemovedNodeSecretHash returns the secret hash of a removed node.
	RemovedNodeSecretHash(ctx context.Context, id wire.NodeID) ([]byte, error)

	// ExposeService creates the service (allocating its VIP, Port = port,
	// owned by the node's owner) if new, and upserts the provider (nodeID,
	// port). A service another user owns is a *NotOwnerError; one more
	// service than the store's per-node bound is a *QuotaError. A new
	// service gets the lowest free VIP.
	ExposeService(ctx context.Context, name string, nodeID wire.NodeID, port uint16) (Service, error)
	// ExposeServiceAs is ExposeService; policyOwned skips the first
	// provider's ownership (the access policy lists who may provide the
	// name, and the caller checked it).
	ExposeServiceAs(ctx context.Context, name string, nodeID wire.NodeID, port uint16, policyOwned bool) (Service, error)
	// GetPolicy returns the access policy as last set; ErrNotFound if it
	// never was (the default applies).
	GetPolicy(ctx context.Context) (StoredPolicy, error)
	// SetPolicy replaces the access policy.
	SetPolicy(ctx context.Context, p StoredPolicy) error
	// UnexposeService removes the provider; ErrNotFound if it was not one.
	UnexposeService(ctx context.Context, name string, nodeID wire.NodeID) error
	// DeleteIdleServices deletes the services that have had no provider
	// for grace or longer, freeing their VIPs for later services, and
	// returns their names.
	DeleteIdleServices(ctx context.Context, grace time.Duration) ([]string, error)
	ListServices(ctx context.Context) ([]Service, error)
	ListProviders(ctx context.Context) ([]Provider, error)
	// SetProviderTraffic sets a provider's priority, weight and version;
	// ErrNotFound if the node does not provide the service.
	SetProviderTraffic(ctx context.Context, service string, nodeID wire.NodeID, t Traffic) error
	// SetNodeRegion sets the node's region label.
	SetNodeRegion(ctx context.Context, id wire.NodeID, region string) error

	// RegisterRelay validates a relay token and creates the relay (or, for
	// the same name and key, renews its secret) in one transaction,
	// consuming one use of the token like RegisterNode. A name held by
	// another key is ErrNameInUse; a node token is ErrTokenKind.
	RegisterRelay(ctx context.Context, r RelayRegistration) (Relay, error)
	// UpdateRelay sets what agents need to reach relay id.
	UpdateRelay(ctx context.Context, id int64, url, fingerprint string, k key.Public) error
	GetRelay(ctx context.Context, id int64) (Relay, error)
	ListRelays(ctx context.Context) ([]Relay, error)
	// DeleteRelay removes the relay of that name.
	DeleteRelay(ctx context.Context, name string) error

	Close() error
}

// HashSecret returns the SHA-256 of a secret as stored.
func HashSecret(secret string) []byte {
	s := sha256.Sum256([]byte(secret))
	return s[:]
}

// HashMatches compares a stored hash against a presented secret in constant time.
func HashMatches(hash []byte, secret string) bool {
	return len(hash) == sha256.Size && subtle.ConstantTimeCompare(hash, HashSecret(secret)) == 1
}

// NodeAddrs returns the mesh addresses of allocation index i (from 1).
func NodeAddrs(i int64) (v4, v6 netip.Addr, err error) {
	base := wire.NodePrefix4.Addr().As4()
	size := int64(1) << (32 - wire.NodePrefix4.Bits())
	if i < 1 || i >= size-1 {
		return v4, v6, ErrExhausted
	}
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(i)
	v4 = netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
	b6 := wire.NodePrefix6.Addr().As16()
	for k := 0; k < 8; k++ {
		b6[15-k] = byte(uint64(i) >> (8 * k))
	}
	return v4, netip.AddrFrom16(b6), nil
}

// ServiceVIP returns the VIP of allocation index i (from 0): addresses of
// wire.ServicePrefix in order from .1, skipping every .0 and .255 so that
// 127.100.X.Y is a clean loopback address.
func ServiceVIP(i int64) (netip.Addr, error) {
	if i < 0 {
		return netip.Addr{}, ErrExhausted
	}
	per := int64(254)
	third, fourth := i/per, i%per+1
	size := int64(1) << (32 - wire.ServicePrefix.Bits())
	if third >= size/256 {
		return netip.Addr{}, ErrExhausted
	}
	b := wire.ServicePrefix.Addr().As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n += uint32(third)<<8 | uint32(fourth)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}), nil
}
