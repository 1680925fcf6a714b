package httpauth

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/meshlink/meshlink/wire"
)

// FuzzParseJWKS: no key set document crashes the reader, and whatever it
// keeps is a valid public key.
func FuzzParseJWKS(f *testing.F) {
	f.Add([]byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"a"}]}`))
	f.Add([]byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"XYZ"}]}`))
	f.Add([]byte(`{"keys":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := parseJWKS(data)
		if err != nil {
			return
		}
		for _, k := range keys {
			if !k.IsPublic() || !k.Valid() {
				t.Fatalf("kept %+v", k)
			}
			if _, sym := k.Key.([]byte); sym {
				t.Fatal("kept a symmetric key")
			}
		}
	})
}

// FuzzAuthorize: no Authorization header, method or path crashes the
// Authorizer, and only a request that passes reaches the service.
func FuzzAuthorize(f *testing.F) {
	f.Add("Bearer a.b.c", "GET", "/api/x")
	f.Add("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "POST", "/")
	f.Add("bearer  ", "DELETE", "/a/../b")
	f.Add("Basic x", "GET", "*")
	file := filepath.Join(f.TempDir(), "jwks.json")
	if err := os.WriteFile(file, []byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"a"}]}`), 0o600); err != nil {
		f.Fatal(err)
	}
	a, err := New(Config{Service: "web", Auth: &wire.HTTPAuth{
		JWT:   &wire.JWT{Issuer: "i", JWKSFile: file, Audiences: []string{"web"}, ForwardClaims: []wire.ForwardClaim{{Claim: "sub", Header: "x-user"}}},
		Rules: []wire.RequestRule{{Rule: 1, From: []string{"*"}, Methods: []string{"GET"}, Paths: []string{"/api/*"}}},
	}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, authz, method, path string) {
		r := httptest.NewRequest("GET", "/", nil)
		r.Method, r.URL.Path = method, path
		r.Header.Set("Authorization", authz)
		r.Header.Set("X-User", "forged")
		status, _, body, ok := a.Authorize(r, 2)
		if ok {
			t.Fatalf("a request without a token signed by the issuer passed: %q", authz)
		}
		if status != http.StatusUnauthorized && status != http.StatusForbidden && status != http.StatusBadRequest || body == "" {
			t.Fatalf("refused with %d %q", status, body)
		}
		if r.Header.Get("X-User") != "" {
			t.Fatal("the forged header survived")
		}
	})
}
