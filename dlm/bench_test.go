package dlm_test

import (
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/mdcluster/mdcluster/dlm"
)

// BenchmarkLockUnlockLocal: one op is an uncontended EX lock + unlock pair
// through the public synchronous API of a single-node lockspace.
func BenchmarkLockUnlockLocal(b *testing.B) {
	n, err := dlm.NewNode(dlm.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	ls, err := n.Open("bench", dlm.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := bg()
	b.ReportAllocs()
	for b.Loop() {
		lk, err := ls.Lock(ctx, "resource", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := lk.Unlock(ctx, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkCoreLockUnlock: the same pair on the state machine alone.
func BenchmarkCoreLockUnlock(b *testing.B) {
	c, err := dlm.NewCore(dlm.CoreConfig{})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		id, err := c.Lock(dlm.Request{Resource: "resource", Mode: dlm.EX, Owner: 1})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Unlock(id, 0, nil); err != nil {
			b.Fatal(err)
		}
		c.Callbacks()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkMutexBaseline: sync.Mutex Lock + Unlock, for the ratio.
func BenchmarkMutexBaseline(b *testing.B) {
	var mu sync.Mutex
	b.ReportAllocs()
	for b.Loop() {
		mu.Lock()
		//lint:ignore SA2001 the empty critical section is the point
		mu.Unlock()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}
