package wake

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestWakeAfterWait: a waiter blocked in Wait returns true once woken, and
// sees what the waker wrote before Wake.
func TestWakeAfterWait(t *testing.T) {
	w := Get()
	var data int
	done := make(chan struct{})
	go func() {
		time.Sleep(10 * time.Millisecond)
		data = 42
		w.Wake()
		w.Wake() // a second Wake does nothing
		close(done)
	}()
	defer func() { <-done; Put(w) }() // no Wake may come after Put
	if !w.Wait(context.Background()) {
		t.Fatal("Wait returned false without a context end")
	}
	if data != 42 {
		t.Fatalf("data = %d after the wake-up, want 42", data)
	}
}

// TestWakeBeforeWait: a wake-up that comes before the wait is not lost.
func TestWakeBeforeWait(t *testing.T) {
	w := Get()
	w.Wake()
	if !w.Wait(context.Background()) {
		t.Fatal("Wait returned false")
	}
	Put(w)
}

// TestContextEnds: Wait returns false when its context ends first, the
// waiter stays armed, and a late Wake is still received; a context that
// ended for an earlier use does not end a later wait.
func TestContextEnds(t *testing.T) {
	w := Get()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if w.Wait(ctx) {
		t.Fatal("Wait returned true without a Wake")
	}
	if d := time.Since(start); d < 15*time.Millisecond {
		t.Fatalf("Wait returned after %v, before its context ended", d)
	}
	go w.Wake()
	if !w.Wait(context.Background()) {
		t.Fatal("second Wait returned false")
	}
	Put(w)

	// The same waiter (the pool is LIFO) with a context cancelled while
	// it is in use by someone else must not end the next wait early.
	w2 := Get()
	ctx2, cancel2 := context.WithCancel(context.Background())
	go func() { time.Sleep(5 * time.Millisecond); cancel2() }()
	if w2.Wait(ctx2) {
		t.Fatal("Wait returned true without a Wake")
	}
	w2.Wake()
	w2.Wait(context.Background())
	Put(w2)
	w3 := Get()
	defer Put(w3)
	woke := make(chan bool, 1)
	go func() { woke <- w3.Wait(context.Background()) }()
	select {
	case <-woke:
		t.Fatal("a wait ended without a Wake (a stale interrupt)")
	case <-time.After(30 * time.Millisecond):
	}
	w3.Wake()
	if !<-woke {
		t.Fatal("Wait returned false")
	}
}

// TestPingPong: one goroutine hands a fresh waiter to another, which wakes
// it, many times over (the pool reuses the same few); a lost wake-up hangs
// (caught by the deadline).
func TestPingPong(t *testing.T) {
	const hops = 20000
	deadline := time.AfterFunc(60*time.Second, func() { panic("ping-pong hung: a wake-up was lost") })
	defer deadline.Stop()
	ready := make(chan *Waiter)
	go func() {
		for range hops {
			w := <-ready
			w.Wake()
		}
	}()
	for range hops {
		w := Get()
		ready <- w
		if !w.Wait(context.Background()) {
			t.Fatal("Wait returned false")
		}
		Put(w)
	}
}

// TestManyWaiters: many more concurrent waiters than processors; at most
// GOMAXPROCS of them use an eventfd, the others channels, and every one of
// them is woken exactly once.
func TestManyWaiters(t *testing.T) {
	const n = 3 * Limit
	ws := make([]*Waiter, n)
	for i := range ws {
		ws[i] = Get()
	}
	withFD := 0
	for _, w := range ws {
		if w.fd != nil {
			withFD++
		}
	}
	if max := min(Limit, runtime.GOMAXPROCS(0)); withFD > max {
		t.Errorf("%d eventfd waiters in use at once, want at most %d", withFD, max)
	}
	if runtime.GOOS == "linux" && withFD == 0 {
		t.Errorf("no eventfd waiter handed out")
	}
	fds, fallbacks := Stats()
	if fallbacks == 0 {
		t.Errorf("no channel waiter handed out with %d in use", n)
	}
	var woke atomic.Int64
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Go(func() {
			if w.Wait(context.Background()) {
				woke.Add(1)
			}
		})
	}
	for _, w := range ws {
		go w.Wake()
	}
	wg.Wait()
	if woke.Load() != n {
		t.Fatalf("%d waiters woken, want %d", woke.Load(), n)
	}
	for _, w := range ws {
		Put(w)
	}
	if fds2, _ := Stats(); fds2 != fds {
		t.Errorf("eventfd waiters grew from %d to %d on reuse", fds, fds2)
	}
}

// TestRaceWakeWait: Wake and Wait race from the start, over and over, with
// contexts that end at random points; run under -race.
func TestRaceWakeWait(t *testing.T) {
	for i := range 5000 {
		w := Get()
		var ctx context.Context = context.Background()
		var cancel context.CancelFunc = func() {}
		if i%3 == 0 {
			ctx, cancel = context.WithCancel(context.Background())
			go cancel()
		}
		go w.Wake()
		if !w.Wait(ctx) {
			w.Wait(context.Background())
		}
		cancel()
		Put(w)
	}
}
