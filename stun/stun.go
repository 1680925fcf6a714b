// Package stun implements the small part of STUN (RFC 5389) meshlink needs:
// Binding Requests and their success responses, so that an agent learns the
// public UDP address the coordinator sees it from, and a responder the
// coordinator runs on the UDP port matching its HTTPS port.
//
// Messages carry a FINGERPRINT attribute so that an agent which multiplexes
// STUN with WireGuard on one socket can tell them apart reliably; parsers
// check it when present and accept its absence.
package stun

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net/netip"
)

const (
	headerLen   = 20
	magicCookie = 0x2112A442

	typeBindingRequest = 0x0001
	typeBindingSuccess = 0x0101
	attrMappedAddress  = 0x0001
	attrXorMappedAddr  = 0x0020
	attrFingerprint    = 0x8028
	fingerprintXOR     = 0x5354554e
	fingerprintAttrLen = 8
	familyIPv4         = 0x01
	familyIPv6         = 0x02
	maxMessage         = 1 << 12 // far above anything a binding exchange needs
)

// ErrNotSTUN is returned for bytes that are not a STUN message at all.
var ErrNotSTUN = errors.New("stun: not a STUN message")

// IsSTUN is a cheap check of the header: the top two bits zero, the magic
// cookie at bytes 4-8 and a length that matches the message. WireGuard
// messages start with a type 1-4 and three zero bytes; a STUN Binding
// message has a nonzero second byte.
func IsSTUN(b []byte) bool {
	return len(b) >= headerLen && b[0]&0xc0 == 0 &&
		binary.BigEndian.Uint32(b[4:8]) == magicCookie &&
		int(binary.BigEndian.Uint16(b[2:4])) == len(b)-headerLen
}

// Request returns a Binding Request with transaction ID txid.
func Request(txid [12]byte) []byte {
	return finish(header(typeBindingRequest, txid))
}

// Response returns a Binding Success Response to txid carrying addr as
// XOR-MAPPED-ADDRESS.
func Response(txid [12]byte, addr netip.AddrPort) []byte {
	b := header(typeBindingSuccess, txid)
	ip := addr.Addr().Unmap()
	family, n := byte(familyIPv4), 4
	if ip.Is6() {
		family, n = familyIPv6, 16
	}
	b = binary.BigEndian.AppendUint16(b, attrXorMappedAddr)
	b = binary.BigEndian.AppendUint16(b, uint16(4+n))
	b = append(b, 0, family)
	b = binary.BigEndian.AppendUint16(b, addr.Port()^(magicCookie>>16))
	raw := ip.AsSlice()
	for i := range raw {
		raw[i] ^= b[4+i] // cookie then transaction ID, as laid out in the header
	}
	b = append(b, raw...)
	return finish(b)
}

func header(typ uint16, txid [12]byte) []byte {
	b := make([]byte, headerLen, 64)
	binary.BigEndian.PutUint16(b[0:], typ)
	binary.BigEndian.PutUint32(b[4:], magicCookie)
	copy(b[8:], txid[:])
	return b
}

// finish appends FINGERPRINT and sets the header's length.
func finish(b []byte) []byte {
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)-headerLen+fingerprintAttrLen))
	crc := crc32.ChecksumIEEE(b) ^ fingerprintXOR
	b = binary.BigEndian.AppendUint16(b, attrFingerprint)
	b = binary.BigEndian.AppendUint16(b, 4)
	return binary.BigEndian.AppendUint32(b, crc)
}

// message is a parsed STUN message.
type message struct {
	typ   uint16
	txid  [12]byte
	attrs [][2][]byte // type (2 bytes) and value, in order
}

// parse checks the header, walks the attributes and verifies FINGERPRINT.
func parse(b []byte) (m message, err error) {
	if len(b) > maxMessage || !IsSTUN(b) {
		return m, ErrNotSTUN
	}
	if len(b)%4 != 0 {
		return m, fmt.Errorf("stun: length %d is not a multiple of 4", len(b))
	}
	m.typ = binary.BigEndian.Uint16(b[0:2])
	copy(m.txid[:], b[8:20])
	for off := headerLen; off < len(b); {
		if len(b)-off < 4 {
			return m, errors.New("stun: truncated attribute header")
		}
		at := binary.BigEndian.Uint16(b[off:])
		n := int(binary.BigEndian.Uint16(b[off+2:]))
		end := off + 4 + n
		if end > len(b) {
			return m, fmt.Errorf("stun: attribute 0x%04x of %d bytes overruns the message", at, n)
		}
		val := b[off+4 : end]
		if at == attrFingerprint {
			if n != 4 || end != len(b) {
				return m, errors.New("stun: FINGERPRINT must be the last attribute and 4 bytes")
			}
			// The CRC covers the message up to the attribute, with the
			// header's length already counting it.
			if crc32.ChecksumIEEE(b[:off])^fingerprintXOR != binary.BigEndian.Uint32(val) {
				return m, errors.New("stun: FINGERPRINT mismatch")
			}
		}
		m.attrs = append(m.attrs, [2][]byte{b[off : off+2], val})
		off = end + (4-n%4)%4 // values are padded to 4 bytes
		if off > len(b) {
			return m, errors.New("stun: attribute padding overruns the message")
		}
	}
	return m, nil
}

// ParseRequest parses a Binding Request.
func ParseRequest(b []byte) (txid [12]byte, err error) {
	m, err := parse(b)
	if err != nil {
		return txid, err
	}
	if m.typ != typeBindingRequest {
		return txid, fmt.Errorf("stun: message type 0x%04x is not a Binding Request", m.typ)
	}
	return m.txid, nil
}

// ParseResponse parses a Binding Success Response and returns the mapped
// address: XOR-MAPPED-ADDRESS if present, else MAPPED-ADDRESS.
func ParseResponse(b []byte) (txid [12]byte, addr netip.AddrPort, err error) {
	m, err := parse(b)
	if err != nil {
		return txid, addr, err
	}
	if m.typ != typeBindingSuccess {
		return txid, addr, fmt.Errorf("stun: message type 0x%04x is not a Binding Success Response", m.typ)
	}
	var mapped netip.AddrPort
	for _, a := range m.attrs {
		switch binary.BigEndian.Uint16(a[0]) {
		case attrXorMappedAddr:
			ap, err := parseAddr(a[1], b[4:headerLen])
			if err != nil {
				return m.txid, addr, err
			}
			return m.txid, ap, nil
		case attrMappedAddress:
			if !mapped.IsValid() {
				if mapped, err = parseAddr(a[1], nil); err != nil {
					return m.txid, addr, err
				}
			}
		}
	}
	if !mapped.IsValid() {
		return m.txid, addr, errors.New("stun: response carries no mapped address")
	}
	return m.txid, mapped, nil
}

// parseAddr decodes a (XOR-)MAPPED-ADDRESS value; xor is the cookie and
// transaction ID for the XOR form, nil for the plain one.
func parseAddr(v, xor []byte) (netip.AddrPort, error) {
	if len(v) < 4 {
		return netip.AddrPort{}, errors.New("stun: short address attribute")
	}
	n := 0
	switch v[1] {
	case familyIPv4:
		n = 4
	case familyIPv6:
		n = 16
	default:
		return netip.AddrPort{}, fmt.Errorf("stun: unknown address family %d", v[1])
	}
	if len(v) != 4+n {
		return netip.AddrPort{}, fmt.Errorf("stun: address attribute of %d bytes for family %d", len(v), v[1])
	}
	port := binary.BigEndian.Uint16(v[2:4])
	var raw [16]byte
	copy(raw[:], v[4:])
	if xor != nil {
		port ^= magicCookie >> 16
		for i := range n {
			raw[i] ^= xor[i]
		}
	}
	ip, _ := netip.AddrFromSlice(raw[:n])
	return netip.AddrPortFrom(ip, port), nil
}
