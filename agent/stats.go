package agent

import (
	"time"

	"github.com/meshlink/meshlink/wire"
)

// statsLoop reports the agent's counters to the coordinator for its console
// while connected. Failures are quiet: the counters are totals, so the next
// report makes up for a lost one.
func (a *Agent) statsLoop() {
	t := time.NewTicker(a.cfg.StatsEvery)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		connected := a.connected
		a.mu.Unlock()
		if !connected {
			continue
		}
		if err := a.control().call(a.ctx, wire.PathStats, a.statsReport(), nil); err != nil {
			a.log.Debug("stats report failed", "err", err)
		}
	}
}

// statsReport gathers the counters the console shows.
func (a *Agent) statsReport() wire.StatsReport {
	r := wire.StatsReport{Version: wire.ProtocolVersion}
	sv := a.Services()
	for _, s := range sv.Consumed {
		r.Services = append(r.Services, wire.ServiceStats{Name: s.Name, Role: wire.RoleConsumer, Open: s.Open, Total: s.Total, Failed: s.Failed, BytesSent: s.Sent, BytesReceived: s.Received,
			LocalPort: s.FallbackPort})
	}
	for _, e := range sv.Exported {
		r.Services = append(r.Services, wire.ServiceStats{Name: e.Name, Role: wire.RoleProvider, Open: e.Open, Total: e.Total, Failed: e.Failed, Denied: e.Denied, BytesSent: e.Received, BytesReceived: e.Sent})
	}
	r.Denials = a.denials.report()
	if o := a.HTTPObserver(); o != nil {
		r.HTTP = o.Stats().Report()
	}
	for _, p := range a.Status().Peers {
		ps := wire.PeerStats{Node: wire.NodeID(p.ID), Path: p.Path, DirectBytes: p.DirectBytes, RelayedBytes: p.RelayedBytes, RTTMicros: time.Duration(p.RTT).Microseconds()}
		if p.Path == "direct" {
			ps.Endpoint = p.Endpoint
		} else if p.Path == "relay" {
			ps.Endpoint = p.Relay
		}
		r.Peers = append(r.Peers, ps)
	}
	return r
}
