// Package proxy carries connections between local applications and the mesh:
// consumer listeners that pick a provider of a service and dial it through
// the netstack, and the provider side that checks policy and dials the real
// target. Both ends meet in Splice.
package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// spliceBufSize is the copy buffer per direction. 64 KiB matches gVisor's
// and the kernel's typical segment batch, so one Read/Write pair moves a
// whole burst without extra syscalls or netstack wake-ups.
const spliceBufSize = 64 << 10

// bufPool bounds allocation: buffers are reused across connections; the
// pool only ever holds buffers that are not in use.
var bufPool = sync.Pool{New: func() any { b := make([]byte, spliceBufSize); return &b }}

// Counters accumulate bytes for a service; safe for concurrent use.
type Counters struct {
	// Sent is bytes from the connection's originator to the far side.
	Sent atomic.Int64
	// Received is bytes from the far side to the originator.
	Received atomic.Int64
}

type closeWriter interface{ CloseWrite() error }

// Splice copies a→b and b→a until both directions end, then closes both.
// A clean EOF on one side is passed on as a half-close so protocols that
// shut down their write side first still work; an error on either side
// tears down both at once. a is the originating side for the counters.
func Splice(a, b net.Conn, c *Counters) {
	var wg sync.WaitGroup
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	cp := func(dst, src net.Conn, n *atomic.Int64) {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		err := copyCounting(dst, src, *bp, n)
		if err == nil {
			if cw, ok := dst.(closeWriter); ok {
				if cw.CloseWrite() == nil {
					return
				}
			}
		}
		closeBoth()
	}
	var sent, recv *atomic.Int64
	if c != nil {
		sent, recv = &c.Sent, &c.Received
	}
	wg.Add(2)
	go cp(b, a, sent)
	go cp(a, b, recv)
	wg.Wait()
	closeBoth()
}

// copyCounting is io.CopyBuffer that adds to n as it goes (so live byte
// counts are visible during long transfers) and never uses ReaderFrom or
// WriterTo, whose fallbacks would allocate their own buffers.
func copyCounting(dst io.Writer, src io.Reader, buf []byte, n *atomic.Int64) error {
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			if n != nil && nw > 0 {
				n.Add(int64(nw))
			}
			if werr != nil {
				return werr
			}
			if nw != nr {
				return io.ErrShortWrite
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return nil
			}
			return rerr
		}
	}
}
