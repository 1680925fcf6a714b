package httpobs

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultLogBuffer is how many access-log lines may wait for the writer.
const DefaultLogBuffer = 4096

// Entry is one access-log line (JSON). Time is when the request started,
// DurationMS how long until its response body ended.
type Entry struct {
	Time time.Time `json:"time"`
	// Role is "consumer" or "provider": which end wrote the line.
	Role    string `json:"role"`
	Service string `json:"service"`
	// Provider is the node that served the request; Source the node it
	// came from.
	Provider string `json:"provider,omitempty"`
	Source   string `json:"source,omitempty"`
	Method   string `json:"method"`
	Path     string `json:"path"`
	// Code is the response's status; 0 when there was none (Error says
	// why).
	Code       int     `json:"code"`
	DurationMS float64 `json:"duration_ms"`
	// Bytes counts the response body.
	Bytes   int64  `json:"bytes"`
	Retries int    `json:"retries"`
	TraceID string `json:"trace_id,omitempty"`
	SpanID  string `json:"span_id,omitempty"`
	Error   string `json:"error,omitempty"`
}

// AccessLog writes Entries as JSON lines from its own goroutine. Log never
// waits: when the buffer is full the line is dropped and counted, so a
// slow disk or a blocked pipe never holds a request.
type AccessLog struct {
	ch      chan Entry
	w       io.Writer
	log     *slog.Logger
	dropped atomic.Uint64
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// NewAccessLog starts writing to w, buffering up to size lines (default
// DefaultLogBuffer). log gets write errors (nil discards them).
func NewAccessLog(w io.Writer, size int, log *slog.Logger) *AccessLog {
	if size <= 0 {
		size = DefaultLogBuffer
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &AccessLog{ch: make(chan Entry, size), w: w, log: log, stop: make(chan struct{}), done: make(chan struct{})}
	go l.run()
	return l
}

// Log queues e, or drops it when the buffer is full or the log closed.
func (l *AccessLog) Log(e Entry) {
	select {
	case <-l.stop:
		l.dropped.Add(1)
		return
	default:
	}
	select {
	case l.ch <- e:
	default:
		l.dropped.Add(1)
	}
}

// Dropped counts the lines dropped so far.
func (l *AccessLog) Dropped() uint64 { return l.dropped.Load() }

// Close writes what is queued and stops; idempotent. It does not close
// the writer.
func (l *AccessLog) Close() {
	l.once.Do(func() { close(l.stop) })
	<-l.done
}

func (l *AccessLog) run() {
	defer close(l.done)
	bw := bufio.NewWriterSize(l.w, 64<<10)
	enc := json.NewEncoder(bw)
	enc.SetEscapeHTML(false)
	failing := false
	write := func(e Entry) {
		if err := enc.Encode(e); err != nil && !failing {
			failing = true // once: a full disk must not flood the log
			l.log.Warn("access log: write failed; lines are lost until it works again", "err", err)
		}
	}
	flush := func() {
		if err := bw.Flush(); err != nil && !failing {
			failing = true
			l.log.Warn("access log: write failed; lines are lost until it works again", "err", err)
		} else if err == nil {
			failing = false
		}
	}
	for {
		select {
		case e := <-l.ch:
			write(e)
			// Flush when the queue is empty: one write per burst.
			if len(l.ch) == 0 {
				flush()
			}
		case <-l.stop:
			for {
				select {
				case e := <-l.ch:
					write(e)
				default:
					flush()
					return
				}
			}
		}
	}
}
