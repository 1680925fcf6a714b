package coordinator

import (
	"encoding/json"
	"html"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// TestApprovalRefused: a person approving a node whose name or key is
// taken sees why on the page, the waiting agent gets the error it can act
// on, and the event log records only the approval that went through.
func TestApprovalRefused(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *Config) { c.RegisterPollWait = 200 * time.Millisecond })
	addUser(t, s, "alice", "alice-password-1", false)
	api := pinnedClient(t, s.Fingerprint(), false)
	base := s.URL()
	taken, _ := register(t, api, mustToken(t, s, TokenOptions{}), "taken")

	b := newBrowser(t, s)
	b.login("alice", "alice-password-1")
	// approve starts an interactive registration, approves it and returns
	// the page's message and the agent's answer.
	approve := func(name string, k key.Public) (string, int, []byte) {
		t.Helper()
		st, body := call(t, api, base, wire.PathRegister, nil, map[string]any{
			"version": wire.ProtocolVersion, "name": name, "node_key": k, "listen_port": 41641, "interactive": true,
		})
		var p wire.RegisterPending
		if st != http.StatusAccepted || json.Unmarshal(body, &p) != nil {
			t.Fatalf("interactive register %s: %d %s", name, st, body)
		}
		resp, page := b.post(strings.TrimPrefix(p.AuthURL, base), url.Values{"csrf": {b.csrf()}, "action": {"approve"}})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("approve %s: %d %s", name, resp.StatusCode, page)
		}
		st, body = call(t, api, base, wire.PathRegisterPoll, nil, wire.RegisterPollRequest{Version: wire.ProtocolVersion, PollID: p.PollID})
		return html.UnescapeString(page), st, body
	}
	wantRefusal := func(what string, st int, body []byte, code, msg string) {
		t.Helper()
		var e wire.Error
		if st != http.StatusConflict || json.Unmarshal(body, &e) != nil || e.Code != code || e.Message != msg {
			t.Fatalf("%s: agent got %d %s, want 409 %s %q", what, st, body, code, msg)
		}
	}

	page, st, body := approve("taken", newKey(t))
	if !strings.Contains(page, `The name "taken" is taken by another node; the agent was told to choose another name.`) {
		t.Fatalf("name taken: page says %s", page)
	}
	wantRefusal("name taken", st, body, wire.ErrCodeNameInUse, `the name "taken" is taken by another node; start the agent with another --name`)

	page, st, body = approve("fresh", taken.Node.Key)
	if !strings.Contains(page, "This node's key is already registered under another name.") {
		t.Fatalf("key taken: page says %s", page)
	}
	wantRefusal("key taken", st, body, wire.ErrCodeConflict, "this node's key is already registered under another name; keep the old name or start with a fresh state directory")

	page, st, body = approve("fresh", newKey(t))
	var rr wire.RegisterResponse
	if !strings.Contains(page, "Approved: fresh joins the mesh") || st != http.StatusOK || json.Unmarshal(body, &rr) != nil || rr.Node.Name != "fresh" || rr.NodeSecret == "" {
		t.Fatalf("approve fresh: agent got %d %s; page %s", st, body, page)
	}
	var approvals []string
	for _, e := range b.snapshot().Events {
		if e.Kind == store.EventApprove {
			approvals = append(approvals, e.Actor+": "+e.Message)
		}
	}
	if len(approvals) != 1 || approvals[0] != "alice: approved node fresh from 127.0.0.1" {
		t.Fatalf("approve events %q, want the one approval that went through", approvals)
	}
}
