package policy_test

import (
	"reflect"
	"testing"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/wire"
)

const httpExample = `services:
  web:
    protocol: http
    split: {v1: 90, v2: 10}
    http:
      timeout: 5s
      retries:
        attempts: 2
        on: [connect-failure, reset, 502, 503]
        budgetPercent: 25
        minRetriesPerSecond: 0
      outlierDetection:
        consecutive5xx: 4
        consecutiveGatewayErrors: 2
        baseEjectionTime: 10s
        maxEjectionTime: 2m
        maxEjectionPercent: 30
      routes:
        - match:
            headers:
              x-canary: {exact: "true"}
          version: v2
        - match: {path: /api/, methods: [get, POST], headers: {user-agent: {regex: "curl/.*"}, x-team: {prefix: blue}}}
          split: {v1: 50, v2: 50}
  api:
    http: {}
  plain:
    split: {v1: 100}
`

func TestHTTPSection(t *testing.T) {
	p, err := policy.Parse("policy.yaml", []byte(httpExample))
	if err != nil {
		t.Fatal(err)
	}
	want := &wire.ServiceHTTP{
		TimeoutMS: 5000,
		Retries:   &wire.HTTPRetries{Attempts: 2, On: []string{"connect-failure", "reset", "502", "503"}, BudgetPercent: 25, MinPerSecond: -1},
		Outlier:   &wire.HTTPOutlier{Consecutive5xx: 4, ConsecutiveGatewayErrors: 2, BaseEjectionMS: 10000, MaxEjectionMS: 120000, MaxEjectionPercent: 30},
		Routes: []wire.HTTPRoute{
			{Headers: []wire.HTTPHeaderMatch{{Name: "X-Canary", Exact: "true"}}, Version: "v2"},
			{PathPrefix: "/api/", Methods: []string{"GET", "POST"}, Split: map[string]int{"v1": 50, "v2": 50},
				Headers: []wire.HTTPHeaderMatch{{Name: "User-Agent", Regex: "curl/.*"}, {Name: "X-Team", Prefix: "blue"}}},
		},
	}
	if got := p.ServiceHTTP("web", false); !reflect.DeepEqual(got, want) {
		t.Fatalf("web:\n got %+v\nwant %+v", got, want)
	}
	if got := p.ServiceHTTP("api", false); got == nil || got.Retries != nil || len(got.Routes) != 0 {
		t.Fatalf("api (an empty http section makes it HTTP): %+v", got)
	}
	if got := p.ServiceHTTP("plain", false); got != nil {
		t.Fatalf("plain is not HTTP: %+v", got)
	}
	if got := p.ServiceHTTP("plain", true); got == nil {
		t.Fatal("a service provided as HTTP is HTTP without a policy entry")
	}
	var none *policy.Policy
	if none.ServiceHTTP("x", false) != nil || none.ServiceHTTP("x", true) == nil {
		t.Fatal("without a policy only providers make a service HTTP")
	}
}

// TestBadHTTPSections: each mistake is refused with its line.
func TestBadHTTPSections(t *testing.T) {
	svc := func(body string) string { return "services:\n  web:\n    http:\n" + body }
	wantRefused(t, []badPolicy{
		{"unknown field", svc("      timeuot: 5s\n"), `policy.yaml:4: unknown field "timeuot" in a service's http (fields: timeout, retries, outlierDetection, routes, jwt)`},
		{"unknown retries field", svc("      retries: {attempts: 1, on: [503], tries: 2}\n"), `policy.yaml:4: unknown field "tries" in http.retries`},
		{"bad duration", svc("      timeout: soon\n"), `policy.yaml:4: service "web": http.timeout "soon": want a duration`},
		{"negative duration", svc("      timeout: -5s\n"), `policy.yaml:4: service "web": http.timeout -5s must be positive`},
		{"attempts 0", svc("      retries:\n        attempts: 0\n        on: [503]\n"), `policy.yaml:6: service "web": http.retries.attempts 0 must be 1 to 10`},
		{"attempts 11", svc("      retries:\n        attempts: 11\n        on: [503]\n"), `http.retries.attempts 11 must be 1 to 10`},
		{"retry on 404", svc("      retries:\n        attempts: 1\n        on: [404]\n"), `policy.yaml:6: service "web": http.retries.on: retry condition "404"`},
		{"no retry on", svc("      retries: {attempts: 1}\n"), `http.retries.on lists nothing to retry`},
		{"bad regex", svc("      routes:\n        - match: {headers: {x-a: {regex: \"(\"}}}\n          version: v2\n"), `policy.yaml:5: service "web": http.routes[1]: header X-A: regex`},
		{"two matches", svc("      routes:\n        - match: {headers: {x-a: {exact: a, prefix: b}}}\n          version: v2\n"), `give exactly one of exact, prefix and regex`},
		{"split sum", svc("      routes:\n        - match: {path: /a}\n          split: {v1: 50, v2: 40}\n"), `policy.yaml:5: service "web": http.routes[1]: split percentages sum to 90`},
		{"version and split", svc("      routes:\n        - match: {path: /a}\n          version: v1\n          split: {v1: 100}\n"), `give a version or a split, not both`},
		{"no target", svc("      routes:\n        - match: {path: /a}\n"), `give a version (version: v2) or a split`},
		{"path without slash", svc("      routes:\n        - match: {path: api}\n          version: v1\n"), `path "api" must start with /`},
		{"bad method", svc("      routes:\n        - match: {methods: [\"G T\"]}\n          version: v1\n"), `method "G T"`},
		{"ejection percent", svc("      outlierDetection: {maxEjectionPercent: 120}\n"), `maxEjectionPercent 120 must be 0 to 100`},
		{"base above max", svc("      outlierDetection: {baseEjectionTime: 5m, maxEjectionTime: 1m}\n"), `baseEjectionTime is longer than maxEjectionTime`},
		{"unknown protocol", "services:\n  web:\n    protocol: grpc\n", `policy.yaml:3: service "web": protocol "grpc": write http`},
	})
}
