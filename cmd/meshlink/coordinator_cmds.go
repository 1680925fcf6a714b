//go:build !agentonly

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/memtrim"
	"github.com/meshlink/meshlink/wire"
)

// The coordinator side's commands; an agent-only build (-tags agentonly)
// has the stand-ins of agentonly.go instead, which say where they are.

// agentOnlyBuild is true in the agent-only build.
const agentOnlyBuild = false

func coordinatorCmd() *cli.Command {
	return &cli.Command{
		Name:  "coordinator",
		Usage: "run the coordinator (control plane) in the foreground",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:8443", Usage: "HTTPS listen address", EnvVars: env("LISTEN")},
			&cli.StringFlag{Name: "data", Value: "./meshlink-coordinator", Usage: "data directory (database, certificate, admin socket)", EnvVars: env("DATA")},
			&cli.StringFlag{Name: "store", Usage: "database: sqlite:PATH, or postgres://USER@HOST:PORT/DATABASE shared by several coordinators (default: meshlink.db in --data; prefer MESHLINK_STORE or PGPASSWORD for a password)", EnvVars: env("STORE")},
			&cli.StringFlag{Name: "url", Usage: "public URL agents use (default https://LISTEN)", EnvVars: env("URL")},
			&cli.StringSliceFlag{Name: "replica-urls", Usage: "public URLs of the other coordinators on the same --store (https://c2:8443,https://c3:8443): tokens and maps list them, and agents fail over to them", EnvVars: env("REPLICA_URLS")},
			&cli.StringFlag{Name: "domain", Value: wire.DefaultDomain, Usage: "DNS domain of the mesh", EnvVars: env("DOMAIN")},
			&cli.StringFlag{Name: "tls-cert", Usage: "PEM certificate to serve instead of the self-signed one", EnvVars: env("TLS_CERT")},
			&cli.StringFlag{Name: "tls-key", Usage: "PEM private key of --tls-cert", EnvVars: env("TLS_KEY")},
			&cli.StringFlag{Name: "metrics-listen", Value: "127.0.0.1:9090", Usage: "address serving Prometheus metrics at /metrics (plain HTTP), or off", EnvVars: env("METRICS_LISTEN")},
			&cli.StringFlag{Name: "oidc-issuer", Usage: "OpenID Connect issuer URL; enables console sign-in with that provider", EnvVars: env("OIDC_ISSUER")},
			&cli.StringFlag{Name: "oidc-client-id", Usage: "client ID registered with --oidc-issuer", EnvVars: env("OIDC_CLIENT_ID")},
			&cli.StringFlag{Name: "oidc-client-secret", Usage: "client secret registered with --oidc-issuer (prefer --oidc-client-secret-file)", EnvVars: env("OIDC_CLIENT_SECRET")},
			&cli.StringFlag{Name: "oidc-client-secret-file", Usage: "file holding the client secret", EnvVars: env("OIDC_CLIENT_SECRET_FILE")},
			&cli.StringFlag{Name: "oidc-redirect-url", Usage: "callback URL registered with the provider (default URL/login/oidc/callback)", EnvVars: env("OIDC_REDIRECT_URL")},
			&cli.StringSliceFlag{Name: "oidc-allowed-domains", Usage: "admit only OIDC identities whose verified email is at one of these domains (a.com,b.org)", EnvVars: env("OIDC_ALLOWED_DOMAINS")},
			&cli.StringSliceFlag{Name: "oidc-allowed-groups", Usage: "admit only OIDC identities whose groups claim holds one of these (g1,g2)", EnvVars: env("OIDC_ALLOWED_GROUPS")},
			&cli.StringFlag{Name: "oidc-new-users", Value: "member", Usage: "account of a first OIDC sign-in: member, or pending (an admin approves it first)", EnvVars: env("OIDC_NEW_USERS")},
			&cli.BoolFlag{Name: "allow-loopback-endpoints", Hidden: true, Usage: "keep loopback addresses among the endpoints nodes publish: only for a whole mesh on one host (demo, tests)", EnvVars: env("ALLOW_LOOPBACK_ENDPOINTS")},
			&cli.BoolFlag{Name: "relay", Value: true, Usage: "serve the embedded relay (--relay=false leaves relaying to standalone \"meshlink relay\" servers)", EnvVars: env("RELAY")},
			&cli.IntFlag{Name: "max-conns", Value: 8192, Usage: "HTTPS connections open at once, in all", EnvVars: env("MAX_CONNS")},
			&cli.IntFlag{Name: "max-conns-per-source", Value: 256, Usage: "HTTPS connections open at once from one IPv4 address or IPv6 /64 (raise it for many agents behind one NAT)", EnvVars: env("MAX_CONNS_PER_SOURCE")},
			&cli.DurationFlag{Name: "body-timeout", Value: 10 * time.Second, Usage: "time a request has to send its body", EnvVars: env("BODY_TIMEOUT")},
			&cli.IntFlag{Name: "max-services-per-node", Value: 64, Usage: "services one node may provide (each takes a VIP and a listener on every agent)", EnvVars: env("MAX_SERVICES_PER_NODE")},
			&cli.DurationFlag{Name: "service-grace", Value: 24 * time.Hour, Usage: "how long a service without providers keeps its name and VIP before it is deleted", EnvVars: env("SERVICE_GRACE")},
			&cli.DurationFlag{Name: "node-address-quarantine", Value: 24 * time.Hour, Usage: "how long a removed node's addresses stay unused before a new node may get them", EnvVars: env("NODE_ADDRESS_QUARANTINE")},
			&cli.DurationFlag{Name: "node-key-expiry", Value: coordinator.DefaultNodeKeyExpiry, Usage: "how long a node's key is accepted after it joined or last rotated (agents rotate before; a token may set a shorter one); 0 for never", EnvVars: env("NODE_KEY_EXPIRY")},
			&cli.BoolFlag{Name: "members-can-mint-tokens", Value: true, Usage: "members may mint join tokens in the console (false: only admins; members get tokens from an admin or join by approval)", EnvVars: env("MEMBERS_CAN_MINT_TOKENS")},
			&cli.StringFlag{Name: "memory-limit", Value: "auto", Usage: "soft memory limit of the Go runtime (GOMEMLIMIT), such as 900MiB or 2GiB: the garbage collector works harder near it; auto for 90% of the cgroup's memory limit when there is one (a container's) and GOMEMLIMIT is not set, off for none", EnvVars: env("MEMORY_LIMIT")},
			&cli.BoolFlag{Name: "trim-heap", Value: true, Usage: "once a burst (agents joining, a reconnect storm) is over and the coordinator idles, give the free heap the burst left back to the system instead of keeping it for the next; false to keep it", EnvVars: env("TRIM_HEAP")},
		}, logFlags()...),
		Action: func(c *cli.Context) error {
			if err := setMemoryLimit(c.String("memory-limit")); err != nil {
				return usageErrorf("meshlink coordinator: --memory-limit: %v", err)
			}
			log, err := startDaemon(c)
			if err != nil {
				return err
			}
			cfg, err := coordinatorConfig(c)
			if err != nil {
				return usageErrorf("meshlink coordinator: %v", err)
			}
			cfg.Logger, cfg.Out = log, os.Stdout
			s, err := coordinator.New(cfg)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			if err := s.Start(ctx); err != nil {
				s.Close()
				return err
			}
			if c.Bool("trim-heap") {
				go memtrim.HeapWhenIdle(ctx, coordinatorHeapTrim, func(n int64) {
					log.Debug("gave the free heap back to the system", "bytes", n)
				})
			}
			<-ctx.Done()
			log.Info("shutting down")
			return s.Close()
		},
	}
}

// coordinatorHeapTrim is when an idle coordinator gives its free heap back
// (memtrim.HeapWhenIdle): under a tenth of a CPU for 10 s, at least 64 MiB
// and a quarter of the live heap free, at most once a minute. At 10,000
// streams an idle coordinator uses 4-5% of a CPU for keep-alives, and
// after their join held some 500 MB of free heap (docs/control-plane-scale.md).
var coordinatorHeapTrim = memtrim.HeapConfig{Every: 10 * time.Second, IdleCPU: 0.1, MinFree: 64 << 20, Gap: time.Minute}

// coordinatorConfig turns the coordinator command's flags into its Config
// (without Logger and Out).
func coordinatorConfig(c *cli.Context) (coordinator.Config, error) {
	secret, err := oidcSecret(c)
	if err != nil {
		return coordinator.Config{}, err
	}
	if n := c.Int("max-services-per-node"); n < 1 {
		return coordinator.Config{}, fmt.Errorf("--max-services-per-node %d: a node must be allowed at least 1 service; choose 1 to %d", n, 254*256)
	}
	for _, f := range []string{"service-grace", "node-address-quarantine"} {
		if d := c.Duration(f); d <= 0 {
			return coordinator.Config{}, fmt.Errorf("--%s %v must be positive; use a duration such as 24h", f, d)
		}
	}
	keyExpiry := c.Duration("node-key-expiry")
	switch {
	case keyExpiry < 0 || keyExpiry > 0 && keyExpiry < time.Second:
		return coordinator.Config{}, fmt.Errorf("--node-key-expiry %v: use a duration of 1s or more such as 4320h (180 days), or 0 for keys that never expire", keyExpiry)
	case keyExpiry == 0:
		keyExpiry = -1 // Config: negative is never, zero the default
	}
	var pending bool
	switch v := c.String("oidc-new-users"); v {
	case "member":
	case "pending":
		pending = true
	default:
		return coordinator.Config{}, fmt.Errorf("--oidc-new-users %q: want member or pending", v)
	}
	domains, err := listFlag(c, "oidc-allowed-domains", func(d string) error {
		if strings.ContainsAny(d, "@/: ") || !strings.Contains(d, ".") {
			return errors.New("want a domain such as example.com")
		}
		return nil
	})
	if err != nil {
		return coordinator.Config{}, err
	}
	groups, err := listFlag(c, "oidc-allowed-groups", nil)
	if err != nil {
		return coordinator.Config{}, err
	}
	replicas, err := listFlag(c, "replica-urls", nil)
	if err != nil {
		return coordinator.Config{}, err
	}
	return coordinator.Config{
		OIDCAllowedDomains: domains, OIDCAllowedGroups: groups, OIDCNewUsersPending: pending,
		Listen: c.String("listen"), DataDir: c.String("data"), URL: c.String("url"),
		Store:       c.String("store"),
		ReplicaURLs: replicas,
		Domain:      c.String("domain"),
		TLSCert:     c.String("tls-cert"), TLSKey: c.String("tls-key"), MetricsListen: c.String("metrics-listen"),
		OIDCIssuer: c.String("oidc-issuer"), OIDCClientID: c.String("oidc-client-id"),
		OIDCClientSecret: secret, OIDCRedirectURL: c.String("oidc-redirect-url"),
		NoEmbeddedRelay:        !c.Bool("relay"),
		AllowLoopbackEndpoints: c.Bool("allow-loopback-endpoints"),
		MaxConns:               c.Int("max-conns"), MaxConnsPerSource: c.Int("max-conns-per-source"),
		BodyTimeout:             c.Duration("body-timeout"),
		MembersCannotMintTokens: !c.Bool("members-can-mint-tokens"),
		MaxServicesPerNode:      c.Int("max-services-per-node"), ServiceGrace: c.Duration("service-grace"),
		NodeAddressQuarantine: c.Duration("node-address-quarantine"),
		NodeKeyExpiry:         keyExpiry,
	}, nil
}

// listFlag splits a list flag given as a,b or repeated, dropping empty
// items; check, if set, vets each.
func listFlag(c *cli.Context, name string, check func(string) error) ([]string, error) {
	var out []string
	for _, v := range c.StringSlice(name) {
		for _, x := range strings.Split(v, ",") {
			if x = strings.TrimSpace(x); x == "" {
				continue
			}
			if check != nil {
				if err := check(x); err != nil {
					return nil, fmt.Errorf("--%s %q: %w", name, x, err)
				}
			}
			out = append(out, x)
		}
	}
	return out, nil
}

func relaysCmd() *cli.Command {
	cmd := adminListCmd("relays", "list or remove the relays the coordinator hands out (talks to the coordinator running with --data)",
		(*coordinator.AdminClient).Relays, writeRelays)
	cmd.Subcommands = []*cli.Command{
		adminNameCmd("remove", "remove a standalone relay: unlisted at once, its credentials stop working",
			"usage: meshlink relays remove NAME --data DIR",
			sayDone((*coordinator.AdminClient).RemoveRelay, "relay %s removed\n")),
	}
	return cmd
}

// writeRelays prints the relays as a table, or as JSON.
func writeRelays(rs []wire.Relay, asJSON bool) error {
	if asJSON {
		return printJSON(relaysJSON(rs))
	}
	if len(rs) == 0 {
		fmt.Println("no relay online (the embedded one is off and no `meshlink relay` follows this coordinator)")
		return nil
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tURL\tFINGERPRINT")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Name, r.URL, r.Fingerprint)
	}
	return tw.Flush()
}

// writeUsers prints the accounts as a table, or as JSON.
func writeUsers(us []coordinator.UserInfo, asJSON bool) error {
	if asJSON {
		return printJSON(us)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tNODES\tSTATE\tCREATED")
	for _, u := range us {
		role, state := "member", "active"
		if u.Admin {
			role = "admin"
		}
		if u.Pending {
			state = "pending approval"
		} else if u.MustChangePassword {
			state = "must change password"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", u.Name, role, u.Nodes, state, u.Created.Format(time.DateTime))
	}
	return tw.Flush()
}

func usersCmd() *cli.Command {
	return &cli.Command{
		Name:  "users",
		Usage: "add, list and remove console accounts (talks to the coordinator running with --data)",
		Subcommands: []*cli.Command{
			{
				Name:      "add",
				Usage:     "create an account and print its one-time password, to be changed at first sign-in",
				ArgsUsage: "NAME",
				Flags: []cli.Flag{adminDataFlag(),
					&cli.BoolFlag{Name: "admin", Usage: "the user manages accounts and every node (default: a member)", EnvVars: env("USER_ADMIN")},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return cli.Exit("usage: meshlink users add NAME [--admin] --data DIR", 2)
					}
					ac, ctx, cancel := adminClient(c)
					defer cancel()
					nu, err := ac.AddUser(ctx, c.Args().First(), c.Bool("admin"))
					if err != nil {
						return err
					}
					role := "member"
					if nu.Admin {
						role = "admin"
					}
					fmt.Printf("user %s created (%s)\none-time password: %s\n%s must choose a new password at first sign-in; hand this one over through a safe channel.\n", nu.Name, role, nu.Password, nu.Name)
					return nil
				},
			},
			adminListCmd("list", "list the accounts", (*coordinator.AdminClient).Users, writeUsers),
			adminNameCmd("approve", "let an account created by an OIDC sign-in under --oidc-new-users=pending sign in",
				"usage: meshlink users approve NAME --data DIR (names are in `meshlink users list`)",
				sayDone((*coordinator.AdminClient).ApproveUser, "user %s approved; they may sign in now\n")),
			adminNameCmd("remove", "remove an account: its tokens are revoked, its sessions end and its nodes are removed",
				"usage: meshlink users remove NAME --data DIR",
				func(ac *coordinator.AdminClient, ctx context.Context, name string) (string, error) {
					ru, err := ac.RemoveUser(ctx, name)
					if err != nil {
						return "", err
					}
					done := fmt.Sprintf("user %s removed; %d token(s) revoked, %d node(s) removed", name, len(ru.TokensRevoked), len(ru.NodesRemoved))
					if len(ru.NodesRemoved) > 0 {
						done += ": " + strings.Join(ru.NodesRemoved, ", ")
					}
					return done + "\n", nil
				}),
		},
	}
}

// oidcSecret is --oidc-client-secret or the contents of
// --oidc-client-secret-file (trailing whitespace trimmed), not both.
func oidcSecret(c *cli.Context) (string, error) {
	secret, file := c.String("oidc-client-secret"), c.String("oidc-client-secret-file")
	if file == "" {
		return secret, nil
	}
	if secret != "" {
		return "", errors.New("--oidc-client-secret and --oidc-client-secret-file are both set; keep one")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--oidc-client-secret-file: %w", err)
	}
	secret = strings.TrimRight(string(b), " \t\r\n")
	if secret == "" {
		return "", fmt.Errorf("--oidc-client-secret-file %s is empty", file)
	}
	return secret, nil
}

// tokenCreateCmd is `meshlink token create`.
func tokenCreateCmd() *cli.Command {
	return &cli.Command{
		Name:  "create",
		Usage: "print a new join token (talks to the coordinator running with --data)",
		Flags: []cli.Flag{
			adminDataFlag(),
			&cli.BoolFlag{Name: "reusable", Usage: "the token may join any number of nodes", EnvVars: env("TOKEN_REUSABLE")},
			&cli.DurationFlag{Name: "expires", Value: 24 * time.Hour, Usage: "validity (0 for never)", EnvVars: env("TOKEN_EXPIRES")},
			&cli.BoolFlag{Name: "ephemeral", Usage: "nodes joined with it are removed when they go away", EnvVars: env("TOKEN_EPHEMERAL")},
			&cli.StringSliceFlag{Name: "tags", Usage: "tags given to nodes joined with it (a,b)", EnvVars: env("TOKEN_TAGS")},
			&cli.BoolFlag{Name: "relay", Usage: "a token that registers a standalone relay (meshlink relay --join), not a node", EnvVars: env("TOKEN_RELAY")},
			&cli.StringFlag{Name: "user", Usage: "the user who owns the token and the nodes it joins (default: the first admin)", EnvVars: env("TOKEN_USER")},
			&cli.DurationFlag{Name: "key-expiry", Usage: "key lifetime of the nodes it joins, if shorter than the coordinator's --node-key-expiry (a longer one is capped to it); 0 for the coordinator's", EnvVars: env("TOKEN_KEY_EXPIRY")},
		},
		Action: func(c *cli.Context) error {
			if c.Duration("expires") < 0 {
				return errors.New("--expires must not be negative")
			}
			if d := c.Duration("key-expiry"); d < 0 || d > 0 && d < time.Second {
				return fmt.Errorf("--key-expiry %v: use a duration of 1s or more such as 720h, or 0 for the coordinator's --node-key-expiry", d)
			}
			var tags []string
			for _, t := range c.StringSlice("tags") {
				for _, x := range strings.Split(t, ",") {
					if x = wire.NormalizeName(x); x != "" {
						if err := wire.ValidName(x); err != nil {
							return fmt.Errorf("--tags: %w", err)
						}
						tags = append(tags, x)
					}
				}
			}
			ac, ctx, cancel := adminClient(c)
			defer cancel()
			tok, err := ac.CreateToken(ctx, coordinator.TokenOptions{
				Reusable: c.Bool("reusable"), Ephemeral: c.Bool("ephemeral"), Expires: c.Duration("expires"), Tags: tags,
				Relay: c.Bool("relay"), User: c.String("user"), KeyExpiry: c.Duration("key-expiry"),
			})
			if err != nil {
				return err
			}
			fmt.Println(tok)
			return nil
		},
	}
}
