package agent

// Sidecar mode: health endpoints for a kubelet (or any supervisor), and a
// shutdown that drains open connections and leaves the mesh when the node
// is ephemeral. See docs/sidecar.md.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/meshlink/meshlink/netstack"
)

// healthServer serves /healthz and /readyz on Config.HealthListen.
type healthServer struct {
	addr string // where it listens
	srv  *http.Server
	done chan struct{} // closed when Serve returns
}

// Readiness is what /readyz answers, as JSON.
type Readiness struct {
	Ready bool `json:"ready"`
	// Waiting lists what readiness still waits for, in words.
	Waiting []string `json:"waiting,omitempty"`
}

// Ready reports whether the agent is ready to carry traffic: it has
// joined, received a network map from the coordinator since it started,
// applied it (every listener up, DNS served when asked for), and is not
// draining. Once ready, losing the coordinator does not make it unready:
// the data plane keeps running on the last map.
func (a *Agent) Ready() Readiness {
	a.mu.Lock()
	var waiting []string
	switch {
	case a.closed || a.left:
		waiting = append(waiting, "the agent is stopping")
	case a.draining.Load():
		waiting = append(waiting, "draining before shutdown")
	}
	if a.removed {
		waiting = append(waiting, "nothing: the coordinator removed this node (a newer node of the same name replaced it, or an admin removed it); restart it with a fresh state directory to join again")
	}
	if a.node.ID == 0 {
		waiting = append(waiting, "joining the mesh")
	}
	if a.lastMap.IsZero() {
		waiting = append(waiting, "the first network map from the coordinator")
	}
	if a.applyErr != "" {
		waiting = append(waiting, "applying the configuration: "+a.applyErr)
	}
	if a.cfg.DNS != "" && a.cfg.DNS != "off" && a.dns == nil {
		waiting = append(waiting, "the DNS server")
	}
	consumer := a.consumer
	a.mu.Unlock()
	if consumer != nil {
		for _, s := range consumer.Status() {
			if s.Error != "" {
				waiting = append(waiting, fmt.Sprintf("service %s's listener: %s", s.Name, s.Error))
			}
		}
	}
	return Readiness{Ready: len(waiting) == 0, Waiting: waiting}
}

// startHealth serves /healthz (the process is alive and answering) and
// /readyz (Ready) over plain HTTP on cfg.HealthListen; off when empty.
func (a *Agent) startHealth() error {
	addr := a.cfg.HealthListen
	if addr == "" || addr == "off" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("agent: --health-listen %s: %w; choose another address (HOST:PORT), or off", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		rd := a.Ready()
		w.Header().Set("Content-Type", "application/json")
		if !rd.Ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(rd)
	})
	hs := &healthServer{addr: ln.Addr().String(), done: make(chan struct{}),
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, WriteTimeout: 10 * time.Second}}
	go func() {
		defer close(hs.done)
		hs.srv.Serve(ln)
	}()
	a.mu.Lock()
	a.health = hs
	a.mu.Unlock()
	a.log.Info("health endpoints served", "healthz", "http://"+ln.Addr().String()+"/healthz", "readyz", "http://"+ln.Addr().String()+"/readyz")
	return nil
}

// HealthAddr returns where /healthz and /readyz are served, "" when off.
func (a *Agent) HealthAddr() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.health == nil {
		return ""
	}
	return a.health.addr
}

func (h *healthServer) close() {
	if h == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if h.srv.Shutdown(ctx) != nil {
		h.srv.Close()
	}
	<-h.done
}

// handleTCP is the netstack's handler for inbound TCP: the provider's,
// except while draining, when new connections are refused (consumers then
// try another provider at once) and open ones go on.
func (a *Agent) handleTCP(req *netstack.TCPRequest) {
	if a.draining.Load() {
		req.Reject()
		return
	}
	a.provider.HandleTCP(req)
}

// handleUDP is the netstack's handler for a new inbound UDP flow; like
// handleTCP, new flows are dropped while draining.
func (a *Agent) handleUDP(req *netstack.UDPRequest) {
	if a.draining.Load() {
		req.Reject()
		return
	}
	a.provider.HandleUDP(req)
}

// openConns counts the connections open through the agent, both ways.
func (a *Agent) openConns() int64 {
	var n int64
	if a.provider != nil {
		for _, e := range a.provider.Status() {
			n += e.Open
		}
	}
	if a.consumer != nil {
		for _, s := range a.consumer.Status() {
			n += s.Open
		}
	}
	return n
}

// ShutdownResult tells what Shutdown did.
type ShutdownResult struct {
	// Drained is true when every open connection ended before the drain
	// timeout; Cut counts those still open then, closed by Close.
	Drained bool
	Cut     int64
	// Left is true when the node left the mesh (an ephemeral node does).
	Left bool
}

// Shutdown is the orderly stop of SIGTERM: /readyz turns unready and new
// inbound mesh connections are refused; the open connections, both ways,
// get up to drain to end; then an ephemeral node leaves the mesh, so that
// its peers drop it at once rather than after the coordinator's grace,
// and the agent closes. The local listeners keep accepting while
// draining: the application in the pod may still be finishing its own
// work, and its outbound calls should succeed. Shutdown always closes the
// agent; the error is a failure to leave (the coordinator then reaps the
// ephemeral node after its grace).
func (a *Agent) Shutdown(ctx context.Context, drain time.Duration) (ShutdownResult, error) {
	var res ShutdownResult
	a.draining.Store(true)
	deadline := time.Now().Add(drain)
	tick := time.NewTicker(50 * time.Millisecond)
	for {
		n := a.openConns()
		if n == 0 {
			res.Drained = true
			break
		}
		if !time.Now().Before(deadline) || ctx.Err() != nil {
			res.Cut = n
			break
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	tick.Stop()
	if res.Cut > 0 {
		a.log.Warn("drain timeout: closing the connections still open", "open", res.Cut, "drain_timeout", drain)
	}
	a.mu.Lock()
	ephemeral, joined, left := a.nm.Self.Ephemeral, a.node.ID != 0, a.left
	a.mu.Unlock()
	var err error
	if ephemeral && joined && !left {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		// force: an ephemeral node's state is worth nothing without the
		// mesh; if the coordinator cannot be told it reaps the node.
		var lr LeaveResult
		lr, err = a.Leave(lctx, true)
		cancel()
		if err == nil && lr.Note == "" {
			res.Left = true
		} else if err == nil {
			err = errors.New(lr.Note)
		}
	}
	a.Close()
	return res, err
}
