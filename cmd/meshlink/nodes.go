//go:build !agentonly

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/coordinator"
)

func nodesCmd() *cli.Command {
	cmd := adminListCmd("nodes", "list, expire or remove the nodes of the mesh (talks to the coordinator running with --data)",
		(*coordinator.AdminClient).Nodes,
		func(nodes []coordinator.NodeInfo, asJSON bool) error {
			return writeNodes(os.Stdout, nodes, asJSON, time.Now())
		})
	cmd.Subcommands = []*cli.Command{
		adminNameCmd("expire", "make a node's key expire now: every peer drops it and it must join again",
			"usage: meshlink nodes expire NAME --data DIR (names as `meshlink nodes` lists them)",
			sayDone((*coordinator.AdminClient).ExpireNode, "node %s's key expired; its peers drop it, and it joins again with a new token and state directory\n")),
		adminNameCmd("remove", "revoke a node: every peer drops it, its open connections through the mesh close, and its secret stops working",
			"usage: meshlink nodes remove NAME --data DIR (names as `meshlink nodes` lists them)",
			sayDone((*coordinator.AdminClient).RemoveNode, "node %s removed; to bring the machine back, join it again with a new token\n")),
	}
	return cmd
}

// adminDataFlag is --data of the commands that talk to a running
// coordinator through the admin socket in its data directory.
func adminDataFlag() cli.Flag {
	return &cli.StringFlag{Name: "data", Value: "./meshlink-coordinator", Usage: "the coordinator's data directory", EnvVars: env("DATA")}
}

// adminClient is the admin client of --data, with the context that bounds
// one command's calls (30 s).
func adminClient(c *cli.Context) (*coordinator.AdminClient, context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	return coordinator.NewAdminClient(c.String("data")), ctx, cancel
}

// adminListCmd is a command that reads one list through the admin socket
// of --data and writes it (a table, or JSON with --json).
func adminListCmd[T any](name, usage string, list func(*coordinator.AdminClient, context.Context) (T, error), write func(v T, asJSON bool) error) *cli.Command {
	return &cli.Command{
		Name:  name,
		Usage: usage,
		Flags: []cli.Flag{adminDataFlag(), jsonFlag()},
		Action: func(c *cli.Context) error {
			ac, ctx, cancel := adminClient(c)
			defer cancel()
			v, err := list(ac, ctx)
			if err != nil {
				return err
			}
			return write(v, c.Bool("json"))
		},
	}
}

// sayDone is an adminNameCmd call that answers only an error: once it
// succeeded, the command prints format with the name.
func sayDone(call func(*coordinator.AdminClient, context.Context, string) error, format string) func(*coordinator.AdminClient, context.Context, string) (string, error) {
	return func(ac *coordinator.AdminClient, ctx context.Context, name string) (string, error) {
		if err := call(ac, ctx, name); err != nil {
			return "", err
		}
		return fmt.Sprintf(format, name), nil
	}
}

// adminNameCmd is a subcommand that takes one NAME and --data, makes one
// admin call with it, and prints what the call returns with its outcome
// (only when it succeeded). usageLine is what a wrong number of arguments
// gets (exit status 2).
func adminNameCmd(name, usage, usageLine string, do func(ac *coordinator.AdminClient, ctx context.Context, name string) (done string, err error)) *cli.Command {
	return &cli.Command{
		Name:      name,
		Usage:     usage,
		ArgsUsage: "NAME",
		Flags:     []cli.Flag{adminDataFlag()},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit(usageLine, 2)
			}
			ac, ctx, cancel := adminClient(c)
			defer cancel()
			done, err := do(ac, ctx, c.Args().First())
			if err != nil {
				return err
			}
			fmt.Print(done)
			return nil
		},
	}
}

// writeNodes prints nodes as a table, or as JSON (the admin socket's
// NodeInfo, key_expiry null for never).
func writeNodes(w io.Writer, nodes []coordinator.NodeInfo, asJSON bool, now time.Time) error {
	if asJSON {
		if nodes == nil {
			nodes = []coordinator.NodeInfo{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(nodes)
	}
	if len(nodes) == 0 {
		_, err := fmt.Fprintln(w, "no nodes yet; join one with `meshlink token create` and `meshlink agent --join TOKEN`")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tOWNER\tTAGS\tADDRESSES\tONLINE\tLAST SEEN\tKEY EXPIRY")
	for _, n := range nodes {
		owner := n.Owner
		if owner == "" {
			owner = "-"
		}
		tags := strings.Join(n.Tags, ",")
		if tags == "" {
			tags = "-"
		}
		var addrs []string
		for _, a := range n.Addresses {
			addrs = append(addrs, a.Addr().String())
		}
		online, seen := "no", "never"
		if n.Online {
			online, seen = "yes", "now"
		} else if !n.LastSeen.IsZero() {
			seen = ago(now.Sub(n.LastSeen)) + " ago"
		}
		expiry := "never"
		if n.KeyExpiry != nil {
			expiry = n.KeyExpiry.UTC().Format(time.RFC3339)
			if !now.Before(*n.KeyExpiry) {
				expiry += " (expired)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, owner, tags, strings.Join(addrs, ","), online, seen, expiry)
	}
	return tw.Flush()
}
