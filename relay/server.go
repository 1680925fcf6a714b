package relay

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/wire"
)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Logger receives structured logs; nil discards.
	Logger *slog.Logger
	// PrivateKey is the relay's Curve25519 key; nodes prove their keys to
	// its public half (wire.Relay.Key).
	PrivateKey key.Private
	// Verify decides whether a node key that proved itself may use the
	// relay (is a node of the mesh). Return an *AuthError to choose the
	// refusal's status and message; any other error answers 403.
	Verify func(node key.Public) error
	// Allowed reports whether src may send to dst (policy hook); nil allows
	// every pair. It runs once per packet: keep it cheap.
	Allowed func(src, dst key.Public) bool
	// KeepAlive is how often the server sends a keep-alive; default 30s.
	// A client silent for three intervals is dropped.
	KeepAlive time.Duration
	// QueueLen is the per-connection outbound queue in packets, default
	// 256; when it is full, packets to that client are dropped and counted.
	QueueLen int
	// QueueBytes bounds each connection's outbound queue in bytes of
	// buffer memory, default 1 MiB (DefaultQueueBytes): a receiver that
	// reads slowly holds at most this much of the relay's memory.
	QueueBytes int
	// TotalQueueBytes bounds the outbound queues of all connections
	// together, default 64 MiB (DefaultTotalQueueBytes). When a packet
	// would pass it, the oldest packets of the largest queue are dropped
	// first, so that many slow receivers cannot exhaust the relay's
	// memory and the receivers that keep up lose nothing.
	TotalQueueBytes int64
}

// The defaults of ServerConfig.QueueBytes and TotalQueueBytes.
const (
	DefaultQueueBytes      = 1 << 20
	DefaultTotalQueueBytes = 64 << 20
)

// AuthError is an authentication refusal with its HTTP status.
type AuthError struct {
	Status int
	Body   wire.Error
}

func (e *AuthError) Error() string { return fmt.Sprintf("%d %s", e.Status, e.Body.Error()) }

// ServerStats are a Server's counters.
type ServerStats struct {
	Clients  int    // connected now
	Accepted uint64 // connections upgraded since start
	// PacketsRelayed counts packets queued for their receiver; those
	// dropped from a queue later are counted in QueueDropped too.
	PacketsRelayed uint64
	BytesRelayed   uint64 // packet bytes, keys and framing excluded
	Dropped        uint64 // packets dropped: queue full, policy, or destination gone
	PeerGone       uint64 // packets whose destination was not connected
	// QueueDropped counts packets dropped (part of Dropped) because the
	// receiver's queue or the total queue budget was full.
	QueueDropped uint64
	// QueuedBytes is the buffer memory held by outbound queues now, and
	// QueuedBytesPeak its highest value since start; neither passes
	// TotalQueueBytes.
	QueuedBytes, QueuedBytesPeak int64
}

// writeTimeout bounds every write to a client, so that a client which
// stopped reading is dropped instead of holding its writer forever.
const writeTimeout = 10 * time.Second

// Server is the relay endpoint. Each client connection has a reader (the
// handler's goroutine) and a writer goroutine draining a bounded queue, so
// a slow client only loses its own packets.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu      sync.RWMutex // guards the fields below
	closed  bool
	clients map[key.Public]*sconn

	wg sync.WaitGroup // handlers and writers

	// queued is the memory of all outbound queues, never above
	// cfg.TotalQueueBytes: a frame reserves its size here before it is
	// queued (see enqueue).
	queued, queuedPeak atomic.Int64
	evictMu            sync.Mutex // one eviction at a time

	accepted, packets, bytes, dropped, gone, queueDropped atomic.Uint64
}

// sconn is one client connection on the server.
type sconn struct {
	key  key.Public
	conn net.Conn
	out  *frameQueue
	done chan struct{} // closed by close
	once sync.Once
}

func (c *sconn) close() {
	c.once.Do(func() {
		close(c.done)
		c.conn.Close()
		c.out.close()
	})
}

// enqueue queues f for c without blocking and reports whether it was
// queued; a frame that is not is recycled and counted as a queue drop.
// The frame must fit c's own budget, then the total budget, which may
// drop older frames of the largest queue to make room.
func (s *Server) enqueue(c *sconn, f *frame) bool {
	n := f.size()
	if !c.out.reserve(n) {
		putFrame(f)
		s.queueDrop(1)
		return false
	}
	if !s.reserve(n) {
		c.out.unreserve(n)
		putFrame(f)
		s.queueDrop(1)
		return false
	}
	return c.out.commit(f) // on a closed queue, commit releases the bytes
}

func (s *Server) queueDrop(n int) {
	s.dropped.Add(uint64(n))
	s.queueDropped.Add(uint64(n))
}

// reserve takes n bytes of the total queue budget, dropping the oldest
// frames of the largest queues while it is full, and reports false when no
// waiting frame is left to drop.
func (s *Server) reserve(n int) bool {
	limit := s.cfg.TotalQueueBytes
	for {
		cur := s.queued.Load()
		if cur+int64(n) <= limit {
			if !s.queued.CompareAndSwap(cur, cur+int64(n)) {
				continue
			}
			for peak := s.queuedPeak.Load(); cur+int64(n) > peak && !s.queuedPeak.CompareAndSwap(peak, cur+int64(n)); peak = s.queuedPeak.Load() {
			}
			return true
		}
		if !s.evict(int(cur + int64(n) - limit)) {
			return false
		}
	}
}

// evict drops at least need bytes of waiting frames, oldest first, from
// the largest queue, and reports whether it dropped any. Scanning every
// client is linear, but it only happens when the budget is exhausted.
func (s *Server) evict(need int) bool {
	s.evictMu.Lock()
	defer s.evictMu.Unlock()
	var victim *sconn
	most := 0
	s.mu.RLock()
	for _, c := range s.clients {
		if w := c.out.waiting(); w > most {
			victim, most = c, w
		}
	}
	s.mu.RUnlock()
	if victim == nil {
		return false
	}
	frames, _ := victim.out.dropOldest(need)
	s.queueDrop(frames)
	return frames > 0
}

// NewServer returns a relay server; mount it as an http.Handler.
func NewServer(cfg ServerConfig) *Server {
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 30 * time.Second
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = 256
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = DefaultQueueBytes
	}
	if cfg.TotalQueueBytes <= 0 {
		cfg.TotalQueueBytes = DefaultTotalQueueBytes
	}
	// Every connection can queue at least one largest frame.
	cfg.QueueBytes = max(cfg.QueueBytes, frameClasses[len(frameClasses)-1])
	cfg.TotalQueueBytes = max(cfg.TotalQueueBytes, int64(cfg.QueueBytes))
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: log.With("subsystem", "relay"), clients: map[key.Public]*sconn{}}
}

func refuse(w http.ResponseWriter, status int, code, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(wire.Error{Code: code, Message: fmt.Sprintf(format, args...)})
}

// headerHasToken reports whether a comma-separated header holds token.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// ServeHTTP authenticates the upgrade request, switches protocols and
// relays until the connection ends, the key connects again elsewhere, or
// the server closes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		refuse(w, http.StatusMethodNotAllowed, wire.ErrCodeBadRequest, "%s takes GET with Upgrade: %s", r.URL.Path, Protocol)
		return
	}
	if r.ProtoMajor != 1 {
		refuse(w, http.StatusHTTPVersionNotSupported, wire.ErrCodeBadRequest, "the relay needs HTTP/1.1 (offer only http/1.1 in TLS ALPN)")
		return
	}
	if !headerHasToken(r.Header, "Connection", "upgrade") || !headerHasToken(r.Header, "Upgrade", Protocol) {
		w.Header().Set("Upgrade", Protocol)
		w.Header().Set("Connection", "Upgrade")
		refuse(w, http.StatusUpgradeRequired, wire.ErrCodeVersion, "the relay needs Connection: Upgrade and Upgrade: %s", Protocol)
		return
	}
	key, err := s.authenticate(r)
	if err != nil {
		var ae *AuthError
		if errors.As(err, &ae) {
			refuse(w, ae.Status, ae.Body.Code, "%s", ae.Body.Message)
		} else {
			refuse(w, http.StatusForbidden, wire.ErrCodeUnauthorized, "this node may not use the relay: %v", err)
		}
		s.log.Info("relay upgrade refused", "remote", r.RemoteAddr, "err", err)
		return
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		refuse(w, http.StatusServiceUnavailable, wire.ErrCodeInternal, "the relay is shutting down; retry shortly")
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		refuse(w, http.StatusInternalServerError, wire.ErrCodeInternal, "relay: cannot take over the connection: %v", err)
		return
	}
	// The HTTP server's read-header deadline would otherwise still apply.
	conn.SetDeadline(time.Time{})
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + Protocol + "\r\nConnection: Upgrade\r\n\r\n")
	if err := brw.Flush(); err != nil {
		conn.Close()
		return
	}

	c := &sconn{key: key, conn: conn, done: make(chan struct{}),
		out: newFrameQueue(s.cfg.QueueLen, s.cfg.QueueBytes, func(n int) { s.queued.Add(-int64(n)) })}
	info, _ := json.Marshal(ServerInfo{Version: 1, KeepAliveMS: s.cfg.KeepAlive.Milliseconds()})
	f := getFrame(frameHeaderLen + len(info))
	f.b = appendFrame(f.b, FrameServerInfo, nil, info)
	if !s.enqueue(c, f) { // the first frame; refused only when the budget is spent on frames being written
		conn.Close()
		return
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.close()
		return
	}
	old := s.clients[key]
	s.clients[key] = c
	s.wg.Add(1)
	s.mu.Unlock()
	s.accepted.Add(1)
	log := s.log.With("key", key.String(), "remote", r.RemoteAddr)
	if old != nil {
		old.close()
		log.Info("relay connection replaced by a newer one for the same key")
	} else {
		log.Info("relay client connected")
	}

	go func() {
		defer s.wg.Done()
		s.writeLoop(c, log)
	}()
	err = s.readLoop(c, brw.Reader)
	c.close()
	s.mu.Lock()
	if s.clients[key] == c {
		delete(s.clients, key)
	}
	s.mu.Unlock()
	switch {
	case errors.Is(err, errMalformed):
		log.Warn("relay client closed: protocol error", "err", err)
	case isClosed(err), s.isClosed():
		log.Info("relay client disconnected")
	default:
		log.Info("relay client disconnected", "err", err)
	}
}

// authenticate checks the node's key proof for this TLS session and asks
// Verify whether the key belongs to the mesh.
func (s *Server) authenticate(r *http.Request) (key.Public, error) {
	node, err := key.ParsePublic(r.Header.Get(HeaderNodeKey))
	if err != nil {
		return node, &AuthError{Status: http.StatusUnauthorized, Body: wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: "missing or malformed " + HeaderNodeKey + " header; this client is too old for this relay, upgrade meshlink"}}
	}
	secret, err := sessionSecret(r.TLS)
	if err != nil {
		return node, &AuthError{Status: http.StatusInternalServerError, Body: wire.Error{Code: wire.ErrCodeInternal,
			Message: "the relay must terminate TLS itself (it cannot sit behind a TLS-terminating proxy)"}}
	}
	if err := checkProof(r.Header.Get(HeaderProof), secret, node, s.cfg.PrivateKey); err != nil {
		return node, &AuthError{Status: http.StatusUnauthorized, Body: wire.Error{Code: wire.ErrCodeUnauthorized,
			Message: "the node key proof does not verify; the relay's key may have changed: wait for the next network map"}}
	}
	if s.cfg.Verify == nil {
		return node, errors.New("relay has no key verifier")
	}
	return node, s.cfg.Verify(node)
}

func (s *Server) isClosed() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.closed
}

func isClosed(err error) bool {
	return err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF)
}

// readLoop handles the client's frames until an error.
func (s *Server) readLoop(c *sconn, br *bufio.Reader) error {
	buf := make([]byte, MaxPayload)
	idle := 3*s.cfg.KeepAlive + 5*time.Second
	for {
		c.conn.SetReadDeadline(time.Now().Add(idle))
		typ, p, err := readFrame(br, buf)
		if err != nil {
			return err
		}
		if typ != FrameSendPacket {
			continue // keep-alives, and frames a newer client may send
		}
		dst := key.PublicFromRaw([KeyLen]byte(p))
		pkt := p[KeyLen:]
		s.mu.RLock()
		to := s.clients[dst]
		s.mu.RUnlock()
		if to == nil {
			s.dropped.Add(1)
			s.gone.Add(1)
			f := getFrame(frameHeaderLen + KeyLen)
			f.b = appendFrame(f.b, FramePeerGone, &dst, nil)
			s.enqueue(c, f)
			continue
		}
		if s.cfg.Allowed != nil && !s.cfg.Allowed(c.key, dst) {
			s.dropped.Add(1)
			continue
		}
		// The source is the authenticated key, never one from the frame.
		if !s.enqueue(to, newPacketFrame(FrameRecvPacket, c.key, pkt)) {
			continue
		}
		s.packets.Add(1)
		s.bytes.Add(uint64(len(pkt)))
	}
}

// writeLoop drains c's queue, batching queued frames into one write, and
// sends keep-alives while the queue is idle.
func (s *Server) writeLoop(c *sconn, log *slog.Logger) {
	defer c.close()
	if err := c.out.writeTo(c.conn, c.done, s.cfg.KeepAlive); err != nil {
		select {
		case <-c.done:
		default:
			log.Info("relay client write failed; closing", "err", err)
		}
	}
}

// Stats returns the server's counters.
func (s *Server) Stats() ServerStats {
	s.mu.RLock()
	n := len(s.clients)
	s.mu.RUnlock()
	return ServerStats{
		Clients: n, Accepted: s.accepted.Load(), PacketsRelayed: s.packets.Load(), BytesRelayed: s.bytes.Load(),
		Dropped: s.dropped.Load(), PeerGone: s.gone.Load(), QueueDropped: s.queueDropped.Load(),
		QueuedBytes: s.queued.Load(), QueuedBytesPeak: s.queuedPeak.Load(),
	}
}

// Disconnect closes the connection of k, if any: call it when a node is
// removed or its key changes.
func (s *Server) Disconnect(k key.Public) {
	s.mu.RLock()
	c := s.clients[k]
	s.mu.RUnlock()
	if c != nil {
		c.close()
	}
}

// Connected lists the keys connected now.
func (s *Server) Connected() []key.Public {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]key.Public, 0, len(s.clients))
	for k := range s.clients {
		keys = append(keys, k)
	}
	return keys
}

// Close closes every relay connection and waits for their goroutines.
// Later upgrade requests are refused with 503. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	clients := s.clients
	s.clients = map[key.Public]*sconn{}
	s.mu.Unlock()
	for _, c := range clients {
		c.close()
	}
	s.wg.Wait()
	return nil
}
