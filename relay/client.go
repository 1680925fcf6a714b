package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// Errors of Client.Send. The packet is dropped in every case.
var (
	ErrNotConnected   = errors.New("relay: not connected")
	ErrQueueFull      = errors.New("relay: outbound queue full")
	ErrPacketTooLarge = errors.New("relay: packet larger than a relay frame")
	ErrClosed         = errors.New("relay: client closed")
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// URL is the relay's base URL (https://host:port); Fingerprint the
	// pinned SHA-256 of its certificate, lowercase hex (wire.CertFingerprint).
	// An empty Fingerprint verifies the certificate against the system's
	// roots instead.
	URL, Fingerprint string
	// RelayKey is the relay's public key (wire.Relay.Key), PrivateKey the
	// node's WireGuard private key: with them the client proves the node's
	// key to the relay. The private key never leaves the client.
	RelayKey   key.Public
	PrivateKey key.Private
	// Logger receives structured logs; nil discards.
	Logger *slog.Logger
	// OnPacket is called on the client's read goroutine for every packet
	// relayed to this node; pkt is valid only during the call.
	OnPacket func(src key.Public, pkt []byte)
	// OnPeerGone, optional, is called on the read goroutine when the relay
	// reports that a destination is not connected to it.
	OnPeerGone func(dst key.Public)
	// OnConnect, optional, is called (on the client's goroutine) each time
	// a connection is up and Send works.
	OnConnect func()
	// RetryMin and RetryMax bound the reconnect backoff; defaults 500ms and 30s.
	RetryMin, RetryMax time.Duration
}

// ClientStats are a Client's counters.
type ClientStats struct {
	PacketsSent, BytesSent         uint64
	PacketsReceived, BytesReceived uint64
	// Dropped counts packets Send refused (not connected, queue full).
	Dropped uint64
	// Connects counts successful connections; Reconnects those after the first.
	Connects, Reconnects uint64
	// LastError is the last connection error, "" after a success.
	LastError string
}

const (
	// clientQueueLen and clientQueueBytes bound a client's outbound queue.
	clientQueueLen   = 512
	clientQueueBytes = 2 << 20
	dialTimeout      = 15 * time.Second
	defaultKeepAlive = 30 * time.Second
	// stableSession is how long a connection must last for the backoff to
	// start again from RetryMin.
	stableSession = 10 * time.Second
)

// Client keeps one relay connection up, reconnecting with backoff, and
// carries packets over it.
type Client struct {
	cfg  ClientConfig
	log  *slog.Logger
	tls  *tls.Config
	pub  key.Public // the node's public key
	addr string     // host:port to dial
	path string     // request path
	host string     // Host header

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex // guards the fields below
	started   bool
	sess      *session // the live connection, nil when down
	lastError string

	sent, sentBytes, recv, recvBytes, dropped, connects atomic.Uint64
}

// session is one upgraded connection.
type session struct {
	conn net.Conn
	out  *frameQueue
	done chan struct{}
	once sync.Once
}

func (s *session) close() {
	s.once.Do(func() {
		close(s.done)
		s.conn.Close()
		s.out.close()
	})
}

// NewClient returns a client; nothing happens until Start.
func NewClient(cfg ClientConfig) *Client {
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = 500 * time.Millisecond
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 30 * time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = cfg.RetryMin
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, log: log.With("subsystem", "relay-client", "relay", cfg.URL)}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.pub = cfg.PrivateKey.Public()
	c.tls = wire.PinnedTLSConfig(cfg.Fingerprint)
	c.tls.NextProtos = []string{"http/1.1"}
	// Relays and the coordinator require TLS 1.3; asking for it too means
	// a downgraded or impostor server is refused, never spoken to.
	c.tls.MinVersion = tls.VersionTLS13
	if u, err := url.Parse(cfg.URL); err == nil && u.Scheme == "https" && u.Host != "" {
		port := u.Port()
		if port == "" {
			port = "443"
		}
		c.addr = net.JoinHostPort(u.Hostname(), port)
		c.host = u.Host
		c.path = strings.TrimRight(u.Path, "/") + Path
		c.tls.ServerName = u.Hostname()
	}
	return c
}

// Start connects in the background and keeps reconnecting until Close.
// Calling it again, or after Close, does nothing.
func (c *Client) Start() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started || c.ctx.Err() != nil {
		return
	}
	c.started = true
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.run()
	}()
}

// run is the reconnect loop.
func (c *Client) run() {
	if c.addr == "" {
		c.setError(fmt.Errorf("relay URL %q is not https://host:port", c.cfg.URL))
		c.log.Error("relay disabled: its URL is not https://host:port; check the coordinator's --url")
		return
	}
	// Jitter spreads the reconnects of many agents after a restart.
	bo := backoff.Backoff{Min: c.cfg.RetryMin, Max: c.cfg.RetryMax, Jitter: backoff.EqualJitter}
	for {
		start := time.Now()
		err := c.session()
		if c.ctx.Err() != nil {
			return
		}
		if time.Since(start) >= stableSession {
			bo.Reset()
		}
		c.setError(err)
		wait := bo.Next()
		c.log.Warn("relay connection failed; retrying", "err", err, "retry_in", wait.Round(time.Millisecond))
		if !backoff.Sleep(c.ctx, wait) {
			return
		}
	}
}

func (c *Client) setError(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		c.lastError = ""
	} else {
		c.lastError = err.Error()
	}
}

// upgradeError is a refusal of the upgrade by the server.
type upgradeError struct {
	status int
	body   wire.Error
}

func (e *upgradeError) Error() string {
	switch {
	case e.status == http.StatusUnauthorized:
		return fmt.Sprintf("the relay refused this node's key proof (%d %s: %s)", e.status, e.body.Code, e.body.Message)
	case e.body.Message != "":
		return fmt.Sprintf("relay upgrade refused: %d %s: %s", e.status, e.body.Code, e.body.Message)
	default:
		return fmt.Sprintf("relay upgrade refused: HTTP %d", e.status)
	}
}

// dial opens the TLS connection and performs the upgrade.
func (c *Client) dial() (net.Conn, *bufio.Reader, error) {
	ctx, cancel := context.WithTimeout(c.ctx, dialTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{KeepAlive: 30 * time.Second}, Config: c.tls}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", c.addr, err)
	}
	// Close on cancellation too (Close during the handshake).
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	ok := false
	defer func() {
		if !stop() || !ok {
			conn.Close()
		}
	}()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	cs := conn.(*tls.Conn).ConnectionState()
	secret, err := sessionSecret(&cs)
	if err != nil {
		return nil, nil, fmt.Errorf("export TLS keying material: %w", err)
	}
	proof, err := makeProof(secret, c.cfg.PrivateKey, c.cfg.RelayKey)
	if err != nil {
		return nil, nil, err
	}
	req := "GET " + c.path + " HTTP/1.1\r\n" +
		"Host: " + c.host + "\r\n" +
		"Connection: Upgrade\r\n" +
		"Upgrade: " + Protocol + "\r\n" +
		HeaderNodeKey + ": " + c.pub.String() + "\r\n" +
		HeaderProof + ": " + proof + "\r\n" +
		wire.HeaderVersion + ": " + strconv.Itoa(wire.ProtocolVersion) + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, nil, fmt.Errorf("send upgrade request: %w", err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		return nil, nil, fmt.Errorf("read upgrade response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		ue := &upgradeError{status: resp.StatusCode}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		json.Unmarshal(body, &ue.body)
		return nil, nil, ue
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), Protocol) {
		return nil, nil, fmt.Errorf("server switched to %q, not %s", resp.Header.Get("Upgrade"), Protocol)
	}
	ok = true
	return conn, br, nil
}

// session connects once and runs until the connection ends.
func (c *Client) session() error {
	conn, br, err := c.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	buf := make([]byte, MaxPayload)

	// The first frame says how often the server will speak.
	conn.SetDeadline(time.Now().Add(dialTimeout))
	typ, p, err := readFrame(br, buf)
	if err != nil {
		return fmt.Errorf("read server info: %w", err)
	}
	if typ != FrameServerInfo {
		return fmt.Errorf("%w: first frame has type %d, not server info", errMalformed, typ)
	}
	var info ServerInfo
	if err := json.Unmarshal(p, &info); err != nil {
		return fmt.Errorf("%w: server info: %v", errMalformed, err)
	}
	keepAlive := defaultKeepAlive
	if info.KeepAliveMS > 0 {
		keepAlive = time.Duration(info.KeepAliveMS) * time.Millisecond
	}
	conn.SetDeadline(time.Time{})

	s := &session{conn: conn, out: newFrameQueue(clientQueueLen, clientQueueBytes, nil), done: make(chan struct{})}
	defer s.close()
	c.mu.Lock()
	if c.ctx.Err() != nil {
		c.mu.Unlock()
		return ErrClosed
	}
	c.sess = s
	c.lastError = ""
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if c.sess == s {
			c.sess = nil
		}
		c.mu.Unlock()
	}()
	if c.connects.Add(1) > 1 {
		c.log.Info("relay reconnected")
	} else {
		c.log.Info("relay connected")
	}
	if c.cfg.OnConnect != nil {
		c.cfg.OnConnect()
	}
	stop := context.AfterFunc(c.ctx, s.close)
	defer stop()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer s.close()
		c.writeLoop(s, keepAlive)
	}()
	err = c.readLoop(s, br, buf, 3*keepAlive+5*time.Second)
	s.close()
	wg.Wait()
	if c.ctx.Err() != nil {
		return ErrClosed
	}
	if errors.Is(err, net.ErrClosed) {
		err = errors.New("connection closed by the write side")
	}
	return fmt.Errorf("relay connection lost: %w", err)
}

func (c *Client) readLoop(s *session, br *bufio.Reader, buf []byte, idle time.Duration) error {
	for {
		s.conn.SetReadDeadline(time.Now().Add(idle))
		typ, p, err := readFrame(br, buf)
		if err != nil {
			return err
		}
		switch typ {
		case FrameRecvPacket:
			src := key.PublicFromRaw([KeyLen]byte(p))
			c.recv.Add(1)
			c.recvBytes.Add(uint64(len(p) - KeyLen))
			if c.cfg.OnPacket != nil {
				c.cfg.OnPacket(src, p[KeyLen:])
			}
		case FramePeerGone:
			if c.cfg.OnPeerGone != nil {
				c.cfg.OnPeerGone(key.PublicFromRaw([KeyLen]byte(p)))
			}
		}
	}
}

func (c *Client) writeLoop(s *session, keepAlive time.Duration) {
	s.out.writeTo(s.conn, s.done, keepAlive)
}

// Send queues pkt (copied) for dst without blocking. When the client is not
// connected or its queue is full, the packet is dropped and the error says
// why (ErrNotConnected, ErrQueueFull).
func (c *Client) Send(dst key.Public, pkt []byte) error {
	if len(pkt) > MaxPacket {
		c.dropped.Add(1)
		return ErrPacketTooLarge
	}
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s == nil {
		c.dropped.Add(1)
		if c.ctx.Err() != nil {
			return ErrClosed
		}
		return ErrNotConnected
	}
	select {
	case <-s.done:
		c.dropped.Add(1)
		return ErrNotConnected
	default:
	}
	if !s.out.push(newPacketFrame(FrameSendPacket, dst, pkt)) {
		c.dropped.Add(1)
		select {
		case <-s.done:
			return ErrNotConnected
		default:
			return ErrQueueFull
		}
	}
	c.sent.Add(1)
	c.sentBytes.Add(uint64(len(pkt)))
	return nil
}

// Connected reports whether a relay connection is up now.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sess != nil
}

// Stats returns the client's counters.
func (c *Client) Stats() ClientStats {
	c.mu.Lock()
	lastErr := c.lastError
	c.mu.Unlock()
	n := c.connects.Load()
	return ClientStats{
		PacketsSent: c.sent.Load(), BytesSent: c.sentBytes.Load(),
		PacketsReceived: c.recv.Load(), BytesReceived: c.recvBytes.Load(),
		Dropped: c.dropped.Load(), Connects: n, Reconnects: max(n, 1) - 1, LastError: lastErr,
	}
}

// Close ends the connection and the reconnect loop and waits for the
// client's goroutines. It is idempotent. OnPacket is not called after Close
// returns.
func (c *Client) Close() error {
	c.cancel()
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s != nil {
		s.close()
	}
	c.wg.Wait()
	return nil
}
