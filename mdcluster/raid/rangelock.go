package raid

import (
	"context"
	"sync"
)

// rangeLock serialises requests on overlapping byte ranges of the array,
// first come first served: a request is granted once every request that
// arrived before it with an overlapping range has been released. Requests
// on disjoint ranges never wait for each other.
//
// This is what keeps concurrent overlapping writes from leaving the
// mirrors different (without it, two writes to one block can reach the
// two mirrors in opposite orders), keeps a later write from overtaking an
// earlier one to the same blocks, and is the resync barrier: a resync
// window holds writes to it out of the copy's way.
//
// The waiters form one list in arrival order; each counts the earlier
// overlapping entries still present and is woken when that reaches zero.
// The scan is linear in the requests present, which the engine bounds
// (Config.MaxInFlight plus one resync window).
type rangeLock struct {
	mu         sync.Mutex
	head, tail *rangeEntry
	n          int
}

type rangeEntry struct {
	lo, hi     int64
	blockers   int
	ready      chan struct{} // closed when blockers reaches 0 (nil if granted at once)
	prev, next *rangeEntry
}

func (e *rangeEntry) overlaps(o *rangeEntry) bool { return e.lo < o.hi && o.lo < e.hi }

// enqueue appends an entry for [lo, hi) and reports whether it is granted
// already.
func (l *rangeLock) enqueue(lo, hi int64) (*rangeEntry, bool) {
	e := &rangeEntry{lo: lo, hi: hi}
	l.mu.Lock()
	defer l.mu.Unlock()
	for x := l.head; x != nil; x = x.next {
		if x.overlaps(e) {
			e.blockers++
		}
	}
	if l.tail == nil {
		l.head, l.tail = e, e
	} else {
		e.prev, l.tail.next, l.tail = l.tail, e, e
	}
	l.n++
	if e.blockers == 0 {
		return e, true
	}
	e.ready = make(chan struct{})
	return e, false
}

// lock waits until [lo, hi) is granted. It reports whether it had to wait.
func (l *rangeLock) lock(lo, hi int64) (*rangeEntry, bool) {
	e, ok := l.enqueue(lo, hi)
	if !ok {
		<-e.ready
	}
	return e, !ok
}

// lockCtx is lock that gives up when ctx ends, leaving the lock as if it
// had never been asked for.
func (l *rangeLock) lockCtx(ctx context.Context, lo, hi int64) (*rangeEntry, error) {
	e, ok := l.enqueue(lo, hi)
	if ok {
		return e, nil
	}
	select {
	case <-e.ready:
		return e, nil
	case <-ctx.Done():
	}
	// Granted or not (both may have happened at once), leaving releases
	// whoever counted this entry, and the caller does nothing under it.
	l.unlock(e)
	return nil, ctx.Err()
}

// unlock releases e and wakes the later entries it was blocking.
func (l *rangeLock) unlock(e *rangeEntry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for x := e.next; x != nil; x = x.next {
		if x.overlaps(e) {
			x.blockers--
			if x.blockers == 0 {
				close(x.ready)
			}
		}
	}
	if e.prev == nil {
		l.head = e.next
	} else {
		e.prev.next = e.next
	}
	if e.next == nil {
		l.tail = e.prev
	} else {
		e.next.prev = e.prev
	}
	e.prev, e.next = nil, nil
	l.n--
}

// held returns the number of entries present (granted or waiting).
func (l *rangeLock) held() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}
