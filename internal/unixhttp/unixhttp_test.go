package unixhttp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlink/meshlink/internal/tstest"
)

func TestMain(m *testing.M) { tstest.Main(m) }

var errUnreachable = errors.New("unreachable")

func testConfig(sock string) Config {
	return Config{
		Socket:      sock,
		Host:        "test",
		Name:        "test API",
		Unreachable: func(err error) error { return fmt.Errorf("%w: %v", errUnreachable, err) },
		Refused: func(resp *http.Response, body []byte) error {
			return fmt.Errorf("refused %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
		},
	}
}

// serve answers on a Unix socket in a fresh directory until the test ends.
func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return sock
}

func TestDo(t *testing.T) {
	type echo struct {
		Method, Host, Path, ContentType string
		In                              map[string]string
	}
	sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/refuse":
			http.Error(w, `{"message":"no"}`, http.StatusConflict)
		case "/garbage":
			w.Write([]byte("not json"))
		default:
			e := echo{Method: r.Method, Host: r.Host, Path: r.URL.RequestURI(), ContentType: r.Header.Get("Content-Type")}
			json.NewDecoder(r.Body).Decode(&e.In)
			json.NewEncoder(w).Encode(e)
		}
	}))
	c := New(testConfig(sock))
	ctx := context.Background()

	tests := []struct {
		name    string
		method  string
		path    string
		in      any
		want    echo
		wantErr string
	}{
		{name: "get", method: http.MethodGet, path: "/v1/x?a=b", want: echo{Method: "GET", Host: "test", Path: "/v1/x?a=b"}},
		{name: "post with a body", method: http.MethodPost, path: "/v1/y", in: map[string]string{"k": "v"},
			want: echo{Method: "POST", Host: "test", Path: "/v1/y", ContentType: "application/json", In: map[string]string{"k": "v"}}},
		{name: "refused", method: http.MethodGet, path: "/refuse", wantErr: `refused 409: {"message":"no"}`},
		{name: "bad answer", method: http.MethodGet, path: "/garbage", wantErr: "test API: bad answer: "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got echo
			err := c.Do(ctx, tc.method, tc.path, tc.in, &got)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q…", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("server saw %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	c := New(testConfig(filepath.Join(t.TempDir(), "nobody.sock")))
	if err := c.Do(context.Background(), http.MethodGet, "/", nil, nil); !errors.Is(err, errUnreachable) {
		t.Fatalf("no socket: %v, want the Unreachable error", err)
	}
}
