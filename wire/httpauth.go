package wire

import (
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
)

// HTTPAuth (version 13) is who may make which request to an HTTP
// service: the end-user JWT its providers check and the policy's
// request-level rules, decided by each provider per request.
type HTTPAuth struct {
	// JWT, when set, is checked on every request before the rules.
	JWT *JWT `json:"jwt,omitempty"`
	// Rules are the policy rules covering the service, in order, when any
	// of them has http or when conditions: the first whose From holds
	// the requesting node and whose conditions hold decides; a request
	// no rule matches is refused. Empty: every request of a node in
	// AllowedNodes passes (the policy decides per connection). Only the
	// maps of the service's providers carry them (they name consumers).
	Rules []RequestRule `json:"rules,omitempty"`
}

// JWT is the end-user token a provider checks (services.NAME.http.jwt).
type JWT struct {
	Issuer string `json:"issuer"`
	// JWKSURL (http or https) or JWKSFile (a path on the provider's host)
	// holds the issuer's public keys; exactly one is set.
	JWKSURL  string `json:"jwks_url,omitempty"`
	JWKSFile string `json:"jwks_file,omitempty"`
	// Audiences: the token's aud must hold one of them.
	Audiences []string `json:"audiences"`
	// ForwardClaims copy claims into request headers, replacing any
	// header of that name the client sent; sorted by claim.
	ForwardClaims []ForwardClaim `json:"forward_claims,omitempty"`
	// Optional (required: false): a request without a token passes on
	// to the rules with no claims; one with a bad token is still refused.
	Optional bool `json:"optional,omitempty"`
}

// ForwardClaim copies one claim into one header.
type ForwardClaim struct {
	Claim  string `json:"claim"`
	Header string `json:"header"`
}

// RequestRule is one policy rule as a provider evaluates it per request.
type RequestRule struct {
	// Rule is the rule's 1-based position in the policy and Line its line
	// in the file, for the refusal's body.
	Rule int  `json:"rule"`
	Line int  `json:"line"`
	Deny bool `json:"deny,omitempty"`
	// From is "*" or the decimal IDs of the nodes the rule's from matches.
	From []string `json:"from"`
	// Methods (empty: any) and Paths (empty: any; see MatchPath) of the
	// request; When: claims of its token, all of which must hold.
	Methods []string     `json:"methods,omitempty"`
	Paths   []string     `json:"paths,omitempty"`
	When    []ClaimMatch `json:"when,omitempty"`
}

// ClaimMatch is one condition on a token's claims: exactly one of
// Contains and Equals is set.
type ClaimMatch struct {
	Claim string `json:"claim"`
	// Contains holds when the claim is a list with this element, or a
	// string whose space-separated words hold it (OAuth's scope).
	Contains string `json:"contains,omitempty"`
	// Equals holds when the claim is this string (or the number or
	// boolean written so).
	Equals string `json:"equals,omitempty"`
}

// Bounds of HTTPAuth, checked by the policy and again by providers.
const (
	MaxClaimValue   = 1024 // bytes of a claim forwarded as a header
	MaxPathPattern  = 256
	MaxHeaderName   = 64
	MaxRequestRules = 1000
)

// FromNode reports whether the rule's From holds node id.
func (r *RequestRule) FromNode(id NodeID) bool {
	s := strconv.FormatUint(uint64(id), 10)
	return slices.ContainsFunc(r.From, func(f string) bool { return f == "*" || f == s })
}

// MatchesRequest reports whether the rule's conditions (not its From)
// hold for a request with method, path (clean; see CleanPath) and claims
// (nil without a token).
func (r *RequestRule) MatchesRequest(method, p string, claims map[string]any) bool {
	if len(r.Methods) > 0 && !slices.Contains(r.Methods, method) {
		return false
	}
	if len(r.Paths) > 0 && !slices.ContainsFunc(r.Paths, func(pat string) bool { return MatchPath(pat, p) }) {
		return false
	}
	for _, c := range r.When {
		if !c.Match(claims) {
			return false
		}
	}
	return true
}

// Conditional reports whether the rule decides per request.
func (r *RequestRule) Conditional() bool {
	return len(r.Methods)+len(r.Paths)+len(r.When) > 0
}

// Decide finds the rule deciding a request from node id: ok is false
// when none matches (the request is refused).
func (a *HTTPAuth) Decide(id NodeID, method, p string, claims map[string]any) (rule *RequestRule, ok bool) {
	for i := range a.Rules {
		r := &a.Rules[i]
		if r.FromNode(id) && r.MatchesRequest(method, p, claims) {
			return r, true
		}
	}
	return nil, false
}

// MatchPath reports whether path p matches pattern pat: "*" matches
// every path, "/api/*" every path starting with "/api/", and any other
// pattern only itself.
func MatchPath(pat, p string) bool {
	if pat == "*" {
		return true
	}
	if prefix, ok := strings.CutSuffix(pat, "*"); ok {
		return strings.HasPrefix(p, prefix)
	}
	return p == pat
}

// CleanPath reports whether p is a clean absolute path: no "." or ".."
// segments, no "//" and no backslash, so that what a rule's paths match
// is what the service reads. A trailing slash is allowed.
func CleanPath(p string) bool {
	if p == "" || p[0] != '/' || strings.ContainsRune(p, '\\') {
		return false
	}
	c := path.Clean(p)
	return c == p || c+"/" == p
}

// ValidPathPattern checks a rule's path pattern (see MatchPath).
func ValidPathPattern(pat string) error {
	switch {
	case pat == "*":
		return nil
	case len(pat) > MaxPathPattern:
		return fmt.Errorf("path %.20q… is longer than %d characters", pat, MaxPathPattern)
	case !strings.HasPrefix(pat, "/"):
		return fmt.Errorf("path %q must start with / (or be * for any path)", pat)
	case strings.Contains(strings.TrimSuffix(pat, "*"), "*"):
		return fmt.Errorf("path %q: * may only end a path (a prefix: /api/*)", pat)
	case strings.ContainsAny(pat, "?#\\"):
		return fmt.Errorf("path %q: a path holds no query (?), fragment (#) or backslash", pat)
	}
	for _, c := range pat {
		if c <= ' ' || c == 0x7f {
			return fmt.Errorf("path %q holds a space or a control character", pat)
		}
	}
	if !CleanPath(strings.TrimSuffix(pat, "*")) && !strings.HasSuffix(pat, "/*") {
		return fmt.Errorf("path %q is not clean (no //, . or .. segments); requests are matched clean", pat)
	}
	return nil
}

// ValidMethod checks an HTTP method of a rule: an upper-case token.
func ValidMethod(m string) error {
	if m == "" || len(m) > 32 {
		return fmt.Errorf("method %q must be 1 to 32 characters", m)
	}
	for _, c := range m {
		if !(c >= 'A' && c <= 'Z' || c == '-' || c == '_') {
			return fmt.Errorf("method %q: write it in upper case (GET, POST, …)", m)
		}
	}
	return nil
}

// ValidClaimName checks a claim's name: 1 to 128 printable characters.
func ValidClaimName(s string) error {
	if s == "" || len(s) > 128 {
		return fmt.Errorf("claim name %q must be 1 to 128 characters", s)
	}
	for _, c := range s {
		if c < ' ' || c == 0x7f {
			return fmt.Errorf("claim name %q holds a control character", s)
		}
	}
	return nil
}

// reservedHeaders may not receive claims: they frame the request, carry
// credentials or are hop-by-hop.
var reservedHeaders = []string{"authorization", "connection", "content-length", "content-type", "cookie",
	"expect", "host", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
	"trailer", "transfer-encoding", "upgrade", "traceparent", "tracestate"}

// ValidHeaderName checks a header that receives a claim: an HTTP token
// of at most MaxHeaderName characters, not one of the headers that frame
// the request, carry credentials or are hop-by-hop.
func ValidHeaderName(h string) error {
	if h == "" || len(h) > MaxHeaderName {
		return fmt.Errorf("header %q must be 1 to %d characters", h, MaxHeaderName)
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("!#$%&'*+-.^_`|~", c)) {
			return fmt.Errorf("header %q may only hold letters, digits and !#$%%&'*+-.^_`|~", h)
		}
	}
	if slices.Contains(reservedHeaders, strings.ToLower(h)) {
		return fmt.Errorf("header %q frames the request or carries credentials; choose another (x-user)", h)
	}
	return nil
}

// Match reports whether the condition holds for claims (nil: no token).
func (c ClaimMatch) Match(claims map[string]any) bool {
	v, ok := claims[c.Claim]
	if !ok {
		return false
	}
	if c.Contains != "" {
		switch v := v.(type) {
		case []any:
			return slices.ContainsFunc(v, func(e any) bool { s, ok := ClaimString(e); return ok && s == c.Contains })
		case string:
			return slices.Contains(strings.Fields(v), c.Contains)
		}
		return false
	}
	s, ok := ClaimString(v)
	return ok && s == c.Equals
}

// ClaimString writes a scalar claim (string, number, boolean) as a
// string; ok is false for lists, objects and null.
func ClaimString(v any) (string, bool) {
	switch v := v.(type) {
	case string:
		return v, true
	case bool:
		return strconv.FormatBool(v), true
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64), true
	case int64:
		return strconv.FormatInt(v, 10), true
	case int:
		return strconv.Itoa(v), true
	}
	return "", false
}

// Check validates what a provider receives, so that a bad map is refused
// with a reason rather than half applied.
func (a *HTTPAuth) Check() error {
	if a == nil {
		return nil
	}
	if j := a.JWT; j != nil {
		if j.Issuer == "" {
			return fmt.Errorf("jwt: no issuer")
		}
		if (j.JWKSURL == "") == (j.JWKSFile == "") {
			return fmt.Errorf("jwt: exactly one of jwks_url and jwks_file")
		}
		if len(j.Audiences) == 0 {
			return fmt.Errorf("jwt: no audiences")
		}
		for _, f := range j.ForwardClaims {
			if err := ValidClaimName(f.Claim); err != nil {
				return fmt.Errorf("jwt: %w", err)
			}
			if err := ValidHeaderName(f.Header); err != nil {
				return fmt.Errorf("jwt: %w", err)
			}
		}
	}
	if len(a.Rules) > MaxRequestRules {
		return fmt.Errorf("%d request rules, more than %d", len(a.Rules), MaxRequestRules)
	}
	for _, r := range a.Rules {
		for _, m := range r.Methods {
			if err := ValidMethod(m); err != nil {
				return fmt.Errorf("rule %d: %w", r.Rule, err)
			}
		}
		for _, p := range r.Paths {
			if err := ValidPathPattern(p); err != nil {
				return fmt.Errorf("rule %d: %w", r.Rule, err)
			}
		}
		for _, c := range r.When {
			if err := ValidClaimName(c.Claim); err != nil {
				return fmt.Errorf("rule %d: %w", r.Rule, err)
			}
			if (c.Contains == "") == (c.Equals == "") {
				return fmt.Errorf("rule %d: claim %q needs exactly one of contains and equals", r.Rule, c.Claim)
			}
		}
	}
	return nil
}
