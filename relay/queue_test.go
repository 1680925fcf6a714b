package relay

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlink/meshlink/internal/key"
	"github.com/meshlink/meshlink/internal/tstest"
)

// vmRSS is this process's resident set from /proc/self/status, 0 where there
// is none.
func vmRSS() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var kb uint64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb << 10
		}
	}
	return 0
}

// memPeak samples the heap in use and the RSS until stop is called and
// returns their growth over the values at the start.
func memPeak() (stop func() (heap, rss int64)) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap0, rss0 := ms.HeapInuse, vmRSS()
	heapMax, rssMax := heap0, rss0
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(5 * time.Millisecond)
		defer tk.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			heapMax, rssMax = max(heapMax, ms.HeapInuse), max(rssMax, vmRSS())
			select {
			case <-done:
				return
			case <-tk.C:
			}
		}
	}()
	return func() (int64, int64) {
		close(done)
		wg.Wait()
		return int64(heapMax - heap0), int64(rssMax - rss0)
	}
}

// TestSlowReceiversBoundedMemory performs the attack of issue 9: eight
// nodes connect to the relay and never read while a ninth floods them with
// the largest packets. The relay's memory must stay within its queue budget,
// the drops must be counted, and an honest receiver beside them must still
// get every packet sent to it. Before queues were budgeted in bytes, the
// heap grew by 136 MiB here.
func TestSlowReceiversBoundedMemory(t *testing.T) {
	const slow = 8
	for _, tc := range []struct {
		name string
		// total is the TotalQueueBytes set (0: the default), budget the
		// bound on what all queues hold.
		total, budget int64
	}{
		{"each queue full", 0, slow * DefaultQueueBytes},
		{"total budget full", 3 << 20, 3 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) { testSlowReceivers(t, slow, tc.total, tc.budget) })
	}
}

func testSlowReceivers(t *testing.T, slow int, total, budget int64) {
	const (
		rounds = 300      // per slow receiver, 64 KiB each: 150 MiB in all
		slack  = 24 << 20 // TLS and socket buffers, the test's own frames, GC lag
	)
	ns := newNodes(slow + 2)
	tr := startRelay(t, ns, func(c *ServerConfig) { c.TotalQueueBytes = total })
	sender, honestNode, slowNodes := ns[0], ns[1], ns[2:]
	honest, hrx := tr.client(t, honestNode)
	for _, n := range slowNodes {
		tr.dialRaw(t, n) // reads the server info, then never reads again
	}
	tstest.WaitFor(t, 5*time.Second, "all receivers connected", func() bool {
		return honest.Connected() && tr.relay.Stats().Clients == slow+1
	})
	s, _ := tr.dialRaw(t, sender)

	big := make([]byte, MaxPacket)
	floods := make([][]byte, slow)
	for i, n := range slowNodes {
		floods[i] = packetFrame(FrameSendPacket, n.key, big)
	}
	stop := memPeak()
	var queuedMax int64
	for r := range rounds {
		for _, f := range floods {
			s.write(t, f)
		}
		var p [8]byte
		binary.BigEndian.PutUint64(p[:], uint64(r))
		s.write(t, packetFrame(FrameSendPacket, honestNode.key, p[:]))
		queuedMax = max(queuedMax, tr.relay.Stats().QueuedBytes)
	}
	tstest.WaitFor(t, 10*time.Second, "the honest receiver gets its packets", func() bool { return len(hrx.packets()) >= rounds })
	heap, rss := stop()
	st := tr.relay.Stats()
	t.Logf("heap in use grew %.1f MiB, RSS %.1f MiB; relay stats %+v; largest queued sample %d", float64(heap)/(1<<20), float64(rss)/(1<<20), st, queuedMax)

	for i, p := range hrx.packets() {
		if p.src != sender.key || len(p.pkt) != 8 || binary.BigEndian.Uint64(p.pkt) != uint64(i) {
			t.Fatalf("honest packet %d: src %v %x, want %d from the sender", i, p.src, p.pkt, i)
		}
	}
	if st.QueuedBytesPeak > budget || queuedMax > budget {
		t.Errorf("relay queued %d bytes at its peak, over its budget of %d", st.QueuedBytesPeak, budget)
	}
	if st.QueueDropped == 0 || st.Dropped < st.QueueDropped {
		t.Errorf("no queue drops counted: %+v", st)
	}
	if heap > budget+slack {
		t.Errorf("heap in use grew by %d MiB under the flood; the bound is %d MiB", heap>>20, (budget+slack)>>20)
	}
	// Queues give their bytes back when their connections end.
	tr.stop()
	if q := tr.relay.Stats().QueuedBytes; q != 0 {
		t.Errorf("%d bytes still counted as queued after every connection closed", q)
	}
}

// TestTakeLeavesFramesDroppable: a writer takes at most maxTakeBytes (and
// at least one frame) at a time, so that a writer stuck on a reader that
// does not read holds little of the total budget: what it has not taken
// still waits, where the budget's eviction can drop it to make room for
// an honest receiver. Taking the whole queue at once let eight stalled
// readers hold all of a 3 MiB budget (TestSlowReceiversBoundedMemory
// failed on a loaded machine: the honest receiver's packets refused).
func TestTakeLeavesFramesDroppable(t *testing.T) {
	q := newFrameQueue(256, 4<<20, nil)
	var k key.Public
	pkt := make([]byte, 1400) // a 2 KiB frame
	total := 0
	for range 128 {
		f := newPacketFrame(FrameRecvPacket, k, pkt)
		total += f.size()
		if !q.push(f) {
			t.Fatal("push refused under the queue's budget")
		}
	}
	<-q.ready
	batch := q.take(nil)
	taken := 0
	for _, f := range batch {
		taken += f.size()
	}
	if len(batch) == 0 || taken > maxTakeBytes {
		t.Fatalf("took %d frames, %d bytes; want at least one and at most %d bytes", len(batch), taken, maxTakeBytes)
	}
	if w := q.waiting(); w != total-taken {
		t.Fatalf("%d bytes still waiting after taking %d of %d, want %d", w, taken, total, total-taken)
	}
	select {
	case <-q.ready:
	default:
		t.Fatal("frames left but the writer is not told to come back")
	}
	if frames, bytes := q.dropOldest(total); bytes != total-taken || frames != 128-len(batch) {
		t.Fatalf("eviction freed %d frames, %d bytes; want all %d bytes not taken", frames, bytes, total-taken)
	}
	// A frame larger than maxTakeBytes still goes, alone.
	big := newPacketFrame(FrameRecvPacket, k, make([]byte, MaxPacket))
	q.push(big)
	if got := q.take(batch); len(got) != 1 {
		t.Fatalf("a frame over maxTakeBytes: took %d frames, want it alone", len(got))
	}
}
