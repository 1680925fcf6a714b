package memtrim

import (
	"runtime"
	"strings"
	"testing"
)

// TestExecutable: trimming advises the binary's read-only mappings, and
// the process runs on (its code and data fault back in).
func TestExecutable(t *testing.T) {
	n, err := Executable()
	if err != nil {
		t.Fatal(err)
	}
	if runtime.GOOS == "linux" && n == 0 {
		t.Fatal("no mapping of the executable was advised")
	}
	// Code, read-only data (strings, tables) and a garbage collection all
	// still work.
	runtime.GC()
	if got := strings.Repeat("ab", 3); got != "ababab" {
		t.Fatalf("got %q", got)
	}
	if _, err := Executable(); err != nil {
		t.Fatal(err)
	}
}
