package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// HealthSpec is how a provider checks its own target.
type HealthSpec struct {
	// Kind is HealthTCP (connect), HealthHTTP (GET Path) or HealthNone.
	Kind string
	// Path is the HTTP path, starting with '/'.
	Path string
	// Status is the HTTP status expected; 0 accepts 200 to 399.
	Status int
}

// Kinds of health check.
const (
	HealthTCP  = "tcp"
	HealthHTTP = "http"
	HealthNone = "none"
)

// Defaults of health checking (ProviderConfig).
const (
	DefaultHealthInterval = 2 * time.Second
	DefaultHealthTimeout  = time.Second
)

// ParseHealth parses a health spec as given to --health or the health=
// option of --expose: "" or "tcp" (connect to the target, the default),
// "http:/PATH" (GET it, expect 200-399), "http:/PATH@STATUS" (expect that
// status), or "none" (no checks: consumers only learn of a dead target
// when a connection fails).
func ParseHealth(s string) (HealthSpec, error) {
	const want = `want "tcp", "none", "http:/PATH" or "http:/PATH@STATUS", e.g. http:/healthz`
	s = strings.TrimSpace(s)
	switch s {
	case "", HealthTCP:
		return HealthSpec{Kind: HealthTCP}, nil
	case HealthNone:
		return HealthSpec{Kind: HealthNone}, nil
	}
	rest, ok := strings.CutPrefix(s, "http:")
	if !ok {
		return HealthSpec{}, fmt.Errorf("health %q: %s", s, want)
	}
	spec := HealthSpec{Kind: HealthHTTP, Path: rest}
	if i := strings.LastIndexByte(rest, '@'); i >= 0 {
		code, err := strconv.Atoi(rest[i+1:])
		if err != nil || code < 100 || code > 599 {
			return HealthSpec{}, fmt.Errorf("health %q: status %q must be an HTTP status from 100 to 599", s, rest[i+1:])
		}
		spec.Path, spec.Status = rest[:i], code
	}
	if !strings.HasPrefix(spec.Path, "/") || len(spec.Path) > 1024 {
		return HealthSpec{}, fmt.Errorf("health %q: the path must start with '/' (at most 1024 bytes); %s", s, want)
	}
	for _, c := range spec.Path {
		if c <= ' ' || c == 0x7f {
			return HealthSpec{}, fmt.Errorf("health %q: the path may not hold spaces or control characters", s)
		}
	}
	return spec, nil
}

// String is the spec as ParseHealth reads it.
func (h HealthSpec) String() string {
	switch h.Kind {
	case HealthHTTP:
		if h.Status != 0 {
			return fmt.Sprintf("http:%s@%d", h.Path, h.Status)
		}
		return "http:" + h.Path
	case "":
		return HealthTCP
	}
	return h.Kind
}

// CheckTarget checks target once as spec says, within timeout; nil is
// healthy. The error reads well after "unhealthy: ".
func CheckTarget(ctx context.Context, target string, spec HealthSpec, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch spec.Kind {
	case HealthNone:
		return nil
	case HealthHTTP:
		tr := &http.Transport{DialContext: (&net.Dialer{}).DialContext, DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+target+spec.Path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "meshlink-health")
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return errors.New(shortErr(err))
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		ok := resp.StatusCode >= 200 && resp.StatusCode < 400
		if spec.Status != 0 {
			ok = resp.StatusCode == spec.Status
		}
		if !ok {
			return fmt.Errorf("GET %s answered %d", spec.Path, resp.StatusCode)
		}
		return nil
	default:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			return errors.New(shortErr(err))
		}
		c.Close()
		return nil
	}
}

// ExportHealth is the last check of one export's target.
type ExportHealth struct {
	Name string
	// Checked is false before the first check, and always with checks off.
	Checked bool
	Healthy bool
	Error   string
	Since   time.Time
}

// checker checks one export's target until stopped.
type checker struct {
	e      Export
	spec   HealthSpec
	cancel context.CancelFunc
	done   chan struct{}
}

// setCheckersLocked starts a checker for each export whose target or
// spec is new and stops those of exports gone or changed. p.mu is held.
func (p *Provider) setCheckersLocked(es []Export) {
	keep := map[string]bool{}
	for _, e := range es {
		if e.Health == "" && !wire.HasTCP(e.Protocol) {
			continue // a UDP target has no connect to check
		}
		spec, err := ParseHealth(e.Health)
		if err != nil {
			// Checked when the export was added; an old saved one that
			// no longer parses falls back to the default.
			spec = HealthSpec{Kind: HealthTCP}
		}
		if spec.Kind == HealthNone {
			continue
		}
		keep[e.Name] = true
		if ck := p.checkers[e.Name]; ck != nil && ck.e.Target == e.Target && ck.spec == spec {
			continue
		}
		p.stopCheckerLocked(e.Name)
		ctx, cancel := context.WithCancel(p.ctx)
		ck := &checker{e: e, spec: spec, cancel: cancel, done: make(chan struct{})}
		p.checkers[e.Name] = ck
		p.hwg.Add(1)
		go p.runChecker(ctx, ck)
	}
	for name := range p.checkers {
		if !keep[name] {
			p.stopCheckerLocked(name)
		}
	}
	for name := range p.health {
		if !keep[name] {
			delete(p.health, name)
		}
	}
}

func (p *Provider) stopCheckerLocked(name string) {
	if ck := p.checkers[name]; ck != nil {
		ck.cancel()
		delete(p.checkers, name)
	}
}

func (p *Provider) runChecker(ctx context.Context, ck *checker) {
	defer p.hwg.Done()
	defer close(ck.done)
	t := time.NewTicker(p.cfg.HealthInterval)
	defer t.Stop()
	for {
		err := CheckTarget(ctx, ck.e.Target, ck.spec, p.cfg.HealthTimeout)
		if ctx.Err() != nil {
			return
		}
		p.noteHealth(ck.e, err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// noteHealth records a check's result and tells OnHealth of a change.
func (p *Provider) noteHealth(e Export, err error) {
	h := ExportHealth{Name: e.Name, Checked: true, Healthy: err == nil, Since: time.Now()}
	if err != nil {
		h.Error = err.Error()
	}
	p.mu.Lock()
	if _, ok := p.checkers[e.Name]; !ok || p.closed {
		p.mu.Unlock()
		return
	}
	old, had := p.health[e.Name]
	changed := !had || old.Healthy != h.Healthy || old.Error != h.Error
	if !changed {
		h.Since = old.Since
	}
	p.health[e.Name] = h
	p.mu.Unlock()
	if !changed {
		return
	}
	if h.Healthy {
		p.log.Info("service target healthy", "service", e.Name, "target", e.Target)
	} else {
		p.log.Warn("service target unhealthy; consumers are sent elsewhere", "service", e.Name, "target", e.Target, "err", h.Error)
	}
	if p.cfg.OnHealth != nil {
		p.cfg.OnHealth()
	}
}

// Health reports the last check of every export that has checks, sorted
// by name.
func (p *Provider) Health() []ExportHealth {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []ExportHealth
	for _, e := range *p.exports.Load() {
		if _, ok := p.checkers[e.Name]; !ok {
			continue
		}
		h, ok := p.health[e.Name]
		if !ok {
			h = ExportHealth{Name: e.Name}
		}
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b ExportHealth) int { return strings.Compare(a.Name, b.Name) })
	return out
}
