package key

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"golang.org/x/crypto/curve25519"
)

func TestPrivatePublicRoundTrip(t *testing.T) {
	p := NewPrivate()
	if p.IsZero() {
		t.Fatal("zero private key")
	}
	raw := p.Raw()
	if raw[0]&7 != 0 || raw[31]&128 != 0 || raw[31]&64 == 0 {
		t.Fatalf("key not clamped: %x", raw)
	}
	pub := p.Public()
	want, err := curve25519.X25519(raw[:], curve25519.Basepoint)
	if err != nil || string(want) != string(pub.k[:]) {
		t.Fatalf("Public() = %x, want %x", pub.k, want)
	}
	q, err := ParsePrivate(p.Base64())
	if err != nil || !q.Equal(p) {
		t.Fatalf("ParsePrivate(Base64()) = %v, %v", q.UAPI() == p.UAPI(), err)
	}
	got, err := ParsePublic(pub.String())
	if err != nil || got != pub {
		t.Fatalf("ParsePublic(String()) = %v, %v", got, err)
	}
	got, err = ParsePublicUAPI(pub.UAPI())
	if err != nil || got != pub {
		t.Fatalf("ParsePublicUAPI(UAPI()) = %v, %v", got, err)
	}
	if strings.Contains(p.String(), p.Base64()) || strings.Contains(p.String(), p.UAPI()) {
		t.Fatal("Private.String shows the key")
	}
	if s := pub.Short(); len(s) != 10 || !strings.HasPrefix(pub.String(), s[1:9]) {
		t.Fatalf("Short() = %q", s)
	}
}

// TestLowOrderPointsAreRejected checks the blocklist against X25519 itself
// (each point gives an all-zero shared secret), and that parsing refuses
// them in every form: this is what stops a node registering the zero key.
func TestLowOrderPointsAreRejected(t *testing.T) {
	scalar := NewPrivate().Raw()
	for i, p := range lowOrderPoints {
		for _, top := range []byte{0, 0x80} {
			q := p
			q[31] |= top
			if _, err := curve25519.X25519(scalar[:], q[:]); err == nil {
				t.Errorf("point %d (top bit %x): X25519 gave a non-zero secret: not low order", i, top)
			}
			k := Public{k: q}
			b64 := base64.StdEncoding.EncodeToString(q[:])
			if _, err := ParsePublic(b64); err == nil {
				t.Errorf("point %d (top bit %x): ParsePublic accepted it", i, top)
			}
			if _, err := ParsePublicUAPI(k.UAPI()); err == nil {
				t.Errorf("point %d: ParsePublicUAPI accepted it", i)
			}
			var u Public
			if err := u.UnmarshalText([]byte(b64)); err == nil {
				t.Errorf("point %d: UnmarshalText accepted it", i)
			}
		}
	}
	for range 100 {
		if pub := NewPrivate().Public(); lowOrder(pub.k) {
			t.Fatalf("a real key %v is taken for low order", pub)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, s := range []string{"", "abc", "not base64!!", strings.Repeat("A", 43) + "=" + "A", strings.Repeat("QUFB", 20)} {
		if _, err := ParsePublic(s); err == nil {
			t.Errorf("ParsePublic(%q) accepted", s)
		}
		if _, err := ParsePrivate(s); err == nil {
			t.Errorf("ParsePrivate(%q) accepted", s)
		}
	}
	if _, err := ParsePublicUAPI("zz"); err == nil {
		t.Error("ParsePublicUAPI(zz) accepted")
	}
}

func TestJSON(t *testing.T) {
	type msg struct {
		K Public `json:"k"`
	}
	pub := NewPrivate().Public()
	b, _ := json.Marshal(msg{pub})
	if string(b) != `{"k":"`+pub.String()+`"}` {
		t.Fatalf("marshal: %s", b)
	}
	var m msg
	if err := json.Unmarshal(b, &m); err != nil || m.K != pub {
		t.Fatalf("unmarshal: %v %v", m.K, err)
	}
	b, _ = json.Marshal(msg{})
	if string(b) != `{"k":""}` {
		t.Fatalf("zero key marshals as %s", b)
	}
	if err := json.Unmarshal([]byte(`{"k":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`), &m); err == nil {
		t.Fatal("the all-zero key decoded")
	}
}

func FuzzParsePublic(f *testing.F) {
	f.Add(NewPrivate().Public().String())
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParsePublic(s)
		if err != nil {
			return
		}
		if k.IsZero() || lowOrder(k.k) {
			t.Fatalf("accepted %q", s)
		}
		if k2, err := ParsePublic(k.String()); err != nil || k2 != k {
			t.Fatalf("round trip of %q: %v", s, err)
		}
	})
}
