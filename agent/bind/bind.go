// Package bind is the agent's conn.Bind: it carries WireGuard packets to each
// peer over the best path it can find — a direct UDP path found by disco
// pings through NATs (hole punching), or the relay over one outbound TLS
// connection when UDP cannot pass — and moves between them without
// WireGuard noticing, so open TCP connections survive a path change.
//
// WireGuard sees one virtual Endpoint per peer; Send picks the path per call.
// Disco and STUN packets share the UDP socket with WireGuard and are
// filtered out of the receive path.
//
// Files by concern: bind.go the conn.Bind adapter (Open, Send, the receive
// functions, the maintenance loop); peer.go per-peer path state and the
// choice of path; disco.go the ping/pong engine, discomsg.go its wire
// format; relays.go the relay pool, relay choice and the pending queue;
// stun.go the STUN client; status.go what the bind reports.
package bind

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
	"github.com/meshlink/meshlink/stun"
)

// tick is how often the maintenance loop runs (pings, probes, STUN).
const tick = 500 * time.Millisecond

// Config configures a Bind.
type Config struct {
	// PrivateKey is the node's WireGuard private key, used to authenticate
	// disco messages; it never leaves the process.
	PrivateKey key.Private
	Logger     *slog.Logger
	// OnPublicAddr is called (on the bind's goroutine) when STUN learns the
	// node's public UDP address, to publish it in the network map.
	OnPublicAddr func(netip.AddrPort)
	// RelayOnly never uses direct UDP paths: for diagnosis and for
	// measuring the relay.
	RelayOnly bool
	// Inbound, if set, is entered by the WireGuard data packets this bind
	// hands to WireGuard (the device's TUN writes leave it); Outbound is
	// left by the data packets WireGuard sends. See netstack.Gate.
	Inbound, Outbound Gate

	// Inner is the UDP socket under the bind; nil is conn.NewStdNetBind().
	// Its receive functions must report sources as *conn.StdNetEndpoint
	// and its Send must take them, as the standard bind's do: direct paths
	// are addressed that way. Tests pass an in-memory network.
	Inner conn.Bind
	// NewRelayClient makes the client for one relay; nil is relay.NewClient.
	// Tests pass an in-memory relay.
	NewRelayClient func(relay.ClientConfig) RelayClient
}

// Gate bounds the packets inside WireGuard's pipeline (netstack.Gate).
type Gate interface {
	Enter(k int)
	Leave(k int)
}

// isData reports whether p is a WireGuard transport-data message that
// carries a packet (type 4, longer than an empty keep-alive): one that ends
// up written to the TUN device.
func isData(p []byte) bool {
	return len(p) > 32 && p[0] == 4 && p[1] == 0 && p[2] == 0 && p[3] == 0
}

// dataPackets counts the messages of pkts for which isData holds.
func dataPackets(pkts [][]byte) int {
	n := 0
	for _, p := range pkts {
		if isData(p) {
			n++
		}
	}
	return n
}

// Bind implements conn.Bind.
//
// Time comes from the time package only (time.Now, tickers): tests run the
// bind inside a testing/synctest bubble, whose fake clock stands in for an
// injected one.
type Bind struct {
	// Set by New and never changed.
	inner    conn.Bind
	newRelay func(relay.ClientConfig) RelayClient
	log      *slog.Logger
	onAddr   func(netip.AddrPort)
	// relayOnly disables direct paths (Config.RelayOnly).
	relayOnly bool
	// in and out gate the pipeline (Config.Inbound, Config.Outbound).
	in, out Gate

	relayCh chan relayPacket // relay clients -> the relay receive function
	kick    chan struct{}    // wakes the maintenance loop
	// Dropped input, by reason (Drops).
	garbage  atomic.Uint64 // undecodable or unauthenticated disco and STUN packets
	replayed atomic.Uint64 // disco messages seen before (replay window)
	limited  atomic.Uint64 // pings from new addresses beyond the peer's budget
	foreign  atomic.Uint64 // relayed packets from keys that are not our peers

	// One lock for all the path state: a send, a pong or a relay event
	// reads and writes the peer, path and relay state together, and none
	// holds it across I/O. Splitting it would buy little and order locks.
	mu sync.Mutex // guards the fields below, and the unexported non-atomic fields of every peer and path reached from them
	// priv and pub are the node's key, changed by SetPrivateKey.
	priv key.Private
	pub  key.Public
	// peers and byAddr: per-peer path state (peer.go).
	peers  map[key.Public]*peer
	byAddr map[netip.AddrPort]*peer
	// relays, in the network map's order of preference; shutdown is set
	// for good by Shutdown (relays.go).
	relays   []*relayConn
	shutdown bool
	// stun is the STUN client's state (stun.go).
	stun stunState
	// lastStamp is the stamp of the last disco message we sealed.
	lastStamp uint64
	// waiters are Ping calls waiting for the pongs of their txids (disco.go).
	waiters map[[12]byte]chan PingResult
	// openDone is closed by Close, loopDone when the loop has stopped;
	// both nil while the bind is not open.
	openDone, loopDone chan struct{}
}

type relayPacket struct {
	src key.Public
	pkt []byte
}

// New returns a Bind over the standard UDP socket (or cfg.Inner).
func New(cfg Config) *Bind {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	inner := cfg.Inner
	if inner == nil {
		inner = conn.NewStdNetBind()
	}
	newRelay := cfg.NewRelayClient
	if newRelay == nil {
		newRelay = func(c relay.ClientConfig) RelayClient { return relay.NewClient(c) }
	}
	b := &Bind{
		inner:     inner,
		newRelay:  newRelay,
		log:       log.With("subsystem", "bind"),
		priv:      cfg.PrivateKey,
		onAddr:    cfg.OnPublicAddr,
		relayOnly: cfg.RelayOnly,
		in:        cfg.Inbound,
		out:       cfg.Outbound,
		relayCh:   make(chan relayPacket, 1024),
		kick:      make(chan struct{}, 1),
		peers:     map[key.Public]*peer{},
		byAddr:    map[netip.AddrPort]*peer{},
		stun:      stunState{tx: map[[12]byte]time.Time{}},
		waiters:   map[[12]byte]chan PingResult{},
	}
	b.pub = cfg.PrivateKey.Public()
	return b
}

// Endpoint is WireGuard's handle for a peer: whichever path carries the
// packets, WireGuard sees the same endpoint, so its roaming never fights the
// path choice.
type Endpoint struct {
	key key.Public
	b   *Bind
}

const endpointPrefix = "mlpeer:"

// EndpointString is what to give WireGuard's UAPI as a peer's endpoint.
func EndpointString(k key.Public) string {
	raw := k.Raw()
	return endpointPrefix + base64.RawURLEncoding.EncodeToString(raw[:])
}

func (e *Endpoint) ClearSrc()           {}
func (e *Endpoint) SrcToString() string { return "" }
func (e *Endpoint) DstToString() string { return EndpointString(e.key) }
func (e *Endpoint) DstToBytes() []byte  { return e.key.AppendTo(nil) }
func (e *Endpoint) SrcIP() netip.Addr   { return netip.Addr{} }
func (e *Endpoint) DstIP() netip.Addr {
	if a, _ := e.b.bestDirect(e.key); a.IsValid() {
		return a.Addr()
	}
	return netip.Addr{}
}

// ParseEndpoint implements conn.Bind: our peer endpoints, or a plain ip:port.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	if rest, ok := strings.CutPrefix(s, endpointPrefix); ok {
		raw, err := base64.RawURLEncoding.DecodeString(rest)
		if err != nil || len(raw) != 32 {
			return nil, fmt.Errorf("bind: bad endpoint %q", s)
		}
		return b.endpointFor(key.PublicFromRaw([key.Len]byte(raw))), nil
	}
	return b.inner.ParseEndpoint(s)
}

func (b *Bind) endpointFor(k key.Public) *Endpoint {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p := b.peers[k]; p != nil {
		return p.ep
	}
	return &Endpoint{key: k, b: b}
}

// BatchSize implements conn.Bind.
func (b *Bind) BatchSize() int { return b.inner.BatchSize() }

// SetMark implements conn.Bind.
func (b *Bind) SetMark(mark uint32) error { return b.inner.SetMark(mark) }

// Open implements conn.Bind: the UDP socket's receive functions, filtered,
// plus one that yields packets arriving from the relay.
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.inner.Open(port)
	if err != nil {
		return nil, 0, err
	}
	b.mu.Lock()
	done := make(chan struct{})
	b.openDone = done
	loopDone := make(chan struct{})
	b.loopDone = loopDone
	b.mu.Unlock()
	out := make([]conn.ReceiveFunc, 0, len(fns)+1)
	for _, fn := range fns {
		out = append(out, b.filter(fn))
	}
	out = append(out, func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		return b.receiveRelay(done, packets, sizes, eps)
	})
	go func() {
		defer close(loopDone)
		b.loop(done)
	}()
	return out, actual, nil
}

// Close implements conn.Bind. The relay connection stays up (WireGuard
// closes and reopens the bind when its port changes); Shutdown ends it.
func (b *Bind) Close() error {
	b.mu.Lock()
	done, loopDone := b.openDone, b.loopDone
	b.openDone, b.loopDone = nil, nil
	b.mu.Unlock()
	if done != nil {
		close(done)
		<-loopDone
	}
	return b.inner.Close()
}

// Shutdown closes the bind and the relay clients for good.
func (b *Bind) Shutdown() {
	b.Close()
	b.mu.Lock()
	rs := b.relays
	b.relays = nil
	b.shutdown = true
	b.mu.Unlock()
	for _, rc := range rs {
		rc.client.Close()
	}
}

// filter wraps a UDP receive function: disco and STUN are handled here and
// hidden from WireGuard; WireGuard packets from a known path are tagged with
// their peer's endpoint.
func (b *Bind) filter(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for {
			n, err := fn(packets, sizes, eps)
			if err != nil {
				return n, err
			}
			kept := 0
			now := time.Now()
			// A batch is mostly packets of one peer from one address: the
			// peer is looked up (under b.mu) once per run of one source,
			// and its byte count added once per run.
			var (
				lastSrc netip.AddrPort
				lastP   *peer
				run     uint64
			)
			for i := 0; i < n; i++ {
				if sizes[i] == 0 {
					continue
				}
				se, ok := eps[i].(*conn.StdNetEndpoint)
				if !ok {
					kept++
					continue
				}
				src := netip.AddrPortFrom(se.AddrPort.Addr().Unmap(), se.AddrPort.Port())
				pkt := packets[i][:sizes[i]]
				switch {
				case isDisco(pkt):
					b.handleDisco(pkt, src, nil)
					sizes[i] = 0
					// A pong can give src to another peer: the packets
					// after it are looked up again.
					lastSrc = netip.AddrPort{}
				case stun.IsSTUN(pkt):
					b.handleSTUN(pkt, src)
					sizes[i] = 0
				default:
					if src != lastSrc { // never the zero AddrPort: lastSrc starts there
						if lastP != nil {
							lastP.rxDirect.Add(run)
						}
						lastSrc, lastP, run = src, b.directRx(src, now), 0
					}
					if lastP != nil {
						eps[i] = lastP.ep
						run += uint64(sizes[i])
					}
					kept++
				}
			}
			if lastP != nil {
				lastP.rxDirect.Add(run)
			}
			if kept > 0 {
				b.enter(packets[:n], sizes[:n])
				return n, nil
			}
		}
	}
}

func (b *Bind) receiveRelay(done chan struct{}, packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	var first relayPacket
	select {
	case first = <-b.relayCh:
	case <-done:
		return 0, net.ErrClosed
	}
	n := 0
	var (
		lastKey key.Public
		lastEp  conn.Endpoint
	)
	put := func(rp relayPacket) {
		if len(rp.pkt) > len(packets[n]) {
			return
		}
		sizes[n] = copy(packets[n], rp.pkt)
		if lastEp == nil || rp.src != lastKey {
			lastKey, lastEp = rp.src, b.endpointFor(rp.src)
		}
		eps[n] = lastEp
		n++
	}
	put(first)
	for n < len(packets) {
		select {
		case rp := <-b.relayCh:
			put(rp)
			continue
		default:
		}
		break
	}
	b.enter(packets[:n], sizes[:n])
	return n, nil
}

// enter waits at the inbound gate for the data packets about to be handed
// to WireGuard.
func (b *Bind) enter(packets [][]byte, sizes []int) {
	if b.in == nil {
		return
	}
	k := 0
	for i, p := range packets {
		if isData(p[:sizes[i]]) {
			k++
		}
	}
	b.in.Enter(k)
}

// Send implements conn.Bind.
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if b.out != nil {
		b.out.Leave(dataPackets(bufs))
	}
	e, ok := ep.(*Endpoint)
	if !ok {
		return b.inner.Send(bufs, ep)
	}
	now := time.Now()
	b.mu.Lock()
	p := b.peers[e.key]
	var direct *path
	if p != nil && !b.relayOnly {
		direct = p.best(now)
		if direct != nil {
			p.lastTx = now
		}
	}
	var r RelayClient
	if rc := b.relayFor(p, now); rc != nil {
		r = rc.client
		if direct == nil && p != nil && p.via == nil {
			p.keepUnconfirmed(rc, bufs, now)
		}
	}
	b.mu.Unlock()
	if direct != nil {
		err := sendRuns(bufs, direct.ep, b.inner.Send)
		if err == nil && p != nil {
			p.txDirect.Add(sizeOf(bufs))
		}
		return err
	}
	// No proven direct path: send over the relay and, like Tailscale does
	// until a path is trusted, to the addresses the network map gave as
	// well. Whichever arrives first wins; a plain LAN then needs no relay,
	// and a relay on which the peer is not (yet) connected loses nothing.
	sent := false
	if r != nil {
		var rerr error
		for _, buf := range bufs {
			if err := r.Send(e.key, buf); err != nil {
				rerr = err
				break
			}
		}
		if rerr == nil {
			sent = true
			if p != nil {
				p.txRelay.Add(sizeOf(bufs))
			}
		}
	}
	if p != nil && !b.relayOnly {
		eps := b.mapEndpoints(p)
		for _, pep := range eps {
			if sendRuns(bufs, pep, b.inner.Send) == nil {
				sent = true
			}
		}
		if len(eps) > 0 {
			p.txDirect.Add(sizeOf(bufs))
		}
	}
	if sent {
		return nil
	}
	if p != nil {
		return b.holdPending(p, bufs, now)
	}
	return errors.New("bind: no path to peer (not in the network map)")
}

// maxSendRun caps the bytes of WireGuard packets handed to the UDP socket
// in one Send. The standard bind coalesces a batch into UDP GSO messages of
// up to 65,507 B; with the headers such an skb reaches the device's
// gso_max_size (64 KiB on a veth), so the kernel segments it in software
// on the way out and the far side's GRO gets single datagrams. Runs of at
// most this many bytes stay under it, at the price of a few more sendmmsg
// calls per batch (see docs/netstack-tuning.md#udp-gso-messages-under-64-kib).
const maxSendRun = 64000

// runBufs holds the buffers sendRuns coalesces into; there are as many as
// Sends run at once (one per peer WireGuard is sending to).
var runBufs = sync.Pool{New: func() any { return new([maxSendRun]byte) }}

// sendRuns sends bufs to ep with send, in order, in consecutive runs that
// the standard bind turns into one UDP GSO message each: packets of one
// size (the last may be shorter), at most maxSendRun bytes (a single
// larger packet goes alone). The standard bind coalesces a run into the
// spare capacity of its first buffer, and WireGuard's buffers hold one
// packet (third_party/wireguard-go/PATCHES.md), so the first packet of a
// run goes in a buffer of runBufs for the call. bufs is left as it was. It
// stops at the first error.
func sendRuns(bufs [][]byte, ep conn.Endpoint, send func([][]byte, conn.Endpoint) error) error {
	var scratch *[maxSendRun]byte
	defer func() {
		if scratch != nil {
			runBufs.Put(scratch)
		}
	}()
	for len(bufs) > 0 {
		first := len(bufs[0])
		n, size := 1, first
		for n < len(bufs) && size+len(bufs[n]) <= maxSendRun && len(bufs[n]) <= first && len(bufs[n-1]) == first {
			size += len(bufs[n])
			n++
		}
		orig := bufs[0]
		if n > 1 && cap(orig) < size {
			if scratch == nil {
				scratch = runBufs.Get().(*[maxSendRun]byte)
			}
			bufs[0] = append(scratch[:0], orig...)
		}
		err := send(bufs[:n], ep)
		bufs[0] = orig
		if err != nil {
			return err
		}
		bufs = bufs[n:]
	}
	return nil
}

func sizeOf(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

func (b *Bind) poke() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// loop sends disco pings and STUN requests while the bind is open.
func (b *Bind) loop(done chan struct{}) {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		b.maintain(time.Now())
		select {
		case <-done:
			return
		case <-t.C:
		case <-b.kick:
		}
	}
}

// outgoing is a disco or STUN packet built under b.mu, sent after.
type outgoing struct {
	pkt []byte
	to  *conn.StdNetEndpoint
}

// maintain sends what is due: pings and probes of the peers' paths, STUN
// requests.
func (b *Bind) maintain(now time.Time) {
	var out []outgoing
	b.mu.Lock()
	if !b.relayOnly {
		for _, p := range b.peers {
			out = b.maintainPeerLocked(p, now, out)
		}
	}
	out = b.stunDueLocked(now, out)
	b.mu.Unlock()
	for _, o := range out {
		if err := b.inner.Send([][]byte{o.pkt}, o.to); err != nil {
			b.log.Debug("disco/STUN send failed", "to", o.to.AddrPort, "err", err)
		}
	}
}

var _ conn.Bind = (*Bind)(nil)
