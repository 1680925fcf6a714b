package httpauth

import (
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meshlink/meshlink/wire"
)

// Set keeps the Authorizers of the services a node provides, one per
// service, rebuilt from each network map: an Authorizer whose
// configuration did not change is kept as it is, and one whose jwt reads
// its keys from the same place keeps the keys it holds.
type Set struct {
	client *http.Client
	now    func() time.Time
	log    *slog.Logger

	refused *prometheus.CounterVec

	mu   sync.Mutex // guards the fields below
	byID map[string]*Authorizer
}

// SetConfig builds a Set; every field may be zero.
type SetConfig struct {
	Client *http.Client
	Now    func() time.Time
	Logger *slog.Logger
}

// NewSet returns an empty Set.
func NewSet(cfg SetConfig) *Set {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Set{client: cfg.Client, now: cfg.Now, log: log, byID: map[string]*Authorizer{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlink_http_auth_refused_total",
			Help: "Requests of HTTP services this node provides that were refused before reaching the target, by service and reason (missing_token, malformed, too_large, algorithm, unknown_key, bad_signature, expired, not_yet_valid, wrong_issuer, wrong_audience, keys_unavailable: 401; forbidden: 403; bad_path: 400; misconfigured: 503).",
		}, []string{"service", "reason"})}
}

// Collector is the Set's metrics, for the agent's registry.
func (s *Set) Collector() prometheus.Collector { return s.refused }

// Update makes the Set hold the Authorizers of the services of nm that
// node self provides and that carry HTTPAuth, and returns them by
// service (what to hand the provider's hook; a service missing from it
// needs none). A service whose HTTPAuth a provider cannot accept gets an
// Authorizer refusing everything with 503, never none: failing open would
// let every request through.
func (s *Set) Update(services []wire.Service, self wire.NodeID) map[string]*Authorizer {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := map[string]*Authorizer{}
	for _, sv := range services {
		if sv.HTTPAuth == nil || !provides(sv, self) {
			continue
		}
		old := s.byID[sv.Name]
		if old != nil && equalAuth(old.auth, sv.HTTPAuth) {
			next[sv.Name] = old
			continue
		}
		a, err := New(Config{Service: sv.Name, Auth: sv.HTTPAuth, Client: s.client, Now: s.now,
			Logger: s.log, Refused: s.count})
		if err != nil {
			s.log.Error("a service's request authorization is not valid; refusing its requests", "service", sv.Name, "err", err)
			a = &Authorizer{service: sv.Name, auth: sv.HTTPAuth, broken: true, now: time.Now, log: s.log, refused: s.count}
		} else if old != nil && old.keys != nil && sameKeys(old.auth.JWT, sv.HTTPAuth.JWT) {
			a.keys = old.keys
		}
		next[sv.Name] = a
	}
	for name := range s.byID {
		if next[name] == nil {
			for _, r := range Reasons {
				s.refused.DeleteLabelValues(name, r)
			}
		}
	}
	s.byID = next
	out := make(map[string]*Authorizer, len(next))
	for k, v := range next {
		out[k] = v
	}
	return out
}

// For is the Authorizer of service, nil when its requests need none.
func (s *Set) For(service string) *Authorizer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byID[service]
}

func (s *Set) count(service, reason string) { s.refused.WithLabelValues(service, reason).Inc() }

func provides(sv wire.Service, self wire.NodeID) bool {
	for _, p := range sv.Providers {
		if p.Node == self {
			return true
		}
	}
	return false
}

// Refused is how many requests of service were refused for reason.
func (s *Set) Refused(service, reason string) float64 {
	var m dto.Metric
	if err := s.refused.WithLabelValues(service, reason).Write(&m); err != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}
