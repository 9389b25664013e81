package intent

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileDevice is a Device backed by a regular file, a loop device or a
// block device.
type FileDevice struct {
	f      *os.File
	direct bool
}

// FileOptions select how OpenFile opens the device.
type FileOptions struct {
	// Direct opens with O_DIRECT, bypassing the page cache as md does for
	// member I/O. Reads and writes must then be aligned to the logical
	// block size (4096 is always safe); unaligned buffers are bounced
	// through an aligned copy.
	Direct bool
	// Create creates a regular file of Size bytes if it does not exist.
	Create bool
	Size   int64
}

// OpenFile opens path for reading and writing.
func OpenFile(path string, opt FileOptions) (*FileDevice, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if opt.Direct {
		flags |= unix.O_DIRECT
	}
	if opt.Create {
		flags |= unix.O_CREAT
	}
	fd, err := unix.Open(path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	if opt.Create && opt.Size > 0 {
		if st, err := f.Stat(); err == nil && st.Mode().IsRegular() && st.Size() < opt.Size {
			if err := f.Truncate(opt.Size); err != nil {
				f.Close()
				return nil, fmt.Errorf("size %s: %w", path, err)
			}
		}
	}
	return &FileDevice{f: f, direct: opt.Direct}, nil
}

// alignedBuf returns a zeroed n-byte slice whose address is 4096-aligned.
func alignedBuf(n int) []byte {
	b := make([]byte, n+PageSize)
	a := int(uintptr(unsafe.Pointer(&b[0])) & (PageSize - 1))
	off := 0
	if a != 0 {
		off = PageSize - a
	}
	return b[off : off+n : off+n]
}

func aligned(p []byte) bool {
	return len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))&(PageSize-1) == 0
}

// ReadAt reads len(p) bytes at off.
func (d *FileDevice) ReadAt(p []byte, off int64) (int, error) {
	if d.direct && !aligned(p) {
		b := alignedBuf(len(p))
		n, err := d.f.ReadAt(b, off)
		copy(p, b[:n])
		return n, err
	}
	return d.f.ReadAt(p, off)
}

// WriteAt writes p at off.
func (d *FileDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.direct && !aligned(p) {
		b := alignedBuf(len(p))
		copy(b, p)
		return d.f.WriteAt(b, off)
	}
	return d.f.WriteAt(p, off)
}

// Sync makes completed writes durable (fdatasync).
func (d *FileDevice) Sync() error {
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", d.f.Name(), err)
	}
	return nil
}

// Close closes the file.
func (d *FileDevice) Close() error { return d.f.Close() }

// ErrCrashed is returned by every operation on a MemDisk after its
// CrashPlan has crashed.
var ErrCrashed = errors.New("simulated crash")

// CrashPlan is shared by the MemDisks of one simulated machine: it counts
// their writes and syncs and crashes them all when the count reaches a
// chosen point, so a test can crash at every interesting point in turn.
type CrashPlan struct {
	mu      sync.Mutex
	ops     int
	crashAt int // -1: never
	crashed bool
}

// NewCrashPlan returns a plan that crashes before operation number at
// (counting from 0); at < 0 never crashes.
func NewCrashPlan(at int) *CrashPlan { return &CrashPlan{crashAt: at} }

// Arm makes the plan crash before the operation that comes n operations
// from now (n >= 0), or never when n < 0.
func (c *CrashPlan) Arm(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n < 0 {
		c.crashAt = -1
		return
	}
	c.crashAt = c.ops + n
}

// Ops returns the number of operations performed so far.
func (c *CrashPlan) Ops() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ops
}

// Crashed reports whether the crash has happened.
func (c *CrashPlan) Crashed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.crashed
}

// step accounts one operation and reports whether it may happen.
func (c *CrashPlan) step() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return ErrCrashed
	}
	if c.ops == c.crashAt {
		c.crashed = true
		return ErrCrashed
	}
	c.ops++
	return nil
}

// MemDisk is an in-memory Device with a volatile write cache: writes are
// visible to reads at once but become durable only at Sync. Crash throws
// away (all or some) unsynced writes, the way a power cut does.
type MemDisk struct {
	Name    string
	mu      sync.Mutex
	plan    *CrashPlan
	durable []byte
	pending []memWrite
}

type memWrite struct {
	off  int64
	data []byte
}

// NewMemDisk returns a zeroed disk of size bytes governed by plan (nil:
// never crashes).
func NewMemDisk(name string, size int64, plan *CrashPlan) *MemDisk {
	if plan == nil {
		plan = NewCrashPlan(-1)
	}
	return &MemDisk{Name: name, plan: plan, durable: make([]byte, size)}
}

// ReadAt reads the current (cached) contents.
func (m *MemDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.durable)) {
		return 0, fmt.Errorf("memdisk %s: read %d+%d beyond %d", m.Name, off, len(p), len(m.durable))
	}
	copy(p, m.durable[off:])
	for _, w := range m.pending {
		overlay(p, off, w)
	}
	return len(p), nil
}

func overlay(p []byte, off int64, w memWrite) {
	lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.data)))
	if lo < hi {
		copy(p[lo-off:hi-off], w.data[lo-w.off:hi-w.off])
	}
}

// WriteAt caches a write; it is lost by a crash unless synced first.
func (m *MemDisk) WriteAt(p []byte, off int64) (int, error) {
	if err := m.plan.step(); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.durable)) {
		return 0, fmt.Errorf("memdisk %s: write %d+%d beyond %d", m.Name, off, len(p), len(m.durable))
	}
	m.pending = append(m.pending, memWrite{off: off, data: append([]byte(nil), p...)})
	return len(p), nil
}

// Sync makes every cached write durable.
func (m *MemDisk) Sync() error {
	if err := m.plan.step(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, w := range m.pending {
		copy(m.durable[w.off:], w.data)
	}
	m.pending = nil
	return nil
}

// Crash drops unsynced writes: each cached write survives only if keep(i)
// returns true for its index i (in issue order); keep nil drops them all.
// It then clears the crash so the disk can be read and reused, as after a
// reboot.
func (m *MemDisk) Crash(keep func(i int) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, w := range m.pending {
		if keep != nil && keep(i) {
			copy(m.durable[w.off:], w.data)
		}
	}
	m.pending = nil
}

// Durable returns a copy of the durable contents (what survives a crash
// that keeps nothing).
func (m *MemDisk) Durable() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.durable...)
}

// PendingOffsets returns the offsets of unsynced writes, sorted (for tests).
func (m *MemDisk) PendingOffsets() []int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var o []int64
	for _, w := range m.pending {
		o = append(o, w.off)
	}
	sort.Slice(o, func(i, j int) bool { return o[i] < o[j] })
	return o
}
