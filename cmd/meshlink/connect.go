package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent/localapi"
	"github.com/meshlink/meshlink/agent/proxy"
)

func connectCmd() *cli.Command {
	return &cli.Command{
		Name:      "connect",
		Usage:     "reach one service from a local port, or from stdin/stdout (ssh ProxyCommand)",
		ArgsUsage: "SERVICE",
		Flags: []cli.Flag{stateFlag(),
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:0", Usage: "local address to accept connections on (port 0 picks one)", EnvVars: env("CONNECT_LISTEN")},
			&cli.BoolFlag{Name: "stdio", Usage: "carry stdin and stdout to the service instead of listening (ssh -o ProxyCommand='meshlink connect --stdio ssh')", EnvVars: env("CONNECT_STDIO")},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return errors.New("connect: give one service name, e.g. meshlink connect web --state ./a")
			}
			name := c.Args().First()
			target, err := serviceAddr(c.Context, newLocalClient(c), name)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			if c.Bool("stdio") {
				return connectStdio(ctx, os.Stdin, os.Stdout, target)
			}
			ln, err := net.Listen("tcp", c.String("listen"))
			if err != nil {
				return fmt.Errorf("connect: --listen %s: %w; choose another address", c.String("listen"), err)
			}
			fmt.Fprintf(os.Stdout, "%s is at %s (Ctrl-C ends it)\n", name, ln.Addr())
			return connectListen(ctx, ln, target)
		},
	}
}

// serviceAddr asks the agent where it serves service name locally: connect
// goes through the agent's own listener, with its provider choice.
func serviceAddr(ctx context.Context, lc *localapi.Client, name string) (string, error) {
	s, err := lc.Services(ctx)
	if err != nil {
		return "", err
	}
	var known []string
	for _, sv := range s.Consumed {
		if sv.Name == name {
			if !sv.Listening {
				return "", fmt.Errorf("connect: the agent cannot serve %s locally: %s", name, sv.Error)
			}
			return sv.Local.String(), nil
		}
		known = append(known, sv.Name)
	}
	return "", fmt.Errorf("connect: no service %q in this site's network map (services: %v); see meshlink services", name, known)
}

// connectStdio carries in to target and target to out until target
// closes; the end of in is passed on as a half-close.
func connectStdio(ctx context.Context, in io.Reader, out io.Writer, target string) error {
	d := net.Dialer{Timeout: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	go func() {
		io.Copy(conn, in)
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	_, err = io.Copy(out, conn)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// connectListen accepts on ln until ctx ends and carries each connection
// to a new connection to target.
func connectListen(ctx context.Context, ln net.Listener, target string) error {
	var wg sync.WaitGroup
	var mu sync.Mutex // guards conns
	conns := map[net.Conn]bool{}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("connect: accept: %w", err)
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { mu.Lock(); delete(conns, c); mu.Unlock() }()
			d := net.Dialer{Timeout: 15 * time.Second}
			r, err := d.DialContext(ctx, "tcp", target)
			if err != nil {
				c.Close()
				return
			}
			mu.Lock()
			conns[r] = true
			mu.Unlock()
			defer func() { mu.Lock(); delete(conns, r); mu.Unlock() }()
			proxy.Splice(c, r, &proxy.Counters{})
		}()
	}
}
