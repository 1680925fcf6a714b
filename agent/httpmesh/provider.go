package httpmesh

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"sync"
	"time"

	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/wire"
)

// ProviderConfig configures a Provider.
type ProviderConfig struct {
	Logger  *slog.Logger
	Metrics *Metrics
	// Node is this node's name, the provider label of its metrics.
	Node func() string
	// Peer says which node a mesh source address is (from the map).
	Peer func(src netip.Addr) (wire.NodeID, string)
	// DialTimeout bounds a dial of a target; default 5 s.
	DialTimeout time.Duration
	// Middleware wraps the per-request handler (see the package doc).
	Middleware func(http.Handler) http.Handler
	Observer   Observer
}

// Provider serves the mesh connections of HTTP exports
// (proxy.HTTPExporter) and forwards their requests to the targets over
// pooled connections.
type Provider struct {
	cfg   ProviderConfig
	log   *slog.Logger
	srv   *server
	tr    transports
	proxy *httputil.ReverseProxy

	mu   sync.Mutex // guards auth
	auth map[string]Authorizer
}

type exportKey struct{}

// NewProvider returns a Provider.
func NewProvider(cfg ProviderConfig) *Provider {
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.Node == nil {
		cfg.Node = func() string { return "" }
	}
	p := &Provider{cfg: cfg, log: discardLogger(cfg.Logger).With("subsystem", "http"), auth: map[string]Authorizer{}}
	d := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}
	p.tr = newTransports(func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetNoDelay(true)
			}
		}
		return c, err
	})
	p.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			e, _ := pr.In.Context().Value(exportKey{}).(*proxy.Export)
			pr.Out.URL.Scheme = "http"
			if e != nil {
				pr.Out.URL.Host = e.Target
			}
			pr.Out.Host = pr.In.Host
		},
		Transport: roundTripperFunc(func(r *http.Request) (*http.Response, error) { return p.tr.of(r).RoundTrip(r) }),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil && !errors.Is(r.Context().Err(), context.DeadlineExceeded) {
				return // the consumer went away
			}
			code, msg := http.StatusBadGateway, "meshlink: the service's target did not answer"
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded) {
				code, msg = http.StatusGatewayTimeout, "meshlink: the service's target did not answer in time"
			}
			p.log.Debug("target failed", "service", serviceName(r), "err", err, "answered", code)
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(code)
			io.WriteString(w, msg+"\n")
		},
		BufferPool: newBufferPool(),
		ErrorLog:   slogErrorLog(p.log),
	}
	var h http.Handler = http.HandlerFunc(p.serveHTTP)
	if cfg.Middleware != nil {
		h = cfg.Middleware(h)
	}
	p.srv = newServer(h, p.log, "provider")
	return p
}

// SetAuthorizer sets the authorizer of service's requests; nil removes it.
func (p *Provider) SetAuthorizer(service string, a Authorizer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a == nil {
		delete(p.auth, service)
	} else {
		p.auth[service] = a
	}
}

func (p *Provider) authorizer(service string) Authorizer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.auth[service]
}

// Close stops serving and closes the pooled connections.
func (p *Provider) Close() {
	p.srv.close()
	p.tr.close()
}

// ServeConn implements proxy.HTTPExporter.
func (p *Provider) ServeConn(e proxy.Export, src netip.Addr, conn net.Conn) {
	info := &RequestInfo{Service: e.Name, Role: RoleProvider, Client: src.Unmap(), export: &e}
	if p.cfg.Peer != nil {
		info.From, info.FromName = p.cfg.Peer(src)
	}
	p.srv.serveConn(conn, info)
}

func (p *Provider) serveHTTP(w http.ResponseWriter, r *http.Request) {
	info, _ := r.Context().Value(infoKey).(*RequestInfo)
	if info == nil {
		http.Error(w, "meshlink: no service", http.StatusInternalServerError)
		return
	}
	start := time.Now()
	defer p.cfg.Metrics.begin(RoleProvider, info.Service)()
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		d := time.Since(start)
		p.cfg.Metrics.done(RoleProvider, info.Service, p.cfg.Node(), sw.code, r.Method, d)
		if p.cfg.Observer != nil {
			p.cfg.Observer.Done(r, DoneInfo{RequestInfo: *info, Code: sw.code, Provider: p.cfg.Node(), Attempts: 1, Duration: d})
		}
	}()
	if a := p.authorizer(info.Service); a != nil {
		status, header, reason, ok := a(r, info.From)
		if !ok {
			for k, vs := range header {
				sw.Header()[k] = vs
			}
			if status < 400 || status > 599 {
				status = http.StatusForbidden
			}
			sw.Header().Set("Content-Type", "text/plain; charset=utf-8")
			sw.WriteHeader(status)
			io.WriteString(sw, reason+"\n")
			return
		}
	}
	e := info.export
	ctx := context.WithValue(r.Context(), exportKey{}, e)
	if e.HTTP != nil && e.HTTP.TimeoutMS > 0 {
		// The consumer bounds the request already; this bounds it for
		// consumers that carry the service as TCP (older agents).
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, e.HTTP.Timeout())
		defer cancel()
	}
	r = r.WithContext(ctx)
	if r.Method == http.MethodConnect {
		stream(sw, r, func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			ctx, cancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
			defer cancel()
			return d.DialContext(ctx, "tcp", e.Target)
		})
		return
	}
	p.proxy.ServeHTTP(sw, r)
}
