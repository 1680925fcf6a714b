//go:build !linux

package memtrim

// Executable does nothing where the trim is not implemented.
func Executable() (int64, error) { return 0, nil }
