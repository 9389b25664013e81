// Package wake is a one-shot wake-up that a goroutine blocks on and another
// goroutine fires: what a synchronous lock call waits on while the
// transport's reader goroutine handles the reply.
//
// Why not a channel: when one goroutine readies another through a channel
// (or a mutex, a condition variable, a timer), the Go runtime puts the woken
// goroutine on the waker's run queue and then, if a processor is idle, wakes
// an idle OS thread to look for work (runtime.wakep, a futex wake-up). In a
// request/reply exchange on an otherwise quiet process that thread finds
// nothing, becomes the thread blocked in the network poller, and from then on
// every socket event of the exchange wakes it instead of being found by the
// thread already running: each hop of the exchange moves between two OS
// threads, and each move is a kernel wake-up of a sleeping CPU. On Linux a
// Waiter therefore parks its goroutine in the runtime's network poller on an
// eventfd of its own, and Wake is an atomic store plus one 8-byte write(2) to
// that eventfd. The runtime finds the parked goroutine ready the next time
// it polls, which the thread that ran the waker does as soon as it runs out
// of work (the reader goroutine blocking in its next read): the waiting
// goroutine continues on the same thread and no other thread is woken. This
// roughly halves the cost a remote lock call adds to a raw TCP round trip on
// loopback (BENCHMARKS.md). Elsewhere, and when the eventfd budget is used up
// (Limit), a Waiter falls back to a channel.
//
// The eventfd's counter is never read: the poller is edge-triggered, and
// every write(2) to an eventfd is a new readiness event whether or not the
// counter is zero, so a Waiter only needs the event; at one increment per
// wake-up the 64-bit counter cannot overflow. A stale event (a Wake whose
// waiter did not need to block) only makes a later Wait look at its flag one
// extra time.
package wake

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
)

// Limit bounds the eventfd-backed Waiters a process creates, so that many
// goroutines blocking at once cannot use up file descriptors: each
// eventfd-backed Waiter holds one descriptor for the life of the process
// (they are pooled, never closed). Get hands out at most GOMAXPROCS of them
// at once.
const Limit = 64

// A Waiter is woken at most once per use: Wake ends the current wait, later
// Wakes before Put do nothing. Get one with Get, give it back with Put once
// its wake-up has been received.
type Waiter struct {
	woken atomic.Bool

	// Eventfd-backed waiters (see pollfd_linux.go).
	fd     *pollFD
	seq    uint64             // numbers the calls of Wait
	intr   atomic.Uint64      // highest seq whose context ended
	readyF func(uintptr) bool // built once: Wait does not allocate

	// Channel-backed waiters.
	ch chan struct{}
}

var (
	poolMu  sync.Mutex
	free    []*Waiter // eventfd-backed, idle
	created int       // eventfd-backed Waiters in existence
	flights int       // of them, those handed out and not yet put back
	noFD    atomic.Bool
	chPool  = sync.Pool{New: func() any { return &Waiter{ch: make(chan struct{}, 1)} }}

	stats struct {
		fallbacks atomic.Uint64
	}
)

// Get returns an idle Waiter for one wait in flight (a request waiting for
// its reply): an eventfd-backed one if fewer than GOMAXPROCS such waits hold
// one and one is idle or can be made within Limit, otherwise a
// channel-backed one. With as many waits in flight as processors, the
// processors are usually busy when a wake-up comes, a channel wake-up then
// wakes no thread, and the eventfd's write(2) would only add a system call
// per wake-up (BenchmarkRemoteThroughput: one more write per lock + unlock
// pair and about 1 µs more CPU).
func Get() *Waiter { return get() }

// GetChannel returns an idle channel-backed Waiter, for a wait that will
// select on a context anyway: Wait with a context that can end registers
// context.AfterFunc on an eventfd-backed Waiter (allocations, and work in
// the context), which in the broadcast benchmarks cost more than the thread
// wake-up it saves.
func GetChannel() *Waiter {
	stats.fallbacks.Add(1)
	return chPool.Get().(*Waiter)
}

func get() *Waiter {
	if !noFD.Load() {
		poolMu.Lock()
		if flights >= runtime.GOMAXPROCS(0) {
			poolMu.Unlock()
			stats.fallbacks.Add(1)
			return chPool.Get().(*Waiter)
		}
		if n := len(free); n > 0 {
			w := free[n-1]
			free[n-1] = nil
			free = free[:n-1]
			flights++
			poolMu.Unlock()
			return w
		}
		if created < Limit {
			created++
			flights++
			poolMu.Unlock()
			fd, err := newPollFD()
			if err == nil {
				w := &Waiter{fd: fd}
				w.readyF = w.ready
				return w
			}
			poolMu.Lock()
			created--
			flights--
			poolMu.Unlock()
			noFD.Store(true) // no eventfd here (or none left): stop trying
		} else {
			poolMu.Unlock()
		}
	}
	stats.fallbacks.Add(1)
	return chPool.Get().(*Waiter)
}

// UseChannels makes every later Get return a channel-backed Waiter, as on
// systems without eventfd; eventfd-backed Waiters already handed out keep
// working. For measuring one design against the other in the same binary
// (the test binaries of dlm and broadcast call it when the environment
// variable MDCLUSTER_WAKE_CHANNELS is set).
func UseChannels() { noFD.Store(true) }

// Put gives back a Waiter whose wait is over: its Wake has happened and
// Wait returned true, or nobody can call its Wake any more. The Waiter must
// not be used after.
func Put(w *Waiter) {
	w.woken.Store(false)
	if w.fd == nil {
		chPool.Put(w)
		return
	}
	poolMu.Lock()
	flights--
	free = append(free, w)
	poolMu.Unlock()
}

// Stats reports how many eventfd-backed Waiters exist and how many times
// Get handed out a channel-backed one instead.
func Stats() (eventfds int, fallbacks uint64) {
	poolMu.Lock()
	defer poolMu.Unlock()
	return created, stats.fallbacks.Load()
}

// Wake ends the current wait. Only the first call between Get and Put does
// anything; it never blocks. Whatever the waiter reads after its wait
// returns true was written before Wake (the flag is an atomic).
func (w *Waiter) Wake() {
	if w.woken.Swap(true) {
		return
	}
	if w.fd != nil {
		w.fd.signal()
		return
	}
	w.ch <- struct{}{}
}

// Woken reports whether Wake has been called since Get.
func (w *Waiter) Woken() bool { return w.woken.Load() }

// Wait blocks until Wake is called and returns true, or until ctx ends
// first and returns false (the Waiter is still armed: call Wait again, for
// example with context.Background(), to receive the wake-up before Put).
func (w *Waiter) Wait(ctx context.Context) bool {
	if w.fd == nil {
		return w.waitChan(ctx)
	}
	if w.woken.Load() {
		return true
	}
	w.seq++ // a new number: an interrupt of an earlier wait does not end this one
	if done := ctx.Done(); done != nil {
		if ctx.Err() != nil {
			return w.woken.Load()
		}
		seq := w.seq
		stop := context.AfterFunc(ctx, func() { w.interrupt(seq) })
		defer stop()
	}
	w.fd.wait(w.readyF)
	return w.woken.Load()
}

// ready is the eventfd waiter's condition, checked by the poller loop
// before it parks and after every readiness event.
func (w *Waiter) ready(uintptr) bool {
	return w.woken.Load() || w.intr.Load() == w.seq
}

// interrupt ends the wait numbered seq (its context ended). A late call,
// after that wait is over, only raises intr to a number already past.
func (w *Waiter) interrupt(seq uint64) {
	for {
		cur := w.intr.Load()
		if cur >= seq || w.intr.CompareAndSwap(cur, seq) {
			break
		}
	}
	w.fd.signal()
}

func (w *Waiter) waitChan(ctx context.Context) bool {
	select {
	case <-w.ch:
		return true
	case <-ctx.Done():
		return false
	}
}
