package stun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
)

// Server answers Binding Requests on a UDP socket with the address each
// request came from. Anything else is ignored.
type Server struct {
	conn *net.UDPConn
	log  *slog.Logger
	addr netip.AddrPort
	wg   sync.WaitGroup
	once sync.Once
}

// Listen binds addr ("host:port") and starts answering. A nil log discards.
func Listen(addr string, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("stun: listen %s: %w", addr, err)
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("stun: listen %s: %w", addr, err)
	}
	la := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	s := &Server{conn: conn, log: log.With("subsystem", "stun"), addr: netip.AddrPortFrom(la.Addr().Unmap(), la.Port())}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.serve()
	}()
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() netip.AddrPort { return s.addr }

func (s *Server) serve() {
	buf := make([]byte, 1500)
	for {
		n, src, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// ICMP-induced errors and the like: keep serving.
			s.log.Debug("stun read", "err", err)
			continue
		}
		txid, err := ParseRequest(buf[:n])
		if err != nil {
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if _, err := s.conn.WriteToUDPAddrPort(Response(txid, src), src); err != nil {
			s.log.Debug("stun reply", "to", src.String(), "err", err)
		}
	}
}

// Close stops the server and waits for it. It is idempotent.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() { err = s.conn.Close() })
	s.wg.Wait()
	return err
}
