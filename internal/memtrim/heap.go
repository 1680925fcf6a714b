package memtrim

import (
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// HeapConfig says when HeapWhenIdle gives the heap's free pages back.
type HeapConfig struct {
	// Every is how often it looks.
	Every time.Duration
	// IdleCPU is the share of one CPU under which the process counts as
	// idle over one interval (0.1: a tenth of a CPU).
	IdleCPU float64
	// MinFree is the least free heap worth a trim, in bytes; the free
	// heap must also be at least a quarter of the live one.
	MinFree int64
	// Gap is the least time between two trims.
	Gap time.Duration
}

// heapSamples are the runtime metrics HeapWhenIdle reads: free heap pages
// the runtime still holds (resident unless the kernel took them), and the
// heap's objects, live and not yet swept.
var heapSamples = []metrics.Sample{
	{Name: "/memory/classes/heap/free:bytes"},
	{Name: "/memory/classes/heap/objects:bytes"},
}

// heapState reads heapSamples: free and object bytes.
func heapState() (free, objects int64) {
	s := make([]metrics.Sample, len(heapSamples))
	copy(s, heapSamples)
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 || s[1].Value.Kind() != metrics.KindUint64 {
		return 0, 0
	}
	return int64(s[0].Value.Uint64()), int64(s[1].Value.Uint64())
}

// Heap collects and returns every free page of the heap to the operating
// system (debug.FreeOSMemory), and reports how many bytes of free heap the
// process held less afterwards.
func Heap() int64 {
	before, _ := heapState()
	debug.FreeOSMemory()
	after, _ := heapState()
	return before - after
}
