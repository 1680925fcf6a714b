// Package unixhttp is the client side of a local JSON-over-HTTP API on a
// Unix socket: the agent's local API (agent/localapi) and the
// coordinator's admin socket. Each API says how its errors read to a user;
// this package does the requests.
package unixhttp

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// maxAnswer bounds the answer read: the socket's owner is trusted, a bug
// in it should still not take the CLI's memory.
const maxAnswer = 16 << 20

// Config describes one API.
type Config struct {
	// Socket is the path of the Unix socket.
	Socket string
	// Host is the host name the requests carry; the socket ignores it.
	Host string
	// Name names the API in errors ("agent API"): "<Name>: bad answer: …".
	Name string
	// Unreachable turns an error of the exchange itself (no socket, nobody
	// listening, no permission, a connection cut) into the error the user
	// sees, telling them what to do.
	Unreachable func(err error) error
	// Refused turns an answer outside 2xx, with its body, into an error.
	Refused func(resp *http.Response, body []byte) error
}

// Client calls one API. Each call uses a connection of its own, so a
// Client holds nothing between calls and needs no Close.
type Client struct {
	cfg  Config
	http *http.Client
}

// New returns a client for the API cfg describes.
func New(cfg Config) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", cfg.Socket)
		},
		DisableKeepAlives: true,
	}
	return &Client{cfg: cfg, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// Do sends method to path with in as its JSON body (none if nil) and
// decodes a 2xx answer into out (unless nil).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+c.cfg.Host+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.cfg.Unreachable(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return c.cfg.Unreachable(err)
	}
	if resp.StatusCode/100 != 2 {
		return c.cfg.Refused(resp, raw)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("%s: bad answer: %w", c.cfg.Name, err)
		}
	}
	return nil
}
