package nettest

import (
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// recordBind is a conn.Bind whose Send reports each datagram on a channel
// (while it has room).
type recordBind struct {
	sent chan []byte
}

func (recordBind) Open(uint16) ([]conn.ReceiveFunc, uint16, error) { return nil, 0, nil }
func (recordBind) Close() error                                    { return nil }
func (recordBind) SetMark(uint32) error                            { return nil }
func (recordBind) BatchSize() int                                  { return conn.IdealBatchSize }
func (recordBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	return &conn.StdNetEndpoint{AddrPort: netip.MustParseAddrPort(s)}, nil
}

func (b recordBind) Send(bufs [][]byte, _ conn.Endpoint) error {
	for _, buf := range bufs {
		select {
		case b.sent <- append([]byte(nil), buf...):
		default:
		}
	}
	return nil
}

func newTestLink(t *testing.T) (*Link, chan []byte) {
	sent := make(chan []byte, 1024)
	l := newLink(recordBind{sent})
	go l.run()
	t.Cleanup(l.close)
	return l, sent
}

var (
	dataMsg      = []byte{4, 0, 0, 0, 'd'}
	handshakeMsg = []byte{1, 0, 0, 0, 'h'}
)

// expect waits up to a second for the next datagram the Link passes on.
func expect(t *testing.T, sent chan []byte, want []byte) time.Time {
	t.Helper()
	select {
	case got := <-sent:
		if string(got) != string(want) {
			t.Fatalf("passed %q, want %q", got, want)
		}
		return time.Now()
	case <-time.After(time.Second):
		t.Fatalf("%q not passed on", want)
		return time.Time{}
	}
}

// expectNothing checks that nothing is passed on within d.
func expectNothing(t *testing.T, sent chan []byte, d time.Duration) {
	t.Helper()
	select {
	case got := <-sent:
		t.Fatalf("passed %q, want nothing", got)
	case <-time.After(d):
	}
}

func TestLinkLossAndHandshakes(t *testing.T) {
	l, sent := newTestLink(t)
	l.SetLoss(1)
	l.send([][]byte{dataMsg, handshakeMsg, dataMsg}, nil)
	expect(t, sent, handshakeMsg)
	expectNothing(t, sent, 20*time.Millisecond)
	if st := l.Stats(); st.Dropped != 2 || st.Sent != 0 {
		t.Fatalf("stats %+v, want 2 dropped", st)
	}

	l.SetLoss(0.5)
	const n = 4000
	for range n {
		l.send([][]byte{dataMsg}, nil)
	}
	st := l.Stats()
	if got := float64(st.Dropped-2) / n; got < 0.45 || got > 0.55 {
		t.Errorf("dropped %.3f of packets, want ~0.5", got)
	}
}

func TestLinkDelay(t *testing.T) {
	l, sent := newTestLink(t)
	const d = 30 * time.Millisecond
	l.SetDelay(d)
	start := time.Now()
	l.send([][]byte{dataMsg}, nil)
	l.send([][]byte{handshakeMsg}, nil)
	if got := expect(t, sent, dataMsg).Sub(start); got < d {
		t.Errorf("delivered after %v, want ≥ %v", got, d)
	}
	expect(t, sent, handshakeMsg) // order is kept
}

func TestLinkBlackout(t *testing.T) {
	l, sent := newTestLink(t)
	l.SetDelay(50 * time.Millisecond)
	l.send([][]byte{dataMsg}, nil)      // in flight when the link goes dark
	l.send([][]byte{handshakeMsg}, nil) // never dropped
	up := l.Blackout(200 * time.Millisecond)
	l.send([][]byte{dataMsg}, nil)
	expect(t, sent, handshakeMsg)
	if st := l.Stats(); st.Dropped != 2 {
		t.Fatalf("stats %+v, want the in-flight and the new packet dropped", st)
	}
	select {
	case <-sent:
		t.Fatal("packet passed during the blackout")
	case <-time.After(time.Until(up)):
	}
	l.send([][]byte{dataMsg}, nil)
	expect(t, sent, dataMsg)
}

func TestLinkRate(t *testing.T) {
	l, sent := newTestLink(t)
	// 1000 B/s with 20 ms of queue: a 5-byte packet takes 5 ms to send, so
	// of ten sent at once the first five fit.
	l.SetRate(1000, 20*time.Millisecond)
	for range 10 {
		l.send([][]byte{dataMsg}, nil)
	}
	for range 5 {
		expect(t, sent, dataMsg)
	}
	expectNothing(t, sent, 50*time.Millisecond)
	if st := l.Stats(); st.Sent != 5 || st.Dropped != 5 {
		t.Fatalf("stats %+v, want 5 sent and 5 dropped", st)
	}
}
