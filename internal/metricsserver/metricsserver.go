// Package metricsserver serves a Prometheus registry at /metrics over plain
// HTTP on a listener of its own, for the coordinator, the agent and the
// relay alike. Plain HTTP, loopback by default: scrapers rarely pin
// certificates, and nothing in the metrics is secret.
package metricsserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Off reports whether a listen address turns metrics off: "" or "off".
func Off(addr string) bool { return addr == "" || addr == "off" }

// Config says what to serve where.
type Config struct {
	// Addr is the HOST:PORT to listen on.
	Addr string
	// Gatherer is what /metrics serves: the owner's own registry, so that
	// several owners in one process never collide.
	Gatherer prometheus.Gatherer
	// Logger receives the server's logs; nil discards.
	Logger *slog.Logger
	// Subsystem and Flag name the owner and the option that set Addr, for
	// the error a user sees when Addr cannot be listened on:
	// "coordinator", "--metrics-listen".
	Subsystem, Flag string
	// ShutdownTimeout bounds how long Close waits for scrapes in flight
	// before cutting them off; default 5s.
	ShutdownTimeout time.Duration
}

// Server serves /metrics until Close. A nil *Server is metrics turned off:
// its methods do nothing.
type Server struct {
	ln    net.Listener
	srv   *http.Server
	grace time.Duration
	stop  func() bool   // unregisters the shutdown on ctx
	once  sync.Once     // guards the shutdown
	done  chan struct{} // closed when Serve returns
}

// Start listens on cfg.Addr and serves /metrics until Close is called or
// ctx is done. When the address cannot be listened on, the error says
// what to do, naming cfg.Flag; an address in use is said in those words.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", cfg.Addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, &listenError{err: err, msg: fmt.Sprintf("%s: metrics listen %s: address already in use; choose another %s address, or %s off",
				cfg.Subsystem, cfg.Addr, cfg.Flag, cfg.Flag)}
		}
		return nil, fmt.Errorf("%s: metrics listen %s: %w; choose another %s address (HOST:PORT), or %s off",
			cfg.Subsystem, cfg.Addr, err, cfg.Flag, cfg.Flag)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{
		ErrorLog:      errLog,
		ErrorHandling: promhttp.ContinueOnError, // one failing collector must not hide the rest
		Timeout:       10 * time.Second,
	}))
	s := &Server{
		ln: ln,
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          errLog,
		},
		grace: cfg.ShutdownTimeout,
		done:  make(chan struct{}),
	}
	if s.grace <= 0 {
		s.grace = 5 * time.Second
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	s.stop = context.AfterFunc(ctx, s.shutdown)
	log.Info("serving metrics", "addr", ln.Addr().String())
	return s, nil
}

// listenError is an address in use: its message replaces the system's,
// and errors.Is still finds syscall.EADDRINUSE.
type listenError struct {
	err error
	msg string
}

func (e *listenError) Error() string { return e.msg }
func (e *listenError) Unwrap() error { return e.err }

// Addr is the address /metrics is served on; zero for a nil Server.
func (s *Server) Addr() netip.AddrPort {
	if s == nil {
		return netip.AddrPort{}
	}
	ap := s.ln.Addr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Close stops serving, letting scrapes in flight finish within the
// shutdown timeout, and waits for the server. It is idempotent.
func (s *Server) Close() error {
	if s == nil {
		return nil
	}
	s.stop()
	s.shutdown()
	<-s.done
	return nil
}

func (s *Server) shutdown() {
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.grace)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
		}
	})
}
