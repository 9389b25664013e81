package fence

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// ErrInjected is the failure a TestFencer reports when FailNext was given no
// error of its own.
var ErrInjected = errors.New("injected fence failure")

// TestFencer is a programmable Fencer for tests and the simulator: it records
// every call, can fail a given number of times, and can hold calls until
// released, so that tests can check that recovery really waits for fencing.
//
// The zero value succeeds immediately. It is safe for concurrent use.
type TestFencer struct {
	// Now stamps Result.FencedAt. When nil, FencedAt is the request's
	// FailedAt, which keeps tests free of the wall clock and still satisfies
	// the ledger's "fenced at or after the failure" rule.
	Now func() time.Time

	mu       sync.Mutex
	calls    []Request
	failures int
	failErr  error
	held     chan struct{} // non-nil while held; closed by Release
	changed  chan struct{} // closed and replaced on every call
}

// FailNext makes the next n calls fail with err (ErrInjected if err is nil),
// after any hold. n ≤ 0 clears pending failures.
func (f *TestFencer) FailNext(n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failures = max(n, 0)
	f.failErr = err
}

// Hold makes subsequent calls block until Release or their ctx is done.
// Calls are recorded before they block.
func (f *TestFencer) Hold() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.held == nil {
		f.held = make(chan struct{})
	}
}

// Release lets every held call proceed and stops holding new ones.
func (f *TestFencer) Release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.held != nil {
		close(f.held)
		f.held = nil
	}
}

// Calls returns a copy of every request received so far, in arrival order.
func (f *TestFencer) Calls() []Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// WaitCalls blocks until at least n calls have been received or ctx is done.
// Tests use it to know that a call is in progress (and held) without sleeping.
func (f *TestFencer) WaitCalls(ctx context.Context, n int) error {
	for {
		f.mu.Lock()
		got := len(f.calls)
		ch := f.changedLocked()
		f.mu.Unlock()
		if got >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("fence: waiting for %d calls, have %d: %w", n, got, ctx.Err())
		}
	}
}

func (f *TestFencer) changedLocked() chan struct{} {
	if f.changed == nil {
		f.changed = make(chan struct{})
	}
	return f.changed
}

// Fence implements Fencer.
func (f *TestFencer) Fence(ctx context.Context, req Request) (Result, error) {
	f.mu.Lock()
	f.calls = append(f.calls, req)
	close(f.changedLocked())
	f.changed = nil
	held := f.held
	f.mu.Unlock()

	if held != nil {
		select {
		case <-held:
		case <-ctx.Done():
			return Result{}, fmt.Errorf("fence: test fencer: node %s: %w: %w", req.Node, ErrTimeout, ctx.Err())
		}
	}

	f.mu.Lock()
	fail, failErr := f.failures > 0, f.failErr
	if fail {
		f.failures--
	}
	now := f.Now
	f.mu.Unlock()

	if fail {
		if failErr == nil {
			failErr = ErrInjected
		}
		return Result{}, fmt.Errorf("fence: test fencer: node %s: %w", req.Node, failErr)
	}
	at := req.FailedAt
	if now != nil {
		at = now()
	}
	return Result{Node: req.Node, Method: "test", FencedAt: at}, nil
}
