package memtrim

import (
	"runtime"
	"testing"
)

var sink [][]byte

// garbage leaves about n bytes of free heap behind: allocated, dropped and
// collected.
func garbage(n int) {
	for i := 0; i < n>>20; i++ {
		sink = append(sink, make([]byte, 1<<20))
	}
	sink = nil
	runtime.GC()
}

// TestHeap: a collected burst leaves free heap the process holds; Heap
// gives it back.
func TestHeap(t *testing.T) {
	garbage(64 << 20)
	free, _ := heapState()
	if free < 32<<20 {
		t.Skipf("the runtime kept only %d bytes of free heap after 64 MiB of garbage: nothing to trim", free)
	}
	n := Heap()
	after, _ := heapState()
	if n < 32<<20 || after > free/2 {
		t.Fatalf("Heap released %d bytes: free heap %d before, %d after", n, free, after)
	}
}
