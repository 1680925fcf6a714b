// Package control is a load generator for the coordinator's control plane.
// Each simulated node behaves like a meshlink agent on the wire: its own
// HTTP/2 transport over TLS 1.3 pinned to the coordinator's certificate
// fingerprint, a registration with a join token, then the map stream held
// open; every ServiceEvery-th node exposes a service. Watches measure how
// long a change takes to reach every stream, and Compare checks that every
// stream's map is the one the coordinator holds.
//
// The package keeps per stream only what the figures need (which peers are
// known and online, the services' ports) unless Config.KeepMaps asks for
// whole maps: at 10,000 nodes whole maps would take tens of gigabytes here.
package control

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// Config says what to generate.
type Config struct {
	Token string
	// ServiceEvery: node i exposes service "svc-i" when i%ServiceEvery == 0
	// (0 never).
	ServiceEvery int
	// KeepMaps applies every message to a whole wire.NetworkMap per node.
	KeepMaps bool
	// GroupTokens, when set, are the join tokens of the policy groups
	// (Groups): node i joins with GroupTokens[Groups.Of(i)], which tags it
	// with its group.
	GroupTokens []string
	Groups      *Groups
	Logf        func(format string, args ...any)
}

// Gen is a set of simulated nodes.
type Gen struct {
	cfg  Config
	tok  wire.JoinToken
	toks []wire.JoinToken // by group, with Config.GroupTokens

	mu    sync.Mutex // guards nodes
	nodes []*Node

	watch atomic.Pointer[Watch]
	wg    sync.WaitGroup
	// Drops counts map streams that ended without Disconnect.
	Drops atomic.Int64
	// Retries counts registrations and exposes tried again after an error.
	Retries atomic.Int64
	triesMu sync.Mutex
	tried   map[int]int // registrations of node i begun
}

// New parses the token; no node exists yet.
func New(cfg Config) (*Gen, error) {
	tok, err := wire.ParseToken(cfg.Token)
	if err != nil {
		return nil, err
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	g := &Gen{cfg: cfg, tok: tok}
	for _, s := range cfg.GroupTokens {
		t, err := wire.ParseToken(s)
		if err != nil {
			return nil, err
		}
		g.toks = append(g.toks, t)
	}
	if len(g.toks) > 0 && (cfg.Groups == nil || len(g.toks) != cfg.Groups.Count) {
		return nil, fmt.Errorf("control: %d group tokens for %v", len(g.toks), cfg.Groups)
	}
	return g, nil
}

// Node is one simulated agent.
type Node struct {
	g      *Gen
	pos    int // in g.nodes
	Index  int
	Name   string
	ID     wire.NodeID
	secret string
	key    key.Public
	http   *http.Client
	tr     *http.Transport

	// Register is how long the registration took; RegisterConn, the part
	// of it until the connection was ready (TCP and the TLS handshake):
	// the rest is the request's.
	Register, RegisterConn time.Duration

	mu        sync.Mutex // guards the fields below
	nm        wire.NetworkMap
	known     bitset // peers in the map
	online    bitset // of those, the online ones
	nOnline   int
	services  map[string]uint16
	msgs      int  // messages with a change
	connected bool // the first message arrived
	cancel    func()
	done      chan struct{} // closed when the stream goroutine ends
	err       error         // why the last stream ended
}

// Nodes returns the nodes made so far.
func (g *Gen) Nodes() []*Node {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.nodes)
}

// Close ends every stream and waits for them: all cancelled first, then
// waited for, so that 10,000 streams do not end one by one.
func (g *Gen) Close() {
	nodes := g.Nodes()
	for _, n := range nodes {
		n.mu.Lock()
		cancel := n.cancel
		n.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	}
	for _, n := range nodes {
		n.Disconnect()
		n.tr.CloseIdleConnections()
	}
	g.wg.Wait()
}

// Add makes node number i (named "bench-i") and registers it; it does not
// open the stream yet.
func (g *Gen) Add(ctx context.Context, i int) (*Node, error) {
	tlsConf := wire.PinnedTLSConfig(g.tok.Fingerprint)
	tlsConf.MinVersion = tls.VersionTLS13
	tr := &http.Transport{
		TLSClientConfig:       tlsConf,
		ForceAttemptHTTP2:     true,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   1,
	}
	priv := key.NewPrivate()
	n := &Node{g: g, Index: i, Name: "bench-" + strconv.Itoa(i), key: priv.Public(), http: &http.Client{Transport: tr}, tr: tr, services: map[string]uint16{}}
	if try := g.tries(i); try > 0 {
		// A retry: the earlier attempt may have registered the name
		// with the key that was lost with it.
		n.Name += "-r" + strconv.Itoa(try)
	}
	start := time.Now()
	var resp wire.RegisterResponse
	tok := g.tok
	if len(g.toks) > 0 {
		tok = g.toks[g.cfg.Groups.Of(i)]
	}
	var gotConn time.Duration
	tctx := httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { gotConn = time.Since(start) }})
	err := n.call(tctx, wire.PathRegister, wire.RegisterRequest{Version: wire.ProtocolVersion, TokenID: tok.ID, TokenSecret: tok.Secret,
		Name: n.Name, Hostname: n.Name, NodeKey: n.key, ListenPort: 41641}, &resp)
	if err != nil {
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("register %s: %w", n.Name, err)
	}
	n.Register, n.RegisterConn = time.Since(start), gotConn
	n.ID, n.secret = resp.Node.ID, resp.NodeSecret
	g.mu.Lock()
	n.pos = len(g.nodes)
	g.nodes = append(g.nodes, n)
	g.mu.Unlock()
	return n, nil
}

// tries counts the registrations of node i begun and returns how many
// came before this one.
func (g *Gen) tries(i int) int {
	g.triesMu.Lock()
	defer g.triesMu.Unlock()
	if g.tried == nil {
		g.tried = map[int]int{}
	}
	g.tried[i]++
	return g.tried[i] - 1
}

// Service is the name node n exposes, if any.
func (n *Node) Service() (string, bool) {
	if e := n.g.cfg.ServiceEvery; e > 0 && n.Index%e == 0 {
		return "svc-" + strconv.Itoa(n.Index), true
	}
	return "", false
}

// Expose exposes (or re-exposes with a new port) the node's service.
func (n *Node) Expose(ctx context.Context, name string, port uint16) error {
	return n.call(ctx, wire.PathServices, wire.ServiceRequest{Version: wire.ProtocolVersion, Name: name, Port: port}, nil)
}

func (n *Node) call(ctx context.Context, path string, body, out any) error {
	resp, err := n.post(ctx, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return err
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out)
}

func (n *Node) post(ctx context.Context, path string, body any) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.g.tok.URL+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	if n.ID != 0 {
		req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(n.ID), 10))
		req.Header.Set(wire.HeaderNodeSecret, n.secret)
	}
	resp, err := n.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return resp, nil
}

// Connect opens the map stream and returns once its response headers
// arrived; messages are read in the background until Disconnect. A stream
// that ends otherwise is opened again, with backoff, as an agent does.
func (n *Node) Connect(ctx context.Context) error {
	sctx, cancel := context.WithCancel(context.Background())
	resp, err := n.openStream(ctx, sctx)
	if err != nil {
		cancel()
		return err
	}
	done := make(chan struct{})
	n.mu.Lock()
	n.cancel, n.done, n.connected = cancel, done, false
	n.mu.Unlock()
	n.g.wg.Add(1)
	go func() {
		defer n.g.wg.Done()
		defer close(done)
		wait := 250 * time.Millisecond
		for {
			err := n.read(resp.Body)
			resp.Body.Close()
			n.mu.Lock()
			n.err = err
			n.mu.Unlock()
			for {
				if sctx.Err() != nil {
					return
				}
				n.g.Drops.Add(1)
				n.g.cfg.Logf("%s: map stream ended: %v", n.Name, err)
				select {
				case <-time.After(wait):
				case <-sctx.Done():
					return
				}
				wait = min(2*wait, 4*time.Second)
				if resp, err = n.openStream(sctx, sctx); err == nil {
					break
				}
			}
		}
	}()
	return nil
}

// openStream posts the map request on sctx (which bounds the stream) and
// waits for the response headers within ctx.
func (n *Node) openStream(ctx, sctx context.Context) (*http.Response, error) {
	hctx, hcancel := context.WithCancel(sctx)
	stop := context.AfterFunc(ctx, hcancel)
	resp, err := n.post(hctx, wire.PathMap, wire.MapRequest{Version: wire.ProtocolVersion, ListenPort: 41641,
		MapIdle: 120}) // as agents wait (agent.Config.MapIdle)
	stop()
	if err != nil {
		hcancel()
		return nil, fmt.Errorf("map stream of %s: %w", n.Name, err)
	}
	// hctx stays live with the stream; sctx's cancel ends both.
	return resp, nil
}

// Disconnect ends the map stream and waits for its reader.
func (n *Node) Disconnect() {
	n.mu.Lock()
	cancel, done := n.cancel, n.done
	n.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// Connected reports whether the stream's first message arrived.
func (n *Node) Connected() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.connected
}

// read applies the stream's messages until it ends.
func (n *Node) read(body io.Reader) error {
	br := bufio.NewReaderSize(body, 4<<10)
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		now := time.Now()
		if n.g.cfg.KeepMaps {
			var m wire.MapResponse
			if err := json.Unmarshal(line, &m); err != nil {
				return err
			}
			n.apply(now, &m)
			continue
		}
		var m lightMsg
		if err := parseLight(line, &m); err != nil {
			return err
		}
		n.applyLight(now, &m)
	}
}

// lightMsg is the part of a wire.MapResponse the figures need.
type lightMsg struct {
	Full *struct {
		Peers    []lightNode    `json:"peers"`
		Services []lightService `json:"services"`
	} `json:"full"`
	PeersChanged    []lightNode    `json:"peers_changed"`
	PeersRemoved    []wire.NodeID  `json:"peers_removed"`
	ServicesChanged []lightService `json:"services_changed"`
	ServicesRemoved []string       `json:"services_removed"`
}

type lightNode struct {
	ID     wire.NodeID `json:"id"`
	Online bool        `json:"online"`
}

type lightService struct {
	Name string `json:"name"`
	Port uint16 `json:"port"`
}

func (m *lightMsg) change() bool {
	return m.Full != nil || len(m.PeersChanged)+len(m.PeersRemoved)+len(m.ServicesChanged)+len(m.ServicesRemoved) > 0
}

func (n *Node) applyLight(now time.Time, m *lightMsg) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.connected = true
	if !m.change() {
		return
	}
	n.msgs++
	if m.Full != nil {
		n.known, n.online, n.nOnline = nil, nil, 0
		clear(n.services)
		m.PeersChanged = append(m.Full.Peers, m.PeersChanged...)
		m.ServicesChanged = append(m.Full.Services, m.ServicesChanged...)
	}
	for _, id := range m.PeersRemoved {
		n.setPeer(id, false, false)
	}
	for _, p := range m.PeersChanged {
		n.setPeer(p.ID, true, p.Online)
	}
	for _, s := range m.ServicesRemoved {
		delete(n.services, s)
	}
	for _, s := range m.ServicesChanged {
		n.services[s.Name] = s.Port
	}
	n.check(now)
}

func (n *Node) apply(now time.Time, m *wire.MapResponse) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.connected = true
	if m.IsKeepAlive() {
		return
	}
	n.msgs++
	n.nm.Apply(m)
	n.known, n.online, n.nOnline = nil, nil, 0
	clear(n.services)
	for _, p := range n.nm.Peers {
		n.setPeer(p.ID, true, p.Online)
	}
	for _, s := range n.nm.Services {
		n.services[s.Name] = s.Port
	}
	n.check(now)
}

// setPeer records peer id as known (or gone) and online; n.mu is held.
func (n *Node) setPeer(id wire.NodeID, known, online bool) {
	if n.online.get(id) {
		n.nOnline--
	}
	n.known.set(id, known)
	n.online.set(id, known && online)
	if known && online {
		n.nOnline++
	}
}

// Map returns a copy of the node's whole map (Config.KeepMaps).
func (n *Node) Map() wire.NetworkMap {
	n.mu.Lock()
	defer n.mu.Unlock()
	nm := n.nm
	nm.Peers = slices.Clone(nm.Peers)
	nm.Services = slices.Clone(nm.Services)
	return nm
}

// State is what a node's stream has told it, in figures.
type State struct {
	Peers, Online int
	Services      map[string]uint16
	Msgs          int
}

// Knows reports whether peer id is in the node's map, and online.
func (n *Node) Knows(id wire.NodeID) (known, online bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.known.get(id), n.online.get(id)
}

// OnlinePeers is how many peers the node's map shows online.
func (n *Node) OnlinePeers() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.nOnline
}

// Port is the port the node's map gives service name (0 if absent).
func (n *Node) Port(name string) uint16 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.services[name]
}

// Err is why the node's last stream ended (nil while it runs).
func (n *Node) Err() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.err
}

// bitset holds node IDs up to maxID.
type bitset []uint64

const maxID = 1 << 22

func (b bitset) get(id wire.NodeID) bool {
	i := int(id / 64)
	return i < len(b) && b[i]&(1<<(id%64)) != 0
}

func (b *bitset) set(id wire.NodeID, v bool) {
	if id >= maxID {
		return
	}
	i := int(id / 64)
	if i >= len(*b) {
		if !v {
			return
		}
		*b = append(*b, make([]uint64, i+1-len(*b)+len(*b)/4)...)
	}
	if v {
		(*b)[i] |= 1 << (id % 64)
	} else {
		(*b)[i] &^= 1 << (id % 64)
	}
}

// Watch records when each node's stream first satisfies a condition.
type Watch struct {
	pred  func(*Node) bool
	Start time.Time
	nodes []*Node
	slot  []int       // by Node.pos: the index into nodes, -1 if not watched
	at    []time.Time // by index into nodes; written under the node's mu
	msgs0 []int
	msgs  []int
	left  atomic.Int64
	all   chan struct{}
}

// Watch starts watching every node made so far but skip (-1 none) for
// pred, which is called with the node's mu held after each message.
// Only one watch runs at a time.
func (g *Gen) Watch(skip int, pred func(*Node) bool) *Watch {
	return g.WatchSince(time.Now(), skip, pred)
}

// WatchSince is Watch with delays counted from start.
func (g *Gen) WatchSince(start time.Time, skip int, pred func(*Node) bool) *Watch {
	return g.WatchSet(start, g.Nodes(), skip, pred)
}

// WatchSet is WatchSince over nodes only (the audience of a change under
// a policy).
func (g *Gen) WatchSet(start time.Time, nodes []*Node, skip int, pred func(*Node) bool) *Watch {
	w := &Watch{pred: pred, Start: start, nodes: nodes, at: make([]time.Time, len(nodes)),
		msgs0: make([]int, len(nodes)), msgs: make([]int, len(nodes)), all: make(chan struct{})}
	w.slot = make([]int, len(g.Nodes()))
	for i := range w.slot {
		w.slot[i] = -1
	}
	for i, n := range nodes {
		w.slot[n.pos] = i
	}
	w.left.Store(int64(len(nodes)))
	for i, n := range nodes {
		n.mu.Lock()
		w.msgs0[i] = n.msgs
		n.mu.Unlock()
		if n.Index == skip {
			w.at[i] = w.Start
			w.left.Add(-1)
		}
	}
	g.watch.Store(w)
	if w.left.Load() == 0 {
		close(w.all)
	}
	return w
}

// check is called with n.mu held after a message.
func (n *Node) check(now time.Time) {
	w := n.g.watch.Load()
	if w == nil {
		return
	}
	if n.pos >= len(w.slot) || w.slot[n.pos] < 0 {
		return
	}
	i := w.slot[n.pos]
	if !w.at[i].IsZero() || !w.pred(n) {
		return
	}
	w.at[i] = now
	w.msgs[i] = n.msgs - w.msgs0[i]
	if w.left.Add(-1) == 0 {
		close(w.all)
	}
}

// Recheck evaluates the watch on every node now (for a condition that
// may already hold).
func (w *Watch) Recheck() {
	now := time.Now()
	for _, n := range w.nodes {
		n.mu.Lock()
		n.check(now)
		n.mu.Unlock()
	}
}

// ErrTimeout is returned by Wait when some stream never got there.
var ErrTimeout = errors.New("control: not every stream saw the change in time")

// Wait waits until every node satisfied the watch or timeout passed,
// and returns the delays from Start, sorted.
func (w *Watch) Wait(timeout time.Duration) (Result, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	var err error
	select {
	case <-w.all:
	case <-t.C:
		err = fmt.Errorf("%w: %d of %d streams missing after %v", ErrTimeout, w.left.Load(), len(w.nodes), timeout)
		for i, n := range w.nodes {
			n.mu.Lock()
			if w.at[i].IsZero() {
				err = fmt.Errorf("%w (%s: connected %v, %d peers online, %d services, last error %v)", err, n.Name, n.connected, n.nOnline, len(n.services), n.err)
				n.mu.Unlock()
				break
			}
			n.mu.Unlock()
		}
	}
	var r Result
	for i, n := range w.nodes {
		n.mu.Lock()
		if !w.at[i].IsZero() {
			r.Delays = append(r.Delays, w.at[i].Sub(w.Start))
			r.Msgs = append(r.Msgs, w.msgs[i])
		}
		n.mu.Unlock()
	}
	slices.Sort(r.Delays)
	slices.Sort(r.Msgs)
	return r, err
}

// Result is what a watch measured.
type Result struct {
	Delays []time.Duration // sorted
	Msgs   []int           // messages each stream took to get there, sorted
}

// Pct is the p-th percentile delay (0 with none).
func (r Result) Pct(p float64) time.Duration { return Percentile(r.Delays, p) }

// Percentile of sorted ds.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(float64(len(ds)-1) * p / 100)
	return ds[i]
}
