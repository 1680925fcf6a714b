package store

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// The event log is written behind: QueueEvent hands an event to a bounded
// queue and returns at once, so that a join never waits for the log, and
// one goroutine writes what is queued in one transaction. A full queue
// drops the event and counts it (EventsDropped). ListEvents first waits for
// the events queued before it, so that a reader sees what it caused.

// maxQueuedEvents bounds the events waiting to be written.
const maxQueuedEvents = 4096

// maxEventBatch bounds the events one transaction writes.
const maxEventBatch = 512

// EventQueuer is implemented by the stores that write the event log
// behind (every SQL store).
type EventQueuer interface {
	// QueueEvent appends e to the event log later, as AddEvent does; it
	// never blocks. It reports false when the queue was full and the event
	// was dropped (and counted).
	QueueEvent(e Event) bool
	// EventsDropped is how many events QueueEvent dropped, or failed to
	// write, since the store opened.
	EventsDropped() uint64
}

var _ EventQueuer = (*sqlStore)(nil)

type eventQueue struct {
	s       *sqlStore
	q       chan Event
	dropped atomic.Uint64
	stopc   chan struct{}
	wg      sync.WaitGroup

	mu      sync.Mutex // guards the fields below
	closed  bool
	queued  uint64 // events accepted so far
	written uint64 // of those, events written (or failed)
	waiters []eventWaiter
}

type eventWaiter struct {
	upto uint64
	ch   chan struct{}
}

func newEventQueue(s *sqlStore) *eventQueue {
	e := &eventQueue{s: s, q: make(chan Event, maxQueuedEvents), stopc: make(chan struct{})}
	e.wg.Add(1)
	go e.run()
	return e
}

// QueueEvent implements EventQueuer.
func (s *sqlStore) QueueEvent(e Event) bool {
	if e.At.IsZero() {
		e.At = time.Now()
	}
	q := s.events
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		q.dropped.Add(1)
		return false
	}
	select {
	case q.q <- e:
		q.queued++
		return true
	default:
		q.dropped.Add(1)
		return false
	}
}

// EventsDropped implements EventQueuer.
func (s *sqlStore) EventsDropped() uint64 { return s.events.dropped.Load() }

// wait returns once every event queued before it was written, or ctx is done.
func (q *eventQueue) wait(ctx context.Context) error {
	q.mu.Lock()
	if q.written >= q.queued {
		q.mu.Unlock()
		return nil
	}
	w := eventWaiter{upto: q.queued, ch: make(chan struct{})}
	q.waiters = append(q.waiters, w)
	q.mu.Unlock()
	select {
	case <-w.ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (q *eventQueue) run() {
	defer q.wg.Done()
	batch := make([]Event, 0, maxEventBatch)
	for {
		select {
		case e := <-q.q:
			batch = append(batch[:0], e)
		case <-q.stopc:
			// Everything queued before close is written.
			for {
				batch = batch[:0]
			drain:
				for len(batch) < maxEventBatch {
					select {
					case e := <-q.q:
						batch = append(batch, e)
					default:
						break drain
					}
				}
				if len(batch) == 0 {
					return
				}
				q.write(batch)
			}
		}
	more:
		for len(batch) < maxEventBatch {
			select {
			case e := <-q.q:
				batch = append(batch, e)
			default:
				break more
			}
		}
		q.write(batch)
	}
}

func (q *eventQueue) write(batch []Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err := q.s.tx(ctx, func(tx *dbTx) error {
		for _, e := range batch {
			if err := addEvent(ctx, tx, e); err != nil {
				return err
			}
		}
		return nil
	})
	cancel()
	if err != nil {
		q.dropped.Add(uint64(len(batch)))
	}
	q.mu.Lock()
	q.written += uint64(len(batch))
	keep := q.waiters[:0]
	for _, w := range q.waiters {
		if q.written >= w.upto {
			close(w.ch)
		} else {
			keep = append(keep, w)
		}
	}
	q.waiters = keep
	q.mu.Unlock()
}

// close writes what is queued and stops the queue.
func (q *eventQueue) close() {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.closed = true
	q.mu.Unlock()
	close(q.stopc)
	q.wg.Wait()
}
