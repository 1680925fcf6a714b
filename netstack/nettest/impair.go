package nettest

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// Link impairs one direction of a Pair: the WireGuard transport-data
// datagrams one device sends to the other. It can drop a fraction of them at
// random, delay all of them by a fixed time, limit the rate like a
// bottleneck router with a drop-tail queue, and black the direction out for
// a while. A new Link passes everything through untouched.
//
// Only transport-data messages (WireGuard message type 4: tunnelled IP
// packets and keepalives) are impaired, never handshake messages: a lost
// handshake costs wireguard-go a fixed 5 s retry, which would make the
// measurements about WireGuard's timers instead of the TCP stack's.
//
// All methods are safe for concurrent use and may be called while traffic
// flows.
type Link struct {
	bind conn.Bind

	lossPPM       atomic.Uint32 // drop probability, parts per million
	delay         atomic.Int64  // time.Duration
	rate          atomic.Int64  // bytes per second; 0 is unlimited
	maxQueue      atomic.Int64  // time.Duration: the bottleneck queue's depth
	blackoutUntil atomic.Int64  // UnixNano; drop everything before it
	sent, dropped atomic.Uint64 // transport-data packets passed on / dropped

	mu   sync.Mutex // guards the fields below
	line []delayed  // FIFO: due times only grow
	// nextFree is when the rate-limited bottleneck finishes sending what
	// it has queued.
	nextFree time.Time
	wake     chan struct{}
	closed   bool
	done     chan struct{} // closed when the delay goroutine exits
}

// delayLineLen bounds the packets in flight on a delayed Link, like a
// router's queue: 65536 full-size packets is ~90 MB, far beyond any window
// the stacks open.
const delayLineLen = 1 << 16

type delayed struct {
	due time.Time
	ep  conn.Endpoint
	buf []byte
}

// LinkStats counts a Link's transport-data packets.
type LinkStats struct {
	Sent, Dropped uint64
}

func newLink(inner conn.Bind) *Link {
	return &Link{bind: inner, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// SetLoss makes the Link drop each packet independently with probability p
// (0 ≤ p ≤ 1).
func (l *Link) SetLoss(p float64) {
	p = min(max(p, 0), 1)
	l.lossPPM.Store(uint32(p * 1e6))
}

// SetRate limits the Link to bytesPerSec (0: unlimited), with a drop-tail
// queue that holds up to maxQueue worth of packets at that rate: a packet
// that would wait longer is dropped, as a congested router would. Queueing
// delay adds to SetDelay's.
func (l *Link) SetRate(bytesPerSec int64, maxQueue time.Duration) {
	l.maxQueue.Store(int64(max(maxQueue, 0)))
	l.rate.Store(max(bytesPerSec, 0))
}

// SetDelay delays every packet sent from now on by d (0 turns the delay
// off; packets already on the line keep theirs).
func (l *Link) SetDelay(d time.Duration) { l.delay.Store(int64(max(d, 0))) }

// Blackout drops every packet for d from now on, including those already
// on their way (delayed), replacing any earlier blackout; it returns when
// the link comes back.
func (l *Link) Blackout(d time.Duration) time.Time {
	until := time.Now().Add(d)
	l.blackoutUntil.Store(until.UnixNano())
	return until
}

// Stats returns the Link's counters.
func (l *Link) Stats() LinkStats {
	return LinkStats{Sent: l.sent.Load(), Dropped: l.dropped.Load()}
}

// isData reports whether b is a WireGuard transport-data message.
func isData(b []byte) bool {
	return len(b) >= 4 && b[0] == 4 && b[1] == 0 && b[2] == 0 && b[3] == 0
}

// drop decides the fate of one transport-data packet.
func (l *Link) drop(now int64) bool {
	if now < l.blackoutUntil.Load() {
		return true
	}
	if ppm := l.lossPPM.Load(); ppm > 0 && rand.Uint32N(1e6) < ppm {
		return true
	}
	return false
}

// send filters bufs and hands the survivors to the inner Bind, now or after
// the delay.
func (l *Link) send(bufs [][]byte, ep conn.Endpoint) error {
	impaired := l.lossPPM.Load() > 0 || l.blackoutUntil.Load() != 0 || l.delay.Load() > 0 || l.rate.Load() > 0
	if !impaired {
		l.sent.Add(uint64(len(bufs)))
		return l.bind.Send(bufs, ep)
	}
	now := time.Now()
	delay := time.Duration(l.delay.Load())
	keep := bufs[:0:0]
	for _, b := range bufs {
		if !isData(b) {
			keep = append(keep, b)
			continue
		}
		if l.drop(now.UnixNano()) {
			l.dropped.Add(1)
			continue
		}
		keep = append(keep, b)
	}
	if len(keep) == 0 {
		return nil
	}
	if delay <= 0 && l.rate.Load() == 0 {
		l.countSent(keep)
		return l.bind.Send(keep, ep)
	}
	l.enqueue(keep, ep, now, delay)
	return nil
}

// countSent counts the transport-data packets in bufs as sent.
func (l *Link) countSent(bufs [][]byte) {
	for _, b := range bufs {
		if isData(b) {
			l.sent.Add(1)
		}
	}
}

// enqueue copies bufs onto the delay line (wireguard-go reuses them as soon
// as Send returns), each due after the bottleneck has sent it (when the rate
// is limited) and the delay has passed.
func (l *Link) enqueue(bufs [][]byte, ep conn.Endpoint, now time.Time, delay time.Duration) {
	rate := l.rate.Load()
	maxQueue := time.Duration(l.maxQueue.Load())
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	wasEmpty := len(l.line) == 0
	for _, b := range bufs {
		due := now
		if rate > 0 {
			start := l.nextFree
			if start.Before(now) {
				start = now
			}
			if start.Sub(now) > maxQueue && isData(b) {
				l.dropped.Add(1) // the bottleneck queue is full
				continue
			}
			l.nextFree = start.Add(time.Duration(int64(len(b)) * int64(time.Second) / rate))
			due = l.nextFree
		}
		if len(l.line) >= delayLineLen {
			l.dropped.Add(1)
			continue
		}
		l.line = append(l.line, delayed{due: due.Add(delay), ep: ep, buf: append([]byte(nil), b...)})
	}
	if wasEmpty {
		select {
		case l.wake <- struct{}{}:
		default:
		}
	}
}

// run is the delay line: it sends each queued packet when it is due, in
// batches of whatever is due together. It returns when the Link closes.
func (l *Link) run() {
	defer close(l.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	batch := make([][]byte, 0, conn.IdealBatchSize)
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return
		}
		var wait time.Duration
		var ep conn.Endpoint
		progress := false
		batch = batch[:0]
		if len(l.line) > 0 {
			now := time.Now()
			if d := l.line[0].due.Sub(now); d > 0 {
				wait = d
			} else {
				ep = l.line[0].ep
				max := min(l.bind.BatchSize(), cap(batch))
				dark := now.UnixNano() < l.blackoutUntil.Load()
				i := 0
				for i < len(l.line) && i < max && l.line[i].ep == ep && !l.line[i].due.After(now) {
					if dark && isData(l.line[i].buf) {
						// A blackout also loses what was in flight.
						l.dropped.Add(1)
					} else {
						batch = append(batch, l.line[i].buf)
					}
					l.line[i] = delayed{}
					i++
				}
				progress = i > 0
				l.line = l.line[i:]
				if len(l.line) == 0 {
					l.line = nil // let the backing array go
				}
			}
		}
		l.mu.Unlock()

		if progress {
			if len(batch) == 0 {
				continue // all dropped: look at the rest of the line
			}
			l.countSent(batch)
			_ = l.bind.Send(batch, ep) // the inner Bind may be closed or rebinding: the packet is lost
			continue
		}
		if wait > 0 {
			timer.Reset(wait)
		} else {
			timer.Reset(time.Hour) // idle until enqueue wakes us
		}
		select {
		case <-l.wake:
		case <-timer.C:
		}
	}
}

// close stops the delay line and drops what is on it.
func (l *Link) close() {
	l.mu.Lock()
	l.closed = true
	l.line = nil
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	<-l.done
}

// impairedBind is the conn.Bind a Pair's device uses: the real UDP bind with
// a Link in front of its Send.
type impairedBind struct {
	conn.Bind
	link *Link
}

func (b impairedBind) Send(bufs [][]byte, ep conn.Endpoint) error { return b.link.send(bufs, ep) }
