package control

import (
	"fmt"
	"strings"
)

// Groups is the policy scenario (-control.policy): node i belongs to group
// Of(i) and joins with a token tagging it tag:gK; group K may reach the
// services of groups K and K+1 (mod Count), about four services per group
// with a service at every 50th node. A node's map then holds the providers
// of the services it reaches and, for a provider, the nodes that may reach
// its service: a few hundred peers rather than the whole mesh.
type Groups struct {
	Size, Count  int
	ServiceEvery int
}

// NewGroups splits nodes into groups of size (the last may be smaller).
func NewGroups(nodes, size, serviceEvery int) *Groups {
	return &Groups{Size: size, Count: max(1, (nodes+size-1)/size), ServiceEvery: serviceEvery}
}

// Of is node i's group.
func (gr *Groups) Of(i int) int { return i / gr.Size % gr.Count }

// Tag is the tag of group k ("tag:gK"), which its token gives.
func (gr *Groups) Tag(k int) string { return fmt.Sprintf("tag:g%d", k) }

func (gr *Groups) reaches(k, svcGroup int) bool {
	return svcGroup == k || svcGroup == (k+1)%gr.Count
}

// Policy is the policy text: tags the admin gives, and one rule per group
// naming the services it reaches (services are "svc-I" of provider I).
func (gr *Groups) Policy(nodes int) string {
	var b strings.Builder
	b.WriteString("tagOwners:\n")
	for k := range gr.Count {
		fmt.Fprintf(&b, "  %s: [autogroup:admin]\n", strings.TrimPrefix(gr.Tag(k), "tag:"))
	}
	svcs := make([][]string, gr.Count)
	for i := 0; i < nodes; i += gr.ServiceEvery {
		k := gr.Of(i)
		svcs[k] = append(svcs[k], fmt.Sprintf("svc-%d", i))
	}
	b.WriteString("rules:\n")
	for k := range gr.Count {
		to := append(append([]string(nil), svcs[k]...), svcs[(k+1)%gr.Count]...)
		if len(to) == 0 {
			continue
		}
		fmt.Fprintf(&b, "  - from: [%s]\n    to: [%s]\n", gr.Tag(k), strings.Join(to, ", "))
	}
	return b.String()
}

// sees reports whether node i's map lists the service of provider j
// (nil: no policy, every map lists everything).
func (gr *Groups) sees(i, j int) bool {
	return gr == nil || i == j || gr.reaches(gr.Of(i), gr.Of(j))
}

// peer reports whether node i's map lists node j (i != j); provides says
// which nodes expose their service.
func (gr *Groups) peer(i, j int, provides func(int) bool) bool {
	if gr == nil {
		return true
	}
	return provides(j) && gr.reaches(gr.Of(i), gr.Of(j)) || provides(i) && gr.reaches(gr.Of(j), gr.Of(i))
}

// expectPeers is how many peers each node's map should show (by
// Node.Index), all online.
func (gr *Groups) expectPeers(nodes []*Node, provides func(int) bool) map[int]int {
	out := make(map[int]int, len(nodes))
	if gr == nil {
		for _, n := range nodes {
			out[n.Index] = len(nodes) - 1
		}
		return out
	}
	var provs []int
	for _, n := range nodes {
		if provides(n.Index) {
			provs = append(provs, n.Index)
		}
	}
	for _, n := range nodes {
		i, c := n.Index, 0
		if provides(i) {
			for _, m := range nodes {
				if m.Index != i && gr.peer(i, m.Index, provides) {
					c++
				}
			}
		} else {
			for _, p := range provs {
				if gr.peer(i, p, provides) {
					c++
				}
			}
		}
		out[i] = c
	}
	return out
}
