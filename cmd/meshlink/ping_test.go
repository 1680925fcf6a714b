package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/meshlink/meshlink/agent/localapi"
)

// TestPinger: one line per answered round naming the path, a stop at the
// first direct pong, a repeated error printed once, and no retrying of a
// target that is no peer.
func TestPinger(t *testing.T) {
	relay := []localapi.PingResult{{Peer: "b", IP: "100.96.0.2", Path: "relay eu1", RTT: localapi.Duration(12 * time.Millisecond)}}
	direct := []localapi.PingResult{relay[0], {Peer: "b", IP: "100.96.0.2", Path: "direct 192.0.2.1:41641", Direct: true, RTT: localapi.Duration(time.Millisecond)}}
	offline := &localapi.Error{Code: localapi.CodeNoReply, Message: "b is offline (last seen 5m0s ago); no reply within 2s"}
	type answer struct {
		res []localapi.PingResult
		err error
	}
	cases := []struct {
		name    string
		answers []answer // one per round; the last repeats
		count   int
		want    string // stdout
		rounds  int    // pings sent
		wantErr string
	}{
		{"relay then direct", []answer{{res: relay}, {res: direct}}, 10,
			"pong from b (100.96.0.2) via relay eu1 in 12ms\npong from b (100.96.0.2) via direct 192.0.2.1:41641 in 1ms\n", 2, ""},
		{"never direct", []answer{{res: relay}}, 3,
			"pong from b (100.96.0.2) via relay eu1 in 12ms\npong from b (100.96.0.2) via relay eu1 in 12ms\npong from b (100.96.0.2) via relay eu1 in 12ms\nno direct path to b yet: traffic goes via relay eu1\n", 3, ""},
		{"offline: the error once", []answer{{err: offline}}, 4, offline.Message + "\n", 4, "no reply from b"},
		{"offline, then back", []answer{{err: offline}, {err: offline}, {res: direct}}, 10,
			offline.Message + "\npong from b (100.96.0.2) via direct 192.0.2.1:41641 in 1ms\n", 3, ""},
		{"no such peer", []answer{{err: &localapi.Error{Code: localapi.CodeNoPeer, Message: `no peer "b"`}}}, 10, "", 1, `no peer "b"`},
		{"no agent", []answer{{err: localapi.ErrNoAgent}}, 10, "", 1, "no agent"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			n := 0
			p := pinger{target: "b", count: tc.count, timeout: time.Second, untilDirect: true, out: &out,
				ping: func(ctx context.Context, node string, timeout time.Duration) ([]localapi.PingResult, error) {
					a := tc.answers[min(n, len(tc.answers)-1)]
					n++
					return a.res, a.err
				}}
			rep, err := p.run(context.Background())
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("error %v, want %q", err, tc.wantErr)
			}
			if out.String() != tc.want {
				t.Errorf("printed\n%s\nwant\n%s", out.String(), tc.want)
			}
			if n != tc.rounds {
				t.Errorf("%d pings, want %d", n, tc.rounds)
			}
			if rep == nil || tc.wantErr == "" && len(rep.Rounds) != tc.rounds {
				t.Errorf("report %+v", rep)
			}
		})
	}
	// Ctrl-C ends it without an error once something answered.
	ctx, cancel := context.WithCancel(context.Background())
	p := pinger{target: "b", count: 0, timeout: time.Second, out: &bytes.Buffer{}, every: time.Hour,
		ping: func(context.Context, string, time.Duration) ([]localapi.PingResult, error) {
			cancel()
			return relay, nil
		}}
	if _, err := p.run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("interrupted after a pong: %v", err)
	}
}
