//go:build !agentonly

package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/coordinator/policy"
	"github.com/meshlink/meshlink/wire"
)

func policyCmd() *cli.Command {
	return &cli.Command{
		Name:  "policy",
		Usage: "show, set, check or explain the mesh's access policy (who may reach which service)",
		Subcommands: []*cli.Command{{
			Name:  "get",
			Usage: "print the policy in force (talks to the coordinator running with --data)",
			Flags: []cli.Flag{adminDataFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON: the text with when and by whom it was set", EnvVars: env("JSON")}},
			Action: func(c *cli.Context) error {
				ac, ctx, cancel := adminClient(c)
				defer cancel()
				pi, err := ac.Policy(ctx)
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(pi)
				}
				fmt.Print(pi.Text)
				return nil
			},
		}, {
			Name:      "set",
			Usage:     "check FILE (syntax, references, its tests against the mesh) and make it the policy in force; prints the access it grants and revokes",
			ArgsUsage: "FILE",
			Flags:     []cli.Flag{adminDataFlag(), &cli.BoolFlag{Name: "json", Usage: "print the change as JSON", EnvVars: env("JSON")}},
			Action: func(c *cli.Context) error {
				file, text, err := readPolicyArg(c, "meshlink policy set FILE --data DIR")
				if err != nil {
					return err
				}
				ac, ctx, cancel := adminClient(c)
				defer cancel()
				pc, err := ac.SetPolicy(ctx, file, text)
				if err != nil {
					return cli.Exit(fmt.Sprintf("policy not set (the policy in force is unchanged):\n%v", policyErrText(err)), 1)
				}
				if c.Bool("json") {
					return printJSON(pc)
				}
				writePolicyChange(os.Stdout, pc)
				return nil
			},
		}, {
			Name:      "check",
			Usage:     "check FILE offline: syntax, references and its tests (users are members, tags stand alone); no coordinator needed",
			ArgsUsage: "FILE",
			Action: func(c *cli.Context) error {
				file, text, err := readPolicyArg(c, "meshlink policy check FILE")
				if err != nil {
					return err
				}
				p, err := policy.Parse(file, []byte(text))
				if err == nil {
					err = p.Run(policy.Offline{P: p})
				}
				if err != nil {
					return cli.Exit(err.Error(), 1)
				}
				fmt.Printf("%s: ok (%d rules, %d tests passed)\n", file, len(p.Rules), len(p.Tests))
				return nil
			},
		}, {
			Name:  "explain",
			Usage: "say whether a node or user may reach a service, and which rule decides",
			Flags: []cli.Flag{adminDataFlag(),
				&cli.StringFlag{Name: "from", Usage: "a node name, or user:NAME, tag:NAME, node:NAME", EnvVars: env("POLICY_FROM")},
				&cli.StringFlag{Name: "to", Usage: "a service name", EnvVars: env("POLICY_TO")},
				&cli.StringFlag{Name: "method", Usage: "explain one HTTP request of an HTTP service: its method (default GET when --path or --claim is given)", EnvVars: env("POLICY_METHOD")},
				&cli.StringFlag{Name: "path", Usage: "explain one HTTP request: its path (default /)", EnvVars: env("POLICY_PATH")},
				&cli.StringSliceFlag{Name: "claim", Usage: "explain one HTTP request carrying a valid token with claim NAME=VALUE (repeat; a name given twice is a list); without any, the request carries no token", EnvVars: env("POLICY_CLAIMS")},
				&cli.BoolFlag{Name: "json", Usage: "print JSON", EnvVars: env("JSON")},
			},
			Action: func(c *cli.Context) error {
				if c.String("from") == "" || c.String("to") == "" || c.NArg() > 0 {
					return cli.Exit("usage: meshlink policy explain --from NODE|user:NAME --to SERVICE --data DIR", 2)
				}
				ac, ctx, cancel := adminClient(c)
				defer cancel()
				var req *coordinator.ExplainRequest
				if c.IsSet("method") || c.IsSet("path") || c.IsSet("claim") {
					req = &coordinator.ExplainRequest{Method: c.String("method"), Path: c.String("path"), Claims: c.StringSlice("claim")}
				}
				ex, err := ac.ExplainPolicyRequest(ctx, c.String("from"), c.String("to"), req)
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(ex)
				}
				verdict := "denied"
				if ex.Allow {
					verdict = "allowed"
				}
				by := "no rule matched"
				if ex.Rule > 0 {
					by = fmt.Sprintf("rule %d (line %d)", ex.Rule, ex.Line)
				}
				to := ex.Service
				if ex.Request != "" {
					to += " " + ex.Request
				}
				fmt.Printf("%s → %s: %s by %s: %s\n", ex.From, to, verdict, by, ex.Why)
				return nil
			},
		}},
	}
}

// readPolicyArg reads the FILE argument ("-" is standard input).
func readPolicyArg(c *cli.Context, usage string) (file, text string, err error) {
	if c.NArg() != 1 {
		return "", "", cli.Exit("usage: "+usage, 2)
	}
	file = c.Args().First()
	var b []byte
	if file == "-" {
		b, err = io.ReadAll(io.LimitReader(os.Stdin, policy.MaxSize+1))
		file = "stdin"
	} else {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		return "", "", cli.Exit(fmt.Sprintf("read the policy: %v", err), 1)
	}
	return file, string(b), nil
}

// policyErrText is the coordinator's message without its error code.
func policyErrText(err error) string {
	var we *wire.Error
	if errors.As(err, &we) {
		return we.Message
	}
	return err.Error()
}

func writePolicyChange(w io.Writer, pc coordinator.PolicyChange) {
	fmt.Fprintln(w, "policy set.")
	if pc.Unchanged {
		fmt.Fprintln(w, "no node gains or loses access to any service now provided.")
		return
	}
	for _, g := range pc.Granted {
		fmt.Fprintln(w, "+ "+g)
	}
	for _, r := range pc.Revoked {
		fmt.Fprintln(w, "- "+r)
	}
}
