package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/dns/sysresolver"
	"github.com/meshlink/meshlink/wire"
)

// dnsCmd is `meshlink dns install|uninstall`: split DNS for the mesh domain
// in the host's resolver, pointed at a running agent's DNS server.
func dnsCmd() *cli.Command {
	flags := func(install bool) []cli.Flag {
		fs := []cli.Flag{
			stateFlag(),
			&cli.BoolFlag{Name: "dry-run", Usage: "print what would be written and run, change nothing (needs no root)", EnvVars: env("DNS_DRY_RUN")},
			&cli.StringFlag{Name: "method", Value: "auto", Usage: "auto, systemd-resolved, resolver (macOS /etc/resolver) or dnsmasq (print the lines to add)", EnvVars: env("DNS_METHOD")},
			&cli.StringFlag{Name: "domain", Usage: "the mesh domain (default: the running agent's, else " + wire.DefaultDomain + ")", EnvVars: env("DNS_DOMAIN")},
		}
		if install {
			fs = append(fs, &cli.StringFlag{Name: "dns", Usage: "the agent's DNS address IP:PORT (default: asked of the agent running with --state)", EnvVars: env("DNS_ADDR")})
		}
		return fs
	}
	return &cli.Command{
		Name:  "dns",
		Usage: "make the host's resolver send the mesh domain to the agent's DNS (split DNS)",
		Subcommands: []*cli.Command{
			{
				Name:  "install",
				Usage: "configure split DNS for the mesh domain (run once, as root; --dry-run shows what it does)",
				Flags: flags(true),
				Action: func(c *cli.Context) error {
					cfg, err := sysresolverConfig(c, true)
					if err != nil {
						return err
					}
					p, err := sysresolver.Install(cfg)
					if err != nil {
						return err
					}
					return applyPlan(c, p, fmt.Sprintf("names under %s now go to %s", cfg.Domain, cfg.Addr))
				},
			},
			{
				Name:  "uninstall",
				Usage: "remove what `meshlink dns install` configured",
				Flags: flags(false),
				Action: func(c *cli.Context) error {
					cfg, err := sysresolverConfig(c, false)
					if err != nil {
						return err
					}
					p, err := sysresolver.Uninstall(cfg)
					if err != nil {
						return err
					}
					return applyPlan(c, p, "split DNS for "+cfg.Domain+" removed")
				},
			},
		},
	}
}

// sysresolverConfig learns the agent's DNS address and domain from the
// flags, else from the agent running with --state. Uninstall needs only
// the domain, and works with the agent stopped.
func sysresolverConfig(c *cli.Context, needAddr bool) (sysresolver.Config, error) {
	cfg := sysresolver.Config{Domain: c.String("domain")}
	if m := c.String("method"); m != "auto" {
		cfg.Method = sysresolver.Method(m)
	}
	if s := c.String("dns"); s != "" {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return cfg, fmt.Errorf("--dns %q: want the agent's DNS address as IP:PORT, e.g. 127.0.0.1:5353", s)
		}
		cfg.Addr = ap
	}
	if cfg.Addr.IsValid() && cfg.Domain != "" || !needAddr && cfg.Domain != "" {
		return cfg, nil
	}
	st, err := newLocalClient(c).Status(c.Context)
	switch {
	case err != nil && needAddr && !cfg.Addr.IsValid():
		return cfg, fmt.Errorf("%w; or give the agent's DNS address with --dns IP:PORT", err)
	case err != nil:
		cfg.Domain = wire.DefaultDomain
		return cfg, nil
	}
	if cfg.Domain == "" {
		cfg.Domain = st.DNSDomain
		if cfg.Domain == "" {
			cfg.Domain = wire.DefaultDomain
		}
	}
	if needAddr && !cfg.Addr.IsValid() {
		if st.DNS == "" {
			return cfg, fmt.Errorf("the agent with --state %s serves no DNS (--dns off); restart it with --dns 127.0.0.1:5353, or give --dns IP:PORT", c.String("state"))
		}
		ap, err := netip.ParseAddrPort(st.DNS)
		if err != nil {
			return cfg, fmt.Errorf("the agent reports DNS address %q: %w; give --dns IP:PORT", st.DNS, err)
		}
		cfg.Addr = ap
	}
	return cfg, nil
}

// applyPlan prints the plan (--dry-run) or carries it out.
func applyPlan(c *cli.Context, p sysresolver.Plan, done string) error {
	if c.Bool("dry-run") {
		fmt.Printf("method: %s (dry run: nothing changed)\n%s", p.Method, p)
		return nil
	}
	if p.Manual != "" && len(p.Write)+len(p.Remove)+len(p.Run) == 0 {
		fmt.Print(p.Manual)
		return nil
	}
	run := func(ctx context.Context, argv []string) error {
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		return cmd.Run()
	}
	if err := p.Apply(c.Context, run); err != nil {
		return err
	}
	fmt.Print(p)
	if len(p.Write)+len(p.Remove) > 0 {
		fmt.Println(done)
	}
	return nil
}
