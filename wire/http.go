package wire

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// ServiceHTTP (version 12) is an HTTP service's traffic configuration as
// the coordinator evaluated it from the policy file's services.NAME.http.
// The zero value is an HTTP service with no timeout, no retries, no
// outlier detection and no routes: requests still go to providers one by
// one, by the service's split and the providers' health and weights.
type ServiceHTTP struct {
	// TimeoutMS bounds one request at the consumer, every attempt and
	// the response body included, in milliseconds; 0 is none.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// Retries, when set, retries failed attempts on another provider.
	Retries *HTTPRetries `json:"retries,omitempty"`
	// Outlier, when set, ejects providers that keep failing.
	Outlier *HTTPOutlier `json:"outlier,omitempty"`
	// Routes send matching requests to a version or a split of versions;
	// the first that matches decides; none matching: Service.Split.
	Routes []HTTPRoute `json:"routes,omitempty"`
}

// HTTPRetries is services.NAME.http.retries.
type HTTPRetries struct {
	// Attempts is how many times a request may be retried after its
	// first try, 1 to MaxHTTPRetries.
	Attempts int `json:"attempts"`
	// On lists what is retried: RetryConnectFailure, RetryReset, and
	// status codes 500 to 599 as decimal strings ("503").
	On []string `json:"on"`
	// NonIdempotent allows retrying POST, PATCH and the others that are
	// not idempotent (RFC 9110 9.2.2); by default only GET, HEAD,
	// OPTIONS, TRACE, PUT and DELETE are.
	NonIdempotent bool `json:"non_idempotent,omitempty"`
	// BudgetPercent caps retries at this percentage of the requests of
	// the last 10 s, plus MinPerSecond every second; 0 is
	// DefaultRetryBudgetPercent.
	BudgetPercent int `json:"budget_percent,omitempty"`
	// MinPerSecond is the retries always allowed per second, whatever
	// the budget (so that a quiet service still retries); 0 is
	// DefaultRetryMinPerSecond, -1 none.
	MinPerSecond int `json:"min_per_second,omitempty"`
}

// Retry conditions of HTTPRetries.On besides status codes.
const (
	// RetryConnectFailure: the provider could not be reached (the request
	// was never sent).
	RetryConnectFailure = "connect-failure"
	// RetryReset: the connection broke before a response came.
	RetryReset = "reset"
)

// Bounds and defaults of HTTP traffic settings.
const (
	MaxHTTPRetries            = 10
	DefaultRetryBudgetPercent = 20
	DefaultRetryMinPerSecond  = 3
	// MaxHTTPRoutes bounds the routes of one service.
	MaxHTTPRoutes = 256
	// Defaults of outlier detection (HTTPOutlier's zero fields).
	DefaultConsecutive5xx     = 5
	DefaultBaseEjectionMS     = 30_000
	DefaultMaxEjectionMS      = 300_000
	DefaultMaxEjectionPercent = 50
	// MaxHTTPTimeoutMS bounds every duration of ServiceHTTP.
	MaxHTTPTimeoutMS  int64 = 24 * 3600 * 1000
	maxHTTPMatchValue       = 1024
)

// HTTPOutlier is services.NAME.http.outlierDetection: a provider that
// answers Consecutive5xx 5xx responses in a row, or
// ConsecutiveGatewayErrors gateway errors (502, 503, 504, or no
// connection) in a row, is ejected: no request goes to it for
// BaseEjectionMS times the number of times it was ejected, at most
// MaxEjectionMS. At most MaxEjectionPercent of a service's providers
// are ejected at once, and always at least one may be.
type HTTPOutlier struct {
	// Consecutive5xx is 0 for off.
	Consecutive5xx int `json:"consecutive_5xx,omitempty"`
	// ConsecutiveGatewayErrors is 0 for off.
	ConsecutiveGatewayErrors int   `json:"consecutive_gateway_errors,omitempty"`
	BaseEjectionMS           int64 `json:"base_ejection_ms,omitempty"`
	MaxEjectionMS            int64 `json:"max_ejection_ms,omitempty"`
	MaxEjectionPercent       int   `json:"max_ejection_percent,omitempty"`
}

// HTTPRoute is one of services.NAME.http.routes: requests matching every
// condition given go to Version, or to a version drawn by Split.
type HTTPRoute struct {
	// PathPrefix matches the request path's start ("/api/").
	PathPrefix string `json:"path_prefix,omitempty"`
	// Methods matches any of these methods (upper case).
	Methods []string `json:"methods,omitempty"`
	// Headers must all match.
	Headers []HTTPHeaderMatch `json:"headers,omitempty"`
	Version string            `json:"version,omitempty"`
	Split   map[string]int    `json:"split,omitempty"`
}

// HTTPHeaderMatch matches one request header (canonical name) by exactly
// one of Exact, Prefix and Regex (RE2, anchored at both ends).
type HTTPHeaderMatch struct {
	Name   string `json:"name"`
	Exact  string `json:"exact,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	Regex  string `json:"regex,omitempty"`
}

// Timeout is TimeoutMS as a duration.
func (h *ServiceHTTP) Timeout() time.Duration { return time.Duration(h.TimeoutMS) * time.Millisecond }

// Check validates an HTTP configuration; the policy parser says where
// each problem is, the agent checks again what a map carries.
func (h *ServiceHTTP) Check() error {
	if h.TimeoutMS < 0 || h.TimeoutMS > MaxHTTPTimeoutMS {
		return fmt.Errorf("timeout must be positive and at most 24h")
	}
	if r := h.Retries; r != nil {
		if err := r.Check(); err != nil {
			return fmt.Errorf("retries: %w", err)
		}
	}
	if o := h.Outlier; o != nil {
		if err := o.Check(); err != nil {
			return fmt.Errorf("outlierDetection: %w", err)
		}
	}
	if len(h.Routes) > MaxHTTPRoutes {
		return fmt.Errorf("%d routes, more than %d", len(h.Routes), MaxHTTPRoutes)
	}
	for i, rt := range h.Routes {
		if err := rt.Check(); err != nil {
			return fmt.Errorf("route %d: %w", i+1, err)
		}
	}
	return nil
}

// Check validates retries.
func (r *HTTPRetries) Check() error {
	if r.Attempts < 1 || r.Attempts > MaxHTTPRetries {
		return fmt.Errorf("attempts %d must be 1 to %d (retries after the first try)", r.Attempts, MaxHTTPRetries)
	}
	if len(r.On) == 0 {
		return fmt.Errorf("on lists nothing to retry; e.g. on: [connect-failure, reset, 503]")
	}
	for _, c := range r.On {
		if _, err := ParseRetryOn(c); err != nil {
			return err
		}
	}
	if r.BudgetPercent < 0 || r.BudgetPercent > 100 {
		return fmt.Errorf("budgetPercent %d must be 1 to 100", r.BudgetPercent)
	}
	if r.MinPerSecond < -1 || r.MinPerSecond > 1000 {
		return fmt.Errorf("minRetriesPerSecond %d must be 0 to 1000", r.MinPerSecond)
	}
	return nil
}

// ParseRetryOn checks one condition of HTTPRetries.On: a name, or a
// status code from 500 to 599 (answered as its number, else 0).
func ParseRetryOn(s string) (int, error) {
	switch s {
	case RetryConnectFailure, RetryReset:
		return 0, nil
	}
	code := 0
	if len(s) == 3 {
		for _, c := range s {
			if c < '0' || c > '9' {
				code = -1
				break
			}
			code = code*10 + int(c-'0')
		}
	}
	if code < 500 || code > 599 {
		return 0, fmt.Errorf("retry condition %q must be connect-failure, reset or a status code from 500 to 599", s)
	}
	return code, nil
}

// Check validates outlier detection.
func (o *HTTPOutlier) Check() error {
	if o.Consecutive5xx < 0 || o.Consecutive5xx > 1000 || o.ConsecutiveGatewayErrors < 0 || o.ConsecutiveGatewayErrors > 1000 {
		return fmt.Errorf("consecutive5xx and consecutiveGatewayErrors must be 0 (off) to 1000")
	}
	if o.BaseEjectionMS < 0 || o.BaseEjectionMS > MaxHTTPTimeoutMS || o.MaxEjectionMS < 0 || o.MaxEjectionMS > MaxHTTPTimeoutMS {
		return fmt.Errorf("baseEjectionTime and maxEjectionTime must be positive and at most 24h")
	}
	if o.MaxEjectionPercent < 0 || o.MaxEjectionPercent > 100 {
		return fmt.Errorf("maxEjectionPercent %d must be 0 to 100", o.MaxEjectionPercent)
	}
	return nil
}

// Check validates a route.
func (rt *HTTPRoute) Check() error {
	if rt.PathPrefix != "" && !strings.HasPrefix(rt.PathPrefix, "/") {
		return fmt.Errorf("path %q must start with /", rt.PathPrefix)
	}
	if len(rt.PathPrefix) > maxHTTPMatchValue {
		return fmt.Errorf("path is longer than %d bytes", maxHTTPMatchValue)
	}
	for _, m := range rt.Methods {
		if !validToken(m) || strings.ToUpper(m) != m {
			return fmt.Errorf("method %q must be an upper-case HTTP method such as GET", m)
		}
	}
	if len(rt.Headers) > 64 {
		return fmt.Errorf("%d header matches, more than 64", len(rt.Headers))
	}
	for _, h := range rt.Headers {
		if !validToken(h.Name) {
			return fmt.Errorf("header name %q is not a valid HTTP header name", h.Name)
		}
		n := 0
		for _, v := range []string{h.Exact, h.Prefix, h.Regex} {
			if v != "" {
				n++
			}
			if len(v) > maxHTTPMatchValue {
				return fmt.Errorf("header %s: a match value is longer than %d bytes", h.Name, maxHTTPMatchValue)
			}
		}
		if n != 1 {
			return fmt.Errorf("header %s: give exactly one of exact, prefix and regex", h.Name)
		}
		if h.Regex != "" {
			if _, err := regexp.Compile("^(?:" + h.Regex + ")$"); err != nil {
				return fmt.Errorf("header %s: regex: %v", h.Name, err)
			}
		}
	}
	switch {
	case rt.Version != "" && len(rt.Split) > 0:
		return fmt.Errorf("give a version or a split, not both")
	case rt.Version != "":
		return ValidVersion(rt.Version)
	case len(rt.Split) > 0:
		return CheckSplit(rt.Split)
	}
	return fmt.Errorf("give a version (version: v2) or a split (split: {v1: 90, v2: 10})")
}

// CheckSplit validates a split: versions with percentages summing to 100.
func CheckSplit(split map[string]int) error {
	sum := 0
	keys := make([]string, 0, len(split))
	for v := range split {
		keys = append(keys, v)
	}
	slices.Sort(keys)
	for _, v := range keys {
		if err := ValidVersion(v); err != nil {
			return fmt.Errorf("split: %w", err)
		}
		if p := split[v]; p < 0 || p > 100 {
			return fmt.Errorf("split: %s: %d must be a percentage from 0 to 100", v, p)
		}
		sum += split[v]
	}
	if sum != 100 {
		return fmt.Errorf("split percentages sum to %d; make them sum to 100, e.g. {v1: 90, v2: 10}", sum)
	}
	return nil
}

// validToken reports whether s is an RFC 9110 token (method, header name).
func validToken(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}
