package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/wire"
)

// controlClient talks to the coordinator over HTTPS pinned to one
// certificate fingerprint. A mesh served by several coordinators (on one
// database) gives it several URLs: it uses one until failover moves it to
// the next.
type controlClient struct {
	http   *http.Client
	nodeID wire.NodeID
	secret string

	mu   sync.Mutex // guards the fields below
	urls []string   // every coordinator known, the one in use at cur
	cur  int
}

func newControlClient(url, fingerprint string, more ...string) *controlClient {
	tlsConf := wire.PinnedTLSConfig(fingerprint)
	tlsConf.MinVersion = tls.VersionTLS13
	tr := &http.Transport{
		TLSClientConfig:       tlsConf,
		ForceAttemptHTTP2:     true,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
	}
	c := &controlClient{http: &http.Client{Transport: tr}}
	c.setURLs(append([]string{url}, more...))
	return c
}

// base is the URL of the coordinator in use.
func (c *controlClient) base() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.urls) == 0 {
		return ""
	}
	return c.urls[c.cur]
}

// all returns every coordinator URL known, the one in use first.
func (c *controlClient) all() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := append([]string(nil), c.urls[c.cur:]...)
	return append(out, c.urls[:c.cur]...)
}

// failover moves to the next coordinator, if there is another, and
// returns its URL.
func (c *controlClient) failover() (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.urls) < 2 {
		return "", false
	}
	c.cur = (c.cur + 1) % len(c.urls)
	return c.urls[c.cur], true
}

// setURLs replaces the coordinators known (a map's list), keeping the one
// in use if it is still listed, and reports whether the list changed.
func (c *controlClient) setURLs(urls []string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	var clean []string
	for _, u := range urls {
		if u = strings.TrimRight(u, "/"); u != "" && !slices.Contains(clean, u) {
			clean = append(clean, u)
		}
	}
	if len(clean) == 0 {
		return false
	}
	var inUse string
	if len(c.urls) > 0 {
		inUse = c.urls[c.cur]
	}
	if slices.Equal(clean, c.urls) {
		return false
	}
	c.urls, c.cur = clean, 0
	if i := slices.Index(clean, inUse); i >= 0 {
		c.cur = i
	}
	return true
}

var errFingerprint = wire.ErrFingerprint

// apiError is a wire.Error with its HTTP status.
type apiError struct {
	Status  int
	Code    string
	Message string
}

func (e *apiError) Error() string { return e.Message + " (" + e.Code + ")" }

// permanent reports whether retrying cannot help.
func (e *apiError) permanent() bool {
	return e.Status >= 400 && e.Status < 500 && e.Status != http.StatusTooManyRequests && e.Status != http.StatusRequestTimeout
}

func isPermanent(err error) bool {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae.permanent()
	}
	return errors.Is(err, errFingerprint)
}

var errNotJoined = errors.New("not joined to a coordinator yet")

func (c *controlClient) newRequest(ctx context.Context, path string, body any) (*http.Request, error) {
	if c.http == nil {
		return nil, errNotJoined
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base()+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(wire.HeaderVersion, strconv.Itoa(wire.ProtocolVersion))
	if c.nodeID != 0 {
		req.Header.Set(wire.HeaderNodeID, strconv.FormatUint(uint64(c.nodeID), 10))
		req.Header.Set(wire.HeaderNodeSecret, c.secret)
	}
	return req, nil
}

func (c *controlClient) do(req *http.Request) (*http.Response, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, errFingerprint) || isFingerprintErr(err) {
			return nil, errFingerprint
		}
		return nil, fmt.Errorf("coordinator %s://%s unreachable: %w", req.URL.Scheme, req.URL.Host, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		ae := &apiError{Status: resp.StatusCode}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		var we wire.Error
		if json.Unmarshal(b, &we) != nil || we.Code == "" {
			we.Code = wire.ErrCodeInternal
			we.Message = fmt.Sprintf("coordinator answered %s", resp.Status)
		}
		ae.Code, ae.Message = we.Code, we.Message
		return nil, ae
	}
	return resp, nil
}

func isFingerprintErr(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if e.Error() == errFingerprint.Error() {
			return true
		}
	}
	// crypto/tls wraps the callback's error in a way errors.Is cannot see
	// through on every Go version; match the text as a last resort.
	return bytes.Contains([]byte(err.Error()), []byte(errFingerprint.Error()))
}

// call posts body to path and decodes the answer into out (which may be nil).
func (c *controlClient) call(ctx context.Context, path string, body, out any) error {
	req, err := c.newRequest(ctx, path, body)
	if err != nil {
		return err
	}
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
		return fmt.Errorf("coordinator sent a bad answer to %s: %w", path, err)
	}
	return nil
}

// streamIdle is how long a map stream may stay silent, for an agent that
// waits at most idle and a coordinator that named keepAlive (its
// wire.HeaderKeepAlive: whole seconds) as its interval: twice that and
// 15s, when shorter. A coordinator before protocol version 15 names none
// and sends keep-alives every 30s at most, for agents that waited 60s; so
// does one whose header does not parse.
func streamIdle(idle time.Duration, keepAlive string) time.Duration {
	n, err := strconv.Atoi(keepAlive)
	if err != nil || n < 1 || n > 24*3600 {
		return min(idle, wire.DefaultMapIdle)
	}
	return min(idle, 2*time.Duration(n)*time.Second+15*time.Second)
}

// maxMapLine bounds one network-map message.
const maxMapLine = 64 << 20

// streamMap opens the map stream and calls fn for each message until the
// stream ends, ctx is done, or nothing (not even a keep-alive) arrives within
// idle, or within twice the keep-alive interval the coordinator names and
// 15s when that is shorter. fn is called with the first message before
// streamMap returns nil for "connected".
func (c *controlClient) streamMap(ctx context.Context, mr wire.MapRequest, idle time.Duration, fn func(*wire.MapResponse) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := c.newRequest(ctx, wire.PathMap, mr)
	if err != nil {
		return err
	}
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	idle = streamIdle(idle, resp.Header.Get(wire.HeaderKeepAlive))

	// A watchdog cancels the stream when it goes silent: a coordinator that
	// vanished without a FIN must not leave us waiting forever.
	alive := make(chan struct{}, 1)
	watchdogDone := make(chan struct{})
	go func() {
		defer close(watchdogDone)
		t := time.NewTimer(idle)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-alive:
				if !t.Stop() {
					select {
					case <-t.C:
					default:
					}
				}
				t.Reset(idle)
			case <-t.C:
				cancel()
				return
			}
		}
	}()
	defer func() { cancel(); <-watchdogDone }()

	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), maxMapLine)
	for sc.Scan() {
		select {
		case alive <- struct{}{}:
		default:
		}
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var m wire.MapResponse
		if err := json.Unmarshal(line, &m); err != nil {
			return fmt.Errorf("coordinator sent a malformed map message: %w", err)
		}
		if err := fn(&m); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		if ctx.Err() != nil && !errors.Is(context.Cause(ctx), context.Canceled) {
			return err
		}
		return fmt.Errorf("map stream: %w", err)
	}
	return errors.New("map stream closed by the coordinator")
}

// retryBackoff spaces the agent's retries towards the coordinator: RetryMin
// doubling to RetryMax, ±20% so that a fleet does not reconnect in lockstep.
func (a *Agent) retryBackoff() *backoff.Backoff {
	return &backoff.Backoff{Min: a.cfg.RetryMin, Max: a.cfg.RetryMax, Jitter: backoff.Spread(0.2)}
}

// maxReconnectSpread caps the window of the first reconnect after an
// established map stream ends.
const maxReconnectSpread = 10 * time.Second

// reconnectDelay is the wait before the first reconnect after an
// established map stream ended: when the coordinator restarts or drops
// every stream at once, the whole fleet lost it in the same instant, and
// RetryMin ±20% would bring it back in one wave of TLS handshakes. A
// random point of [RetryMin/2, RetryMax/2] (at most maxReconnectSpread;
// 0.5 to 10 s by default) spreads it; later attempts back off as usual.
func (a *Agent) reconnectDelay() time.Duration {
	lo := a.cfg.RetryMin / 2
	hi := min(a.cfg.RetryMax/2, maxReconnectSpread)
	if hi <= lo {
		return a.cfg.RetryMin
	}
	return lo + rand.N(hi-lo)
}

// keyProof proves to the coordinator that this agent holds its node key
// (wire.RegisterRequest.KeyProof), which renewing an existing node needs.
// It is "" when the coordinator's key cannot be had: the registration then
// goes ahead without, and says why if the coordinator needs it.
func (a *Agent) keyProof(ctx context.Context, cc *controlClient) string {
	var sk wire.ServerKey
	if err := cc.call(ctx, wire.PathServerKey, wire.ServerKeyRequest{Version: wire.ProtocolVersion}, &sk); err != nil || sk.Key.IsZero() {
		a.log.Debug("no coordinator key for a key proof", "err", err)
		return ""
	}
	return base64.StdEncoding.EncodeToString(a.key.SealTo(sk.Key, wire.KeyProofMessage(wire.NormalizeName(a.cfg.Name), time.Now())))
}

// InspectToken asks the token's coordinator (pinned by the token) about it.
func InspectToken(ctx context.Context, t wire.JoinToken) (wire.TokenInfo, error) {
	var info wire.TokenInfo
	cc := newControlClient(t.URL, t.Fingerprint)
	err := cc.call(ctx, wire.PathTokenInspect, wire.TokenInspectRequest{TokenID: t.ID, TokenSecret: t.Secret}, &info)
	return info, err
}
