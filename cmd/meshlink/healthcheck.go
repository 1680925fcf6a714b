package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/urfave/cli/v2"
)

// defaultHealthURL is the coordinator's /healthz as a container of the
// image reaches it (docker's HEALTHCHECK runs in the container).
const defaultHealthURL = "https://127.0.0.1:8443/healthz"

// healthcheckCmd is the image's HEALTHCHECK: distroless has no shell or
// curl, so the one binary asks its own health endpoint.
func healthcheckCmd() *cli.Command {
	return &cli.Command{
		Name:      "healthcheck",
		Usage:     "exit 0 when a health endpoint answers 200 (the container image's HEALTHCHECK)",
		ArgsUsage: "[URL]",
		Description: "URL defaults to --url: the coordinator's " + defaultHealthURL + "; for an agent\n" +
			"give its --health-listen, http://127.0.0.1:9099/healthz. A loopback HTTPS URL is not\n" +
			"verified (the coordinator's certificate is often self-signed); any other is.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "url", Value: defaultHealthURL, Usage: "health endpoint to ask", EnvVars: env("HEALTHCHECK_URL")},
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "time the endpoint has to answer", EnvVars: env("HEALTHCHECK_TIMEOUT")},
		},
		Action: func(c *cli.Context) error {
			raw := c.String("url")
			if c.NArg() > 1 {
				return usageErrorf("meshlink healthcheck: give one URL, not %d", c.NArg())
			}
			if c.NArg() == 1 {
				raw = c.Args().First()
			}
			return healthcheck(c.Context, raw, c.Duration("timeout"))
		},
	}
}

// healthcheck GETs raw and fails unless it answers 200.
func healthcheck(ctx context.Context, raw string, timeout time.Duration) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return usageErrorf("meshlink healthcheck: %q is not an http(s) URL; give one such as http://127.0.0.1:9099/healthz", raw)
	}
	tr := &http.Transport{Proxy: nil}
	if ip := net.ParseIP(u.Hostname()); u.Scheme == "https" && (u.Hostname() == "localhost" || ip != nil && ip.IsLoopback()) {
		// Only this host's own process can answer on loopback; nothing
		// secret is sent.
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck %s: %w", u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck %s: %s %s", u, resp.Status, body)
	}
	return nil
}
