package raid

import (
	"errors"
	"math/bits"
	"sync"
	"unsafe"
)

// Device is one member of an array as the engine uses it: positioned reads
// and writes of whole logical blocks, a write that is durable on return
// (FUA), and a cache flush. DirectFile implements it over files and block
// devices opened with O_DIRECT; MemDevice is an in-memory model with a
// volatile cache for tests; FaultDevice wraps any Device to inject errors.
// The interface is small on purpose, so each of those is easy to write.
//
// The engine issues only I/O whose offset and length are multiples of
// BlockSize, from buffers aligned to Alignment. Other callers (the bitmap
// code writes 256-byte superblocks) may issue unaligned I/O; DirectFile
// handles it with bounce buffers. A Device must be safe for concurrent use.
// It also satisfies bitmap/intent.Device.
type Device interface {
	// ReadAt reads len(p) bytes at off; a short read is an error.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. On return the data is written to the
	// device (with O_DIRECT: past the page cache), but may sit in its
	// volatile cache until Sync.
	WriteAt(p []byte, off int64) (int, error)
	// WriteAtFUA writes p at off and returns once that data is durable
	// (forced unit access): a FUA write costs this one write's
	// durability, not a flush of everything.
	WriteAtFUA(p []byte, off int64) (int, error)
	// Sync returns once every write that completed before it is durable.
	Sync() error
	// Size is the device size in bytes.
	Size() int64
	// BlockSize is the logical block size: the unit of offsets and
	// lengths for direct I/O (512 or 4096 in practice).
	BlockSize() int
	// Close releases the device.
	Close() error
}

// AIOObserver is an optional interface of a Device whose writes the
// engine submits with native AIO (a DirectFile, or a type embedding one so
// that the engine still uses AIO on it). Those writes go to the descriptor
// straight from the engine, past the Device's own WriteAt, so this is the
// only way such a device learns of them: for each batch, on the submitting
// goroutine, the engine calls AIOSubmit for every write to this device
// just before the batch goes to the kernel (nothing of it has started),
// then AIOInFlight for each once the whole batch is submitted, before it
// waits for the completions. off is the device offset; p the data, which
// the observer must neither keep nor change. Either may block: the
// request waits, holding its range lock and its write intent.
//
// Production devices do not implement it. It exists so that a crash test
// can stop a process with a request's mirror writes in flight (and record
// what they overwrite), which the blocking path's WriteAt would otherwise
// be the only place to do; a tracer could use it to count writes in
// flight.
type AIOObserver interface {
	AIOSubmit(p []byte, off int64)
	AIOInFlight(p []byte, off int64)
}

// Alignment is the memory alignment of the engine's I/O buffers: a page,
// which satisfies O_DIRECT on every Linux file system and block device.
const Alignment = 4096

// ErrClosed is returned (wrapped) by a device or engine used after Close.
var ErrClosed = errors.New("closed")

// alignedBuf returns a zeroed n-byte slice whose first byte is
// Alignment-aligned.
func alignedBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	b := make([]byte, n+Alignment)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (Alignment - 1)); r != 0 {
		skip = Alignment - r
	}
	return b[skip : skip+n : skip+n]
}

// isAligned reports whether p starts at an Alignment boundary.
func isAligned(p []byte) bool {
	return len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))&(Alignment-1) == 0
}

// bufPool hands out aligned buffers in power-of-two size classes from
// Alignment up to max. Buffers are recycled through sync.Pool; how many
// exist at once is bounded by the engine's in-flight limit (each request
// holds at most one), not by the pool.
type bufPool struct {
	max     int
	classes []sync.Pool // class i holds buffers of Alignment<<i bytes
}

func newBufPool(max int) *bufPool {
	p := &bufPool{max: max}
	n := 1
	for Alignment<<(n-1) < max {
		n++
	}
	p.classes = make([]sync.Pool, n)
	return p
}

func classOf(n int) int {
	if n <= Alignment {
		return 0
	}
	return bits.Len(uint(n-1)) - bits.Len(uint(Alignment-1))
}

// get returns an aligned buffer of length n (its contents are undefined).
// Sizes above the pool's max are allocated and not recycled.
func (p *bufPool) get(n int) []byte {
	c := classOf(n)
	if c >= len(p.classes) {
		return alignedBuf(n)
	}
	if v := p.classes[c].Get(); v != nil {
		return (*v.(*[]byte))[:n]
	}
	return alignedBuf(Alignment << c)[:n]
}

// put recycles a buffer from get.
func (p *bufPool) put(b []byte) {
	c := classOf(cap(b))
	if c >= len(p.classes) || cap(b) != Alignment<<c {
		return
	}
	b = b[:cap(b)]
	p.classes[c].Put(&b)
}
