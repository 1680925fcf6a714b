package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
)

// echoServer accepts on loopback and echoes; closed at the end of the test.
func echoServer(t *testing.T) string {
	t.Helper()
	return tstest.Echo(t).String()
}

// jsonObject runs meshlink with args, wants exit 0 and a JSON object.
func jsonObject(t *testing.T, args ...string) map[string]any {
	t.Helper()
	stdout, stderr, code := runMain(t, args...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s", args, code, stderr)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(stdout), &m); err != nil {
		t.Fatalf("%v: not a JSON object: %v\n%s", args, err, stdout)
	}
	return m
}

// hasKeys fails unless m has every key with a value of the kind named:
// "string", "number", "bool", "array", "object", "null", or "number|null"
// and the like.
func hasKeys(t *testing.T, what string, m map[string]any, keys map[string]string) {
	t.Helper()
	for k, kinds := range keys {
		v, ok := m[k]
		if !ok {
			t.Errorf("%s: no key %q in %v", what, k, m)
			continue
		}
		kind := "null"
		switch v.(type) {
		case string:
			kind = "string"
		case float64:
			kind = "number"
		case bool:
			kind = "bool"
		case []any:
			kind = "array"
		case map[string]any:
			kind = "object"
		}
		if !strings.Contains("|"+kinds+"|", "|"+kind+"|") {
			t.Errorf("%s: %q is %s (%v), want %s", what, k, kind, v, kinds)
		}
	}
}

// TestJSONShapes: status, services, ping and version --json against real
// agents carry every key with numbers for durations and null for never,
// and status and services name the same things alike.
func TestJSONShapes(t *testing.T) {
	m := harness.NewMesh(t)
	b := m.AddAgent("site-b", harness.AgentOptions{Expose: []agent.Export{{Name: "echo", Target: echoServer(t)}}})
	_ = b
	cfgA := m.AgentConfig("site-a", harness.AgentOptions{})
	if _, err := harness.StartAgent(t, cfgA); err != nil {
		t.Fatal(err)
	}
	stateA, stateB := cfgA.StateDir, filepath.Join(m.Dir(), "site-b")

	// A runtime export next to the flag one: services tells them apart.
	if stdout, stderr, code := runMain(t, "expose", "extra", echoServer(t), "--state", stateB); code != 0 {
		t.Fatalf("expose: %d %s %s", code, stdout, stderr)
	}
	sv := jsonObject(t, "services", "--json", "--state", stateB)
	ex, _ := sv["exported"].([]any)
	sources := map[string]any{}
	for _, e := range ex {
		em := e.(map[string]any)
		hasKeys(t, "services exported", em, map[string]string{"name": "string", "target": "string", "port": "number", "source": "string",
			"announced": "bool", "open": "number", "total": "number", "denied": "number", "failed": "number",
			"sent_bytes": "number", "received_bytes": "number", "last_error": "string|null",
			"priority": "number", "weight": "number", "version": "string|null", "health_check": "string", "health": "string|null"})
		sources[em["name"].(string)] = em["source"]
	}
	if sources["echo"] != "flag" || sources["extra"] != "runtime" {
		t.Errorf("export sources %v, want echo from the flag and extra at runtime", sources)
	}
	if stdout, _, _ := runMain(t, "services", "--state", stateB); !strings.Contains(stdout, "agent --expose") || !strings.Contains(stdout, "meshlink expose (saved)") {
		t.Errorf("services table does not say which export is which:\n%s", stdout)
	}

	var consumed map[string]any
	tstest.WaitForNil(t, 10*time.Second, "echo listening at site-a", func() error {
		sv := jsonObject(t, "services", "--json", "--state", stateA)
		for _, c := range sv["consumed"].([]any) {
			if cm := c.(map[string]any); cm["name"] == "echo" && cm["listening"] == true {
				consumed = cm
				return nil
			}
		}
		return os.ErrNotExist
	})
	hasKeys(t, "services consumed", consumed, map[string]string{"name": "string", "vip": "string", "local": "string", "listening": "bool",
		"last_error": "null", "providers": "array", "open": "number", "total": "number", "failed": "number",
		"sent_bytes": "number", "received_bytes": "number", "refused": "number", "refusing": "string|null",
		"locality": "string|null", "affinity": "string|null"})
	prov := consumed["providers"].([]any)[0].(map[string]any)
	hasKeys(t, "services provider", prov, map[string]string{"name": "string", "addr": "string", "local": "bool", "online": "bool",
		"healthy": "bool", "open": "number", "last_error": "string|null", "health": "string", "priority": "number", "weight": "number",
		"version": "string|null", "region": "string|null", "selected": "number", "share": "number"})

	// ping by name, FQDN and mesh IP: the rounds stop once direct.
	rep := jsonObject(t, "ping", "site-b", "--json", "--state", stateA, "--count", "20")
	hasKeys(t, "ping", rep, map[string]string{"target": "string", "peer": "string", "ip": "string", "rounds": "array",
		"replies": "number", "direct": "bool"})
	t.Logf("ping: %v", rep)
	rounds := rep["rounds"].([]any)
	last := rounds[len(rounds)-1].(map[string]any)
	hasKeys(t, "ping round", last, map[string]string{"path": "string", "direct": "bool", "rtt_ms": "number", "error": "null"})
	if rep["direct"] != true || last["direct"] != true || len(rounds) >= 20 {
		t.Errorf("ping did not stop at the first direct pong: %v", rep)
	}
	ip := rep["ip"].(string)
	for _, target := range []string{"site-b.mesh.internal", "SITE-B.mesh.internal.", ip} {
		stdout, stderr, code := runMain(t, "ping", target, "--state", stateA)
		if code != 0 || !strings.Contains(stdout, "pong from site-b ("+ip+") via direct ") || strings.Count(stdout, "\n") != 1 {
			t.Errorf("ping %s: exit %d\n%s%s", target, code, stdout, stderr)
		}
	}
	_, stderr, code := runMain(t, "ping", "nosuch", "--state", stateA)
	if code != exitFailure || !strings.Contains(stderr, `no peer "nosuch"`) || strings.Count(stderr, "\n") != 1 {
		t.Errorf("ping of no peer: exit %d %q", code, stderr)
	}

	st := jsonObject(t, "status", "--json", "--state", stateA)
	hasKeys(t, "status", st, map[string]string{"self": "object", "listen_port": "number", "dns": "string|null",
		"coordinator": "object", "relays": "array", "peers": "array"})
	hasKeys(t, "status self", st["self"].(map[string]any), map[string]string{"id": "number", "name": "string", "addresses": "array",
		"endpoints": "array", "key": "string"})
	hasKeys(t, "status coordinator", st["coordinator"].(map[string]any), map[string]string{"url": "string", "state": "string",
		"connected": "bool", "last_error": "null", "retry_in_ms": "null", "last_map": "string"})
	if s := st["coordinator"].(map[string]any)["state"]; s != "connected" {
		t.Errorf("coordinator state %v, want connected", s)
	}
	for _, r := range st["relays"].([]any) {
		hasKeys(t, "status relay", r.(map[string]any), map[string]string{"name": "string", "url": "string", "connected": "bool",
			"last_error": "string|null", "sent_bytes": "number", "received_bytes": "number"})
	}
	peers := st["peers"].([]any)
	if len(peers) != 1 {
		t.Fatalf("peers %v, want site-b", peers)
	}
	hasKeys(t, "status peer", peers[0].(map[string]any), map[string]string{"id": "number", "name": "string", "addresses": "array",
		"online": "bool", "path": "string", "endpoint": "string|null", "relay": "string|null", "relay_url": "string|null",
		"rtt_ms": "number|null", "last_handshake": "string|null", "last_handshake_ago_ms": "number|null",
		"sent_bytes": "number", "received_bytes": "number", "direct_bytes": "number", "relayed_bytes": "number",
		"key": "string", "candidates": "array"})

	v := jsonObject(t, "version", "--json")
	hasKeys(t, "version", v, map[string]string{"version": "string", "commit": "string", "modified": "bool", "go": "string"})
}

// TestStatusWhileJoining: an agent whose coordinator is down says, in
// status, whom it is joining, when it tries again and why it failed.
func TestStatusWhileJoining(t *testing.T) {
	m := harness.NewMesh(t)
	cfg := m.AgentConfig("late", harness.AgentOptions{})
	m.StopCoordinator()
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan error, 1)
	go func() { started <- a.Start(ctx) }()
	defer func() { cancel(); <-started; a.Close() }()

	var out string
	tstest.WaitForNil(t, 10*time.Second, "status saying joining", func() error {
		var code int
		out, _, code = runMain(t, "status", "--state", cfg.StateDir)
		if code != 0 || !strings.Contains(out, ", retrying in ") {
			return os.ErrNotExist
		}
		return nil
	})
	if !strings.Contains(out, "coordinator: joining https://") || !strings.Contains(out, "node:        late (not joined yet)") || !strings.Contains(out, "unreachable") {
		t.Errorf("status while joining:\n%s", out)
	}
	st := jsonObject(t, "status", "--json", "--state", cfg.StateDir)
	c := st["coordinator"].(map[string]any)
	hasKeys(t, "joining coordinator", c, map[string]string{"state": "string", "retry_in_ms": "number", "last_error": "string", "last_map": "null"})
	if c["state"] != "joining" || !strings.HasPrefix(c["url"].(string), "https://") {
		t.Errorf("coordinator while joining: %v", c)
	}
}

// TestLeave: meshlink leave removes the node from the coordinator,
// deletes its state and stops the agent; without an agent running it
// does the same from the state directory.
func TestLeave(t *testing.T) {
	m := harness.NewMesh(t)
	data := filepath.Join(m.Dir(), "coord")
	a := m.AddAgent("goer", harness.AgentOptions{})
	m.AddAgent("stayer", harness.AgentOptions{})
	state := filepath.Join(m.Dir(), "goer")

	stdout, stderr, code := runMain(t, "leave", "--state", state)
	if code != 0 || !strings.Contains(stdout, "goer left the mesh; its state in "+state+" is deleted") {
		t.Fatalf("leave: exit %d\n%s%s", code, stdout, stderr)
	}
	select {
	case <-a.Left():
	default:
		t.Fatal("the agent was not told it left")
	}
	a.Close()
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(state)
		t.Errorf("state directory still there: %v %v", err, entries)
	}
	nodes, err := coordinator.NewAdminClient(data).Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Name == "goer" {
			t.Errorf("goer is still a node of the mesh")
		}
	}

	// Offline: stop the agent first, then leave from its state.
	b := m.AddAgent("offline", harness.AgentOptions{})
	b.Close()
	stateB := filepath.Join(m.Dir(), "offline")
	if stdout, stderr, code := runMain(t, "leave", "--state", stateB); code != 0 || !strings.Contains(stdout, "offline left the mesh") {
		t.Fatalf("leave without an agent: exit %d\n%s%s", code, stdout, stderr)
	}
	if _, err := os.Stat(stateB); !os.IsNotExist(err) {
		t.Errorf("state directory of the stopped agent still there: %v", err)
	}
	_, stderr, code = runMain(t, "leave", "--state", stateB)
	if code != exitFailure || !strings.Contains(stderr, "pass the --state of the node that should leave") {
		t.Errorf("leaving twice: exit %d %q", code, stderr)
	}
}

// TestExposeFlagsAreTheDesiredSet: an --expose dropped from the agent's
// flags is no longer exported at the next start; one added with meshlink
// expose survives restarts.
func TestExposeFlagsAreTheDesiredSet(t *testing.T) {
	m := harness.NewMesh(t)
	target := echoServer(t)
	o := harness.AgentOptions{Expose: []agent.Export{{Name: "web", Target: target}, {Name: "db", Target: target, Port: 5432}}}
	a := m.AddAgent("site", o)
	state := filepath.Join(m.Dir(), "site")
	if _, stderr, code := runMain(t, "expose", "added", target, "--port", "7000", "--state", state); code != 0 {
		t.Fatal(stderr)
	}
	a.Close()

	o.Expose, o.Token = o.Expose[:1], "-" // db dropped from the unit file
	m.AddAgent("site", o)
	sv := jsonObject(t, "services", "--json", "--state", state)
	got := map[string]any{}
	for _, e := range sv["exported"].([]any) {
		em := e.(map[string]any)
		got[em["name"].(string)] = em["source"]
	}
	if len(got) != 2 || got["web"] != "flag" || got["added"] != "runtime" {
		t.Fatalf("exports after restart %v, want web (flag) and added (runtime), db gone", got)
	}
}

// TestTokenInspect: inspect says it asks the token's coordinator;
// --offline decodes only, and --json carries null for what it did not ask.
func TestTokenInspect(t *testing.T) {
	m := harness.NewMesh(t)
	tok := m.Token()
	stdout, stderr, code := runMain(t, "token", "inspect", tok)
	if code != 0 || !strings.Contains(stderr, "asking the coordinator at https://") || !strings.Contains(stderr, "--offline decodes it only") ||
		!strings.Contains(stdout, "uses left:   unlimited (reusable)") {
		t.Errorf("inspect: exit %d\n%s%s", code, stdout, stderr)
	}
	stdout, stderr, code = runMain(t, "token", "inspect", "--offline", tok)
	if code != 0 || stderr != "" || !strings.Contains(stdout, "uses left:   unknown (--offline") || !strings.Contains(stdout, "coordinator: https://") {
		t.Errorf("inspect --offline: exit %d\n%s%s", code, stdout, stderr)
	}
	on := jsonObject(t, "token", "inspect", tok, "--json")
	hasKeys(t, "token inspect", on, map[string]string{"coordinator": "string", "fingerprint": "string", "id": "string", "expires": "string",
		"expired": "bool", "checked": "bool", "error": "null", "uses_left": "number", "reusable": "bool", "ephemeral": "bool",
		"relay": "bool", "revoked": "bool", "tags": "array"})
	if on["checked"] != true || on["uses_left"] != float64(-1) {
		t.Errorf("inspect --json: %v", on)
	}
	off := jsonObject(t, "token", "inspect", tok, "--json", "--offline")
	hasKeys(t, "token inspect --offline", off, map[string]string{"checked": "bool", "error": "null", "uses_left": "null", "reusable": "null"})
	// The coordinator gone: still decoded, and the reason said.
	m.StopCoordinator()
	down := jsonObject(t, "token", "inspect", tok, "--json")
	hasKeys(t, "token inspect, coordinator down", down, map[string]string{"checked": "bool", "error": "string", "uses_left": "null"})
}

// TestExposeTraffic: meshlink expose --priority --weight --version
// --health announces how consumers choose the provider, and warns at once
// when the target does not answer; services shows it at both ends.
func TestExposeTraffic(t *testing.T) {
	m := harness.NewMesh(t)
	m.AddAgent("site-b", harness.AgentOptions{})
	cfgA := m.AgentConfig("site-a", harness.AgentOptions{})
	if _, err := harness.StartAgent(t, cfgA); err != nil {
		t.Fatal(err)
	}
	stateA, stateB := cfgA.StateDir, filepath.Join(m.Dir(), "site-b")
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	stdout, stderr, code := runMain(t, "expose", "web", dead, "--priority", "2", "--weight", "5", "--version", "v2", "--health", "http:/healthz", "--state", stateB)
	if code != 0 || !strings.Contains(stderr, "warning: the target "+dead+" does not answer (connection refused)") {
		t.Fatalf("expose of a dead target: exit %d\n%s%s", code, stdout, stderr)
	}
	if _, stderr, code := runMain(t, "expose", "bad", dead, "--health", "udp", "--state", stateB); code == 0 || !strings.Contains(stderr, `want "tcp", "none"`) {
		t.Errorf("a bad --health: exit %d %s", code, stderr)
	}
	tstest.WaitForNil(t, 10*time.Second, "web unhealthy in site-b's services", func() error {
		out, _, _ := runMain(t, "services", "--state", stateB)
		if !strings.Contains(out, "unhealthy (connection refused)") {
			return errors.New(out)
		}
		return nil
	})
	tstest.WaitForNil(t, 10*time.Second, "site-a to see web unhealthy", func() error {
		out, _, _ := runMain(t, "services", "--state", stateA)
		for _, want := range []string{"web", "site-b(unhealthy)", "refusing connections: no healthy provider: site-b unhealthy (connection refused)",
			"PRIORITY", "v2"} {
			if !strings.Contains(out, want) {
				return fmt.Errorf("no %q in\n%s", want, out)
			}
		}
		if !regexp.MustCompile(`web\s+site-b\s+2\s+5\s+v2\s+unhealthy \(connection refused\)`).MatchString(out) {
			return fmt.Errorf("no provider row in\n%s", out)
		}
		return nil
	})
}
