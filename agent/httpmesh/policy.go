package httpmesh

import (
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// route is a wire.HTTPRoute ready to match.
type route struct {
	prefix  string
	methods []string
	headers []headerMatch
	split   map[string]int
}

type headerMatch struct {
	name                string // canonical
	exact, prefix       string
	re                  *regexp.Regexp
	hasExact, hasPrefix bool
}

// compileRoutes turns the map's routes into matchers; a route that does
// not check (a map from a coordinator that validated less) is dropped.
func compileRoutes(rs []wire.HTTPRoute) []route {
	var out []route
	for _, r := range rs {
		if r.Check() != nil {
			continue
		}
		rt := route{prefix: r.PathPrefix, methods: r.Methods, split: r.Split}
		if r.Version != "" {
			rt.split = map[string]int{r.Version: 100}
		}
		for _, h := range r.Headers {
			m := headerMatch{name: http.CanonicalHeaderKey(h.Name), exact: h.Exact, prefix: h.Prefix,
				hasExact: h.Exact != "", hasPrefix: h.Prefix != ""}
			if h.Regex != "" {
				m.re = regexp.MustCompile("^(?:" + h.Regex + ")$") // Check compiled it
			}
			rt.headers = append(rt.headers, m)
		}
		out = append(out, rt)
	}
	return out
}

// match reports the split of the first route r matches.
func matchRoutes(rs []route, r *http.Request) (map[string]int, bool) {
	for i := range rs {
		if rs[i].matches(r) {
			return rs[i].split, true
		}
	}
	return nil, false
}

func (rt *route) matches(r *http.Request) bool {
	if rt.prefix != "" && !strings.HasPrefix(r.URL.Path, rt.prefix) {
		return false
	}
	if len(rt.methods) > 0 {
		ok := false
		for _, m := range rt.methods {
			ok = ok || m == r.Method
		}
		if !ok {
			return false
		}
	}
	for _, h := range rt.headers {
		vs := r.Header.Values(h.name)
		ok := false
		for _, v := range vs {
			switch {
			case h.hasExact:
				ok = v == h.exact
			case h.hasPrefix:
				ok = strings.HasPrefix(v, h.prefix)
			case h.re != nil:
				ok = h.re.MatchString(v)
			}
			if ok {
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// budget is a retry budget: retries are allowed while those of the last
// budgetWindow stay below percent of the requests of that window plus
// minPerSecond for each of its seconds (Finagle's RetryBudget, Envoy's
// retry_budget), so that retries can add at most percent to the load a
// failing service sees, plus a trickle.
type budget struct {
	percent, minPerSecond int

	mu      sync.Mutex // guards the fields below
	buckets [budgetWindow]budgetBucket
}

// budgetWindow is the seconds a budget looks back.
const budgetWindow = 10

type budgetBucket struct {
	sec               int64
	requests, retries int
}

func newBudget(r *wire.HTTPRetries) *budget {
	b := &budget{percent: r.BudgetPercent, minPerSecond: r.MinPerSecond}
	if b.percent == 0 {
		b.percent = wire.DefaultRetryBudgetPercent
	}
	switch b.minPerSecond {
	case 0:
		b.minPerSecond = wire.DefaultRetryMinPerSecond
	case -1:
		b.minPerSecond = 0
	}
	return b
}

func (b *budget) bucket(now time.Time) *budgetBucket {
	sec := now.Unix()
	bk := &b.buckets[sec%budgetWindow]
	if bk.sec != sec {
		*bk = budgetBucket{sec: sec}
	}
	return bk
}

// request counts a request.
func (b *budget) request(now time.Time) {
	b.mu.Lock()
	b.bucket(now).requests++
	b.mu.Unlock()
}

// retry reports whether one more retry fits and, if so, counts it.
func (b *budget) retry(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	sec := now.Unix()
	reqs, retries := 0, 0
	for _, bk := range b.buckets {
		if bk.sec > sec-budgetWindow && bk.sec <= sec {
			reqs += bk.requests
			retries += bk.retries
		}
	}
	if retries*100 >= reqs*b.percent+b.minPerSecond*budgetWindow*100 {
		return false
	}
	b.bucket(now).retries++
	return true
}

// outcome is what one attempt came to, for outlier detection and retries.
type outcome struct {
	code        int  // the status, 0 without a response
	connectFail bool // the provider could not be reached
	reset       bool // the connection broke before a response
}

func (o outcome) gatewayError() bool {
	return o.connectFail || o.reset || o.code == 502 || o.code == 503 || o.code == 504
}

func (o outcome) is5xx() bool { return o.code >= 500 || o.connectFail || o.reset }

// outliers is outlier detection of one service at one consumer.
type outliers struct {
	cfg wire.HTTPOutlier // defaults filled in

	mu    sync.Mutex // guards hosts
	hosts map[wire.NodeID]*outlierHost
}

type outlierHost struct {
	c5xx, cgw int
	until     time.Time // ejected until
	times     int       // how often it was ejected
}

func newOutliers(o *wire.HTTPOutlier) *outliers {
	c := *o
	if c.Consecutive5xx == 0 && c.ConsecutiveGatewayErrors == 0 {
		c.Consecutive5xx = wire.DefaultConsecutive5xx
	}
	if c.BaseEjectionMS == 0 {
		c.BaseEjectionMS = wire.DefaultBaseEjectionMS
	}
	if c.MaxEjectionMS == 0 {
		c.MaxEjectionMS = max(wire.DefaultMaxEjectionMS, c.BaseEjectionMS)
	}
	if c.MaxEjectionPercent == 0 {
		c.MaxEjectionPercent = wire.DefaultMaxEjectionPercent
	}
	return &outliers{cfg: c, hosts: map[wire.NodeID]*outlierHost{}}
}

// ejected reports whether node is ejected at now.
func (o *outliers) ejected(node wire.NodeID, now time.Time) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	h := o.hosts[node]
	return h != nil && now.Before(h.until)
}

// record notes an attempt's outcome at node; it reports how long node is
// ejected for when this outcome ejected it (0: not). providers is how
// many the service has, for the cap on ejected ones.
func (o *outliers) record(node wire.NodeID, out outcome, now time.Time, providers int) time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	h := o.hosts[node]
	if h == nil {
		h = &outlierHost{}
		o.hosts[node] = h
	}
	if now.Before(h.until) {
		return 0 // ejected already: a request in flight when it was
	}
	if !out.is5xx() {
		h.c5xx, h.cgw = 0, 0
		return 0
	}
	h.c5xx++
	if out.gatewayError() {
		h.cgw++
	} else {
		h.cgw = 0
	}
	trip := o.cfg.Consecutive5xx > 0 && h.c5xx >= o.cfg.Consecutive5xx ||
		o.cfg.ConsecutiveGatewayErrors > 0 && h.cgw >= o.cfg.ConsecutiveGatewayErrors
	if !trip {
		return 0
	}
	ejected := 0
	for _, x := range o.hosts {
		if now.Before(x.until) {
			ejected++
		}
	}
	// At most MaxEjectionPercent of the providers, and always one.
	if ejected > 0 && (ejected+1)*100 > providers*o.cfg.MaxEjectionPercent {
		return 0
	}
	h.times++
	d := min(time.Duration(o.cfg.BaseEjectionMS)*time.Millisecond*time.Duration(h.times), time.Duration(o.cfg.MaxEjectionMS)*time.Millisecond)
	h.until = now.Add(d)
	h.c5xx, h.cgw = 0, 0
	return d
}

// forget drops nodes that are no longer providers.
func (o *outliers) forget(keep func(wire.NodeID) bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for id := range o.hosts {
		if !keep(id) {
			delete(o.hosts, id)
		}
	}
}

// idempotent reports whether method may be retried without
// retryNonIdempotent (RFC 9110 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// normMethod bounds the method label of metrics.
func normMethod(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return m
	}
	return "OTHER"
}
