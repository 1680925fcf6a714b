package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent/localapi"
)

func pingCmd() *cli.Command {
	return &cli.Command{
		Name:      "ping",
		Usage:     "ping a node through the mesh, one line per round naming the path, until a direct path answers",
		ArgsUsage: "NODE|IP|FQDN",
		Flags: []cli.Flag{
			stateFlag(),
			&cli.IntFlag{Name: "count", Aliases: []string{"c"}, Value: 10, Usage: "most rounds of pings (0: until interrupted)", EnvVars: env("PING_COUNT")},
			&cli.DurationFlag{Name: "timeout", Value: 2 * time.Second, Usage: "wait for replies per round", EnvVars: env("PING_TIMEOUT")},
			&cli.BoolFlag{Name: "until-direct", Value: true, Usage: "stop once a direct path answers (--until-direct=false pings every round)", EnvVars: env("PING_UNTIL_DIRECT")},
			jsonFlag(),
		},
		Action: func(c *cli.Context) error {
			if err := wantArgs(c, 1, "NODE|IP|FQDN"); err != nil {
				return err
			}
			if c.Int("count") < 0 {
				return usageErrorf("%s: --count %d: want 0 (until interrupted) or more", commandName(c), c.Int("count"))
			}
			if t := c.Duration("timeout"); t <= 0 || t > time.Minute {
				return usageErrorf("%s: --timeout %s: want more than 0 and at most 1m", commandName(c), t)
			}
			ctx, cancel := signalContext()
			defer cancel()
			w := io.Writer(os.Stdout)
			if c.Bool("json") {
				w = io.Discard
			}
			p := pinger{ping: newLocalClient(c).Ping, target: c.Args().First(), count: c.Int("count"), timeout: c.Duration("timeout"),
				untilDirect: c.Bool("until-direct"), every: time.Second, out: w}
			rep, err := p.run(ctx)
			if c.Bool("json") && rep != nil {
				if perr := printJSON(rep); perr != nil {
					return perr
				}
			}
			return err
		},
	}
}

// pingReport is `meshlink ping --json`.
type pingReport struct {
	Target string `json:"target"`
	// Peer and IP are the node that answered; null before any answer.
	Peer    *string     `json:"peer"`
	IP      *string     `json:"ip"`
	Rounds  []pingRound `json:"rounds"`
	Replies int         `json:"replies"`
	// Direct is true once a direct path answered.
	Direct bool `json:"direct"`
}

// pingRound is one round: the path that answered (the direct one when
// several did) and its time, or the error.
type pingRound struct {
	Path   *string  `json:"path"`
	Direct bool     `json:"direct"`
	RTTMS  *float64 `json:"rtt_ms"`
	Error  *string  `json:"error"`
}

// pinger runs the rounds of `meshlink ping`.
type pinger struct {
	ping        func(ctx context.Context, node string, timeout time.Duration) ([]localapi.PingResult, error)
	target      string
	count       int // 0: until ctx ends
	timeout     time.Duration
	untilDirect bool
	every       time.Duration // between the starts of rounds
	out         io.Writer
}

// run pings until count rounds are done, a direct path answered (with
// untilDirect) or ctx ends. It prints one line per round that got an
// answer, and an error only when it differs from the last one printed: an
// offline peer is one line, not one per round. It fails when no round got
// an answer, or at once when the target is no peer.
func (p pinger) run(ctx context.Context) (*pingReport, error) {
	rep := &pingReport{Target: p.target, Rounds: []pingRound{}}
	lastErr := ""
	var lastPath string
	for i := 0; p.count == 0 || i < p.count; i++ {
		start := time.Now()
		res, err := p.ping(ctx, p.target, p.timeout)
		if err != nil && ctx.Err() != nil {
			break // Ctrl-C
		}
		if err != nil {
			var le *localapi.Error
			if errors.Is(err, localapi.ErrNoAgent) || !errors.As(err, &le) || le.Code == localapi.CodeNoPeer {
				return rep, err // asking again cannot help
			}
			msg := err.Error()
			rep.Rounds = append(rep.Rounds, pingRound{Error: &msg})
			if msg != lastErr {
				fmt.Fprintln(p.out, msg)
				lastErr = msg
			}
		} else {
			best := res[0]
			for _, r := range res {
				if r.Direct && (!best.Direct || r.RTT < best.RTT) {
					best = r
				}
			}
			rtt := time.Duration(best.RTT)
			rttMS := float64(rtt.Microseconds()) / 1000
			path := best.Path
			rep.Rounds = append(rep.Rounds, pingRound{Path: &path, Direct: best.Direct, RTTMS: &rttMS})
			rep.Replies++
			rep.Peer, rep.IP = &best.Peer, orNull(best.IP)
			lastErr, lastPath = "", path
			via := path
			if best.IP != "" {
				fmt.Fprintf(p.out, "pong from %s (%s) via %s in %s\n", best.Peer, best.IP, via, rtt.Round(time.Microsecond))
			} else {
				fmt.Fprintf(p.out, "pong from %s via %s in %s\n", best.Peer, via, rtt.Round(time.Microsecond))
			}
			if best.Direct {
				rep.Direct = true
				if p.untilDirect {
					return rep, nil
				}
			}
		}
		if p.count != 0 && i == p.count-1 {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(max(p.every-time.Since(start), 0)):
		}
		if ctx.Err() != nil {
			break
		}
	}
	if rep.Replies == 0 {
		if lastErr != "" {
			return rep, fmt.Errorf("no reply from %s", p.target)
		}
		return rep, fmt.Errorf("no reply from %s (interrupted)", p.target)
	}
	if !rep.Direct && p.untilDirect {
		fmt.Fprintf(p.out, "no direct path to %s yet: traffic goes via %s\n", p.target, lastPath)
	}
	return rep, nil
}
