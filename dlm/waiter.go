package dlm

import "sync/atomic"

// waiter is what a synchronous call waits on: the goroutine that completes
// the call's operation (a handler call on the transport's reader goroutine,
// a local completion, a cancellation) wakes it once. Reused through the
// space's idle pool after Reset.
type waiter struct {
	ch    chan struct{}
	woken atomic.Bool
}

func newWaiter() *waiter { return &waiter{ch: make(chan struct{}, 1)} }

// Wake ends the current wait; later calls before Reset do nothing.
func (w *waiter) Wake() {
	if !w.woken.Swap(true) {
		w.ch <- struct{}{}
	}
}

// C receives the wake-up.
func (w *waiter) C() <-chan struct{} { return w.ch }

// Reset prepares the waiter for the next wait; the wake-up must have been
// received.
func (w *waiter) Reset() { w.woken.Store(false) }
