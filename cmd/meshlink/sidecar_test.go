package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestHealthcheck: the image's HEALTHCHECK command exits 0 only on a 200,
// trusts a loopback HTTPS endpoint's self-signed certificate, and says
// what is wrong otherwise.
func TestHealthcheck(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer ok.Close()
	unready := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, `{"ready":false}`, http.StatusServiceUnavailable)
	}))
	defer unready.Close()
	tlsOK := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer tlsOK.Close()
	cases := []struct {
		name   string
		args   []string
		code   int
		stderr string
		envURL string
	}{
		{name: "200", args: []string{ok.URL + "/healthz"}},
		{name: "self-signed loopback https", args: []string{tlsOK.URL + "/healthz"}},
		{name: "by --url", args: []string{"--url", ok.URL}},
		{name: "by MESHLINK_HEALTHCHECK_URL", envURL: ok.URL},
		{name: "503", args: []string{unready.URL}, code: 1, stderr: "503 Service Unavailable"},
		{name: "refused", args: []string{"http://127.0.0.1:1/healthz"}, code: 1, stderr: "refused"},
		{name: "not a URL", args: []string{"127.0.0.1:9099"}, code: 2, stderr: "not an http(s) URL"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.envURL != "" {
				t.Setenv("MESHLINK_HEALTHCHECK_URL", tc.envURL)
			}
			_, stderr, code := runMain(t, append([]string{"healthcheck"}, tc.args...)...)
			if code != tc.code || !strings.Contains(stderr, tc.stderr) {
				t.Fatalf("exit %d, stderr %q; want %d with %q", code, stderr, tc.code, tc.stderr)
			}
		})
	}
}

// TestDrainTimeoutRefusesNegative: a negative --drain-timeout is a usage
// error naming the flag.
func TestDrainTimeoutRefusesNegative(t *testing.T) {
	_, stderr, code := runMain(t, "agent", "--state", t.TempDir(), "--drain-timeout", "-1s", "--join", "x")
	if code != 2 || !strings.Contains(stderr, "--drain-timeout") {
		t.Fatalf("exit %d, %q", code, stderr)
	}
}
