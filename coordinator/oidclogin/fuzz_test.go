package oidclogin

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"testing"
	"time"
)

// FuzzOpen feeds arbitrary cookie values to the parser of the login cookie,
// which is outside input: it must never panic, and only values it sealed
// itself may open.
func FuzzOpen(f *testing.F) {
	block, _ := aes.NewCipher(bytes.Repeat([]byte{7}, 32))
	aead, _ := cipher.NewGCM(block)
	p := &Provider{aead: aead}
	good, err := p.seal(loginState{State: "s", Nonce: "n", Verifier: "v", Expires: time.Now().Unix()})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add("")
	f.Add("AAAA")
	f.Add(good[:len(good)-1] + "A")
	f.Fuzz(func(t *testing.T, v string) {
		ls, err := p.open(v)
		if err == nil && v != good && (ls.State != "s" || ls.Nonce != "n") {
			t.Fatalf("forged cookie %q opened to %+v", v, ls)
		}
	})
}
