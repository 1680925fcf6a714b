package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/agent/localapi"
)

func leaveCmd() *cli.Command {
	return &cli.Command{
		Name:  "leave",
		Usage: "remove this node from the mesh and delete its state (the running agent stops)",
		Description: "Tells the coordinator to delete this node (its peers drop it within seconds), then deletes\n" +
			"the node's key, credentials, exports and cached network map from the state directory. The\n" +
			"agent, if running, stops. Without an agent running, the node's credentials in --state are\n" +
			"used directly. To come back, join again with a new token.",
		Flags: []cli.Flag{
			stateFlag(),
			&cli.BoolFlag{Name: "force", Usage: "delete the state even if the coordinator cannot be told (then remove the node there: meshlink nodes remove NAME)", EnvVars: env("LEAVE_FORCE")},
		},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			dir := stateDir(c)
			ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
			defer cancel()
			var name, note string
			res, err := localapi.NewClient(dir).Leave(ctx, c.Bool("force"))
			if errors.Is(err, localapi.ErrNoAgent) {
				var r agent.LeaveResult
				r, err = agent.LeaveStateDir(ctx, dir, c.Bool("force"))
				name, note = r.Name, r.Note
			} else if err == nil {
				name, note = res.Name, res.Note
			}
			if err != nil {
				return err
			}
			fmt.Printf("%s left the mesh; its state in %s is deleted\n", name, dir)
			if note != "" {
				fmt.Println(note)
			}
			return nil
		},
	}
}
