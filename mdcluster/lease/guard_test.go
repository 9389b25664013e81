package lease

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/intent"
)

// fakeClock is a settable monotonic clock.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Duration      { return time.Duration(c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

type fakeReads struct {
	mu    sync.Mutex
	gen   uint64
	err   error
	n     int
	block chan struct{} // if set, reads wait on it
}

func (f *fakeReads) read() (Record, error) {
	f.mu.Lock()
	b := f.block
	f.mu.Unlock()
	if b != nil {
		<-b
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	return Record{Generation: f.gen, Node: 5}, f.err
}

func TestGuardWaitAndCheck(t *testing.T) {
	clk := &fakeClock{}
	rd := &fakeReads{gen: 1}
	g, err := New(Config{Duration: L, StopWait: 50 * time.Millisecond, Read: rd.read, Clock: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Wait(); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("before any view: %v", err)
	}
	g.SetView(1, true)
	// A waiter is released by the renewal.
	done := make(chan error, 1)
	go func() { done <- g.Wait() }()
	time.Sleep(5 * time.Millisecond)
	if err := g.Renew(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("waiter after renewal: %v", err)
	}
	clk.advance(L)
	start := time.Now()
	if err := g.Wait(); !errors.Is(err, ErrExpired) || time.Since(start) < 50*time.Millisecond {
		t.Fatalf("expired: %v after %v", err, time.Since(start))
	}
	rd.mu.Lock()
	rd.gen = 2
	rd.mu.Unlock()
	if err := g.Renew(); !errors.Is(err, ErrFenced) {
		t.Fatalf("newer stamp: %v", err)
	}
	if err := g.Check(); !errors.Is(err, ErrFenced) {
		t.Fatalf("check: %v", err)
	}
}

// TestOwnerRenewsBeforeEveryFlush: the bitmap's ownership check re-reads
// the stamp, so a flush after the stamp moved on is refused.
func TestOwnerRenewsBeforeEveryFlush(t *testing.T) {
	clk := &fakeClock{}
	rd := &fakeReads{gen: 1}
	g, _ := New(Config{Duration: L, Read: rd.read, Clock: clk.now})
	g.SetView(1, true)
	o := Owner{Ownership: intent.Static(3), Guard: g}
	if o.Slot() != 3 {
		t.Fatal("slot")
	}
	for i := 0; i < 3; i++ {
		if err := o.Check(); err != nil {
			t.Fatal(err)
		}
	}
	if rd.n != 3 {
		t.Fatalf("%d reads for 3 flushes", rd.n)
	}
	rd.gen = 2
	if err := o.Check(); !errors.Is(err, ErrFenced) {
		t.Fatalf("flush after a newer stamp: %v", err)
	}
}

type fakeWatchdog struct{ pings atomic.Int64 }

func (w *fakeWatchdog) Ping() error  { w.pings.Add(1); return nil }
func (w *fakeWatchdog) Close() error { return nil }

// TestRunRenewsAndFeedsWatchdog: Run re-reads every RenewEvery and pings
// the watchdog; when reads hang, the lease lapses and pings stop.
func TestRunRenewsAndFeedsWatchdog(t *testing.T) {
	rd := &fakeReads{gen: 1}
	wd := &fakeWatchdog{}
	g, _ := New(Config{Duration: 200 * time.Millisecond, Read: rd.read, Watchdog: wd})
	g.SetView(1, true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { g.Run(ctx); close(done) }()
	time.Sleep(350 * time.Millisecond)
	rd.mu.Lock()
	n := rd.n
	rd.block = make(chan struct{})
	rd.mu.Unlock()
	if n < 3 || wd.pings.Load() < 3 || g.Check() != nil {
		t.Fatalf("after 350ms: %d reads, %d pings, check %v", n, wd.pings.Load(), g.Check())
	}
	time.Sleep(350 * time.Millisecond) // reads hang: lease lapses, pings stop
	if err := g.Check(); !errors.Is(err, ErrExpired) {
		t.Fatalf("hung reads: %v", err)
	}
	p := wd.pings.Load()
	time.Sleep(150 * time.Millisecond)
	if wd.pings.Load() != p {
		t.Fatal("watchdog still pinged while reads hang")
	}
	cancel()
	rd.mu.Lock()
	close(rd.block)
	rd.mu.Unlock()
	<-done
}
