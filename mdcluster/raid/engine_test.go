package raid

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// TestRoundTripEveryLayout writes a pattern through the engine in random
// pieces (aligned and not, aligned buffers and not) and checks that it
// reads back, and that every copy md's layout assigns holds it.
func TestRoundTripEveryLayout(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	for name, g := range testGeometries(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			r := newRig(t, g, rigOpts{bitmap: true})
			model := make([]byte, g.Size())
			for i := 0; i < 200; i++ {
				n := 1 + rng.Int64N(96<<10)
				off := rng.Int64N(g.Size() - n)
				if rng.IntN(2) == 0 {
					off &^= 511
					n = (n + 511) &^ 511
				}
				buf := make([]byte, n+1)[rng.IntN(2):][:n]
				fillRandom(rng, buf)
				if err := r.e.WriteAt(buf, off, 0); err != nil {
					t.Fatalf("write %d+%d: %v (replay: RAID_SEED=%d)", off, n, err, seed)
				}
				copy(model[off:], buf)
			}
			got := make([]byte, g.Size())
			if n, err := r.e.ReadAt(got, 0); err != nil || n != len(got) {
				t.Fatalf("read all: %d %v", n, err)
			}
			if !bytes.Equal(got, model) {
				t.Fatalf("array reads back different at %d (replay: RAID_SEED=%d)", firstDiff(got, model), seed)
			}
			r.checkCopies(model)
			if t.Failed() {
				t.Logf("replay: RAID_SEED=%d", seed)
			}
		})
	}
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(rng.Uint32())
	}
}

func TestReadAtEOFAndRanges(t *testing.T) {
	g, _ := NewRAID1(2, 2048)
	r := newRig(t, g, rigOpts{})
	buf := make([]byte, 8192)
	n, err := r.e.ReadAt(buf, g.Size()-4096)
	if n != 4096 || err != io.EOF {
		t.Fatalf("read across the end: %d %v, want 4096 EOF", n, err)
	}
	if _, err := r.e.ReadAt(buf, g.Size()); err != io.EOF {
		t.Fatalf("read at the end: %v", err)
	}
	if err := r.e.WriteAt(buf, g.Size()-4096, 0); err == nil {
		t.Fatal("write past the end accepted")
	}
	if _, err := r.e.WriterAt(false).WriteAt(buf[:100], 7); err != nil {
		t.Fatalf("io.WriterAt: %v", err)
	}
	c := r.e.Capabilities()
	if !c.Flush || !c.MultiConn || c.MinBlockSize != 512 {
		t.Fatalf("capabilities %+v", c)
	}
}

// word layout of the integrity test's data: every 8-byte word written by
// write w at array word index i holds w (uint32) and i (uint32), so the
// writer of any word can be read off it. Zero words are the initial
// contents.
func stamp(b []byte, id uint32, firstWord int64) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint32(b[i:], id)
		binary.LittleEndian.PutUint32(b[i+4:], uint32(firstWord+int64(i/8)))
	}
}

type wrec struct {
	id         uint32
	lo, hi     int64 // words
	start, end int64 // sequence numbers
}

type rrec struct {
	lo         int64 // first word
	data       []byte
	start, end int64
}

// TestConcurrentIntegrity runs seeded random reads, writes and flushes
// from several goroutines, overlapping on purpose (half of them in a
// small hot range), with unaligned offsets, lengths and buffers, and
// checks: every read returned, word by word, data some write could have
// left there (written by a write that began before the read ended and not
// overwritten by one that ended before the read began); at the end every
// word holds one of the last writes to it; and every copy of every block
// is identical. Variants add the bitmap and a member that fails midway.
// RAID_SEED replays a run.
func TestConcurrentIntegrity(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	gs := testGeometries(t)
	for _, v := range []struct {
		name string
		geo  string
		fail int // member to fail midway, -1 none
	}{
		{"raid1-2", "raid1-2", -1},
		{"raid10-n2-3", "raid10-n2-3", -1},
		{"raid10-f2-3", "raid10-f2-3", -1},
		{"raid10-o2-3", "raid10-o2-3", -1},
		{"raid1-3-member-fails", "raid1-3", 2},
		{"raid10-n2-4-member-fails", "raid10-n2-4", 1},
	} {
		t.Run(v.name, func(t *testing.T) {
			r := newRig(t, gs[v.geo], rigOpts{bitmap: true, faults: true})
			if !runIntegrity(t, r, seed, v.fail, 0) {
				t.Fatalf("replay: RAID_SEED=%d go test -run 'TestConcurrentIntegrity/%s' ./mdcluster/raid/", seed, v.name)
			}
		})
	}
}

// TestIntegrityCatchesBrokenEngines runs the integrity workload against
// deliberately broken engines and requires it to notice.
func TestIntegrityCatchesBrokenEngines(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	g := testGeometries(t)["raid1-2"]
	q := &quietTB{TB: t}
	r := newRig(q, g, rigOpts{faults: true})
	if runIntegrity(q, r, seed, -1, mutNoRangeLock) {
		t.Fatalf("without the range lock the integrity checks passed (replay: RAID_SEED=%d)", seed)
	}
	t.Logf("without the range lock: %d complaints, e.g. %q", q.n, q.first)
}

// quietTB collects errors instead of failing the test.
type quietTB struct {
	testing.TB
	n     int
	first string
}

func (q *quietTB) Errorf(format string, args ...any) {
	if q.n == 0 {
		q.first = fmt.Sprintf(format, args...)
	}
	q.n++
}

func (q *quietTB) Helper() {}

// runIntegrity is the workload of TestConcurrentIntegrity; it reports
// whether every check passed.
func runIntegrity(t testing.TB, r *rig, seed uint64, fail int, mut mutation) bool {
	t.Helper()
	const workers, ops = 6, 150
	e := r.e
	e.mut = mut
	r.shuffleIO(seed)
	size := e.Size()
	words := size / 8
	var seq atomic.Int64
	var nextID atomic.Uint32
	var mu sync.Mutex
	var writes []wrec
	var reads []rrec
	var errs []error
	var done atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)+100))
			for i := 0; i < ops; i++ {
				if fail >= 0 && done.Add(1) == workers*ops/3 {
					r.fault[fail].Inject(Fault{Ops: OpRead | OpWrite | OpSync})
				}
				nw := 1 + rng.Int64N(4<<10/8*4) // up to 16 KiB
				var lo int64
				if rng.IntN(2) == 0 {
					lo = rng.Int64N(16 << 10 / 8) // the hot 16 KiB
				} else {
					lo = rng.Int64N(words - nw)
				}
				nw = min(nw, words-lo)
				buf := make([]byte, nw*8+8)[rng.IntN(2)*8:][:nw*8]
				switch k := rng.IntN(20); {
				case k < 11:
					id := nextID.Add(1)
					stamp(buf, id, lo)
					rec := wrec{id: id, lo: lo, hi: lo + nw, start: seq.Add(1)}
					err := e.WriteAt(buf, lo*8, nbd.IOFlags(rng.IntN(2))*nbd.FUA)
					rec.end = seq.Add(1)
					mu.Lock()
					writes = append(writes, rec)
					if err != nil {
						errs = append(errs, err)
					}
					mu.Unlock()
				case k < 19:
					rec := rrec{lo: lo, start: seq.Add(1)}
					_, err := e.ReadAt(buf, lo*8)
					rec.end = seq.Add(1)
					rec.data = buf
					mu.Lock()
					reads = append(reads, rec)
					if err != nil {
						errs = append(errs, err)
					}
					mu.Unlock()
				default:
					if err := e.Flush(); err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
					}
				}
			}
		}(w)
	}
	wg.Wait()
	ok := true
	for _, err := range errs {
		t.Errorf("I/O error: %v", err)
		ok = false
	}
	// writers of each word, for the checks
	byWord := map[int64][]wrec{}
	for _, w := range writes {
		for i := w.lo; i < w.hi; i++ {
			byWord[i] = append(byWord[i], w)
		}
	}
	byID := map[uint32]wrec{}
	for _, w := range writes {
		byID[w.id] = w
	}
	// possible reports whether word i may hold writer id's data for a
	// read spanning [start, end) in sequence numbers.
	possible := func(i int64, id uint32, start, end int64) bool {
		var from int64 // the candidate's end: later writes ending before start hide it
		if id != 0 {
			w, found := byID[id]
			if !found || i < w.lo || i >= w.hi || w.start > end {
				return false
			}
			from = w.end
		}
		for _, w2 := range byWord[i] {
			if w2.id != id && w2.start > from && w2.end < start {
				return false
			}
		}
		return true
	}
	decode := func(b []byte, i int64) (uint32, bool) {
		id, idx := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
		if id == 0 && idx == 0 {
			return 0, true
		}
		return id, idx == uint32(i)
	}
	bad := 0
	for _, rd := range reads {
		for k := 0; k*8 < len(rd.data) && bad < 5; k++ {
			i := rd.lo + int64(k)
			id, sane := decode(rd.data[k*8:], i)
			if !sane || !possible(i, id, rd.start, rd.end) {
				t.Errorf("read [%d, %d] of word %d returned writer %d (sane %v): not a value that word could hold", rd.start, rd.end, i, id, sane)
				bad++
				ok = false
			}
		}
	}
	// Final contents: through the engine, then every copy.
	final := make([]byte, size)
	if _, err := e.ReadAt(final, 0); err != nil {
		t.Errorf("final read: %v", err)
		return false
	}
	end := seq.Add(1)
	for i := int64(0); i < words && bad < 10; i++ {
		id, sane := decode(final[i*8:], i)
		if !sane || !possible(i, id, end, end) {
			t.Errorf("word %d ends with writer %d (sane %v), not one of the last writes to it", i, id, sane)
			bad++
			ok = false
		}
	}
	var skip []int
	if fail >= 0 {
		skip = append(skip, fail)
		if got := r.failures(); len(got) != 1 || got[0] != fail {
			t.Errorf("failures reported %v, want [%d]", got, fail)
			ok = false
		}
	}
	return r.checkCopies(final, skip...) && ok
}

// TestOverlappingWritesKeepMirrorsIdentical hammers one block with
// concurrent writes of different data while the devices yield on every
// operation, so the copies' writes interleave, and requires every copy to
// end identical. The same run with the range lock disabled must find the
// mirrors different: that is what the lock is for, and shows the test can
// tell.
func TestOverlappingWritesKeepMirrorsIdentical(t *testing.T) {
	g, _ := NewRAID1(3, 2048)
	run := func(mut mutation) (diverged bool) {
		r := newRig(t, g, rigOpts{})
		r.e.mut = mut
		r.shuffleIO(uint64(mut) + 1)
		for round := 0; round < 200 && !diverged; round++ {
			var wg sync.WaitGroup
			for w := 0; w < 4; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					buf := bytes.Repeat([]byte{byte(round*4 + w + 1)}, 4096)
					if err := r.e.WriteAt(buf, 0, 0); err != nil {
						t.Error(err)
					}
				}(w)
			}
			wg.Wait()
			a := r.mem[0].Contents(rigDataOff, 4096)
			for m := 1; m < 3; m++ {
				if !bytes.Equal(a, r.mem[m].Contents(rigDataOff, 4096)) {
					diverged = true
				}
			}
		}
		return diverged
	}
	if run(0) {
		t.Fatal("mirrors differ after concurrent overlapping writes")
	}
	if !run(mutNoRangeLock) {
		t.Fatal("without the range lock the mirrors never diverged: the test cannot tell")
	}
}

// TestLaterWriteNotOvertaken: a write issued after an overlapping one was
// acknowledged always wins, and a write queued behind an overlapping one
// runs after it (first come, first served).
func TestLaterWriteNotOvertaken(t *testing.T) {
	g, _ := NewRAID10(4, 0x102, 8, 4096)
	r := newRig(t, g, rigOpts{})
	gate := make(chan struct{})
	var once sync.Once
	r.mem[0].OnIO = func(op Op, off, n int64, fua bool) {
		if op == OpWrite {
			once.Do(func() { <-gate })
		}
	}
	first := make(chan error, 1)
	go func() { first <- r.e.WriteAt(bytes.Repeat([]byte{1}, 8192), 0, 0) }()
	waitFor(t, func() bool { return r.e.Stats().InFlight == 1 && r.e.locks.held() == 1 })
	second := make(chan error, 1)
	go func() { second <- r.e.WriteAt(bytes.Repeat([]byte{2}, 4096), 4096, 0) }()
	waitFor(t, func() bool { return r.e.locks.held() == 2 })
	select {
	case err := <-second:
		t.Fatalf("the overlapping second write finished before the first: %v", err)
	default:
	}
	close(gate)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := r.e.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{1}, 4096), bytes.Repeat([]byte{2}, 4096)...)
	if !bytes.Equal(got, want) {
		t.Fatal("the later write was overtaken by the earlier one")
	}
	r.checkCopies(nil)
	if r.e.Stats().RangeWaits == 0 {
		t.Error("no range wait counted")
	}
}

// waitFor polls cond, yielding, until it holds; it never sleeps on the
// wall clock and gives up after a very large number of tries.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 10_000_000; i++ {
		if cond() {
			return
		}
		runtime.Gosched()
	}
	t.Fatal("condition never held")
}

// TestFUAAndFlushDurability uses members with a volatile cache: a plain
// write is not durable on return (the model works), a FUA write is
// durable on every copy when it returns, and Flush makes every earlier
// write durable on every copy.
func TestFUAAndFlushDurability(t *testing.T) {
	for name, g := range map[string]Geometry{"raid1-2": testGeometries(t)["raid1-2"], "raid10-f2-3": testGeometries(t)["raid10-f2-3"]} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, g, rigOpts{volatile: true, bitmap: true})
			durable := func(off, n int64, want byte) bool {
				ok := true
				g.Extents(off, n, func(x Extent) bool {
					for _, l := range x.Copies {
						d := r.mem[l.Member].Durable(rigDataOff+l.Off, x.Len)
						if !bytes.Equal(d, bytes.Repeat([]byte{want}, int(x.Len))) {
							ok = false
						}
					}
					return true
				})
				return ok
			}
			// Set the bitmap bits first, so the writes below need no
			// bitmap flush (which flushes every member as a side effect).
			for _, off := range []int64{0, 128 << 10} {
				if err := r.e.WriteAt(bytes.Repeat([]byte{1}, 64<<10), off, nbd.FUA); err != nil {
					t.Fatal(err)
				}
			}
			if err := r.e.WriteAt(bytes.Repeat([]byte{7}, 64<<10), 0, 0); err != nil {
				t.Fatal(err)
			}
			if durable(0, 64<<10, 7) {
				t.Fatal("a plain write is durable at once: the volatile model is not working")
			}
			if err := r.e.WriteAt(bytes.Repeat([]byte{8}, 64<<10), 128<<10, nbd.FUA); err != nil {
				t.Fatal(err)
			}
			if !durable(128<<10, 64<<10, 8) {
				t.Fatal("a FUA write is not durable on every copy when it returns")
			}
			if durable(0, 64<<10, 7) {
				t.Fatal("a FUA write flushed unrelated data (it should cost only itself)")
			}
			if err := r.e.Flush(); err != nil {
				t.Fatal(err)
			}
			if !durable(0, 64<<10, 7) {
				t.Fatal("after Flush an acknowledged write is not durable on every copy")
			}
			if s := r.e.Stats(); s.FUAWrites != 3 || s.Flushes != 1 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

// TestBitmapDurableBeforeData checks, at every data write a member
// receives, that the chunk's bit is already durable on every member's
// bitmap. Setting the bit after the data (a deliberate bug) must be
// caught.
func TestBitmapDurableBeforeData(t *testing.T) {
	g := testGeometries(t)["raid10-n2-3"]
	run := func(mut mutation) (violations int) {
		r := newRig(t, g, rigOpts{volatile: true, bitmap: true, bitmapChunk: 16 << 10})
		r.e.mut = mut
		var mu sync.Mutex
		var checking atomic.Bool
		for _, md := range r.mem {
			md.OnIO = func(op Op, off, n int64, fua bool) {
				if op != OpWrite || off < rigDataOff || !checking.Load() {
					return
				}
				// which array chunks does this data write carry?
				var chunks []uint64
				for m := range r.mem {
					if r.mem[m] != md {
						continue
					}
					for o := off - rigDataOff; o < off-rigDataOff+n; o += 512 {
						if a, _, _, ok := g.Virt(m, o); ok {
							chunks = append(chunks, uint64(a/(16<<10)))
						}
					}
				}
				for _, other := range r.mem {
					img := other.Durable(r.layout.SlotOffset(0), r.layout.SlotSize)
					for _, c := range chunks {
						if img[256+c/8]&(1<<(c%8)) == 0 {
							mu.Lock()
							violations++
							mu.Unlock()
							return
						}
					}
				}
			}
		}
		checking.Store(true)
		rng := rand.New(rand.NewPCG(1, 2))
		for i := 0; i < 40; i++ {
			off := rng.Int64N(g.Size()/4096-8) * 4096
			if err := r.e.WriteAt(make([]byte, 8192), off, 0); err != nil {
				t.Fatal(err)
			}
		}
		checking.Store(false)
		return violations
	}
	if v := run(0); v != 0 {
		t.Fatalf("%d data writes went out before their bitmap bit was durable", v)
	}
	if v := run(mutIntentAfterData); v == 0 {
		t.Fatal("with the bit set after the data, no violation was seen: the test cannot tell")
	}
}

// TestReadBalancing: reads spread over the in-sync copies; with read
// balancing suspended, inside a remote resync window, or in a range not
// yet resynced, they all go to the first in-sync copy.
func TestReadBalancing(t *testing.T) {
	g, _ := NewRAID1(3, 4096)
	r := newRig(t, g, rigOpts{})
	buf := make([]byte, 4096)
	reads := func() []uint64 {
		var out []uint64
		for _, m := range r.mem {
			out = append(out, m.Stats().Reads)
		}
		return out
	}
	diff := func(a, b []uint64) []uint64 {
		out := make([]uint64, len(a))
		for i := range a {
			out[i] = b[i] - a[i]
		}
		return out
	}
	read := func(n int, off int64) []uint64 {
		before := reads()
		for i := 0; i < n; i++ {
			if _, err := r.e.ReadAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		return diff(before, reads())
	}
	if d := read(300, 0); d[0] < 50 || d[1] < 50 || d[2] < 50 {
		t.Fatalf("balanced reads per member %v: not spread", d)
	}
	r.e.SuspendReadBalancing(true)
	if d := read(50, 0); d[0] != 50 {
		t.Fatalf("with balancing suspended, reads per member %v; want all on member 0", d)
	}
	r.e.SuspendReadBalancing(false)
	r.e.SetResyncWindow(windowOf(1<<20, 2<<20))
	if d := read(50, 1<<20); d[0] != 50 {
		t.Fatalf("inside a remote resync window, reads per member %v; want all on member 0", d)
	}
	if d := read(60, 0); d[0] == 60 {
		t.Fatalf("outside the window reads are not balanced: %v", d)
	}
	r.e.SetResyncWindow(windowOf(0, 0))
	r.e.MarkNeedSync(0, 64<<10)
	if d := read(50, 4096); d[0] != 50 {
		t.Fatalf("in a range needing resync, reads per member %v; want all on member 0", d)
	}
	// With member 0 failed, the first in-sync copy is member 1.
	if err := r.e.FailMember(0, nil); err != nil {
		t.Fatal(err)
	}
	if d := read(20, 4096); d[1] != 20 {
		t.Fatalf("first in-sync copy after member 0 failed: %v", d)
	}
}

// TestRemoteWindowHoldsWrites: a write overlapping another node's resync
// window waits until the window moves; others do not.
func TestRemoteWindowHoldsWrites(t *testing.T) {
	g, _ := NewRAID1(2, 4096)
	r := newRig(t, g, rigOpts{})
	r.e.SetResyncWindow(windowOf(0, 1<<20))
	if err := r.e.WriteAt(make([]byte, 4096), 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.e.WriteAt(bytes.Repeat([]byte{5}, 4096), 4096, 0) }()
	waitFor(t, func() bool { return r.e.Stats().WindowWaits >= 1 })
	select {
	case err := <-done:
		t.Fatalf("a write inside the window went through: %v", err)
	default:
	}
	r.e.SetResyncWindow(windowOf(2<<20, 3<<20)) // moved on
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	r.checkCopies(nil)
}

func TestCloseFailsNewIO(t *testing.T) {
	g, _ := NewRAID1(2, 4096)
	r := newRig(t, g, rigOpts{})
	r.e.SetResyncWindow(windowOf(0, 1<<20))
	held := make(chan error, 1)
	go func() { held <- r.e.WriteAt(make([]byte, 4096), 0, 0) }()
	waitFor(t, func() bool { return r.e.Stats().WindowWaits >= 1 })
	if err := r.e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-held; !errors.Is(err, nbd.ErrShutdown) {
		t.Fatalf("held write after Close: %v, want ErrShutdown", err)
	}
	if _, err := r.e.ReadAt(make([]byte, 512), 0); !errors.Is(err, nbd.ErrShutdown) {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestRangeLockFIFOAndCancel(t *testing.T) {
	var l rangeLock
	a, _ := l.lock(0, 10)
	b, _ := l.enqueue(20, 30)
	if b.ready != nil {
		t.Fatal("a disjoint range waited")
	}
	c, okc := l.enqueue(5, 25) // behind a and b
	d, okd := l.enqueue(24, 26)
	if okc || okd {
		t.Fatal("overlapping ranges granted at once")
	}
	l.unlock(a)
	select {
	case <-c.ready:
		t.Fatal("c granted while b still holds an overlapping range")
	default:
	}
	l.unlock(b)
	<-c.ready
	select {
	case <-d.ready:
		t.Fatal("d overtook c, which came first")
	default:
	}
	l.unlock(c)
	<-d.ready
	l.unlock(d)
	if l.held() != 0 {
		t.Fatal("entries left")
	}
	sort.Ints(nil)
}
