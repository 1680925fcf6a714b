// Package httpauth decides, at a provider, whether each request of an
// HTTP service may reach its target: it checks the end-user JWT the
// policy file asks for (services.NAME.http.jwt: signature against the
// issuer's JWKS, iss, aud, exp and nbf), copies the claims it is told to
// into request headers (replacing whatever the client sent under those
// names), and evaluates the policy's request rules (http: methods,
// paths; when: claims) that the coordinator put, with the IDs of the
// nodes they name, into the provider's map (wire.HTTPAuth).
//
// A request without a valid token gets 401 with a WWW-Authenticate
// header (RFC 6750); one the rules refuse gets 403 naming the rule's
// line. An Authorizer has the shape of httpmesh's provider hook
// (Authorize) and also wraps any http.Handler (Middleware). A Set keeps
// one per service across network maps, so that key sets survive map
// updates that leave the jwt as it was.
package httpauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"reflect"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/meshlink/meshlink/wire"
)

// Algorithms are the signature algorithms a token may use: public-key
// ones only, so never "none" and never an HMAC keyed with a public key.
var Algorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512, jose.EdDSA,
}

// Bounds of a token.
const (
	// MaxToken bounds the bearer token in bytes; a longer one is refused
	// before it is parsed.
	MaxToken = 8 << 10
	// Leeway is the clock skew allowed on exp, nbf and iat.
	Leeway = 30 * time.Second
	// maxKeyTries bounds the keys tried for a token that names no kid.
	maxKeyTries = 8
)

// Reasons a request is refused: the values of the reason label of
// meshlink_http_auth_refused_total.
const (
	ReasonMissingToken    = "missing_token"
	ReasonMalformed       = "malformed"
	ReasonTooLarge        = "too_large"
	ReasonAlgorithm       = "algorithm"
	ReasonUnknownKey      = "unknown_key"
	ReasonBadSignature    = "bad_signature"
	ReasonExpired         = "expired"
	ReasonNotYetValid     = "not_yet_valid"
	ReasonWrongIssuer     = "wrong_issuer"
	ReasonWrongAudience   = "wrong_audience"
	ReasonKeysUnavailable = "keys_unavailable"
	ReasonForbidden       = "forbidden"
	ReasonBadPath         = "bad_path"
	ReasonMisconfigured   = "misconfigured"
)

// Reasons lists every reason, for metrics.
var Reasons = []string{ReasonMissingToken, ReasonMalformed, ReasonTooLarge, ReasonAlgorithm, ReasonUnknownKey,
	ReasonBadSignature, ReasonExpired, ReasonNotYetValid, ReasonWrongIssuer, ReasonWrongAudience,
	ReasonKeysUnavailable, ReasonForbidden, ReasonBadPath, ReasonMisconfigured}

// Config builds an Authorizer.
type Config struct {
	Service string
	Auth    *wire.HTTPAuth
	// Client fetches jwksURL; nil: one with FetchTimeout.
	Client *http.Client
	// Now is the clock; nil: time.Now.
	Now    func() time.Time
	Logger *slog.Logger
	// Refused, when set, is told of every refusal by reason.
	Refused func(service, reason string)
}

// Authorizer decides the requests of one service. It is safe for
// concurrent use.
type Authorizer struct {
	service string
	auth    *wire.HTTPAuth
	keys    *keySource // nil without jwt
	cache   tokenCache
	now     func() time.Time
	log     *slog.Logger
	refused func(service, reason string)
	headers []string // canonical forms of the forwarded claims' headers
	// broken: the configuration was refused; every request gets 503.
	broken bool
}

// New builds the Authorizer of cfg.Service; it checks cfg.Auth (as a
// provider must, whatever the coordinator sent) and reads no keys yet.
func New(cfg Config) (*Authorizer, error) {
	if err := cfg.Auth.Check(); err != nil {
		return nil, fmt.Errorf("httpauth: service %s: %w", cfg.Service, err)
	}
	if cfg.Auth == nil {
		cfg.Auth = &wire.HTTPAuth{}
	}
	a := &Authorizer{service: cfg.Service, auth: cfg.Auth, now: cfg.Now, log: cfg.Logger, refused: cfg.Refused}
	if a.now == nil {
		a.now = time.Now
	}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if j := cfg.Auth.JWT; j != nil {
		client := cfg.Client
		if client == nil {
			client = &http.Client{Timeout: FetchTimeout}
		}
		a.keys = newKeySource(j.JWKSURL, j.JWKSFile, client, a.now)
		for _, f := range j.ForwardClaims {
			a.headers = append(a.headers, http.CanonicalHeaderKey(f.Header))
		}
	}
	return a, nil
}

// sameKeys reports whether b reads the keys a reads from the same place.
func sameKeys(a, b *wire.JWT) bool {
	return a != nil && b != nil && a.JWKSURL == b.JWKSURL && a.JWKSFile == b.JWKSFile
}

// refusal is a request refused: status, reason label, words.
type refusal struct {
	status int
	reason string
	desc   string
}

// Authorize decides request r from node from, with the shape of
// httpmesh.Authorizer: ok, or the status, header and body of the
// refusal. It rewrites r's forwarded-claim headers (removing what the
// client sent under their names) and reads nothing of r's body.
func (a *Authorizer) Authorize(r *http.Request, from wire.NodeID) (status int, header http.Header, reason string, ok bool) {
	for _, h := range a.headers {
		r.Header.Del(h)
	}
	if a.broken {
		if a.refused != nil {
			a.refused(a.service, ReasonMisconfigured)
		}
		return http.StatusServiceUnavailable, http.Header{}, "meshlink: this provider cannot check the service's requests (its authorization settings are not valid; see the agent's log)", false
	}
	claims, ref := a.token(r)
	if ref == nil {
		ref = a.rules(r, from, claims)
	}
	if ref == nil {
		a.forward(r, claims)
		return 0, nil, "", true
	}
	if a.refused != nil {
		a.refused(a.service, ref.reason)
	}
	header = http.Header{}
	if ref.status == http.StatusUnauthorized {
		header.Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="meshlink/%s", error="invalid_token", error_description="%s"`, a.service, ref.desc))
		return ref.status, header, "meshlink: unauthorized: " + ref.desc, false
	}
	if ref.status == http.StatusForbidden {
		return ref.status, header, "meshlink: forbidden: " + ref.desc, false
	}
	return ref.status, header, "meshlink: " + ref.desc, false
}

// Middleware is Authorize around next, for servers other than
// httpmesh's provider; from says which node a request came from.
func (a *Authorizer) Middleware(from func(*http.Request) wire.NodeID, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		status, header, body, ok := a.Authorize(r, from(r))
		if !ok {
			for k, v := range header {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.WriteHeader(status)
			fmt.Fprintln(w, body)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func unauthorized(reason, desc string) *refusal {
	return &refusal{status: http.StatusUnauthorized, reason: reason, desc: desc}
}

// token checks r's bearer token: its claims, nil without a token when
// the jwt is optional (or there is no jwt).
func (a *Authorizer) token(r *http.Request) (map[string]any, *refusal) {
	j := a.auth.JWT
	if j == nil {
		return nil, nil
	}
	vals := r.Header.Values("Authorization")
	if len(vals) == 0 {
		if j.Optional {
			return nil, nil
		}
		return nil, unauthorized(ReasonMissingToken, "no bearer token")
	}
	if len(vals) > 1 {
		return nil, unauthorized(ReasonMalformed, "more than one Authorization header")
	}
	scheme, raw, _ := strings.Cut(strings.TrimSpace(vals[0]), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return nil, unauthorized(ReasonMissingToken, "no bearer token")
	}
	raw = strings.TrimSpace(raw)
	if len(raw) > MaxToken {
		return nil, unauthorized(ReasonTooLarge, "the token is too large")
	}
	return a.verify(r.Context(), raw, j)
}

// verify checks a compact JWS token against the issuer's keys and the
// jwt's expectations, returning its claims.
func (a *Authorizer) verify(ctx context.Context, raw string, j *wire.JWT) (map[string]any, *refusal) {
	now := a.now()
	gen := a.keys.generation()
	if claims, ok := a.cache.get(raw, now, gen); ok {
		return claims, nil
	}
	tok, err := jwt.ParseSigned(raw, Algorithms)
	if err != nil {
		if strings.Contains(err.Error(), "unexpected signature algorithm") {
			return nil, unauthorized(ReasonAlgorithm, "the token's signature algorithm is not allowed")
		}
		return nil, unauthorized(ReasonMalformed, "the token is not a signed JWT")
	}
	if len(tok.Headers) != 1 {
		return nil, unauthorized(ReasonMalformed, "the token is not a signed JWT")
	}
	hdr := tok.Headers[0]
	// A client that goes away must not fail the fetch others wait for.
	keys, err := a.keys.lookup(context.WithoutCancel(ctx), hdr.KeyID)
	if err != nil {
		a.log.Warn("cannot check tokens", "service", a.service, "err", err)
		return nil, &refusal{status: http.StatusUnauthorized, reason: ReasonKeysUnavailable, desc: "the issuer's keys are not available"}
	}
	if len(keys) == 0 {
		return nil, unauthorized(ReasonUnknownKey, "the token's key is not the issuer's")
	}
	var std jwt.Claims
	var all map[string]any
	verified := false
	for i, k := range keys {
		if i == maxKeyTries {
			break
		}
		if k.Algorithm != "" && k.Algorithm != hdr.Algorithm {
			continue
		}
		std, all = jwt.Claims{}, nil
		if err := tok.Claims(k.Key, &std, &all); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return nil, unauthorized(ReasonBadSignature, "the token's signature does not verify")
	}
	if std.Expiry == nil {
		return nil, unauthorized(ReasonMalformed, "the token has no exp")
	}
	err = std.ValidateWithLeeway(jwt.Expected{Issuer: j.Issuer, AnyAudience: j.Audiences, Time: now}, Leeway)
	switch {
	case err == nil:
	case errors.Is(err, jwt.ErrExpired):
		return nil, unauthorized(ReasonExpired, "the token expired")
	case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
		return nil, unauthorized(ReasonNotYetValid, "the token is not valid yet")
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return nil, unauthorized(ReasonWrongIssuer, "the token is from another issuer")
	case errors.Is(err, jwt.ErrInvalidAudience):
		return nil, unauthorized(ReasonWrongAudience, "the token is for another audience")
	default:
		return nil, unauthorized(ReasonMalformed, "the token's claims are not valid")
	}
	if all == nil {
		all = map[string]any{}
	}
	// gen again: the lookup may have read a new key set.
	a.cache.put(raw, all, minTime(now.Add(cacheFor), std.Expiry.Time().Add(Leeway)), a.keys.generation())
	return all, nil
}

// rules decides r by the request rules (none: allowed).
func (a *Authorizer) rules(r *http.Request, from wire.NodeID, claims map[string]any) *refusal {
	if len(a.auth.Rules) == 0 {
		return nil
	}
	p := r.URL.Path
	if r.Method == http.MethodConnect || r.URL.Opaque != "" {
		p = "" // an authority, not a path: only a rule without paths matches
	} else if !wire.CleanPath(p) || escapedSlash(r.URL.RawPath) {
		return &refusal{status: http.StatusBadRequest, reason: ReasonBadPath, desc: fmt.Sprintf("bad request: the path %q is not clean (., .., // or an escaped slash)", trim(p, 128))}
	}
	rule, ok := a.auth.Decide(from, r.Method, p, claims)
	what := sanitize(fmt.Sprintf("%s %s", trim(r.Method, 32), trim(p, 128)))
	switch {
	case !ok:
		return &refusal{status: http.StatusForbidden, reason: ReasonForbidden, desc: fmt.Sprintf("no policy rule lets this node make %s to %s", what, a.service)}
	case rule.Deny:
		return &refusal{status: http.StatusForbidden, reason: ReasonForbidden, desc: fmt.Sprintf("policy rule %d (line %d) denies %s to %s", rule.Rule, rule.Line, what, a.service)}
	}
	return nil
}

func escapedSlash(raw string) bool {
	l := strings.ToLower(raw)
	return strings.Contains(l, "%2f") || strings.Contains(l, "%5c")
}

// forward sets the forwarded claims' headers from claims.
func (a *Authorizer) forward(r *http.Request, claims map[string]any) {
	if claims == nil || a.auth.JWT == nil {
		return
	}
	for i, f := range a.auth.JWT.ForwardClaims {
		if v, ok := headerValue(claims[f.Claim]); ok {
			r.Header.Set(a.headers[i], v)
		}
	}
}

// headerValue writes a claim as a header value: a scalar as itself, a
// list of scalars joined by commas; control characters (CR, LF…) are
// dropped and the value cut to wire.MaxClaimValue bytes. ok is false
// for a missing, empty or structured claim.
func headerValue(v any) (string, bool) {
	var s string
	if l, isList := v.([]any); isList {
		parts := make([]string, 0, len(l))
		for _, e := range l {
			if es, ok := wire.ClaimString(e); ok {
				parts = append(parts, es)
			}
		}
		s = strings.Join(parts, ",")
	} else if vs, ok := wire.ClaimString(v); ok {
		s = vs
	}
	s = sanitize(s)
	return s, s != ""
}

func sanitize(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, s)
	return trim(s, wire.MaxClaimValue)
}

// trim cuts s to at most n bytes on a rune boundary.
func trim(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// equalAuth reports whether two configurations decide alike.
func equalAuth(a, b *wire.HTTPAuth) bool { return reflect.DeepEqual(a, b) }

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
