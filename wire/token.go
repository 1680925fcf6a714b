package wire

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// TokenPrefix starts every join token, so that a token is recognisable in a
// paste and versioned.
const TokenPrefix = "mlj1_"

// maxTokenLen bounds what ParseToken will decode.
const maxTokenLen = 2048

// maxTokenURLs bounds JoinToken.URLs.
const maxTokenURLs = 8

// JoinToken is what a join token string carries. The coordinator keeps only
// a hash of Secret.
type JoinToken struct {
	// URL is the coordinator's base URL, https://host:port.
	URL string `json:"u"`
	// Fingerprint is the lowercase hex SHA-256 of the coordinator's TLS leaf
	// certificate (DER); agents pin it.
	Fingerprint string `json:"f"`
	ID          string `json:"i"`
	Secret      string `json:"s"`
	// Expires is informational (the coordinator decides); zero means never.
	Expires int64 `json:"e,omitempty"`
	// URLs (version 11) are more coordinators of the same mesh, with the
	// same certificate, tried in turn when URL cannot be reached.
	URLs []string `json:"us,omitempty"`
}

// AllURLs is URL followed by URLs.
func (t JoinToken) AllURLs() []string { return append([]string{t.URL}, t.URLs...) }

// ErrTokenMalformed is returned by ParseToken for anything that is not a
// well-formed join token.
var ErrTokenMalformed = errors.New("malformed join token")

// String encodes t as a copy-pasteable token.
func (t JoinToken) String() string {
	b, _ := json.Marshal(t)
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// ExpiresAt returns the expiry carried by the token, zero for none.
func (t JoinToken) ExpiresAt() time.Time {
	if t.Expires == 0 {
		return time.Time{}
	}
	return time.Unix(t.Expires, 0)
}

// ParseToken decodes and validates a token string. Errors wrap
// ErrTokenMalformed and say what is wrong.
func ParseToken(s string) (JoinToken, error) {
	var t JoinToken
	s = strings.TrimSpace(s)
	if len(s) > maxTokenLen {
		return t, fmt.Errorf("%w: too long (%d bytes)", ErrTokenMalformed, len(s))
	}
	if !strings.HasPrefix(s, TokenPrefix) {
		return t, fmt.Errorf("%w: it must start with %q; copy the whole line printed by `meshlink token create`", ErrTokenMalformed, TokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(s[len(TokenPrefix):])
	if err != nil {
		return t, fmt.Errorf("%w: it is incomplete or damaged; copy the whole line printed by `meshlink token create`", ErrTokenMalformed)
	}
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return JoinToken{}, fmt.Errorf("%w: it is incomplete or damaged; copy the whole line printed by `meshlink token create`", ErrTokenMalformed)
	}
	if len(t.URLs) > maxTokenURLs {
		return JoinToken{}, fmt.Errorf("%w: more than %d coordinator URLs", ErrTokenMalformed, maxTokenURLs)
	}
	for _, s := range t.AllURLs() {
		u, err := url.Parse(s)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return JoinToken{}, fmt.Errorf("%w: coordinator URL %q is not https://host:port", ErrTokenMalformed, s)
		}
	}
	if fp, err := hex.DecodeString(t.Fingerprint); err != nil || len(fp) != sha256.Size {
		return JoinToken{}, fmt.Errorf("%w: bad certificate fingerprint", ErrTokenMalformed)
	}
	if t.ID == "" || len(t.ID) > 64 || len(t.Secret) < 16 || len(t.Secret) > 128 {
		return JoinToken{}, fmt.Errorf("%w: bad id or secret", ErrTokenMalformed)
	}
	return t, nil
}

// CertFingerprint returns the fingerprint format used in tokens for a DER
// certificate.
func CertFingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// FingerprintMatches compares a certificate against a pinned fingerprint in
// constant time.
func FingerprintMatches(der []byte, pinned string) bool {
	got := CertFingerprint(der)
	return subtle.ConstantTimeCompare([]byte(got), []byte(strings.ToLower(pinned))) == 1
}

// ErrFingerprint is the handshake error when a server's certificate is not
// the pinned one.
var ErrFingerprint = errors.New("the server's certificate does not match the pinned fingerprint (wrong coordinator, or it was re-created: create a new token)")

// PinnedTLSConfig returns a client TLS configuration that trusts exactly the
// certificate with the given fingerprint: a self-signed coordinator needs no
// CA, and no CA can vouch for an impostor. An empty fingerprint leaves the
// usual CA verification in place.
func PinnedTLSConfig(fingerprint string) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if fingerprint == "" {
		return c
	}
	// The chain is deliberately not verified against CAs: the pin replaces it.
	c.InsecureSkipVerify = true
	c.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 || !FingerprintMatches(raw[0], fingerprint) {
			return ErrFingerprint
		}
		return nil
	}
	return c
}
