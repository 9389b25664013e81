package sim

import (
	"iter"
	"slices"
)

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

// The coroutines of a coHost: its operations (ops, run one at a time as
// cur), its side coroutines, and the layer's own (passed in).

// startOp starts the next queued operation as coroutine cur, if none is in
// progress; it reports whether it started one. Nothing runs before stepOp.
func (on *coHost) startOp() bool {
	if on.cur != nil || len(on.ops) == 0 {
		return false
	}
	op := on.ops[0]
	on.ops = on.ops[1:]
	on.s.tracef("%s %s.%d: %s starts", on.tag, on.n.ID, on.epoch, op.name)
	on.cur = newCoro(op.name, op.f)
	return true
}

// stepOp steps the operation in progress if it is runnable, and reports
// whether it did.
func (on *coHost) stepOp() bool {
	c := on.cur
	if c == nil || !c.runnable() {
		return false
	}
	on.step(c)
	if c.done {
		on.cur = nil
		on.s.tracef("%s %s.%d: %s done", on.tag, on.n.ID, on.epoch, c.name)
	}
	return true
}

// stepSide steps the first runnable side coroutine, dropping it once it
// has returned, and reports whether it stepped one.
func (on *coHost) stepSide() bool {
	for _, c := range on.side {
		if c.runnable() {
			on.step(c)
			if c.done {
				on.side = slices.DeleteFunc(on.side, func(x *coro) bool { return x == c })
			}
			return true
		}
	}
	return false
}

// kill stops the host's coroutines cs (nil for none) and its side
// coroutines, in that order, each as the running one while it unwinds.
func (on *coHost) kill(cs ...*coro) {
	for _, c := range append(cs, on.side...) {
		if c != nil && !c.done {
			prev := on.running
			on.running = c
			c.kill()
			on.running = prev
		}
	}
}

// close stops, at the end of a run, every coroutine of cs and the side
// coroutines still parked; the host is dead from the first on (every call
// fails from now on).
func (on *coHost) close(cs ...*coro) {
	for _, c := range append(cs, on.side...) {
		if c != nil && !c.done {
			on.running = c
			on.dead = true
			c.kill()
			on.running = nil
		}
	}
}

// settle runs the simulation (deliveries and ticks, checking after each
// round) until quiet holds, at most limit rounds. It reports whether quiet
// held, and out when the rounds ran out (rather than the run failing).
func (s *Sim) settle(limit int, quiet func() bool) (ok, out bool) {
	for range limit {
		if s.failed != "" {
			return false, false
		}
		if quiet() {
			return true, false
		}
		if !s.DeliverDLM() {
			s.Tick()
		}
		s.Check()
	}
	return false, true
}
