package nbd

import (
	"fmt"
	"io"
	"sync"
	"syscall"
)

// memStripeShift sets the granularity of MemBackend's locks: 1 MiB regions,
// hashed onto memStripes locks.
const (
	memStripeShift = 20
	memStripes     = 64
)

// MemBackend is a Backend held in memory, for tests, benchmarks and demos.
//
// Requests lock the 1 MiB regions they touch (striped over 64 locks), so
// non-overlapping requests run in parallel and overlapping ones never tear
// a copy, which also keeps the race detector meaningful in tests. It
// advertises every capability the server supports: Flush (trivially
// satisfied; there is nothing to make durable), Trim and WriteZeroes (both
// clear memory, which is faster than receiving zeroes, so FastZero is
// honoured) and MultiConn (there is no cache).
type MemBackend struct {
	data  []byte
	locks [memStripes]sync.RWMutex
}

// NewMemBackend returns a zero-filled in-memory backend of size bytes.
func NewMemBackend(size int64) *MemBackend {
	return &MemBackend{data: make([]byte, size)}
}

// Bytes returns the backing memory, for tests that check what was written.
// The caller must not use it while requests are in flight.
func (m *MemBackend) Bytes() []byte { return m.data }

// lock takes the locks covering [off, off+n) in ascending order, so two
// requests over overlapping sets cannot deadlock, and returns the mask to
// hand to unlock.
func (m *MemBackend) lock(off, n int64, write bool) uint64 {
	var mask uint64
	if n <= 0 {
		return 0
	}
	first, last := off>>memStripeShift, (off+n-1)>>memStripeShift
	if last-first+1 >= memStripes {
		mask = ^uint64(0)
	} else {
		for r := first; r <= last; r++ {
			mask |= 1 << (r % memStripes)
		}
	}
	for i := 0; i < memStripes; i++ {
		if mask&(1<<i) != 0 {
			if write {
				m.locks[i].Lock()
			} else {
				m.locks[i].RLock()
			}
		}
	}
	return mask
}

func (m *MemBackend) unlock(mask uint64, write bool) {
	for i := 0; i < memStripes; i++ {
		if mask&(1<<i) != 0 {
			if write {
				m.locks[i].Unlock()
			} else {
				m.locks[i].RUnlock()
			}
		}
	}
}

// checkRange checks [off, off+n) against a backend of the given size, with
// the errors the server would have sent: EINVAL, or ENOSPC for writes.
func checkRange(op string, off, n, size int64, write bool) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		e := syscall.EINVAL
		if write && off >= 0 && n >= 0 {
			e = syscall.ENOSPC
		}
		return fmt.Errorf("nbd: %s of %d bytes at %d is outside the %d-byte device: %w", op, n, off, size, e)
	}
	return nil
}

// ReadAt implements Backend (and io.ReaderAt): a read running past the end
// returns what there is and io.EOF.
func (m *MemBackend) ReadAt(p []byte, off int64) (int, error) {
	size := int64(len(m.data))
	if off < 0 || off > size {
		return 0, checkRange("read", off, int64(len(p)), size, false)
	}
	n := int64(len(p))
	if n > size-off {
		n = size - off
	}
	mask := m.lock(off, n, false)
	copy(p, m.data[off:off+n])
	m.unlock(mask, false)
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt implements Backend. Flags need no action: memory is as durable as
// it gets.
func (m *MemBackend) WriteAt(p []byte, off int64, _ IOFlags) error {
	if err := checkRange("write", off, int64(len(p)), int64(len(m.data)), true); err != nil {
		return err
	}
	mask := m.lock(off, int64(len(p)), true)
	copy(m.data[off:], p)
	m.unlock(mask, true)
	return nil
}

// Flush implements Backend; there is nothing to flush.
func (m *MemBackend) Flush() error { return nil }

// Trim implements Backend by zeroing the range, so trimmed data reads back
// predictably.
func (m *MemBackend) Trim(off, n int64, _ IOFlags) error {
	if err := checkRange("trim", off, n, int64(len(m.data)), false); err != nil {
		return err
	}
	m.zero(off, n)
	return nil
}

// WriteZeroes implements Backend. Memory is never a hole, so NoHole needs
// nothing, and clearing is fast, so FastZero never fails.
func (m *MemBackend) WriteZeroes(off, n int64, _ IOFlags) error {
	if err := checkRange("write zeroes", off, n, int64(len(m.data)), true); err != nil {
		return err
	}
	m.zero(off, n)
	return nil
}

func (m *MemBackend) zero(off, n int64) {
	mask := m.lock(off, n, true)
	clear(m.data[off : off+n])
	m.unlock(mask, true)
}

// Size implements Backend.
func (m *MemBackend) Size() int64 { return int64(len(m.data)) }

// Capabilities implements Backend.
func (m *MemBackend) Capabilities() Capabilities {
	return Capabilities{Flush: true, Trim: true, WriteZeroes: true, FastZero: true, MultiConn: true}
}
