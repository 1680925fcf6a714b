package tstest

import (
	"bytes"
	"sync"
)

// Buffer is a bytes.Buffer that a logger, a handler or an agent may write
// to while the test reads it. The zero value is an empty buffer.
type Buffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String returns what was written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
