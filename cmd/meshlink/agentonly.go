//go:build agentonly

package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

// An agent-only build (go build -tags agentonly, make build-agent) leaves
// out the coordinator, its store (SQLite, PostgreSQL), console and OIDC:
// the sidecar image's binary. The coordinator side's commands stay in the
// command list, so that scripts and muscle memory get a clear answer
// rather than "unknown command".

// agentOnlyBuild tells the tests of the full CLI to stand aside.
const agentOnlyBuild = true

func coordinatorCmd() *cli.Command {
	return noCoordinator("coordinator", "run the coordinator")
}
func storeCmd() *cli.Command { return noCoordinator("store", "work on a coordinator's database") }
func usersCmd() *cli.Command { return noCoordinator("users", "manage the coordinator's accounts") }
func relaysCmd() *cli.Command {
	return noCoordinator("relays", "list or remove the coordinator's standalone relays")
}
func nodesCmd() *cli.Command {
	return noCoordinator("nodes", "list, expire or remove the mesh's nodes")
}
func policyCmd() *cli.Command { return noCoordinator("policy", "show or set the mesh's policy") }
func tokenCreateCmd() *cli.Command {
	return noCoordinator("create", "print a new join token")
}

// errNoCoordinator is what every coordinator command of this build says.
func errNoCoordinator(c *cli.Context) error {
	return fmt.Errorf("%s: this build has no coordinator (it is the agent-only build); use the full meshlink binary", c.Command.HelpName)
}

// noCoordinator stands in for a coordinator-side command: it takes any
// arguments and flags and says which binary has it.
func noCoordinator(name, usage string) *cli.Command {
	return &cli.Command{
		Name:            name,
		Usage:           usage + " (not in this agent-only build: use the full meshlink binary)",
		SkipFlagParsing: true,
		Action:          errNoCoordinator,
	}
}
