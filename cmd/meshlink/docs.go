package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/urfave/cli/v2"
)

// docsHeader opens docs/cli.md: the file is generated, and says how.
const docsHeader = "<!-- Generated from the CLI definitions in cmd/meshlink by `make docs`; do not edit. -->\n\n"

// genDocs renders the CLI reference from app: docs/cli.md, and man pages
// docs/man/meshlink.1 (every command) and docs/man/meshlink-CMD.1 (one per
// command), keyed by their path under the docs directory.
func genDocs(app *cli.App) (map[string][]byte, error) {
	app.Version = "" // the reference must not change with each build
	var fill func(prefix string, cmds []*cli.Command)
	fill = func(prefix string, cmds []*cli.Command) {
		for _, c := range cmds {
			if c.UsageText == "" {
				c.UsageText = strings.TrimSpace(prefix + " " + c.Name + " [options] " + c.ArgsUsage)
				if len(c.Subcommands) > 0 {
					c.UsageText = prefix + " " + c.Name + " COMMAND [options]"
				}
			}
			fill(prefix+" "+c.Name, c.Subcommands)
		}
	}
	fill("meshlink", app.Commands)
	out := map[string][]byte{}
	md, err := app.ToMarkdown()
	if err != nil {
		return nil, err
	}
	out["cli.md"] = []byte(docsHeader + md)
	man, err := app.ToManWithSection(1)
	if err != nil {
		return nil, err
	}
	out[filepath.Join("man", "meshlink.1")] = []byte(man)
	for _, c := range app.Commands {
		if c.Hidden {
			continue
		}
		sub := &cli.App{
			Name: "meshlink-" + c.Name, Usage: c.Usage, Description: c.Description, UsageText: c.UsageText,
			Flags: c.Flags, Commands: c.Subcommands,
		}
		man, err := sub.ToManWithSection(1)
		if err != nil {
			return nil, fmt.Errorf("man page of %s: %w", c.Name, err)
		}
		out[filepath.Join("man", "meshlink-"+c.Name+".1")] = []byte(man)
	}
	return out, nil
}

// docsCmd writes the generated reference into a docs directory (`make
// docs`); hidden, since only the build uses it.
func docsCmd() *cli.Command {
	return &cli.Command{
		Name:      "gen-docs",
		Hidden:    true,
		Usage:     "write the CLI reference (cli.md, man/*.1) into DIR",
		ArgsUsage: "DIR",
		Action: func(c *cli.Context) error {
			if err := wantArgs(c, 1, "DIR"); err != nil {
				return err
			}
			dir := c.Args().First()
			files, err := genDocs(newApp())
			if err != nil {
				return err
			}
			// Man pages of commands that are gone go too.
			old, _ := filepath.Glob(filepath.Join(dir, "man", "meshlink*.1"))
			for _, p := range old {
				rel, _ := filepath.Rel(dir, p)
				if _, ok := files[rel]; !ok {
					os.Remove(p)
				}
			}
			names := make([]string, 0, len(files))
			for n := range files {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				p := filepath.Join(dir, n)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					return err
				}
				if err := os.WriteFile(p, files[n], 0o644); err != nil {
					return err
				}
			}
			fmt.Printf("wrote %d files under %s\n", len(names), dir)
			return nil
		},
	}
}
