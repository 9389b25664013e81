package broadcast

import (
	"context"
	"errors"
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
