// Package tlscert keeps the self-signed TLS certificate of a coordinator or a
// standalone relay in its data directory.
package tlscert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/meshlink/meshlink/internal/atomicfile"
)

const (
	certFile = "cert.pem"
	keyFile  = "key.pem"
)

// LoadOrCreate returns the certificate kept in dir, creating a self-signed
// one named commonName and valid for hosts on first start. Agents pin its
// fingerprint, so it is reused for as long as the data directory lives; the
// SANs only matter to clients that verify names instead of pinning.
func LoadOrCreate(dir, commonName string, hosts []string) (tls.Certificate, error) {
	cp, kp := filepath.Join(dir, certFile), filepath.Join(dir, keyFile)
	_, errC := os.Stat(cp)
	_, errK := os.Stat(kp)
	if errC == nil && errK == nil {
		c, err := tls.LoadX509KeyPair(cp, kp)
		if err != nil {
			return c, fmt.Errorf("load certificate %s: %w; move %s and %s away to create a new one (agents will then need new tokens)", cp, err, certFile, keyFile)
		}
		return c, nil
	}
	if !errors.Is(errC, fs.ErrNotExist) && errC != nil {
		return tls.Certificate{}, fmt.Errorf("%w", errC)
	}
	if errC == nil || errK == nil {
		return tls.Certificate{}, fmt.Errorf("only one of %s and %s exists in %s; restore the other or remove both to create a new certificate", certFile, keyFile, dir)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"meshlink"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	seen := map[string]bool{}
	for _, h := range hosts {
		if h == "" || seen[h] {
			continue
		}
		seen[h] = true
		if ip := net.ParseIP(h); ip != nil {
			if !ip.IsUnspecified() {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("create certificate: %w", err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	// Key first: a cert without its key is the state we refuse above.
	if err := atomicfile.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := atomicfile.WriteFile(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return tls.Certificate{}, err
	}
	return tls.LoadX509KeyPair(cp, kp)
}

// DefaultHostIP is the address put into the URL when listening on every
// interface: the first non-loopback unicast address, IPv4 preferred.
func DefaultHostIP() netip.Addr {
	addrs, _ := net.InterfaceAddrs()
	var v6 netip.Addr
	for _, a := range addrs {
		pn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(pn.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || !ip.IsGlobalUnicast() {
			continue
		}
		if ip.Is4() {
			return ip
		}
		if !v6.IsValid() {
			v6 = ip
		}
	}
	if v6.IsValid() {
		return v6
	}
	return netip.MustParseAddr("127.0.0.1")
}
