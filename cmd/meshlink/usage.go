package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/urfave/cli/v2"
)

// Exit codes: a command called wrongly exits 2 with one line naming what
// was wrong; a command that was called right but failed exits 1.
const (
	exitFailure = 1
	exitUsage   = 2
)

// usageErrorf is a mistake in how a command was called. The message names
// the bad flag or argument; it should start with the command's name
// ("meshlink ping: …").
func usageErrorf(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), exitUsage)
}

// report prints err, if any, on w and returns the process's exit code.
func report(err error, w io.Writer) int {
	if err == nil {
		return 0
	}
	code := exitFailure
	var ec cli.ExitCoder
	if errors.As(err, &ec) && ec.ExitCode() != 0 {
		code = ec.ExitCode()
	}
	msg := strings.TrimSpace(err.Error())
	if msg == "" {
		return code
	}
	if !strings.HasPrefix(msg, "meshlink") {
		msg = "meshlink: " + msg
	}
	fmt.Fprintln(w, msg)
	return code
}

// commandName is how the command of c is typed: "meshlink token create".
func commandName(c *cli.Context) string {
	if c.Command != nil && c.Command.HelpName != "" {
		return c.Command.HelpName
	}
	return "meshlink"
}

// onUsageError turns the flag parser's errors into one line naming the
// flag, with a suggestion for a mistyped one.
func onUsageError(c *cli.Context, err error, _ bool) error {
	name := commandName(c)
	msg := err.Error()
	if f, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
		f = strings.TrimLeft(f, "-")
		msg = "unknown flag " + dashes(f)
		var names []string
		if c.Command != nil {
			for _, fl := range c.Command.Flags {
				names = append(names, fl.Names()...)
			}
		}
		for _, fl := range c.App.Flags {
			names = append(names, fl.Names()...)
		}
		if s := closest(f, names); s != "" {
			msg += "; did you mean " + dashes(s) + "?"
		}
	} else {
		// The flag package names flags with one dash: -state.
		for _, w := range strings.Fields(msg) {
			if len(w) > 2 && w[0] == '-' && w[1] != '-' {
				msg = strings.Replace(msg, w, "-"+w, 1)
			}
		}
	}
	return usageErrorf("%s: %s (%s --help lists the flags)", name, msg, name)
}

func dashes(flag string) string {
	if len(flag) == 1 {
		return "-" + flag
	}
	return "--" + flag
}

// unknownCommand is the error for a command name that is not one of cmds.
func unknownCommand(c *cli.Context, cmds []*cli.Command, got string) error {
	name := commandName(c)
	var names []string
	for _, sc := range cmds {
		if !sc.Hidden {
			names = append(names, sc.Names()...)
		}
	}
	if s := closest(got, names); s != "" {
		return usageErrorf("%s: unknown command %q; did you mean %q? (%s --help lists the commands)", name, got, s, name)
	}
	return usageErrorf("%s: unknown command %q (%s --help lists the commands)", name, got, name)
}

// noArgs refuses arguments to a command that takes none.
func noArgs(c *cli.Context) error {
	if c.NArg() == 0 {
		return nil
	}
	return usageErrorf("%s: unexpected argument %q; it takes none (%s --help)", commandName(c), c.Args().First(), commandName(c))
}

// wantArgs refuses a call with other than n arguments; what names them
// ("NODE", "NAME HOST:PORT").
func wantArgs(c *cli.Context, n int, what string) error {
	if c.NArg() == n {
		return nil
	}
	name := commandName(c)
	if c.NArg() < n {
		return usageErrorf("%s: missing %s (usage: %s %s)", name, what, name, what)
	}
	return usageErrorf("%s: unexpected argument %q (usage: %s %s)", name, c.Args().Get(n), name, what)
}

// checkCommands makes every command report usage errors the same way: flag
// errors through onUsageError, and a command that only groups others
// refuses an unknown one with a suggestion rather than printing its help.
func checkCommands(cmds []*cli.Command) {
	for _, cmd := range cmds {
		cmd.OnUsageError = onUsageError
		if len(cmd.Subcommands) > 0 {
			subs, action := cmd.Subcommands, cmd.Action
			cmd.Action = func(c *cli.Context) error {
				if c.NArg() > 0 {
					return unknownCommand(c, subs, c.Args().First())
				}
				if action == nil {
					return cli.ShowSubcommandHelp(c)
				}
				return action(c)
			}
		}
		checkCommands(cmd.Subcommands)
	}
}

// closest is the name in names nearest to s: one a few edits away, or the
// only one s begins. "" when none is close.
func closest(s string, names []string) string {
	best, bestD := "", -1
	var prefixed []string
	for _, n := range names {
		if strings.HasPrefix(n, s) {
			prefixed = append(prefixed, n)
		}
		d := editDistance(s, n)
		if d <= max(1, min(len(s), len(n))/3) && (bestD < 0 || d < bestD) {
			best, bestD = n, d
		}
	}
	if best == "" && len(prefixed) == 1 && len(s) >= 2 {
		return prefixed[0]
	}
	return best
}

// editDistance is the Damerau–Levenshtein distance (with adjacent
// transpositions: "stauts" is one edit from "status").
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return max(len(a), len(b)) // not a typo of a command name
	}
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}
