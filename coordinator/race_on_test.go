//go:build race

package coordinator

// raceEnabled: the race detector slows CPU-bound work several times over.
const raceEnabled = true
