package relay

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/meshlink/meshlink/internal/key"
)

func TestFrameRoundTrip(t *testing.T) {
	k := key.PublicFromRaw([key.Len]byte{0: 1, 31: 2})
	var stream []byte
	stream = appendFrame(stream, FrameServerInfo, nil, []byte(`{"version":1}`))
	stream = append(stream, packetFrame(FrameRecvPacket, k, []byte("pkt"))...)
	stream = append(stream, keepAliveFrame...)
	stream = appendFrame(stream, FramePeerGone, &k, nil)
	stream = appendFrame(stream, 99, nil, []byte("future"))
	br := bufio.NewReader(bytes.NewReader(stream))
	buf := make([]byte, MaxPayload)
	for _, want := range []struct {
		typ byte
		p   string
	}{
		{FrameServerInfo, `{"version":1}`},
		{FrameRecvPacket, string(k.AppendTo(nil)) + "pkt"},
		{FrameKeepAlive, ""},
		{FramePeerGone, string(k.AppendTo(nil))},
		{99, "future"},
	} {
		typ, p, err := readFrame(br, buf)
		if err != nil || typ != want.typ || string(p) != want.p {
			t.Fatalf("got %d %q %v, want %d %q", typ, p, err, want.typ, want.p)
		}
	}
	if _, _, err := readFrame(br, buf); err != io.EOF {
		t.Fatalf("at end: %v, want EOF", err)
	}
	// A truncated frame is an unexpected EOF, not a clean end.
	if _, _, err := readFrame(bufio.NewReader(bytes.NewReader(stream[:5])), buf); err != io.ErrUnexpectedEOF {
		t.Fatalf("truncated: %v", err)
	}
}

// FuzzReadFrame feeds arbitrary bytes to the frame reader: it must never
// panic, never return a payload larger than MaxPayload or inconsistent with
// its type, and never allocate (its buffer is fixed).
func FuzzReadFrame(f *testing.F) {
	var k key.Public
	f.Add(packetFrame(FrameSendPacket, k, []byte("hello")))
	f.Add(append(append([]byte{}, keepAliveFrame...), 7, 0, 1, 'x'))
	f.Add([]byte{FrameKeepAlive, 0, 1, 'x'})
	f.Add([]byte{FramePeerGone, 0, 31})
	f.Add([]byte{FrameSendPacket, 0xff, 0xff})
	f.Add([]byte{})
	buf := make([]byte, MaxPayload)
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(data), 64)
		consumed := 0
		for {
			typ, p, err := readFrame(br, buf)
			if err != nil {
				if !errors.Is(err, errMalformed) && err != io.EOF && err != io.ErrUnexpectedEOF {
					t.Fatalf("unexpected error kind: %v", err)
				}
				return
			}
			consumed += frameHeaderLen + len(p)
			if consumed > len(data) || len(p) > MaxPayload {
				t.Fatalf("payload of %d bytes from %d input bytes", len(p), len(data))
			}
			switch typ {
			case FrameSendPacket, FrameRecvPacket:
				if len(p) < KeyLen {
					t.Fatalf("type %d with %d bytes accepted", typ, len(p))
				}
			case FramePeerGone:
				if len(p) != KeyLen {
					t.Fatalf("peer gone with %d bytes accepted", len(p))
				}
			case FrameKeepAlive:
				if len(p) != 0 {
					t.Fatalf("keep-alive with %d bytes accepted", len(p))
				}
			}
		}
	})
}

func TestReadFrameDoesNotAllocate(t *testing.T) {
	var k key.Public
	frame := packetFrame(FrameSendPacket, k, make([]byte, 1400))
	r := bytes.NewReader(frame)
	br := bufio.NewReader(r)
	buf := make([]byte, MaxPayload)
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(frame)
		br.Reset(r)
		if _, _, err := readFrame(br, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("readFrame allocates %.1f times per frame", allocs)
	}
}
