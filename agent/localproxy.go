package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/meshlink/meshlink/agent/localproxy"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/wire"
)

func (a *Agent) startLocalProxy() error {
	off := func(s string) string {
		if s == "off" {
			return ""
		}
		return s
	}
	socks, httpAddr := off(a.cfg.SOCKS5), off(a.cfg.HTTPProxy)
	if socks == "" && httpAddr == "" {
		return nil
	}
	s, err := localproxy.New(localproxy.Config{SOCKS5: socks, HTTP: httpAddr, Mesh: agentMesh{a}, MeshOnly: a.cfg.ProxyMeshOnly,
		Logger: a.cfg.Logger, HandshakeTimeout: 3*a.dialTimeout() + localproxy.DefaultHandshakeTimeout})
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	a.local = s
	return nil
}

func (a *Agent) dialTimeout() time.Duration {
	if a.cfg.DialTimeout > 0 {
		return a.cfg.DialTimeout
	}
	return 3 * time.Second
}

// SOCKS5Addr is the local SOCKS5 proxy's address, "" when it is off.
func (a *Agent) SOCKS5Addr() string { return addrString(a.local.SOCKS5Addr()) }

// HTTPProxyAddr is the local HTTP proxy's address, "" when it is off.
func (a *Agent) HTTPProxyAddr() string { return addrString(a.local.HTTPAddr()) }

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// agentMesh is the agent as the local proxies' way into the mesh.
type agentMesh struct{ a *Agent }

func (m agentMesh) Domain() string {
	m.a.mu.Lock()
	defer m.a.mu.Unlock()
	return m.a.domain()
}

// DialService goes through the consumer: the same provider choice and
// failover as the service's local listener.
func (m agentMesh) DialService(ctx context.Context, name string) (net.Conn, error) {
	c, err := m.a.consumer.DialService(ctx, name)
	if errors.Is(err, proxy.ErrUnknownService) {
		return nil, fmt.Errorf("%w: service %q", localproxy.ErrUnknownName, name)
	}
	return c, err
}

// DialNode dials port at a peer's mesh address through the netstack; the
// peer's provider decides what it accepts. This node's own name is dialed
// on loopback.
func (m agentMesh) DialNode(ctx context.Context, name string, port uint16) (net.Conn, error) {
	m.a.mu.Lock()
	self := m.a.nm.Self.Name == name
	var ip netip.Addr
	for i := range m.a.nm.Peers {
		if p := &m.a.nm.Peers[i]; p.Name == name && !p.Key.IsZero() {
			ip = nodeAddr4(p)
		}
	}
	m.a.mu.Unlock()
	if self {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port).String())
	}
	if !ip.IsValid() {
		return nil, fmt.Errorf("%w: node %q", localproxy.ErrUnknownName, name)
	}
	return m.a.stack.DialTCP(ctx, netip.AddrPortFrom(ip, port))
}

// DialAddr dials a mesh address: a peer's mesh IP through the netstack
// (the peer's provider decides what it accepts), this node's own on
// loopback, a service VIP through the consumer like its name. Other
// addresses in the mesh's prefixes are unknown names; the rest is not the
// mesh's.
func (m agentMesh) DialAddr(ctx context.Context, addr netip.AddrPort) (net.Conn, bool, error) {
	ip := addr.Addr()
	m.a.mu.Lock()
	var self, peer bool
	var service string
	for _, p := range m.a.nm.Self.Addresses {
		self = self || p.Addr() == ip
	}
	for i := range m.a.nm.Peers {
		if p := &m.a.nm.Peers[i]; !p.Key.IsZero() {
			for _, pfx := range p.Addresses {
				peer = peer || pfx.Addr() == ip
			}
		}
	}
	for _, sv := range m.a.nm.Services {
		if sv.VIP == ip {
			service = sv.Name
		}
	}
	m.a.mu.Unlock()
	switch {
	case self:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), addr.Port()).String())
		return c, true, err
	case peer:
		c, err := m.a.stack.DialTCP(ctx, addr)
		return c, true, err
	case service != "":
		c, err := m.DialService(ctx, service)
		return c, true, err
	case wire.NodePrefix4.Contains(ip) || wire.NodePrefix6.Contains(ip) || wire.ServicePrefix.Contains(ip):
		return nil, true, fmt.Errorf("%w: %s is no node or service this site may reach", localproxy.ErrUnknownName, ip)
	}
	return nil, false, nil
}
