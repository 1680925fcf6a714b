package coordinator

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

func startServer(t *testing.T, dir string, mod ...func(*Config)) *Server {
	t.Helper()
	// Agents of these tests are on loopback; TestEndpointsNotOwn turns
	// this off.
	cfg := Config{Listen: "127.0.0.1:0", DataDir: dir, Out: tstest.Writer(t), AllowLoopbackEndpoints: true}
	for _, m := range mod {
		m(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// pinnedClient trusts exactly the certificate with fingerprint fp, the way
// an agent holding a join token does.
func pinnedClient(t testing.TB, fp string, h2 bool) *http.Client {
	tr := &http.Transport{
		ForceAttemptHTTP2: h2,
		TLSClientConfig: &tls.Config{
			InsecureSkipVerify: true,
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) == 0 || !wire.FingerprintMatches(raw[0], fp) {
					return errors.New("certificate fingerprint mismatch")
				}
				return nil
			},
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func newKey(t testing.TB) key.Public { return key.NewPrivate().Public() }

type creds struct {
	ID     wire.NodeID
	Secret string
}

// call POSTs body (marshalled unless []byte) and returns status and body.
func call(t testing.TB, c *http.Client, base, path string, cr *creds, body any) (int, []byte) {
	t.Helper()
	var raw []byte
	switch b := body.(type) {
	case []byte:
		raw = b
	default:
		var err error
		if raw, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	req, err := http.NewRequest(http.MethodPost, base+path, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if cr != nil {
		req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(cr.ID), 10))
		req.Header.Set(wire.HeaderNodeSecret, cr.Secret)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

func errCode(t testing.TB, body []byte) string {
	t.Helper()
	var e wire.Error
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("error body %q is not a wire.Error: %v", body, err)
	}
	if e.Message == "" {
		t.Fatalf("error %q has no message", body)
	}
	return e.Code
}

func mustToken(t testing.TB, s *Server, o TokenOptions) wire.JoinToken {
	t.Helper()
	str, err := s.CreateToken(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	jt, err := wire.ParseToken(str)
	if err != nil {
		t.Fatal(err)
	}
	return jt
}

func register(t testing.TB, c *http.Client, jt wire.JoinToken, name string) (wire.RegisterResponse, creds) {
	t.Helper()
	st, body := call(t, c, jt.URL, wire.PathRegister, nil, wire.RegisterRequest{
		Version: wire.ProtocolVersion, TokenID: jt.ID, TokenSecret: jt.Secret, Name: name, NodeKey: newKey(t), ListenPort: 41641,
	})
	if st != http.StatusOK {
		t.Fatalf("register %s: %d %s", name, st, body)
	}
	var rr wire.RegisterResponse
	if err := json.Unmarshal(body, &rr); err != nil {
		t.Fatal(err)
	}
	return rr, creds{rr.Node.ID, rr.NodeSecret}
}

// stream is an open map stream.
type stream struct {
	header http.Header // the response's
	msgs   chan wire.MapResponse
	cancel context.CancelFunc
	done   chan struct{}
}

func openMap(t testing.TB, c *http.Client, base string, cr creds) *stream {
	t.Helper()
	return openMapReq(t, c, base, cr, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641})
}

// openMapReq opens a map stream with mr, failing the test unless it is
// accepted.
func openMapReq(t testing.TB, c *http.Client, base string, cr creds, mr wire.MapRequest) *stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	raw, _ := json.Marshal(mr)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+wire.PathMap, bytes.NewReader(raw))
	req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(cr.ID), 10))
	req.Header.Set(wire.HeaderNodeSecret, cr.Secret)
	resp, err := c.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		t.Fatalf("map: %d %s", resp.StatusCode, b)
	}
	s := &stream{header: resp.Header, msgs: make(chan wire.MapResponse, 100), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer close(s.msgs)
		defer resp.Body.Close()
		dec := json.NewDecoder(resp.Body)
		for {
			var m wire.MapResponse
			if err := dec.Decode(&m); err != nil {
				return
			}
			select {
			case s.msgs <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(s.close)
	return s
}

func (s *stream) close() {
	s.cancel()
	<-s.done
}

// next waits up to d for a non-keep-alive message matching pred, failing
// the test otherwise. Messages not matching are skipped.
func (s *stream) next(t *testing.T, d time.Duration, what string, pred func(wire.MapResponse) bool) wire.MapResponse {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		select {
		case m, ok := <-s.msgs:
			if !ok {
				t.Fatalf("stream ended while waiting for %s", what)
			}
			if !m.IsKeepAlive() && pred(m) {
				return m
			}
		case <-deadline.C:
			t.Fatalf("no %s within %v", what, d)
		}
	}
}

func nodeNamed(ns []wire.Node, name string) (wire.Node, bool) {
	for _, n := range ns {
		if n.Name == name {
			return n, true
		}
	}
	return wire.Node{}, false
}
