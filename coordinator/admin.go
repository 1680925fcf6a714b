package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/unixhttp"
	"github.com/meshlink/meshlink/wire"
)

// The admin API is plain HTTP on <DataDir>/admin.sock. The socket is 0600
// in a 0700 directory: whoever can open it owns the coordinator's data
// anyway, so file permissions are the authentication.
const (
	adminPathTokens   = "/admin/v1/tokens"
	adminPathNodes    = "/admin/v1/nodes"
	adminPathServices = "/admin/v1/services"
	adminPathRelays   = "/admin/v1/relays"
	adminPathUsers    = "/admin/v1/users"
	adminPathPolicy   = "/admin/v1/policy"
)

// UserInfo is an account as the admin socket lists it.
type UserInfo struct {
	Name  string `json:"name"`
	Admin bool   `json:"admin"`
	// MustChangePassword: the one-time password has not been replaced yet.
	MustChangePassword bool `json:"must_change_password"`
	// Pending: created by an OIDC sign-in, awaiting an admin's approval.
	Pending bool      `json:"pending,omitempty"`
	Created time.Time `json:"created"`
	// Nodes is how many nodes the user owns.
	Nodes int `json:"nodes"`
}

// NewUser is a user created on the admin socket, with the one-time
// password to hand over; it must be changed at first sign-in.
type NewUser struct {
	Name     string `json:"name"`
	Admin    bool   `json:"admin"`
	Password string `json:"password,omitempty"`
}

// RemovedUser says what removing a user took with it.
type RemovedUser struct {
	TokensRevoked []string `json:"tokens_revoked"`
	NodesRemoved  []string `json:"nodes_removed"`
}

type adminTokenResponse struct {
	Token string `json:"token"`
}

func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminPathTokens, func(w http.ResponseWriter, r *http.Request) {
		var o TokenOptions
		if e := decode(w, r, &o, "token create"); e != nil {
			writeError(w, e)
			return
		}
		if o.User != "" {
			u, err := s.userNamed(r.Context(), o.User)
			if errors.Is(err, store.ErrNotFound) {
				writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no user named %q; list them with `meshlink users list` or create one with `meshlink users add %s`", o.User, o.User))
				return
			} else if err != nil {
				writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
				return
			}
			o.Owner = u.ID
		}
		tok, err := s.CreateToken(r.Context(), o)
		if err != nil {
			writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, adminTokenResponse{Token: tok})
	})
	mux.HandleFunc("GET "+adminPathTokens, func(w http.ResponseWriter, r *http.Request) {
		toks, err := s.store.ListTokens(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		out := make([]wire.TokenInfo, 0, len(toks))
		for _, t := range toks {
			out = append(out, tokenInfo(t))
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("DELETE "+adminPathTokens+"/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := s.store.RevokeToken(r.Context(), id); errors.Is(err, store.ErrNotFound) {
			writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no token with id %q", id))
			return
		} else if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		s.log.Info("token revoked", "token_id", id)
		writeJSON(w, http.StatusOK, struct{}{})
	})
	mux.HandleFunc("GET "+adminPathNodes, func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.current(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		owners, err := s.nodeOwners(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		out := make([]NodeInfo, 0, len(snap.nodes))
		for _, n := range snap.nodes {
			ni := NodeInfo{Node: n, Owner: owners[n.ID]}
			if !n.KeyExpiry.IsZero() {
				exp := n.KeyExpiry
				ni.KeyExpiry = &exp
			}
			out = append(out, ni)
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET "+adminPathRelays, func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.current(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, append([]wire.Relay{}, snap.relays...))
	})
	mux.HandleFunc("DELETE "+adminPathRelays+"/{name}", func(w http.ResponseWriter, r *http.Request) {
		name := wire.NormalizeName(r.PathValue("name"))
		if err := s.removeRelay(r.Context(), name); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no relay named %q", name))
				return
			}
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	mux.HandleFunc("DELETE "+adminPathNodes+"/{name}", func(w http.ResponseWriter, r *http.Request) {
		name := wire.NormalizeName(r.PathValue("name"))
		snap, err := s.current(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		for _, n := range snap.nodes {
			if n.Name == name {
				if err := s.removeNode(r.Context(), n.ID, change{log: "node removed by admin", attrs: []any{"node_id", n.ID, "name", n.Name}}); err != nil && !errors.Is(err, store.ErrNotFound) {
					writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
					return
				}
				writeJSON(w, http.StatusOK, struct{}{})
				return
			}
		}
		writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no node named %q; list them with `meshlink nodes`", name))
	})
	mux.HandleFunc("POST "+adminPathNodes+"/{name}/expire", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		if err := s.ExpireNode(r.Context(), name, "admin socket"); errors.Is(err, store.ErrNotFound) {
			writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no node named %q; list them with `meshlink nodes`", wire.NormalizeName(name)))
			return
		} else if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	mux.HandleFunc("GET "+adminPathServices, func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.current(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, append([]wire.Service{}, snap.services...))
	})
	s.adminUsers(mux)
	s.adminPolicy(mux)
	return s.track(mux)
}

// adminUsers serves the accounts part of the admin API.
func (s *Server) adminUsers(mux *http.ServeMux) {
	mux.HandleFunc("POST "+adminPathUsers, func(w http.ResponseWriter, r *http.Request) {
		var nu NewUser
		if e := decode(w, r, &nu, "users add"); e != nil {
			writeError(w, e)
			return
		}
		name := wire.NormalizeName(nu.Name)
		if err := wire.ValidName(name); err != nil {
			writeError(w, apiErr(http.StatusBadRequest, wire.ErrCodeBadRequest, "user name %q: %v", nu.Name, err))
			return
		}
		u, pw, err := s.console.CreateUser(r.Context(), name, nu.Admin, "admin socket")
		if errors.Is(err, store.ErrExists) {
			writeError(w, apiErr(http.StatusConflict, wire.ErrCodeConflict, "there is already a user %q; see `meshlink users list`", name))
			return
		} else if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, NewUser{Name: u.Username, Admin: u.Admin, Password: pw})
	})
	mux.HandleFunc("GET "+adminPathUsers, func(w http.ResponseWriter, r *http.Request) {
		users, err := s.store.ListUsers(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		nodes, err := s.store.ListNodes(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		owned := map[int64]int{}
		for _, n := range nodes {
			owned[n.OwnerID]++
		}
		out := make([]UserInfo, 0, len(users))
		for _, u := range users {
			out = append(out, UserInfo{Name: u.Username, Admin: u.Admin, MustChangePassword: u.MustChangePassword, Pending: u.Pending, Created: u.Created, Nodes: owned[u.ID]})
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("POST "+adminPathUsers+"/{name}/approve", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		u, err := s.userNamed(r.Context(), name)
		if err == nil {
			_, err = s.console.ApproveUser(r.Context(), u.ID, "admin socket")
		}
		switch {
		case errors.Is(err, store.ErrNotFound):
			writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no user named %q; list them with `meshlink users list`", name))
		case err != nil:
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
		default:
			writeJSON(w, http.StatusOK, struct{}{})
		}
	})
	mux.HandleFunc("DELETE "+adminPathUsers+"/{name}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		res, err := s.removeUser(r.Context(), name, "admin socket")
		switch {
		case errors.Is(err, store.ErrNotFound):
			writeError(w, apiErr(http.StatusNotFound, wire.ErrCodeNotFound, "no user named %q; list them with `meshlink users list`", name))
		case errors.Is(err, store.ErrLastAdmin):
			writeError(w, apiErr(http.StatusConflict, wire.ErrCodeConflict, "%s is the last admin; make another admin first (`meshlink users add NAME --admin`), then remove %s", name, name))
		case err != nil:
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
		default:
			writeJSON(w, http.StatusOK, res)
		}
	})
}

// userNamed finds the account called name as typed (OIDC accounts,
// "oidc:ISSUER#SUBJECT", keep the provider's case), else as normalized.
func (s *Server) userNamed(ctx context.Context, name string) (store.User, error) {
	u, err := s.store.GetUser(ctx, name)
	if errors.Is(err, store.ErrNotFound) && wire.NormalizeName(name) != name {
		u, err = s.store.GetUser(ctx, wire.NormalizeName(name))
	}
	return u, err
}

// removeUser removes an account and cuts off what it owned: its tokens
// are revoked, its sessions end, and its nodes are removed (their peers
// lose them, the agents are told they were removed), since a departed
// user's machines must not stay in the mesh on their authority. Services
// it owned become unowned, for the next owner to provide.
func (s *Server) removeUser(ctx context.Context, name, actor string) (RemovedUser, error) {
	res := RemovedUser{TokensRevoked: []string{}, NodesRemoved: []string{}}
	u, err := s.userNamed(ctx, name)
	if err != nil {
		return res, err
	}
	name = u.Username
	revoked, err := s.store.DeleteUser(ctx, u.ID)
	if err != nil {
		return res, err
	}
	res.TokensRevoked = append(res.TokensRevoked, revoked...)
	s.log.Info("user removed", "user", name, "tokens_revoked", len(revoked))
	s.console.Record(store.Event{Kind: store.EventUserRemoved, Actor: actor, Message: fmt.Sprintf("removed user %s; revoked %d tokens", name, len(revoked))})
	// The user row is gone and its tokens revoked, so no new node can
	// join on its authority while these are removed.
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return res, err
	}
	for _, n := range nodes {
		if n.OwnerID != u.ID {
			continue
		}
		ev := store.Event{Kind: store.EventRemove, Actor: actor, Node: n.Name, Message: "removed with its owner " + name}
		if err := s.removeNode(ctx, n.ID, change{log: "node removed with its owner", attrs: []any{"node_id", n.ID, "name", n.Name, "user", name}, event: ev}); err != nil && !errors.Is(err, store.ErrNotFound) {
			return res, fmt.Errorf("remove node %s of user %s: %w", n.Name, name, err)
		}
		res.NodesRemoved = append(res.NodesRemoved, n.Name)
	}
	return res, nil
}

// AdminClient talks to the admin socket of a coordinator running on this
// machine, as agent/localapi.Client talks to an agent's socket; the CLI's
// coordinator commands (token create, relays) use it.
type AdminClient struct {
	api *unixhttp.Client
}

// NewAdminClient returns a client for the coordinator whose data directory
// is dataDir.
func NewAdminClient(dataDir string) *AdminClient {
	sock := filepath.Join(dataDir, adminSocket)
	return &AdminClient{api: unixhttp.New(unixhttp.Config{
		Socket: sock,
		Host:   "meshlink-admin",
		Name:   "coordinator admin socket",
		Unreachable: func(err error) error {
			if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
				return fmt.Errorf("no coordinator is running with --data %s; start `meshlink coordinator --data %s` first", dataDir, dataDir)
			}
			return fmt.Errorf("coordinator admin socket %s: %w", sock, err)
		},
		Refused: func(resp *http.Response, body []byte) error {
			var we wire.Error
			if json.Unmarshal(body, &we) == nil && we.Code != "" {
				return &we
			}
			return fmt.Errorf("coordinator admin socket: %s", resp.Status)
		},
	})}
}

// CreateToken asks for a join token and returns it as printed for users.
func (c *AdminClient) CreateToken(ctx context.Context, o TokenOptions) (string, error) {
	var resp adminTokenResponse
	if err := c.api.Do(ctx, http.MethodPost, adminPathTokens, o, &resp); err != nil {
		return "", err
	}
	return resp.Token, nil
}

// Tokens lists every join token (never their secrets).
func (c *AdminClient) Tokens(ctx context.Context) ([]wire.TokenInfo, error) {
	var toks []wire.TokenInfo
	err := c.api.Do(ctx, http.MethodGet, adminPathTokens, nil, &toks)
	return toks, err
}

// RevokeToken revokes the token with the given id; nodes it already
// created stay.
func (c *AdminClient) RevokeToken(ctx context.Context, id string) error {
	return c.api.Do(ctx, http.MethodDelete, adminPathTokens+"/"+url.PathEscape(id), nil, nil)
}

// NodeInfo is a node as the admin socket lists it: the network map's view
// and what only an administrator sees.
type NodeInfo struct {
	wire.Node
	// Owner is the user name of the node's owner; empty for nodes only
	// admins manage (joined with an admin token).
	Owner string `json:"owner,omitempty"`
	// KeyExpiry is when the node's key stops being accepted; nil is never.
	// It shadows wire.Node's field of the same JSON name, which omits
	// never.
	KeyExpiry *time.Time `json:"key_expiry"`
}

// nodeOwners maps each node with an owner to the owner's user name.
func (s *Server) nodeOwners(ctx context.Context) (map[wire.NodeID]string, error) {
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	users, err := s.store.ListUsers(ctx)
	if err != nil {
		return nil, err
	}
	names := make(map[int64]string, len(users))
	for _, u := range users {
		names[u.ID] = u.Username
	}
	out := map[wire.NodeID]string{}
	for _, n := range nodes {
		if n.OwnerID == 0 {
			continue
		}
		if name, ok := names[n.OwnerID]; ok {
			out[n.ID] = name
		} else {
			out[n.ID] = fmt.Sprintf("user #%d", n.OwnerID)
		}
	}
	return out, nil
}

// Nodes lists every node.
func (c *AdminClient) Nodes(ctx context.Context) ([]NodeInfo, error) {
	var nodes []NodeInfo
	err := c.api.Do(ctx, http.MethodGet, adminPathNodes, nil, &nodes)
	return nodes, err
}

// RemoveNode removes the node called name; its peers lose it within a
// second.
func (c *AdminClient) RemoveNode(ctx context.Context, name string) error {
	return c.api.Do(ctx, http.MethodDelete, adminPathNodes+"/"+url.PathEscape(name), nil, nil)
}

// ExpireNode makes the key of the node called name expire now: its peers
// drop it within seconds and it must join again.
func (c *AdminClient) ExpireNode(ctx context.Context, name string) error {
	return c.api.Do(ctx, http.MethodPost, adminPathNodes+"/"+url.PathEscape(name)+"/expire", struct{}{}, nil)
}

// Services lists the services that have at least one provider.
func (c *AdminClient) Services(ctx context.Context) ([]wire.Service, error) {
	var svcs []wire.Service
	err := c.api.Do(ctx, http.MethodGet, adminPathServices, nil, &svcs)
	return svcs, err
}

// AddUser creates an account with a one-time password (in the result)
// that must be changed at first sign-in.
func (c *AdminClient) AddUser(ctx context.Context, name string, admin bool) (NewUser, error) {
	var nu NewUser
	err := c.api.Do(ctx, http.MethodPost, adminPathUsers, NewUser{Name: name, Admin: admin}, &nu)
	return nu, err
}

// Users lists every account.
func (c *AdminClient) Users(ctx context.Context) ([]UserInfo, error) {
	var us []UserInfo
	err := c.api.Do(ctx, http.MethodGet, adminPathUsers, nil, &us)
	return us, err
}

// ApproveUser lets a pending account (first OIDC sign-in under
// --oidc-new-users=pending) sign in.
func (c *AdminClient) ApproveUser(ctx context.Context, name string) error {
	return c.api.Do(ctx, http.MethodPost, adminPathUsers+"/"+url.PathEscape(name)+"/approve", struct{}{}, nil)
}

// RemoveUser removes an account, revokes its tokens and removes its nodes.
func (c *AdminClient) RemoveUser(ctx context.Context, name string) (RemovedUser, error) {
	var ru RemovedUser
	err := c.api.Do(ctx, http.MethodDelete, adminPathUsers+"/"+url.PathEscape(name), nil, &ru)
	return ru, err
}

// Relays lists the relays network maps carry now.
func (c *AdminClient) Relays(ctx context.Context) ([]wire.Relay, error) {
	var rs []wire.Relay
	err := c.api.Do(ctx, http.MethodGet, adminPathRelays, nil, &rs)
	return rs, err
}

// RemoveRelay removes a standalone relay: it is unlisted at once and its
// credentials stop working.
func (c *AdminClient) RemoveRelay(ctx context.Context, name string) error {
	return c.api.Do(ctx, http.MethodDelete, adminPathRelays+"/"+url.PathEscape(name), nil, nil)
}
