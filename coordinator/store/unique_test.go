package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestUpdateNodeNetworkKeyInUse: taking another node's key is the typed
// ErrKeyInUse (the coordinator answers 409 on it), not an opaque SQLite error.
func TestUpdateNodeNetworkKeyInUse(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{})
		mkToken(t, s, "t1", true, time.Time{})
		if _, err := reg(s, "t1", "alpha", "keyA"); err != nil {
			t.Fatal(err)
		}
		b, err := reg(s, "t1", "beta", "keyB")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.UpdateNodeNetwork(ctx, b.Node.ID, testKey("keyA"), 41641, nil); !errors.Is(err, ErrKeyInUse) {
			t.Fatalf("UpdateNodeNetwork with alpha's key: %v, want ErrKeyInUse", err)
		}
		if err := s.UpdateNodeNetwork(ctx, b.Node.ID, testKey("keyC"), 41641, nil); err != nil {
			t.Fatalf("UpdateNodeNetwork with a fresh key: %v", err)
		}
		if err := s.UpdateNodeNetwork(ctx, b.Node.ID+100, testKey("keyD"), 41641, nil); !errors.Is(err, ErrNotFound) {
			t.Fatalf("UpdateNodeNetwork of no node: %v, want ErrNotFound", err)
		}
	})
}
