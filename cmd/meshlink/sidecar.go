package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
)

// agentSidecarFlags are the agent's flags for sidecar and gateway mode
// (docs/sidecar.md): health endpoints, the drain on SIGTERM, and exports
// read from a file.
func agentSidecarFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "health-listen", Usage: "serve /healthz (alive) and /readyz (joined, map received, listeners up) over plain HTTP on this address, e.g. 127.0.0.1:9099; default off", EnvVars: env("HEALTH_LISTEN")},
		&cli.DurationFlag{Name: "drain-timeout", Value: 10 * time.Second, Usage: "on SIGTERM, how long open connections may take to end before they are closed (new inbound ones are refused meanwhile); an ephemeral node then leaves the mesh", EnvVars: env("DRAIN_TIMEOUT")},
		&cli.StringFlag{Name: "expose-from-file", Usage: "export the services listed in this YAML file (- name: db / target: HOST:PORT / port: N), read again when it changes; a bad version keeps the last good one", EnvVars: env("EXPOSE_FROM_FILE")},
	}
}

// sidecarConfig adds the sidecar flags to the agent's configuration.
func sidecarConfig(c *cli.Context, cfg *agent.Config) error {
	if d := c.Duration("drain-timeout"); d < 0 {
		return fmt.Errorf("--drain-timeout %v must not be negative; use 0 to close open connections at once", d)
	}
	cfg.HealthListen = c.String("health-listen")
	cfg.ExposeFile = c.String("expose-from-file")
	return nil
}

// stopAgent is the agent's end on SIGTERM or SIGINT: drain, leave if
// ephemeral, close (agent.Shutdown). A failure to leave is logged, not
// returned: the coordinator reaps an ephemeral node after its grace, and
// the exit status stays 0 for the kubelet.
func stopAgent(a *agent.Agent, drain time.Duration, log *slog.Logger) error {
	start := time.Now()
	// Bounded beyond the drain: leaving takes at most a few seconds more.
	ctx, cancel := context.WithTimeout(context.Background(), drain+10*time.Second)
	defer cancel()
	res, err := a.Shutdown(ctx, drain)
	if err != nil {
		log.Warn("could not leave the mesh; the coordinator removes this ephemeral node after its grace period", "err", err)
	}
	log.Info("stopped", "drained", res.Drained, "connections_cut", res.Cut, "left", res.Left, "took", time.Since(start).Round(time.Millisecond))
	return nil
}
