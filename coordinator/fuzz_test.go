package coordinator

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// fuzzServer is a coordinator whose handlers are driven in-process, with one
// registered node.
func fuzzServer(f *testing.F) (http.Handler, creds) {
	_, h, cr := fuzzCoordinator(f)
	return h, cr
}

// fuzzCoordinator is fuzzServer with the server itself.
func fuzzCoordinator(f *testing.F) (*Server, http.Handler, creds) {
	s, err := New(Config{Listen: "127.0.0.1:0", DataDir: f.TempDir(), URL: "https://127.0.0.1:1"})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	tok := store.Token{ID: "fuzz", SecretHash: store.HashSecret("fuzz-secret-0123456789"), Reusable: true}
	if err := s.store.CreateToken(context.Background(), tok); err != nil {
		f.Fatal(err)
	}
	res, err := s.store.RegisterNode(context.Background(), store.Registration{
		TokenID: "fuzz", TokenSecret: "fuzz-secret-0123456789", Name: "fuzzer", Key: key.NewPrivate().Public(), SecretHash: store.HashSecret("node-secret"),
	})
	if err != nil {
		f.Fatal(err)
	}
	return s, s.apiHandler(), creds{res.Node.ID, "node-secret"}
}

// fuzzPost sends body to path with the node credentials cr.
func fuzzPost(h http.Handler, cr creds, path string, body []byte) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
	req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(cr.ID), 10))
	req.Header.Set(wire.HeaderNodeSecret, cr.Secret)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func addSeeds(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"token_id":"fuzz","token_secret":"x","name":"a","node_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`,
		`{"version":1,"name":"db","port":5432}`,
		`{"version":1,"name":"db","remove":true}`,
		`{"version":1,"local_endpoints":["1.2.3.4:5"]}`,
		`{"version":9,"name":"db","port":5432,"priority":1,"weight":10,"service_version":"v2"}`,
		`{"version":9,"services":[{"name":"db","healthy":false,"error":"connection refused"}]}`,
		`{"version":0}`, `{}`, `null`, `[]`, `"x"`, ``, `{"version":1e400}`, `{"port":70000}`,
	} {
		f.Add([]byte(s))
	}
}

func FuzzRegisterBody(f *testing.F) {
	h, _ := fuzzServer(f)
	addSeeds(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, wire.PathRegister, bytes.NewReader(body)))
		if rec.Code < 400 || rec.Code >= 500 {
			t.Fatalf("register(%q) = %d %s, want 4xx", body, rec.Code, rec.Body)
		}
	})
}

func FuzzServicesBody(f *testing.F) {
	h, cr := fuzzServer(f)
	addSeeds(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, path := range []string{wire.PathServices, wire.PathEndpoints, wire.PathHealth} {
			rec := fuzzPost(h, cr, path, body)
			if rec.Code >= 500 || rec.Code >= 300 && rec.Code < 400 {
				t.Fatalf("%s(%q) = %d %s", path, body, rec.Code, rec.Body)
			}
		}
	})
}
