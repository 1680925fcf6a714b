// Package nettest joins two netstack Stacks with a real wireguard-go tunnel
// over loopback UDP, for tests and benchmarks of anything that runs over the
// mesh data plane. Each direction of the tunnel can be impaired (random loss,
// fixed delay, blackouts; see Link) to emulate a bad WAN path.
package nettest

import (
	"bufio"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"

	"github.com/meshlink/meshlink/netstack"
)

// The mesh addresses NewPairConfig gives its two stacks.
var (
	AddrA4 = netip.MustParseAddr("100.96.0.1")
	AddrA6 = netip.MustParseAddr("fd7a:6d65:7368::1")
	AddrB4 = netip.MustParseAddr("100.96.0.2")
	AddrB6 = netip.MustParseAddr("fd7a:6d65:7368::2")
)

// Pair is two Stacks joined by two wireguard-go devices.
type Pair struct {
	A, B       *netstack.Stack
	DevA, DevB *device.Device
	// AB impairs what A sends to B, BA what B sends to A; both pass
	// everything through until told otherwise.
	AB, BA *Link
}

// NewPairConfig returns two Stacks, configured by cfgA and cfgB, that reach
// each other through WireGuard over 127.0.0.1 at AddrA4/AddrA6 and
// AddrB4/AddrB6 (Addrs is always overwritten with these). Everything is
// closed when the test ends.
func NewPairConfig(t testing.TB, cfgA, cfgB netstack.Config) *Pair {
	t.Helper()
	cfgA.Addrs = []netip.Addr{AddrA4, AddrA6}
	cfgB.Addrs = []netip.Addr{AddrB4, AddrB6}
	a, err := netstack.New(cfgA)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b, err := netstack.New(cfgB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })

	ab, ba := newLink(conn.NewDefaultBind()), newLink(conn.NewDefaultBind())
	for _, l := range []*Link{ab, ba} {
		go l.run()
		t.Cleanup(l.close) // runs after the devices' Close (cleanups are LIFO)
	}
	privA, pubA := newKey(t)
	privB, pubB := newKey(t)
	devA := newDevice(t, a, privA, impairedBind{ab.bind, ab})
	devB := newDevice(t, b, privB, impairedBind{ba.bind, ba})
	portA := listenPort(t, devA)
	portB := listenPort(t, devB)

	setPeer(t, devA, pubB, portB, AddrB4, AddrB6)
	setPeer(t, devB, pubA, portA, AddrA4, AddrA6)
	return &Pair{A: a, B: b, DevA: devA, DevB: devB, AB: ab, BA: ba}
}

func newKey(t testing.TB) (priv, pub string) {
	t.Helper()
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(k.Bytes()), hex.EncodeToString(k.PublicKey().Bytes())
}

func newDevice(t testing.TB, s *netstack.Stack, priv string, bind conn.Bind) *device.Device {
	t.Helper()
	dev := device.NewDevice(s, bind, device.NewLogger(device.LogLevelError, fmt.Sprintf("(%s) ", t.Name())))
	t.Cleanup(dev.Close)
	if err := dev.IpcSet("private_key=" + priv + "\nlisten_port=0\n"); err != nil {
		t.Fatalf("nettest: configure device: %v", err)
	}
	if err := dev.Up(); err != nil {
		t.Fatalf("nettest: device up: %v", err)
	}
	return dev
}

func listenPort(t testing.TB, dev *device.Device) string {
	t.Helper()
	cfg, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(cfg))
	for sc.Scan() {
		if port, ok := strings.CutPrefix(sc.Text(), "listen_port="); ok && port != "0" {
			return port
		}
	}
	t.Fatalf("nettest: no listen_port in device config")
	return ""
}

func setPeer(t testing.TB, dev *device.Device, pub, port string, allowed ...netip.Addr) {
	t.Helper()
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "public_key=%s\nendpoint=127.0.0.1:%s\n", pub, port)
	for _, a := range allowed {
		fmt.Fprintf(&cfg, "allowed_ip=%s\n", netip.PrefixFrom(a, a.BitLen()))
	}
	if err := dev.IpcSet(cfg.String()); err != nil {
		t.Fatalf("nettest: set peer: %v", err)
	}
}
