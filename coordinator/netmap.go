package coordinator

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// hub is the fan-out point of the control plane. Every committed change
// bumps a generation at once (what Server.current builds from), and wakes
// every map stream (and every relay's node-key stream) at most once per
// interval (which grows with the streams, up to Config.MapDebounce): a burst of changes costs the streams one pass, and a
// lone change after a quiet spell wakes them immediately. Each stream then
// sends what changed since the snapshot it last sent (mapstream.go).
type hub struct {
	mu       sync.Mutex // guards the fields below
	gen      uint64
	bumped   time.Time     // when gen last changed, for update latency
	wake     chan struct{} // closed and replaced on every wake-up
	woke     time.Time     // the last wake-up
	wokeGen  uint64        // gen at the last wake-up
	pending  *time.Timer   // a wake-up scheduled; nil if none
	debounce time.Duration
	streams  map[wire.NodeID]*mapStream
	// swept tells Server.sweep of a wake-up (buffered: one pending is
	// enough, the sweep reads the latest generation).
	swept  chan struct{}
	relays map[int64]*relayStream // standalone relays online
	// epochs counts stream attachments per node, so that a pending
	// ephemeral removal can tell whether the node came back meanwhile.
	epochs map[wire.NodeID]uint64
}

type mapStream struct {
	node   wire.NodeID
	cancel func()
	state  *streamState
	// poke wakes the stream (buffered: one pending is enough); only the
	// sweep (Server.sweep) and the stream itself use it.
	poke chan struct{}
}

func newMapStream(node wire.NodeID, cancel func()) *mapStream {
	return &mapStream{node: node, cancel: cancel, state: &streamState{node: node}, poke: make(chan struct{}, 1)}
}

func (ms *mapStream) wake() {
	select {
	case ms.poke <- struct{}{}:
	default:
	}
}

func (h *hub) init(debounce time.Duration) {
	h.wake = make(chan struct{})
	h.debounce = debounce
	h.streams = map[wire.NodeID]*mapStream{}
	h.swept = make(chan struct{}, 1)
	h.relays = map[int64]*relayStream{}
	h.epochs = map[wire.NodeID]uint64{}
}

// bump starts a new generation and wakes every stream, now if the last
// wake-up is a debounce interval ago, else when it will be; lazy waits a
// whole interval, so that what usually follows (a registration's stream
// opening) travels in the same pass. Server.commit and
// Server.replicaChanged are its only callers.
func (h *hub) bump(lazy bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gen++
	h.bumped = time.Now()
	if h.pending != nil {
		return // the scheduled wake-up takes this change too
	}
	interval := h.interval()
	wait := interval - time.Since(h.woke)
	if lazy {
		wait = interval
	}
	if wait <= 0 {
		h.wakeLocked()
		return
	}
	h.pending = time.AfterFunc(wait, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.pending = nil
		h.wakeLocked()
	})
}

// interval is the least time between two wake-ups: a wake-up costs every
// stream a look and the mesh a new snapshot, so the interval grows with
// the streams (100µs each, at least 5ms) up to the configured debounce:
// under a steady stream of changes (a fleet joining) the streams are woken
// at most 1/interval times a second; h.mu is held.
func (h *hub) interval() time.Duration {
	return min(h.debounce, max(5*time.Millisecond, time.Duration(len(h.streams))*100*time.Microsecond))
}

func (h *hub) wakeLocked() {
	h.woke, h.wokeGen = time.Now(), h.gen
	close(h.wake)
	h.wake = make(chan struct{})
	select {
	case h.swept <- struct{}{}:
	default:
	}
}

// streamList appends the map streams attached now to list.
func (h *hub) streamList(list []*mapStream) []*mapStream {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, ms := range h.streams {
		list = append(list, ms)
	}
	return list
}

// change is what the coordinator says about a change of the mesh once the
// store holds it.
type change struct {
	// log is the message of the coordinator's log line, with attrs; ""
	// logs nothing.
	log   string
	attrs []any
	// event is recorded in the console's event log, unless its Kind is "".
	event store.Event
	// lazy delays the streams' wake-up by a debounce interval (hub.bump).
	lazy bool
}

// commit announces a change the store has committed: a new generation of
// the network map (every map stream sends its delta, every relay its
// keys), the log line, the console's event. Every write that can change a
// map ends in commit, and only after the write succeeded: a stream woken
// earlier could build its map without it and then sleep. Events that
// change no map (a token minted, a registration refused) are recorded
// directly with console.Record.
func (s *Server) commit(c change) {
	s.hub.bump(c.lazy)
	select {
	case s.notifyWake <- struct{}{}:
	default:
	}
	if c.log != "" {
		s.log.Info(c.log, c.attrs...)
	}
	if c.event.Kind != "" {
		s.console.Record(c.event)
	}
}

// changed returns the current generation and when it was bumped.
func (h *hub) changed() (uint64, time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gen, h.bumped
}

// watch returns the current generation and a channel closed at the next bump.
func (h *hub) watch() (uint64, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gen, h.wake
}

// woken returns the generation of the last wake-up, every change of which
// the streams woken then must send, and the channel of the next wake-up.
func (h *hub) woken() (uint64, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.wokeGen, h.wake
}

// attach makes st the node's stream, ending any previous one.
func (h *hub) attach(st *mapStream) {
	h.mu.Lock()
	old := h.streams[st.node]
	h.streams[st.node] = st
	h.epochs[st.node]++
	h.mu.Unlock()
	if old != nil {
		old.cancel()
	}
}

// detach removes st if it is still the node's stream and reports whether
// the node went offline.
func (h *hub) detach(st *mapStream) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.streams[st.node] != st {
		return false
	}
	delete(h.streams, st.node)
	return true
}

func (h *hub) online(id wire.NodeID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.streams[id] != nil
}

func (h *hub) epoch(id wire.NodeID) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.epochs[id]
}

func (h *hub) onlineSet() map[wire.NodeID]bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := make(map[wire.NodeID]bool, len(h.streams))
	for id := range h.streams {
		m[id] = true
	}
	return m
}

// snapshot is the whole mesh at one generation, shared by every stream.
type snapshot struct {
	// build numbers the snapshots one by one; delta is what changed since
	// build-1 (nil for the first one).
	build  uint64
	delta  *snapDelta
	deltas deltaCache
	// enc is the nodes' encoding for full maps, built once when a stream
	// first needs one (encoded); prevEnc, the previous snapshot's, to
	// reuse what did not change.
	encOnce  sync.Once
	enc      *fullEncoding
	encErr   error
	encDone  atomic.Pointer[fullEncoding] // enc, once built
	prevEnc  *prevEncoding
	gen      uint64
	at       time.Time   // when gen was bumped; zero for the initial one
	nodes    []wire.Node // by ID
	byID     map[wire.NodeID]int
	services []wire.Service // with at least one provider, by name
	svcIndex map[string]int // into services, by name
	keys     []key.Public   // every node's key, sorted
	relays   []wire.Relay   // what every map lists
	// coordinators are the URLs of every coordinator of the mesh, this
	// one first (wire.NetworkMap.Coordinators); nil without replicas.
	coordinators []string
	// expired holds the nodes whose keys had expired when the snapshot
	// was built: no other map lists them, nor does keys or a service.
	expired map[wire.NodeID]bool
	// access filters each node's map by the policy; nil when the policy
	// lets every node reach every service (every map is the whole mesh).
	access *accessTable
}

// accessTable is the policy evaluated for every node and service of a
// snapshot.
type accessTable struct {
	reach map[wire.NodeID][]int // indices into snapshot.services a node may reach
	// peers: the nodes each node may reach a service of, or that may
	// reach one of its services. Symmetric.
	peers map[wire.NodeID]map[wire.NodeID]bool
}

// current returns the snapshot of the current generation, building it once
// for all streams. The generation is read before the store, and changes
// bump after committing (Server.commit), so a snapshot never misses a
// change its generation claims: it may hold a newer one, whose bump then
// only rebuilds it once more than needed.
func (s *Server) current(ctx context.Context) (*snapshot, error) {
	return s.snapshotSince(ctx, 0, true)
}

// recent returns a snapshot holding at least the changes up to generation
// gen (a wake-up's, hub.woken): the newest built if it does, else one built
// now. Woken streams use it rather than current, so that changes committed
// after their wake-up (which bring a wake-up of their own) do not make
// each of them build a snapshot of its own: a fleet reconnecting commits a
// change per stream.
func (s *Server) recent(ctx context.Context, gen uint64) (*snapshot, error) {
	return s.snapshotSince(ctx, gen, false)
}

func (s *Server) snapshotSince(ctx context.Context, min uint64, exact bool) (*snapshot, error) {
	if sn := s.latest.Load(); !exact && sn != nil && sn.gen >= min {
		return sn, nil
	}
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	gen, at := s.hub.changed()
	if s.snap != nil && (s.snap.gen == gen || !exact && s.snap.gen >= min) {
		return s.snap, nil
	}
	online := s.hub.onlineSet()
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	svcs, err := s.store.ListServices(ctx)
	if err != nil {
		return nil, err
	}
	provs, err := s.store.ListProviders(ctx)
	if err != nil {
		return nil, err
	}
	relays, err := s.relayList(ctx)
	if err != nil {
		return nil, err
	}
	snap := &snapshot{gen: gen, at: at, byID: make(map[wire.NodeID]int, len(nodes)), relays: relays, expired: map[wire.NodeID]bool{},
		coordinators: s.coordinatorURLs()}
	now := time.Now()
	for _, n := range nodes {
		snap.byID[n.ID] = len(snap.nodes)
		snap.nodes = append(snap.nodes, wireNode(n, online[n.ID] || s.onlineElsewhere(n)))
		if n.KeyExpired(now) {
			snap.expired[n.ID] = true
			continue
		}
		if !n.Key.IsZero() {
			snap.keys = append(snap.keys, n.Key)
		}
	}
	slices.SortFunc(snap.keys, key.Public.Compare)
	pol := s.currentPolicy().p
	var users []store.User
	if !pol.AllowsAll() || pol != nil && len(pol.Services) > 0 {
		if users, err = s.store.ListUsers(ctx); err != nil {
			return nil, err
		}
	}
	mayProvide := providerCheck(pol, nodes, snap.byID, users)
	byService := map[string][]wire.Provider{}
	httpProvided := map[string]bool{}
	for _, p := range provs {
		if snap.expired[p.NodeID] || !mayProvide(p.NodeID, p.Service) || s.tooOld(p, pol, snap) {
			continue
		}
		wp := wire.Provider{Node: p.NodeID, Port: p.Port, Priority: p.Priority, Weight: p.Weight, Version: p.Version,
			Protocol: p.Protocol, UDPIdle: p.UDPIdle}
		if wp.Protocol == wire.ProtocolHTTP {
			// Listed as TCP, which agents before version 12 carry; the
			// service's HTTP says the rest.
			wp.Protocol = ""
			httpProvided[p.Service] = true
		}
		wp.Health, wp.HealthError = s.health.get(p.NodeID, p.Service)
		byService[p.Service] = append(byService[p.Service], wp)
	}
	for _, sv := range svcs {
		ps := byService[sv.Name]
		if len(ps) == 0 {
			continue
		}
		sort.Slice(ps, func(i, j int) bool { return ps[i].Node < ps[j].Node })
		ws := wire.Service{Name: sv.Name, VIP: sv.VIP, Port: sv.Port, Providers: ps, AllowedNodes: []string{"*"}}
		var protos []string
		for _, p := range ps {
			protos = append(protos, p.Protocol)
		}
		if ws.Protocol = wire.JoinProtocols(protos...); ws.Protocol == wire.ProtocolTCP {
			ws.Protocol = "" // as before version 10
		}
		if pol != nil {
			t := pol.Services[sv.Name]
			ws.Split, ws.Locality, ws.Affinity = t.Split, t.Locality, t.Affinity
		}
		ws.HTTP = pol.ServiceHTTP(sv.Name, httpProvided[sv.Name])
		snap.services = append(snap.services, ws)
	}
	snap.svcIndex = make(map[string]int, len(snap.services))
	for i, sv := range snap.services {
		snap.svcIndex[sv.Name] = i
	}
	if !pol.AllowsAll() {
		snap.access = evaluateAccess(pol, nodes, users, svcs, snap.services)
	} else {
		for i := range snap.services {
			// Every node may make every request: only a jwt to check.
			snap.services[i].HTTPAuth = pol.HTTPAuth(snap.services[i].Name, "", nil, nil)
		}
	}
	if prev := s.snap; prev != nil {
		snap.build = prev.build + 1
		snap.delta = diffSnapshots(prev, snap)
		if enc, ok := prev.encodedYet(); ok {
			snap.prevEnc = &prevEncoding{byID: prev.byID, enc: enc}
		}
	} else {
		snap.build = 1
	}
	s.logMu.Lock()
	s.snapLog = append(s.snapLog, snap.delta)
	if len(s.snapLog) > maxSnapLog {
		s.snapLog = slices.Delete(s.snapLog, 0, len(s.snapLog)-maxSnapLog)
	}
	s.snap = snap
	s.logMu.Unlock()
	s.latest.Store(snap)
	return snap, nil
}

// providerCheck returns whether the policy lets a node provide a service:
// services.NAME.owners holds for providers that exposed NAME before the
// policy listed its owners (or before their owner lost the role it names)
// too, not only at expose (checkProvide).
func providerCheck(pol *policy.Policy, nodes []store.Node, byNode map[wire.NodeID]int, users []store.User) func(wire.NodeID, string) bool {
	if pol == nil || len(pol.Services) == 0 {
		return func(wire.NodeID, string) bool { return true }
	}
	byID := make(map[int64]store.User, len(users))
	for _, u := range users {
		byID[u.ID] = u
	}
	return func(id wire.NodeID, service string) bool {
		i, ok := byNode[id]
		if !ok {
			return false
		}
		_, may, _ := pol.CanProvide(nodePrincipal(nodes[i], byID), service)
		return may
	}
}

// evaluateAccess decides, for every node and service, whether the node
// may reach it, and fills each service's AllowedNodes with the IDs of
// those that may (what its providers enforce). It works by policy class
// (policy.AccessClasses: nodes the policy cannot tell apart), never by
// pair of nodes: the services a class reaches are one slice its members
// share, and so are the peers that gives them (the providers of those
// services); only a provider gets a row of its own, adding the nodes that
// may reach its services. The cost is the classes times the services,
// plus what the maps hold.
func evaluateAccess(pol *policy.Policy, nodes []store.Node, users []store.User, svcs []store.Service, services []wire.Service) *accessTable {
	byID := make(map[int64]store.User, len(users))
	for _, u := range users {
		byID[u.ID] = u
	}
	owner := make(map[string]string, len(svcs))
	for _, sv := range svcs {
		owner[sv.Name] = serviceOwner(pol, sv, byID)
	}
	prs := make([]policy.Principal, len(nodes))
	for i, n := range nodes {
		prs[i] = nodePrincipal(n, byID)
	}
	names := make([]string, len(services))
	owners := make([]string, len(services))
	for si, sv := range services {
		names[si], owners[si] = sv.Name, owner[sv.Name]
	}
	class, rows := pol.AccessClasses(prs, names, owners)
	members := make([][]int, len(rows)) // node indices, in node order
	for i, c := range class {
		members[c] = append(members[c], i)
	}
	t := &accessTable{reach: make(map[wire.NodeID][]int, len(nodes)), peers: make(map[wire.NodeID]map[wire.NodeID]bool, len(nodes))}
	reach := make([][]int, len(rows))                    // services each class reaches
	provPeers := make([]map[wire.NodeID]bool, len(rows)) // the providers of those
	reachedBy := make([][]int, len(services))            // classes reaching each service
	for c, row := range rows {
		for si, ok := range row {
			if !ok {
				continue
			}
			reach[c] = append(reach[c], si)
			reachedBy[si] = append(reachedBy[si], c)
			if provPeers[c] == nil {
				provPeers[c] = map[wire.NodeID]bool{}
			}
			for _, p := range services[si].Providers {
				provPeers[c][p.Node] = true
			}
		}
	}
	for i, n := range nodes {
		c := class[i]
		if len(reach[c]) > 0 {
			t.reach[n.ID] = reach[c]
		}
		if provPeers[c] != nil {
			t.peers[n.ID] = provPeers[c]
		}
	}
	// Providers: their class's row, less themselves (every node in a
	// class's row is a provider, so no other row holds its own node), and
	// every node that may reach one of their services.
	own := map[wire.NodeID]map[wire.NodeID]bool{}
	row := func(id wire.NodeID) map[wire.NodeID]bool {
		m := own[id]
		if m == nil {
			m = map[wire.NodeID]bool{}
			for p := range t.peers[id] {
				if p != id {
					m[p] = true
				}
			}
			own[id] = m
			t.peers[id] = m
		}
		return m
	}
	for si := range services {
		sv := &services[si]
		var ids []int
		for _, c := range reachedBy[si] {
			ids = append(ids, members[c]...)
		}
		slices.Sort(ids) // node order: nodes are sorted by ID
		allowed := make([]string, 0, len(ids))
		for _, i := range ids {
			allowed = append(allowed, strconv.FormatUint(uint64(nodes[i].ID), 10))
		}
		sv.AllowedNodes = allowed
		allowedPrs := make([]policy.Principal, 0, len(ids))
		allowedIDs := make([]wire.NodeID, 0, len(ids))
		for _, i := range ids {
			allowedPrs, allowedIDs = append(allowedPrs, prs[i]), append(allowedIDs, nodes[i].ID)
		}
		sv.HTTPAuth = pol.HTTPAuth(sv.Name, owners[si], allowedPrs, allowedIDs)
		for _, p := range sv.Providers {
			m := row(p.Node)
			for _, i := range ids {
				if id := nodes[i].ID; id != p.Node {
					m[id] = true
				}
			}
		}
	}
	return t
}

// mapFor is the network map of node id, or false if the node is gone.
func (sn *snapshot) mapFor(id wire.NodeID, domain string) (*wire.NetworkMap, bool) {
	i, ok := sn.byID[id]
	if !ok {
		return nil, false
	}
	nm := &wire.NetworkMap{Self: sn.nodes[i], Domain: domain, Services: sn.services, Relays: sn.relays,
		Coordinators: sn.coordinators}
	if sn.access != nil {
		nm.Peers = []wire.Node{}
		sn.filter(nm, id)
		return nm, true
	}
	nm.Peers = make([]wire.Node, 0, len(sn.nodes)-1)
	for _, n := range sn.nodes {
		if n.ID != id && !sn.expired[n.ID] {
			nm.Peers = append(nm.Peers, n)
		}
	}
	if nm.Services == nil {
		nm.Services = []wire.Service{}
	}
	return nm, true
}

// filter fills nm with what node id may know under the policy: the
// services it may reach or provides, the peers it may reach or that may
// reach it. Of a service it only consumes, it learns no other consumer:
// AllowedNodes names itself. It looks at the node's row of the access
// table, not at every node.
func (sn *snapshot) filter(nm *wire.NetworkMap, id wire.NodeID) {
	for p := range sn.access.peers[id] {
		if i, ok := sn.byID[p]; ok && p != id && !sn.expired[p] {
			nm.Peers = append(nm.Peers, sn.nodes[i])
		}
	}
	slices.SortFunc(nm.Peers, func(a, b wire.Node) int { return cmpID(a.ID, b.ID) })
	nm.Services = sn.servicesFor(id)
}

func (sn *snapshot) service(name string) (wire.Service, bool) {
	for _, sv := range sn.services {
		if sv.Name == name {
			return sv, true
		}
	}
	return wire.Service{}, false
}

func wireNode(n store.Node, online bool) wire.Node {
	w := wire.Node{
		ID: n.ID, Name: n.Name, Hostname: n.Hostname, Key: n.Key,
		Endpoints: n.Endpoints, Online: online, LastSeen: n.LastSeen,
		Tags: n.Tags, Ephemeral: n.Ephemeral, KeyExpiry: n.KeyExpiry, Region: n.Region,
	}
	if n.IPv4.IsValid() {
		w.Addresses = append(w.Addresses, netip.PrefixFrom(n.IPv4, 32))
	}
	if n.IPv6.IsValid() {
		w.Addresses = append(w.Addresses, netip.PrefixFrom(n.IPv6, 128))
	}
	if len(w.Tags) == 0 {
		w.Tags = nil
	}
	return w
}

func nodeEqual(a, b wire.Node) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Hostname == b.Hostname && a.Key == b.Key &&
		slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.Endpoints, b.Endpoints) &&
		a.Online == b.Online && a.LastSeen.Equal(b.LastSeen) && slices.Equal(a.Tags, b.Tags) &&
		a.Ephemeral == b.Ephemeral && a.KeyExpiry.Equal(b.KeyExpiry) && a.Region == b.Region
}

func serviceEqual(a, b wire.Service) bool {
	return a.Name == b.Name && a.VIP == b.VIP && a.Port == b.Port &&
		slices.Equal(a.Providers, b.Providers) && slices.Equal(a.AllowedNodes, b.AllowedNodes) &&
		maps.Equal(a.Split, b.Split) && a.Locality == b.Locality && a.Affinity == b.Affinity &&
		a.Protocol == b.Protocol && reflect.DeepEqual(a.HTTP, b.HTTP) && reflect.DeepEqual(a.HTTPAuth, b.HTTPAuth)
}

// NodeMap is the network map the coordinator holds for node id now: what
// a map stream opened now would send first. ok is false for a node that
// is gone or whose key expired.
func (s *Server) NodeMap(ctx context.Context, id wire.NodeID) (nm *wire.NetworkMap, ok bool, err error) {
	snap, err := s.current(ctx)
	if err != nil {
		return nil, false, err
	}
	if snap.expired[id] {
		return nil, false, nil
	}
	nm, ok = snap.mapFor(id, s.cfg.Domain)
	return nm, ok, nil
}

// tooOld reports whether provider p is left out of the maps: its agent
// announced the export with a protocol before wire.VersionRequestAuth, and
// the service's providers must check each request (a jwt, or rules with
// http or when), which that agent would let through unchecked. Such a
// provider is no provider of the service for anyone (nor a peer for its
// sake). 0 is a row from before the coordinator kept the version: listed,
// as before, until the agent announces again (on every reconnect). It is
// logged once per provider and service.
func (s *Server) tooOld(p store.Provider, pol *policy.Policy, snap *snapshot) bool {
	if p.AgentProtocol <= 0 || p.AgentProtocol >= wire.VersionRequestAuth || !pol.ChecksRequests(p.Service) {
		return false
	}
	if _, said := s.tooOldSaid.LoadOrStore(fmt.Sprintf("%s/%d/%d", p.Service, p.NodeID, p.AgentProtocol), true); !said {
		name := fmt.Sprint(p.NodeID)
		if j, ok := snap.byID[p.NodeID]; ok {
			name = snap.nodes[j].Name
		}
		s.log.Warn("provider withheld: its agent is too old to check this service's request rules or jwt; upgrade meshlink there",
			"service", p.Service, "node", name, "agent_protocol", p.AgentProtocol, "needs_protocol", wire.VersionRequestAuth)
	}
	return true
}
