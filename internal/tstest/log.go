package tstest

import (
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
)

// LogOptions tune NewLogger; the zero value logs everything, at debug level
// and up.
type LogOptions struct {
	// Level is the lowest level logged; default slog.LevelDebug.
	Level slog.Leveler
	// Prefix starts every line, e.g. the name of one node of several.
	Prefix string
	// Tee, if set, also receives every line, even after the test ended:
	// a buffer the test searches.
	Tee io.Writer
}

// Logger returns a logger writing text lines to t's output at debug level
// and up; see NewLogger.
func Logger(t testing.TB) *slog.Logger { return NewLogger(t, LogOptions{}) }

// NewLogger returns a logger writing text lines to t's output, shown with
// the test's result like t.Log; see Writer.
func NewLogger(t testing.TB, o LogOptions) *slog.Logger {
	if o.Level == nil {
		o.Level = slog.LevelDebug
	}
	w := &testWriter{out: t.Output(), prefix: []byte(o.Prefix)}
	var out io.Writer = w
	if o.Tee != nil {
		out = io.MultiWriter(o.Tee, w)
	}
	return slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: o.Level}))
}

// Writer returns a writer to t's output (testing.TB.Output) that drops
// what it is given once the test has ended, where t would panic: late lines
// come from goroutines still being torn down.
func Writer(t testing.TB) io.Writer { return &testWriter{out: t.Output()} }

type testWriter struct {
	out    io.Writer
	prefix []byte // starts each Write; slog writes a record a Write
	ended  atomic.Bool
}

func (w *testWriter) Write(p []byte) (n int, err error) {
	n = len(p) // also when t panics
	if w.ended.Load() {
		return n, nil
	}
	defer func() {
		if recover() != nil {
			w.ended.Store(true)
		}
	}()
	if len(w.prefix) > 0 {
		p = append(w.prefix[:len(w.prefix):len(w.prefix)], p...)
	}
	w.out.Write(p)
	return n, nil
}
