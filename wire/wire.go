// Package wire defines everything the agent and the coordinator say to each
// other: the join token, the HTTPS API's request and response bodies, and the
// network map with its incremental updates. It imports only the standard
// library and the module's leaf packages (internal/key) so that both sides,
// and fuzzers, can use it alone.
//
// All bodies are JSON. Every request carries the sender's ProtocolVersion; the
// coordinator refuses versions it does not know with 426 Upgrade Required.
//
// Protocol version changelog:
//
//	1 (2026-11-24): register, map stream (full map then deltas), services,
//	  endpoints; join tokens "mlj1_…".
//	2 (2026-11-24): relay (PathRelay, HTTP upgrade to RelayProtocol), STUN
//	  binding on the coordinator's UDP port, NetworkMap.Relays.
//	3 (2026-11-24): interactive registration (RegisterRequest.Interactive,
//	  RegisterPending, PathRegisterPoll) and agent counters (PathStats).
//	4 (2026-11-24): standalone relays (PathRelayRegister, PathRelayNodes,
//	  relay join tokens); Relay.Key and Relay.Name; MapResponse.Relays
//	  replaces the list mid-stream. RelayProtocol meshlink-relay/2: a node
//	  proves it holds its WireGuard key (HeaderRelayNodeKey,
//	  HeaderRelayProof) instead of sending its coordinator secret, so a
//	  relay run by someone else never sees node credentials.
//	5 (2026-12-01): PathServerKey and RegisterRequest.KeyProof: renewing an
//	  existing node (same name and key) needs proof of its private key;
//	  a public key alone, which every network map carries, no longer does.
//	  A service belongs to the owner of its first provider: other users'
//	  nodes exposing it get 403 ErrCodeNotOwner. NodePrefix4 is
//	  100.96.0.0/14 (was /12, which contained ServicePrefix).
//	6 (2026-12-01): a key change on PathMap (MapRequest.NodeKey other
//	  than the stored key) needs MapRequest.OldKeyProof and NewKeyProof,
//	  both over RekeyProofMessage; the node secret alone no longer
//	  re-points a node's addresses at another key (403 ErrCodeUnauthorized
//	  otherwise). A MapRequest with the stored key, or none, needs no proof.
//	7 (2026-12-01): StatsReport.Denials: a provider reports the connections
//	  it refused by policy, per (service, source node), at most MaxDenials;
//	  the coordinator records them as console events. A provider closes
//	  open connections a new map no longer allows.
//	8 (2026-12-01): node keys expire. Node.KeyExpiry (on Self and peers)
//	  is when the coordinator stops accepting the node's key; every
//	  registration and rekey moves it to now plus the coordinator's
//	  --node-key-expiry (or the shorter one of the node's join token).
//	  An expired node is dropped from every other map, and its map
//	  stream, rekey and other calls are refused with 403
//	  ErrCodeKeyExpired; agents rotate their keys well before.
//	9 (2026-12-01): traffic management. Provider.Priority, Weight,
//	  Version (set by ServiceRequest's fields of the same names) and
//	  Health, HealthError (reported by the provider on PathHealth in a
//	  HealthReport); Service.Split, Locality, Affinity (from the policy
//	  file's services section); Node.Region (MapRequest.Region).
//	10 (2026-12-01): UDP services. Provider.Protocol and UDPIdle (set by
//	  ServiceRequest's fields of the same names): a provider carries TCP
//	  (ProtocolTCP, also ""), UDP (ProtocolUDP) or both (ProtocolTCPUDP)
//	  on its port; Service.Protocol is what its providers carry together.
//	  Consumers listen on UDP for a service with UDP and carry each client
//	  address's datagrams as one flow through the mesh's UDP.
//	11 (2026-12-01): several coordinators on one database serve one mesh.
//	  JoinToken.URLs lists more coordinator URLs (same certificate
//	  fingerprint) and NetworkMap.Coordinators every one the mesh has; an
//	  agent that loses its coordinator moves to another. Tokens without
//	  URLs are as before.
//	12 (2026-12-01): HTTP services. ServiceRequest.Protocol may be
//	  ProtocolHTTP: the provider parses HTTP/1.1 and h2c on its port and
//	  forwards each request to its target. Such a provider is listed with
//	  Protocol "" (TCP), so agents before version 12 carry the service as
//	  TCP and still work; Service.HTTP, set when a provider exports HTTP or
//	  the policy file says services.NAME.protocol: http, carries the
//	  evaluated services.NAME.http (timeout, retries, outlier detection,
//	  routes) to consumers and providers.
//	13 (2026-12-01): request-level authorization of HTTP services.
//	  Service.HTTPAuth: the end-user JWT its providers check (issuer,
//	  JWKS URL or file, audiences, claims forwarded as headers) and, in
//	  providers' maps only, the policy rules with http/when conditions
//	  that decide each request, their from resolved to node IDs.
//	14 (2026-12-01): per-request HTTP figures. StatsReport.HTTP counts,
//	  per (service, role, peer node), the HTTP requests the node carried,
//	  those that failed (5xx or no answer) and their latency in the fixed
//	  buckets HTTPLatencyBounds, at most MaxHTTPStats entries; the
//	  coordinator refuses a report with more, or with an entry that does
//	  not add up, and drops entries whose peer is not one of the node's.
//	15 (2026-12-02): negotiated map-stream keep-alives. MapRequest.MapIdle
//	  says how long the agent waits on a silent stream before it
//	  reconnects; the coordinator keeps its keep-alives within half of it
//	  (an older agent's, without the field, within 30 s: it waits 60 s)
//	  and names the interval it chose in the stream's HeaderKeepAlive,
//	  which an agent's watchdog follows.
package wire

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshlink/meshlink/internal/key"
)

// ProtocolVersion is the version of this package's contract. It only grows.
const ProtocolVersion = 15

// VersionRequestAuth is the first version whose providers check
// Service.HTTPAuth (13): the coordinator does not list an older provider
// of a service with request rules or a jwt.
const VersionRequestAuth = 13

// Default addressing of a mesh. The node and service prefixes are disjoint
// (TestPrefixesDisjoint): a node address must never equal a service VIP.
// Until version 5 nodes had 100.96.0.0/12, which contains the service
// prefix; nodes are numbered from the start, so every address handed out
// before (the first 262,142) is inside the /14.
var (
	NodePrefix4   = netip.MustParsePrefix("100.96.0.0/14")
	NodePrefix6   = netip.MustParsePrefix("fd7a:6d65:7368::/48")
	ServicePrefix = netip.MustParsePrefix("100.100.0.0/16")
)

// DefaultDomain is the DNS suffix under which services and nodes are named.
const DefaultDomain = "mesh.internal"

// API paths, all served by the coordinator over HTTPS.
const (
	// PathRegister takes a RegisterRequest (authorised by a join token) and
	// answers a RegisterResponse.
	PathRegister = "/api/v1/register"
	// PathServerKey takes a ServerKeyRequest (no credentials) and answers
	// ServerKey: the coordinator's Curve25519 key, to which a registering
	// node seals its KeyProof. The pinned TLS certificate vouches for it.
	PathServerKey = "/api/v1/server-key"
	// PathMap takes a MapRequest (authorised by node credentials) and streams
	// newline-delimited MapResponse objects: first a full map, then deltas,
	// then keep-alives, until either side closes.
	PathMap = "/api/v1/map"
	// PathServices takes a ServiceRequest (node credentials): expose or
	// unexpose a service provided by the calling node.
	PathServices = "/api/v1/services"
	// PathEndpoints takes an EndpointsRequest (node credentials).
	PathEndpoints = "/api/v1/endpoints"
	// PathHealth takes a HealthReport (node credentials): the health of
	// the calling node's own exports (version 9). Rate-limited per node.
	PathHealth = "/api/v1/health"
	// PathTokenInspect takes a TokenInspectRequest and answers TokenInfo.
	PathTokenInspect = "/api/v1/token/inspect"
	// PathLeave takes a LeaveRequest (node credentials) and removes the node.
	PathLeave = "/api/v1/leave"
	// PathRegisterPoll takes a RegisterPollRequest and answers a
	// RegisterResponse once a person approved the node in the console, 202
	// with a RegisterPending while waiting (the call long-polls up to 30 s),
	// or 403 when the request was denied or expired.
	PathRegisterPoll = "/api/v1/register/poll"
	// PathStats takes a StatsReport (node credentials): the agent's
	// counters, for the console and metrics.
	PathStats = "/api/v1/stats"
	// PathRelayRegister takes a RelayRegisterRequest: a standalone relay
	// registers with a relay join token, or refreshes its record with relay
	// credentials (HeaderRelayID, HeaderRelaySecret). Answers
	// RelayRegisterResponse.
	PathRelayRegister = "/api/v1/relays/register"
	// PathRelayNodes takes a RelayNodesRequest (relay credentials) and
	// streams newline-delimited RelayNodes: the keys the relay may serve,
	// again on every change, and keep-alives. While it is open the relay is
	// listed in every network map.
	PathRelayNodes = "/api/v1/relays/nodes"
)

// Headers carrying node credentials on authenticated calls.
const (
	HeaderNodeID     = "Meshlink-Node-Id"
	HeaderNodeSecret = "Meshlink-Node-Secret"
	HeaderVersion    = "Meshlink-Version"
	// HeaderKeepAlive (version 15), on a map stream's response, is the
	// longest the coordinator leaves the stream silent, in seconds: a
	// keep-alive comes at least this often.
	HeaderKeepAlive = "Meshlink-Keep-Alive"
	// HeaderRelayID and HeaderRelaySecret carry a standalone relay's
	// credentials to the coordinator.
	HeaderRelayID     = "Meshlink-Relay-Id"
	HeaderRelaySecret = "Meshlink-Relay-Secret"
)

// RelayRegisterRequest registers or refreshes a standalone relay.
type RelayRegisterRequest struct {
	Version int `json:"version"`
	// TokenID and TokenSecret come from a relay join token; empty when the
	// call carries relay credentials.
	TokenID     string `json:"token_id,omitempty"`
	TokenSecret string `json:"token_secret,omitempty"`
	// Name identifies the relay; it is unique in the mesh.
	Name string `json:"name"`
	// URL, Fingerprint and Key are what agents need to reach the relay.
	URL         string     `json:"url"`
	Fingerprint string     `json:"fingerprint"`
	Key         key.Public `json:"key"`
}

// RelayRegisterResponse answers a RelayRegisterRequest.
type RelayRegisterResponse struct {
	ID uint64 `json:"id"`
	// Secret authenticates the relay's later calls (only its hash is kept);
	// empty when the call refreshed with existing credentials.
	Secret string `json:"secret,omitempty"`
}

// RelayNodesRequest opens the PathRelayNodes stream.
type RelayNodesRequest struct {
	Version int `json:"version"`
}

// RelayNodes is one message on the PathRelayNodes stream. Keys nil is a
// keep-alive; otherwise it is the whole set of node keys the relay may
// serve, replacing the previous one.
type RelayNodes struct {
	Keys []key.Public `json:"keys"`
}

// NodeID identifies a node for the lifetime of its registration.
type NodeID uint64

// RegisterRequest is sent by an agent to PathRegister to join a mesh.
type RegisterRequest struct {
	Version int `json:"version"`
	// TokenID and TokenSecret come from the join token.
	TokenID     string `json:"token_id"`
	TokenSecret string `json:"token_secret"`
	Name        string `json:"name"`
	Hostname    string `json:"hostname,omitempty"`
	// NodeKey is the node's WireGuard public key.
	NodeKey key.Public `json:"node_key"`
	// ListenPort is the node's WireGuard UDP port.
	ListenPort uint16 `json:"listen_port"`
	// LocalEndpoints are addresses of the node's own interfaces.
	LocalEndpoints []netip.AddrPort `json:"local_endpoints,omitempty"`
	// Interactive asks, when there is no token, for a person to approve
	// the node in the console (answered with RegisterPending).
	Interactive bool `json:"interactive,omitempty"`
	// KeyProof proves the node holds NodeKey's private key: base64 of a
	// NaCl box from NodeKey to the coordinator's ServerKey sealing
	// KeyProofMessage(Name, now). Needed to renew an existing node.
	KeyProof string `json:"key_proof,omitempty"`
}

// ServerKeyRequest asks for the coordinator's key (PathServerKey).
type ServerKeyRequest struct {
	Version int `json:"version"`
}

// ServerKey is the coordinator's Curve25519 public key.
type ServerKey struct {
	Key key.Public `json:"key"`
}

// KeyProofMaxAge bounds how far a KeyProof's time may be from the
// coordinator's clock, either way.
const KeyProofMaxAge = 5 * time.Minute

const keyProofLabel = "meshlink-register-v1"

// KeyProofMessage is what a KeyProof seals: a label, the node's name and a
// Unix time, so that a proof serves one name for a few minutes only.
func KeyProofMessage(name string, at time.Time) []byte {
	return fmt.Appendf(nil, "%s %s %d", keyProofLabel, name, at.Unix())
}

// CheckKeyProofMessage reports whether msg is KeyProofMessage(name, t) for
// a t within KeyProofMaxAge of now.
func CheckKeyProofMessage(msg []byte, name string, now time.Time) error {
	label, rest, _ := strings.Cut(string(msg), " ")
	gotName, unix, _ := strings.Cut(rest, " ")
	if label != keyProofLabel || gotName != name {
		return errors.New("key proof made for another name or purpose")
	}
	return checkProofTime(unix, now)
}

const rekeyProofLabel = "meshlink-rekey-v1"

// RekeyProofMessage is what MapRequest.OldKeyProof and NewKeyProof seal:
// a label, the node's name, both keys and a Unix time, so that a proof
// authorises this one change of this node for a few minutes only.
func RekeyProofMessage(name string, oldKey, newKey key.Public, at time.Time) []byte {
	return fmt.Appendf(nil, "%s %s %s %s %d", rekeyProofLabel, name, oldKey, newKey, at.Unix())
}

// CheckRekeyProofMessage reports whether msg is RekeyProofMessage(name,
// oldKey, newKey, t) for a t within KeyProofMaxAge of now.
func CheckRekeyProofMessage(msg []byte, name string, oldKey, newKey key.Public, now time.Time) error {
	f := strings.Split(string(msg), " ")
	if len(f) != 5 || f[0] != rekeyProofLabel || f[1] != name {
		return errors.New("key proof made for another name or purpose")
	}
	if f[2] != oldKey.String() || f[3] != newKey.String() {
		return errors.New("key proof made for another pair of keys")
	}
	return checkProofTime(f[4], now)
}

// checkProofTime checks a proof's Unix time against now.
func checkProofTime(unix string, now time.Time) error {
	sec, err := strconv.ParseInt(unix, 10, 64)
	if err != nil {
		return errors.New("key proof has no time")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > KeyProofMaxAge || d < -KeyProofMaxAge {
		return fmt.Errorf("key proof is %v off the coordinator's clock (at most %v); check the clocks", d.Round(time.Second), KeyProofMaxAge)
	}
	return nil
}

// RegisterPending answers a RegisterRequest with Interactive set and no
// token (HTTP 202): a person must open AuthURL, log in and approve the node.
type RegisterPending struct {
	// AuthURL is the console page where the node is approved.
	AuthURL string `json:"auth_url"`
	// PollID is the secret the agent polls PathRegisterPoll with; only the
	// agent knows it (the AuthURL carries a different code).
	PollID  string    `json:"poll_id"`
	Expires time.Time `json:"expires"`
}

// RegisterPollRequest asks whether a pending registration was approved.
type RegisterPollRequest struct {
	Version int    `json:"version"`
	PollID  string `json:"poll_id"`
}

// StatsReport carries an agent's counters (totals since the agent started).
type StatsReport struct {
	Version  int            `json:"version"`
	Services []ServiceStats `json:"services,omitempty"`
	Peers    []PeerStats    `json:"peers,omitempty"`
	// Denials (version 7) are the provider's recent refusals by policy,
	// most recent first, at most MaxDenials: the coordinator ignores a
	// report with more.
	Denials []Denial `json:"denials,omitempty"`
	// HTTP (version 14) are the node's HTTP request figures per edge, at
	// most MaxHTTPStats: the coordinator refuses a report with more.
	HTTP []HTTPStats `json:"http,omitempty"`
}

// MaxDenials bounds StatsReport.Denials.
const MaxDenials = 64

// MaxHTTPStats bounds StatsReport.HTTP: an agent keeps figures for at most
// this many (service, role, peer) edges and counts the rest nowhere.
const MaxHTTPStats = 256

// HTTPLatencyBounds are the upper bounds of HTTPStats.Buckets; the last
// bucket, one more than the bounds, counts what took longer. Fixed here so
// that every agent's buckets add up on the coordinator.
var HTTPLatencyBounds = [...]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// HTTPBuckets is the length of HTTPStats.Buckets.
const HTTPBuckets = len(HTTPLatencyBounds) + 1

// HTTPBucket is the index in HTTPStats.Buckets of a request that took d.
func HTTPBucket(d time.Duration) int {
	for i, b := range HTTPLatencyBounds {
		if d <= b {
			return i
		}
	}
	return len(HTTPLatencyBounds)
}

// HTTPStats counts the HTTP requests of one service between the reporting
// node and one peer, totals since the agent started.
type HTTPStats struct {
	Service string      `json:"service"`
	Role    ServiceRole `json:"role"`
	// Peer is the provider the requests went to (RoleConsumer) or the
	// consumer they came from (RoleProvider).
	Peer NodeID `json:"peer"`
	// Requests counts the requests answered or failed; Errors those
	// answered 5xx or not answered at all.
	Requests int64 `json:"requests"`
	Errors   int64 `json:"errors,omitempty"`
	// Buckets counts the requests by duration, bucket i holding those
	// that took at most HTTPLatencyBounds[i] and more than the bound
	// before (not cumulative); HTTPBuckets long, summing to Requests.
	Buckets []int64 `json:"buckets"`
}

// Check says what is wrong with h, as received from a node.
func (h *HTTPStats) Check() error {
	if h.Service == "" || len(h.Service) > 63 {
		return fmt.Errorf("http stats: service name %q is empty or longer than 63", h.Service)
	}
	if h.Role != RoleConsumer && h.Role != RoleProvider {
		return fmt.Errorf("http stats for %q: role %q is neither consumer nor provider", h.Service, h.Role)
	}
	if len(h.Buckets) != HTTPBuckets {
		return fmt.Errorf("http stats for %q: %d latency buckets, want %d", h.Service, len(h.Buckets), HTTPBuckets)
	}
	if h.Requests < 0 || h.Errors < 0 || h.Errors > h.Requests {
		return fmt.Errorf("http stats for %q: %d errors of %d requests", h.Service, h.Errors, h.Requests)
	}
	var sum int64
	for _, b := range h.Buckets {
		if b < 0 || sum+b < sum {
			return fmt.Errorf("http stats for %q: a latency bucket is negative or the buckets overflow", h.Service)
		}
		sum += b
	}
	if sum != h.Requests {
		return fmt.Errorf("http stats for %q: latency buckets count %d requests, not %d", h.Service, sum, h.Requests)
	}
	return nil
}

// Denial counts the connections from one node to one service that the
// reporting provider refused by policy.
type Denial struct {
	// Service is a service the reporting node provides.
	Service string `json:"service"`
	// Node is the source node.
	Node NodeID `json:"node"`
	// Count is how many were refused from First to Last (the agent's
	// clock). A series ends when the pair has been quiet for a while; the
	// next one has a new First and counts from 1 again.
	Count int64     `json:"count"`
	First time.Time `json:"first,omitzero"`
	Last  time.Time `json:"last,omitzero"`
}

// ServiceRole is which end of a service a node's counters are for.
type ServiceRole string

// The roles of ServiceStats.
const (
	RoleConsumer ServiceRole = "consumer" // local clients of a service the node consumes
	RoleProvider ServiceRole = "provider" // mesh clients of a service the node exports
)

// ServiceStats is one service as seen by one node.
type ServiceStats struct {
	Name          string      `json:"name"`
	Role          ServiceRole `json:"role"`
	Open          int64       `json:"open"`
	Total         int64       `json:"total"`
	Failed        int64       `json:"failed,omitempty"`
	Denied        int64       `json:"denied,omitempty"`
	BytesSent     int64       `json:"bytes_sent"`
	BytesReceived int64       `json:"bytes_received"`
	// LocalPort is set by a consumer that serves the service locally on
	// another port than the service's: its port is below 1024 and the agent
	// may not bind it, so it listens on port+10000. Older agents omit it.
	LocalPort uint16 `json:"local_port,omitempty"`
}

// PeerStats is the link to one peer as seen by one node.
type PeerStats struct {
	Node NodeID `json:"node"`
	// Path is "direct", "relay" or "none".
	Path         string `json:"path"`
	Endpoint     string `json:"endpoint,omitempty"`
	RTTMicros    int64  `json:"rtt_us,omitempty"`
	DirectBytes  uint64 `json:"direct_bytes"`
	RelayedBytes uint64 `json:"relayed_bytes"`
}

// RegisterResponse answers a RegisterRequest.
type RegisterResponse struct {
	Node Node `json:"node"`
	// NodeSecret authenticates later calls; the coordinator keeps only its
	// hash. The agent stores it 0600 in its state directory.
	NodeSecret string `json:"node_secret"`
	Domain     string `json:"domain"`
}

// MapRequest opens the network-map stream on PathMap.
type MapRequest struct {
	Version int `json:"version"`
	// ListenPort and LocalEndpoints refresh what RegisterRequest said.
	ListenPort     uint16           `json:"listen_port"`
	LocalEndpoints []netip.AddrPort `json:"local_endpoints,omitempty"`
	// NodeKey re-announces the node's key, or rotates it: a key other
	// than the stored one is taken only with both proofs below.
	NodeKey key.Public `json:"node_key"`
	// OldKeyProof and NewKeyProof (version 6) authorise a key change:
	// base64 of NaCl boxes to the coordinator's ServerKey, from the
	// node's current key and from NodeKey respectively, each sealing
	// RekeyProofMessage(name, current key, NodeKey, now). The node secret
	// alone is a bearer credential; a thief holding it must not be able to
	// move the node's addresses to a key of his own.
	OldKeyProof string `json:"old_key_proof,omitempty"`
	NewKeyProof string `json:"new_key_proof,omitempty"`
	// Region (version 9) is the node's region label, for services whose
	// policy prefers providers in the consumer's region; "" is none. Sent
	// on every stream, so a node restarted with another --region moves.
	Region string `json:"region,omitempty"`
	// MapIdle (version 15) is how long, in seconds, the agent waits on a
	// silent map stream before it gives up and reconnects. The coordinator
	// sends keep-alives at most half of it apart. 0 (agents before 15): 60.
	MapIdle int `json:"map_idle,omitempty"`
}

// DefaultMapIdle is how long an agent that does not say (MapRequest.MapIdle
// 0: before version 15) waits on a silent map stream.
const DefaultMapIdle = 60 * time.Second

// MapResponse is one message on the map stream. Exactly one of the shapes is
// used: Full is set on the first message (and whenever the coordinator
// decides to resync); otherwise the delta fields apply in order to the
// previous map. A message with none set is a keep-alive.
type MapResponse struct {
	// Seq increases by one per message carrying a change on this stream.
	Seq  uint64      `json:"seq"`
	Full *NetworkMap `json:"full,omitempty"`

	PeersChanged    []Node    `json:"peers_changed,omitempty"`
	PeersRemoved    []NodeID  `json:"peers_removed,omitempty"`
	ServicesChanged []Service `json:"services_changed,omitempty"`
	ServicesRemoved []string  `json:"services_removed,omitempty"`
	// Self is set when this node's own record changed.
	Self *Node `json:"self,omitempty"`
	// Relays, when not nil, replaces the map's relay list (it may point to
	// an empty list: no relay is available any more).
	Relays *[]Relay `json:"relays,omitempty"`
	// SentAt is the coordinator's clock when the message left, to measure
	// update latency.
	SentAt time.Time `json:"sent_at"`
}

// IsKeepAlive reports whether m carries nothing to apply.
func (m *MapResponse) IsKeepAlive() bool {
	return m.Full == nil && len(m.PeersChanged) == 0 && len(m.PeersRemoved) == 0 &&
		len(m.ServicesChanged) == 0 && len(m.ServicesRemoved) == 0 && m.Self == nil && m.Relays == nil
}

// Apply folds one map-stream message into nm: a Full map replaces it, deltas
// patch it in the order the fields are listed in MapResponse (removals
// before changes). A keep-alive changes nothing.
func (nm *NetworkMap) Apply(m *MapResponse) {
	if m.Full != nil {
		*nm = *m.Full
		return
	}
	if m.Self != nil {
		nm.Self = *m.Self
	}
	nm.Peers = patch(nm.Peers, m.PeersRemoved, m.PeersChanged, func(n Node) NodeID { return n.ID })
	nm.Services = patch(nm.Services, m.ServicesRemoved, m.ServicesChanged, func(s Service) string { return s.Name })
	if m.Relays != nil {
		nm.Relays = slices.Clone(*m.Relays)
	}
}

// patch removes the items whose key is in removed, then replaces or appends
// each of changed by key.
func patch[T any, K comparable](items []T, removed []K, changed []T, key func(T) K) []T {
	if len(removed) > 0 {
		gone := make(map[K]bool, len(removed))
		for _, k := range removed {
			gone[k] = true
		}
		items = slices.DeleteFunc(items, func(x T) bool { return gone[key(x)] })
	}
	for _, c := range changed {
		k := key(c)
		if i := slices.IndexFunc(items, func(x T) bool { return key(x) == k }); i >= 0 {
			items[i] = c
		} else {
			items = append(items, c)
		}
	}
	return items
}

// NetworkMap is everything a node knows about its mesh.
type NetworkMap struct {
	Self     Node      `json:"self"`
	Peers    []Node    `json:"peers"`
	Services []Service `json:"services"`
	Domain   string    `json:"domain"`
	// Relays carry WireGuard packets when no UDP path works, in order of
	// preference: the coordinator's embedded relay (unless disabled), then
	// the standalone relays online now.
	Relays []Relay `json:"relays,omitempty"`
	// Coordinators (version 11) are the base URLs of every coordinator
	// serving the mesh, the sending one first; all present the certificate
	// the node pinned. Empty: only the one the node talks to.
	Coordinators []string `json:"coordinators,omitempty"`
}

// Relay is a relay server agents may use.
type Relay struct {
	// Name is "coordinator" for the embedded relay, else the name the
	// standalone relay registered.
	Name string `json:"name"`
	// URL is https://host:port; the relay endpoint is URL+relay.Path.
	URL string `json:"url"`
	// Fingerprint pins the relay's certificate like a join token does.
	Fingerprint string `json:"fingerprint"`
	// Key is the relay's Curve25519 public key, to which nodes prove that
	// they hold their WireGuard keys.
	Key key.Public `json:"key"`
}

// Node is one site of the mesh.
type Node struct {
	ID       NodeID     `json:"id"`
	Name     string     `json:"name"`
	Hostname string     `json:"hostname,omitempty"`
	Key      key.Public `json:"key"`
	// Addresses are the node's mesh IPs (one IPv4, one IPv6), each a /32 or
	// /128 prefix; they are the node's AllowedIPs on every peer.
	Addresses []netip.Prefix `json:"addresses"`
	// Endpoints are UDP addresses where the node's WireGuard may be reached,
	// best first: the address the coordinator saw it from, then its own.
	Endpoints []netip.AddrPort `json:"endpoints,omitempty"`
	Online    bool             `json:"online"`
	LastSeen  time.Time        `json:"last_seen,omitempty"`
	Tags      []string         `json:"tags,omitempty"`
	Ephemeral bool             `json:"ephemeral,omitempty"`
	// KeyExpiry (version 7) is when the coordinator stops accepting Key:
	// the node must rotate it before (MapRequest with proofs), or it is
	// dropped from every map and must join again. Zero: never.
	KeyExpiry time.Time `json:"key_expiry,omitzero"`
	// Region is the label the node joined with (--region), "" if none.
	Region string `json:"region,omitempty"`
}

// KeyExpired reports whether n's key has expired at now.
func (n *Node) KeyExpired(now time.Time) bool {
	return !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry)
}

// Service is a named TCP service and the nodes providing it.
type Service struct {
	Name string `json:"name"`
	// VIP is stable for the service's name while it has a provider and
	// through the coordinator's --service-grace without one; after that
	// the service is deleted and its VIP may go to a new service.
	VIP netip.Addr `json:"vip"`
	// Port is the port consumers connect to locally.
	Port      uint16     `json:"port"`
	Providers []Provider `json:"providers"`
	// AllowedNodes lists who may connect; "*" is every node of the mesh,
	// otherwise the decimal IDs of the nodes the access policy lets in
	// (possibly none). Providers enforce it on every inbound connection.
	// Under a policy, a node's map holds only the services it may reach
	// or provides, and of one it only consumes AllowedNodes names itself.
	AllowedNodes []string `json:"allowed_nodes"`
	// Split (version 9), when set, shares new connections between the
	// providers' versions by these percentages (they sum to 100),
	// overriding the providers' weights. A version it does not name gets
	// none while a named one has a healthy provider.
	Split map[string]int `json:"split,omitempty"`
	// Locality (version 9) is LocalitySameSite or LocalitySameRegion:
	// consumers prefer providers on their own node or in their region,
	// failing over to the others when none of those is healthy.
	Locality string `json:"locality,omitempty"`
	// Affinity (version 9) is AffinityClient: a consumer sends every
	// connection of one client address to the same provider while the
	// set of healthy providers stays the same.
	Affinity string `json:"affinity,omitempty"`
	// Protocol (version 10) is what the providers carry together:
	// ProtocolTCP ("" too), ProtocolUDP or ProtocolTCPUDP.
	Protocol string `json:"protocol,omitempty"`
	// HTTPAuth (version 12), when set, is checked by the providers on
	// every request of an HTTP service (end-user JWT, request rules).
	HTTPAuth *HTTPAuth `json:"http_auth,omitempty"`
	// HTTP (version 12), when set, makes the service HTTP: consumers
	// parse requests at their local listener and carry each to a
	// provider of its own choosing, under this configuration.
	HTTP *ServiceHTTP `json:"http,omitempty"`
}

// Values of Service.Locality and Service.Affinity.
const (
	LocalitySameSite   = "prefer-same-site"
	LocalitySameRegion = "prefer-same-region"
	AffinityClient     = "client"
)

// Provider is one node's export of a service.
type Provider struct {
	Node NodeID `json:"node"`
	// Port is where the provider accepts the service on its mesh addresses.
	Port uint16 `json:"port"`
	// Priority (version 9): consumers send every new connection to the
	// healthy providers of the lowest priority, failing over to the next.
	Priority int `json:"priority,omitempty"`
	// Weight (version 9) is the provider's share among those of its
	// priority; 0 means DefaultWeight.
	Weight int `json:"weight,omitempty"`
	// Version (version 9) labels what the provider runs, for Service.Split.
	Version string `json:"version,omitempty"`
	// Health (version 9) is what the provider last reported of its
	// target: HealthUnhealthy, HealthHealthy, or "" (never reported, or
	// health checks off): consumers skip only unhealthy ones.
	Health string `json:"health,omitempty"`
	// HealthError says why the target is unhealthy ("connection refused").
	HealthError string `json:"health_error,omitempty"`
	// Protocol (version 10) is what the provider carries on Port:
	// ProtocolTCP (also ""), ProtocolUDP or ProtocolTCPUDP.
	Protocol string `json:"protocol,omitempty"`
	// UDPIdle (version 10) is the seconds a UDP flow to this provider
	// may go without a datagram before both ends forget it; 0 means
	// DefaultUDPIdle.
	UDPIdle int `json:"udp_idle,omitempty"`
}

// Values of Provider.Protocol and Service.Protocol.
const (
	ProtocolTCP    = "tcp"
	ProtocolUDP    = "udp"
	ProtocolTCPUDP = "tcp+udp"
	// ProtocolHTTP (version 12) is TCP carrying HTTP/1.1 or h2c. It is
	// what an agent asks for in ServiceRequest.Protocol and keeps in its
	// exports; maps list such a provider as TCP and set Service.HTTP.
	ProtocolHTTP = "http"
)

// Bounds of a UDP flow's idle timeout (Provider.UDPIdle).
const (
	DefaultUDPIdle = 60 * time.Second
	MaxUDPIdle     = 3600 // seconds
)

// ParseProtocol checks a protocol ("tcp", "udp", "tcp+udp", or "udp+tcp",
// in any case) and answers it in its canonical form; "" is ProtocolTCP.
func ParseProtocol(s string) (string, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", ProtocolTCP:
		return ProtocolTCP, nil
	case ProtocolUDP:
		return ProtocolUDP, nil
	case ProtocolTCPUDP, "udp+tcp":
		return ProtocolTCPUDP, nil
	case ProtocolHTTP:
		return ProtocolHTTP, nil
	}
	return "", fmt.Errorf("protocol %q must be tcp, udp, tcp+udp or http", s)
}

// HasTCP reports whether protocol p (a Provider's or Service's) carries
// TCP: "" does, for maps from before version 10, and HTTP does.
func HasTCP(p string) bool {
	return p == "" || p == ProtocolTCP || p == ProtocolTCPUDP || p == ProtocolHTTP
}

// HasUDP reports whether protocol p carries UDP.
func HasUDP(p string) bool { return p == ProtocolUDP || p == ProtocolTCPUDP }

// JoinProtocols is the protocol of a service whose providers carry ps.
func JoinProtocols(ps ...string) string {
	tcp, udp := false, false
	for _, p := range ps {
		tcp, udp = tcp || HasTCP(p), udp || HasUDP(p)
	}
	switch {
	case tcp && udp:
		return ProtocolTCPUDP
	case udp:
		return ProtocolUDP
	}
	return ProtocolTCP
}

// UDPIdleOf is the idle timeout of Provider.UDPIdle seconds.
func UDPIdleOf(seconds int) time.Duration {
	if seconds <= 0 {
		return DefaultUDPIdle
	}
	return time.Duration(min(seconds, MaxUDPIdle)) * time.Second
}

// Values of Provider.Health.
const (
	HealthHealthy   = "healthy"
	HealthUnhealthy = "unhealthy"
)

// Bounds of a provider's traffic settings.
const (
	DefaultWeight = 1
	MaxWeight     = 10000
	MaxPriority   = 1000
	// MaxHealthError bounds HealthError; longer reports are cut.
	MaxHealthError = 200
)

// ValidVersion reports whether s may label a provider's version: 1 to 32
// letters, digits, '.', '_' or '-'.
func ValidVersion(s string) error {
	if len(s) == 0 || len(s) > 32 {
		return fmt.Errorf("version %q must be 1 to 32 characters", s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("version %q may only hold letters, digits, '.', '_' and '-'", s)
		}
	}
	return nil
}

// ValidRegion reports whether s may be a node's region: a name like
// ValidName's ("eu-west-1").
func ValidRegion(s string) error {
	if err := ValidName(s); err != nil {
		return fmt.Errorf("region: %w", err)
	}
	return nil
}

// CheckTraffic validates a provider's priority, weight and version (a
// version may be empty).
func CheckTraffic(priority, weight int, version string) error {
	if priority < 0 || priority > MaxPriority {
		return fmt.Errorf("priority %d must be 0 to %d (lower is preferred)", priority, MaxPriority)
	}
	if weight < 0 || weight > MaxWeight {
		return fmt.Errorf("weight %d must be 1 to %d", weight, MaxWeight)
	}
	if version != "" {
		return ValidVersion(version)
	}
	return nil
}

// ServiceRequest exposes (Remove false) or unexposes a service of the calling node.
type ServiceRequest struct {
	Version int    `json:"version"`
	Name    string `json:"name"`
	Port    uint16 `json:"port"`
	Remove  bool   `json:"remove,omitempty"`
	// Priority, Weight and ServiceVersion (version 9) become the
	// provider's (Provider.Priority, Weight, Version).
	Priority       int    `json:"priority,omitempty"`
	Weight         int    `json:"weight,omitempty"`
	ServiceVersion string `json:"service_version,omitempty"`
	// Protocol and UDPIdle (version 10) become the provider's.
	Protocol string `json:"protocol,omitempty"`
	UDPIdle  int    `json:"udp_idle,omitempty"`
}

// HealthReport carries the health of the calling node's exports, whole:
// a service it does not provide is ignored. Sent on every change and
// whenever the map stream reconnects.
type HealthReport struct {
	Version  int             `json:"version"`
	Services []ServiceHealth `json:"services"`
}

// MaxHealthServices bounds the services of one HealthReport.
const MaxHealthServices = 256

// ServiceHealth is the health of one export's target.
type ServiceHealth struct {
	Name string `json:"name"`
	// Healthy is false when the target does not answer its check.
	Healthy bool   `json:"healthy"`
	Error   string `json:"error,omitempty"`
}

// ServiceResponse answers a ServiceRequest with the service as it now is
// (zero for a removal).
type ServiceResponse struct {
	Service Service `json:"service"`
}

// EndpointsRequest updates the calling node's reachable endpoints.
type EndpointsRequest struct {
	Version        int              `json:"version"`
	ListenPort     uint16           `json:"listen_port"`
	LocalEndpoints []netip.AddrPort `json:"local_endpoints,omitempty"`
}

// LeaveRequest removes the calling node from the mesh.
type LeaveRequest struct {
	Version int `json:"version"`
}

// TokenInspectRequest asks the coordinator about a token; the secret proves
// the caller holds it.
type TokenInspectRequest struct {
	TokenID     string `json:"token_id"`
	TokenSecret string `json:"token_secret"`
}

// TokenInfo describes a join token as the coordinator sees it.
type TokenInfo struct {
	ID        string    `json:"id"`
	Reusable  bool      `json:"reusable"`
	Ephemeral bool      `json:"ephemeral"`
	Tags      []string  `json:"tags,omitempty"`
	Expires   time.Time `json:"expires,omitempty"`
	// UsesLeft is -1 for a reusable token.
	UsesLeft int  `json:"uses_left"`
	Revoked  bool `json:"revoked,omitempty"`
	// Relay marks a token that registers a standalone relay.
	Relay bool `json:"relay,omitempty"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	// Code is a stable machine-readable reason, one of the ErrCode constants.
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error codes.
const (
	ErrCodeBadRequest   = "bad_request"
	ErrCodeTokenInvalid = "token_invalid"
	ErrCodeTokenExpired = "token_expired"
	ErrCodeTokenUsed    = "token_used"
	ErrCodeUnauthorized = "unauthorized"
	ErrCodeNotFound     = "not_found"
	ErrCodeConflict     = "conflict"
	ErrCodeVersion      = "version"
	ErrCodeInternal     = "internal"
	ErrCodeNameInUse    = "name_in_use"
	ErrCodePortInUse    = "port_in_use"
	ErrCodeNodeRemoved  = "node_removed"
	// ErrCodeNotOwner: the name belongs to another user (since version 5).
	ErrCodeNotOwner = "not_owner"
	// ErrCodeKeyExpired: the node's key expired before it was rotated;
	// the node must join again (since version 7).
	ErrCodeKeyExpired = "key_expired"
)

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// ValidName reports whether s may name a node or a service: a DNS label of
// lowercase letters, digits and '-', 1 to 63 characters, not starting or
// ending with '-'.
func ValidName(s string) error {
	if len(s) == 0 || len(s) > 63 {
		return errors.New("name must be 1 to 63 characters")
	}
	if s[0] == '-' || s[len(s)-1] == '-' {
		return fmt.Errorf("name %q must not start or end with '-'", s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("name %q may only hold lowercase letters, digits and '-'", s)
		}
	}
	return nil
}

// LocalProxyAddr maps a service VIP 100.100.X.Y to the loopback address
// 127.100.X.Y where the consuming agent listens in userspace mode.
func LocalProxyAddr(vip netip.Addr) netip.Addr {
	if !vip.Is4() {
		return netip.Addr{}
	}
	b := vip.As4()
	return netip.AddrFrom4([4]byte{127, b[1], b[2], b[3]})
}

// NormalizeName lowercases s and trims spaces; callers validate the result.
func NormalizeName(s string) string { return strings.ToLower(strings.TrimSpace(s)) }
