package policy

import (
	"net/http"
	"strings"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// HTTP is services.NAME.http: how an HTTP service's requests are carried.
// Its presence makes the service HTTP, as protocol: http does.
//
//	services:
//	  web:
//	    protocol: http
//	    split: {v1: 90, v2: 10}
//	    http:
//	      timeout: 5s
//	      retries: {attempts: 2, on: [connect-failure, reset, 503]}
//	      outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s}
//	      routes:
//	        - match: {headers: {x-canary: {exact: "true"}}}
//	          version: v2
type HTTP struct {
	// Timeout bounds each request at the consumer (all attempts and the
	// response body); none by default.
	Timeout Selector `yaml:"timeout"`
	Retries *Retries `yaml:"retries"`
	// OutlierDetection ejects providers that keep failing.
	OutlierDetection *Outlier `yaml:"outlierDetection"`
	// Routes: first match wins; no match uses the service's split.
	Routes []Route `yaml:"routes"`
	// JWT, when set, makes the providers check an end-user token on
	// every request (httpauth.go).
	JWT *JWT `yaml:"jwt"`
}

// Retries is services.NAME.http.retries.
type Retries struct {
	// Attempts is how many retries a request may have after its first try.
	Attempts int `yaml:"attempts"`
	// On: connect-failure, reset, or a status from 500 to 599.
	On []Selector `yaml:"on"`
	// RetryNonIdempotent allows retrying POST and PATCH too.
	RetryNonIdempotent bool `yaml:"retryNonIdempotent"`
	// BudgetPercent caps retries at this share of the requests of the
	// last 10 s (default 20), plus MinRetriesPerSecond (default 3).
	BudgetPercent       int  `yaml:"budgetPercent"`
	MinRetriesPerSecond *int `yaml:"minRetriesPerSecond"`
}

// Outlier is services.NAME.http.outlierDetection.
type Outlier struct {
	Consecutive5xx           int      `yaml:"consecutive5xx"`
	ConsecutiveGatewayErrors int      `yaml:"consecutiveGatewayErrors"`
	BaseEjectionTime         Selector `yaml:"baseEjectionTime"`
	MaxEjectionTime          Selector `yaml:"maxEjectionTime"`
	MaxEjectionPercent       int      `yaml:"maxEjectionPercent"`
}

// Route is one of services.NAME.http.routes.
type Route struct {
	Match   RouteMatch     `yaml:"match"`
	Version Selector       `yaml:"version"`
	Split   map[string]int `yaml:"split"`
}

// RouteMatch is what a request must have for its route to apply; all of
// what is given.
type RouteMatch struct {
	// Path is a prefix of the request's path.
	Path    Selector   `yaml:"path"`
	Methods []Selector `yaml:"methods"`
	// Headers by name, each matched exactly, by prefix or by a regex.
	Headers map[string]HeaderMatch `yaml:"headers"`
}

// HeaderMatch matches one header by one of its fields.
type HeaderMatch struct {
	Exact  Selector `yaml:"exact"`
	Prefix Selector `yaml:"prefix"`
	Regex  Selector `yaml:"regex"`
}

// isHTTP reports whether the entry makes its service HTTP.
func (s Service) isHTTP() bool { return s.Protocol.S == wire.ProtocolHTTP || s.HTTP != nil }

// ServiceHTTP is the HTTP configuration of service for the network map:
// nil when the service is not HTTP, neither declared so here nor provided
// as HTTP by a provider (provided). p may be nil (no policy).
func (p *Policy) ServiceHTTP(service string, provided bool) *wire.ServiceHTTP {
	if p != nil {
		if sv, ok := p.Services[service]; ok && sv.http != nil {
			h := *sv.http
			return &h
		}
	}
	if provided {
		return &wire.ServiceHTTP{}
	}
	return nil
}

// checkHTTP checks a service's protocol and http section and keeps their
// evaluation for ServiceHTTP.
func (p *Policy) checkHTTP(ps *problems, line int, name string, sv *Service) {
	switch sv.Protocol.S {
	case "", wire.ProtocolHTTP, wire.ProtocolTCP:
	default:
		ps.add(sv.Protocol.Line, "service %q: protocol %q: write http (or leave it out)", name, sv.Protocol.S)
	}
	if !sv.isHTTP() {
		return
	}
	out := &wire.ServiceHTTP{}
	sv.http = out
	h := sv.HTTP
	if h == nil {
		return
	}
	where := func(s Selector) int {
		if s.Line > 0 {
			return s.Line
		}
		return line
	}
	dur := func(s Selector, what string) int64 {
		if s.S == "" {
			return 0
		}
		d, err := time.ParseDuration(s.S)
		switch {
		case err != nil:
			ps.add(where(s), "service %q: http.%s %q: want a duration such as 500ms, 5s or 1m", name, what, s.S)
		case d <= 0 || d > 24*time.Hour:
			ps.add(where(s), "service %q: http.%s %s must be positive and at most 24h", name, what, s.S)
		case d < time.Millisecond:
			ps.add(where(s), "service %q: http.%s %s is below a millisecond", name, what, s.S)
		default:
			return d.Milliseconds()
		}
		return 0
	}
	out.TimeoutMS = dur(h.Timeout, "timeout")
	if r := h.Retries; r != nil {
		wr := &wire.HTTPRetries{Attempts: r.Attempts, NonIdempotent: r.RetryNonIdempotent, BudgetPercent: r.BudgetPercent}
		minPS := wire.DefaultRetryMinPerSecond
		if r.MinRetriesPerSecond != nil {
			if minPS = *r.MinRetriesPerSecond; minPS == 0 {
				wr.MinPerSecond = -1 // none, said on the wire
			} else {
				wr.MinPerSecond = minPS
			}
		}
		rl := line
		for _, on := range r.On {
			rl = where(on)
			wr.On = append(wr.On, on.S)
			if _, err := wire.ParseRetryOn(on.S); err != nil {
				ps.add(where(on), "service %q: http.retries.on: %v", name, err)
			}
		}
		switch {
		case r.Attempts < 1 || r.Attempts > wire.MaxHTTPRetries:
			ps.add(rl, "service %q: http.retries.attempts %d must be 1 to %d (retries after the first try)", name, r.Attempts, wire.MaxHTTPRetries)
		case len(r.On) == 0:
			ps.add(rl, "service %q: http.retries.on lists nothing to retry; e.g. on: [connect-failure, reset, 503]", name)
		case r.BudgetPercent < 0 || r.BudgetPercent > 100:
			ps.add(rl, "service %q: http.retries.budgetPercent %d must be 1 to 100", name, r.BudgetPercent)
		case minPS < 0 || minPS > 1000:
			ps.add(rl, "service %q: http.retries.minRetriesPerSecond %d must be 0 to 1000", name, minPS)
		}
		out.Retries = wr
	}
	if o := h.OutlierDetection; o != nil {
		wo := &wire.HTTPOutlier{Consecutive5xx: o.Consecutive5xx, ConsecutiveGatewayErrors: o.ConsecutiveGatewayErrors,
			BaseEjectionMS: dur(o.BaseEjectionTime, "outlierDetection.baseEjectionTime"),
			MaxEjectionMS:  dur(o.MaxEjectionTime, "outlierDetection.maxEjectionTime"), MaxEjectionPercent: o.MaxEjectionPercent}
		ol := lineOf(line, o.BaseEjectionTime, o.MaxEjectionTime)
		if err := wo.Check(); err != nil {
			ps.add(ol, "service %q: http.outlierDetection: %v", name, err)
		}
		if wo.MaxEjectionMS > 0 && wo.BaseEjectionMS > wo.MaxEjectionMS {
			ps.add(ol, "service %q: http.outlierDetection: baseEjectionTime is longer than maxEjectionTime", name)
		}
		out.Outlier = wo
	}
	if len(h.Routes) > wire.MaxHTTPRoutes {
		ps.add(line, "service %q: http.routes has %d routes, more than %d", name, len(h.Routes), wire.MaxHTTPRoutes)
		return
	}
	for i, rt := range h.Routes {
		m := rt.Match
		wr := wire.HTTPRoute{PathPrefix: m.Path.S, Version: rt.Version.S, Split: rt.Split}
		rl := lineOf(0, append([]Selector{m.Path, rt.Version}, m.Methods...)...)
		for _, mt := range m.Methods {
			wr.Methods = append(wr.Methods, strings.ToUpper(mt.S))
		}
		for _, hn := range sortedKeys(m.Headers) {
			hm := m.Headers[hn]
			rl = lineOf(rl, hm.Exact, hm.Prefix, hm.Regex)
			wr.Headers = append(wr.Headers, wire.HTTPHeaderMatch{Name: http.CanonicalHeaderKey(hn), Exact: hm.Exact.S, Prefix: hm.Prefix.S, Regex: hm.Regex.S})
		}
		if rl == 0 {
			rl = line
		}
		if err := wr.Check(); err != nil {
			ps.add(rl, "service %q: http.routes[%d]: %v", name, i+1, err)
		}
		out.Routes = append(out.Routes, wr)
	}
}

// lineOf is the first line among line (0: none) and the selectors'.
func lineOf(line int, ss ...Selector) int {
	for _, s := range ss {
		if s.Line > 0 && (line == 0 || s.Line < line) {
			line = s.Line
		}
	}
	return line
}

// httpFields lists the keys of the http section's types, for errors.
func httpFields(typ string) (section, fields string, ok bool) {
	switch typ {
	case "policy.HTTP":
		return "a service's http", "timeout, retries, outlierDetection, routes, jwt", true
	case "policy.Retries":
		return "http.retries", "attempts, on, retryNonIdempotent, budgetPercent, minRetriesPerSecond", true
	case "policy.Outlier":
		return "http.outlierDetection", "consecutive5xx, consecutiveGatewayErrors, baseEjectionTime, maxEjectionTime, maxEjectionPercent", true
	case "policy.Route":
		return "a route", "match, version, split", true
	case "policy.RouteMatch":
		return "a route's match", "path, methods, headers", true
	case "policy.HeaderMatch":
		return "a header match", "exact, prefix, regex", true
	}
	return "", "", false
}
