package web

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// pageData is what every template gets.
type pageData struct {
	Title    string
	Nav      string // the active navigation entry
	Viewer   *viewer
	CSRF     string
	Snap     *Snapshot
	Error    string
	Notice   string
	Next     string
	Username string
	// Secret is shown once: a new token or a new password.
	Secret      string
	SecretLabel string
	Users       []store.User
	Approval    *approvalView
	// OIDCName is the identity provider of the login page's "Sign in
	// with …" button; "" hides it.
	OIDCName string
	// Retry is where a failed sign-in's "Try again" link goes.
	Retry string
	// Refresh sends the browser on to /console (after an OIDC sign-in).
	Refresh bool
	// NoMint: the viewer may not mint tokens (a member, with
	// Config.MembersCannotMintTokens); the Tokens page says so.
	NoMint bool
	// Status is the HTTP status of a snapPage; 0 is 200.
	Status int
	Policy *policyData
}

type approvalView struct {
	Code     string
	Name     string
	Hostname string
	KeyFP    string
	RemoteIP string
	Expires  time.Time
	Decided  bool
}

var funcs = template.FuncMap{
	"ago": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		d := time.Since(t).Round(time.Second)
		switch {
		case d < 5*time.Second:
			return "just now"
		case d < time.Minute:
			return fmt.Sprintf("%ds ago", int(d.Seconds()))
		case d < time.Hour:
			return fmt.Sprintf("%dm ago", int(d.Minutes()))
		case d < 48*time.Hour:
			return fmt.Sprintf("%dh ago", int(d.Hours()))
		}
		return t.Format("2006-01-02")
	},
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.Local().Format("2006-01-02 15:04:05")
	},
	"bytes":     humanBytes,
	"join":      strings.Join,
	"pct":       func(f float64) string { return fmt.Sprintf("%.0f%%", f*100) },
	"http":      httpFigure,
	"httpParts": httpPartsOf,
}

// httpParts are the words the console writes HTTP figures in, in the
// pages and (the same) in app.js's httpParts.
type httpParts struct{ Rate, Errors, P50, P99 string }

func httpPartsOf(x any) httpParts {
	var v ViewHTTP
	switch x := x.(type) {
	case ViewHTTP:
		v = x
	case *ViewHTTP:
		if x == nil {
			return httpParts{}
		}
		v = *x
	default:
		return httpParts{}
	}
	p := httpParts{Rate: "— req/s", Errors: fmt.Sprintf("%.1f%% errors", v.ErrorRate*100)}
	if v.Window > 0 {
		p.Rate = fmt.Sprintf("%.1f req/s", v.RPS)
	}
	ms := func(x float64) string {
		if x < 10 {
			return fmt.Sprintf("%.1f ms", x)
		}
		return fmt.Sprintf("%.0f ms", x)
	}
	p.P50, p.P99 = "p50 "+ms(v.P50MS), "p99 "+ms(v.P99MS)
	if v.Over {
		p.P99 = "p99 > " + ms(v.P99MS)
	}
	return p
}

// httpFigure is one line: "12.5 req/s · 1.0% errors · p50 3.2 ms · p99 41 ms".
func httpFigure(x any) string {
	p := httpPartsOf(x)
	if p.Rate == "" {
		return ""
	}
	return p.Rate + " · " + p.Errors + " · " + p.P50 + " · " + p.P99
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// parsePages builds one template per page, each with the shared layout.
func parsePages() map[string]*template.Template {
	base := template.Must(template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html"))
	pages := map[string]*template.Template{}
	entries, _ := templateFS.ReadDir("templates")
	for _, e := range entries {
		name := strings.TrimSuffix(e.Name(), ".html")
		if name == "layout" {
			continue
		}
		pages[name] = template.Must(template.Must(base.Clone()).ParseFS(templateFS, "templates/"+e.Name()))
	}
	return pages
}

func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, page string, d *pageData) {
	if d.Viewer == nil {
		d.Viewer = viewerFrom(r)
	}
	if d.Viewer != nil {
		d.CSRF = d.Viewer.session.CSRF
	}
	if page == "login" {
		d.OIDCName = c.oidcName()
	}
	var buf bytes.Buffer
	if err := c.pages[page].ExecuteTemplate(&buf, "layout.html", d); err != nil {
		c.log.Error("render", "page", page, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

func (c *Console) renderMessage(w http.ResponseWriter, r *http.Request, v *viewer, status int, title, msg string) {
	c.render(w, r, status, "message", &pageData{Title: title, Viewer: v, Error: msg})
}

func (c *Console) internal(w http.ResponseWriter, r *http.Request, what string, err error) {
	c.log.Error("console request failed", "path", r.URL.Path, "what", what, "err", err)
	c.renderMessage(w, r, nil, http.StatusInternalServerError, "Something went wrong", "The coordinator could not answer; its log says why.")
}

// snapPage renders a page that shows the viewer's snapshot.
func (c *Console) snapPage(w http.ResponseWriter, r *http.Request, v *viewer, page, nav, title string, events int, d *pageData) {
	snap, err := c.snapshot(r.Context(), v, events)
	if err != nil {
		c.internal(w, r, page, err)
		return
	}
	if d == nil {
		d = &pageData{}
	}
	d.Title, d.Nav, d.Viewer, d.Snap = title, nav, v, snap
	status := http.StatusOK
	if d.Status != 0 {
		status = d.Status
	}
	c.render(w, r, status, page, d)
}

func (c *Console) serveOverview(w http.ResponseWriter, r *http.Request, v *viewer) {
	d := &pageData{Notice: noticeFrom(r)}
	c.snapPage(w, r, v, "overview", "sites", "Sites", 0, d)
}

func (c *Console) serveGraph(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.snapPage(w, r, v, "graph", "graph", "Graph", 0, nil)
}

func (c *Console) serveServices(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.snapPage(w, r, v, "services", "services", "Services", 0, nil)
}

func (c *Console) serveTokens(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.snapPage(w, r, v, "tokens", "tokens", "Join tokens", 0, &pageData{Notice: noticeFrom(r), NoMint: !c.canMint(v)})
}

// canMint says whether v may mint join tokens in the console.
func (c *Console) canMint(v *viewer) bool { return v.Admin || !c.cfg.MembersCannotMintTokens }

func (c *Console) serveEventLog(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.snapPage(w, r, v, "events", "events", "Events", 500, nil)
}

// noticeFrom turns a fixed set of query values into messages; free text
// from the URL is never shown.
func noticeFrom(r *http.Request) string {
	switch r.URL.Query().Get("done") {
	case "removed":
		return "The node was removed; its peers drop it within seconds."
	case "revoked":
		return "The token was revoked; nodes it already joined stay."
	}
	return ""
}

func (c *Console) serveMintToken(w http.ResponseWriter, r *http.Request, v *viewer) {
	if !c.canMint(v) {
		c.snapPage(w, r, v, "tokens", "tokens", "Join tokens", 0, &pageData{NoMint: true, Status: http.StatusForbidden,
			Error: "Only admins mint join tokens on this coordinator; ask an admin for one."})
		return
	}
	o := TokenRequest{OwnerID: v.ID, Reusable: r.PostFormValue("reusable") != "", Ephemeral: r.PostFormValue("ephemeral") != ""}
	fail := func(msg string) {
		c.snapPage(w, r, v, "tokens", "tokens", "Join tokens", 0, &pageData{Error: msg})
	}
	if e := strings.TrimSpace(r.PostFormValue("expires")); e != "" && e != "never" {
		d, err := time.ParseDuration(e)
		if err != nil || d <= 0 || d > 10*365*24*time.Hour {
			fail("Expiry must be a duration such as 1h, 24h or 720h, or empty for never.")
			return
		}
		o.Expires = d
	}
	if e := strings.TrimSpace(r.PostFormValue("key_expiry")); e != "" {
		d, err := time.ParseDuration(e)
		if err != nil || d < time.Second {
			fail("Node key expiry must be a duration such as 24h or 720h, or empty for the coordinator's.")
			return
		}
		o.KeyExpiry = d
	}
	for _, t := range strings.FieldsFunc(r.PostFormValue("tags"), func(r rune) bool { return r == ',' || r == ' ' }) {
		o.Tags = append(o.Tags, t)
	}
	if len(o.Tags) > 32 {
		fail("A token may carry at most 32 tags.")
		return
	}
	tok, err := c.mesh.CreateToken(r.Context(), o)
	if err != nil {
		fail(err.Error())
		return
	}
	id := ""
	if jt, err := wire.ParseToken(tok); err == nil {
		id = jt.ID
	}
	c.Record(store.Event{Kind: store.EventTokenCreated, Actor: v.Username, Message: "minted token " + id, OwnerID: v.ID})
	c.snapPage(w, r, v, "tokens", "tokens", "Join tokens", 0, &pageData{Secret: tok,
		SecretLabel: "Copy this token now; it is shown only once. Join a site with: meshlink agent --token '…'"})
}

func (c *Console) serveRevokeToken(w http.ResponseWriter, r *http.Request, v *viewer) {
	id := r.PathValue("id")
	tok, err := c.store.GetToken(r.Context(), id)
	if errors.Is(err, store.ErrNotFound) || err == nil && !v.mayManage(tok.OwnerID) {
		// Someone else's token is as good as none: nothing to learn here.
		c.renderMessage(w, r, v, http.StatusNotFound, "No such token", "There is no token "+id+" that you may manage.")
		return
	} else if err != nil {
		c.internal(w, r, "revoke", err)
		return
	}
	if err := c.store.RevokeToken(r.Context(), id); err != nil {
		c.internal(w, r, "revoke", err)
		return
	}
	c.log.Info("token revoked in console", "token_id", id, "by", v.Username)
	c.Record(store.Event{Kind: store.EventTokenRevoked, Actor: v.Username, Message: "revoked token " + id, OwnerID: tok.OwnerID})
	http.Redirect(w, r, "/console/tokens?done=revoked", http.StatusSeeOther)
}

func (c *Console) serveRemoveNode(w http.ResponseWriter, r *http.Request, v *viewer) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		c.renderMessage(w, r, v, http.StatusNotFound, "No such node", "There is no such node.")
		return
	}
	n, err := c.store.GetNode(r.Context(), wire.NodeID(id))
	if errors.Is(err, store.ErrNotFound) || err == nil && !v.mayManage(n.OwnerID) {
		c.renderMessage(w, r, v, http.StatusNotFound, "No such node", "There is no such node that you may manage.")
		return
	} else if err != nil {
		c.internal(w, r, "remove", err)
		return
	}
	ev := store.Event{Kind: store.EventRemove, Actor: v.Username, Node: n.Name, Message: "removed node " + n.Name, OwnerID: n.OwnerID}
	if err := c.mesh.RemoveNode(r.Context(), n.ID, ev); err != nil && !errors.Is(err, store.ErrNotFound) {
		c.internal(w, r, "remove", err)
		return
	}
	c.log.Info("node removed in console", "node_id", n.ID, "name", n.Name, "by", v.Username)
	http.Redirect(w, r, "/console?done=removed", http.StatusSeeOther)
}

func (c *Console) serveUsers(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.usersPage(w, r, v, http.StatusOK, &pageData{})
}

func (c *Console) usersPage(w http.ResponseWriter, r *http.Request, v *viewer, status int, d *pageData) {
	if !v.Admin {
		c.renderMessage(w, r, v, http.StatusForbidden, "Admins only", "Only an admin manages accounts.")
		return
	}
	users, err := c.store.ListUsers(r.Context())
	if err != nil {
		c.internal(w, r, "users", err)
		return
	}
	d.Title, d.Nav, d.Viewer, d.Users = "Users", "users", v, users
	c.render(w, r, status, "users", d)
}

// userRole is an account's role as the users form posts it ("role") and
// the log and the event log name it; the store keeps User.Admin.
type userRole string

const (
	roleMember userRole = "member"
	roleAdmin  userRole = "admin"
)

func roleOf(u store.User) userRole {
	if u.Admin {
		return roleAdmin
	}
	return roleMember
}

// CreateUser creates the account name (already validated) with a
// one-time password, which it returns: the user must replace it at first
// sign-in. actor is who asked, for the event log. An existing name is
// store.ErrExists.
func (c *Console) CreateUser(ctx context.Context, name string, admin bool, actor string) (store.User, string, error) {
	if _, err := c.store.GetUser(ctx, name); err == nil {
		return store.User{}, "", fmt.Errorf("user %q: %w", name, store.ErrExists)
	}
	pw := randomString(15)
	hash, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
	if err != nil {
		return store.User{}, "", err
	}
	// Whoever created it knows this password: the user replaces it at
	// first sign-in.
	u, err := c.store.CreateUser(ctx, store.User{Username: name, PasswordHash: string(hash), Admin: admin, MustChangePassword: true})
	if err != nil {
		return store.User{}, "", err
	}
	role := roleOf(u)
	c.log.Info("user created", "user", name, "role", role, "by", actor)
	c.Record(store.Event{Kind: store.EventUserCreated, Actor: actor, Message: "created " + string(role) + " " + name, OwnerID: u.ID})
	return u, pw, nil
}

// serveApproveUser lets a pending account (an OIDC sign-in under
// --oidc-new-users=pending) sign in.
func (c *Console) serveApproveUser(w http.ResponseWriter, r *http.Request, v *viewer) {
	if !v.Admin {
		c.renderMessage(w, r, v, http.StatusForbidden, "Admins only", "Only an admin manages accounts.")
		return
	}
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		c.usersPage(w, r, v, http.StatusNotFound, &pageData{Error: "No such user."})
		return
	}
	u, err := c.ApproveUser(r.Context(), id, v.Username)
	if errors.Is(err, store.ErrNotFound) {
		c.usersPage(w, r, v, http.StatusNotFound, &pageData{Error: "No such user."})
		return
	} else if err != nil {
		c.internal(w, r, "approve user", err)
		return
	}
	c.usersPage(w, r, v, http.StatusOK, &pageData{Notice: u.Username + " is approved and may sign in."})
}

// serveRemoveUser removes an account and what it owned, as `meshlink
// users remove` does. An admin cannot remove their own account here (sign
// in as another admin), nor the last admin.
func (c *Console) serveRemoveUser(w http.ResponseWriter, r *http.Request, v *viewer) {
	if !v.Admin {
		c.renderMessage(w, r, v, http.StatusForbidden, "Admins only", "Only an admin manages accounts.")
		return
	}
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		c.usersPage(w, r, v, http.StatusNotFound, &pageData{Error: "No such user."})
		return
	}
	if id == v.ID {
		c.usersPage(w, r, v, http.StatusConflict, &pageData{Error: "You cannot remove your own account while signed in with it; sign in as another admin."})
		return
	}
	ru, err := c.mesh.RemoveUser(r.Context(), id, v.Username)
	switch {
	case errors.Is(err, store.ErrNotFound):
		c.usersPage(w, r, v, http.StatusNotFound, &pageData{Error: "No such user."})
		return
	case errors.Is(err, store.ErrLastAdmin):
		c.usersPage(w, r, v, http.StatusConflict, &pageData{Error: ru.Name + " is the last admin; make another admin first."})
		return
	case err != nil:
		c.internal(w, r, "remove user", err)
		return
	}
	msg := fmt.Sprintf("Removed %s: %d tokens revoked", ru.Name, len(ru.TokensRevoked))
	if len(ru.NodesRemoved) > 0 {
		msg += "; nodes removed from the mesh: " + strings.Join(ru.NodesRemoved, ", ")
	}
	c.usersPage(w, r, v, http.StatusOK, &pageData{Notice: msg + "."})
}

// ApproveUser lets the pending user id sign in; actor is who approved,
// for the event log.
func (c *Console) ApproveUser(ctx context.Context, id int64, actor string) (store.User, error) {
	u, err := c.store.GetUserByID(ctx, id)
	if err != nil {
		return u, err
	}
	if !u.Pending {
		return u, nil
	}
	if err := c.store.ApproveUser(ctx, id); err != nil {
		return u, err
	}
	u.Pending = false
	c.log.Info("user approved", "user", u.Username, "by", actor)
	c.Record(store.Event{Kind: store.EventUserApproved, Actor: actor, Message: "approved " + u.Username, OwnerID: u.ID})
	return u, nil
}

func (c *Console) serveCreateUser(w http.ResponseWriter, r *http.Request, v *viewer) {
	if !v.Admin {
		c.renderMessage(w, r, v, http.StatusForbidden, "Admins only", "Only an admin manages accounts.")
		return
	}
	name := wire.NormalizeName(r.PostFormValue("username"))
	if err := wire.ValidName(name); err != nil {
		c.usersPage(w, r, v, http.StatusBadRequest, &pageData{Error: "Username: " + err.Error()})
		return
	}
	u, pw, err := c.CreateUser(r.Context(), name, userRole(r.PostFormValue("role")) == roleAdmin, v.Username)
	if errors.Is(err, store.ErrExists) {
		c.usersPage(w, r, v, http.StatusConflict, &pageData{Error: "There is already a user " + name + "."})
		return
	} else if err != nil {
		c.internal(w, r, "create user", err)
		return
	}
	name = u.Username
	c.usersPage(w, r, v, http.StatusOK, &pageData{Username: name, Secret: pw,
		SecretLabel: "One-time password of " + name + ", shown only this once: hand it over through a safe channel; " + name + " chooses their own at first sign-in."})
}

func (c *Console) serveSnapshot(w http.ResponseWriter, r *http.Request, v *viewer) {
	snap, err := c.snapshot(r.Context(), v, 50)
	if err != nil {
		c.log.Error("snapshot", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(snap)
}

// serveLive streams the viewer's snapshot as server-sent events: one at
// once, then one whenever the mesh, the counters or the event log change
// (coalesced, and only when what this viewer sees changed), with
// keep-alive comments in between. The embedded relay's counters change
// with no signal, so while a relay has counters they are looked at every
// relayEvery. It ends when the session does. A session, a user and the
// console have a bound on open feeds (liveSet); one over it is 429.
func (c *Console) serveLive(w http.ResponseWriter, r *http.Request, v *viewer) {
	const (
		coalesce   = 250 * time.Millisecond
		keepAlive  = 15 * time.Second
		relayEvery = 5 * time.Second
	)
	ctx := r.Context()
	release, err := c.live.acquire(string(v.session.IDHash), v.ID)
	if err != nil {
		// EventSource does not retry a non-200 answer: the page stays,
		// without live updates.
		http.Error(w, err.Error(), http.StatusTooManyRequests)
		return
	}
	defer release()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	write := func(b []byte) bool {
		rc.SetWriteDeadline(time.Now().Add(15 * time.Second))
		if _, err := w.Write(b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !write([]byte("retry: 3000\n\n")) {
		return
	}
	ka := time.NewTicker(keepAlive)
	defer ka.Stop()
	rt := time.NewTicker(relayEvery)
	defer rt.Stop()
	var last []byte
	for {
		meshCh, consoleCh := c.mesh.Changed(), c.changed()
		// The session may have ended (logout elsewhere, expiry).
		if cur, err := c.session(r); err != nil || cur == nil {
			write([]byte("event: logout\ndata: {}\n\n"))
			return
		}
		snap, err := c.snapshot(ctx, v, 50)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Error("live snapshot", "err", err)
			}
			return
		}
		b, _ := json.Marshal(snap)
		if !bytes.Equal(b, last) {
			last = b
			msg := make([]byte, 0, len(b)+32)
			msg = append(append(append(msg, "event: snapshot\ndata: "...), b...), "\n\n"...)
			if !write(msg) {
				return
			}
			ka.Reset(keepAlive)
		}
		var relayTick <-chan time.Time // nil: no relay counters to follow
		for _, r := range snap.Relays {
			if r.Stats != nil {
				relayTick = rt.C
			}
		}
		select {
		case <-meshCh:
		case <-consoleCh:
		case <-relayTick:
			continue
		case <-ka.C:
			if !write([]byte(": keep-alive\n\n")) {
				return
			}
			continue
		case <-ctx.Done():
			return
		}
		// Let a burst of changes settle into one update.
		t := time.NewTimer(coalesce)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

func (c *Console) serveApprovePage(w http.ResponseWriter, r *http.Request, v *viewer) {
	p, exp := c.pending.byCodeGet(r.PathValue("code"), c.now())
	if p == nil {
		c.renderMessage(w, r, v, http.StatusNotFound, "Unknown or expired request",
			"This approval link is unknown or has expired (a link lasts 5 minutes until it is first opened, 15 in all). Start the agent again for a new one.")
		return
	}
	c.render(w, r, http.StatusOK, "approve", &pageData{Title: "Approve a node", Viewer: v, Approval: approval(p, exp)})
}

func approval(p *pending, expires time.Time) *approvalView {
	a := &approvalView{Code: p.code, Name: p.req.Name, Hostname: p.req.Hostname, KeyFP: p.req.Key.Fingerprint(), RemoteIP: p.req.RemoteIP, Expires: expires}
	select {
	case <-p.done:
		a.Decided = true
	default:
	}
	return a
}

func (c *Console) serveApprove(w http.ResponseWriter, r *http.Request, v *viewer) {
	p, exp := c.pending.byCodeGet(r.PathValue("code"), c.now())
	if p == nil {
		c.renderMessage(w, r, v, http.StatusNotFound, "Unknown or expired request",
			"This approval link is unknown or has expired (a link lasts 5 minutes until it is first opened, 15 in all). Start the agent again for a new one.")
		return
	}
	approve := r.PostFormValue("action") == "approve"
	msg, err := c.decide(r.Context(), p, v, approve)
	if err != nil {
		c.internal(w, r, "approve", err)
		return
	}
	d := &pageData{Title: "Approve a node", Viewer: v, Approval: approval(p, exp)}
	switch {
	case msg != "":
		d.Error = msg
	case approve:
		d.Notice = "Approved: " + p.req.Name + " joins the mesh as your node within seconds."
	default:
		d.Notice = "Denied: the agent was told so."
	}
	c.render(w, r, http.StatusOK, "approve", d)
}
