package raid

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// MemDevice is an in-memory Device for tests and simulations. With
// Volatile set it models a disk's volatile write cache: a write is visible
// to reads at once but durable only after Sync, or at once when written
// with FUA; Durable returns what would survive a power cut. That is what
// the FUA and FLUSH ordering tests observe.
type MemDevice struct {
	name string
	bs   int
	mu   sync.Mutex
	cur  []byte
	// durable and dirty exist only for volatile devices: the durable
	// image, and the blocks written since they were last made durable.
	durable []byte
	dirty   map[int64]struct{}
	closed  bool

	// OnIO, when set before I/O starts, is called before every operation
	// with the operation, its range and whether it is a FUA write. Tests
	// use it to check what was durable when an operation was issued, or
	// to yield and shuffle concurrent operations. It runs outside the
	// device's lock and may call Durable or Contents.
	OnIO func(op Op, off, n int64, fua bool)

	stats memStats
}

type memStats struct {
	reads, writes, fuaWrites, syncs    atomic.Uint64
	bytesRead, bytesWritten, unaligned atomic.Uint64
}

// MemStats counts a MemDevice's operations.
type MemStats struct {
	Reads, Writes, FUAWrites, Syncs uint64
	BytesRead, BytesWritten         uint64
	// Unaligned counts operations whose offset or length is not a
	// multiple of the block size (the engine issues none; the bitmap
	// code's superblock I/O is unaligned).
	Unaligned uint64
}

// Op names a device operation for hooks and fault rules.
type Op uint8

const (
	// OpRead is ReadAt.
	OpRead Op = 1 << iota
	// OpWrite is WriteAt or WriteAtFUA.
	OpWrite
	// OpSync is Sync.
	OpSync
)

// String names the operation.
func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpSync:
		return "sync"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// NewMemDevice returns a zeroed device of size bytes with the given
// logical block size (0 means 512). volatile selects the write-cache
// model described on MemDevice.
func NewMemDevice(name string, size int64, blockSize int, volatile bool) *MemDevice {
	if blockSize == 0 {
		blockSize = 512
	}
	d := &MemDevice{name: name, bs: blockSize, cur: make([]byte, size)}
	if volatile {
		d.durable = make([]byte, size)
		d.dirty = map[int64]struct{}{}
	}
	return d
}

// Name returns the device's name.
func (d *MemDevice) Name() string { return d.name }

// Size returns the size in bytes.
func (d *MemDevice) Size() int64 { return int64(len(d.cur)) }

// BlockSize returns the logical block size.
func (d *MemDevice) BlockSize() int { return d.bs }

func (d *MemDevice) check(what string, off int64, n int) error {
	if d.closed {
		return fmt.Errorf("memdev %s: %s: %w", d.name, what, ErrClosed)
	}
	if off < 0 || off+int64(n) > int64(len(d.cur)) {
		return fmt.Errorf("memdev %s: %s at %d+%d beyond the device (%d bytes)", d.name, what, off, n, len(d.cur))
	}
	if off%int64(d.bs) != 0 || n%d.bs != 0 {
		d.stats.unaligned.Add(1)
	}
	return nil
}

// ReadAt reads the current (possibly not yet durable) contents.
func (d *MemDevice) ReadAt(p []byte, off int64) (int, error) {
	if f := d.OnIO; f != nil {
		f(OpRead, off, int64(len(p)), false)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check("read", off, len(p)); err != nil {
		return 0, err
	}
	copy(p, d.cur[off:])
	d.stats.reads.Add(1)
	d.stats.bytesRead.Add(uint64(len(p)))
	return len(p), nil
}

// WriteAt writes p; on a volatile device it is durable only after Sync.
func (d *MemDevice) WriteAt(p []byte, off int64) (int, error) { return d.write(p, off, false) }

// WriteAtFUA writes p durably.
func (d *MemDevice) WriteAtFUA(p []byte, off int64) (int, error) { return d.write(p, off, true) }

func (d *MemDevice) write(p []byte, off int64, fua bool) (int, error) {
	if f := d.OnIO; f != nil {
		f(OpWrite, off, int64(len(p)), fua)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check("write", off, len(p)); err != nil {
		return 0, err
	}
	copy(d.cur[off:], p)
	if d.durable != nil {
		if fua {
			copy(d.durable[off:], p)
		} else {
			for b := off / int64(d.bs); b*int64(d.bs) < off+int64(len(p)); b++ {
				d.dirty[b] = struct{}{}
			}
		}
	}
	d.stats.writes.Add(1)
	if fua {
		d.stats.fuaWrites.Add(1)
	}
	d.stats.bytesWritten.Add(uint64(len(p)))
	return len(p), nil
}

// Sync makes every earlier write durable.
func (d *MemDevice) Sync() error {
	if f := d.OnIO; f != nil {
		f(OpSync, 0, 0, false)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("memdev %s: sync: %w", d.name, ErrClosed)
	}
	bs := int64(d.bs)
	for b := range d.dirty {
		copy(d.durable[b*bs:(b+1)*bs], d.cur[b*bs:])
	}
	clear(d.dirty)
	d.stats.syncs.Add(1)
	return nil
}

// Close marks the device closed; later I/O fails.
func (d *MemDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	return nil
}

// Contents returns a copy of [off, off+n) as reads see it.
func (d *MemDevice) Contents(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]byte(nil), d.cur[off:off+n]...)
}

// Durable returns a copy of [off, off+n) as it would survive a power cut
// (the current contents on a device that is not volatile).
func (d *MemDevice) Durable(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	src := d.durable
	if src == nil {
		src = d.cur
	}
	return append([]byte(nil), src[off:off+n]...)
}

// Stats returns the operation counters.
func (d *MemDevice) Stats() MemStats {
	return MemStats{
		Reads: d.stats.reads.Load(), Writes: d.stats.writes.Load(), FUAWrites: d.stats.fuaWrites.Load(),
		Syncs: d.stats.syncs.Load(), BytesRead: d.stats.bytesRead.Load(), BytesWritten: d.stats.bytesWritten.Load(),
		Unaligned: d.stats.unaligned.Load(),
	}
}
