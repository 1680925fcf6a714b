//go:build !linux

package memtrim

import (
	"context"
	"time"
)

// Executable does nothing where the trim is not implemented.
func Executable() (int64, error) { return 0, nil }

// WhenIdle waits for ctx where the trim is not implemented.
func WhenIdle(ctx context.Context, every time.Duration, done func(int64, error)) { <-ctx.Done() }

// HeapWhenIdle waits for ctx where idleness is not measured.
func HeapWhenIdle(ctx context.Context, cfg HeapConfig, done func(int64)) { <-ctx.Done() }
