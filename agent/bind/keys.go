package bind

import "golang.org/x/crypto/curve25519"

func publicKey(priv [32]byte) ([32]byte, error) {
	var out [32]byte
	pub, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return out, err
	}
	copy(out[:], pub)
	return out, nil
}
