package coordinator

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// TestLargePolicyMapChangeIsCheap: the coordinator evaluates the policy
// for every node and service at every change of the mesh (a node's map
// stream reconnecting is one), holding every stream's next map meanwhile.
// Under the largest policy allowed (256 KiB, thousands of rules) and a
// mesh of 1000 nodes of distinct users and 64 services, one evaluation
// must stay well under a second or two; it took 10 to 40 s when each
// decision walked every rule. So must listing what setting it changes, and
// the console's access matrix.
func TestLargePolicyMapChangeIsCheap(t *testing.T) {
	const slowBound = 8 * time.Second
	fill := func(rule func(i int) string) string {
		var b strings.Builder
		b.WriteString("rules:\n")
		for i := 0; b.Len() < policy.MaxSize-300; i++ {
			b.WriteString(rule(i))
		}
		return b.String()
	}
	shapes := map[string]string{
		// Each rule names its own service: none of the mesh's.
		"a rule per service": fill(func(i int) string { return fmt.Sprintf("- {from: [\"*\"], to: [s%d]}\n", i) }),
		// Each rule covers every service but names a user nobody is.
		"a rule per user": fill(func(i int) string { return fmt.Sprintf("- {from: [user:v%d], to: [\"*\"]}\n", i) }),
		// Both at once: every principal matches half, every service half.
		"both": fill(func(i int) string {
			if i%2 == 0 {
				return fmt.Sprintf("- {from: [\"*\"], to: [s%d]}\n", i)
			}
			return fmt.Sprintf("- {from: [node:v%d], to: [\"*\"]}\n", i)
		}),
	}
	var nodes []store.Node
	var users []store.User
	for n := range 1000 {
		nodes = append(nodes, store.Node{ID: wire.NodeID(n + 1), Name: fmt.Sprint("n", n), OwnerID: int64(n + 1)})
		users = append(users, store.User{ID: int64(n + 1), Username: fmt.Sprint("u", n)})
	}
	var svcs []store.Service
	var services []wire.Service
	for s := range 64 {
		svcs = append(svcs, store.Service{Name: fmt.Sprint("x", s), OwnerID: int64(s + 1)})
		services = append(services, wire.Service{Name: fmt.Sprint("x", s), Providers: []wire.Provider{{Node: wire.NodeID(s + 1)}}})
	}
	def, err := policy.Parse("default", []byte(policy.Default))
	if err != nil {
		t.Fatal(err)
	}
	dir := &directory{users: map[int64]store.User{}, nodes: nodes, services: svcs, provided: map[string]bool{}}
	for _, u := range users {
		dir.users[u.ID] = u
	}
	for _, sv := range svcs {
		dir.provided[sv.Name] = true
	}
	for name, text := range shapes {
		p, err := policy.Parse("big.yaml", []byte(text))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		start := time.Now()
		evaluateAccess(p, nodes, users, svcs, services)
		took := time.Since(start)
		t.Logf("%s: %d rules, %d nodes, %d services: %v", name, len(p.Rules), len(nodes), len(services), took)
		// A bound far above what it takes (0.1 to 1 s on a loaded 2-core
		// machine) and far below the 10 to 40 s of walking every rule;
		// -race slows it past any fair bound, so only the log says there.
		if took > slowBound && !raceEnabled {
			t.Errorf("%s: one evaluation took %v", name, took)
		}
		// Setting it (what it grants and revokes) and the console's
		// Policy page, which any member may load, evaluate it as whole.
		start = time.Now()
		dir.diff(def, p)
		took = time.Since(start)
		t.Logf("%s: the change from the default policy listed in %v", name, took)
		if took > slowBound && !raceEnabled {
			t.Errorf("%s: the change from the default policy took %v to list", name, took)
		}
	}
}
