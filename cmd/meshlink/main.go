// Command meshlink is the one binary of meshlink: the coordinator, the agent
// and the CLI that talks to them. It only turns flags and MESHLINK_*
// environment variables into config structs and calls the libraries.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/internal/memlimit"
	"github.com/meshlink/meshlink/internal/memtrim"
	"github.com/meshlink/meshlink/relayd"
	"github.com/meshlink/meshlink/wire"
)

func env(name string) []string { return []string{"MESHLINK_" + name} }

func main() {
	app := newApp()
	os.Exit(report(app.Run(flagsFirst(app, os.Args)), os.Stderr))
}

// flagsFirst moves a command's flags ahead of its positional arguments, so
// `meshlink expose web 127.0.0.1:80 --state ./b` works as documented (the
// flag parser stops at the first argument otherwise). A "--" ends flags.
func flagsFirst(app *cli.App, args []string) []string {
	if len(args) < 2 || args[len(args)-1] == "--generate-bash-completion" {
		return args
	}
	cmds := app.Commands
	i := skipFlags(app.Flags, args, 1)
	var cmd *cli.Command
	for i < len(args) {
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(args[i]) {
				next = c
			}
		}
		if next == nil {
			break
		}
		cmd, cmds = next, next.Subcommands
		i++
	}
	if cmd == nil || len(cmd.Subcommands) > 0 {
		return args
	}
	takesValue := valueFlags(cmd.Flags)
	var flags, pos []string
	rest := args[i:]
	for j := 0; j < len(rest); j++ {
		a := rest[j]
		if a == "--" {
			pos = append(pos, rest[j+1:]...)
			break
		}
		if len(a) > 1 && a[0] == '-' {
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if !strings.Contains(name, "=") && takesValue[name] {
				if j+1 == len(rest) {
					// Its value is missing: let the flag parser say so
					// rather than take the "--" below for it.
					return append(append(append([]string{}, args[:i]...), flags[:len(flags)-1]...), a)
				}
				j++
				flags = append(flags, rest[j])
			}
			continue
		}
		pos = append(pos, a)
	}
	out := append([]string{}, args[:i]...)
	out = append(out, flags...)
	if len(pos) > 0 {
		out = append(out, "--")
		out = append(out, pos...)
	}
	return out
}

// valueFlags tells, by name, which of flags take a value.
func valueFlags(flags []cli.Flag) map[string]bool {
	takesValue := map[string]bool{}
	for _, f := range flags {
		_, isBool := f.(*cli.BoolFlag)
		for _, n := range f.Names() {
			takesValue[n] = !isBool
		}
	}
	return takesValue
}

// skipFlags returns the index of the first argument from i on that is not
// one of flags (the global flags before the command) or its value.
func skipFlags(flags []cli.Flag, args []string, i int) int {
	takesValue := valueFlags(flags)
	for i < len(args) {
		a := args[i]
		if a == "--" || len(a) < 2 || a[0] != '-' {
			return i
		}
		name := strings.TrimLeft(a, "-")
		i++
		if !strings.Contains(name, "=") && takesValue[name] {
			i++
		}
	}
	return i
}

// newApp builds the command line; a test walks it.
func newApp() *cli.App {
	app := &cli.App{
		Name:    "meshlink",
		Usage:   "connect services across sites over an encrypted WireGuard overlay",
		Version: buildInfo().Version,
		// Global flags, given before the command: meshlink --state DIR status.
		Flags:                []cli.Flag{stateFlag()},
		EnableBashCompletion: true,
		Commands: []*cli.Command{
			coordinatorCmd(),
			storeCmd(),
			tokenCmd(),
			usersCmd(),
			relayCmd(),
			relaysCmd(),
			nodesCmd(),
			policyCmd(),
			agentCmd(),
			exposeCmd(),
			unexposeCmd(),
			servicesCmd(),
			connectCmd(),
			dnsCmd(),
			statusCmd(),
			pingCmd(),
			rotateKeyCmd(),
			leaveCmd(),
			versionCmd(),
			healthcheckCmd(),
			completionCmd(),
			docsCmd(),
		},
		ExitErrHandler: func(c *cli.Context, err error) {},
		OnUsageError:   onUsageError,
	}
	app.Action = func(c *cli.Context) error {
		if c.NArg() > 0 {
			return unknownCommand(c, app.Commands, c.Args().First())
		}
		return cli.ShowAppHelp(c)
	}
	checkCommands(app.Commands)
	return app
}

// logFlags are taken by the long-running commands.
func logFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: env("LOG_LEVEL")},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json", EnvVars: env("LOG_FORMAT")},
		&cli.StringFlag{Name: "debug-listen", Usage: "serve Go profiles at /debug/pprof/ on this address (plain HTTP, keep it on loopback); default off", EnvVars: env("DEBUG_LISTEN")},
	}
}

// setMemoryLimit sets the Go runtime's soft memory limit from a size
// such as 900MiB, 2GiB or 1500000000 (bytes); "off" or "" leaves it;
// "auto" sets it to 90% of the cgroup's limit when there is one (a
// container's, a systemd unit's MemoryMax) and GOMEMLIMIT is not set: a
// process that nears its cgroup's limit is killed, where one that nears
// its soft limit collects sooner. The machine's memory is no limit to
// derive one from: nothing kills a process that stays under it, and a
// lower limit costs CPU in every burst (docs/control-plane-scale.md).
func setMemoryLimit(v string) error {
	if v == "" || v == "off" {
		return nil
	}
	if v == "auto" {
		if os.Getenv("GOMEMLIMIT") != "" {
			return nil // the runtime read it at start
		}
		if n, ok := memlimit.Cgroup(); ok {
			debug.SetMemoryLimit(n / 10 * 9)
		}
		return nil
	}
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	debug.SetMemoryLimit(n)
	return nil
}

// checkMemoryLimit says whether v is a value setMemoryLimit takes.
func checkMemoryLimit(v string) error {
	if v == "" || v == "off" || v == "auto" {
		return nil
	}
	_, err := parseSize(v)
	return err
}

// parseSize parses a size in bytes such as 900MiB, 2GiB or 1500000000.
func parseSize(v string) (int64, error) {
	orig := v
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}} {
		if strings.HasSuffix(v, u.suffix) {
			v, mult = strings.TrimSuffix(v, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("%q is not a size; write it like 900MiB or 2GiB", orig)
	}
	return n * mult, nil
}

// startDaemon is what every long-running command does first: its logger
// from the log flags, and profiling on --debug-listen.
func startDaemon(c *cli.Context) (*slog.Logger, error) {
	log, err := newLogger(c, os.Stderr)
	if err != nil {
		return nil, err
	}
	return log, startDebug(c, log)
}

// startDebug serves net/http/pprof on --debug-listen, if set.
func startDebug(c *cli.Context, log *slog.Logger) error {
	addr := c.String("debug-listen")
	if addr == "" || addr == "off" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--debug-listen %s: %w; choose another address", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	go (&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}).Serve(ln)
	log.Info("profiling served", "url", "http://"+ln.Addr().String()+"/debug/pprof/")
	return nil
}

func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.String("log-format"))
}

// signalContext is cancelled by SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func relayCmd() *cli.Command {
	return &cli.Command{
		Name:  "relay",
		Usage: "run a standalone relay in the foreground, for sites that no UDP path joins",
		Description: "Registers with the coordinator once with a relay token (meshlink token create --relay),\n" +
			"then follows its list of nodes; agents find the relay in their network maps. The relay\n" +
			"carries only encrypted WireGuard packets, and nodes prove their keys to it: it never\n" +
			"sees node credentials. It must terminate TLS itself (no TLS-terminating proxy in front).",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "join", Usage: "relay token (needed the first time only)", EnvVars: env("JOIN")},
			&cli.StringFlag{Name: "state", Value: "./meshlink-relay", Usage: "state directory (key, certificate, credentials)", EnvVars: env("STATE")},
			&cli.StringFlag{Name: "name", Usage: "relay name shown in network maps (default: the host name)", EnvVars: env("NAME")},
			&cli.StringFlag{Name: "listen", Value: "0.0.0.0:8444", Usage: "HTTPS listen address", EnvVars: env("LISTEN")},
			&cli.StringFlag{Name: "url", Usage: "public URL agents dial (default https://LISTEN)", EnvVars: env("URL")},
			&cli.StringFlag{Name: "tls-cert", Usage: "PEM certificate to serve instead of the self-signed one", EnvVars: env("TLS_CERT")},
			&cli.StringFlag{Name: "tls-key", Usage: "PEM private key of --tls-cert", EnvVars: env("TLS_KEY")},
			&cli.StringFlag{Name: "metrics-listen", Value: "off", Usage: "address serving Prometheus metrics at /metrics (plain HTTP), or off", EnvVars: env("METRICS_LISTEN")},
		}, logFlags()...),
		Action: func(c *cli.Context) error {
			log, err := startDaemon(c)
			if err != nil {
				return err
			}
			r, err := relayd.New(relayd.Config{
				Join: c.String("join"), StateDir: c.String("state"), Name: c.String("name"),
				Listen: c.String("listen"), URL: c.String("url"), TLSCert: c.String("tls-cert"), TLSKey: c.String("tls-key"),
				MetricsListen: c.String("metrics-listen"), Logger: log,
			})
			if err != nil {
				return err
			}
			if err := r.Start(); err != nil {
				r.Close()
				return err
			}
			st := r.Status()
			fmt.Printf("meshlink relay %s listening at %s (fingerprint %s)\n", st.Name, st.URL, st.Fingerprint)
			ctx, cancel := signalContext()
			defer cancel()
			<-ctx.Done()
			log.Info("shutting down")
			return r.Close()
		},
	}
}

func tokenCmd() *cli.Command {
	return &cli.Command{
		Name:  "token",
		Usage: "create and inspect join tokens",
		Subcommands: []*cli.Command{
			tokenCreateCmd(),
			{
				Name:      "inspect",
				Usage:     "print a token's coordinator and expiry, and ask that coordinator for its uses left (--offline: decode only)",
				ArgsUsage: "TOKEN",
				Flags:     tokenInspectFlags(),
				Action:    tokenInspect,
			},
		},
	}
}

func agentCmd() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run a site's agent in the foreground",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "join", Usage: "join token (needed the first time only); visible to other users in ps, see --join-file", EnvVars: env("JOIN")},
			&cli.StringFlag{Name: "join-file", Usage: "file holding the join token, instead of --join", EnvVars: env("JOIN_FILE")},
			&cli.StringFlag{Name: "coordinator", Usage: "coordinator URL, to join by logging in instead of a token", EnvVars: env("COORDINATOR")},
			&cli.StringFlag{Name: "fingerprint", Usage: "SHA-256 fingerprint of a self-signed coordinator's certificate (with --coordinator)", EnvVars: env("FINGERPRINT")},
			&cli.StringFlag{Name: "name", Usage: "node name (default: the host name)", EnvVars: env("NAME")},
			stateFlag(),
			&cli.UintFlag{Name: "listen-port", Value: 0, Usage: "WireGuard UDP port (0 picks a free one)", EnvVars: env("LISTEN_PORT")},
			&cli.StringFlag{Name: "dns", Value: "127.0.0.1:53", Usage: "DNS listen address, or off", EnvVars: env("DNS")},
			&cli.StringSliceFlag{Name: "dns-allow", Usage: "networks allowed to query DNS besides loopback, CIDR[,CIDR...]; needed when --dns is not a loopback address", EnvVars: env("DNS_ALLOW")},
			&cli.StringSliceFlag{Name: "dns-upstream", Usage: "resolvers for non-mesh names (default: /etc/resolv.conf)", EnvVars: env("DNS_UPSTREAM")},
			&cli.StringSliceFlag{Name: "expose", Usage: "export a service NAME=HOST:PORT[/udp|/tcp+udp][;OPTION=VALUE...] (repeatable); options port, priority, weight, version, health, udp-idle as for meshlink expose, e.g. web=127.0.0.1:8000;weight=10;version=v2 or dns=127.0.0.1:53/udp", EnvVars: env("EXPOSE")},
			&cli.StringFlag{Name: "region", Usage: "this node's region, for services whose policy prefers providers in the consumer's region (locality: prefer-same-region)", EnvVars: env("REGION")},
			&cli.StringFlag{Name: "proxy-range", Value: agent.DefaultProxyRange, Usage: "loopback prefix for consumed services", EnvVars: env("PROXY_RANGE")},
			&cli.DurationFlag{Name: "dial-timeout", Value: time.Second, Usage: "time to reach one provider before it is marked failing and the next is tried", EnvVars: env("DIAL_TIMEOUT")},
			&cli.DurationFlag{Name: "last-dial-timeout", Value: proxy.DefaultLastDialTimeout, Usage: "time to reach the last provider left to try, when it has not failed lately (nothing to fail over to: a lost SYN or handshake on a lossy path is worth waiting for)", EnvVars: env("LAST_DIAL_TIMEOUT")},
			&cli.BoolFlag{Name: "relay-only", Usage: "never use direct UDP paths, always the relay (diagnosis)", EnvVars: env("RELAY_ONLY")},
			&cli.StringFlag{Name: "socks5", Usage: "serve a SOCKS5 proxy on this address (e.g. 127.0.0.1:1080): mesh names through the mesh, others direct; default off", EnvVars: env("SOCKS5")},
			&cli.StringFlag{Name: "http-proxy", Usage: "serve an HTTP proxy (CONNECT and http:// URLs) on this address (e.g. 127.0.0.1:3128); default off", EnvVars: env("HTTP_PROXY")},
			&cli.BoolFlag{Name: "proxy-mesh-only", Usage: "the --socks5 and --http-proxy proxies refuse names outside the mesh", EnvVars: env("PROXY_MESH_ONLY")},
			&cli.StringFlag{Name: "metrics", Usage: "address serving Prometheus metrics at /metrics (plain HTTP), e.g. 127.0.0.1:9091; default off", EnvVars: env("METRICS")},
			&cli.StringFlag{Name: "memory-limit", Value: "auto", Usage: "soft memory limit of the Go runtime (GOMEMLIMIT), such as 48MiB: the garbage collector works harder near it; auto for 90% of the cgroup's memory limit when there is one (a sidecar's or container's limits.memory) and GOMEMLIMIT is not set, off for none", EnvVars: env("MEMORY_LIMIT")},
			&cli.IntFlag{Name: "cpus", Usage: "CPUs the agent runs its Go code on at once (GOMAXPROCS); 0 for Go's default, every CPU or the container's CPU limit. 1 cuts latency by a third where the agent shares a small machine with its applications (docs/performance.md#one-cpu)", EnvVars: env("CPUS")},
			// A tuning knob for measurements, not for users: hidden.
			&cli.BoolFlag{Name: "trim-executable", Value: true, Hidden: true, Usage: "once started, drop the binary's pages that starting touched from the resident set (docs/performance.md); false to measure without", EnvVars: env("TRIM_EXECUTABLE")},
			&cli.IntFlag{Name: "pipeline-packets", Value: agent.DefaultPipelinePackets, Hidden: true, Usage: "packets each direction of WireGuard's pipeline may hold (memory under load; 0 for the default)", EnvVars: env("PIPELINE_PACKETS")},
		}, append(append(agentSidecarFlags(), tracingFlags()...), logFlags()...)...),
		Action: func(c *cli.Context) error {
			if err := setMemoryLimit(c.String("memory-limit")); err != nil {
				return usageErrorf("meshlink agent: --memory-limit: %v", err)
			}
			log, err := startDaemon(c)
			if err != nil {
				return err
			}
			cfg, err := agentConfig(c)
			if err != nil {
				return usageErrorf("meshlink agent: %v", err)
			}
			if n := c.Int("cpus"); n > 0 {
				runtime.GOMAXPROCS(n)
			}
			cfg.Logger = log
			if cfg.Tracing.Enabled() {
				otelErrors(log)
			}
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			if err := a.Start(ctx); err != nil {
				return err
			}
			// What starting touched of the binary need not stay resident.
			if c.Bool("trim-executable") {
				trimmed := func(n int64, err error) {
					if err != nil {
						log.Debug("could not trim the executable's resident pages", "err", err)
					} else {
						log.Debug("trimmed the executable's resident pages", "mapped_bytes", n)
					}
				}
				trimmed(memtrim.Executable())
				// And again once it idles after traffic, which faults in
				// the data path's code.
				tctx, tcancel := context.WithCancel(ctx)
				trimDone := make(chan struct{})
				go func() {
					defer close(trimDone)
					memtrim.WhenIdle(tctx, idleTrimEvery, trimmed)
				}()
				defer func() { tcancel(); <-trimDone }()
			}
			select {
			case <-ctx.Done():
				// A second Ctrl-C or SIGTERM now stops at once.
				cancel()
				log.Info("shutting down (a second signal stops at once)", "drain_timeout", c.Duration("drain-timeout"))
				return stopAgent(a, c.Duration("drain-timeout"), log)
			case <-a.Left(): // meshlink leave
				log.Info("left the mesh; stopping")
			}
			return a.Close()
		},
	}
}

// idleTrimEvery is how long an agent must have idled (under 1% of a CPU)
// for the binary's pages that traffic faulted in to be dropped again.
const idleTrimEvery = 10 * time.Second

// agentConfig turns the agent command's flags into its configuration, less
// the logger.
func agentConfig(c *cli.Context) (agent.Config, error) {
	if c.Uint("listen-port") > 65535 {
		return agent.Config{}, fmt.Errorf("--listen-port %d: must be 0-65535", c.Uint("listen-port"))
	}
	pr, err := netip.ParsePrefix(c.String("proxy-range"))
	if err != nil {
		return agent.Config{}, fmt.Errorf("--proxy-range %q: want a prefix such as 127.101.0.0/16", c.String("proxy-range"))
	}
	join, err := joinToken(c)
	if err != nil {
		return agent.Config{}, err
	}
	var dnsAllow []netip.Prefix
	for _, s := range c.StringSlice("dns-allow") {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			if ip, ierr := netip.ParseAddr(strings.TrimSpace(s)); ierr == nil {
				p, err = netip.PrefixFrom(ip, ip.BitLen()), nil
			}
		}
		if err != nil {
			return agent.Config{}, fmt.Errorf("--dns-allow %q: want a network such as 10.0.0.0/8 or fd00::/8 (comma-separated for several)", s)
		}
		dnsAllow = append(dnsAllow, p.Masked())
	}
	if err := checkMemoryLimit(c.String("memory-limit")); err != nil {
		return agent.Config{}, fmt.Errorf("--memory-limit: %v", err)
	}
	if n := c.Int("cpus"); n < 0 {
		return agent.Config{}, fmt.Errorf("--cpus %d: want 1 or more, or 0 for Go's default (every CPU, or the container's limit)", n)
	}
	var exports []agent.Export
	for _, s := range c.StringSlice("expose") {
		e, err := agent.ParseExport(s)
		if err != nil {
			return agent.Config{}, err
		}
		exports = append(exports, e)
	}
	cfg := agent.Config{
		StateDir: stateDir(c), Join: join, JoinFile: c.String("join-file"), Name: c.String("name"),
		ListenPort: uint16(c.Uint("listen-port")), DNS: c.String("dns"), DNSFallback: !c.IsSet("dns"),
		Upstreams: c.StringSlice("dns-upstream"), DNSAllow: dnsAllow, Expose: exports, ProxyRange: pr,
		DialTimeout: c.Duration("dial-timeout"), LastDialTimeout: c.Duration("last-dial-timeout"), RelayOnly: c.Bool("relay-only"), Region: c.String("region"),
		SOCKS5: c.String("socks5"), HTTPProxy: c.String("http-proxy"), ProxyMeshOnly: c.Bool("proxy-mesh-only"),
		Coordinator: c.String("coordinator"), Fingerprint: c.String("fingerprint"), Out: os.Stdout,
		Metrics: c.String("metrics"), PipelinePackets: c.Int("pipeline-packets"),
	}
	if err := tracingConfig(c, os.Getenv, &cfg); err != nil {
		return agent.Config{}, err
	}
	return cfg, sidecarConfig(c, &cfg)
}

// maxJoinFile bounds what --join-file reads; a token is a few hundred bytes.
const maxJoinFile = 64 << 10

// joinToken returns the token of --join or --join-file (at most one may be
// given).
func joinToken(c *cli.Context) (string, error) {
	path := c.String("join-file")
	if path == "" {
		return c.String("join"), nil
	}
	if c.String("join") != "" {
		return "", errors.New("--join and --join-file both given: give the token one way only (--join-file keeps it out of ps)")
	}
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("--join-file: %w; give a readable file holding the token printed by `meshlink token create`", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxJoinFile+1))
	if err != nil {
		return "", fmt.Errorf("--join-file %s: %w; give a readable file holding the token printed by `meshlink token create`", path, err)
	}
	if len(b) > maxJoinFile {
		return "", fmt.Errorf("--join-file %s: larger than %d KiB, not a join token; give the file holding the token printed by `meshlink token create`", path, maxJoinFile>>10)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("--join-file %s is empty; put the token printed by `meshlink token create` in it", path)
	}
	return tok, nil
}

func exposeCmd() *cli.Command {
	return &cli.Command{
		Name:      "expose",
		Usage:     "export a service of this site to the mesh",
		ArgsUsage: "NAME HOST:PORT",
		Flags: []cli.Flag{
			stateFlag(),
			&cli.UintFlag{Name: "port", Usage: "port consumers use (default: the target's port)", EnvVars: env("PORT")},
			&cli.BoolFlag{Name: "replace", Usage: "replace the target of a service this site already exports", EnvVars: env("REPLACE")},
			&cli.IntFlag{Name: "priority", Usage: "consumers send every connection to the healthy providers of the lowest priority, failing over to the next", EnvVars: env("EXPOSE_PRIORITY")},
			&cli.IntFlag{Name: "weight", Usage: "this provider's share among those of its priority (default 1)", EnvVars: env("EXPOSE_WEIGHT")},
			&cli.StringFlag{Name: "version", Usage: "version label of what this provider runs, for a traffic split in the policy (e.g. v2)", EnvVars: env("EXPOSE_VERSION")},
			&cli.StringFlag{Name: "health", Usage: "how the target is checked every 2s: tcp (connect; the default), http:/PATH (GET, expect 2xx-3xx), http:/PATH@STATUS, or none", EnvVars: env("EXPOSE_HEALTH")},
			&cli.BoolFlag{Name: "udp", Usage: "the service is UDP (like HOST:PORT/udp): consumers listen on UDP and carry each client's datagrams as one flow", EnvVars: env("EXPOSE_UDP")},
			&cli.BoolFlag{Name: "http", Usage: "the service is HTTP (like HOST:PORT/http): requests are carried one by one, with the policy's timeouts, retries, routes and metrics (docs/http.md)", EnvVars: env("EXPOSE_HTTP")},
			&cli.StringFlag{Name: "protocol", Usage: "tcp (the default), udp, tcp+udp for both on one name and port (like HOST:PORT/tcp+udp), or http", EnvVars: env("EXPOSE_PROTOCOL")},
			&cli.DurationFlag{Name: "udp-idle", Usage: "how long a UDP flow may go without a datagram before both ends forget it (default 60s)", EnvVars: env("EXPOSE_UDP_IDLE")},
		},
		Action: func(c *cli.Context) error {
			if err := wantArgs(c, 2, "NAME HOST:PORT[/udp|/tcp+udp|/http]"); err != nil {
				return err
			}
			target, proto := c.Args().Get(1), c.String("protocol")
			if i := strings.LastIndexByte(target, '/'); i >= 0 {
				if proto != "" {
					return usageErrorf("meshlink expose: give the protocol once: %s or --protocol %s", target, proto)
				}
				target, proto = target[:i], target[i+1:]
			}
			if c.Bool("udp") {
				if proto != "" && proto != wire.ProtocolUDP {
					return usageErrorf("meshlink expose: --udp and protocol %s disagree; for both, use --protocol tcp+udp", proto)
				}
				proto = wire.ProtocolUDP
			}
			if c.Bool("http") {
				if proto != "" && proto != wire.ProtocolHTTP {
					return usageErrorf("meshlink expose: --http and protocol %s disagree; an HTTP service is TCP", proto)
				}
				proto = wire.ProtocolHTTP
			}
			if _, err := wire.ParseProtocol(proto); err != nil {
				return usageErrorf("meshlink expose: %v", err)
			}
			idle := c.Duration("udp-idle")
			if idle != 0 && (idle < time.Second || idle > wire.MaxUDPIdle*time.Second) {
				return usageErrorf("meshlink expose: --udp-idle %s must be from 1s to %ds", idle, wire.MaxUDPIdle)
			}
			if c.Uint("port") > 65535 {
				return usageErrorf("meshlink expose: --port %d: must be 1-65535", c.Uint("port"))
			}
			cl := newLocalClient(c)
			req := localapiExpose(c.Args().Get(0), target, uint16(c.Uint("port")))
			req.Protocol, req.UDPIdle = proto, int(idle/time.Second)
			req.Replace = c.Bool("replace")
			req.Priority, req.Weight, req.Version, req.Health = c.Int("priority"), c.Int("weight"), c.String("version"), c.String("health")
			r, err := cl.Expose(c.Context, req)
			if err != nil {
				return err
			}
			fmt.Printf("exposed %s -> %s on mesh port %d\n", r.Export.Name, withProtocol(r.Export.Target, r.Export.Protocol), r.Export.Port)
			if r.Note != "" {
				fmt.Println(r.Note)
			}
			if r.Warning != "" {
				fmt.Fprintln(os.Stderr, "warning: "+r.Warning)
			}
			return nil
		},
	}
}

func unexposeCmd() *cli.Command {
	return &cli.Command{
		Name:      "unexpose",
		Usage:     "stop exporting a service",
		ArgsUsage: "NAME",
		Flags:     []cli.Flag{stateFlag()},
		Action: func(c *cli.Context) error {
			if err := wantArgs(c, 1, "NAME"); err != nil {
				return err
			}
			if err := newLocalClient(c).Unexpose(c.Context, c.Args().First()); err != nil {
				return err
			}
			fmt.Printf("unexposed %s\n", wire.NormalizeName(c.Args().First()))
			return nil
		},
	}
}
