// Package relay carries WireGuard packets between nodes that cannot reach
// each other over UDP, over one outbound TLS connection per node and relay:
// the coordinator's HTTPS port, or a standalone `meshlink relay` (like
// Tailscale's DERP).
//
// The relay sees only encrypted WireGuard packets and public keys: it can
// neither read nor forge traffic. The source key it reports to a receiver is
// the key the sender authenticated with, never a key taken from the sender's
// frames, so nodes cannot pose as each other.
//
// Protocol: the client sends "GET Path" over HTTP/1.1 with
// "Connection: Upgrade", "Upgrade: Protocol", HeaderNodeKey with
// HeaderProof (see proof.go); the server
// answers 101 Switching Protocols and both sides then exchange frames:
//
//	[1 byte type][2 bytes big-endian payload length][payload]
//
// See the frame type constants for the payloads. The server's first frame is
// FrameServerInfo. Unknown frame types are skipped so that either side may
// add frames later; a malformed frame ends the connection.
package relay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/meshlink/meshlink/internal/key"
)

// The HTTP side of the relay connection. Every relay, embedded in the
// coordinator or standalone, serves Path.
const (
	// Path is a GET with "Upgrade: Protocol" over HTTP/1.1, HeaderNodeKey
	// and HeaderProof; after 101 Switching Protocols the connection carries
	// relay frames.
	Path = "/api/v1/relay"
	// Protocol is the Upgrade token of the relay connection.
	Protocol = "meshlink-relay/2"
	// HeaderNodeKey and HeaderProof authenticate a node to a relay: its
	// WireGuard public key, and a NaCl box from that key to the relay's key
	// sealing keying material exported from this very TLS session (see
	// makeProof in proof.go).
	HeaderNodeKey = "Meshlink-Node-Key"
	HeaderProof   = "Meshlink-Relay-Proof"
)

// Frame types.
const (
	// FrameSendPacket (client→server): 32-byte destination key + packet.
	FrameSendPacket = 1
	// FrameRecvPacket (server→client): 32-byte source key + packet.
	FrameRecvPacket = 2
	// FrameKeepAlive (both ways): empty.
	FrameKeepAlive = 3
	// FramePeerGone (server→client): 32-byte key of a destination that is
	// not connected to this relay.
	FramePeerGone = 4
	// FrameServerInfo (server→client, first frame): JSON ServerInfo.
	FrameServerInfo = 5
)

const (
	frameHeaderLen = 3
	// MaxPayload is the largest frame payload; the 16-bit length field
	// cannot say more.
	MaxPayload = 1<<16 - 1
	// MaxPacket is the largest packet Send accepts.
	MaxPacket = MaxPayload - KeyLen
	// KeyLen is the length of a WireGuard public key.
	KeyLen = key.Len
)

// ServerInfo is the payload of FrameServerInfo. Fields are only added.
type ServerInfo struct {
	Version int `json:"version"`
	// KeepAliveMS is how often the server sends keep-alives; the client
	// sends its own at the same interval and gives up on a silent server
	// after a few intervals. Zero means the default (30 s).
	KeepAliveMS int64 `json:"keepalive_ms,omitempty"`
}

// errMalformed wraps every protocol violation by the peer.
var errMalformed = errors.New("malformed frame")

// readFrame reads one frame into buf, which must hold MaxPayload bytes, and
// returns its type and payload (a slice of buf, valid until the next call).
// It never allocates: the 16-bit length bounds every frame.
func readFrame(r *bufio.Reader, buf []byte) (typ byte, payload []byte, err error) {
	// The header goes through buf too: a local array would escape to the
	// heap through io.ReadFull's interface.
	if len(buf) < frameHeaderLen {
		return 0, nil, errors.New("relay: frame buffer too small")
	}
	if _, err := io.ReadFull(r, buf[:frameHeaderLen]); err != nil {
		return 0, nil, err
	}
	typ = buf[0]
	n := int(binary.BigEndian.Uint16(buf[1:frameHeaderLen]))
	if n > len(buf) {
		return 0, nil, fmt.Errorf("%w: payload of %d bytes exceeds the buffer", errMalformed, n)
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	payload = buf[:n]
	switch typ {
	case FrameSendPacket, FrameRecvPacket, FramePeerGone:
		if n < KeyLen {
			return 0, nil, fmt.Errorf("%w: type %d with %d-byte payload, shorter than a key", errMalformed, typ, n)
		}
		if typ == FramePeerGone && n != KeyLen {
			return 0, nil, fmt.Errorf("%w: peer-gone payload of %d bytes", errMalformed, n)
		}
	case FrameKeepAlive:
		if n != 0 {
			return 0, nil, fmt.Errorf("%w: keep-alive with a %d-byte payload", errMalformed, n)
		}
	}
	return typ, payload, nil
}

// appendFrame appends a frame of type typ whose payload is key (if non-nil)
// followed by data. The caller checks the size.
func appendFrame(dst []byte, typ byte, k *key.Public, data []byte) []byte {
	n := len(data)
	if k != nil {
		n += KeyLen
	}
	dst = append(dst, typ, byte(n>>8), byte(n))
	if k != nil {
		dst = k.AppendTo(dst)
	}
	return append(dst, data...)
}

// packetFrame returns a fresh frame carrying key and pkt.
func packetFrame(typ byte, k key.Public, pkt []byte) []byte {
	return appendFrame(make([]byte, 0, frameHeaderLen+KeyLen+len(pkt)), typ, &k, pkt)
}
