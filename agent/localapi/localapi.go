// Package localapi is the agent's local API: JSON over HTTP on a Unix
// socket in the agent's state directory, used by the CLI (`meshlink status`,
// `services`, `expose`, `unexpose`). The socket is 0600: file permissions
// are the authentication.
package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/meshlink/meshlink/internal/unixhttp"
)

// SocketName is the socket's file name inside the state directory.
const SocketName = "api.sock"

// Paths served on the socket.
const (
	PathStatus   = "/v1/status"
	PathServices = "/v1/services"
	PathExpose   = "/v1/expose"
	PathUnexpose = "/v1/unexpose"
	PathPing     = "/v1/ping" // ?node=NAME&timeout=2s
	// PathRotateKey (POST) rotates the node's WireGuard key; answers
	// RotateKeyResponse once the coordinator took the new key.
	PathRotateKey = "/v1/rotate-key"
	// PathLeave (POST) takes a LeaveRequest: the node leaves the mesh, its
	// state is deleted and the agent stops. Answers LeaveResponse.
	PathLeave = "/v1/leave"
)

// Error codes of answers that callers tell apart (Error.Code).
const (
	// CodeNoPeer: the node named is not in this site's network map.
	CodeNoPeer = "no_peer"
	// CodeNoReply: the peer did not answer in time.
	CodeNoReply = "no_reply"
)

// ErrNoAgent is what every call fails with (errors.Is) when no agent
// listens on the state directory's socket.
var ErrNoAgent = errors.New("no agent is running")

// Status is the answer to PathStatus.
type Status struct {
	Self       Node   `json:"self"`
	ListenPort uint16 `json:"listen_port"`
	DNS        string `json:"dns,omitempty"`
	// DNSDomain is the mesh domain the DNS server answers for (with DNS;
	// `meshlink dns install` points the system resolver's split DNS at it).
	DNSDomain   string      `json:"dns_domain,omitempty"`
	Coordinator Coordinator `json:"coordinator"`
	// Relays are the relays of the network map, in order of preference.
	Relays []Relay `json:"relays"`
	Peers  []Peer  `json:"peers"`
}

// Relay is this site's connection to one relay.
type Relay struct {
	Name      string `json:"name"`
	URL       string `json:"url"`
	Connected bool   `json:"connected"`
	LastError string `json:"last_error,omitempty"`
	// Packet bytes this site sent and received over the relay.
	TxBytes uint64 `json:"tx_bytes"`
	RxBytes uint64 `json:"rx_bytes"`
}

// Node is this site.
type Node struct {
	ID        uint64           `json:"id"`
	Name      string           `json:"name"`
	Addresses []netip.Prefix   `json:"addresses"`
	Endpoints []netip.AddrPort `json:"endpoints,omitempty"`
	Key       string           `json:"key"`
	// KeyExpiry is when the coordinator stops accepting the key (the
	// agent rotates it before); zero: never.
	KeyExpiry time.Time `json:"key_expiry,omitzero"`
	// KeyExpired: the key expired before it was rotated; the coordinator
	// refuses the node and its peers dropped it: it must join again.
	KeyExpired bool `json:"key_expired,omitempty"`
}

// Coordinator is the state of the control connection.
type Coordinator struct {
	URL       string    `json:"url"`
	Connected bool      `json:"connected"`
	LastError string    `json:"last_error,omitempty"`
	LastMap   time.Time `json:"last_map,omitempty"`
	// Joining is true while the node has not joined yet (URL is the
	// coordinator it is joining).
	Joining bool `json:"joining,omitempty"`
	// RetryAt is when the next attempt to reach the coordinator is due
	// while it cannot be reached; zero when none is pending.
	RetryAt time.Time `json:"retry_at,omitzero"`
}

// Peer is another site as WireGuard sees it.
type Peer struct {
	ID            uint64         `json:"id"`
	Name          string         `json:"name"`
	Addresses     []netip.Prefix `json:"addresses"`
	Online        bool           `json:"online"`
	Endpoint      string         `json:"endpoint,omitempty"`
	LastHandshake time.Time      `json:"last_handshake,omitempty"`
	RxBytes       uint64         `json:"rx_bytes"`
	TxBytes       uint64         `json:"tx_bytes"`
	Key           string         `json:"key"`
	// KeyExpiry is when the peer's key expires (zero: never); past it
	// this site drops the peer even if the coordinator cannot tell it.
	KeyExpiry time.Time `json:"key_expiry,omitzero"`
	// Path is "direct" (Endpoint is the UDP address), "relay" (Relay is
	// the relay's name, RelayURL its URL) or "none".
	Path       string   `json:"path"`
	Relay      string   `json:"relay,omitempty"`
	RelayURL   string   `json:"relay_url,omitempty"`
	RTT        Duration `json:"rtt,omitempty"`
	Candidates []string `json:"candidates,omitempty"`
	// Bytes of WireGuard packets by path, both directions.
	DirectBytes  uint64 `json:"direct_bytes"`
	RelayedBytes uint64 `json:"relayed_bytes"`
}

// Duration is a time.Duration that reads well in JSON ("1.2ms").
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// PingResult is one pong answering `meshlink ping`.
type PingResult struct {
	Peer string   `json:"peer"`
	Path string   `json:"path"` // "direct 1.2.3.4:41641" or "relay NAME"
	RTT  Duration `json:"rtt"`
	// Direct is true for a pong over a direct UDP path.
	Direct bool `json:"direct,omitempty"`
	// IP is the peer's first mesh address.
	IP string `json:"ip,omitempty"`
}

// Services is the answer to PathServices.
type Services struct {
	Consumed []Service `json:"consumed"`
	Exported []Export  `json:"exported"`
}

// Service is a service this site can reach.
type Service struct {
	Name string     `json:"name"`
	VIP  netip.Addr `json:"vip"`
	// Local is where this site serves the service: its local address on
	// Port, or on FallbackPort when Port needs privileges the agent lacks.
	Local netip.AddrPort `json:"local"`
	// Port is the service's own port, as in the network map.
	Port uint16 `json:"port"`
	// FallbackPort is set when Local is not on Port: the port is below
	// 1024 and the agent may not bind it, so it serves Port+10000 instead
	// (proxy.FallbackPort). Note says how to get the real port.
	FallbackPort uint16     `json:"fallback_port,omitempty"`
	Note         string     `json:"note,omitempty"`
	Listening    bool       `json:"listening"`
	Error        string     `json:"error,omitempty"`
	Providers    []Provider `json:"providers"`
	Open         int64      `json:"open"`
	Total        int64      `json:"total"`
	Failed       int64      `json:"failed"`
	Sent         int64      `json:"sent_bytes"`
	Received     int64      `json:"received_bytes"`
	// Refused counts connections refused at once because no provider
	// was healthy; Refusing says why new ones would be refused now.
	Refused  int64  `json:"refused,omitempty"`
	Refusing string `json:"refusing,omitempty"`
	// Split, Locality and Affinity are the service's traffic policy.
	Split    map[string]int `json:"split,omitempty"`
	Locality string         `json:"locality,omitempty"`
	Affinity string         `json:"affinity,omitempty"`
	// Protocol is "tcp", "udp", "tcp+udp" or "http"; UDP, for a service with
	// UDP, counts its flows and datagrams.
	Protocol string    `json:"protocol,omitempty"`
	UDP      *UDPStats `json:"udp,omitempty"`
}

// UDPStats counts a UDP service's flows (one per client address at a
// consumer, per consumer socket at a provider) and datagrams.
type UDPStats struct {
	Flows      int64 `json:"flows"`       // open now
	FlowsTotal int64 `json:"flows_total"` // ever opened
	Sent       int64 `json:"sent"`        // datagrams toward the target
	Received   int64 `json:"received"`    // datagrams back
	// Dropped counts datagrams not carried (no provider, denied by
	// policy, over the flow bound, a failed send); Evicted flows closed
	// to make room for a new client.
	Dropped int64 `json:"dropped"`
	Evicted int64 `json:"evicted"`
}

// Provider is one site providing a service.
type Provider struct {
	Name      string `json:"name"`
	Addr      string `json:"addr"`
	Local     bool   `json:"local,omitempty"`
	Online    bool   `json:"online"`
	Healthy   bool   `json:"healthy"`
	Open      int64  `json:"open"`
	LastError string `json:"last_error,omitempty"`
	// Health says whether new connections go there: "ok", "unhealthy
	// (connection refused)", "not answering (…)".
	Health   string `json:"health,omitempty"`
	Priority int    `json:"priority"`
	Weight   int    `json:"weight"`
	Version  string `json:"version,omitempty"`
	Region   string `json:"region,omitempty"`
	// Selected counts the connections it took; Share is its fraction of
	// the service's last 1000.
	Selected int64   `json:"selected"`
	Share    float64 `json:"share"`
}

// Export is a service this site provides.
type Export struct {
	Name      string `json:"name"`
	Target    string `json:"target"`
	Port      uint16 `json:"port"`
	Announced bool   `json:"announced"`
	Open      int64  `json:"open"`
	Total     int64  `json:"total"`
	Denied    int64  `json:"denied"`
	Failed    int64  `json:"failed"`
	Sent      int64  `json:"sent_bytes"`
	Received  int64  `json:"received_bytes"`
	LastError string `json:"last_error,omitempty"`
	Priority  int    `json:"priority,omitempty"`
	Weight    int    `json:"weight,omitempty"`
	Version   string `json:"version,omitempty"`
	// HealthCheck is how the target is checked ("tcp", "http:/healthz",
	// "none"); Health is the last result: "ok", "unhealthy (why)", or ""
	// before the first check and with checks off.
	HealthCheck string `json:"health_check,omitempty"`
	Health      string `json:"health,omitempty"`
	// Protocol is "tcp", "udp", "tcp+udp" or "http"; UDPIdle the seconds a UDP
	// flow may be idle (0: the default, 60); UDP counts its flows.
	Protocol string    `json:"protocol,omitempty"`
	UDPIdle  int       `json:"udp_idle,omitempty"`
	UDP      *UDPStats `json:"udp,omitempty"`
	// Source is SourceFlag for an export the agent's --expose flags set,
	// SourceRuntime for one added with `meshlink expose` (saved in the
	// state directory).
	Source string `json:"source,omitempty"`
}

// Sources of an export.
const (
	SourceFlag    = "flag"
	SourceRuntime = "runtime"
	// SourceFile is an export read from --expose-from-file.
	SourceFile = "file"
)

// ExposeRequest asks the agent to export a service.
type ExposeRequest struct {
	Name   string `json:"name"`
	Target string `json:"target"`
	Port   uint16 `json:"port,omitempty"`
	// Priority, Weight, Version and Health (a health spec) are how
	// consumers choose this provider and how its target is checked.
	Priority int    `json:"priority,omitempty"`
	Weight   int    `json:"weight,omitempty"`
	Version  string `json:"version,omitempty"`
	Health   string `json:"health,omitempty"`
	// Protocol is "tcp" (also ""), "udp", "tcp+udp" or "http"; UDPIdle the
	// seconds a UDP flow may be idle (0: the default).
	Protocol string `json:"protocol,omitempty"`
	UDPIdle  int    `json:"udp_idle,omitempty"`
	// Replace lets Target replace the target of a service this site
	// already exports; without it that is refused.
	Replace bool `json:"replace,omitempty"`
}

// ExposeResponse tells what happened.
type ExposeResponse struct {
	Export Export `json:"export"`
	// Note is set when the export is saved but not yet announced.
	Note string `json:"note,omitempty"`
	// Warning is set when the target did not answer a check just now.
	Warning string `json:"warning,omitempty"`
}

// UnexposeRequest asks the agent to stop exporting a service.
type UnexposeRequest struct {
	Name string `json:"name"`
}

// Error is the body of every error answer, and the error a Client
// returns for one.
type Error struct {
	Message string `json:"message"`
	// Code, if set, is one of the Code constants.
	Code string `json:"code,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// LeaveRequest asks the agent to leave the mesh.
type LeaveRequest struct {
	// Force deletes the node's state even if the coordinator cannot be
	// told (the node then stays listed there until removed).
	Force bool `json:"force,omitempty"`
}

// LeaveResponse answers PathLeave.
type LeaveResponse struct {
	Name string `json:"name"`
	Note string `json:"note,omitempty"`
}

// noAgentError is ErrNoAgent for one state directory.
type noAgentError struct{ dir string }

func (e *noAgentError) Error() string {
	return fmt.Sprintf("no agent is running with --state %s; start one with `meshlink agent --state %s`", e.dir, e.dir)
}

func (e *noAgentError) Is(target error) bool { return target == ErrNoAgent }

// Client talks to an agent's socket.
type Client struct {
	api *unixhttp.Client
}

// NewClient returns a client for the agent whose state directory is dir.
func NewClient(dir string) *Client {
	return &Client{api: unixhttp.New(unixhttp.Config{
		Socket: filepath.Join(dir, SocketName),
		Host:   "agent",
		Name:   "agent API",
		Unreachable: func(err error) error {
			if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
				return &noAgentError{dir}
			}
			if errors.Is(err, os.ErrPermission) {
				return fmt.Errorf("cannot reach the agent with --state %s: %w (run as the agent's user)", dir, err)
			}
			return fmt.Errorf("agent API: %w", err)
		},
		Refused: func(resp *http.Response, body []byte) error {
			var e Error
			if json.Unmarshal(body, &e) == nil && e.Message != "" {
				return &e
			}
			return fmt.Errorf("agent API answered %s", resp.Status)
		},
	})}
}

// Status returns the agent's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.api.Do(ctx, http.MethodGet, PathStatus, nil, &s)
}

// Services returns what the agent consumes and exports.
func (c *Client) Services(ctx context.Context) (*Services, error) {
	var s Services
	return &s, c.api.Do(ctx, http.MethodGet, PathServices, nil, &s)
}

// Expose exports a service.
func (c *Client) Expose(ctx context.Context, r ExposeRequest) (*ExposeResponse, error) {
	var out ExposeResponse
	return &out, c.api.Do(ctx, http.MethodPost, PathExpose, r, &out)
}

// Unexpose stops exporting a service.
func (c *Client) Unexpose(ctx context.Context, name string) error {
	return c.api.Do(ctx, http.MethodPost, PathUnexpose, UnexposeRequest{Name: name}, nil)
}

// Ping sends one round of disco pings to node over every path.
func (c *Client) Ping(ctx context.Context, node string, timeout time.Duration) ([]PingResult, error) {
	var out []PingResult
	q := url.Values{"node": {node}, "timeout": {timeout.String()}}
	// Not "return out, Do(…, &out)": the spec leaves open whether out is
	// read before or after the call fills it.
	err := c.api.Do(ctx, http.MethodGet, PathPing+"?"+q.Encode(), nil, &out)
	return out, err
}

// RotateKeyResponse answers PathRotateKey.
type RotateKeyResponse struct {
	// Key is the node's new public key.
	Key string `json:"key"`
}

// RotateKey asks the agent to rotate its node key.
func (c *Client) RotateKey(ctx context.Context) (*RotateKeyResponse, error) {
	var out RotateKeyResponse
	return &out, c.api.Do(ctx, http.MethodPost, PathRotateKey, struct{}{}, &out)
}

// Leave asks the agent to leave the mesh and delete its state.
func (c *Client) Leave(ctx context.Context, force bool) (*LeaveResponse, error) {
	var out LeaveResponse
	return &out, c.api.Do(ctx, http.MethodPost, PathLeave, LeaveRequest{Force: force}, &out)
}
