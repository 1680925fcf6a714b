package main

import (
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestEveryFlagHasAnEnvironmentVariable: sidecar containers are configured
// only through MESHLINK_* variables, so no flag may lack one.
func TestEveryFlagHasAnEnvironmentVariable(t *testing.T) {
	var walk func(prefix string, cmds []*cli.Command)
	walk = func(prefix string, cmds []*cli.Command) {
		for _, c := range cmds {
			for _, f := range c.Flags {
				type envFlag interface{ GetEnvVars() []string }
				ef, ok := f.(envFlag)
				if !ok || len(ef.GetEnvVars()) == 0 {
					t.Errorf("%s %s --%s has no environment variable", prefix, c.Name, f.Names()[0])
					continue
				}
				for _, e := range ef.GetEnvVars() {
					if !strings.HasPrefix(e, "MESHLINK_") {
						t.Errorf("%s --%s: variable %s lacks the MESHLINK_ prefix", c.Name, f.Names()[0], e)
					}
				}
			}
			walk(prefix+" "+c.Name, c.Subcommands)
		}
	}
	walk("meshlink", newApp().Commands)
}

// TestEnvironmentConfiguresAgent: a flag given only as a variable is seen.
func TestEnvironmentConfiguresAgent(t *testing.T) {
	t.Setenv("MESHLINK_STATE", t.TempDir())
	t.Setenv("MESHLINK_JOIN", "not-a-token")
	err := newApp().Run([]string{"meshlink", "agent"})
	if err == nil || !strings.Contains(err.Error(), "malformed join token") {
		t.Fatalf("agent configured by MESHLINK_JOIN: %v, want the malformed token error", err)
	}
}
