package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/wire"
)

// tokenInspectFlags are `meshlink token inspect`'s.
func tokenInspectFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "offline", Usage: "decode the token only; do not ask its coordinator about it", EnvVars: env("TOKEN_OFFLINE")},
		jsonFlag(),
	}
}

// tokenReport is what `meshlink token inspect --json` prints: what the
// token says, and (unless --offline) what its coordinator said of it.
// Keys are always present; null is "unknown" (offline, or the coordinator
// could not say) or, for expires, never.
type tokenReport struct {
	Coordinator string     `json:"coordinator"`
	Fingerprint string     `json:"fingerprint"`
	ID          string     `json:"id"`
	Expires     *time.Time `json:"expires"`
	Expired     bool       `json:"expired"`
	// Checked is true when the coordinator answered; the fields below
	// are then its word.
	Checked   bool     `json:"checked"`
	Error     *string  `json:"error"`
	UsesLeft  *int     `json:"uses_left"` // -1: reusable
	Reusable  *bool    `json:"reusable"`
	Ephemeral *bool    `json:"ephemeral"`
	Relay     *bool    `json:"relay"`
	Revoked   *bool    `json:"revoked"`
	Tags      []string `json:"tags"`
}

func tokenInspect(c *cli.Context) error {
	if err := wantArgs(c, 1, "TOKEN"); err != nil {
		return err
	}
	t, err := wire.ParseToken(c.Args().First())
	if err != nil {
		return usageErrorf("%s: %v", commandName(c), err)
	}
	r := tokenReport{Coordinator: t.URL, Fingerprint: t.Fingerprint, ID: t.ID, Tags: []string{}}
	if exp := t.ExpiresAt(); !exp.IsZero() {
		r.Expires = &exp
	}
	if !c.Bool("offline") {
		if !c.Bool("json") {
			fmt.Fprintf(os.Stderr, "asking the coordinator at %s about this token (--offline decodes it only)\n", t.URL)
		}
		ctx, cancel := context.WithTimeout(c.Context, 10*time.Second)
		defer cancel()
		info, err := agent.InspectToken(ctx, t)
		if err != nil {
			msg := err.Error()
			r.Error = &msg
		} else {
			r.Checked = true
			r.UsesLeft, r.Reusable, r.Ephemeral, r.Relay, r.Revoked = &info.UsesLeft, &info.Reusable, &info.Ephemeral, &info.Relay, &info.Revoked
			r.Expires = nil
			if !info.Expires.IsZero() {
				r.Expires = &info.Expires
			}
			if info.Tags != nil {
				r.Tags = info.Tags
			}
		}
	}
	r.Expired = r.Expires != nil && time.Now().After(*r.Expires)
	if c.Bool("json") {
		return printJSON(r)
	}
	writeTokenReport(os.Stdout, r, c.Bool("offline"))
	return nil
}

func writeTokenReport(w io.Writer, r tokenReport, offline bool) {
	fmt.Fprintf(w, "coordinator: %s\n", r.Coordinator)
	fmt.Fprintf(w, "fingerprint: %s\n", r.Fingerprint)
	fmt.Fprintf(w, "id:          %s\n", r.ID)
	exp := "never"
	if r.Expires != nil {
		exp = r.Expires.Format(time.RFC3339)
		if r.Expired {
			exp += " (expired)"
		}
	}
	fmt.Fprintf(w, "expires:     %s\n", exp)
	switch {
	case offline:
		fmt.Fprintf(w, "uses left:   unknown (--offline: the coordinator was not asked)\n")
		return
	case !r.Checked:
		fmt.Fprintf(w, "uses left:   unknown (%s)\n", *r.Error)
		return
	}
	uses := fmt.Sprint(*r.UsesLeft)
	if *r.UsesLeft < 0 {
		uses = "unlimited (reusable)"
	}
	fmt.Fprintf(w, "uses left:   %s\n", uses)
	if *r.Relay {
		fmt.Fprintf(w, "kind:        relay (meshlink relay --join)\n")
	}
	if *r.Ephemeral {
		fmt.Fprintf(w, "ephemeral:   yes\n")
	}
	if len(r.Tags) > 0 {
		fmt.Fprintf(w, "tags:        %s\n", strings.Join(r.Tags, ","))
	}
	if *r.Revoked {
		fmt.Fprintf(w, "revoked:     yes\n")
	}
}
