package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent/localapi"
)

func newLocalClient(c *cli.Context) *localapi.Client { return localapi.NewClient(c.String("state")) }

func localapiExpose(name, target string, port uint16) localapi.ExposeRequest {
	return localapi.ExposeRequest{Name: name, Target: target, Port: port}
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func servicesCmd() *cli.Command {
	return &cli.Command{
		Name:  "services",
		Usage: "list the services this site can reach and those it exports",
		Flags: []cli.Flag{stateFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON", EnvVars: env("JSON")}},
		Action: func(c *cli.Context) error {
			s, err := newLocalClient(c).Services(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(s)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERVICE\tLOCAL ADDRESS\tPROVIDERS\tOPEN\tSTATE")
			for _, sv := range s.Consumed {
				var ps []string
				for _, p := range sv.Providers {
					st := p.Name
					switch {
					case p.Local:
						st += "(local)"
					case !p.Online:
						st += "(offline)"
					case !p.Healthy:
						st += "(failing)"
					}
					ps = append(ps, st)
				}
				state := "ok"
				if !sv.Listening {
					state = "not listening: " + sv.Error
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", sv.Name, sv.Local, strings.Join(ps, ","), sv.Open, state)
			}
			tw.Flush()
			if len(s.Exported) > 0 {
				fmt.Println()
				tw = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "EXPORTED\tTARGET\tMESH PORT\tOPEN\tTOTAL\tDENIED\tANNOUNCED")
				for _, e := range s.Exported {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%v\n", e.Name, e.Target, e.Port, e.Open, e.Total, e.Denied, e.Announced)
				}
				tw.Flush()
			}
			return nil
		},
	}
}

func statusCmd() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show this node, its coordinator and its peers",
		Flags: []cli.Flag{stateFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON", EnvVars: env("JSON")}},
		Action: func(c *cli.Context) error {
			s, err := newLocalClient(c).Status(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(s)
			}
			var addrs []string
			for _, a := range s.Self.Addresses {
				addrs = append(addrs, a.Addr().String())
			}
			fmt.Printf("node:        %s (id %d) %s\n", s.Self.Name, s.Self.ID, strings.Join(addrs, " "))
			fmt.Printf("key:         %s\n", s.Self.Key)
			fmt.Printf("udp port:    %d\n", s.ListenPort)
			if s.DNS != "" {
				fmt.Printf("dns:         %s\n", s.DNS)
			}
			cs := "connected"
			if !s.Coordinator.Connected {
				cs = "disconnected"
				if s.Coordinator.LastError != "" {
					cs += " (" + s.Coordinator.LastError + ")"
				}
			}
			fmt.Printf("coordinator: %s %s\n\n", s.Coordinator.URL, cs)
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PEER\tMESH IP\tENDPOINT\tHANDSHAKE\tRX\tTX\tSTATE")
			for _, p := range s.Peers {
				ip := ""
				if len(p.Addresses) > 0 {
					ip = p.Addresses[0].Addr().String()
				}
				hs := "never"
				if !p.LastHandshake.IsZero() {
					hs = time.Since(p.LastHandshake).Round(time.Second).String() + " ago"
				}
				state := "online"
				if !p.Online {
					state = "offline"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, ip, p.Endpoint, hs, bytesStr(p.RxBytes), bytesStr(p.TxBytes), state)
			}
			return tw.Flush()
		},
	}
}

func bytesStr(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
