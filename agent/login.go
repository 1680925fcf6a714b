package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/wire"
)

// ErrNeedFingerprint is returned when the coordinator's certificate is not
// signed by a CA this host trusts and no --fingerprint was given.
type ErrNeedFingerprint struct {
	URL         string
	Fingerprint string
}

func (e *ErrNeedFingerprint) Error() string {
	return fmt.Sprintf("the coordinator at %s has a certificate no CA vouches for (self-signed?). Its SHA-256 fingerprint is\n  %s\ncompare it with the one the coordinator printed at start, then run again with --fingerprint %s",
		e.URL, e.Fingerprint, e.Fingerprint)
}

// probeFingerprint connects to the coordinator without verifying it, only
// to show the user the certificate they are asked to trust.
func probeFingerprint(ctx context.Context, rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("--coordinator %q: want https://host:port", rawURL)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "443")
	}
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true, ServerName: u.Hostname(), MinVersion: tls.VersionTLS13}}
	c, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return "", fmt.Errorf("coordinator %s unreachable: %w", rawURL, err)
	}
	defer c.Close()
	certs := c.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", errors.New("coordinator sent no certificate")
	}
	return wire.CertFingerprint(certs[0].Raw), nil
}

// postStatus posts body and returns the HTTP status and raw answer for 2xx;
// other statuses come back as *apiError.
func (c *controlClient) postStatus(ctx context.Context, path string, body any) (int, []byte, error) {
	req, err := c.newRequest(ctx, path, body)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}

// registerInteractive joins without a token: the coordinator answers with a
// console URL where a person logs in and approves this node; the agent
// prints it and waits for the approval.
func (a *Agent) registerInteractive(ctx context.Context) error {
	rawURL, fp := a.cfg.Coordinator, a.cfg.Fingerprint
	cc := newControlClient(rawURL, fp)
	req := wire.RegisterRequest{
		Version: wire.ProtocolVersion, Interactive: true,
		Name: a.cfg.Name, Hostname: a.cfg.Hostname, NodeKey: a.key.Public(),
		ListenPort: a.listenPort, LocalEndpoints: a.localEndpoints(),
	}
	a.noteJoining(rawURL)
	bo := a.retryBackoff()
	var pending wire.RegisterPending
	for {
		req.KeyProof = a.keyProof(ctx, cc)
		status, body, err := cc.postStatus(ctx, wire.PathRegister, req)
		if err == nil {
			if status == http.StatusAccepted && json.Unmarshal(body, &pending) == nil && pending.PollID != "" {
				break
			}
			return fmt.Errorf("agent: join: the coordinator answered %d without a login URL", status)
		}
		if fp == "" && isCertUnknown(err) {
			got, perr := probeFingerprint(ctx, rawURL)
			if perr != nil {
				return fmt.Errorf("agent: join: %w", perr)
			}
			return &ErrNeedFingerprint{URL: rawURL, Fingerprint: got}
		}
		if ctx.Err() != nil {
			return errors.New("agent: join: interrupted")
		}
		if isPermanent(err) {
			return fmt.Errorf("agent: join: %w", err)
		}
		d := bo.Next()
		a.noteRetry(rawURL, err, d)
		a.log.Warn("coordinator unreachable; will retry", "url", rawURL, "in", d.Round(time.Millisecond), "err", err)
		if !backoff.Sleep(ctx, d) {
			return fmt.Errorf("agent: join: %w", err)
		}
	}
	a.log.Warn("this node needs approval: open the URL, log in and approve it", "url", pending.AuthURL, "expires", pending.Expires.Format(time.RFC3339))
	if a.cfg.Out != nil {
		fmt.Fprintf(a.cfg.Out, "\nTo add this node (%s) to the mesh, open\n\n    %s\n\nlog in and approve it. Waiting...\n\n", a.cfg.Name, pending.AuthURL)
	}
	bo.Reset()
	for {
		status, body, err := cc.postStatus(ctx, wire.PathRegisterPoll, wire.RegisterPollRequest{Version: wire.ProtocolVersion, PollID: pending.PollID})
		if err == nil && status == http.StatusOK {
			var resp wire.RegisterResponse
			if err := json.Unmarshal(body, &resp); err != nil {
				return fmt.Errorf("agent: join: bad answer: %w", err)
			}
			a.log.Info("approved", "url", pending.AuthURL)
			return a.joined(resp, rawURL, fp, "")
		}
		if err == nil {
			continue // 202: still waiting; the call itself long-polls
		}
		if ctx.Err() != nil {
			return errors.New("agent: join: interrupted")
		}
		if isPermanent(err) {
			return fmt.Errorf("agent: join: %w", err)
		}
		d := bo.Next()
		a.noteRetry(rawURL, err, d)
		a.log.Warn("coordinator unreachable while waiting for approval; will retry", "in", d.Round(time.Millisecond), "err", err)
		if !backoff.Sleep(ctx, d) {
			return fmt.Errorf("agent: join: %w", err)
		}
	}
}

// isCertUnknown reports whether err is a TLS failure to verify the
// coordinator's certificate against the system's CAs.
func isCertUnknown(err error) bool {
	var ua x509UnknownAuthority
	var hn x509Hostname
	var ci x509CertInvalid
	var tv *tls.CertificateVerificationError
	return errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &tv)
}
