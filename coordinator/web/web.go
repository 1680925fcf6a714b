// Package web is the coordinator's browser side: the login page, the
// console (sites, services, the live graph, tokens, events, users), the
// approval of agents that joined without a token, and the live feed of
// agents' counters. Pages are server-rendered html/template; the CSS and the
// small vanilla script are embedded; nothing needs a Node build step.
//
// Authorisation, in one place (see view.go): admins see and manage
// everything. Members see and manage only their own nodes and tokens and
// their own events; they see every service's name, VIP and port (any node
// may consume any service), but providers, consumers and counters only of
// their own nodes, with a count of the providers they may not see.
package web

import (
	"context"
	"embed"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// TokenRequest asks the mesh for a join token owned by OwnerID.
type TokenRequest struct {
	OwnerID   int64
	Reusable  bool
	Ephemeral bool
	Expires   time.Duration // 0: never
	Tags      []string
	// KeyExpiry is the key lifetime of the nodes the token joins; 0 is
	// the coordinator's (which caps a longer one).
	KeyExpiry time.Duration
}

// Mesh is what the console needs from the coordinator.
type Mesh interface {
	// State returns every node (with its online state) and every service
	// with at least one provider. The slices are shared: read only.
	State(ctx context.Context) ([]wire.Node, []wire.Service, error)
	// Changed returns a channel closed at the next change of the mesh.
	Changed() <-chan struct{}
	// RemoveNode removes a node (its peers lose it) and then records ev
	// in the event log.
	RemoveNode(ctx context.Context, id wire.NodeID, ev store.Event) error
	// CreateToken mints a join token and returns its string.
	CreateToken(ctx context.Context, o TokenRequest) (string, error)
	// RegisterNode registers the node of an approved request, the same
	// way a join token registers one, and returns the agent's answer. A
	// refusal the agent must hear (the name or the key is taken) is a
	// *wire.Error; any other error is internal.
	RegisterNode(ctx context.Context, a Approved) (wire.RegisterResponse, error)
	// Relays returns the relays every network map lists now, in order of
	// preference: the embedded relay (unless disabled), then the
	// standalone relays online. A relay coming or going is a change of the
	// mesh (Changed).
	Relays(ctx context.Context) ([]RelayInfo, error)
	// RemoveUser removes account id with what it owned (its tokens are
	// revoked, its nodes removed); store.ErrLastAdmin keeps the last
	// admin. actor is who asked, for the event log.
	RemoveUser(ctx context.Context, id int64, actor string) (RemovedUser, error)
	policyMesh
}

// RemovedUser says what removing an account took with it.
type RemovedUser struct {
	Name          string
	TokensRevoked []string
	NodesRemoved  []string
}

// RelayInfo is one relay of the mesh. Everything in it is public: agents
// get the same in every network map.
type RelayInfo struct {
	Name string
	URL  string
	// Fingerprint is the SHA-256 of the relay's certificate, in hex.
	Fingerprint string
	// Key is the relay's public key.
	Key key.Public
	// Embedded is true for the coordinator's own relay.
	Embedded bool
	// Counters are the relay's live counters; nil when the coordinator
	// does not have them (a standalone relay).
	Counters *RelayCounters
}

// RelayCounters are a relay's counters since it started.
type RelayCounters struct {
	Clients        int // connected now
	Accepted       uint64
	PacketsRelayed uint64
	BytesRelayed   uint64
	Dropped        uint64
}

// Config configures a Console.
type Config struct {
	Store store.Store
	Mesh  Mesh
	// URL returns the coordinator's public base URL.
	URL func() string
	// Logger receives structured logs; nil discards.
	Logger *slog.Logger
	// PollWait is how long a registration poll is held; default 30s.
	PollWait time.Duration
	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// PasswordChanged, if set, is called after u replaced a password
	// that had to change (MustChangePassword is now false).
	PasswordChanged func(ctx context.Context, u store.User)
	// MembersCannotMintTokens leaves minting join tokens in the console to
	// admins (--members-can-mint-tokens=false).
	MembersCannotMintTokens bool
	// OIDC is who may sign in with the OIDC provider; the zero value
	// admits every identity as a member.
	OIDC OIDCPolicy
}

// OIDCPolicy restricts OIDC sign-in (--oidc-allowed-domains,
// --oidc-allowed-groups, --oidc-new-users). It is checked at every
// sign-in, not only the first, so narrowing it shuts out existing
// accounts too.
type OIDCPolicy struct {
	// AllowedDomains, if any, admit only identities whose verified email
	// is at one of these domains (exactly; "example.com" does not admit
	// "sub.example.com").
	AllowedDomains []string
	// AllowedGroups, if any, admit only identities whose "groups" claim
	// holds one of them.
	AllowedGroups []string
	// NewUsersPending creates accounts at first sign-in as pending: they
	// cannot sign in until an admin approves them.
	NewUsersPending bool
}

// Console serves the web pages and holds the console's in-memory state:
// pending interactive registrations, the agents' latest counters and the
// login limiter. It starts no goroutines of its own.
type Console struct {
	cfg   Config
	log   *slog.Logger
	store store.Store
	mesh  Mesh
	now   func() time.Time
	pages map[string]*template.Template
	mux   *http.ServeMux

	limiter *throttle
	// compare checks a password against a bcrypt hash; tests count calls.
	compare func(hash, password []byte) error
	hashers chan struct{} // a slot per password comparison running
	pending *pendingSet
	stats   *statsSet
	live    *liveSet
	oidcP   atomic.Pointer[oidcHolder] // nil: no OIDC sign-in

	mu   sync.Mutex    // guards wake
	wake chan struct{} // closed and replaced when stats or events change
}

// New builds a Console.
func New(cfg Config) *Console {
	if cfg.PollWait <= 0 {
		cfg.PollWait = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Console{
		cfg:     cfg,
		log:     log.With("subsystem", "web"),
		store:   cfg.Store,
		mesh:    cfg.Mesh,
		now:     cfg.Now,
		pages:   parsePages(),
		limiter: newThrottle(loginKeysMax),
		compare: bcrypt.CompareHashAndPassword,
		hashers: make(chan struct{}, hashersMax),
		pending: newPendingSet(),
		stats:   newStatsSet(),
		live:    newLiveSet(),
		wake:    make(chan struct{}),
	}
	c.mux = c.routes()
	return c
}

func (c *Console) routes() *http.ServeMux {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	files := http.FileServerFS(static)
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		files.ServeHTTP(w, r)
	})))
	mux.HandleFunc("GET /{$}", c.serveLoginPage)
	mux.HandleFunc("POST /login", c.serveLogin)
	mux.HandleFunc("POST /logout", c.serveLogout)
	mux.Handle("GET "+passwordPath, c.page(c.servePasswordPage))
	mux.Handle("POST "+passwordPath, c.action(c.serveSetPassword))
	mux.HandleFunc("GET /login/oidc", c.serveOIDCBegin)
	mux.HandleFunc("GET /login/oidc/callback", c.serveOIDCCallback)
	mux.Handle("GET /console", c.page(c.serveOverview))
	mux.Handle("GET /console/graph", c.page(c.serveGraph))
	mux.Handle("GET /console/services", c.page(c.serveServices))
	mux.Handle("GET /console/tokens", c.page(c.serveTokens))
	mux.Handle("POST /console/tokens", c.action(c.serveMintToken))
	mux.Handle("POST /console/tokens/{id}/revoke", c.action(c.serveRevokeToken))
	mux.Handle("POST /console/nodes/{id}/remove", c.action(c.serveRemoveNode))
	mux.Handle("GET /console/log", c.page(c.serveEventLog))
	mux.Handle("GET /console/policy", c.page(c.servePolicy))
	mux.Handle("POST /console/policy", c.action(c.serveSetPolicy))
	mux.Handle("GET /console/users", c.page(c.serveUsers))
	mux.Handle("POST /console/users", c.action(c.serveCreateUser))
	mux.Handle("POST /console/users/{id}/approve", c.action(c.serveApproveUser))
	mux.Handle("POST /console/users/{id}/remove", c.action(c.serveRemoveUser))
	mux.Handle("GET /console/events", c.page(c.serveLive))
	mux.Handle("GET /console/api/snapshot", c.page(c.serveSnapshot))
	mux.Handle("GET /approve/{code}", c.page(c.serveApprovePage))
	mux.Handle("POST /approve/{code}", c.action(c.serveApprove))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		c.renderMessage(w, r, nil, http.StatusNotFound, "Not found", "There is no page at this address.")
	})
	return mux
}

// ServeHTTP serves every console path. Every answer carries the security
// headers: the pages need nothing from elsewhere, run no inline script and
// may not be framed.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	c.mux.ServeHTTP(w, r)
}

// bump wakes the live feeds: counters or events changed (the mesh itself
// has its own signal, Mesh.Changed).
func (c *Console) bump() {
	c.mu.Lock()
	close(c.wake)
	c.wake = make(chan struct{})
	c.mu.Unlock()
}

func (c *Console) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wake
}

// Record appends an event to the log. It never fails the caller: the log
// is for people, and an error is logged instead. A store that writes the
// log behind (store.EventQueuer) takes it without waiting: a full queue
// drops it and counts it, so that a burst of joins never waits for the log.
func (c *Console) Record(e store.Event) {
	if e.At.IsZero() {
		e.At = c.now()
	}
	if q, ok := c.store.(store.EventQueuer); ok {
		if !q.QueueEvent(e) {
			c.log.Debug("record event: queue full, dropped", "kind", e.Kind)
		}
		c.bump()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.store.AddEvent(ctx, e); err != nil {
		c.log.Warn("record event", "kind", e.Kind, "err", err)
		return
	}
	c.bump()
}
