// Package key is meshlink's one key type: Curve25519 keys as WireGuard uses
// them, for nodes and relays alike. A Private key is generated and clamped
// here and never leaves its site; a Public key travels in base64 (the form
// `wg` prints and the wire package carries) and is written to wireguard-go
// in hex (its UAPI form).
//
// Parsing rejects the all-zero key and the other low-order points: a
// Diffie-Hellman with them yields a shared secret anyone knows, so a node
// could register one and be impersonated without a private key.
package key

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/meshlink/meshlink/internal/atomicfile"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
)

// ErrInvalid is wrapped by every error about a malformed or unusable
// public key.
var ErrInvalid = errors.New("not a WireGuard public key (32 bytes, standard base64)")

// Len is the length of a key in bytes.
const Len = 32

// Private is a clamped Curve25519 private key. Its zero value is no key.
type Private struct{ k [Len]byte }

// NewPrivate returns a fresh random private key.
func NewPrivate() Private {
	var p Private
	rand.Read(p.k[:]) // never fails (crypto/rand crashes the program instead)
	p.clamp()
	return p
}

// PrivateFromRaw returns raw as a private key, clamped as RFC 7748 asks.
func PrivateFromRaw(raw [Len]byte) Private {
	p := Private{k: raw}
	p.clamp()
	return p
}

func (p *Private) clamp() {
	p.k[0] &= 248
	p.k[31] = (p.k[31] & 127) | 64
}

// ParsePrivate parses a base64 private key, as stored in a key file.
func ParsePrivate(s string) (Private, error) {
	var p Private
	raw, err := decode(s)
	if err != nil {
		return p, fmt.Errorf("key: private key: %w", err)
	}
	p = PrivateFromRaw(raw)
	if p.Public().IsZero() {
		return Private{}, errors.New("key: private key yields no public key")
	}
	return p, nil
}

// IsZero reports whether p is the zero value.
func (p Private) IsZero() bool { return p.k == [Len]byte{} }

// Equal reports whether p and o are the same key, in constant time.
func (p Private) Equal(o Private) bool { return subtle.ConstantTimeCompare(p.k[:], o.k[:]) == 1 }

// Public returns p's public key.
func (p Private) Public() Public {
	var pub Public
	if p.IsZero() {
		return pub
	}
	b, err := curve25519.X25519(p.k[:], curve25519.Basepoint)
	if err != nil {
		panic("key: X25519 with the base point failed: " + err.Error())
	}
	copy(pub.k[:], b)
	return pub
}

// Raw returns the key's bytes, for the box and X25519 primitives.
func (p Private) Raw() [Len]byte { return p.k }

// UAPI is the hex form wireguard-go's configuration protocol takes.
func (p Private) UAPI() string { return hex.EncodeToString(p.k[:]) }

// Base64 is the form kept in key files.
func (p Private) Base64() string { return base64.StdEncoding.EncodeToString(p.k[:]) }

// String never shows the key, so that logging one by mistake leaks nothing.
func (p Private) String() string { return "[private key]" }

// Public is a Curve25519 public key. Its zero value is no key, and encodes
// as the empty string.
type Public struct{ k [Len]byte }

// ParsePublic parses a base64 public key and rejects low-order points.
func ParsePublic(s string) (Public, error) {
	raw, err := decode(s)
	if err != nil {
		return Public{}, fmt.Errorf("key: %q is %w: %v", short(s), ErrInvalid, err)
	}
	return PublicFromBytes(raw[:])
}

// ParsePublicUAPI parses the hex form wireguard-go reports.
func ParsePublicUAPI(s string) (Public, error) {
	b, err := hex.DecodeString(s)
	if err != nil {
		return Public{}, fmt.Errorf("key: %q is %w: not hex", short(s), ErrInvalid)
	}
	return PublicFromBytes(b)
}

// PublicFromBytes checks a 32-byte public key received from outside.
func PublicFromBytes(b []byte) (Public, error) {
	var pub Public
	if len(b) != Len {
		return pub, fmt.Errorf("key: %w: %d bytes, want %d", ErrInvalid, len(b), Len)
	}
	copy(pub.k[:], b)
	if lowOrder(pub.k) {
		return Public{}, fmt.Errorf("key: %w: a low-order point (all-zero or similar), which anyone could impersonate", ErrInvalid)
	}
	return pub, nil
}

// PublicFromRaw returns raw as a public key without checking it: for bytes
// that only serve as a lookup handle (a relay frame's address), never as a
// peer's identity.
func PublicFromRaw(raw [Len]byte) Public { return Public{k: raw} }

// IsZero reports whether k is the zero value.
func (k Public) IsZero() bool { return k.k == [Len]byte{} }

// Raw returns the key's bytes.
func (k Public) Raw() [Len]byte { return k.k }

// AppendTo appends the key's 32 bytes to b.
func (k Public) AppendTo(b []byte) []byte { return append(b, k.k[:]...) }

// Compare orders keys by their bytes.
func (k Public) Compare(o Public) int { return bytes.Compare(k.k[:], o.k[:]) }

// String is the base64 form, as `wg` prints it and the wire carries it;
// empty for the zero key.
func (k Public) String() string {
	if k.IsZero() {
		return ""
	}
	return base64.StdEncoding.EncodeToString(k.k[:])
}

// Short is the first 8 base64 characters in brackets, for logs, as `wg`
// users recognise keys.
func (k Public) Short() string {
	if k.IsZero() {
		return "[none]"
	}
	return "[" + k.String()[:8] + "]"
}

// UAPI is the hex form wireguard-go's configuration protocol takes.
func (k Public) UAPI() string { return hex.EncodeToString(k.k[:]) }

// MarshalText encodes the key in base64; the zero key as "".
func (k Public) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText decodes base64 and rejects low-order points; "" is the
// zero key.
func (k *Public) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*k = Public{}
		return nil
	}
	p, err := ParsePublic(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}

func decode(s string) ([Len]byte, error) {
	var raw [Len]byte
	if base64.StdEncoding.DecodedLen(len(s)) > Len+2 {
		return raw, errors.New("too long")
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return raw, errors.New("not standard base64")
	}
	if len(b) != Len {
		return raw, fmt.Errorf("%d bytes, want %d", len(b), Len)
	}
	copy(raw[:], b)
	return raw, nil
}

func short(s string) string {
	if len(s) > 16 {
		return s[:16] + "…"
	}
	return s
}

// lowOrderPoints are the encodings of Curve25519 points of order 1, 2, 4
// and 8 (libsodium's blocklist); with the top bit ignored they cover the
// non-canonical encodings too. X25519 with any of them gives an all-zero
// shared secret, which key_test.go checks.
var lowOrderPoints = [...][Len]byte{
	{0x00},
	{0x01},
	{0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00},
	{0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57},
	{0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
	{0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
	{0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
}

func lowOrder(k [Len]byte) bool {
	k[31] &= 0x7f
	for _, p := range lowOrderPoints {
		if k == p {
			return true
		}
	}
	return false
}

// ErrDamaged is returned by LoadOrCreateFile for a key file that does not
// hold a private key.
var ErrDamaged = errors.New("key: the key file is damaged")

// ErrExposed is returned by LoadOrCreateFile for a key file that others
// may read.
var ErrExposed = errors.New("key: the key file is readable by others")

// LoadOrCreateFile returns the private key kept in path (base64 and a
// newline, mode 0600), creating the file with a new key if it is missing.
func LoadOrCreateFile(path string) (Private, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		p := NewPrivate()
		if err := atomicfile.WriteFile(path, []byte(p.Base64()+"\n"), 0o600); err != nil {
			return Private{}, err
		}
		return p, nil
	}
	if err != nil {
		return Private{}, err
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return Private{}, fmt.Errorf("%w: %s has mode %v", ErrExposed, path, fi.Mode().Perm())
	}
	p, err := ParsePrivate(strings.TrimSpace(string(b)))
	if err != nil {
		return Private{}, fmt.Errorf("%w: %s: %v", ErrDamaged, path, err)
	}
	return p, nil
}

// Fingerprint is "SHA256:" and the first 8 bytes of the key's SHA-256 in
// hex, the short form people compare in the console; "" for the zero key.
func (k Public) Fingerprint() string {
	if k.IsZero() {
		return ""
	}
	h := sha256.Sum256(k.k[:])
	return "SHA256:" + hex.EncodeToString(h[:8])
}

// SealTo seals msg from p to the holder of to's private key (a NaCl box):
// nonce || box. Only that holder can open it, and opening it proves that
// the sender holds p.
func (p Private) SealTo(to Public, msg []byte) []byte {
	var nonce [24]byte
	rand.Read(nonce[:])
	pk, sk := to.k, p.k
	return box.Seal(nonce[:], msg, &nonce, &pk, &sk)
}

// OpenFrom opens a message SealTo sealed from the holder of from's private
// key to p.
func (p Private) OpenFrom(from Public, sealed []byte) ([]byte, bool) {
	if len(sealed) < 24+box.Overhead || lowOrder(from.k) {
		return nil, false
	}
	var nonce [24]byte
	copy(nonce[:], sealed)
	pk, sk := from.k, p.k
	return box.Open(nil, sealed[24:], &nonce, &pk, &sk)
}
