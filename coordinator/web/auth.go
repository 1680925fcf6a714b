package web

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
)

const (
	// SessionCookie holds the session id; the store keeps only its hash.
	SessionCookie = "meshlink_session"
	sessionIdle   = 12 * time.Hour
	sessionMax    = 7 * 24 * time.Hour
	// hashersMax bounds the password comparisons running at once (each
	// is ~50ms of a core), and hashWait how long an attempt queues for one.
	hashersMax = 4
	hashWait   = 10 * time.Second
)

// dummyHash is compared against when the username is unknown, so that a
// wrong username costs as much time as a wrong password.
// It is made on first use, not at package init.
var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("meshlink-no-such-user"), bcrypt.DefaultCost)
	return h
})

func randomString(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// viewer is the logged-in person of a request.
type viewer struct {
	store.User
	session store.Session
}

type ctxKey struct{}

func viewerFrom(r *http.Request) *viewer {
	v, _ := r.Context().Value(ctxKey{}).(*viewer)
	return v
}

// session returns the viewer of r, or nil when not logged in (or the
// session expired), moving the idle expiry forward.
func (c *Console) session(r *http.Request) (*viewer, error) {
	ck, err := r.Cookie(SessionCookie)
	if err != nil || ck.Value == "" || len(ck.Value) > 128 {
		return nil, nil
	}
	now := c.now()
	h := store.HashSecret(ck.Value)
	se, err := c.store.GetSession(r.Context(), h, now)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	if now.Sub(se.Created) > sessionMax {
		c.store.DeleteSession(r.Context(), h)
		return nil, nil
	}
	u, err := c.store.GetUserByID(r.Context(), se.UserID)
	if errors.Is(err, store.ErrNotFound) || (err == nil && u.Pending) {
		// Removed, or not approved yet: no session can act for it.
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	// Write at most once a minute per session, not on every request.
	if se.Expires.Sub(now) < sessionIdle-time.Minute {
		se.Expires = now.Add(sessionIdle)
		c.store.TouchSession(r.Context(), h, se.Expires)
	}
	return &viewer{User: u, session: se}, nil
}

// page wraps a GET handler that needs a logged-in viewer; anyone else is
// sent to the login page and back.
func (c *Console) page(h func(http.ResponseWriter, *http.Request, *viewer)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, err := c.session(r)
		if err != nil {
			c.internal(w, r, "session", err)
			return
		}
		if v == nil {
			if strings.HasPrefix(r.URL.Path, "/console/api/") || r.URL.Path == "/console/events" {
				http.Error(w, "not logged in", http.StatusUnauthorized)
				return
			}
			http.Redirect(w, r, "/?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		if v.MustChangePassword && r.URL.Path != passwordPath {
			if strings.HasPrefix(r.URL.Path, "/console/api/") || r.URL.Path == "/console/events" {
				http.Error(w, "choose a new password first", http.StatusForbidden)
				return
			}
			http.Redirect(w, r, passwordPath+"?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return
		}
		h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, v)), v)
	})
}

// action wraps a POST handler: same origin, logged in, valid CSRF token.
func (c *Console) action(h func(http.ResponseWriter, *http.Request, *viewer)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
		if !sameOrigin(r) {
			c.renderMessage(w, r, nil, http.StatusForbidden, "Request refused", "This form was sent from another site.")
			return
		}
		v, err := c.session(r)
		if err != nil {
			c.internal(w, r, "session", err)
			return
		}
		if v == nil {
			c.renderMessage(w, r, nil, http.StatusUnauthorized, "Signed out", "Your session has ended; sign in again.")
			return
		}
		got := r.PostFormValue("csrf")
		if got == "" || subtle.ConstantTimeCompare([]byte(got), []byte(v.session.CSRF)) != 1 {
			c.renderMessage(w, r, v, http.StatusForbidden, "Request refused", "The form was stale or not sent from this console; reload the page and try again.")
			return
		}
		if v.MustChangePassword && r.URL.Path != passwordPath && r.URL.Path != "/logout" {
			c.renderMessage(w, r, v, http.StatusForbidden, "Choose a new password first", "Your password was chosen for you; choose your own at "+passwordPath+" before you do anything else.")
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, v)), v)
	})
}

// sameOrigin refuses cross-site POSTs by the headers browsers send.
// Sec-Fetch-Site is set by the browser alone and is trusted when present:
// with Referrer-Policy no-referrer, browsers send "Origin: null" on our own
// form posts, so Origin is only consulted without it. A request with
// neither (curl, tests) falls back on the CSRF token and the
// SameSite=Strict cookie.
func sameOrigin(r *http.Request) bool {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "same-origin", "none":
		return true
	case "":
	default:
		return false
	}
	if o := r.Header.Get("Origin"); o != "" {
		u, err := url.Parse(o)
		if err != nil || u.Scheme != "https" || !strings.EqualFold(u.Host, r.Host) {
			return false
		}
	}
	return true
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// safeNext keeps a post-login redirect on this site: a path with one
// leading slash, nothing a browser would read as another host. Browsers
// drop tabs and newlines from URLs and read a backslash as a slash, so
// "/\t/evil.example" is "//evil.example" to them: any control byte,
// space, backslash or non-ASCII byte is refused, not just "//" and "/\\".
func safeNext(next string) string {
	const home = "/console"
	if len(next) > 512 || !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") {
		return home
	}
	for i := 0; i < len(next); i++ {
		if b := next[i]; b <= ' ' || b >= 0x7f || b == '\\' {
			return home
		}
	}
	u, err := url.Parse(next)
	if err != nil || u.Scheme != "" || u.Host != "" || u.Opaque != "" || u.User != nil || !strings.HasPrefix(u.Path, "/") || strings.HasPrefix(u.Path, "//") {
		return home
	}
	return next
}

func (c *Console) serveLoginPage(w http.ResponseWriter, r *http.Request) {
	v, err := c.session(r)
	if err != nil {
		c.internal(w, r, "session", err)
		return
	}
	next := safeNext(r.URL.Query().Get("next"))
	if v != nil {
		http.Redirect(w, r, next, http.StatusSeeOther)
		return
	}
	c.render(w, r, http.StatusOK, "login", &pageData{Title: "Sign in", Next: next})
}

func (c *Console) serveLogin(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if !sameOrigin(r) {
		c.renderMessage(w, r, nil, http.StatusForbidden, "Request refused", "This form was sent from another site.")
		return
	}
	username := strings.TrimSpace(r.PostFormValue("username"))
	password := r.PostFormValue("password")
	next := safeNext(r.PostFormValue("next"))
	if len(username) > 64 {
		username = username[:64]
	}
	source := sourceOf(r.RemoteAddr)
	// The attempt is counted before the password is hashed: a burst of
	// parallel guesses gets no more evaluations than the free ones.
	if wait, ok := c.limiter.reserve(source, strings.ToLower(username), c.now()); !ok {
		// Debug: a flood must not flood the log too. The failures that
		// led here were logged and recorded.
		c.log.Debug("login rate limited", "remote", clientIP(r), "wait", wait)
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
		c.render(w, r, http.StatusTooManyRequests, "login", &pageData{Title: "Sign in", Next: next, Username: username,
			Error: "Too many failed sign-ins from here. Wait " + waitText(wait) + ", then try again."})
		return
	}
	u, err := c.store.GetUser(r.Context(), username)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		c.internal(w, r, "login", err)
		return
	}
	// An unknown user, or one with no password (signs in by OIDC only),
	// costs the same comparison as a wrong password, against a dummy hash.
	hash, hasPassword := []byte(u.PasswordHash), err == nil
	if _, cerr := bcrypt.Cost(hash); cerr != nil {
		hash, hasPassword = dummyHash(), false
	}
	if cerr := c.comparePassword(r.Context(), hash, []byte(password)); cerr != nil || !hasPassword || password == "" {
		if errors.Is(cerr, errBusy) {
			c.renderMessage(w, r, nil, http.StatusServiceUnavailable, "Busy", "The coordinator is checking many sign-ins at once; try again in a minute.")
			return
		}
		// An unknown username is not repeated anywhere: people type
		// passwords into the username field.
		who := "an unknown user"
		if u.ID != 0 {
			who = u.Username
		}
		c.log.Info("login failed", "remote", clientIP(r), "user", who)
		c.Record(store.Event{Kind: store.EventLoginFailed, Actor: clientIP(r), Message: "failed sign-in as " + who, OwnerID: u.ID})
		c.render(w, r, http.StatusUnauthorized, "login", &pageData{Title: "Sign in", Next: next, Username: username,
			Error: "Wrong username or password."})
		return
	}
	c.limiter.succeeded(source, strings.ToLower(username))
	c.SignIn(w, r, u, next)
}

// SignIn starts a console session for u (whose credentials the caller
// checked: the password form, or an external login such as OIDC) and
// redirects to next, a path on this site.
func (c *Console) SignIn(w http.ResponseWriter, r *http.Request, u store.User, next string) {
	if err := c.startSession(w, r, u, "signed in"); err != nil {
		c.internal(w, r, "login", err)
		return
	}
	next = safeNext(next)
	if u.MustChangePassword {
		next = passwordPath + "?next=" + url.QueryEscape(next)
	}
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// passwordPath is the "choose a new password" page, the only one a user
// whose password must change can open.
const passwordPath = "/password"

// Bounds of a chosen password: bcrypt reads at most 72 bytes.
const (
	passwordMin = 12
	passwordMax = 72
)

func (c *Console) servePasswordPage(w http.ResponseWriter, r *http.Request, v *viewer) {
	next := safeNext(r.URL.Query().Get("next"))
	if !v.MustChangePassword {
		http.Redirect(w, r, next, http.StatusSeeOther)
		return
	}
	c.render(w, r, http.StatusOK, "password", &pageData{Title: "Choose a new password", Next: next, Username: v.Username})
}

func (c *Console) serveSetPassword(w http.ResponseWriter, r *http.Request, v *viewer) {
	next := safeNext(r.PostFormValue("next"))
	if !v.MustChangePassword {
		http.Redirect(w, r, next, http.StatusSeeOther)
		return
	}
	pw, again := r.PostFormValue("new_password"), r.PostFormValue("confirm_password")
	fail := func(msg string) {
		c.render(w, r, http.StatusBadRequest, "password", &pageData{Title: "Choose a new password", Next: next, Username: v.Username, Error: msg})
	}
	switch {
	case len([]rune(pw)) < passwordMin:
		fail("The new password is too short: use at least " + strconv.Itoa(passwordMin) + " characters.")
		return
	case len(pw) > passwordMax:
		fail("The new password is too long: bcrypt reads at most " + strconv.Itoa(passwordMax) + " bytes.")
		return
	case pw != again:
		fail("The two new passwords differ; type the same one twice.")
		return
	case strings.EqualFold(pw, v.Username):
		fail("The new password is your username; choose another.")
		return
	}
	if err := c.comparePassword(r.Context(), []byte(v.PasswordHash), []byte(pw)); err == nil {
		fail("That is the password you were given; choose your own.")
		return
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
	if err != nil {
		c.internal(w, r, "set password", err)
		return
	}
	// Other sessions of this account end: whoever else knew the password
	// they were given and signed in with it loses the session.
	if err := c.store.SetPassword(r.Context(), v.ID, string(hash), v.session.IDHash); err != nil {
		c.internal(w, r, "set password", err)
		return
	}
	u := v.User
	u.PasswordHash, u.MustChangePassword = string(hash), false
	if c.cfg.PasswordChanged != nil {
		c.cfg.PasswordChanged(r.Context(), u)
	}
	c.log.Info("password changed", "user", u.Username, "remote", clientIP(r))
	c.Record(store.Event{Kind: store.EventPasswordChanged, Actor: u.Username, Message: "chose a new password from " + clientIP(r), OwnerID: u.ID})
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// startSession creates a session for u, sets its cookie on w and records
// the login; how says how u signed in ("signed in with example.com").
func (c *Console) startSession(w http.ResponseWriter, r *http.Request, u store.User, how string) error {
	if u.Pending {
		return errors.New("web: a pending account cannot start a session")
	}
	now := c.now()
	id := randomString(32)
	se := store.Session{IDHash: store.HashSecret(id), UserID: u.ID, CSRF: randomString(24), Created: now, Expires: now.Add(sessionIdle)}
	if err := c.store.CreateSession(r.Context(), se); err != nil {
		return err
	}
	// Housekeeping at a rate bounded by successful logins.
	c.store.DeleteExpiredSessions(r.Context(), now)
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: id, Path: "/", HttpOnly: true, Secure: true, SameSite: http.SameSiteStrictMode})
	c.log.Info("login", "user", u.Username, "remote", clientIP(r), "how", how)
	c.Record(store.Event{Kind: store.EventLogin, Actor: u.Username, Message: how + " from " + clientIP(r), OwnerID: u.ID})
	return nil
}

func (c *Console) serveLogout(w http.ResponseWriter, r *http.Request) {
	c.action(func(w http.ResponseWriter, r *http.Request, v *viewer) {
		c.store.DeleteSession(r.Context(), v.session.IDHash)
		http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: true, SameSite: http.SameSiteStrictMode})
		http.Redirect(w, r, "/", http.StatusSeeOther)
	}).ServeHTTP(w, r)
}

var errBusy = errors.New("web: too many password comparisons waiting")

// comparePassword runs c.compare with at most hashersMax running at once,
// waiting at most hashWait for a turn.
func (c *Console) comparePassword(ctx context.Context, hash, password []byte) error {
	t := time.NewTimer(hashWait)
	defer t.Stop()
	select {
	case c.hashers <- struct{}{}:
	case <-t.C:
		return errBusy
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.hashers }()
	return c.compare(hash, password)
}

// waitText says d in whole seconds or minutes, rounded up.
func waitText(d time.Duration) string {
	if d <= time.Minute {
		s := int(math.Ceil(d.Seconds()))
		if s == 1 {
			return "a second"
		}
		return strconv.Itoa(s) + " seconds"
	}
	m := int(math.Ceil(d.Minutes()))
	return strconv.Itoa(m) + " minutes"
}
