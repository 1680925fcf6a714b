package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// version and commit are set by the build from git (the Makefile's build
// target: -ldflags "-X main.version=… -X main.commit=…"). A plain go build
// leaves them empty and buildInfo reads the VCS stamp instead.
var (
	version = ""
	commit  = ""
)

// versionInfo is what `meshlink version --json` prints.
type versionInfo struct {
	Version string `json:"version"`
	Commit  string `json:"commit"`
	// Modified is true when the commit had uncommitted changes on top.
	Modified bool   `json:"modified"`
	Go       string `json:"go"`
}

// buildInfo is this binary's version: the -ldflags values, else what the
// go command stamped into it (the module version, the VCS revision).
func buildInfo() versionInfo {
	v := versionInfo{Version: version, Commit: commit, Go: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if v.Commit == "" {
					v.Commit = s.Value
				}
			case "vcs.modified":
				v.Modified = v.Modified || s.Value == "true"
			}
		}
	}
	if strings.HasSuffix(v.Version, "-dirty") { // git describe --dirty
		v.Modified = true
	}
	if v.Version == "" {
		v.Version = "dev"
	}
	if v.Commit == "" {
		v.Commit = "unknown"
	}
	return v
}

func (v versionInfo) String() string {
	c := v.Commit
	if v.Modified {
		c += "+dirty"
	}
	return fmt.Sprintf("meshlink %s (commit %s, %s)", v.Version, c, v.Go)
}

func versionCmd() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version, commit and Go version of this binary",
		Flags: []cli.Flag{jsonFlag()},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			v := buildInfo()
			if c.Bool("json") {
				return printJSON(v)
			}
			fmt.Println(v)
			return nil
		},
	}
}

// jsonFlag is --json, taken by every command that reads something.
func jsonFlag() cli.Flag {
	return &cli.BoolFlag{Name: "json", Usage: "print JSON", EnvVars: env("JSON")}
}
