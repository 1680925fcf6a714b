package bindtest

import (
	"slices"
	"sync"
	"sync/atomic"

	"github.com/meshlink/meshlink/agent/bind"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/relay"
)

// Relays is a set of in-memory relays by URL. Its NewClient is a
// bind.Config.NewRelayClient: a client for a URL no relay has never
// connects.
type Relays struct {
	mu    sync.Mutex // guards the field below
	byURL map[string]*Relay
}

// NewRelays returns an empty set.
func NewRelays() *Relays { return &Relays{byURL: map[string]*Relay{}} }

// Relay is one in-memory relay: it forwards packets between its connected
// clients by key and tells a sender when the destination is not connected,
// as the real relay does with its "peer gone" frame.
type Relay struct {
	Name, URL string

	mu      sync.Mutex // guards the fields below
	clients map[key.Public]*Client
	refused map[key.Public]bool
	tap     func(src, dst key.Public, pkt []byte)
}

// Add returns a new relay at url.
func (rs *Relays) Add(name, url string) *Relay {
	r := &Relay{Name: name, URL: url, clients: map[key.Public]*Client{}, refused: map[key.Public]bool{}}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.byURL[url] = r
	return r
}

// NewClient makes a client of the relay at cfg.URL for the node whose key
// is cfg.PrivateKey.
func (rs *Relays) NewClient(cfg relay.ClientConfig) bind.RelayClient {
	rs.mu.Lock()
	r := rs.byURL[cfg.URL]
	rs.mu.Unlock()
	return &Client{relay: r, cfg: cfg, pub: cfg.PrivateKey.Public(),
		inbox: make(chan func(), 1024), done: make(chan struct{})}
}

// Refuse disconnects the node k and keeps it off the relay until Admit.
func (r *Relay) Refuse(k key.Public) {
	r.mu.Lock()
	r.refused[k] = true
	c := r.clients[k]
	r.mu.Unlock()
	if c != nil {
		c.setConnected(false)
	}
}

// Admit lets the node k on again; its client, if started, connects.
func (r *Relay) Admit(k key.Public) {
	r.mu.Lock()
	delete(r.refused, k)
	c := r.clients[k]
	r.mu.Unlock()
	if c != nil {
		c.connect()
	}
}

// Tap, if f is not nil, is called with every packet the relay hands to a
// connected destination. pkt is valid only during the call.
func (r *Relay) Tap(f func(src, dst key.Public, pkt []byte)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tap = f
}

// Inject hands pkt to the connected node dst as if the node src had sent
// it: what a hostile relay can do, since the relay names the source of
// every frame it forwards. It reports whether dst was connected.
func (r *Relay) Inject(src, dst key.Public, pkt []byte) bool {
	r.mu.Lock()
	to := r.clients[dst]
	r.mu.Unlock()
	if to == nil || !to.Connected() {
		return false
	}
	pkt = slices.Clone(pkt)
	to.run(func() { to.cfg.OnPacket(src, pkt) })
	return true
}

// forward carries pkt from src to dst, or tells from that dst is not here.
func (r *Relay) forward(from *Client, dst key.Public, pkt []byte) {
	r.mu.Lock()
	to := r.clients[dst]
	if to != nil && !to.Connected() {
		to = nil
	}
	tap := r.tap
	r.mu.Unlock()
	if to == nil {
		from.run(func() {
			if from.cfg.OnPeerGone != nil {
				from.cfg.OnPeerGone(dst)
			}
		})
		return
	}
	if tap != nil {
		tap(from.pub, dst, pkt)
	}
	to.run(func() { to.cfg.OnPacket(from.pub, pkt) })
}

// Client is one node's connection to a Relay; it implements
// bind.RelayClient, keeping the contract written there: callbacks run on
// the client's one goroutine, in order, never after Close returns.
type Client struct {
	relay *Relay // nil: a URL without a relay
	cfg   relay.ClientConfig
	pub   key.Public
	inbox chan func()
	done  chan struct{}
	wg    sync.WaitGroup

	mu                          sync.Mutex // guards the fields below
	started, connected, closing bool

	sent, sentBytes, connects atomic.Uint64
}

var _ bind.RelayClient = (*Client)(nil)

// Start implements bind.RelayClient: the client joins its relay and
// connects unless refused.
func (c *Client) Start() {
	c.mu.Lock()
	if c.started || c.closing {
		c.mu.Unlock()
		return
	}
	c.started = true
	c.mu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			select {
			case f := <-c.inbox:
				f()
			case <-c.done:
				return
			}
		}
	}()
	if c.relay == nil {
		return
	}
	c.relay.mu.Lock()
	c.relay.clients[c.pub] = c
	c.relay.mu.Unlock()
	c.connect()
}

// connect connects the client unless its relay refuses it, and runs
// OnConnect.
func (c *Client) connect() {
	r := c.relay
	r.mu.Lock()
	refused := r.refused[c.pub]
	r.mu.Unlock()
	c.mu.Lock()
	ok := c.started && !c.closing && !c.connected && !refused
	if ok {
		c.connected = true
	}
	c.mu.Unlock()
	if !ok {
		return
	}
	c.connects.Add(1)
	c.run(func() {
		if c.cfg.OnConnect != nil {
			c.cfg.OnConnect()
		}
	})
}

func (c *Client) setConnected(v bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.connected = v
}

// run queues f for the client's goroutine; dropped when the queue is full
// or the client is closing, as the real client's would be.
func (c *Client) run(f func()) {
	select {
	case c.inbox <- f:
	case <-c.done:
	default:
	}
}

// Send implements bind.RelayClient.
func (c *Client) Send(dst key.Public, pkt []byte) error {
	if len(pkt) > relay.MaxPacket {
		return relay.ErrPacketTooLarge
	}
	c.mu.Lock()
	connected, closing := c.connected, c.closing
	c.mu.Unlock()
	if closing {
		return relay.ErrClosed
	}
	if !connected {
		return relay.ErrNotConnected
	}
	c.sent.Add(1)
	c.sentBytes.Add(uint64(len(pkt)))
	c.relay.forward(c, dst, slices.Clone(pkt))
	return nil
}

// Connected implements bind.RelayClient.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connected
}

// Stats implements bind.RelayClient.
func (c *Client) Stats() relay.ClientStats {
	n := c.connects.Load()
	return relay.ClientStats{PacketsSent: c.sent.Load(), BytesSent: c.sentBytes.Load(), Connects: n, Reconnects: max(n, 1) - 1}
}

// Close implements bind.RelayClient: it leaves the relay and waits for the
// client's goroutine. It is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return nil
	}
	c.closing, c.connected = true, false
	c.mu.Unlock()
	if r := c.relay; r != nil {
		r.mu.Lock()
		if r.clients[c.pub] == c {
			delete(r.clients, c.pub)
		}
		r.mu.Unlock()
	}
	close(c.done)
	c.wg.Wait()
	return nil
}
