package web

import (
	"context"
	"sort"
	"strings"
	"time"

	"github.com/meshlink/meshlink/coordinator/store"
	"github.com/meshlink/meshlink/wire"
)

// Snapshot is everything one viewer may see, as the pages render it and
// as the live feed and GET /console/api/snapshot send it.
type Snapshot struct {
	User     ViewUser      `json:"user"`
	Nodes    []ViewNode    `json:"nodes"`
	Services []ViewService `json:"services"`
	Tokens   []ViewToken   `json:"tokens"`
	Events   []ViewEvent   `json:"events"`
	// Relays are the relays the mesh lists now, in order of preference;
	// every viewer sees them (they are in every node's map).
	Relays []ViewRelay `json:"relays"`
	// Edges are the HTTP figures per consumer and provider site of each
	// service, for the edges whose both ends the viewer sees.
	Edges []ViewEdge `json:"edges"`
}

type ViewUser struct {
	ID    int64  `json:"id"`
	Name  string `json:"name"`
	Admin bool   `json:"admin"`
}

type ViewNode struct {
	ID        wire.NodeID `json:"id"`
	Name      string      `json:"name"`
	Hostname  string      `json:"hostname,omitempty"`
	KeyFP     string      `json:"key_fp"`
	Online    bool        `json:"online"`
	Addresses []string    `json:"addresses"`
	Endpoints []string    `json:"endpoints"`
	LastSeen  time.Time   `json:"last_seen"`
	Owner     string      `json:"owner"`
	OwnerID   int64       `json:"owner_id"`
	Tags      []string    `json:"tags"`
	Ephemeral bool        `json:"ephemeral"`
	// KeyExpiry is when the node's key expires (zero: never); KeyExpired
	// says it has.
	KeyExpiry  time.Time `json:"key_expiry"`
	KeyExpired bool      `json:"key_expired"`
	// Paths are the links to peers as this node last reported them.
	Paths   []ViewPath `json:"paths"`
	StatsAt time.Time  `json:"stats_at,omitempty"`
}

type ViewPath struct {
	Peer         wire.NodeID `json:"peer"`
	PeerName     string      `json:"peer_name"`
	Path         string      `json:"path"`
	Endpoint     string      `json:"endpoint,omitempty"`
	RTTMicros    int64       `json:"rtt_us,omitempty"`
	DirectBytes  uint64      `json:"direct_bytes"`
	RelayedBytes uint64      `json:"relayed_bytes"`
	// Relay names the relay of a "relay" path, as the agent reported it.
	Relay string `json:"relay,omitempty"`
}

type ViewService struct {
	Name      string    `json:"name"`
	VIP       string    `json:"vip"`
	Port      uint16    `json:"port"`
	Providers []ViewEnd `json:"providers"`
	Consumers []ViewEnd `json:"consumers"`
	// HiddenProviders counts providers the viewer may not see.
	HiddenProviders int   `json:"hidden_providers"`
	Open            int64 `json:"open"`
	Total           int64 `json:"total"`
	Failed          int64 `json:"failed"`
	Bytes           int64 `json:"bytes"`
	// Split and Locality are the service's traffic policy.
	Split    map[string]int `json:"split,omitempty"`
	Locality string         `json:"locality,omitempty"`
	// HTTP sums the service's HTTP edges the viewer's sites reported;
	// absent when none did.
	HTTP *ViewHTTP `json:"http,omitempty"`
}

// ViewEnd is one node's side of a service.
type ViewEnd struct {
	Node          wire.NodeID `json:"node"`
	Name          string      `json:"name"`
	Port          uint16      `json:"port,omitempty"`
	Online        bool        `json:"online"`
	Open          int64       `json:"open"`
	Total         int64       `json:"total"`
	Failed        int64       `json:"failed"`
	BytesSent     int64       `json:"bytes_sent"`
	BytesReceived int64       `json:"bytes_received"`
	// LocalPort, for a consumer, is the port it serves the service on
	// when that is not the service's own (a privileged port it may not
	// bind, served on port+10000).
	LocalPort uint16 `json:"local_port,omitempty"`
	// Priority, Weight, Version and Health (with HealthError) describe a
	// provider as consumers choose it; Share is its fraction of the
	// connections its service's visible providers took since they started.
	Priority    int     `json:"priority"`
	Weight      int     `json:"weight,omitempty"`
	Version     string  `json:"version,omitempty"`
	Health      string  `json:"health,omitempty"`
	HealthError string  `json:"health_error,omitempty"`
	Share       float64 `json:"share"`
	// HTTP sums this end's HTTP edges of the service (a provider's from
	// every consumer, a consumer's to every provider).
	HTTP *ViewHTTP `json:"http,omitempty"`
}

type ViewToken struct {
	ID        string    `json:"id"`
	Owner     string    `json:"owner"`
	Reusable  bool      `json:"reusable"`
	Ephemeral bool      `json:"ephemeral"`
	Tags      []string  `json:"tags"`
	Expires   time.Time `json:"expires,omitempty"`
	Expired   bool      `json:"expired"`
	Uses      int       `json:"uses"`
	Revoked   bool      `json:"revoked"`
	Created   time.Time `json:"created"`
}

type ViewEvent struct {
	At      time.Time       `json:"at"`
	Kind    store.EventKind `json:"kind"`
	Actor   string          `json:"actor"`
	Node    string          `json:"node,omitempty"`
	Message string          `json:"message"`
}

// ViewRelay is one relay of the mesh.
type ViewRelay struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	// Fingerprint is the SHA-256 of the relay's certificate (64 hex
	// digits), as agents pin it; FingerprintShort is its short form.
	Fingerprint      string `json:"fingerprint"`
	FingerprintShort string `json:"fingerprint_short"`
	// KeyFP is a short fingerprint of the relay's public key.
	KeyFP    string `json:"key_fp"`
	Embedded bool   `json:"embedded"`
	// Stats are the live counters, null when the coordinator does not
	// have them (a standalone relay).
	Stats *ViewRelayStats `json:"stats"`
}

type ViewRelayStats struct {
	Clients        int   `json:"clients"`
	Accepted       int64 `json:"accepted"`
	PacketsRelayed int64 `json:"packets_relayed"`
	BytesRelayed   int64 `json:"bytes_relayed"`
	Dropped        int64 `json:"dropped"`
}

// certFingerprintShort is the short form of a certificate's hex SHA-256,
// in the style of keyFingerprint.
func certFingerprintShort(fp string) string {
	if len(fp) > 16 {
		fp = fp[:16]
	}
	if fp == "" {
		return ""
	}
	return "SHA256:" + strings.ToLower(fp)
}

func viewRelays(rs []RelayInfo) []ViewRelay {
	out := make([]ViewRelay, 0, len(rs))
	for _, r := range rs {
		vr := ViewRelay{Name: r.Name, URL: r.URL, Fingerprint: r.Fingerprint, FingerprintShort: certFingerprintShort(r.Fingerprint),
			KeyFP: r.Key.Fingerprint(), Embedded: r.Embedded}
		if c := r.Counters; c != nil {
			vr.Stats = &ViewRelayStats{Clients: c.Clients, Accepted: int64(c.Accepted), PacketsRelayed: int64(c.PacketsRelayed),
				BytesRelayed: int64(c.BytesRelayed), Dropped: int64(c.Dropped)}
		}
		out = append(out, vr)
	}
	return out
}

// mayManage is the single rule of ownership.
func (v *viewer) mayManage(ownerID int64) bool { return v.Admin || ownerID == v.ID && ownerID != 0 }

// snapshot builds what v may see. events bounds the events included.
func (c *Console) snapshot(ctx context.Context, v *viewer, events int) (*Snapshot, error) {
	nodes, services, err := c.mesh.State(ctx)
	if err != nil {
		return nil, err
	}
	stored, err := c.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	users, err := c.store.ListUsers(ctx)
	if err != nil {
		return nil, err
	}
	userName := map[int64]string{}
	for _, u := range users {
		userName[u.ID] = u.Username
	}
	owner := map[wire.NodeID]int64{}
	for _, n := range stored {
		owner[n.ID] = n.OwnerID
	}
	names := map[wire.NodeID]string{}
	online := map[wire.NodeID]bool{}
	for _, n := range nodes {
		names[n.ID], online[n.ID] = n.Name, n.Online
	}
	stats := c.stats.get(func(id wire.NodeID) bool { _, ok := names[id]; return ok })
	visible := func(id wire.NodeID) bool { o, ok := owner[id]; return ok && v.mayManage(o) }

	relays, err := c.mesh.Relays(ctx)
	if err != nil {
		return nil, err
	}

	snap := &Snapshot{User: ViewUser{ID: v.ID, Name: v.Username, Admin: v.Admin},
		Nodes: []ViewNode{}, Services: []ViewService{}, Tokens: []ViewToken{}, Events: []ViewEvent{}, Relays: viewRelays(relays), Edges: []ViewEdge{}}
	for _, n := range nodes {
		if !visible(n.ID) {
			continue
		}
		vn := ViewNode{ID: n.ID, Name: n.Name, Hostname: n.Hostname, KeyFP: n.Key.Fingerprint(), Online: n.Online,
			Addresses: []string{}, Endpoints: []string{}, LastSeen: n.LastSeen, OwnerID: owner[n.ID], Owner: userName[owner[n.ID]],
			Tags: append([]string{}, n.Tags...), Ephemeral: n.Ephemeral, Paths: []ViewPath{},
			KeyExpiry: n.KeyExpiry, KeyExpired: n.KeyExpired(time.Now())}
		for _, a := range n.Addresses {
			vn.Addresses = append(vn.Addresses, a.Addr().String())
		}
		for _, e := range n.Endpoints {
			vn.Endpoints = append(vn.Endpoints, e.String())
		}
		if st, ok := stats[n.ID]; ok {
			vn.StatsAt = st.at
			for _, p := range st.report.Peers {
				name, ok := names[p.Node]
				if !ok {
					continue
				}
				vp := ViewPath{Peer: p.Node, PeerName: name, Path: p.Path, Endpoint: p.Endpoint,
					RTTMicros: p.RTTMicros, DirectBytes: p.DirectBytes, RelayedBytes: p.RelayedBytes}
				if p.Path == "relay" {
					vp.Relay = p.Endpoint
				}
				vn.Paths = append(vn.Paths, vp)
			}
			sort.Slice(vn.Paths, func(i, j int) bool { return vn.Paths[i].PeerName < vn.Paths[j].PeerName })
		}
		snap.Nodes = append(snap.Nodes, vn)
	}

	// Counters by service and role, from the nodes the viewer may see.
	type key struct {
		service string
		node    wire.NodeID
	}
	provStats, consStats := map[key]wire.ServiceStats{}, map[key]wire.ServiceStats{}
	consumersOf := map[string][]wire.NodeID{}
	for id, st := range stats {
		if !visible(id) {
			continue
		}
		for _, s := range st.report.Services {
			k := key{s.Name, id}
			switch s.Role {
			case wire.RoleProvider:
				provStats[k] = s
			case wire.RoleConsumer:
				if _, dup := consStats[k]; !dup {
					consumersOf[s.Name] = append(consumersOf[s.Name], id)
				}
				consStats[k] = s
			}
		}
	}
	end := func(id wire.NodeID, s wire.ServiceStats) ViewEnd {
		return ViewEnd{Node: id, Name: names[id], Online: online[id], Open: s.Open, Total: s.Total, Failed: s.Failed + s.Denied,
			BytesSent: s.BytesSent, BytesReceived: s.BytesReceived}
	}
	for _, sv := range services {
		vs := ViewService{Name: sv.Name, VIP: sv.VIP.String(), Port: sv.Port, Providers: []ViewEnd{}, Consumers: []ViewEnd{}}
		var pOpen, pTotal, pBytes, cOpen, cTotal, cBytes int64
		for _, p := range sv.Providers {
			if !visible(p.Node) {
				vs.HiddenProviders++
				continue
			}
			s := provStats[key{sv.Name, p.Node}]
			e := end(p.Node, s)
			e.Port = p.Port
			e.Priority, e.Weight, e.Version, e.Health, e.HealthError = p.Priority, max(p.Weight, wire.DefaultWeight), p.Version, p.Health, p.HealthError
			vs.Providers = append(vs.Providers, e)
			pOpen, pTotal, pBytes = pOpen+s.Open, pTotal+s.Total, pBytes+s.BytesSent+s.BytesReceived
			vs.Failed += s.Failed + s.Denied
		}
		ids := consumersOf[sv.Name]
		sort.Slice(ids, func(i, j int) bool { return names[ids[i]] < names[ids[j]] })
		for _, id := range ids {
			s := consStats[key{sv.Name, id}]
			e := end(id, s)
			e.LocalPort = s.LocalPort
			vs.Consumers = append(vs.Consumers, e)
			cOpen, cTotal, cBytes = cOpen+s.Open, cTotal+s.Total, cBytes+s.BytesSent+s.BytesReceived
			vs.Failed += s.Failed + s.Denied
		}
		// Every connection is seen at both ends when both report; a
		// viewer who sees one end only still gets its numbers.
		vs.Open, vs.Total, vs.Bytes = max(pOpen, cOpen), max(pTotal, cTotal), max(pBytes, cBytes)
		vs.Split, vs.Locality = sv.Split, sv.Locality
		for i := range vs.Providers {
			if pTotal > 0 {
				vs.Providers[i].Share = float64(vs.Providers[i].Total) / float64(pTotal)
			}
		}
		snap.Services = append(snap.Services, vs)
	}
	c.addHTTP(snap, stats, visible, names, online)

	toks, err := c.store.ListTokens(ctx)
	if err != nil {
		return nil, err
	}
	now := c.now()
	for i := len(toks) - 1; i >= 0; i-- { // newest first
		t := toks[i]
		if !v.mayManage(t.OwnerID) {
			continue
		}
		snap.Tokens = append(snap.Tokens, ViewToken{ID: t.ID, Owner: userName[t.OwnerID], Reusable: t.Reusable, Ephemeral: t.Ephemeral,
			Tags: append([]string{}, t.Tags...), Expires: t.Expires, Expired: !t.Expires.IsZero() && !now.Before(t.Expires),
			Uses: t.Uses, Revoked: t.Revoked, Created: t.Created})
	}
	if events > 0 {
		evs, err := c.events(ctx, v, events)
		if err != nil {
			return nil, err
		}
		snap.Events = evs
	}
	return snap, nil
}

func (c *Console) events(ctx context.Context, v *viewer, limit int) ([]ViewEvent, error) {
	filter := v.ID
	if v.Admin {
		filter = 0
	}
	evs, err := c.store.ListEvents(ctx, filter, limit)
	if err != nil {
		return nil, err
	}
	out := make([]ViewEvent, 0, len(evs))
	for _, e := range evs {
		out = append(out, ViewEvent{At: e.At, Kind: e.Kind, Actor: e.Actor, Node: e.Node, Message: e.Message})
	}
	return out, nil
}
