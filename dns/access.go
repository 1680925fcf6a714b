package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Defaults for the per-source response rate limit (Config.RateLimit,
// Config.RateBurst) and the most sources it tracks at once.
const (
	DefaultRateLimit = 100 // responses per second per source
	DefaultRateBurst = 200
	maxRateSources   = 4096
)

// ErrOpenResolver is what New's error wraps when the listen address is not
// loopback and Config.Allow is empty.
var ErrOpenResolver = errors.New("dns: would be an open resolver")

// CheckListen refuses a listen address that strangers could reach unless
// allow says who may query: a resolver answering anyone is an open
// resolver, used to amplify floods at spoofed victims. New applies it; a
// program may call it earlier to fail before doing anything else.
func CheckListen(addr string, allow []netip.Prefix) error {
	if len(allow) > 0 {
		return nil
	}
	if addr == "" {
		return nil // the default, 127.0.0.1:53
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("dns: listen address %q: %w; give host:port with --dns", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Unmap().IsLoopback() {
		return nil
	}
	return &openResolverError{addr}
}

type openResolverError struct{ addr string }

func (e *openResolverError) Is(target error) bool { return target == ErrOpenResolver }
func (e *openResolverError) Error() string {
	return fmt.Sprintf("dns: listen address %s is not a loopback address, so anyone who can reach it could use this server as an open resolver; "+
		"give the networks allowed to query with --dns-allow CIDR[,CIDR...] (e.g. --dns-allow 10.0.0.0/8), or listen on 127.0.0.1", e.addr)
}

// allowed reports whether src may query: loopback always, others only
// inside one of the allowed prefixes.
func (s *Server) allowed(src netip.Addr) bool {
	src = src.Unmap()
	if src.IsLoopback() {
		return true
	}
	for _, p := range s.cfg.Allow {
		if p.Contains(src) {
			return true
		}
	}
	return false
}

// addrOf returns the IP of a net.Addr from miekg/dns (UDP or TCP).
func addrOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap()
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// limiter is a token bucket per source, in a table of bounded size. IPv6
// sources share a bucket per /64, the least a host is usually given.
type limiter struct {
	rate, burst float64
	now         func() time.Time

	mu      sync.Mutex // guards the fields below
	buckets map[netip.Addr]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate, burst int, now func() time.Time) *limiter {
	return &limiter{rate: float64(rate), burst: float64(burst), now: now, buckets: map[netip.Addr]*bucket{}}
}

// allow takes a token from src's bucket and reports whether there was one.
func (l *limiter) allow(src netip.Addr) bool {
	if src.Is6() {
		p, _ := src.Prefix(64)
		src = p.Addr()
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[src]
	if b == nil {
		if len(l.buckets) >= maxRateSources && !l.sweepLocked(now) {
			// Every tracked source is busy: refuse newcomers rather than
			// forget a flooder's empty bucket.
			return false
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[src] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// sweepLocked forgets the sources whose buckets have refilled (they would
// start full anyway) and reports whether that made room.
func (l *limiter) sweepLocked(now time.Time) bool {
	for a, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.buckets, a)
		}
	}
	return len(l.buckets) < maxRateSources
}
