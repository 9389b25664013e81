package intent_test

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
)

const (
	chunkSize = 64 << 10
	nChunks   = 16
	dataOff   = 64 << 10 // data area starts here on each member
	diskSize  = dataOff + nChunks*chunkSize
	bmStart   = 8192 // like v1.2: superblock at 4 KiB, bitmap 8 sectors after it
	ourSlot   = 1
)

// rig is a two-mirror array with a clustered bitmap of 3 slots, on
// crashable in-memory disks.
type rig struct {
	plan    *intent.CrashPlan
	disks   []*intent.MemDisk
	layout  bitmap.Layout
	in      *intent.Intent
	payload byte
}

func testSuper() bitmap.Superblock {
	sb := bitmap.Superblock{
		Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 3,
		UUID: [16]byte{9, 9, 9}, SyncSize: nChunks * chunkSize / 512,
		ChunkSize: chunkSize, DaemonSleep: 5,
	}
	_ = sb.SetName("test")
	return sb
}

func newRig(t testing.TB, owner intent.Ownership) *rig {
	t.Helper()
	r := &rig{plan: intent.NewCrashPlan(-1)}
	sb := testSuper()
	l, err := bitmap.NewLayout(&sb, bmStart, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.CheckFits(bmStart, dataOff); err != nil {
		t.Fatal(err)
	}
	r.layout = l
	var devs []intent.Device
	for i := 0; i < 2; i++ {
		d := intent.NewMemDisk(fmt.Sprintf("m%d", i), diskSize, r.plan)
		if err := bitmap.Format(d, sb, l, false); err != nil {
			t.Fatal(err)
		}
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
		r.disks = append(r.disks, d)
		devs = append(devs, d)
	}
	slot, err := bitmap.ReadSlot(r.disks[0], l, ourSlot)
	if err != nil {
		t.Fatal(err)
	}
	if owner == nil {
		owner = intent.Static(ourSlot)
	}
	r.in, err = intent.New(intent.Config{Layout: l, Slot: slot, Mirrors: devs, Owner: owner})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// write performs a mirrored 4 KiB write at data offset off, the way the
// RAID1 engine will: intent first, then each mirror, then completion.
func (r *rig) write(off int64, now time.Duration) error {
	if err := r.in.StartWrite(off, 4096); err != nil {
		return err
	}
	r.payload++
	buf := bytes.Repeat([]byte{r.payload}, 4096)
	for _, d := range r.disks {
		if _, err := d.WriteAt(buf, dataOff+off); err != nil {
			return err
		}
	}
	r.in.EndWrite(off, 4096, now)
	return nil
}

func sec(n int) time.Duration { return time.Duration(n) * time.Second }

// workload is a fixed sequence covering setting bits, rewriting set
// chunks, clearing, re-setting, overlapping writes, a write spanning two
// chunks, and a failed (crashed) step at any point.
func workload(r *rig) error {
	steps := []func() error{
		func() error { return r.write(0, sec(0)) },
		func() error { return r.write(3*chunkSize+8192, sec(1)) },
		func() error { return r.write(4096, sec(2)) }, // chunk 0 again: bit already set
		func() error { _, err := r.in.Tick(sec(3)); return err },
		func() error { _, err := r.in.Tick(sec(7)); return err }, // clears 0 and 3
		func() error { return r.write(3*chunkSize, sec(8)) },
		func() error { // two writes in flight at once, data interleaved
			if err := r.in.StartWrite(5*chunkSize, 4096); err != nil {
				return err
			}
			if err := r.in.StartWrite(6*chunkSize, 4096); err != nil {
				return err
			}
			a, b := bytes.Repeat([]byte{0xa5}, 4096), bytes.Repeat([]byte{0x5a}, 4096)
			if _, err := r.disks[0].WriteAt(a, dataOff+5*chunkSize); err != nil {
				return err
			}
			if _, err := r.disks[0].WriteAt(b, dataOff+6*chunkSize); err != nil {
				return err
			}
			if _, err := r.disks[1].WriteAt(a, dataOff+5*chunkSize); err != nil {
				return err
			}
			r.in.EndWrite(5*chunkSize, 4096, sec(9))
			if _, err := r.disks[1].WriteAt(b, dataOff+6*chunkSize); err != nil {
				return err
			}
			r.in.EndWrite(6*chunkSize, 4096, sec(9))
			return nil
		},
		func() error { _, err := r.in.Tick(sec(12)); return err }, // chunk 3 idle 4s: stays
		func() error { _, err := r.in.Tick(sec(20)); return err }, // clears 3, 5, 6
		func() error { // spans chunks 1 and 2
			off := int64(2*chunkSize - 2048)
			if err := r.in.StartWrite(off, 4096); err != nil {
				return err
			}
			buf := bytes.Repeat([]byte{0x77}, 4096)
			for _, d := range r.disks {
				if _, err := d.WriteAt(buf, dataOff+off); err != nil {
					return err
				}
			}
			r.in.EndWrite(off, 4096, sec(21))
			return nil
		},
		func() error { _, err := r.in.Tick(sec(30)); return err },
		func() error { return r.write(15*chunkSize, sec(31)) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

// unprotected writes a chunk on both mirrors without write intent: the
// checker must catch it (the negative control).
func unprotected(r *rig) error {
	buf := bytes.Repeat([]byte{0xee}, 4096)
	for _, d := range r.disks {
		if _, err := d.WriteAt(buf, dataOff+7*chunkSize); err != nil {
			return err
		}
	}
	return r.disks[0].Sync()
}

// check verifies the invariant on the durable state after a crash: each
// chunk is identical on both mirrors or dirty in our slot on both.
func check(r *rig) error {
	var slots []*bitmap.Slot
	var imgs [][]byte
	for _, d := range r.disks {
		img := d.Durable()
		s, err := bitmap.ReadSlot(bytes.NewReader(img), r.layout, ourSlot)
		if err != nil {
			return fmt.Errorf("%s: bitmap unreadable after crash: %w", d.Name, err)
		}
		for i := 0; i < r.layout.Slots; i++ { // every slot must still parse
			if _, err := bitmap.ReadSlot(bytes.NewReader(img), r.layout, i); err != nil {
				return fmt.Errorf("%s: slot %d unreadable after crash: %w", d.Name, i, err)
			}
		}
		slots = append(slots, s)
		imgs = append(imgs, img)
	}
	for c := uint64(0); c < nChunks; c++ {
		lo := dataOff + int64(c)*chunkSize
		if bytes.Equal(imgs[0][lo:lo+chunkSize], imgs[1][lo:lo+chunkSize]) {
			continue
		}
		if !slots[0].Test(c) || !slots[1].Test(c) {
			return fmt.Errorf("chunk %d differs between mirrors but is not dirty on both (m0 %v, m1 %v)", c, slots[0].Test(c), slots[1].Test(c))
		}
	}
	return nil
}

type keepPolicy struct {
	name string
	keep func(disk, i int) bool
}

var policies = []keepPolicy{
	{"drop-all", func(int, int) bool { return false }},
	{"keep-all", func(int, int) bool { return true }},
	{"keep-m0-only", func(d, _ int) bool { return d == 0 }},
	{"keep-m1-only", func(d, _ int) bool { return d == 1 }},
	{"keep-odd", func(_, i int) bool { return i%2 == 1 }},
	{"keep-even", func(_, i int) bool { return i%2 == 0 }},
}

// crashEverywhere runs work with a crash before each of its I/O operations
// in turn (and once with no crash), under every keep policy, and returns
// the first invariant violation.
func crashEverywhere(t *testing.T, work func(*rig) error) (points int, err error) {
	t.Helper()
	probe := newRig(t, nil)
	start := probe.plan.Ops()
	if err := work(probe); err != nil {
		t.Fatalf("workload without crash: %v", err)
	}
	total := probe.plan.Ops() - start
	for at := 0; at <= total; at++ {
		for _, p := range policies {
			r := newRig(t, nil)
			r.plan.Arm(at)
			werr := work(r)
			if werr != nil && !errors.Is(werr, intent.ErrCrashed) {
				t.Fatalf("crash at op %d: unexpected error %v", at, werr)
			}
			if at < total && !r.plan.Crashed() {
				t.Fatalf("crash at op %d did not happen", at)
			}
			for d, disk := range r.disks {
				disk.Crash(func(i int) bool { return p.keep(d, i) })
			}
			if err := check(r); err != nil {
				return total, fmt.Errorf("crash before op %d of %d, %s: %w", at, total, p.name, err)
			}
		}
	}
	return total, nil
}

func TestCrashAtEveryPoint(t *testing.T) {
	n, err := crashEverywhere(t, workload)
	if err != nil {
		t.Fatal(err)
	}
	if n < 40 {
		t.Fatalf("workload has only %d I/O operations; expected the full sequence", n)
	}
}

// TestCheckerCatchesUnprotectedWrites shows the crash test can fail: data
// written without write intent is caught at some crash point.
func TestCheckerCatchesUnprotectedWrites(t *testing.T) {
	_, err := crashEverywhere(t, unprotected)
	if err == nil {
		t.Fatal("writes without write intent went unnoticed")
	}
	t.Logf("caught as expected: %v", err)
}

func TestBitsAndClearing(t *testing.T) {
	r := newRig(t, nil)
	if err := r.write(0, sec(0)); err != nil {
		t.Fatal(err)
	}
	if err := r.write(100, sec(1)); err != nil { // same chunk
		t.Fatal(err)
	}
	st := r.in.Stats()
	if st.BitsSet != 1 || st.Flushes != 1 {
		t.Fatalf("two writes to one chunk: %+v, want 1 bit set and 1 flush", st)
	}
	for i, d := range r.disks { // durable on both mirrors
		s, err := bitmap.ReadSlot(bytes.NewReader(d.Durable()), r.layout, ourSlot)
		if err != nil || !s.Test(0) {
			t.Fatalf("mirror %d: bit not durable (%v)", i, err)
		}
		other, _ := bitmap.ReadSlot(bytes.NewReader(d.Durable()), r.layout, 0)
		if other.Dirty() != 0 {
			t.Fatalf("mirror %d: another node's slot was touched", i)
		}
	}
	if n, err := r.in.Tick(sec(5)); err != nil || n != 0 {
		t.Fatalf("tick after 4s idle cleared %d (%v)", n, err)
	}
	// A write in flight holds the bit regardless of time.
	if err := r.in.StartWrite(chunkSize, 4096); err != nil {
		t.Fatal(err)
	}
	if n, err := r.in.Tick(sec(100)); err != nil || n != 1 {
		t.Fatalf("tick: cleared %d (%v), want only chunk 0", n, err)
	}
	if r.in.Dirty(0) || !r.in.Dirty(1) {
		t.Fatalf("after tick: chunk0 dirty=%v chunk1 dirty=%v", r.in.Dirty(0), r.in.Dirty(1))
	}
	r.in.EndWrite(chunkSize, 4096, sec(100))
	if n, _ := r.in.Tick(sec(104)); n != 0 {
		t.Fatalf("cleared a chunk idle for only 4s")
	}
	if n, _ := r.in.Tick(sec(105)); n != 1 {
		t.Fatalf("did not clear a chunk idle for 5s")
	}
	for i, d := range r.disks {
		s, _ := bitmap.ReadSlot(bytes.NewReader(d.Durable()), r.layout, ourSlot)
		if s.Dirty() != 0 {
			t.Fatalf("mirror %d: %d bits still dirty on disk after clearing", i, s.Dirty())
		}
	}
}

func TestInheritedBitsStay(t *testing.T) {
	r := newRig(t, nil)
	// Simulate a crash leftover: chunk 2 dirty on disk before we start.
	sb := testSuper()
	s, _ := bitmap.NewSlot(sb)
	s.Set(2)
	devs := []intent.Device{r.disks[0], r.disks[1]}
	in, err := intent.New(intent.Config{Layout: r.layout, Slot: s, Mirrors: devs, Owner: intent.Static(ourSlot)})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.StartWrite(2*chunkSize, 512); err != nil {
		t.Fatal(err)
	}
	in.EndWrite(2*chunkSize, 512, 0)
	if n, _ := in.Tick(sec(60)); n != 0 || !in.Dirty(2) {
		t.Fatal("a bit left by a crash was cleared without resync")
	}
}

func TestRangeErrors(t *testing.T) {
	r := newRig(t, nil)
	for _, c := range []struct{ off, n int64 }{{-1, 10}, {0, 0}, {nChunks * chunkSize, 1}, {nChunks*chunkSize - 1, 2}} {
		if err := r.in.StartWrite(c.off, c.n); err == nil {
			t.Errorf("StartWrite(%d, %d) accepted", c.off, c.n)
		}
	}
}

type lostOwner struct{ err error }

func (o *lostOwner) Slot() int    { return ourSlot }
func (o *lostOwner) Check() error { return o.err }

func TestOwnershipLost(t *testing.T) {
	o := &lostOwner{}
	r := newRig(t, o)
	if err := r.write(0, 0); err != nil {
		t.Fatal(err)
	}
	o.err = errors.New("lock bitmap0001 revoked")
	err := r.in.StartWrite(chunkSize, 4096)
	if err == nil || !errors.Is(err, o.err) {
		t.Fatalf("write after losing the slot: %v", err)
	}
	if err := r.in.StartWrite(0, 4096); err == nil {
		t.Fatal("writes continue after a failed bitmap write")
	}
}

// gateDisk blocks the first bitmap write until released, so a test can
// line up concurrent writers behind it.
type gateDisk struct {
	*intent.MemDisk
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (g *gateDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < dataOff {
		g.once.Do(func() { close(g.entered); <-g.release })
	}
	return g.MemDisk.WriteAt(p, off)
}

// TestConcurrentWritersShareFlush checks batching: writers that arrive
// while a bitmap write is in progress are all covered by one more write.
func TestConcurrentWritersShareFlush(t *testing.T) {
	sb := testSuper()
	l, _ := bitmap.NewLayout(&sb, bmStart, bitmap.SlotAlign)
	g := &gateDisk{MemDisk: intent.NewMemDisk("m0", diskSize, nil), entered: make(chan struct{}), release: make(chan struct{})}
	m1 := intent.NewMemDisk("m1", diskSize, nil)
	slot, _ := bitmap.NewSlot(sb)
	in, err := intent.New(intent.Config{Layout: l, Slot: slot, Mirrors: []intent.Device{g, m1}, Owner: intent.Static(0)})
	if err != nil {
		t.Fatal(err)
	}
	const writers = 8
	errs := make(chan error, writers)
	go func() { errs <- in.StartWrite(0, 4096) }()
	<-g.entered // the first flush is in progress and blocked
	for i := 1; i < writers; i++ {
		go func(i int) { errs <- in.StartWrite(int64(i)*chunkSize, 4096) }(i)
	}
	for in.Stats().Waiters < writers-1 {
		runtime.Gosched()
	}
	close(g.release)
	for i := 0; i < writers; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	st := in.Stats()
	if st.Flushes != 2 || st.BitsSet != writers {
		t.Fatalf("%d concurrent writers: %+v, want 2 flushes and %d bits", writers, st, writers)
	}
	s0, _ := bitmap.ReadSlot(g.MemDisk, l, 0)
	if s0.Dirty() != writers {
		t.Fatalf("%d bits on disk, want %d", s0.Dirty(), writers)
	}
}

// TestMergeThenResyncDone: merged bits are durable on every mirror when
// Merge returns, survive this node's own page writes and Ticks, and become
// clearable only after ResyncDone.
func TestMergeThenResyncDone(t *testing.T) {
	r := newRig(t, nil)
	if err := r.in.Merge([]uint64{2, 9}); err != nil {
		t.Fatal(err)
	}
	for _, d := range r.disks {
		s, err := bitmap.ReadSlot(bytes.NewReader(d.Durable()), r.layout, ourSlot)
		if err != nil {
			t.Fatal(err)
		}
		if !s.Test(2) || !s.Test(9) {
			t.Fatalf("%s: merged bits not durable: %v", d.Name, s.DirtyChunks())
		}
	}
	// Our own write to the same page and a Tick long after must keep them.
	if err := r.write(3*chunkSize, sec(0)); err != nil {
		t.Fatal(err)
	}
	if n, err := r.in.Tick(sec(100)); err != nil || n != 1 {
		t.Fatalf("tick cleared %d (err %v), want only chunk 3", n, err)
	}
	if !r.in.Dirty(2) || !r.in.Dirty(9) || r.in.Dirty(3) {
		t.Fatal("merged bits were cleared without a resync, or chunk 3 was kept")
	}
	r.in.ResyncDone([]uint64{2, 9})
	if n, err := r.in.Tick(sec(200)); err != nil || n != 2 {
		t.Fatalf("tick after resync cleared %d (err %v), want 2", n, err)
	}
	if err := r.in.Merge([]uint64{nChunks}); err == nil {
		t.Fatal("merge beyond the bitmap accepted")
	}
}

// syncBarrier holds each of the first n Syncs until all n have started
// (or the timeout passed) and counts those that waited and saw the others
// start: n-1 when the mirrors are synced at the same time, none when they
// are synced one after the other. Later Syncs pass.
type syncBarrier struct {
	n       int
	timeout time.Duration
	mu      sync.Mutex
	started int
	all     chan struct{}
	met     int
}

func newSyncBarrier(n int, timeout time.Duration) *syncBarrier {
	return &syncBarrier{n: n, timeout: timeout, all: make(chan struct{})}
}

func (b *syncBarrier) wait() {
	b.mu.Lock()
	b.started++
	if b.started >= b.n {
		if b.started == b.n {
			close(b.all)
		}
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		b.mu.Lock()
		b.met++
		b.mu.Unlock()
	case <-time.After(b.timeout):
	}
}

// barrierDisk is a MemDisk whose Syncs go through the current barrier.
type barrierDisk struct {
	*intent.MemDisk
	b *atomic.Pointer[syncBarrier]
}

func (d barrierDisk) Sync() error {
	d.b.Load().wait()
	return d.MemDisk.Sync()
}

// TestParallelMirrors: with Config.Parallel set to ParallelGo, a bitmap
// flush and Tick's preflush reach every mirror at the same time (a flush
// costs the slowest mirror, not the sum), and the bits are still durable
// on every mirror; without it (the default, for the crash tests' counted
// operations) the mirrors go one after the other.
func TestParallelMirrors(t *testing.T) {
	const n = 3
	for _, tc := range []struct {
		name     string
		parallel func(int, func(int))
		timeout  time.Duration
		wantMet  int
	}{{"ParallelGo", intent.ParallelGo, 10 * time.Second, n - 1}, {"default", nil, 50 * time.Millisecond, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			sb := testSuper()
			l, _ := bitmap.NewLayout(&sb, bmStart, bitmap.SlotAlign)
			var cur atomic.Pointer[syncBarrier]
			var disks []*intent.MemDisk
			var mirrors []intent.Device
			for i := 0; i < n; i++ {
				d := intent.NewMemDisk(fmt.Sprintf("m%d", i), diskSize, nil)
				disks = append(disks, d)
				mirrors = append(mirrors, barrierDisk{MemDisk: d, b: &cur})
			}
			slot, _ := bitmap.NewSlot(sb)
			in, err := intent.New(intent.Config{Layout: l, Slot: slot, Mirrors: mirrors, Owner: intent.Static(0),
				Parallel: tc.parallel})
			if err != nil {
				t.Fatal(err)
			}
			flush := newSyncBarrier(n, tc.timeout)
			cur.Store(flush)
			if err := in.StartWrite(0, 4096); err != nil {
				t.Fatal(err)
			}
			if flush.met != tc.wantMet {
				t.Fatalf("flush: %d of %d mirror syncs waited for the others, want %d", flush.met, n, tc.wantMet)
			}
			for _, d := range disks {
				s, _ := bitmap.ReadSlot(bytes.NewReader(d.Durable()), l, 0)
				if !s.Test(0) {
					t.Fatalf("%s: bit not durable after StartWrite", d.Name)
				}
			}
			in.EndWrite(0, 4096, sec(0))
			pre := newSyncBarrier(n, tc.timeout)
			cur.Store(pre)
			if c, err := in.Tick(sec(100)); err != nil || c != 1 {
				t.Fatalf("tick cleared %d (err %v), want 1", c, err)
			}
			if pre.met != tc.wantMet {
				t.Fatalf("preflush: %d of %d mirror syncs waited for the others, want %d", pre.met, n, tc.wantMet)
			}
		})
	}
}
