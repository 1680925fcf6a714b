package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/meshlink/meshlink/agent"
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

func TestFlagsAfterArguments(t *testing.T) {
	app := newApp()
	cases := []struct{ in, want string }{
		{"meshlink expose web 127.0.0.1:80 --state ./b --port 81", "meshlink expose --state ./b --port 81 -- web 127.0.0.1:80"},
		{"meshlink unexpose web --state=./b", "meshlink unexpose --state=./b -- web"},
		{"meshlink ping siteb --state ./a -c 1", "meshlink ping --state ./a -c 1 -- siteb"},
		{"meshlink services --json --state ./a", "meshlink services --json --state ./a"},
		{"meshlink connect web --state ./a --listen 127.0.0.1:9000", "meshlink connect --state ./a --listen 127.0.0.1:9000 -- web"},
		{"meshlink connect --stdio ssh --state ./a", "meshlink connect --stdio --state ./a -- ssh"},
		{"meshlink token inspect TOKEN", "meshlink token inspect -- TOKEN"},
		{"meshlink agent --join T --expose a=1:2 --expose b=3:4", "meshlink agent --join T --expose a=1:2 --expose b=3:4"},
	}
	for _, tc := range cases {
		got := strings.Join(flagsFirst(app, strings.Fields(tc.in)), " ")
		if got != tc.want {
			t.Errorf("%s\n got  %s\n want %s", tc.in, got, tc.want)
		}
	}
	// And the documented form runs: the error is about the missing agent,
	// not about usage.
	dir := t.TempDir()
	err := app.Run(flagsFirst(app, []string{"meshlink", "expose", "web", "127.0.0.1:80", "--state", dir}))
	if err == nil || !strings.Contains(err.Error(), "no agent is running with --state "+dir) {
		t.Fatalf("expose with flags last: %v", err)
	}
}

// TestAgentConfig: flags and MESHLINK_* variables reach agent.Config.
func TestAgentConfig(t *testing.T) {
	cases := []struct {
		name string
		env  map[string]string
		args []string
		want func(agent.Config) bool
	}{
		{"pipeline default", nil, nil,
			func(c agent.Config) bool { return c.PipelinePackets == agent.DefaultPipelinePackets }},
		{"pipeline from environment", map[string]string{"MESHLINK_PIPELINE_PACKETS": "512"}, nil,
			func(c agent.Config) bool { return c.PipelinePackets == 512 }},
		{"pipeline flag", nil, []string{"--pipeline-packets", "64"},
			func(c agent.Config) bool { return c.PipelinePackets == 64 }},
		{"proxy range default", nil, nil,
			func(c agent.Config) bool { return c.ProxyRange.String() == agent.DefaultProxyRange }},
		{"dns allow flag", nil, []string{"--dns-allow", "10.0.0.0/8,fd00::/8", "--dns-allow", "192.0.2.7"},
			func(c agent.Config) bool {
				return fmt.Sprint(c.DNSAllow) == "[10.0.0.0/8 fd00::/8 192.0.2.7/32]"
			}},
		{"dns allow from environment", map[string]string{"MESHLINK_DNS_ALLOW": "10.1.0.0/16"}, nil,
			func(c agent.Config) bool { return fmt.Sprint(c.DNSAllow) == "[10.1.0.0/16]" }},
		{"tracing off by default", nil, nil,
			func(c agent.Config) bool {
				return !c.Tracing.Enabled() && c.Tracing.Sample == 1 && !c.Tracing.IgnoreParent && c.AccessLog == ""
			}},
		{"tracing flags", nil, []string{"--otlp-endpoint", "127.0.0.1:4318", "--trace-sample", "0.1", "--access-log", "-", "--trace-service", "edge"},
			func(c agent.Config) bool {
				t := c.Tracing
				return t.Endpoint == "127.0.0.1:4318" && t.Sample == 0.1 && !t.IgnoreParent && t.ServiceName == "edge" && c.AccessLog == "-"
			}},
		{"OpenTelemetry environment", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t",
			"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_SERVICE_NAME": "svc"}, nil,
			func(c agent.Config) bool {
				t := c.Tracing
				return t.Endpoint == "http://c:4318" && t.TracesEndpoint == "http://c:4318/t" && t.Protocol == "grpc" && t.Sample == 0.25 && t.IgnoreParent && t.ServiceName == "svc"
			}},
		{"meshlink variables win over OpenTelemetry's", map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t", "MESHLINK_OTLP_ENDPOINT": "j:4318",
			"OTEL_TRACES_SAMPLER": "always_off", "MESHLINK_TRACE_SAMPLE": "0.5", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "MESHLINK_OTLP_PROTOCOL": "http/protobuf"}, nil,
			func(c agent.Config) bool {
				t := c.Tracing
				return t.Endpoint == "j:4318" && t.TracesEndpoint == "" && t.Sample == 0.5 && !t.IgnoreParent && t.Protocol == "http/protobuf"
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var got agent.Config
			cmd := agentCmd()
			cmd.Action = func(c *cli.Context) error {
				var err error
				got, err = agentConfig(c)
				return err
			}
			app := &cli.App{Name: "meshlink", Commands: []*cli.Command{cmd}}
			if err := app.Run(append([]string{"meshlink", "agent"}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			if !tc.want(got) {
				t.Errorf("config %+v", got)
			}
		})
	}
}

// TestDNSOpenResolverRefused: --dns on a non-loopback address without
// --dns-allow would serve the world; the agent refuses to start and says
// what to give. A bad --dns-allow is named.
func TestDNSOpenResolverRefused(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--dns", "0.0.0.0:5353"}, "--dns-allow CIDR"},
		{[]string{"--dns", "[::]:5353"}, "open resolver"},
		{[]string{"--dns", "0.0.0.0:5353", "--dns-allow", "10.0.0.0/33"}, `--dns-allow "10.0.0.0/33": want a network such as 10.0.0.0/8`},
	}
	for _, tc := range cases {
		args := append([]string{"meshlink", "agent", "--state", t.TempDir(), "--join", "not-a-token"}, tc.args...)
		err := newApp().Run(args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
	// With --dns-allow the DNS check passes and the agent goes on to the
	// next problem: the token.
	err := newApp().Run([]string{"meshlink", "agent", "--state", t.TempDir(), "--join", "not-a-token", "--dns", "0.0.0.0:5353", "--dns-allow", "10.0.0.0/8"})
	if err == nil || !strings.Contains(err.Error(), "malformed join token") {
		t.Errorf("with --dns-allow: %v, want the malformed token error", err)
	}
}

// TestTracingConfigRefused: a bad sampling share, protocol or sampler is
// named at start.
func TestTracingConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{nil, []string{"--trace-sample", "2"}, "--trace-sample 2"},
		{nil, []string{"--otlp-protocol", "thrift"}, "--otlp-protocol \"thrift\""},
		{map[string]string{"OTEL_TRACES_SAMPLER": "jaeger_remote"}, nil, "OTEL_TRACES_SAMPLER"},
		{nil, []string{"--cpus", "-1"}, "--cpus -1: want 1 or more"},
		{nil, []string{"--memory-limit", "lots"}, `--memory-limit: "lots" is not a size`},
	} {
		t.Run(tc.want, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cmd := agentCmd()
			cmd.Action = func(c *cli.Context) error { _, err := agentConfig(c); return err }
			app := &cli.App{Name: "meshlink", Commands: []*cli.Command{cmd}}
			err := app.Run(append([]string{"meshlink", "agent"}, tc.args...))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}
