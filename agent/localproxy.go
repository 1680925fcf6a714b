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
