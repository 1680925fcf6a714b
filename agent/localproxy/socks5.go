package localproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
)

// SOCKS5 protocol constants (RFC 1928).
const (
	socksVersion   = 5
	methodNoAuth   = 0x00
	methodNoneOK   = 0xff
	cmdConnect     = 0x01
	atypIPv4       = 0x01
	atypDomain     = 0x03
	atypIPv6       = 0x04
	repSucceeded   = 0x00
	repFailure     = 0x01
	repNotAllowed  = 0x02
	repHostUnreach = 0x04
	repRefused     = 0x05
	repCmdUnsupp   = 0x07
	repAtypUnsupp  = 0x08
)

// socksRequest is a SOCKS5 request after the method negotiation.
type socksRequest struct {
	Cmd  byte
	Host string // a domain name or an IP address in text
	Port uint16
}

// socksError is a malformed request; rep is the reply to send before
// closing, or 0 when the client does not speak SOCKS5 and gets none.
type socksError struct {
	rep byte
	msg string
}

func (e *socksError) Error() string { return "socks5: " + e.msg }

// readGreeting reads the client's method list (VER NMETHODS METHODS).
func readGreeting(r io.Reader) ([]byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, fmt.Errorf("socks5: read greeting: %w", err)
	}
	if h[0] != socksVersion {
		return nil, &socksError{msg: fmt.Sprintf("version %d is not SOCKS5", h[0])}
	}
	if h[1] == 0 {
		return nil, &socksError{msg: "client offers no authentication method"}
	}
	methods := make([]byte, h[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return nil, fmt.Errorf("socks5: read methods: %w", err)
	}
	return methods, nil
}

// readRequest reads VER CMD RSV ATYP DST.ADDR DST.PORT.
func readRequest(r io.Reader) (socksRequest, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return socksRequest{}, fmt.Errorf("socks5: read request: %w", err)
	}
	if h[0] != socksVersion {
		return socksRequest{}, &socksError{rep: repFailure, msg: fmt.Sprintf("request version %d is not SOCKS5", h[0])}
	}
	req := socksRequest{Cmd: h[1]}
	switch h[3] {
	case atypIPv4:
		var a [4]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return req, fmt.Errorf("socks5: read IPv4 address: %w", err)
		}
		req.Host = netip.AddrFrom4(a).String()
	case atypIPv6:
		var a [16]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return req, fmt.Errorf("socks5: read IPv6 address: %w", err)
		}
		req.Host = netip.AddrFrom16(a).String()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return req, fmt.Errorf("socks5: read name length: %w", err)
		}
		name := make([]byte, n[0])
		if _, err := io.ReadFull(r, name); err != nil {
			return req, fmt.Errorf("socks5: read name: %w", err)
		}
		if !validHost(name) {
			return req, &socksError{rep: repHostUnreach, msg: fmt.Sprintf("invalid host name %q", name)}
		}
		req.Host = string(name)
	default:
		return req, &socksError{rep: repAtypUnsupp, msg: fmt.Sprintf("address type %d is not supported", h[3])}
	}
	var p [2]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		return req, fmt.Errorf("socks5: read port: %w", err)
	}
	req.Port = binary.BigEndian.Uint16(p[:])
	if req.Port == 0 {
		return req, &socksError{rep: repHostUnreach, msg: "port 0"}
	}
	return req, nil
}

// validHost accepts the letters of a DNS name (or an address in text):
// anything else is refused before it reaches a resolver or a log line.
func validHost(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_', c == ':':
		default:
			return false
		}
	}
	return true
}

// reply writes a SOCKS5 reply with the bound address bnd (zero if unset).
func writeReply(w io.Writer, rep byte, bnd net.Addr) error {
	ap := netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	if ta, ok := bnd.(*net.TCPAddr); ok {
		ap = ta.AddrPort()
	}
	ip := ap.Addr().Unmap()
	b := []byte{socksVersion, rep, 0}
	if ip.Is4() {
		b = append(b, atypIPv4)
	} else {
		b = append(b, atypIPv6)
	}
	b = append(b, ip.AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, ap.Port())
	_, err := w.Write(b)
	return err
}

// replyFor maps a dial error to a SOCKS5 reply code.
func replyFor(err error) byte {
	switch {
	case errors.Is(err, ErrNotAllowed):
		return repNotAllowed
	case errors.Is(err, syscall.ECONNREFUSED):
		return repRefused
	default:
		return repHostUnreach
	}
}

func (s *Server) acceptSOCKS(ln net.Listener) {
	defer s.wg.Done()
	bo := backoff.Backoff{Min: 5 * time.Millisecond, Max: time.Second}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("SOCKS5 accept failed", "err", err)
			time.Sleep(bo.Next()) // Close closes ln: ends at the next Accept
			continue
		}
		bo.Reset()
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.serveSOCKS(c)
		}()
	}
}

// serveSOCKS negotiates one SOCKS5 connection and carries it.
func (s *Server) serveSOCKS(c net.Conn) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	fail := func(err error) {
		s.log.Debug("SOCKS5 request failed", "from", c.RemoteAddr(), "err", err)
		c.Close()
	}
	methods, err := readGreeting(c)
	if err != nil {
		fail(err)
		return
	}
	if !containsByte(methods, methodNoAuth) {
		c.Write([]byte{socksVersion, methodNoneOK})
		fail(errors.New("socks5: client does not offer no-authentication"))
		return
	}
	if _, err := c.Write([]byte{socksVersion, methodNoAuth}); err != nil {
		fail(err)
		return
	}
	req, err := readRequest(c)
	if err != nil {
		var se *socksError
		if errors.As(err, &se) && se.rep != 0 {
			writeReply(c, se.rep, nil)
		}
		fail(err)
		return
	}
	if req.Cmd != cmdConnect {
		writeReply(c, repCmdUnsupp, nil)
		fail(fmt.Errorf("socks5: command %d is not supported: only CONNECT", req.Cmd))
		return
	}
	remote, err := s.Dial(ctx, req.Host, req.Port)
	if err != nil {
		writeReply(c, replyFor(err), nil)
		s.log.Info("SOCKS5 connection refused", "to", net.JoinHostPort(req.Host, fmt.Sprint(req.Port)), "err", err)
		c.Close()
		return
	}
	if err := writeReply(c, repSucceeded, remote.LocalAddr()); err != nil {
		remote.Close()
		fail(err)
		return
	}
	c.SetDeadline(time.Time{})
	s.splice(c, remote)
}

func containsByte(b []byte, x byte) bool {
	for _, y := range b {
		if y == x {
			return true
		}
	}
	return false
}
