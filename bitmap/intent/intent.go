// Package intent keeps one node's write-intent bitmap slot the way md
// does: before a write to a chunk may start, the chunk's bit is set in the
// node's own slot and that bitmap block is durable on every mirror; writes
// in flight are counted per chunk; once a chunk has been idle for the
// bitmap's daemon_sleep, its bit is cleared lazily, after the data written
// under it has been flushed.
//
// The invariant this buys, and that the crash tests check: at any crash,
// every chunk written since the last clean point is either identical on all
// mirrors or still marked dirty in the bitmap on every mirror, so a resync
// of the dirty chunks restores consistency.
//
// Time is a parameter (a duration since an arbitrary epoch), never read
// from the system clock, so a deterministic simulator can drive the core.
// Slot ownership (which slot this node may write, held through the DLM) is
// outside this package: it arrives through the Ownership interface.
package intent

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
)

// Device is the I/O a member device must offer: positioned reads and
// writes, and Sync, which returns once every completed write is durable.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
}

// Ownership is the seam for slot ownership over the DLM (md-cluster's
// "bitmapNNNN" lock held in PW), implemented by bitmap/ownership; Static
// serves single-node arrays and tests. Check is called before every bitmap write: once ownership is lost
// (lock revoked, node fenced) the slot must not be written any more.
type Ownership interface {
	// Slot is the bitmap slot this node owns.
	Slot() int
	// Check returns an error when ownership is no longer held.
	Check() error
}

// Static is an Ownership that always holds the given slot: for
// non-clustered bitmaps (slot 0) and for tests.
type Static int

// Slot returns the slot number.
func (s Static) Slot() int { return int(s) }

// Check always succeeds.
func (Static) Check() error { return nil }

// ErrClosed is returned after Close.
var ErrClosed = errors.New("write intent closed")

// PageSize is the unit in which bitmap blocks are written, as md writes
// bitmap pages.
const PageSize = 4096

// Config describes the slot to keep.
type Config struct {
	// Layout of the bitmap on each member device.
	Layout bitmap.Layout
	// Slot is the current content of this node's slot (as read from disk);
	// Intent takes it over. Bits already set are left set: they belong to
	// an earlier crash and are cleared by resync, not by Tick.
	Slot *bitmap.Slot
	// Mirrors are the member devices; the slot is written to each of them.
	Mirrors []Device
	// Owner names the slot and guards writes to it.
	Owner Ownership
	// DaemonSleep overrides the superblock's daemon_sleep when non-zero.
	DaemonSleep time.Duration
	// Parallel runs f(0), ..., f(n-1) and returns when all have returned:
	// the per-mirror part of a bitmap write (its pages and the sync) and
	// of Tick's preflush, one call per mirror. nil runs them one after the
	// other, in mirror order, which deterministic simulators and the crash
	// tests (whose crash points count I/O operations) need. A daemon sets
	// ParallelGo: a flush then costs the slowest mirror's write and sync
	// instead of the sum over the mirrors, and every write that sets a
	// new bit waits for that flush.
	Parallel func(n int, f func(i int))
}

// ParallelGo is a Config.Parallel that runs each call on its own
// goroutine (the last on the caller's).
func ParallelGo(n int, f func(i int)) {
	if n <= 1 {
		if n == 1 {
			f(0)
		}
		return
	}
	var wg sync.WaitGroup
	wg.Add(n - 1)
	for i := 0; i < n-1; i++ {
		go func() {
			defer wg.Done()
			f(i)
		}()
	}
	f(n - 1)
	wg.Wait()
}

// serial is the default Config.Parallel: one call after the other.
func serial(n int, f func(i int)) {
	for i := 0; i < n; i++ {
		f(i)
	}
}

// chunk is the per-chunk state md keeps in its 16-bit counters, plus what
// lazy clearing needs.
type chunk struct {
	inflight  int           // writes started and not ended
	setGen    uint64        // generation in which our bit was set in memory
	idleSince time.Duration // when inflight last dropped to 0
	lastEnd   uint64        // endSeq of the last EndWrite
	// inherited is set when the bit was already set when we first wrote
	// the chunk (left by a crash): only a resync may clear it.
	inherited bool
}

// Stats counts what Intent did; tests and benchmarks read it.
type Stats struct {
	Flushes   uint64 // bitmap writes (each to every mirror, then synced)
	BitsSet   uint64 // 0 -> 1 transitions
	BitsClear uint64 // 1 -> 0 transitions
	Waiters   int    // writers currently waiting for a flush
}

// Intent is the write-intent state of one slot. It is safe for concurrent
// use.
type Intent struct {
	mu      sync.Mutex
	cond    *sync.Cond
	layout  bitmap.Layout
	slot    *bitmap.Slot
	mirrors []Device
	owner   Ownership
	sleep   time.Duration
	base    int64 // byte offset of our slot
	// parallel runs the per-mirror I/O (Config.Parallel).
	parallel func(n int, f func(i int))

	chunks     map[uint64]*chunk
	dirtyPages map[int]bool // pages changed since the last flush snapshot
	dirtyGen   uint64       // bumped on every in-memory change to bits
	durableGen uint64       // every change up to this generation is on disk
	flushing   bool
	flushErr   error // sticky: a failed bitmap write stops all new writes
	endSeq     uint64
	closed     bool
	stats      Stats
}

// New returns the write-intent state for cfg.Owner's slot.
func New(cfg Config) (*Intent, error) {
	if cfg.Slot == nil || cfg.Owner == nil || len(cfg.Mirrors) == 0 {
		return nil, errors.New("write intent: slot, owner and at least one mirror are required")
	}
	s := cfg.Owner.Slot()
	if s < 0 || s >= cfg.Layout.Slots {
		return nil, fmt.Errorf("write intent: slot %d outside the bitmap's %d slots", s, cfg.Layout.Slots)
	}
	if cfg.Slot.Len() != cfg.Layout.Bits {
		return nil, fmt.Errorf("write intent: slot has %d bits, layout %d", cfg.Slot.Len(), cfg.Layout.Bits)
	}
	if cfg.Layout.SlotSize%PageSize != 0 {
		return nil, fmt.Errorf("write intent: slot size %d is not a multiple of %d", cfg.Layout.SlotSize, PageSize)
	}
	sleep := cfg.DaemonSleep
	if sleep == 0 {
		sleep = time.Duration(cfg.Slot.Super.DaemonSleep) * time.Second
	}
	if sleep <= 0 {
		sleep = bitmap.DefaultDaemonSleep * time.Second
	}
	par := cfg.Parallel
	if par == nil {
		par = serial
	}
	in := &Intent{
		layout: cfg.Layout, slot: cfg.Slot, mirrors: cfg.Mirrors, owner: cfg.Owner, parallel: par,
		sleep: sleep, base: cfg.Layout.SlotOffset(s),
		chunks: map[uint64]*chunk{}, dirtyPages: map[int]bool{},
	}
	in.cond = sync.NewCond(&in.mu)
	return in, nil
}

// chunkRange returns the chunks covering [off, off+n) of the data area.
func (in *Intent) chunkRange(off, n int64) (first, last uint64, err error) {
	if off < 0 || n <= 0 {
		return 0, 0, fmt.Errorf("write intent: bad range %d+%d", off, n)
	}
	first = in.layout.Chunk(off)
	last = in.layout.Chunk(off + n - 1)
	if last >= in.layout.Bits {
		return 0, 0, fmt.Errorf("write intent: range %d+%d beyond the %d chunks the bitmap covers", off, n, in.layout.Bits)
	}
	return first, last, nil
}

func pageOf(c uint64) int { return int((bitmap.SuperblockSize + c/8) / PageSize) }

// StartWrite must be called before writing [off, off+n) of the data area
// to any mirror. It returns once every chunk in the range is marked dirty
// on every mirror. Concurrent callers share bitmap writes: while one write
// is in progress, bits set by others are collected and written together by
// the next one. On error the write must not proceed (and EndWrite must not
// be called).
func (in *Intent) StartWrite(off, n int64) error {
	first, last, err := in.chunkRange(off, n)
	if err != nil {
		return err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.closed {
		return ErrClosed
	}
	if in.flushErr != nil {
		return in.flushErr
	}
	var need uint64
	for c := first; c <= last; c++ {
		st := in.chunks[c]
		if st == nil {
			st = &chunk{inherited: in.slot.Test(c)}
			in.chunks[c] = st
		}
		for st.inflight >= bitmap.MaxWriteBehind {
			in.cond.Wait() // md's COUNTER_MAX: wait for some writes to end
		}
		st.inflight++
		if in.slot.Set(c) {
			in.dirtyGen++
			st.setGen = in.dirtyGen
			in.dirtyPages[pageOf(c)] = true
			in.stats.BitsSet++
		}
		if st.setGen > need {
			need = st.setGen
		}
	}
	if err := in.waitDurable(need); err != nil {
		for c := first; c <= last; c++ {
			in.chunks[c].inflight--
		}
		in.cond.Broadcast()
		return err
	}
	return nil
}

// EndWrite records that the write of [off, off+n), started with
// StartWrite, has completed on every mirror. now is the caller's clock.
func (in *Intent) EndWrite(off, n int64, now time.Duration) {
	first, last, err := in.chunkRange(off, n)
	if err != nil {
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	in.endSeq++
	for c := first; c <= last; c++ {
		st := in.chunks[c]
		if st == nil || st.inflight == 0 {
			continue // unbalanced call; nothing to undo
		}
		st.inflight--
		st.lastEnd = in.endSeq
		if st.inflight == 0 {
			st.idleSince = now
		}
	}
	in.cond.Broadcast()
}

// waitDurable blocks (mu held) until generation gen is on disk, writing
// the bitmap itself when no other caller is doing so.
func (in *Intent) waitDurable(gen uint64) error {
	for in.durableGen < gen {
		if in.flushErr != nil {
			return in.flushErr
		}
		if in.flushing {
			in.stats.Waiters++
			in.cond.Wait()
			in.stats.Waiters--
			continue
		}
		in.flushLocked()
	}
	return in.flushErr
}

// flushLocked writes every dirty page to every mirror and syncs them,
// releasing mu during the I/O. Called with mu held and flushing false.
func (in *Intent) flushLocked() {
	in.flushing = true
	gen := in.dirtyGen
	pages := in.snapshotPages()
	in.mu.Unlock()
	err := in.owner.Check()
	if err != nil {
		err = fmt.Errorf("bitmap slot %d: ownership lost: %w", in.owner.Slot(), err)
	} else {
		err = in.writePages(pages)
	}
	in.mu.Lock()
	in.flushing = false
	in.stats.Flushes++
	if err != nil {
		in.flushErr = err
	} else if gen > in.durableGen {
		in.durableGen = gen
	}
	in.cond.Broadcast()
}

type page struct {
	off  int64
	data []byte
}

// snapshotPages copies the dirty pages of the slot image (mu held).
func (in *Intent) snapshotPages() []page {
	if len(in.dirtyPages) == 0 {
		return nil
	}
	img, _ := in.slot.Encode(in.layout.SlotSize, 0)
	var out []page
	for p := range in.dirtyPages {
		off := int64(p) * PageSize
		out = append(out, page{off: in.base + off, data: img[off : off+PageSize]})
	}
	clear(in.dirtyPages)
	return out
}

// writePages writes the pages to each mirror and syncs it, the mirrors
// through in.parallel.
func (in *Intent) writePages(pages []page) error {
	return EachMirror(in.parallel, len(in.mirrors), func(i int) error {
		m := in.mirrors[i]
		for _, p := range pages {
			if _, err := m.WriteAt(p.data, p.off); err != nil {
				return fmt.Errorf("bitmap slot %d: mirror %d: write at %d: %w", in.owner.Slot(), i, p.off, err)
			}
		}
		if err := m.Sync(); err != nil {
			return fmt.Errorf("bitmap slot %d: mirror %d: sync: %w", in.owner.Slot(), i, err)
		}
		return nil
	})
}

// EachMirror runs f(i) for each of n mirrors through parallel (a
// Config.Parallel; nil runs them one after the other, in order) and
// returns the error of the lowest mirror that failed. Run one after the
// other, the mirrors after a failure are not started.
func EachMirror(parallel func(n int, f func(i int)), n int, f func(i int) error) error {
	if parallel == nil {
		parallel = serial
	}
	errs := make([]error, n)
	var failed atomic.Bool
	parallel(n, func(i int) {
		if failed.Load() {
			return
		}
		if errs[i] = f(i); errs[i] != nil {
			failed.Store(true)
		}
	})
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// Tick is md's bitmap daemon: it clears the bits of chunks that have had
// no write in flight for at least the daemon sleep as of now, and writes
// the bitmap. Before it clears anything it syncs every mirror, so that the
// data written under those bits is durable first (md issues the bitmap
// write with a preflush for the same reason). It returns the number of
// bits cleared.
func (in *Intent) Tick(now time.Duration) (int, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.closed {
		return 0, ErrClosed
	}
	if in.flushErr != nil {
		return 0, in.flushErr
	}
	if !in.clearable(now, ^uint64(0)) {
		return 0, nil
	}
	seq := in.endSeq
	in.mu.Unlock()
	err := EachMirror(in.parallel, len(in.mirrors), func(i int) error {
		if err := in.mirrors[i].Sync(); err != nil {
			return fmt.Errorf("bitmap slot %d: mirror %d: preflush: %w", in.owner.Slot(), i, err)
		}
		return nil
	})
	in.mu.Lock()
	if err != nil {
		return 0, err
	}
	// Only chunks whose last write ended before the preflush are covered by it.
	cleared := 0
	for c, st := range in.chunks {
		if in.idle(st, now, seq) {
			if in.slot.Clear(c) {
				in.dirtyPages[pageOf(c)] = true
				in.stats.BitsClear++
				cleared++
			}
			delete(in.chunks, c)
		}
	}
	if cleared == 0 {
		return 0, nil
	}
	in.dirtyGen++
	return cleared, in.waitDurable(in.dirtyGen)
}

// clearable reports whether some chunk could be cleared at now (mu held).
func (in *Intent) clearable(now time.Duration, seq uint64) bool {
	for _, st := range in.chunks {
		if in.idle(st, now, seq) {
			return true
		}
	}
	return false
}

// idle reports whether a chunk's bit may be cleared at now, given that
// writes ended up to seq are known durable (mu held).
func (in *Intent) idle(st *chunk, now time.Duration, seq uint64) bool {
	return !st.inherited && st.inflight == 0 && st.lastEnd <= seq &&
		now-st.idleSince >= in.sleep && st.setGen <= in.durableGen
}

// Merge marks chunks dirty in this node's slot on behalf of another slot
// (a dead node's, during its recovery) and returns once they are durable
// on every mirror. The merged bits are owned by this engine from then on:
// its next page writes carry them instead of overwriting them, which a
// write to the slot from outside the engine could not guarantee. Like bits
// inherited from a crash, they are cleared only after ResyncDone, never by
// Tick alone, because the data under them may still differ between mirrors.
func (in *Intent) Merge(chunks []uint64) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.closed {
		return ErrClosed
	}
	if in.flushErr != nil {
		return in.flushErr
	}
	for _, c := range chunks {
		if c >= in.layout.Bits {
			return fmt.Errorf("write intent: merge of chunk %d beyond the %d chunks the bitmap covers", c, in.layout.Bits)
		}
	}
	var need uint64
	for _, c := range chunks {
		st := in.chunks[c]
		if st == nil {
			st = &chunk{}
			in.chunks[c] = st
		}
		st.inherited = true
		if in.slot.Set(c) {
			in.dirtyGen++
			st.setGen = in.dirtyGen
			in.dirtyPages[pageOf(c)] = true
			in.stats.BitsSet++
		}
		if st.setGen > need {
			need = st.setGen
		}
	}
	return in.waitDurable(need)
}

// ResyncDone records that the given chunks have been resynced (mirrors made
// identical and synced). Bits that only a resync may clear (inherited from a
// crash, or merged from a dead slot) become ordinary: Tick clears them once
// idle, after its preflush, like the bits of this node's own writes. The
// caller must have kept writes to those chunks out of the resync's way (as
// md's resync barrier does); writes in flight keep their bits set as usual.
func (in *Intent) ResyncDone(chunks []uint64) {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, c := range chunks {
		st := in.chunks[c]
		if st == nil {
			if !in.slot.Test(c) {
				continue
			}
			st = &chunk{}
			in.chunks[c] = st
		}
		st.inherited = false
	}
}

// Dirty reports whether chunk c is marked in this node's slot (in memory).
func (in *Intent) Dirty(c uint64) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.slot.Test(c)
}

// Stats returns a snapshot of the counters.
func (in *Intent) Stats() Stats {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.stats
}

// Close stops new writes. It waits for no one: callers end their writes
// first.
func (in *Intent) Close() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.closed = true
	in.cond.Broadcast()
	return nil
}
