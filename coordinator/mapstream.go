package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// How a change reaches the map streams, once per change rather than once
// per stream and peer: each snapshot records what differs from the one
// before (snapDelta, kept for the last maxSnapLog snapshots); a stream
// remembers only which snapshot it sent last, and sends the nodes and
// services the deltas since then name. Without a policy every stream but
// those of the changed nodes sends the same bytes, encoded once per
// snapshot (deltaCache). With one, a stream compares its node's row of the
// access table in both snapshots and looks only at the rows' members and
// the changed entries, never at the whole mesh.

// maxSnapLog bounds the deltas kept: a stream more snapshots behind than
// this gets a full map.
const maxSnapLog = 64

// snapDelta names what changed between two snapshots.
type snapDelta struct {
	nodes    map[wire.NodeID]bool // added, changed, removed, or whose key expired
	services map[string]bool      // added, changed or removed
	relays   bool
}

// diffSnapshots is what changed from a to b, in O(nodes + services).
func diffSnapshots(a, b *snapshot) *snapDelta {
	d := &snapDelta{nodes: map[wire.NodeID]bool{}, services: map[string]bool{}, relays: !slices.Equal(a.relays, b.relays)}
	for _, n := range b.nodes {
		i, ok := a.byID[n.ID]
		if !ok || a.expired[n.ID] != b.expired[n.ID] || !nodeEqual(a.nodes[i], n) {
			d.nodes[n.ID] = true
		}
	}
	for _, n := range a.nodes {
		if _, ok := b.byID[n.ID]; !ok {
			d.nodes[n.ID] = true
		}
	}
	old := make(map[string]*wire.Service, len(a.services))
	for i := range a.services {
		old[a.services[i].Name] = &a.services[i]
	}
	for _, sv := range b.services {
		if o, ok := old[sv.Name]; !ok || !serviceEqual(*o, sv) {
			d.services[sv.Name] = true
		}
		delete(old, sv.Name)
	}
	for name := range old {
		d.services[name] = true
	}
	return d
}

func (d *snapDelta) merge(o *snapDelta) {
	maps.Copy(d.nodes, o.nodes)
	maps.Copy(d.services, o.services)
	d.relays = d.relays || o.relays
}

// deltaCache holds, per snapshot, the merged delta since each earlier
// snapshot that streams asked about, and its encoding for streams whose
// own node is not in it (unfiltered maps only).
type deltaCache struct {
	mu sync.Mutex // guards m
	m  map[uint64]*sharedDelta
}

type sharedDelta struct {
	once sync.Once
	d    *snapDelta // nil: not in the log any more, send a full map
	body []byte     // encoded (encodeBody); nil if nothing to send
	err  error
}

// since returns what changed from snapshot build from to snap (nil if the
// log no longer reaches back that far), merged once for every stream.
func (s *Server) since(snap *snapshot, from uint64) *sharedDelta {
	snap.deltas.mu.Lock()
	if snap.deltas.m == nil {
		snap.deltas.m = map[uint64]*sharedDelta{}
	}
	sd := snap.deltas.m[from]
	if sd == nil {
		sd = &sharedDelta{}
		if len(snap.deltas.m) < maxSnapLog {
			snap.deltas.m[from] = sd
		}
	}
	snap.deltas.mu.Unlock()
	sd.once.Do(func() {
		sd.d = s.mergeLog(snap, from)
		if sd.d != nil && snap.access == nil {
			m := unfilteredDelta(snap, sd.d, 0)
			if !m.IsKeepAlive() {
				sd.body, sd.err = encodeBody(&m)
			}
		}
	})
	return sd
}

// mergeLog merges the deltas of the snapshots after from up to snap.
func (s *Server) mergeLog(snap *snapshot, from uint64) *snapDelta {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	if from == 0 || from >= snap.build || s.snap == nil {
		return nil
	}
	// snapLog's last entry is s.snap's delta; snap may be older.
	last := len(s.snapLog) - 1 - int(s.snap.build-snap.build)
	first := last - int(snap.build-from) + 1
	if first < 0 || last >= len(s.snapLog) {
		return nil
	}
	d := &snapDelta{nodes: map[wire.NodeID]bool{}, services: map[string]bool{}}
	for _, e := range s.snapLog[first : last+1] {
		if e == nil {
			return nil
		}
		d.merge(e)
	}
	return d
}

// unfilteredDelta is the message for node self (0: a node not named in
// d) carrying d's entries as they are in snap, when every map is the
// whole mesh.
func unfilteredDelta(snap *snapshot, d *snapDelta, self wire.NodeID) wire.MapResponse {
	var m wire.MapResponse
	for _, id := range sortedKeys(d.nodes) {
		i, ok := snap.byID[id]
		switch {
		case id == self:
			if ok {
				n := snap.nodes[i]
				m.Self = &n
			}
		case ok && !snap.expired[id]:
			m.PeersChanged = append(m.PeersChanged, snap.nodes[i])
		default:
			m.PeersRemoved = append(m.PeersRemoved, id)
		}
	}
	for _, name := range sortedKeys(d.services) {
		if sv, ok := snap.service(name); ok {
			m.ServicesChanged = append(m.ServicesChanged, sv)
		} else {
			m.ServicesRemoved = append(m.ServicesRemoved, name)
		}
	}
	if d.relays {
		m.Relays = relayList(snap.relays)
	}
	return m
}

func relayList(rs []wire.Relay) *[]wire.Relay {
	l := slices.Clone(rs)
	if l == nil {
		l = []wire.Relay{}
	}
	return &l
}

// filteredDelta is the message turning node self's map under snapshot a
// into its map under b, both filtered by the policy; d is what changed
// from a to b.
func filteredDelta(a, b *snapshot, d *snapDelta, self wire.NodeID) wire.MapResponse {
	var m wire.MapResponse
	if d.nodes[self] {
		if i, ok := b.byID[self]; ok {
			n := b.nodes[i]
			m.Self = &n
		}
	}
	rowA, rowB := a.access.peers[self], b.access.peers[self]
	for id := range rowB {
		if rowA[id] && !d.nodes[id] {
			continue
		}
		if i, ok := b.byID[id]; ok && !b.expired[id] {
			m.PeersChanged = append(m.PeersChanged, b.nodes[i])
		} else if rowA[id] {
			m.PeersRemoved = append(m.PeersRemoved, id)
		}
	}
	for id := range rowA {
		if !rowB[id] {
			m.PeersRemoved = append(m.PeersRemoved, id)
		}
	}
	slices.SortFunc(m.PeersChanged, func(x, y wire.Node) int { return cmpID(x.ID, y.ID) })
	slices.Sort(m.PeersRemoved)
	viewA, viewB := a.servicesFor(self), b.servicesFor(self)
	old := make(map[string]*wire.Service, len(viewA))
	for i := range viewA {
		old[viewA[i].Name] = &viewA[i]
	}
	for _, sv := range viewB {
		o, ok := old[sv.Name]
		if !ok || d.services[sv.Name] && !serviceEqual(*o, sv) {
			m.ServicesChanged = append(m.ServicesChanged, sv)
		}
		delete(old, sv.Name)
	}
	m.ServicesRemoved = sortedKeys(old)
	if d.relays {
		m.Relays = relayList(b.relays)
	}
	return m
}

// quiet reports whether node self's filtered map is the same under a and
// b, d being what changed: neither it nor a node in its rows changed, and
// no changed service was or is in its view (a change of what it may reach
// changes the service's AllowedNodes, so the service is in d). It costs
// what changed, not the node's map, so that a change wakes every stream
// for little more than the look.
func quiet(a, b *snapshot, d *snapDelta, self wire.NodeID) bool {
	if d.relays || d.nodes[self] {
		return false
	}
	rowA, rowB := a.access.peers[self], b.access.peers[self]
	for id := range d.nodes {
		if rowA[id] || rowB[id] {
			return false
		}
	}
	for name := range d.services {
		if a.inView(self, name) || b.inView(self, name) {
			return false
		}
	}
	return true
}

// inView reports whether node id's filtered map lists service name: it
// provides it or may reach it.
func (sn *snapshot) inView(id wire.NodeID, name string) bool {
	si, ok := sn.svcIndex[name]
	if !ok {
		return false
	}
	if slices.Contains(sn.access.reach[id], si) {
		return true
	}
	return slices.ContainsFunc(sn.services[si].Providers, func(p wire.Provider) bool { return p.Node == id })
}

func cmpID(a, b wire.NodeID) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func sortedKeys[K interface{ ~uint64 | ~string }, V any](m map[K]V) []K {
	if len(m) == 0 {
		return nil
	}
	return slices.Sorted(maps.Keys(m))
}

// Encoding once for many streams: a message's JSON without its Seq and
// SentAt, which frame adds per stream. MapResponse encodes seq first and
// sent_at last.
var (
	bodyHead = []byte(`{"seq":0`)
	bodyTail = []byte(`"sent_at":"0001-01-01T00:00:00Z"}`)
)

// encodeBody encodes m (its Seq and SentAt are cleared) for frame.
func encodeBody(m *wire.MapResponse) ([]byte, error) {
	m.Seq, m.SentAt = 0, time.Time{}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if !bytes.HasPrefix(b, bodyHead) || !bytes.HasSuffix(b, bodyTail) {
		return nil, fmt.Errorf("map message encodes as %.40q…, not seq first and sent_at last", b)
	}
	return b[len(bodyHead) : len(b)-len(bodyTail)], nil
}

// frame is one line of the map stream: body with seq and the time now.
func frame(body []byte, seq uint64, now time.Time) []byte {
	b := make([]byte, 0, len(body)+64)
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, body...)
	b = append(b, `"sent_at":"`...)
	b = now.AppendFormat(b, time.RFC3339Nano)
	return append(b, "\"}\n"...)
}

// keepAliveBody is a message without changes.
var keepAliveBody = []byte(",")

// streamWriter writes a newline-delimited JSON stream, flushing each
// message.
type streamWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
	// deadline is the write deadline a keep-alive left armed; zero when
	// none is.
	deadline time.Time
}

// newStreamWriter answers 200 and sends the headers at once: a client
// waits for them before it reads anything, and must not wait for the
// first map to be built.
func newStreamWriter(w http.ResponseWriter) *streamWriter {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	w.WriteHeader(http.StatusOK)
	sw := &streamWriter{w: w, rc: http.NewResponseController(w)}
	sw.rc.Flush()
	return sw
}

// write sends one line.
func (sw *streamWriter) write(b []byte) error { return sw.writeParts(b) }

// keepAlive sends a keep-alive line of a stream whose keep-alives come
// every interval. After it, the write deadline is always at least twice
// the interval and 15s ahead, the time the agent waits on a silent stream
// (agent streamIdle): the stream's next write, a map or the next
// keep-alive, comes before it passes even when it waits that long for a
// send slot, so the coordinator never gives up on a live stream before the
// agent would. The deadline is armed three intervals and 15s ahead and
// moved only when less than that floor is left: at 10,000 streams
// keep-alives are most of an idle coordinator's CPU, and each deadline
// change is a hand-off to the connection's HTTP/2 serve loop, so most
// keep-alives make none. A keep-alive that cannot be written is cut off at
// the deadline; it holds nothing but its own stream meanwhile (no send
// slot): a reader that stopped reading keeps its goroutine up to the
// deadline (at most 180s by default), not 15s.
func (sw *streamWriter) keepAlive(b []byte, interval time.Duration) error {
	if now := time.Now(); sw.deadline.Sub(now) < 2*interval+15*time.Second {
		sw.deadline = now.Add(3*interval + 15*time.Second)
		sw.rc.SetWriteDeadline(sw.deadline)
	}
	return sw.put(b)
}

// writeParts sends one line made of parts. Its deadline grows with the
// line: a big map to a slow but live reader must not be cut off, a dead
// one must.
func (sw *streamWriter) writeParts(parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	sw.rc.SetWriteDeadline(time.Now().Add(15*time.Second + time.Duration(n>>16)*time.Second))
	if err := sw.put(parts...); err != nil {
		return err
	}
	// The deadline guards one write only: left in place, it would reset
	// an idle HTTP/2 stream when it passed.
	sw.deadline = time.Time{}
	return sw.rc.SetWriteDeadline(time.Time{})
}

// put writes the parts of one line and flushes them, under the deadline
// the caller set.
func (sw *streamWriter) put(parts ...[]byte) error {
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		if _, err := sw.w.Write(p); err != nil {
			return err
		}
	}
	return sw.rc.Flush()
}

// writeJSON sends v as one line.
func (sw *streamWriter) writeJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return sw.write(append(b, '\n'))
}

// jitter is d less up to a quarter, so that streams opened together do not
// keep their keep-alives in step.
func jitter(d time.Duration) time.Duration {
	return d - rand.N(d/4+1)
}

// streamState is what one map stream has sent.
type streamState struct {
	// mu is held by the stream while it builds and writes (serveMap), and
	// tried by the sweep; it guards last (seq is the stream's alone).
	mu   sync.Mutex
	node wire.NodeID
	last *snapshot // the snapshot sent last; nil before the first
	seq  uint64
}

// send writes what brings the stream from st.last to snap, if anything
// changed for its node, and reports whether it wrote.
func (s *Server) send(sw *streamWriter, st *streamState, snap *snapshot, now time.Time) (bool, error) {
	if st.last != nil && st.last.build == snap.build {
		return false, nil
	}
	var body []byte
	var err error
	var sd *sharedDelta
	if st.last != nil && (st.last.access == nil) == (snap.access == nil) {
		sd = s.since(snap, st.last.build)
	}
	switch {
	case (sd == nil || sd.d == nil) && snap.access == nil:
		st.last = snap
		st.seq++
		return true, snap.writeFull(sw, st.node, st.seq, s.cfg.Domain, now)
	case sd == nil || sd.d == nil:
		nm, _ := snap.mapFor(st.node, s.cfg.Domain)
		body, err = encodeBody(&wire.MapResponse{Full: nm})
	case snap.access == nil && !sd.d.nodes[st.node]:
		body, err = sd.body, sd.err
	case snap.access == nil:
		m := unfilteredDelta(snap, sd.d, st.node)
		if !m.IsKeepAlive() {
			body, err = encodeBody(&m)
		}
	case quiet(st.last, snap, sd.d, st.node):
		// Nothing of its map changed: most streams, under a policy.
	default:
		m := filteredDelta(st.last, snap, sd.d, st.node)
		if !m.IsKeepAlive() {
			body, err = encodeBody(&m)
		}
	}
	if err != nil {
		return false, err
	}
	st.last = snap
	if body == nil {
		return false, nil
	}
	st.seq++
	return true, sw.write(frame(body, st.seq, now))
}

// sweep wakes, at every wake-up of the hub, only the map streams the new
// snapshot brings something to. It looks at each stream the way send
// would (nothing new, a delta that does not concern its node, a filtered
// map none of whose peers or services changed) and records the snapshot
// as sent for those it skips; a stream busy sending, or one the snapshot
// concerns, is woken to look for itself. Under a policy a change
// concerns a few hundred of 10,000 streams: the others stay parked, off
// the run queue and with their stacks untouched, where they used to each
// wake, take a send slot and look (39% of the coordinator's CPU while
// 10,000 nodes joined, docs/control-plane-scale.md).
func (s *Server) sweep() {
	var list []*mapStream
	for {
		select {
		case <-s.hub.swept:
		case <-s.ctx.Done():
			return
		}
		gen, _ := s.hub.woken()
		list = s.hub.streamList(list[:0])
		snap, err := s.recent(s.ctx, gen)
		woken := 0
		for _, ms := range list {
			if err != nil || !s.skip(ms.state, snap) {
				ms.wake()
				woken++
			}
		}
		s.metrics.wakeups.WithLabelValues("woken").Add(float64(woken))
		s.metrics.wakeups.WithLabelValues("skipped").Add(float64(len(list) - woken))
		clear(list) // no ended stream is kept until the next sweep
		s.sweptGen.Store(gen)
		s.sweepMu.Lock()
		close(s.sweepDone)
		s.sweepDone = make(chan struct{})
		s.sweepMu.Unlock()
	}
}

// waitSwept waits until the sweep has gone through generation gen: a new
// stream's first map waits for the streams told about its node to be
// woken first, so that no peer reaches a provider that does not know it
// yet. It reports false when ctx ends first.
func (s *Server) waitSwept(ctx context.Context, gen uint64) bool {
	for {
		s.sweepMu.Lock()
		ch := s.sweepDone
		s.sweepMu.Unlock()
		if s.sweptGen.Load() >= gen {
			return true
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		}
	}
}

// skip reports whether snap brings the stream of st nothing it would
// send, and if so records snap as sent. It does not wait for a stream
// that is sending.
func (s *Server) skip(st *streamState, snap *snapshot) bool {
	if !st.mu.TryLock() {
		return false
	}
	defer st.mu.Unlock()
	if st.last == nil || snap.expired[st.node] {
		return false
	}
	if _, ok := snap.byID[st.node]; !ok {
		return false
	}
	if st.last.build == snap.build {
		return true
	}
	if (st.last.access == nil) != (snap.access == nil) {
		return false
	}
	sd := s.since(snap, st.last.build)
	switch {
	case sd.d == nil:
		return false
	case snap.access == nil:
		if sd.d.nodes[st.node] || sd.body != nil || sd.err != nil {
			return false
		}
	case !quiet(st.last, snap, sd.d, st.node):
		return false
	}
	st.last = snap
	return true
}

// servicesFor is what node id's map lists of services under the policy
// (snapshot.filter); its cost is the services', not the nodes'.
func (sn *snapshot) servicesFor(id wire.NodeID) []wire.Service {
	reach := make([]bool, len(sn.services))
	for _, si := range sn.access.reach[id] {
		reach[si] = true
	}
	self := []string{strconv.FormatUint(uint64(id), 10)}
	out := []wire.Service{}
	for si, sv := range sn.services {
		provides := slices.ContainsFunc(sv.Providers, func(p wire.Provider) bool { return p.Node == id })
		switch {
		case provides:
			out = append(out, sv)
		case reach[si]:
			sv.AllowedNodes = self
			if a := sv.HTTPAuth; a != nil && len(a.Rules) > 0 {
				// The request rules name other consumers: providers only.
				sv.HTTPAuth = &wire.HTTPAuth{JWT: a.JWT}
			}
			out = append(out, sv)
		}
	}
	return out
}

// fullEncoding is a snapshot's nodes encoded once for the full maps of
// every stream: entry i is ",{node i}" (the leading comma joins entries),
// and all holds the unexpired nodes' entries in order, node i at
// all[off[i]:off[i+1]] (empty for an expired node).
type fullEncoding struct {
	entries  [][]byte
	all      []byte
	off      []int
	services []byte
	relays   []byte // nil when there is none
}

// encoded returns the snapshot's fullEncoding, built once; entries of
// nodes unchanged since the previous snapshot are taken from its
// encoding when it had one.
func (sn *snapshot) encoded() (*fullEncoding, error) {
	sn.encOnce.Do(func() {
		sn.enc, sn.encErr = sn.encode()
		sn.encDone.Store(sn.enc)
	})
	return sn.enc, sn.encErr
}

func (sn *snapshot) encode() (*fullEncoding, error) {
	prev := sn.prevEnc
	sn.prevEnc = nil
	fe := &fullEncoding{entries: make([][]byte, len(sn.nodes)), off: make([]int, len(sn.nodes)+1)}
	for i, n := range sn.nodes {
		if prev != nil && !sn.delta.nodes[n.ID] {
			if j, ok := prev.byID[n.ID]; ok && j < len(prev.enc.entries) {
				fe.entries[i] = prev.enc.entries[j]
			}
		}
		if fe.entries[i] == nil {
			b, err := json.Marshal(n)
			if err != nil {
				return nil, err
			}
			fe.entries[i] = append([]byte{','}, b...)
		}
		fe.off[i] = len(fe.all)
		if !sn.expired[n.ID] {
			fe.all = append(fe.all, fe.entries[i]...)
		}
	}
	fe.off[len(sn.nodes)] = len(fe.all)
	svcs := sn.services
	if svcs == nil {
		svcs = []wire.Service{}
	}
	var err error
	if fe.services, err = json.Marshal(svcs); err != nil {
		return nil, err
	}
	if len(sn.relays) > 0 {
		if fe.relays, err = json.Marshal(sn.relays); err != nil {
			return nil, err
		}
	}
	return fe, nil
}

// prevEncoding is what a snapshot keeps of the one before it to encode
// its full maps: only the entries, not the snapshot.
type prevEncoding struct {
	byID map[wire.NodeID]int
	enc  *fullEncoding
}

// writeFull sends node id's full, unfiltered map from the shared
// encoding: every node's entry but its own, in a few writes.
func (sn *snapshot) writeFull(sw *streamWriter, id wire.NodeID, seq uint64, domain string, now time.Time) error {
	fe, err := sn.encoded()
	if err != nil {
		return err
	}
	i := sn.byID[id]
	head := append([]byte(`{"seq":`), strconv.AppendUint(nil, seq, 10)...)
	head = append(head, `,"full":{"self":`...)
	head = append(head, fe.entries[i][1:]...)
	head = append(head, `,"peers":[`...)
	before, after := fe.all[:fe.off[i]], fe.all[fe.off[i+1]:]
	if len(before) > 0 {
		before = before[1:]
	} else if len(after) > 0 {
		after = after[1:]
	}
	tail := append([]byte(`],"services":`), fe.services...)
	tail = append(tail, `,"domain":`...)
	d, _ := json.Marshal(domain)
	tail = append(tail, d...)
	if fe.relays != nil {
		tail = append(tail, `,"relays":`...)
		tail = append(tail, fe.relays...)
	}
	tail = append(tail, `},"sent_at":"`...)
	tail = now.AppendFormat(tail, time.RFC3339Nano)
	tail = append(tail, "\"}\n"...)
	return sw.writeParts(head, before, after, tail)
}

// encodedYet returns the snapshot's encoding if a stream already built it.
func (sn *snapshot) encodedYet() (*fullEncoding, bool) {
	fe := sn.encDone.Load()
	return fe, fe != nil
}

// sendGate bounds the map streams that build and write a message at once.
// A wake-up makes every stream runnable together: without a bound, the
// thousands of them queue ahead of everything else the coordinator runs
// (the batch writer, registrations, TLS handshakes), and each of those
// waits for its turn behind the whole fan-out (at 1,000 streams with no
// policy a registration took seconds while the coordinator's CPU was not
// saturated). With it, the streams take turns on a few slots and the rest
// wait parked, off the run queue. A slot is given back after at most
// maxSendHold even when its write has not finished: a slow reader must
// not hold up the fan-out to every other stream.
type sendGate struct {
	slots chan struct{}
}

// maxSendHold is the longest a stream keeps a slot.
const maxSendHold = 20 * time.Millisecond

func (g *sendGate) init(n int) { g.slots = make(chan struct{}, max(n, 1)) }

// acquire waits for a slot and returns its release (idempotent), or false
// when done is closed first.
func (g *sendGate) acquire(done <-chan struct{}) (func(), bool) {
	select {
	case g.slots <- struct{}{}:
	case <-done:
		return nil, false
	}
	var once sync.Once
	release := func() { once.Do(func() { <-g.slots }) }
	t := time.AfterFunc(maxSendHold, release)
	return func() {
		t.Stop()
		release()
	}, true
}
