package coordinator

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/wire"
)

// mapOf folds st's messages into a map until have is true of it.
func mapOf(t *testing.T, st *stream, what string, have func(wire.NetworkMap) bool) wire.NetworkMap {
	t.Helper()
	var nm wire.NetworkMap
	st.next(t, 20*time.Second, what, func(m wire.MapResponse) bool {
		nm.Apply(&m)
		return have(nm)
	})
	return nm
}

func expose(t *testing.T, c *http.Client, base string, cr creds, name string, port uint16) (int, []byte) {
	t.Helper()
	return call(t, c, base, wire.PathServices, &cr, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: name, Port: port})
}

// One node tries to take more than its share of the VIP space (every
// agent opens a listener per service): past --max-services-per-node it is
// refused, with what to do, and the other nodes' maps hold only the limit.
func TestServiceQuotaRefusesTheNodeOverIt(t *testing.T) {
	s := startServer(t, t.TempDir()) // the default limit, 64
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, hog := register(t, c, jt, "hog")
	_, peer := register(t, c, jt, "peer")
	for i := 0; i < 64; i++ {
		if st, body := expose(t, c, s.URL(), hog, fmt.Sprintf("svc%d", i), 8000); st != http.StatusOK {
			t.Fatalf("service %d: %d %s", i+1, st, body)
		}
	}
	st, body := expose(t, c, s.URL(), hog, "svc64", 8000)
	if st != http.StatusConflict || errCode(t, body) != wire.ErrCodeConflict {
		t.Fatalf("65th service: %d %s, want 409 conflict", st, body)
	}
	var e wire.Error
	json.Unmarshal(body, &e)
	if want := "node hog provides 64 services, the limit; unexpose one or ask the admin to raise --max-services-per-node"; e.Message != want {
		t.Fatalf("refusal says %q, want %q", e.Message, want)
	}
	// A new port for one it provides is no new service.
	if st, body := expose(t, c, s.URL(), hog, "svc0", 9000); st != http.StatusOK {
		t.Fatalf("re-expose at the limit: %d %s", st, body)
	}
	nm := mapOf(t, openMap(t, c, s.URL(), peer), "64 services", func(nm wire.NetworkMap) bool { return len(nm.Services) >= 64 })
	if len(nm.Services) != 64 {
		t.Fatalf("peer's map holds %d services, want 64", len(nm.Services))
	}
	for _, sv := range nm.Services {
		if sv.Name == "svc64" {
			t.Fatal("the refused service is in the map")
		}
	}
}

func TestServiceQuotaFlagBounds(t *testing.T) {
	for _, n := range []int{-1, 254*256 + 1} {
		_, err := New(Config{DataDir: t.TempDir(), MaxServicesPerNode: n})
		if err == nil || !strings.Contains(err.Error(), "--max-services-per-node") {
			t.Errorf("MaxServicesPerNode %d: %v, want an error naming the flag", n, err)
		}
	}
}

// A service whose provider is gone is deleted after the grace period, and
// its VIP goes to the next new service; within the grace it keeps its VIP.
func TestIdleServiceDeletedAndVIPReused(t *testing.T) {
	const grace = 300 * time.Millisecond
	s := startServer(t, t.TempDir(), func(c *Config) { c.ServiceGrace = grace })
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, a := register(t, c, jt, "a")
	_, peer := register(t, c, jt, "peer")
	var old wire.ServiceResponse
	st, body := expose(t, c, s.URL(), a, "old", 80)
	if st != http.StatusOK || json.Unmarshal(body, &old) != nil {
		t.Fatalf("expose: %d %s", st, body)
	}
	m := openMap(t, c, s.URL(), peer)
	var nm wire.NetworkMap
	m.next(t, 20*time.Second, "the service", func(r wire.MapResponse) bool { nm.Apply(&r); return len(nm.Services) == 1 })
	if st, body := call(t, c, s.URL(), wire.PathServices, &a, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: "old", Remove: true}); st != http.StatusOK {
		t.Fatalf("unexpose: %d %s", st, body)
	}
	// The map drops a service without providers at once; the store keeps
	// its name and VIP for the grace period.
	m.next(t, 20*time.Second, "the service gone from the map", func(r wire.MapResponse) bool { nm.Apply(&r); return len(nm.Services) == 0 })
	tstest.WaitFor(t, 20*time.Second, "the idle service deleted", func() bool {
		svcs, err := s.store.ListServices(context.Background())
		return err == nil && len(svcs) == 0
	})
	var fresh wire.ServiceResponse
	st, body = expose(t, c, s.URL(), a, "new", 81)
	if st != http.StatusOK || json.Unmarshal(body, &fresh) != nil {
		t.Fatalf("expose new: %d %s", st, body)
	}
	if fresh.Service.VIP != old.Service.VIP {
		t.Fatalf("new service got %v, want the freed %v", fresh.Service.VIP, old.Service.VIP)
	}
}

// TestPortChangePropagates: re-exposing a service on another --port
// changes the port every consumer listens on.
func TestPortChangePropagates(t *testing.T) {
	s := startServer(t, t.TempDir())
	c := pinnedClient(t, s.Fingerprint(), false)
	jt := mustToken(t, s, TokenOptions{Reusable: true})
	_, prov := register(t, c, jt, "prov")
	_, cons := register(t, c, jt, "cons")
	if st, body := expose(t, c, s.URL(), prov, "web", 8000); st != http.StatusOK {
		t.Fatalf("expose: %d %s", st, body)
	}
	st := openMap(t, c, s.URL(), cons)
	portOf := func(nm wire.NetworkMap) uint16 {
		for _, sv := range nm.Services {
			if sv.Name == "web" {
				return sv.Port
			}
		}
		return 0
	}
	var nm wire.NetworkMap
	st.next(t, 10*time.Second, "web on 8000", func(m wire.MapResponse) bool { nm.Apply(&m); return portOf(nm) == 8000 })
	if code, body := expose(t, c, s.URL(), prov, "web", 9000); code != http.StatusOK {
		t.Fatalf("re-expose: %d %s", code, body)
	}
	st.next(t, 10*time.Second, "web on 9000", func(m wire.MapResponse) bool { nm.Apply(&m); return portOf(nm) == 9000 })
	for _, sv := range nm.Services {
		if sv.Name == "web" && (len(sv.Providers) != 1 || sv.Providers[0].Port != 9000) {
			t.Errorf("providers after the change: %+v", sv.Providers)
		}
	}
}
