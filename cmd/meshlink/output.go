package main

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/wire"
)

// The JSON the read commands print is made for scripts: every key is
// always there, durations are numbers of milliseconds (keys ending _ms),
// null stands for never or unknown, lists are [] rather than null, and
// status and services name the same things the same way (name, online,
// last_error, sent_bytes, received_bytes).

// statusJSON is `meshlink status --json`.
type statusJSON struct {
	Self        selfJSON        `json:"self"`
	ListenPort  uint16          `json:"listen_port"`
	DNS         *string         `json:"dns"`
	Coordinator coordinatorJSON `json:"coordinator"`
	Relays      []relayJSON     `json:"relays"`
	Peers       []peerJSON      `json:"peers"`
}

type selfJSON struct {
	ID        uint64           `json:"id"`
	Name      string           `json:"name"`
	Addresses []netip.Prefix   `json:"addresses"`
	Endpoints []netip.AddrPort `json:"endpoints"`
	Key       string           `json:"key"`
}

type coordinatorJSON struct {
	URL string `json:"url"`
	// State is "connected", "joining" (not joined yet) or "disconnected".
	State     string  `json:"state"`
	Connected bool    `json:"connected"`
	LastError *string `json:"last_error"`
	// RetryInMS is when the next attempt to reach the coordinator is due,
	// null when none is pending.
	RetryInMS *int64     `json:"retry_in_ms"`
	LastMap   *time.Time `json:"last_map"`
}

type relayJSON struct {
	Name          string  `json:"name"`
	URL           string  `json:"url"`
	Connected     bool    `json:"connected"`
	LastError     *string `json:"last_error"`
	SentBytes     uint64  `json:"sent_bytes"`
	ReceivedBytes uint64  `json:"received_bytes"`
}

type peerJSON struct {
	ID        uint64         `json:"id"`
	Name      string         `json:"name"`
	Addresses []netip.Prefix `json:"addresses"`
	Online    bool           `json:"online"`
	// Path is "direct", "relay" or "none".
	Path     string  `json:"path"`
	Endpoint *string `json:"endpoint"`
	Relay    *string `json:"relay"`
	RelayURL *string `json:"relay_url"`
	// RTTMS is the round trip of the path in use; null before one is
	// measured.
	RTTMS         *float64   `json:"rtt_ms"`
	LastHandshake *time.Time `json:"last_handshake"`
	// LastHandshakeAgoMS is how long ago that was; null for never.
	LastHandshakeAgoMS *int64   `json:"last_handshake_ago_ms"`
	SentBytes          uint64   `json:"sent_bytes"`
	ReceivedBytes      uint64   `json:"received_bytes"`
	DirectBytes        uint64   `json:"direct_bytes"`
	RelayedBytes       uint64   `json:"relayed_bytes"`
	Key                string   `json:"key"`
	Candidates         []string `json:"candidates"`
}

// servicesJSON is `meshlink services --json`.
type servicesJSON struct {
	Consumed []consumedJSON `json:"consumed"`
	Exported []exportedJSON `json:"exported"`
}

type consumedJSON struct {
	Name          string         `json:"name"`
	VIP           netip.Addr     `json:"vip"`
	Local         netip.AddrPort `json:"local"`
	Port          uint16         `json:"port"`
	FallbackPort  *uint16        `json:"fallback_port"` // null: served on port
	Note          *string        `json:"note"`
	Listening     bool           `json:"listening"`
	LastError     *string        `json:"last_error"`
	Providers     []providerJSON `json:"providers"`
	Open          int64          `json:"open"`
	Total         int64          `json:"total"`
	Failed        int64          `json:"failed"`
	SentBytes     int64          `json:"sent_bytes"`
	ReceivedBytes int64          `json:"received_bytes"`
	// Refused counts connections refused at once (no healthy provider);
	// Refusing says why new ones would be now (null: they would not).
	Refused  int64          `json:"refused"`
	Refusing *string        `json:"refusing"`
	Split    map[string]int `json:"split"`
	Locality *string        `json:"locality"`
	Affinity *string        `json:"affinity"`
	// Protocol is "tcp", "udp", "tcp+udp" or "http"; UDP counts the flows and
	// datagrams of a service with UDP (null without).
	Protocol string             `json:"protocol"`
	UDP      *localapi.UDPStats `json:"udp"`
}

type providerJSON struct {
	Name      string  `json:"name"`
	Addr      string  `json:"addr"`
	Local     bool    `json:"local"`
	Online    bool    `json:"online"`
	Healthy   bool    `json:"healthy"`
	Open      int64   `json:"open"`
	LastError *string `json:"last_error"`
	// Health is "ok", "unhealthy (why)" or "not answering (why)".
	Health   string  `json:"health"`
	Priority int     `json:"priority"`
	Weight   int     `json:"weight"`
	Version  *string `json:"version"`
	Region   *string `json:"region"`
	// Selected counts the connections it took; Share is its fraction of
	// the service's last 1000.
	Selected int64   `json:"selected"`
	Share    float64 `json:"share"`
}

type exportedJSON struct {
	Name   string `json:"name"`
	Target string `json:"target"`
	Port   uint16 `json:"port"`
	// Source is "flag" (the agent's --expose, set again at each start) or
	// "runtime" (meshlink expose, saved in the state directory).
	Source        string  `json:"source"`
	Announced     bool    `json:"announced"`
	Open          int64   `json:"open"`
	Total         int64   `json:"total"`
	Denied        int64   `json:"denied"`
	Failed        int64   `json:"failed"`
	SentBytes     int64   `json:"sent_bytes"`
	ReceivedBytes int64   `json:"received_bytes"`
	LastError     *string `json:"last_error"`
	Priority      int     `json:"priority"`
	Weight        int     `json:"weight"`
	Version       *string `json:"version"`
	// HealthCheck is "tcp", "http:/PATH[@STATUS]" or "none"; Health the
	// last result ("ok", "unhealthy (why)"), null before the first.
	HealthCheck string  `json:"health_check"`
	Health      *string `json:"health"`
	// Protocol is "tcp", "udp", "tcp+udp" or "http"; UDPIdle the seconds a UDP
	// flow may be idle (60 by default); UDP counts flows (null without).
	Protocol string             `json:"protocol"`
	UDPIdle  *int               `json:"udp_idle"`
	UDP      *localapi.UDPStats `json:"udp"`
}

// orNull is s, or nil (JSON null) when s is empty.
func orNull(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func timeOrNull(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

// coordinatorState is "connected", "joining" or "disconnected".
func coordinatorState(c localapi.Coordinator) string {
	switch {
	case c.Connected:
		return "connected"
	case c.Joining:
		return "joining"
	}
	return "disconnected"
}

func toStatusJSON(s *localapi.Status, now time.Time) statusJSON {
	out := statusJSON{
		Self:       selfJSON{ID: s.Self.ID, Name: s.Self.Name, Addresses: s.Self.Addresses, Endpoints: s.Self.Endpoints, Key: s.Self.Key},
		ListenPort: s.ListenPort, DNS: orNull(s.DNS),
		Coordinator: coordinatorJSON{URL: s.Coordinator.URL, State: coordinatorState(s.Coordinator), Connected: s.Coordinator.Connected,
			LastError: orNull(s.Coordinator.LastError), LastMap: timeOrNull(s.Coordinator.LastMap)},
		Relays: []relayJSON{}, Peers: []peerJSON{},
	}
	if out.Self.Addresses == nil {
		out.Self.Addresses = []netip.Prefix{}
	}
	if out.Self.Endpoints == nil {
		out.Self.Endpoints = []netip.AddrPort{}
	}
	if !s.Coordinator.Connected && !s.Coordinator.RetryAt.IsZero() {
		in := ms(max(s.Coordinator.RetryAt.Sub(now), 0))
		out.Coordinator.RetryInMS = &in
	}
	for _, r := range s.Relays {
		out.Relays = append(out.Relays, relayJSON{Name: r.Name, URL: r.URL, Connected: r.Connected, LastError: orNull(r.LastError),
			SentBytes: r.TxBytes, ReceivedBytes: r.RxBytes})
	}
	for _, p := range s.Peers {
		pj := peerJSON{ID: p.ID, Name: p.Name, Addresses: p.Addresses, Online: p.Online, Path: p.Path,
			Relay: orNull(p.Relay), RelayURL: orNull(p.RelayURL), LastHandshake: timeOrNull(p.LastHandshake),
			SentBytes: p.TxBytes, ReceivedBytes: p.RxBytes, DirectBytes: p.DirectBytes, RelayedBytes: p.RelayedBytes,
			Key: p.Key, Candidates: p.Candidates}
		if p.Path == "direct" {
			pj.Endpoint = orNull(p.Endpoint)
		}
		if p.RTT > 0 {
			v := float64(time.Duration(p.RTT).Microseconds()) / 1000
			pj.RTTMS = &v
		}
		if !p.LastHandshake.IsZero() {
			ago := ms(max(now.Sub(p.LastHandshake), 0))
			pj.LastHandshakeAgoMS = &ago
		}
		if pj.Addresses == nil {
			pj.Addresses = []netip.Prefix{}
		}
		if pj.Candidates == nil {
			pj.Candidates = []string{}
		}
		out.Peers = append(out.Peers, pj)
	}
	return out
}

func toServicesJSON(s *localapi.Services) servicesJSON {
	out := servicesJSON{Consumed: []consumedJSON{}, Exported: []exportedJSON{}}
	for _, sv := range s.Consumed {
		c := consumedJSON{Name: sv.Name, VIP: sv.VIP, Local: sv.Local, Port: sv.Port, Note: orNull(sv.Note), Listening: sv.Listening, LastError: orNull(sv.Error),
			Providers: []providerJSON{}, Open: sv.Open, Total: sv.Total, Failed: sv.Failed, SentBytes: sv.Sent, ReceivedBytes: sv.Received,
			Refused: sv.Refused, Refusing: orNull(sv.Refusing), Split: sv.Split, Locality: orNull(sv.Locality), Affinity: orNull(sv.Affinity),
			Protocol: protocolOf(sv.Protocol), UDP: sv.UDP}
		if sv.FallbackPort != 0 {
			fp := sv.FallbackPort
			c.FallbackPort = &fp
		}
		for _, p := range sv.Providers {
			c.Providers = append(c.Providers, providerJSON{Name: p.Name, Addr: p.Addr, Local: p.Local, Online: p.Online, Healthy: p.Healthy,
				Open: p.Open, LastError: orNull(p.LastError), Health: p.Health, Priority: p.Priority, Weight: max(p.Weight, 1),
				Version: orNull(p.Version), Region: orNull(p.Region), Selected: p.Selected, Share: p.Share})
		}
		out.Consumed = append(out.Consumed, c)
	}
	for _, e := range s.Exported {
		out.Exported = append(out.Exported, exportedJSON{Name: e.Name, Target: e.Target, Port: e.Port, Source: exportSource(e),
			Announced: e.Announced, Open: e.Open, Total: e.Total, Denied: e.Denied, Failed: e.Failed,
			SentBytes: e.Sent, ReceivedBytes: e.Received, LastError: orNull(e.LastError),
			Priority: e.Priority, Weight: max(e.Weight, 1), Version: orNull(e.Version), HealthCheck: e.HealthCheck, Health: orNull(e.Health),
			Protocol: protocolOf(e.Protocol), UDP: e.UDP})
		if e.UDP != nil {
			idle := e.UDPIdle
			if idle == 0 {
				idle = int(wire.DefaultUDPIdle / time.Second)
			}
			out.Exported[len(out.Exported)-1].UDPIdle = &idle
		}
	}
	return out
}

// protocolOf is a service's protocol; an agent from before UDP reports
// none, and carries TCP.
func protocolOf(p string) string {
	if p == "" {
		return wire.ProtocolTCP
	}
	return p
}

// withProtocol is addr with "/udp" or "/tcp+udp" after it, as --expose
// takes it; a TCP service's is addr alone.
func withProtocol(addr, proto string) string {
	if p := protocolOf(proto); p != wire.ProtocolTCP {
		return addr + "/" + p
	}
	return addr
}

// openText is a service's open connections and UDP flows in words.
func openText(open int64, proto string, udp *localapi.UDPStats) string {
	if udp == nil {
		return fmt.Sprint(open)
	}
	if !wire.HasTCP(proto) {
		return fmt.Sprintf("%d flows", udp.Flows)
	}
	return fmt.Sprintf("%d+%d flows", open, udp.Flows)
}

// exportSource is an export's source; an agent from before sources were
// reported saved every export.
func exportSource(e localapi.Export) string {
	if e.Source == "" {
		return localapi.SourceRuntime
	}
	return e.Source
}

// coordinatorLine is the coordinator's state for people: "joining
// https://…, retrying in 4s (reason)".
func coordinatorLine(c localapi.Coordinator, now time.Time) string {
	var s string
	switch coordinatorState(c) {
	case "connected":
		return c.URL + " connected"
	case "joining":
		s = "joining " + c.URL
	default:
		s = c.URL + " disconnected"
	}
	if !c.RetryAt.IsZero() {
		if d := c.RetryAt.Sub(now); d > 0 {
			s += fmt.Sprintf(", retrying in %s", (d + time.Second - 1).Truncate(time.Second))
		} else {
			s += ", retrying now"
		}
	}
	if c.LastError != "" {
		s += " (" + c.LastError + ")"
	}
	return s
}

// relaysJSON is `meshlink relays --json`: the relays as the coordinator
// hands them out, [] for none.
func relaysJSON(rs []wire.Relay) []wire.Relay {
	if rs == nil {
		return []wire.Relay{}
	}
	return rs
}

// ago rounds d for people: seconds under a minute, then minutes, hours, days.
func ago(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(max(d, 0)/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	default:
		return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
	}
}
