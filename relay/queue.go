package relay

import (
	"bufio"
	"net"
	"sync"
	"time"

	"github.com/meshlink/meshlink/internal/key"
)

// Frame buffers come from pools by size class, so that relaying a packet
// costs no allocation and a flood reuses the memory of frames already
// written. The largest class holds the largest frame.
var frameClasses = [...]int{256, 2 << 10, 16 << 10, frameHeaderLen + MaxPayload}

var framePools [len(frameClasses)]sync.Pool

// frame is one whole frame in a pooled buffer.
type frame struct {
	b     []byte
	class int
}

// size is the memory the frame holds, what queue budgets count.
func (f *frame) size() int { return cap(f.b) }

// getFrame returns an empty frame whose buffer holds n bytes.
func getFrame(n int) *frame {
	for i, c := range frameClasses {
		if n <= c {
			if f, _ := framePools[i].Get().(*frame); f != nil {
				f.b = f.b[:0]
				return f
			}
			return &frame{b: make([]byte, 0, c), class: i}
		}
	}
	panic("relay: frame larger than the largest frame") // callers check MaxPacket
}

func putFrame(f *frame) { framePools[f.class].Put(f) }

// newPacketFrame copies key and pkt into a pooled frame of type typ.
func newPacketFrame(typ byte, k key.Public, pkt []byte) *frame {
	f := getFrame(frameHeaderLen + KeyLen + len(pkt))
	f.b = appendFrame(f.b, typ, &k, pkt)
	return f
}

// frameQueue is a connection's outbound queue, bounded in frames and in
// bytes of buffer memory. Bytes count from reserve until the frame has been
// written (or dropped), so a frame being written still counts.
type frameQueue struct {
	maxFrames, maxBytes int
	// released, if set, is told of bytes that left the queue (written,
	// dropped or discarded at close), for a budget shared by queues.
	released func(n int)
	ready    chan struct{} // a token when frames were added

	mu     sync.Mutex // guards the fields below
	frames []*frame   // waiting, oldest first
	queued int        // bytes in frames
	bytes  int        // bytes reserved, waiting or being written
	closed bool
}

func newFrameQueue(maxFrames, maxBytes int, released func(int)) *frameQueue {
	return &frameQueue{maxFrames: maxFrames, maxBytes: maxBytes, released: released, ready: make(chan struct{}, 1)}
}

// reserve makes room for n bytes, or reports that the queue is full or
// closed.
func (q *frameQueue) reserve(n int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.bytes+n > q.maxBytes || len(q.frames) >= q.maxFrames {
		return false
	}
	q.bytes += n
	return true
}

// unreserve gives back a reservation that will not be committed.
func (q *frameQueue) unreserve(n int) {
	q.mu.Lock()
	q.bytes -= n
	q.mu.Unlock()
}

// commit queues f, whose size was reserved. When the queue has closed
// meanwhile it gives the reservation back (released included), recycles f
// and reports false.
func (q *frameQueue) commit(f *frame) bool {
	q.mu.Lock()
	if q.closed {
		q.bytes -= f.size()
		q.mu.Unlock()
		q.release(f.size())
		putFrame(f)
		return false
	}
	q.frames = append(q.frames, f)
	q.queued += f.size()
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return true
}

// push queues f if it fits, and recycles it if not.
func (q *frameQueue) push(f *frame) bool {
	if !q.reserve(f.size()) {
		putFrame(f)
		return false
	}
	return q.commit(f)
}

func (q *frameQueue) release(n int) {
	if q.released != nil && n > 0 {
		q.released(n)
	}
}

// waiting reports the bytes of frames that wait, which dropOldest can free.
func (q *frameQueue) waiting() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.queued
}

// dropOldest drops waiting frames, oldest first, until at least n bytes are
// freed or none wait, and returns the frames and bytes dropped.
func (q *frameQueue) dropOldest(n int) (frames, bytes int) {
	q.mu.Lock()
	i := 0
	for ; i < len(q.frames) && bytes < n; i++ {
		f := q.frames[i]
		bytes += f.size()
		putFrame(f)
		q.frames[i] = nil
	}
	q.frames = q.frames[i:]
	q.queued -= bytes
	q.bytes -= bytes
	q.mu.Unlock()
	q.release(bytes)
	return i, bytes
}

// maxTakeBytes bounds one take. Frames taken are being written and can no
// longer be dropped, so a writer stuck on a reader that does not read
// holds at most this much (plus one frame) of the total budget; the rest
// stays waiting, where eviction reaches it. Unbounded, a writer that woke
// late (a loaded machine) took its whole queue: eight stalled readers held
// the whole budget and an honest receiver's packets were refused.
const maxTakeBytes = 64 << 10

// take moves the oldest waiting frames, at least one and up to
// maxTakeBytes, into batch (whose contents it replaces); when frames are
// left it signals ready again.
func (q *frameQueue) take(batch []*frame) []*frame {
	q.mu.Lock()
	defer q.mu.Unlock()
	batch = batch[:0]
	n, i := 0, 0
	for ; i < len(q.frames) && (i == 0 || n+q.frames[i].size() <= maxTakeBytes); i++ {
		n += q.frames[i].size()
		batch = append(batch, q.frames[i])
	}
	left := copy(q.frames, q.frames[i:])
	clear(q.frames[left:])
	q.frames = q.frames[:left]
	q.queued -= n
	if left > 0 {
		select {
		case q.ready <- struct{}{}:
		default:
		}
	}
	return batch
}

// done gives back the bytes of frames taken and written.
func (q *frameQueue) done(n int) {
	q.mu.Lock()
	q.bytes -= n
	q.mu.Unlock()
	q.release(n)
}

// close refuses later frames and discards the waiting ones. It is
// idempotent.
func (q *frameQueue) close() {
	q.mu.Lock()
	q.closed = true
	frames := q.frames
	q.frames = nil
	n := q.queued
	q.queued = 0
	q.bytes -= n
	q.mu.Unlock()
	for _, f := range frames {
		putFrame(f)
	}
	q.release(n)
}

var keepAliveFrame = []byte{FrameKeepAlive, 0, 0}

// writeTo drains q onto conn until stop closes or a write fails, batching
// whatever is queued into one flush and sending a keep-alive whenever the
// queue stays idle for keepAlive. Both ends of a relay connection use it.
// It returns nil when stop closed, and closes q before it returns.
func (q *frameQueue) writeTo(conn net.Conn, stop <-chan struct{}, keepAlive time.Duration) error {
	defer q.close()
	bw := bufio.NewWriterSize(conn, 64<<10)
	ka := time.NewTicker(keepAlive)
	defer ka.Stop()
	write := func(b []byte) error {
		conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_, err := bw.Write(b)
		return err
	}
	var batch []*frame
	for {
		var err error
		select {
		case <-stop:
			return nil
		case <-q.ready:
			batch = q.take(batch)
			n := 0
			for i, f := range batch {
				if err == nil {
					err = write(f.b)
				}
				n += f.size()
				putFrame(f)
				batch[i] = nil
			}
			q.done(n)
		case <-ka.C:
			err = write(keepAliveFrame)
		}
		if err == nil {
			err = bw.Flush()
		}
		if err != nil {
			return err
		}
	}
}
