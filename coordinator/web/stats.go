package web

import (
	"sync"
	"time"

	"github.com/meshlink/meshlink/wire"
)

// Bounds on one node's report: a report is stored as sent, so it must not
// grow without limit.
const (
	maxStatServices = 512
	maxStatPeers    = 4096
)

type nodeStats struct {
	at     time.Time
	report wire.StatsReport
	// http are the node's last HTTP figures, oldest first, back to the
	// first one at or before the live window's start (httpstats.go).
	http []httpSample
}

// statsSet holds the latest report of each node, in memory only: counters
// are totals since the agent started and a restart of the coordinator loses
// nothing that the next report does not bring back.
type statsSet struct {
	mu     sync.Mutex // guards byNode
	byNode map[wire.NodeID]nodeStats
}

func newStatsSet() *statsSet { return &statsSet{byNode: map[wire.NodeID]nodeStats{}} }

// ReportStats stores node id's latest counters and wakes the live feeds.
func (c *Console) ReportStats(id wire.NodeID, rep wire.StatsReport) {
	if len(rep.Services) > maxStatServices {
		rep.Services = rep.Services[:maxStatServices]
	}
	if len(rep.Peers) > maxStatPeers {
		rep.Peers = rep.Peers[:maxStatPeers]
	}
	for i := range rep.Services {
		if len(rep.Services[i].Name) > 63 {
			rep.Services[i].Name = rep.Services[i].Name[:63]
		}
	}
	if len(rep.HTTP) > wire.MaxHTTPStats {
		rep.HTTP = rep.HTTP[:wire.MaxHTTPStats]
	}
	now := c.now()
	c.stats.mu.Lock()
	samples := addHTTPSample(c.stats.byNode[id].http, httpSample{at: now, http: rep.HTTP})
	rep.HTTP = nil // kept in samples
	c.stats.byNode[id] = nodeStats{at: now, report: rep, http: samples}
	c.stats.mu.Unlock()
	c.bump()
}

// get returns a copy of the map, dropping nodes that no longer exist.
func (ss *statsSet) get(exists func(wire.NodeID) bool) map[wire.NodeID]nodeStats {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	out := make(map[wire.NodeID]nodeStats, len(ss.byNode))
	for id, st := range ss.byNode {
		if !exists(id) {
			delete(ss.byNode, id)
			continue
		}
		out[id] = st
	}
	return out
}
