package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
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
)

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
		writeJSON(w, http.StatusOK, append([]wire.Node{}, snap.nodes...))
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
	mux.HandleFunc("GET "+adminPathServices, func(w http.ResponseWriter, r *http.Request) {
		snap, err := s.current(r.Context())
		if err != nil {
			writeError(w, apiErr(http.StatusInternalServerError, wire.ErrCodeInternal, "%v", err))
			return
		}
		writeJSON(w, http.StatusOK, append([]wire.Service{}, snap.services...))
	})
	return s.track(mux)
}

// adminCall does one request on the admin socket of dataDir, decoding a
// 2xx answer into out and anything else into a *wire.Error.
func adminCall(ctx context.Context, dataDir, method, path string, in, out any) error {
	sock := filepath.Join(dataDir, adminSocket)
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://meshlink-admin"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("no coordinator is running with --data %s; start `meshlink coordinator --data %s` first", dataDir, dataDir)
		}
		return fmt.Errorf("coordinator admin socket %s: %w", sock, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("coordinator admin socket %s: %w", sock, err)
	}
	if resp.StatusCode/100 != 2 {
		var we wire.Error
		if json.Unmarshal(raw, &we) == nil && we.Code != "" {
			return &we
		}
		return fmt.Errorf("coordinator admin socket: %s", resp.Status)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("coordinator admin socket: bad answer: %w", err)
		}
	}
	return nil
}

// CreateTokenViaAdminSocket asks the coordinator running with dataDir for a
// join token.
func CreateTokenViaAdminSocket(ctx context.Context, dataDir string, o TokenOptions) (string, error) {
	var resp adminTokenResponse
	if err := adminCall(ctx, dataDir, http.MethodPost, adminPathTokens, o, &resp); err != nil {
		return "", err
	}
	return resp.Token, nil
}

// ListTokensViaAdminSocket lists every join token (never their secrets).
func ListTokensViaAdminSocket(ctx context.Context, dataDir string) ([]wire.TokenInfo, error) {
	var toks []wire.TokenInfo
	err := adminCall(ctx, dataDir, http.MethodGet, adminPathTokens, nil, &toks)
	return toks, err
}

// RevokeTokenViaAdminSocket revokes the token with the given id; nodes it
// already created stay.
func RevokeTokenViaAdminSocket(ctx context.Context, dataDir, id string) error {
	return adminCall(ctx, dataDir, http.MethodDelete, adminPathTokens+"/"+url.PathEscape(id), nil, nil)
}

// ListNodesViaAdminSocket lists every node of the coordinator running with dataDir.
func ListNodesViaAdminSocket(ctx context.Context, dataDir string) ([]wire.Node, error) {
	var nodes []wire.Node
	err := adminCall(ctx, dataDir, http.MethodGet, adminPathNodes, nil, &nodes)
	return nodes, err
}

// ListServicesViaAdminSocket lists the services that have at least one provider.
func ListServicesViaAdminSocket(ctx context.Context, dataDir string) ([]wire.Service, error) {
	var svcs []wire.Service
	err := adminCall(ctx, dataDir, http.MethodGet, adminPathServices, nil, &svcs)
	return svcs, err
}

// ListRelaysViaAdminSocket lists the relays network maps carry now.
func ListRelaysViaAdminSocket(ctx context.Context, dataDir string) ([]wire.Relay, error) {
	var rs []wire.Relay
	err := adminCall(ctx, dataDir, http.MethodGet, adminPathRelays, nil, &rs)
	return rs, err
}

// RemoveRelayViaAdminSocket removes a standalone relay: it is unlisted at
// once and its credentials stop working.
func RemoveRelayViaAdminSocket(ctx context.Context, dataDir, name string) error {
	return adminCall(ctx, dataDir, http.MethodDelete, adminPathRelays+"/"+url.PathEscape(name), nil, nil)
}

// RemoveNodeViaAdminSocket removes the node called name; its peers lose it
// within a second.
func RemoveNodeViaAdminSocket(ctx context.Context, dataDir, name string) error {
	return adminCall(ctx, dataDir, http.MethodDelete, adminPathNodes+"/"+url.PathEscape(name), nil, nil)
}
