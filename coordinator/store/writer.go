package store

import (
	"context"
	"errors"
	"sync"
)

// SQLite takes one writer at a time, and each transaction costs a sync of
// the WAL whatever it holds: writes one by one top out at a few hundred a
// second. The batch writer is the one goroutine that writes to a SQLite
// store. It takes whatever writes are queued (up to maxBatch), runs each
// inside a savepoint of one transaction and commits them together (group
// commit); a write that fails rolls back to its savepoint, so it fails
// only its own caller. PostgreSQL has no batch writer: its pool runs
// transactions side by side.

const (
	// maxQueuedWrites bounds the writes waiting for the writer; a caller
	// past it waits (with its context) to queue.
	maxQueuedWrites = 4096
	// maxBatch bounds the writes of one transaction.
	maxBatch = 256
)

// writeOp is one write waiting for the batch writer.
type writeOp struct {
	ctx  context.Context
	f    func(*dbTx) error
	done chan error // buffered: the writer never waits for its caller
}

type batchWriter struct {
	db  *dbConn
	ops chan *writeOp
	// ctx is the writer's own: a caller's cancellation must not
	// interrupt a transaction other writes share.
	ctx   context.Context
	stop  context.CancelFunc
	stopc chan struct{} // closed by close: finish what is queued and return
	wg    sync.WaitGroup

	// qmu is held (shared) while a caller queues, and exclusively by close
	// to set closed: once closed is set nothing more is queued, so the
	// writer's last drain answers every queued write.
	qmu    sync.RWMutex
	closed bool

	mu      sync.Mutex // guards the fields below
	batches uint64     // transactions committed
	writes  uint64     // writes they held
}

func newBatchWriter(db *dbConn) *batchWriter {
	ctx, stop := context.WithCancel(context.Background())
	w := &batchWriter{db: db, ops: make(chan *writeOp, maxQueuedWrites), ctx: ctx, stop: stop, stopc: make(chan struct{})}
	w.wg.Add(1)
	go w.run()
	return w
}

// errWriterClosed answers writes after Close.
var errWriterClosed = errors.New("store: closed")

// do runs f in a write transaction it shares with other queued writes and
// returns f's error, or the commit's. f may run more than once (when the
// shared commit fails it runs again alone), so it must set its results
// afresh on each run.
func (w *batchWriter) do(ctx context.Context, f func(*dbTx) error) error {
	op := &writeOp{ctx: ctx, f: f, done: make(chan error, 1)}
	w.qmu.RLock()
	if w.closed {
		w.qmu.RUnlock()
		return errWriterClosed
	}
	select {
	case w.ops <- op:
		w.qmu.RUnlock()
	case <-ctx.Done():
		w.qmu.RUnlock()
		return ctx.Err()
	}
	// Once queued, the write is the writer's: its caller waits for the
	// outcome even past its own deadline, so that a cancelled caller is
	// never told "failed" about a write that then commits.
	return <-op.done
}

// stats returns the transactions committed and the writes they held.
func (w *batchWriter) stats() (batches, writes uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.batches, w.writes
}

// close finishes the queued writes and stops the writer.
func (w *batchWriter) close() {
	w.qmu.Lock()
	if w.closed {
		w.qmu.Unlock()
		return
	}
	w.closed = true
	w.qmu.Unlock()
	close(w.stopc)
	w.wg.Wait()
	w.stop()
}

func (w *batchWriter) run() {
	defer w.wg.Done()
	batch := make([]*writeOp, 0, maxBatch)
	for {
		var first *writeOp
		select {
		case first = <-w.ops:
		case <-w.stopc:
			// Writes queued before the close still get their answer.
			for {
				select {
				case op := <-w.ops:
					op.done <- w.single(op)
				default:
					return
				}
			}
		}
		batch = append(batch[:0], first)
	more:
		for len(batch) < maxBatch {
			select {
			case op := <-w.ops:
				batch = append(batch, op)
			default:
				break more
			}
		}
		w.commit(batch)
	}
}

// live is a write of a batch and its outcome.
type live struct {
	op  *writeOp
	err error
}

// commit runs batch in one transaction and answers every caller.
func (w *batchWriter) commit(batch []*writeOp) {
	ls := make([]live, 0, len(batch))
	for _, op := range batch {
		if err := op.ctx.Err(); err != nil {
			op.done <- err // gave up before its turn: nothing was written
			continue
		}
		ls = append(ls, live{op: op})
	}
	switch len(ls) {
	case 0:
		return
	case 1:
		ls[0].op.done <- w.single(ls[0].op)
		w.count(1)
		return
	}
	if err := w.shared(ls); err != nil {
		// The transaction as a whole failed (its commit, or an error that
		// rolled it back): each write again on its own, for its own answer.
		for i := range ls {
			ls[i].err = w.single(ls[i].op)
		}
	}
	for _, l := range ls {
		l.op.done <- l.err
	}
	w.count(len(ls))
}

func (w *batchWriter) count(writes int) {
	w.mu.Lock()
	w.batches++
	w.writes += uint64(writes)
	w.mu.Unlock()
}

// shared runs every write of ls in one transaction, each in a savepoint,
// recording each one's error; an error it returns means nothing was
// committed.
func (w *batchWriter) shared(ls []live) error {
	tx, err := w.db.beginTx(w.ctx, w.ctx)
	if err != nil {
		return err
	}
	for i := range ls {
		if _, err := tx.ExecContext(w.ctx, `SAVEPOINT w`); err != nil {
			tx.Rollback()
			return err
		}
		ls[i].err = ls[i].op.f(tx)
		undo := `RELEASE w`
		if ls[i].err != nil {
			undo = `ROLLBACK TO w`
		}
		if _, err := tx.ExecContext(w.ctx, undo); err != nil {
			tx.Rollback()
			return err
		}
		if ls[i].err != nil {
			if _, err := tx.ExecContext(w.ctx, `RELEASE w`); err != nil {
				tx.Rollback()
				return err
			}
		}
	}
	return tx.Commit()
}

// single runs one write in a transaction of its own.
func (w *batchWriter) single(op *writeOp) error {
	tx, err := w.db.beginTx(w.ctx, w.ctx)
	if err != nil {
		return err
	}
	if err := op.f(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// WriteStats is implemented by a store with a batch writer.
type WriteStats interface {
	// WriteBatches returns the write transactions committed and the
	// writes they held since the store opened.
	WriteBatches() (transactions, writes uint64)
}

var _ WriteStats = (*SQLite)(nil)

// WriteBatches implements WriteStats.
func (s *SQLite) WriteBatches() (transactions, writes uint64) { return s.w.stats() }
