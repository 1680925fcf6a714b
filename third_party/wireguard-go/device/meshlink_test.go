/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2017-2025 WireGuard LLC. All Rights Reserved.
 */

package device

import (
	"fmt"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// slotBind reads every packet into the last buffer of the receive batch,
// where the standard bind puts UDP GRO messages, and checks that buffer
// can hold one (meshlink patch 2, PATCHES.md).
type slotBind struct {
	conn.Bind
	t testing.TB
}

func (b slotBind) BatchSize() int { return conn.IdealBatchSize }

func (b slotBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			last := len(bufs) - 1
			if len(bufs[last]) < maxGROMessageSize {
				b.t.Errorf("GRO read slot of %d bytes, want %d", len(bufs[last]), maxGROMessageSize)
			}
			for i := 0; i < last; i++ {
				if i < len(bufs)-groReadSlots && len(bufs[i]) > MaxMessageSize {
					b.t.Errorf("element buffer %d of %d bytes, want %d", i, len(bufs[i]), MaxMessageSize)
				}
				sizes[i] = 0
			}
			n, err := fn(bufs[last:], sizes[last:], eps[last:])
			if err != nil || n == 0 {
				return 0, err
			}
			return last + 1, nil
		}
	}
	return fns, actual, err
}

// TestGROReadSlot pings between two devices whose packets all arrive in
// the GRO read slot: they must be copied into element buffers intact.
func TestGROReadSlot(t *testing.T) {
	goroutineLeakCheck(t)
	if MaxMessageSize >= maxGROMessageSize {
		t.Fatalf("MaxMessageSize %d: patch 1 lost", MaxMessageSize)
	}
	cfg, endpointCfg := genConfigs(t)
	binds := bindtest.NewChannelBinds()
	var pair testPair
	for i := range pair {
		p := &pair[i]
		p.tun = tuntest.NewChannelTUN()
		p.ip = netip.AddrFrom4([4]byte{1, 0, 0, byte(i + 1)})
		p.dev = NewDevice(p.tun.TUN(), slotBind{binds[i], t}, NewLogger(LogLevelError, fmt.Sprintf("dev%d: ", i)))
		if err := p.dev.IpcSet(cfg[i]); err != nil {
			t.Fatal(err)
		}
		if err := p.dev.Up(); err != nil {
			t.Fatal(err)
		}
		endpointCfg[i^1] = fmt.Sprintf(endpointCfg[i^1], p.dev.net.port)
	}
	for i := range pair {
		if err := pair[i].dev.IpcSet(endpointCfg[i]); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pair[i].dev.Close)
	}
	for range 3 {
		pair.Send(t, Ping, nil)
		pair.Send(t, Pong, nil)
	}
}
