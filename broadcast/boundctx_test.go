package broadcast

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"
)

type ctxKey struct{}

// boundCtx behaves as context.WithTimeout(context.WithoutCancel(parent), d)
// whether or not anyone asks for Done.
func TestBoundCtx(t *testing.T) {
	parent, cancelParent := context.WithCancel(context.WithValue(context.Background(), ctxKey{}, "v"))
	cancelParent()
	b := &Broadcaster{cfg: Config{LockTimeout: 20 * time.Millisecond}}

	// Nobody asks for Done: Err still reports the deadline.
	c := b.quickCtx(parent)
	if c.Value(ctxKey{}) != "v" {
		t.Fatal("value not passed through")
	}
	if dl, ok := c.Deadline(); !ok || time.Until(dl) > 20*time.Millisecond {
		t.Fatal("deadline", dl, ok)
	}
	if c.Err() != nil {
		t.Fatal("ended at once (the parent's cancellation must not be inherited):", c.Err())
	}
	time.Sleep(25 * time.Millisecond)
	if !errors.Is(c.Err(), context.DeadlineExceeded) {
		t.Fatal("after the deadline:", c.Err())
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed after the deadline")
	}
	c.cancel()
	if !errors.Is(c.Err(), context.DeadlineExceeded) {
		t.Fatal("cancel after the deadline changed the error:", c.Err())
	}

	// Done asked first: the timer closes it.
	c = b.quickCtx(parent)
	select {
	case <-c.Done():
	case <-time.After(guard):
		t.Fatal("Done not closed by the deadline")
	}
	if !errors.Is(c.Err(), context.DeadlineExceeded) {
		t.Fatal(c.Err())
	}

	// Cancelled before the deadline, with and without Done handed out.
	for _, askDone := range []bool{false, true} {
		c = b.quickCtx(parent)
		var done <-chan struct{}
		if askDone {
			done = c.Done()
		}
		c.cancel()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatal(askDone, c.Err())
		}
		if !askDone {
			done = c.Done()
		}
		select {
		case <-done:
		default:
			t.Fatal("Done not closed after cancel", askDone)
		}
	}
}

// quickLockCtx behaves as context.WithTimeout(parent, LockTimeout): the
// parent's end and its earlier deadline count, whether or not anyone asks
// for Done first.
func TestQuickLockCtx(t *testing.T) {
	b := &Broadcaster{cfg: Config{LockTimeout: time.Hour}}
	for _, askDone := range []bool{false, true} {
		parent, cancelParent := context.WithCancel(context.WithValue(context.Background(), ctxKey{}, "v"))
		c := b.quickLockCtx(parent)
		if c.Value(ctxKey{}) != "v" {
			t.Fatal("value not passed through")
		}
		var done <-chan struct{}
		if askDone {
			done = c.Done()
		}
		if c.Err() != nil {
			t.Fatal("ended before its parent:", c.Err())
		}
		cancelParent()
		if !askDone {
			done = c.Done()
		}
		select {
		case <-done:
		case <-time.After(guard):
			t.Fatal("Done not closed after the parent was cancelled", askDone)
		}
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatal(askDone, c.Err())
		}
		c.cancel()
	}

	// The parent's deadline, earlier than the bound, is the deadline.
	for _, askDone := range []bool{false, true} {
		parent, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		c := b.quickLockCtx(parent)
		if dl, ok := c.Deadline(); !ok || time.Until(dl) > 20*time.Millisecond {
			t.Fatal("deadline", dl, ok)
		}
		if askDone {
			select {
			case <-c.Done():
			case <-time.After(guard):
				t.Fatal("Done not closed by the parent's deadline")
			}
		} else {
			time.Sleep(25 * time.Millisecond)
		}
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatal(askDone, c.Err())
		}
		c.cancel()
		cancel()
	}

	// Its own bound, earlier than the parent's, ends it; cancel stops it
	// following the parent.
	b.cfg.LockTimeout = 20 * time.Millisecond
	parent, cancelParent := context.WithCancel(context.Background())
	defer cancelParent()
	c := b.quickLockCtx(parent)
	select {
	case <-c.Done():
	case <-time.After(guard):
		t.Fatal("Done not closed by the bound")
	}
	if !errors.Is(c.Err(), context.DeadlineExceeded) {
		t.Fatal(c.Err())
	}
	c = b.quickLockCtx(parent)
	_ = c.Done()
	c.cancel()
	cancelParent()
	if !errors.Is(c.Err(), context.Canceled) {
		t.Fatal("after cancel:", c.Err())
	}
}

// handlerCtx behaves as context.WithValue(context.WithTimeout(parent, d),
// handlerKey{}, info), whether the handler asks for Done, for a value, or
// for nothing.
func TestHandlerCtx(t *testing.T) {
	b := &Broadcaster{}
	info := handlerInfo{b: b, seq: 7}
	// asks: 0 nothing, 1 Done, 2 a value (materializes too)
	for asks := range 3 {
		ask := func(c *handlerCtx) {
			switch asks {
			case 1:
				_ = c.Done()
			case 2:
				if c.Value(ctxKey{}) != "v" {
					t.Fatal("value not passed through")
				}
			}
		}
		parent, cancelParent := context.WithCancel(context.WithValue(context.Background(), ctxKey{}, "v"))
		c := newHandlerCtx(parent, time.Hour, info)
		ask(c)
		if seq, ok := SequenceOf(c); !ok || seq != 7 || !b.inHandler(c) {
			t.Fatal("handler info", seq, ok)
		}
		if c.Err() != nil {
			t.Fatal(asks, "ended early:", c.Err())
		}
		cancelParent()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatal(asks, "parent cancelled:", c.Err())
		}
		select {
		case <-c.Done():
		case <-time.After(guard):
			t.Fatal(asks, "Done not closed after the parent's cancel")
		}
		c.cancel()

		// The bound: Err reports it whether or not Done was asked for,
		// and context.Cause agrees.
		vals := context.WithValue(context.Background(), ctxKey{}, "v")
		c = newHandlerCtx(vals, 20*time.Millisecond, info)
		ask(c)
		if dl, ok := c.Deadline(); !ok || time.Until(dl) > 20*time.Millisecond {
			t.Fatal("deadline", dl, ok)
		}
		// Poll Err (not Done, which would materialize the channel): under
		// load the bound's timer may fire well after 20 ms.
		for end := time.Now().Add(guard); c.Err() == nil && time.Now().Before(end); {
			time.Sleep(5 * time.Millisecond)
		}
		if !errors.Is(c.Err(), context.DeadlineExceeded) || !errors.Is(context.Cause(c), context.DeadlineExceeded) {
			t.Fatal(asks, "after the bound:", c.Err(), context.Cause(c))
		}
		select {
		case <-c.Done():
		case <-time.After(guard):
			t.Fatal(asks, "Done not closed after the bound")
		}
		c.cancel()
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatal(asks, "cancel after the bound changed the error:", c.Err())
		}

		// Cancelled (the handler returned): Canceled, and a child
		// context made from it ends with it.
		c = newHandlerCtx(vals, time.Hour, info)
		ask(c)
		child, stop := context.WithCancel(c)
		c.cancel()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatal(asks, "after cancel:", c.Err())
		}
		select {
		case <-child.Done():
		case <-time.After(guard):
			t.Fatal(asks, "child not ended by cancel")
		}
		stop()
	}
}

// context.AfterFunc on a boundCtx runs its function when the bound ends and
// not after stop, and starts no watcher goroutine (boundCtx.AfterFunc).
func TestBoundCtxAfterFunc(t *testing.T) {
	b := &Broadcaster{cfg: Config{LockTimeout: 20 * time.Millisecond}}
	c := b.quickLockCtx(context.Background())
	before := runtime.NumGoroutine()
	ran := make(chan struct{})
	context.AfterFunc(c, func() { close(ran) })
	stopped := b.quickLockCtx(context.Background())
	stop := context.AfterFunc(stopped, func() { t.Error("stopped AfterFunc ran") })
	if n := runtime.NumGoroutine(); n >= before+2 { // a watcher goroutine per call would make two
		t.Errorf("goroutines %d -> %d after two AfterFuncs: a watcher per call", before, n)
	}
	if !stop() {
		t.Fatal("stop before the end reported false")
	}
	select {
	case <-ran:
	case <-time.After(guard):
		t.Fatal("AfterFunc did not run at the deadline")
	}
	time.Sleep(30 * time.Millisecond) // past stopped's deadline too

	// Registered after the end: runs at once.
	again := make(chan struct{})
	context.AfterFunc(c, func() { close(again) })
	select {
	case <-again:
	case <-time.After(guard):
		t.Fatal("AfterFunc on an ended context did not run")
	}
}
