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
}

// AuthError is an authentication refusal with its HTTP status.
type AuthError struct {
	Status int
	Body   wire.Error
}

func (e *AuthError) Error() string { return fmt.Sprintf("%d %s", e.Status, e.Body.Error()) }

// ServerStats are a Server's counters.
type ServerStats struct {
	Clients        int    // connected now
	Accepted       uint64 // connections upgraded since start
	PacketsRelayed uint64
	BytesRelayed   uint64 // packet bytes, keys and framing excluded
	Dropped        uint64 // packets dropped: queue full, policy, or destination gone
	PeerGone       uint64 // packets whose destination was not connected
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

	accepted, packets, bytes, dropped, gone atomic.Uint64
}

// sconn is one client connection on the server.
type sconn struct {
	key  key.Public
	conn net.Conn
	out  chan []byte   // whole frames
	done chan struct{} // closed by close
	once sync.Once
}

func (c *sconn) close() {
	c.once.Do(func() {
		close(c.done)
		c.conn.Close()
	})
}

// enqueue queues a frame without blocking and reports whether it fit.
func (c *sconn) enqueue(f []byte) bool {
	select {
	case <-c.done:
		return false
	default:
	}
	select {
	case c.out <- f:
		return true
	default:
		return false
	}
}

// NewServer returns a relay server; mount it as an http.Handler.
func NewServer(cfg ServerConfig) *Server {
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 30 * time.Second
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = 256
	}
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

	c := &sconn{key: key, conn: conn, out: make(chan []byte, s.cfg.QueueLen), done: make(chan struct{})}
	info, _ := json.Marshal(ServerInfo{Version: 1, KeepAliveMS: s.cfg.KeepAlive.Milliseconds()})
	c.out <- appendFrame(nil, FrameServerInfo, nil, info) // first frame; the queue is empty

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
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
			c.enqueue(appendFrame(make([]byte, 0, frameHeaderLen+KeyLen), FramePeerGone, &dst, nil))
			continue
		}
		if s.cfg.Allowed != nil && !s.cfg.Allowed(c.key, dst) {
			s.dropped.Add(1)
			continue
		}
		// The source is the authenticated key, never one from the frame.
		if !to.enqueue(packetFrame(FrameRecvPacket, c.key, pkt)) {
			s.dropped.Add(1)
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
	if err := writeFrames(c.conn, c.out, c.done, s.cfg.KeepAlive); err != nil {
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
		Dropped: s.dropped.Load(), PeerGone: s.gone.Load(),
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
