package dlm_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestManagedStartsStoppedAtGenerationZero: a node under membership control
// grants nothing before its first view, and that view's generation 1 is
// accepted as newer (no shift between view and lock-manager generations).
func TestManagedStartsStoppedAtGenerationZero(t *testing.T) {
	recovered := make(chan uint64, 4)
	n, err := dlm.NewNode(dlm.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Managed: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	ctl := n.Controller()
	ctl.OnRecovered(func(_ string, gen uint64) { recovered <- gen })
	if g := ctl.Generation(); g != 0 {
		t.Fatalf("managed node starts at generation %d, want 0", g)
	}
	ls := open(t, n, 0)
	ctx, cancel := context.WithTimeout(bg(), 50*time.Millisecond)
	defer cancel()
	if _, err := ls.Lock(ctx, "res", dlm.EX, 0); !errors.Is(err, dlm.ErrTimeout) {
		t.Fatalf("lock before the first view: %v, want ErrTimeout (stopped)", err)
	}
	if err := ctl.Recover(1, []dlm.NodeID{n.ID()}, nil, false); err != nil {
		t.Fatalf("first view, generation 1: %v", err)
	}
	select {
	case g := <-recovered:
		if g != 1 {
			t.Fatalf("recovered into %d, want 1", g)
		}
	case <-time.After(guard):
		t.Fatal("no recovery report for generation 1")
	}
	lctx, lcancel := context.WithTimeout(bg(), guard)
	defer lcancel()
	if _, err := ls.Lock(lctx, "res", dlm.EX, 0); err != nil {
		t.Fatalf("lock after the first view: %v", err)
	}
}
