package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
)

// ednsSize is the UDP payload size we advertise and the most we send over
// UDP (DNS flag day 2020: avoids IP fragmentation).
const ednsSize = 1232

// ServeDNS answers one query. It never panics on a parsed message and always
// writes a reply (a second, bare SERVFAIL only if the first cannot be sent).
//
// Sources outside Config.Allow, and non-loopback sources over their rate
// limit, get no answer over UDP (REFUSED over TCP, whose handshake proves
// the source).
func (s *Server) ServeDNS(w mdns.ResponseWriter, r *mdns.Msg) {
	_, overUDP := w.RemoteAddr().(*net.UDPAddr)
	if src := addrOf(w.RemoteAddr()); !src.IsLoopback() {
		ok := s.allowed(src)
		if ok && overUDP {
			ok = s.limit.allow(src)
		}
		if !ok {
			if !overUDP {
				w.WriteMsg(new(mdns.Msg).SetRcode(r, mdns.RcodeRefused))
			}
			return
		}
	}
	resp, via := s.answer(r, s.zone.Load())
	s.finish(resp, r, overUDP)
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("write reply failed", "err", err)
		// The reply could not be packed or sent; try a bare SERVFAIL so the
		// client is not left waiting.
		fail := new(mdns.Msg).SetRcode(r, mdns.RcodeServerFailure)
		if err := w.WriteMsg(fail); err != nil {
			s.log.Debug("write SERVFAIL failed", "err", err)
		}
	}
	if s.log.Enabled(context.Background(), slog.LevelDebug) { // avoid building attrs otherwise
		var qname, qtype string
		if len(r.Question) > 0 {
			qname, qtype = r.Question[0].Name, mdns.Type(r.Question[0].Qtype).String()
		}
		s.log.Debug("query", "name", qname, "type", qtype, "rcode", mdns.RcodeToString[resp.Rcode], "answers", len(resp.Answer), "via", via)
	}
}

// answer builds the reply to r from zone z (before size limits and EDNS are
// applied) and says where it came from, for the log.
func (s *Server) answer(r *mdns.Msg, z *zoneIndex) (*mdns.Msg, string) {
	resp, via, done := s.answerHere(r, z)
	if done {
		return resp, via
	}
	if up, via := s.forward(r); up != nil {
		return up, via
	}
	resp.Rcode = mdns.RcodeServerFailure
	return resp, "none"
}

// answerHere is answer without forwarding: done is false when r is for an
// upstream, and resp is then the reply set up for it.
func (s *Server) answerHere(r *mdns.Msg, z *zoneIndex) (resp *mdns.Msg, via string, done bool) {
	resp = new(mdns.Msg)
	switch {
	case r.Response:
		return resp.SetRcode(r, mdns.RcodeFormatError), "reject", true
	case r.Opcode != mdns.OpcodeQuery:
		resp.SetRcode(r, mdns.RcodeNotImplemented)
		resp.Question = nil
		return resp, "reject", true
	case len(r.Question) != 1:
		resp.SetRcode(r, mdns.RcodeFormatError)
		resp.Question = nil
		return resp, "reject", true
	}
	nopt := 0
	for _, rr := range r.Extra {
		if rr.Header().Rrtype == mdns.TypeOPT {
			nopt++
		}
	}
	if nopt > 1 { // RFC 6891 §6.1.1
		return resp.SetRcode(r, mdns.RcodeFormatError), "reject", true
	}
	if opt := r.IsEdns0(); opt != nil && opt.Version() != 0 {
		return resp.SetRcode(r, mdns.RcodeBadVers), "reject", true
	}

	resp.SetReply(r)
	resp.RecursionAvailable = len(*s.ups.Load()) > 0
	q := r.Question[0]
	if mdns.IsSubDomain(s.domain, mdns.CanonicalName(q.Name)) {
		resp.Compress = true
		s.answerLocal(resp, q, z)
		return resp, "mesh", true
	}
	if s.localReverse(resp, q, z) {
		return resp, "mesh-reverse", true
	}
	return resp, "", false
}

// finish makes resp fit what the client can take: an OPT record if and only
// if the client sent one, and a size its transport accepts (truncated with
// TC set otherwise, so it retries over TCP).
func (s *Server) finish(resp, req *mdns.Msg, overUDP bool) {
	resp.Id = req.Id
	// Drop records we cannot or must not relay: the upstream's OPT (its
	// cookies and sizes are for us, not the client) and any TSIG.
	var upOpt *mdns.OPT
	extra := resp.Extra[:0]
	for _, rr := range resp.Extra {
		switch o := rr.(type) {
		case *mdns.OPT:
			upOpt = o
		case *mdns.TSIG:
		default:
			extra = append(extra, rr)
		}
	}
	resp.Extra = extra

	size := mdns.MaxMsgSize
	reqOpt := req.IsEdns0()
	if reqOpt != nil {
		opt := &mdns.OPT{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeOPT}}
		opt.SetUDPSize(ednsSize)
		if upOpt != nil {
			if upOpt.Do() && reqOpt.Do() {
				opt.SetDo()
			}
			for _, o := range upOpt.Option {
				if o.Option() == mdns.EDNS0EDE { // extended errors explain a SERVFAIL
					opt.Option = append(opt.Option, o)
				}
			}
		}
		resp.Extra = append(resp.Extra, opt)
	} else if resp.Rcode > 0xF {
		resp.Rcode = mdns.RcodeServerFailure // extended rcodes need an OPT
	}
	if overUDP {
		size = mdns.MinMsgSize
		if reqOpt != nil {
			size = min(max(int(reqOpt.UDPSize()), mdns.MinMsgSize), ednsSize)
		}
	}
	resp.Truncate(size)
}

// forward sends r to each upstream in turn and returns the first usable
// reply, or nil if none answered.
func (s *Server) forward(r *mdns.Msg) (*mdns.Msg, string) {
	ups := *s.ups.Load()
	if len(ups) == 0 {
		return nil, "none"
	}
	q := r.Copy()
	q.Id = mdns.Id()
	q.Response, q.Authoritative, q.Truncated, q.RecursionAvailable = false, false, false, false
	q.Answer, q.Ns = nil, nil
	// Ask upstream with our own EDNS: the client's cookie is not for the
	// upstream, and a larger buffer spares a TCP retry; finish() tailors the
	// reply to what the client asked for.
	extra := q.Extra[:0]
	for _, rr := range q.Extra {
		switch rr.(type) {
		case *mdns.OPT, *mdns.TSIG:
		default:
			extra = append(extra, rr)
		}
	}
	q.Extra = extra
	do := false
	if o := r.IsEdns0(); o != nil {
		do = o.Do()
	}
	q.SetEdns0(ednsSize, do)

	var fallback *mdns.Msg
	var fallbackVia string
	for _, up := range ups {
		reply, err := s.exchange(q, up)
		if err != nil {
			s.log.Debug("upstream failed", "upstream", up, "name", r.Question[0].Name, "err", err)
			if s.ctx.Err() != nil {
				break
			}
			continue
		}
		if reply.Rcode == mdns.RcodeServerFailure || reply.Rcode == mdns.RcodeRefused {
			// Another upstream may do better; keep this one in case none does.
			if fallback == nil {
				fallback, fallbackVia = reply, up
			}
			continue
		}
		return reply, up
	}
	return fallback, fallbackVia
}

// exchange asks one upstream over UDP, retrying over TCP if the reply is
// truncated, all within s.timeout.
func (s *Server) exchange(q *mdns.Msg, upstream string) (*mdns.Msg, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.timeout)
	defer cancel()
	reply, err := exchangeOver(ctx, "udp", q, upstream)
	var nerr net.Error
	timedOut := errors.As(err, &nerr) && nerr.Timeout()
	// TCP when the reply is truncated, and also when it was unreadable (an
	// upstream that ignores our buffer size sends oversized datagrams).
	if err == nil && reply.Truncated || err != nil && !timedOut && ctx.Err() == nil {
		reply, err = exchangeOver(ctx, "tcp", q, upstream)
	}
	if err != nil {
		return nil, err
	}
	if len(reply.Question) != 1 || !strings.EqualFold(reply.Question[0].Name, q.Question[0].Name) ||
		reply.Question[0].Qtype != q.Question[0].Qtype {
		return nil, errors.New("reply does not match the question")
	}
	return reply, nil
}

// exchangeOver is mdns.Client.ExchangeContext, except that cancelling ctx
// (Close) ends the wait at once: miekg only honours the context's deadline.
func exchangeOver(ctx context.Context, network string, q *mdns.Msg, upstream string) (*mdns.Msg, error) {
	c := &mdns.Client{Net: network}
	if d, ok := ctx.Deadline(); ok {
		c.Timeout = time.Until(d) // miekg's own default (2s) would cut longer ones short
	}
	conn, err := c.DialContext(ctx, upstream)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// Closing (not a deadline, which the exchange would overwrite) makes a
	// blocked read return whenever the cancel lands.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	reply, _, err := c.ExchangeWithConnContext(ctx, q, conn)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return reply, err
}

// normalizeUpstreams checks "host:port" entries, adding port 53 where none is
// given.
func normalizeUpstreams(in []string) ([]string, error) {
	out := make([]string, 0, len(in))
	for _, u := range in {
		u = strings.TrimSpace(u)
		if a, err := netip.ParseAddr(u); err == nil {
			out = append(out, netip.AddrPortFrom(a, 53).String())
			continue
		}
		host, port, err := net.SplitHostPort(u)
		if err != nil {
			if !strings.Contains(u, ":") && u != "" {
				out = append(out, net.JoinHostPort(u, "53"))
				continue
			}
			return nil, fmt.Errorf("dns: upstream %q: want host:port", u)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 || host == "" {
			return nil, fmt.Errorf("dns: upstream %q: want host:port", u)
		}
		out = append(out, u)
	}
	return out, nil
}

// upstreamsFromResolvConf reads the nameservers of a resolv.conf file,
// leaving out self: forwarding to ourselves would loop.
func upstreamsFromResolvConf(path string, self netip.AddrPort) ([]string, error) {
	cc, err := mdns.ClientConfigFromFile(path)
	if err != nil {
		return []string{}, fmt.Errorf("dns: read %s: %w", path, err)
	}
	port, err := strconv.ParseUint(cc.Port, 10, 16)
	if err != nil || port == 0 {
		port = 53
	}
	out := []string{}
	for _, ns := range cc.Servers {
		a, err := netip.ParseAddr(ns)
		if err != nil {
			continue // resolv.conf holds addresses only
		}
		ap := netip.AddrPortFrom(a.Unmap(), uint16(port))
		if isSelf(ap, self) {
			continue
		}
		out = append(out, ap.String())
	}
	return out, nil
}

// isSelf reports whether a resolver at ap would be this server listening on
// self. A wildcard listener also answers on loopback.
func isSelf(ap, self netip.AddrPort) bool {
	if ap.Port() != self.Port() {
		return false
	}
	a, s := ap.Addr().Unmap().WithZone(""), self.Addr().Unmap().WithZone("")
	if a == s || (s.IsUnspecified() && (a.IsLoopback() || a.IsUnspecified())) {
		return true
	}
	// A wildcard listener also answers on every address of the host.
	return s.IsUnspecified() && isLocalAddr(a)
}

// isLocalAddr reports whether a is assigned to one of this host's
// interfaces.
func isLocalAddr(a netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, ia := range addrs {
		if p, err := netip.ParsePrefix(ia.String()); err == nil && p.Addr().Unmap().WithZone("") == a {
			return true
		}
	}
	return false
}
