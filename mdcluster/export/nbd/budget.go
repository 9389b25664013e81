package nbd

import (
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// budget bounds what one connection holds in flight: a number of requests
// and a number of payload bytes. Only the connection's reader acquires, so
// there is no queue to be fair to; completions release.
type budget struct {
	maxN, maxBytes int
	waits          *atomic.Uint64 // counts acquires that had to wait (Stats.InFlightWaits)

	mu     sync.Mutex
	cond   sync.Cond
	n      int
	bytes  int
	closed bool
	// drained is when n last dropped to 0: a connection is idle only from
	// its last reply on, not from its last request's arrival.
	drained time.Time
}

func newBudget(maxN, maxBytes int, waits *atomic.Uint64) *budget {
	b := &budget{maxN: maxN, maxBytes: maxBytes, waits: waits}
	b.cond.L = &b.mu
	return b
}

// acquire takes one request slot and size bytes (size ≤ maxBytes, which
// the config guarantees), waiting while the connection is at its limit. It
// reports whether it had to wait, and false for ok if the budget was closed
// while waiting.
func (b *budget) acquire(size int) (waited, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.closed && (b.n >= b.maxN || b.bytes+size > b.maxBytes) {
		if !waited {
			waited = true
			b.waits.Add(1)
		}
		b.cond.Wait()
	}
	if b.closed {
		return waited, false
	}
	b.n++
	b.bytes += size
	return waited, true
}

// release gives back what one acquire took.
func (b *budget) release(size int) {
	b.mu.Lock()
	b.n--
	b.bytes -= size
	if b.n == 0 {
		b.drained = time.Now()
	}
	b.mu.Unlock()
	b.cond.Signal()
}

// idleSince reports whether a request is in flight and, if none is, when
// the last one completed (zero if none ever did).
func (b *budget) idleSince() (busy bool, since time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n > 0, b.drained
}

// count returns the number of requests in flight.
func (b *budget) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

// busy reports whether any request is in flight.
func (b *budget) busy() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n > 0
}

// close wakes a waiting acquire and makes later ones fail: the connection
// is going away and the reader must stop.
func (b *budget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}

// Payload buffers come from per-size-class pools (powers of two from 4 KiB,
// aligned to bufAlign), so a busy connection reuses its buffers instead of
// allocating one per request; the budget, not the pools, bounds how many
// exist at once.
const (
	minBufShift = 12
	maxBufShift = 31
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

// getBuf returns a buffer of length n from the pool of its size class.
func getBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	c := bufClass(n)
	if p, _ := bufPools[c].Get().(*[]byte); p != nil {
		return (*p)[:n]
	}
	size := 1 << (c + minBufShift)
	b := make([]byte, size)
	if uintptr(unsafe.Pointer(&b[0]))%bufAlign != 0 {
		// Go places power-of-two blocks of 4 KiB and more at least 4
		// KiB-aligned, but does not promise it: pad if it ever differs.
		p := make([]byte, size+bufAlign)
		skip := (bufAlign - int(uintptr(unsafe.Pointer(&p[0]))%bufAlign)) % bufAlign
		b = p[skip : skip+size : skip+size]
	}
	return b[:n]
}

// bufAlign is the alignment of payload buffers: what O_DIRECT needs on
// any device (the RAID engine writes a write's buffer to its members as
// it is when it is aligned, and copies it otherwise).
const bufAlign = 4096

// putBuf returns a buffer obtained from getBuf.
func putBuf(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := bufClass(cap(b))
	if cap(b) != 1<<(c+minBufShift) {
		return // not one of ours
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}

// bufClass is the index of the smallest class holding n bytes (n ≥ 1).
func bufClass(n int) int {
	shift := bits.Len(uint(n - 1))
	if shift < minBufShift {
		shift = minBufShift
	}
	return shift - minBufShift
}
