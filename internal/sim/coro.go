package sim

import "iter"

// coro runs blocking code, a bitmap ownership driver operation that waits on
// lock calls, in strict lockstep with the simulation, so that the real
// driver runs unchanged under the seeded scheduler and a seed still replays
// exactly.
//
// It is a coroutine (iter.Pull): step transfers control to it and returns
// only when it parks or returns, so exactly one of the simulation and its
// coroutines runs at any moment and nothing runs behind the scheduler's
// back. A coroutine parks inside a simulated call (a lock request, a
// resync) with the condition under which it may go on; the simulation
// evaluates that condition at its safe points (ownSim.resume) and steps the
// coroutine again when it holds. A stopped coroutine (its node crashed)
// sees every park fail and unwinds at once.
type coro struct {
	name  string
	next  func() (struct{}, bool)
	stop  func()
	yield func(struct{}) bool
	// wake is the condition a parked coroutine waits for; nil before its
	// first step.
	wake    func() bool
	started bool
	done    bool
}

// newCoro prepares body to run as a coroutine; nothing runs before step.
func newCoro(name string, body func()) *coro {
	c := &coro{name: name}
	c.next, c.stop = iter.Pull(func(yield func(struct{}) bool) {
		c.yield = yield
		body()
	})
	return c
}

// runnable reports whether step would make progress: not started yet, or
// parked on a condition that now holds.
func (c *coro) runnable() bool {
	if c.done {
		return false
	}
	return !c.started || (c.wake != nil && c.wake())
}

// step runs c until it parks again or returns.
func (c *coro) step() {
	c.started = true
	if _, ok := c.next(); !ok {
		c.done = true
	}
}

// park is called on c's own stack: it hands control back to the
// simulation until wake holds, and reports false if c was stopped instead
// (the caller must then give up at once).
func (c *coro) park(wake func() bool) bool {
	c.wake = wake
	ok := c.yield(struct{}{})
	c.wake = nil
	return ok
}

// kill stops c: a parked coroutine resumes with every park failing and runs
// to its end before kill returns.
func (c *coro) kill() {
	c.stop()
	c.done = true
}
