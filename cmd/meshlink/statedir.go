package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"
)

// legacyStateDir is the agent's state directory before per-user defaults:
// ./meshlink-state, relative to where the agent was started.
const legacyStateDir = "meshlink-state"

// stateDirDefaultText is how --state's default reads in help and docs (the
// value itself depends on the user running the command).
const stateDirDefaultText = "$XDG_STATE_HOME/meshlink, ~/.local/state/meshlink without it, /var/lib/meshlink as root"

// defaultStateDir is the agent's state directory when --state is not given:
// /var/lib/meshlink for root, $XDG_STATE_HOME/meshlink for anyone else
// (~/.local/state/meshlink when that is unset, or not absolute as the XDG
// base directory specification requires). uid and getenv are passed in so
// that tests can play any user.
func defaultStateDir(uid int, getenv func(string) string) string {
	if uid == 0 {
		return "/var/lib/meshlink"
	}
	if x := getenv("XDG_STATE_HOME"); x != "" && filepath.IsAbs(x) {
		return filepath.Join(x, "meshlink")
	}
	if h := getenv("HOME"); h != "" {
		return filepath.Join(h, ".local", "state", "meshlink")
	}
	return legacyStateDir
}

// stateFlag is --state, taken by the agent and every command that talks to
// it, and by the app itself so that it may come before the command
// (`meshlink --state DIR status`).
func stateFlag() cli.Flag {
	return &cli.StringFlag{Name: "state", Usage: "the agent's state directory", DefaultText: stateDirDefaultText, EnvVars: env("STATE")}
}

// stateDir is the --state given to the command or before it, else the
// default for this user. A node joined with the old default
// (./meshlink-state in the working directory) is still found there while
// the new default holds no node, so an upgrade does not strand it.
func stateDir(c *cli.Context) string {
	for _, cc := range c.Lineage() {
		if cc.Command == nil && cc.App == nil {
			continue
		}
		if cc.IsSet("state") {
			if s := cc.String("state"); s != "" {
				return s
			}
		}
	}
	dir := defaultStateDir(os.Geteuid(), os.Getenv)
	if dir != legacyStateDir && !hasNode(dir) && hasNode(legacyStateDir) {
		fmt.Fprintf(os.Stderr, "meshlink: using ./%s (the old default state directory); pass --state ./%s, or move it to %s\n", legacyStateDir, legacyStateDir, dir)
		return legacyStateDir
	}
	return dir
}

// hasNode reports whether dir holds a joined node's identity.
func hasNode(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "node.json"))
	return err == nil
}
