/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2017-2025 WireGuard LLC. All Rights Reserved.
 */

package device

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/tai64n"
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

// TestDuplicateHandshakeMessages hands copies of one initiation, then of
// one response, to several goroutines at once, as the handshake workers
// get them when a bind sends over several paths: exactly one copy may be
// consumed each time (meshlink patch 3, PATCHES.md). Before the patch two
// copies could both pass the replay check and make two sessions.
func TestDuplicateHandshakeMessages(t *testing.T) {
	dev1, dev2 := randDevice(t), randDevice(t)
	defer dev1.Close()
	defer dev2.Close()
	peer1, err := dev2.NewPeer(dev1.staticIdentity.privateKey.publicKey())
	if err != nil {
		t.Fatal(err)
	}
	peer2, err := dev1.NewPeer(dev2.staticIdentity.privateKey.publicKey())
	if err != nil {
		t.Fatal(err)
	}
	peer1.Start()
	peer2.Start()
	const copies, rounds = 4, 300
	// consumed runs fn in copies goroutines released at once and counts
	// the calls that consumed their message.
	consumed := func(fn func() *Peer) int {
		var n atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range copies {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if fn() != nil {
					n.Add(1)
				}
			}()
		}
		close(start)
		wg.Wait()
		return int(n.Load())
	}
	for round := range rounds {
		// Each round is a new initiation: forget the last one's timestamp
		// and time, which the replay and flood checks compare against.
		peer1.handshake.mutex.Lock()
		peer1.handshake.lastTimestamp = tai64n.Timestamp{}
		peer1.handshake.lastInitiationConsumption = time.Time{}
		peer1.handshake.mutex.Unlock()
		init, err := dev1.CreateMessageInitiation(peer2)
		if err != nil {
			t.Fatal(err)
		}
		if n := consumed(func() *Peer { m := *init; return dev2.ConsumeMessageInitiation(&m) }); n != 1 {
			t.Fatalf("round %d: %d of %d copies of one initiation consumed, want 1", round, n, copies)
		}
		resp, err := dev2.CreateMessageResponse(peer1)
		if err != nil {
			t.Fatal(err)
		}
		if n := consumed(func() *Peer { m := *resp; return dev1.ConsumeMessageResponse(&m) }); n != 1 {
			t.Fatalf("round %d: %d of %d copies of one response consumed, want 1", round, n, copies)
		}
	}
}
