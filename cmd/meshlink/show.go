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

func newLocalClient(c *cli.Context) *localapi.Client { return localapi.NewClient(stateDir(c)) }

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
		Flags: []cli.Flag{stateFlag(), jsonFlag()},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			s, err := newLocalClient(c).Services(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(toServicesJSON(s))
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERVICE\tLOCAL ADDRESS\tPROVIDERS\tOPEN\tSTATE")
			var notes []string // how to get the real port of a privileged one
			for _, sv := range s.Consumed {
				var ps []string
				for _, p := range sv.Providers {
					st := p.Name
					switch {
					case p.Local:
						st += "(local)"
					case !p.Online:
						st += "(offline)"
					case strings.HasPrefix(p.Health, "unhealthy"):
						st += "(unhealthy)"
					case !p.Healthy:
						st += "(failing)"
					}
					ps = append(ps, st)
				}
				state := "ok"
				switch {
				case !sv.Listening:
					state = "not listening: " + sv.Error
				case sv.Refusing != "":
					state = "refusing connections: " + sv.Refusing
				case sv.FallbackPort != 0:
					state = fmt.Sprintf("ok, on port %d: port %d needs privileges", sv.FallbackPort, sv.Port)
					notes = append(notes, sv.Name+": "+sv.Note)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", sv.Name, withProtocol(sv.Local.String(), sv.Protocol), strings.Join(ps, ","), openText(sv.Open, sv.Protocol, sv.UDP), state)
			}
			tw.Flush()
			for _, n := range notes {
				fmt.Println(n)
			}
			printProviders(s.Consumed)
			if len(s.Exported) > 0 {
				fmt.Println()
				tw = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "EXPORTED\tTARGET\tMESH PORT\tOPEN\tTOTAL\tDENIED\tANNOUNCED\tSET BY\tHEALTH")
				for _, e := range s.Exported {
					by := "meshlink expose (saved)"
					if exportSource(e) == localapi.SourceFlag {
						by = "agent --expose"
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%v\t%s\t%s\n", e.Name, withProtocol(e.Target, e.Protocol), e.Port, openText(e.Open, e.Protocol, e.UDP), e.Total, e.Denied, e.Announced, by, exportHealthText(e))
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
		Flags: []cli.Flag{stateFlag(), jsonFlag()},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			s, err := newLocalClient(c).Status(c.Context)
			if err != nil {
				return err
			}
			now := time.Now()
			if c.Bool("json") {
				return printJSON(toStatusJSON(s, now))
			}
			var addrs []string
			for _, a := range s.Self.Addresses {
				addrs = append(addrs, a.Addr().String())
			}
			if s.Coordinator.Joining {
				fmt.Printf("node:        %s (not joined yet)\n", s.Self.Name)
			} else {
				fmt.Printf("node:        %s (id %d) %s\n", s.Self.Name, s.Self.ID, strings.Join(addrs, " "))
			}
			fmt.Printf("key:         %s\n", s.Self.Key)
			fmt.Printf("key expiry:  %s\n", keyExpiry(s.Self, time.Now()))
			fmt.Printf("udp port:    %d\n", s.ListenPort)
			if s.DNS != "" {
				fmt.Printf("dns:         %s\n", s.DNS)
			}
			fmt.Printf("coordinator: %s\n", coordinatorLine(s.Coordinator, now))
			for i, r := range s.Relays {
				label := "relays:     "
				if i > 0 {
					label = "            "
				}
				rs := "connected"
				if !r.Connected {
					rs = "disconnected"
					if r.LastError != "" {
						rs += " (" + r.LastError + ")"
					}
				}
				fmt.Printf("%s %s %s %s\n", label, r.Name, r.URL, rs)
			}
			fmt.Println()
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PEER\tMESH IP\tPATH\tRTT\tHANDSHAKE\tRX\tTX\tSTATE")
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
				path := p.Path
				switch p.Path {
				case "direct":
					path = "direct " + p.Endpoint
				case "relay":
					path = "relayed via " + p.Relay + " (" + p.RelayURL + ")"
				}
				rtt := "-"
				if p.RTT > 0 {
					rtt = time.Duration(p.RTT).Round(time.Microsecond).String()
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, ip, path, rtt, hs, bytesStr(p.RxBytes), bytesStr(p.TxBytes), state)
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

func rotateKeyCmd() *cli.Command {
	return &cli.Command{
		Name:  "rotate-key",
		Usage: "give the running agent a new WireGuard key (proved to the coordinator with the old one); connections through the mesh survive",
		Flags: []cli.Flag{stateFlag()},
		Action: func(c *cli.Context) error {
			ctx, cancel := signalContext()
			defer cancel()
			res, err := newLocalClient(c).RotateKey(ctx)
			if err != nil {
				return err
			}
			fmt.Printf("rotated the node key; new public key %s\n", res.Key)
			return nil
		},
	}
}

// keyExpiry says when the node's key expires, or that it has and what to do.
func keyExpiry(n localapi.Node, now time.Time) string {
	switch {
	case n.KeyExpired:
		at := ""
		if !n.KeyExpiry.IsZero() {
			at = " at " + n.KeyExpiry.UTC().Format(time.RFC3339)
		}
		return "EXPIRED" + at + ": the coordinator refuses this node and its peers dropped it; join again (meshlink agent --join TOKEN with a new --state, or by web login)"
	case n.KeyExpiry.IsZero():
		return "never"
	default:
		return fmt.Sprintf("%s (in %s; rotated automatically before)", n.KeyExpiry.UTC().Format(time.RFC3339), ago(n.KeyExpiry.Sub(now)))
	}
}

// printProviders lists every provider of the consumed services with how
// connections are shared between them, when there is a choice to show.
func printProviders(svcs []localapi.Service) {
	rows := 0
	for _, sv := range svcs {
		rows += len(sv.Providers)
	}
	if rows == 0 {
		return
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tPROVIDER\tPRIORITY\tWEIGHT\tVERSION\tHEALTH\tOPEN\tSHARE\tTOTAL")
	for _, sv := range svcs {
		for _, p := range sv.Providers {
			w := p.Weight
			if w == 0 {
				w = 1
			}
			if pct, ok := sv.Split[p.Version]; ok {
				// The split decides between versions, not the weights.
				fmt.Fprintf(tw, "%s\t%s\t%d\tsplit %d%%\t%s\t%s\t%d\t%.0f%%\t%d\n", sv.Name, p.Name, p.Priority, pct, orDash(p.Version), orDash(p.Health), p.Open, p.Share*100, p.Selected)
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%d\t%.0f%%\t%d\n", sv.Name, p.Name, p.Priority, w, orDash(p.Version), orDash(p.Health), p.Open, p.Share*100, p.Selected)
		}
	}
	tw.Flush()
}

// exportHealthText is an export's health for people.
func exportHealthText(e localapi.Export) string {
	switch {
	case e.HealthCheck == "none":
		return "not checked"
	case e.Health == "":
		return "checking"
	}
	return e.Health
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
