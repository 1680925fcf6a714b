//go:build !agentonly

package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/coordinator/store"
)

func storeCmd() *cli.Command {
	return &cli.Command{
		Name:  "store",
		Usage: "work on a coordinator's database while no coordinator uses it",
		Subcommands: []*cli.Command{{
			Name:  "copy",
			Usage: "copy every row of one store into another, such as SQLite into PostgreSQL (stop the coordinators first), and check the row counts",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "from", Usage: "source store: sqlite:DIR (a coordinator's --data), sqlite:FILE or postgres://…", EnvVars: env("COPY_FROM")},
				&cli.StringFlag{Name: "to", Usage: "destination store: postgres://USER@HOST:PORT/DATABASE, sqlite:FILE …; migrated first, and it must be empty", EnvVars: env("COPY_TO")},
				&cli.BoolFlag{Name: "force", Usage: "replace what the destination holds", EnvVars: env("COPY_FORCE")},
				&cli.BoolFlag{Name: "json", Usage: "print the row counts as JSON", EnvVars: env("JSON")},
			},
			Action: func(c *cli.Context) error {
				from, to := c.String("from"), c.String("to")
				if from == "" || to == "" {
					return usageErrorf("meshlink store copy: needs --from and --to, such as --from sqlite:./meshlink-coordinator --to postgres://meshlink@db.example:5432/meshlink")
				}
				if from == to {
					return usageErrorf("meshlink store copy: --from and --to name the same store")
				}
				for _, s := range []string{from, to} {
					if err := refuseRunningCoordinator(s); err != nil {
						return err
					}
				}
				if p, ok := strings.CutPrefix(from, "sqlite:"); ok {
					if fi, err := os.Stat(p); err == nil && fi.IsDir() {
						p = filepath.Join(p, store.DefaultSQLiteFile)
					}
					if _, err := os.Stat(p); err != nil {
						return fmt.Errorf("--from %s: no database there (%v); name a coordinator's data directory (sqlite:DIR) or its %s", from, err, store.DefaultSQLiteFile)
					}
				}
				ctx, cancel := context.WithTimeout(c.Context, 30*time.Minute)
				defer cancel()
				src, err := store.Open(ctx, from, "", store.Options{})
				if err != nil {
					return fmt.Errorf("--from: %w", err)
				}
				defer src.Close()
				dst, err := store.Open(ctx, to, "", store.Options{})
				if err != nil {
					return fmt.Errorf("--to: %w", err)
				}
				defer dst.Close()
				counts, err := store.Copy(ctx, src, dst, c.Bool("force"))
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(counts)
				}
				var parts []string
				for _, tc := range counts {
					parts = append(parts, fmt.Sprintf("%s %d", tc.Table, tc.Rows))
				}
				fmt.Printf("copied, and the row counts match: %s\n", strings.Join(parts, ", "))
				return nil
			},
		}},
	}
}

// refuseRunningCoordinator refuses an SQLite store in a data directory
// whose coordinator is running (its admin socket answers): the copy would
// miss what it writes meanwhile.
func refuseRunningCoordinator(spec string) error {
	dir, ok := strings.CutPrefix(spec, "sqlite:")
	if !ok {
		return nil
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		dir = filepath.Dir(dir)
	}
	conn, err := net.DialTimeout("unix", filepath.Join(dir, "admin.sock"), time.Second)
	if err != nil {
		return nil
	}
	conn.Close()
	return fmt.Errorf("a coordinator is running with --data %s; stop it first, then copy", dir)
}
