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
	data := &cli.StringFlag{Name: "data", Value: "./meshlink-coordinator", Usage: "the coordinator's data directory", EnvVars: env("DATA")}
	return &cli.Command{
		Name:  "nodes",
		Usage: "list, expire or remove the nodes of the mesh (talks to the coordinator running with --data)",
		Flags: []cli.Flag{data, &cli.BoolFlag{Name: "json", Usage: "print JSON", EnvVars: env("JSON")}},
		Action: func(c *cli.Context) error {
			ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
			defer cancel()
			nodes, err := coordinator.NewAdminClient(c.String("data")).Nodes(ctx)
			if err != nil {
				return err
			}
			return writeNodes(os.Stdout, nodes, c.Bool("json"), time.Now())
		},
		Subcommands: []*cli.Command{{
			Name:      "expire",
			Usage:     "make a node's key expire now: every peer drops it and it must join again",
			ArgsUsage: "NAME",
			Flags:     []cli.Flag{data},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return cli.Exit("usage: meshlink nodes expire NAME --data DIR (names as `meshlink nodes` lists them)", 2)
				}
				ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
				defer cancel()
				if err := coordinator.NewAdminClient(c.String("data")).ExpireNode(ctx, c.Args().First()); err != nil {
					return err
				}
				fmt.Printf("node %s's key expired; its peers drop it, and it joins again with a new token and state directory\n", c.Args().First())
				return nil
			},
		}, {
			Name:      "remove",
			Usage:     "revoke a node: every peer drops it, its open connections through the mesh close, and its secret stops working",
			ArgsUsage: "NAME",
			Flags:     []cli.Flag{data},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return cli.Exit("usage: meshlink nodes remove NAME --data DIR (names as `meshlink nodes` lists them)", 2)
				}
				ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
				defer cancel()
				if err := coordinator.NewAdminClient(c.String("data")).RemoveNode(ctx, c.Args().First()); err != nil {
					return err
				}
				fmt.Printf("node %s removed; to bring the machine back, join it again with a new token\n", c.Args().First())
				return nil
			},
		}},
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
