package web

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"

	"github.com/meshlink/meshlink/coordinator/oidclogin"
	"github.com/meshlink/meshlink/coordinator/store"
)

// OIDCProvider is an external OpenID Connect sign-in the console offers
// next to its password form. *oidclogin.Provider implements it.
type OIDCProvider interface {
	// Name is shown on the "Sign in with …" button.
	Name() string
	// Begin sets the login-state cookie and returns the provider URL.
	Begin(w http.ResponseWriter, r *http.Request) (string, error)
	// Finish completes the login at the callback; its errors are safe to
	// show to the user.
	Finish(w http.ResponseWriter, r *http.Request) (oidclogin.Identity, error)
}

var _ OIDCProvider = (*oidclogin.Provider)(nil)

// oidcHolder boxes the provider so that it fits an atomic.Pointer.
type oidcHolder struct{ p OIDCProvider }

// oidcPasswordHash is stored as the password hash of accounts created by an
// OIDC sign-in. It is not a bcrypt hash, so those accounts can never sign in
// with a password; the password form compares against a dummy hash instead,
// so that trying costs the same time as for any other account.
const oidcPasswordHash = "!oidc-sign-in-only"

// SetOIDC enables sign-in with p (nil disables it). The coordinator calls
// it from Start, once it knows its URL and discovery has succeeded; it is
// safe to call while serving.
func (c *Console) SetOIDC(p OIDCProvider) {
	if p == nil {
		c.oidcP.Store(nil)
		return
	}
	c.oidcP.Store(&oidcHolder{p})
}

func (c *Console) oidc() OIDCProvider {
	if h := c.oidcP.Load(); h != nil {
		return h.p
	}
	return nil
}

// oidcName is the provider name for the login page, "" without OIDC.
func (c *Console) oidcName() string {
	if p := c.oidc(); p != nil {
		return p.Name()
	}
	return ""
}

// serveOIDCBegin is GET /login/oidc: it sends the browser to the provider.
func (c *Console) serveOIDCBegin(w http.ResponseWriter, r *http.Request) {
	p := c.oidc()
	if p == nil {
		c.renderMessage(w, r, nil, http.StatusNotFound, "Not found", "Sign-in with an identity provider is not configured on this coordinator.")
		return
	}
	u, err := p.Begin(w, r)
	if err != nil {
		c.internal(w, r, "oidc begin", err)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, u, http.StatusFound)
}

// serveOIDCCallback is GET /login/oidc/callback, where the provider sends
// the browser back. It is a cross-site top-level navigation by design, so
// it is not behind sameOrigin: the sealed state cookie, checked by Finish,
// is what ties it to the browser that started the sign-in.
func (c *Console) serveOIDCCallback(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	p := c.oidc()
	if p == nil {
		c.renderMessage(w, r, nil, http.StatusNotFound, "Not found", "Sign-in with an identity provider is not configured on this coordinator.")
		return
	}
	id, err := p.Finish(w, r)
	if err != nil {
		status := http.StatusBadRequest
		switch {
		case errors.Is(err, oidclogin.ErrClientAuth):
			// The operator must act; nothing the user does helps.
			status = http.StatusBadGateway
			c.log.Error("oidc sign-in: the provider rejected the client credentials; check --oidc-client-id and --oidc-client-secret", "provider", p.Name())
		case errors.Is(err, oidclogin.ErrProvider):
			status = http.StatusBadGateway
			c.log.Warn("oidc sign-in failed", "remote", clientIP(r), "err", err)
		default:
			c.log.Info("oidc sign-in failed", "remote", clientIP(r), "err", err)
		}
		// A callback without our cookie or state costs an attacker nothing,
		// so only failures past that check go to the event log.
		if !errors.Is(err, oidclogin.ErrNoLogin) && !errors.Is(err, oidclogin.ErrState) {
			c.Record(store.Event{Kind: store.EventLoginFailed, Actor: clientIP(r), Message: err.Error()})
		}
		c.render(w, r, status, "message", &pageData{Title: "Sign-in failed", Error: err.Error(), Retry: "/login/oidc"})
		return
	}
	if why := c.cfg.OIDC.refuse(id); why != "" {
		c.log.Info("oidc sign-in refused by policy", "remote", clientIP(r), "email", id.Email, "reason", why)
		c.Record(store.Event{Kind: store.EventLoginFailed, Actor: clientIP(r), Message: "sign-in with " + p.Name() + " refused: " + why})
		c.render(w, r, http.StatusForbidden, "message", &pageData{Title: "Sign-in refused",
			Error: "This coordinator does not admit your account: " + why + ". Ask an admin of this coordinator if you should have access."})
		return
	}
	u, err := c.oidcUser(r.Context(), id, p.Name())
	if err != nil {
		c.internal(w, r, "oidc user", err)
		return
	}
	if u.Pending {
		c.log.Info("oidc sign-in of a pending account", "user", u.Username, "email", id.Email)
		c.render(w, r, http.StatusForbidden, "message", &pageData{Title: "Awaiting approval",
			Error: "Your account was created and awaits approval by an admin (on the Users page, or `meshlink users approve`). Sign in again once it is approved."})
		return
	}
	how := "signed in with " + p.Name()
	if id.Email != "" {
		how += " as " + id.Email
	}
	if err := c.startSession(w, r, u, how); err != nil {
		c.internal(w, r, "oidc login", err)
		return
	}
	// Not a redirect: the browser got here through a redirect chain that
	// began on the provider's site, and browsers withhold SameSite=Strict
	// cookies (the session's) for the rest of such a chain, so a 303 to
	// /console would arrive signed out. The refresh below is a navigation
	// started by this page, on this site, and carries the session.
	c.render(w, r, http.StatusOK, "signedin", &pageData{Title: "Signed in", Username: u.Username, Refresh: true})
}

// oidcUser finds or creates the local account of id: a member (never an
// admin: an admin promotes it) whose password can never match.
func (c *Console) oidcUser(ctx context.Context, id oidclogin.Identity, provider string) (store.User, error) {
	name := id.Username()
	u, err := c.store.GetUser(ctx, name)
	if err == nil || !errors.Is(err, store.ErrNotFound) {
		return u, err
	}
	u, err = c.store.CreateUser(ctx, store.User{Username: name, PasswordHash: oidcPasswordHash, Admin: false, Pending: c.cfg.OIDC.NewUsersPending})
	if err != nil {
		// Two first sign-ins of one person at once: the other one won.
		if u2, err2 := c.store.GetUser(ctx, name); err2 == nil {
			return u2, nil
		}
		return store.User{}, err
	}
	who := name
	if id.Email != "" {
		who += " (" + id.Email + ")"
	}
	state := "member"
	if u.Pending {
		state = "pending member"
	}
	c.log.Info("user created by oidc sign-in", "user", name, "email", id.Email, "pending", u.Pending)
	c.Record(store.Event{Kind: store.EventUserCreated, Actor: provider, Message: "created " + state + " " + who + " at first sign-in with " + provider, OwnerID: u.ID})
	return u, nil
}

// refuse says why the policy does not admit id, or "" if it does.
func (p OIDCPolicy) refuse(id oidclogin.Identity) string {
	if len(p.AllowedDomains) > 0 {
		at := strings.LastIndexByte(id.Email, '@')
		if id.Email == "" || !id.EmailVerified || at < 0 {
			return "it has no verified email address, and only addresses at " + strings.Join(p.AllowedDomains, ", ") + " are admitted"
		}
		domain := strings.ToLower(id.Email[at+1:])
		if !slices.ContainsFunc(p.AllowedDomains, func(d string) bool { return strings.EqualFold(d, domain) }) {
			return "its email domain " + domain + " is not one of " + strings.Join(p.AllowedDomains, ", ")
		}
	}
	if len(p.AllowedGroups) > 0 && !slices.ContainsFunc(id.Groups, func(g string) bool { return slices.Contains(p.AllowedGroups, g) }) {
		return "it is in none of the groups " + strings.Join(p.AllowedGroups, ", ")
	}
	return ""
}
