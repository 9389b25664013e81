package raid

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
)

// Test arrays put the bitmap where mdadm puts an internal one on v1.2
// (8 KiB into the device) and the data at 1 MiB.
const (
	rigBitmapStart = 8192
	rigDataOff     = 1 << 20
)

type rigOpts struct {
	volatile    bool          // MemDevices model a volatile cache
	faults      bool          // members wrapped in FaultDevice
	bitmap      bool          // a real write-intent bitmap (bitmap/intent)
	bitmapChunk int64         // default 64 KiB
	blockSize   int           // default 512
	states      []MemberState // initial states (default all in sync); Missing leaves the role empty
	tweak       func(*Config)
}

// rig is an engine over in-memory members, with the failures it reported.
type rig struct {
	t      testing.TB
	geo    Geometry
	e      *Engine
	mem    []*MemDevice
	fault  []*FaultDevice
	in     *intent.Intent
	layout bitmap.Layout

	mu     sync.Mutex
	failed []int // OnMemberFailed calls, in order
}

func newRig(t testing.TB, g Geometry, o rigOpts) *rig {
	t.Helper()
	r := &rig{t: t, geo: g}
	if o.bitmapChunk == 0 {
		o.bitmapChunk = 64 << 10
	}
	size := rigDataOff + g.DevSize()
	members := make([]Member, g.Disks())
	var sb bitmap.Superblock
	if o.bitmap {
		sb = bitmap.Superblock{
			Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 2,
			UUID: [16]byte{1, 2, 3}, SyncSize: uint64(g.Size() / 512),
			ChunkSize: uint32(o.bitmapChunk), DaemonSleep: 5,
		}
		var err error
		if r.layout, err = bitmap.NewLayout(&sb, rigBitmapStart, bitmap.SlotAlign); err != nil {
			t.Fatal(err)
		}
		if err := r.layout.CheckFits(rigBitmapStart, rigDataOff); err != nil {
			t.Fatal(err)
		}
	}
	for i := range members {
		st := InSync
		if i < len(o.states) {
			st = o.states[i]
		}
		md := NewMemDevice(fmt.Sprintf("m%d", i), size, o.blockSize, o.volatile)
		r.mem = append(r.mem, md)
		var d Device = md
		if o.faults {
			fd := NewFaultDevice(md)
			r.fault = append(r.fault, fd)
			d = fd
		}
		if o.bitmap {
			if err := bitmap.Format(md, sb, r.layout, false); err != nil {
				t.Fatal(err)
			}
			if err := md.Sync(); err != nil {
				t.Fatal(err)
			}
		}
		if st == Missing {
			continue
		}
		members[i] = Member{Device: d, DataOffset: rigDataOff, State: st}
	}
	cfg := Config{
		Geometry: g, Members: members, BitmapChunkSize: o.bitmapChunk, Logger: testLogger(t),
		OnMemberFailed: func(m int, err error) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.failed = append(r.failed, m)
		},
	}
	if o.tweak != nil {
		o.tweak(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.e = e
	if o.bitmap {
		slot, err := bitmap.ReadSlot(r.mem[0], r.layout, 0)
		if err != nil {
			t.Fatal(err)
		}
		r.in, err = intent.New(intent.Config{Layout: r.layout, Slot: slot, Mirrors: e.BitmapMirrors(), Owner: intent.Static(0)})
		if err != nil {
			t.Fatal(err)
		}
		e.SetIntent(r.in)
	}
	t.Cleanup(func() { e.Close() })
	return r
}

// failures returns the members OnMemberFailed was called for.
func (r *rig) failures() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.failed...)
}

// copyOf reads member m's copy of array bytes [off, off+n) straight from
// its MemDevice (current contents), bypassing the engine.
func (r *rig) copyOf(m int, l Loc, n int64) []byte {
	return r.mem[m].Contents(rigDataOff+l.Off, n)
}

// checkCopies verifies that every copy of every block the members hold
// equals want (the expected array contents), or, with want nil, that all
// copies agree. Members listed in skip are not looked at. It reports
// whether all was well.
func (r *rig) checkCopies(want []byte, skip ...int) bool {
	r.t.Helper()
	bad := 0
	r.geo.Extents(0, r.geo.Size(), func(x Extent) bool {
		var first []byte
		for _, l := range x.Copies {
			if contains(skip, l.Member) {
				continue
			}
			got := r.copyOf(l.Member, l, x.Len)
			if want != nil && !bytes.Equal(got, want[x.Off:x.Off+x.Len]) {
				r.t.Errorf("array bytes %d+%d: member %d's copy at %d differs from the model (first difference at +%d)", x.Off, x.Len, l.Member, l.Off, firstDiff(got, want[x.Off:x.Off+x.Len]))
				bad++
			}
			if first == nil {
				first = got
			} else if !bytes.Equal(first, got) {
				r.t.Errorf("array bytes %d+%d: copies differ (member %d at %d, first difference at +%d)", x.Off, x.Len, l.Member, l.Off, firstDiff(first, got))
				bad++
			}
		}
		return bad < 10
	})
	return bad == 0
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// geometries are the shapes the engine tests run on: raid1 and every
// raid10 layout md has, with 4 KiB chunks so a small array has many.
func testGeometries(t testing.TB) map[string]Geometry {
	t.Helper()
	must := func(g Geometry, err error) Geometry {
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	const dev = 2 << 11 // 2 MiB per member, in sectors
	return map[string]Geometry{
		"raid1-2":     must(NewRAID1(2, dev)),
		"raid1-3":     must(NewRAID1(3, dev)),
		"raid10-n2-4": must(NewRAID10(4, 0x102, 8, dev)),
		"raid10-n2-3": must(NewRAID10(3, 0x102, 8, dev)),
		"raid10-f2-3": must(NewRAID10(3, 0x201, 8, dev)),
		"raid10-o2-3": must(NewRAID10(3, 0x10201, 8, dev)),
		"raid10-n3-3": must(NewRAID10(3, 0x103, 16, dev)),
		"raid10-f2-4": must(NewRAID10(4, 0x201, 64, dev)),
	}
}

// fakeClock is a Clock whose time moves only when someone sleeps on it:
// throttling is then measured exactly, in simulated time. onSleep, if set,
// runs on every sleep (tests use it to act "while the resync waits").
type fakeClock struct {
	mu      sync.Mutex
	now     time.Duration
	slept   time.Duration
	onSleep func(d time.Duration)
}

func (c *fakeClock) Now() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	c.now += d
	c.slept += d
	f := c.onSleep
	c.mu.Unlock()
	if f != nil {
		f(d)
	}
	return ctx.Err()
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now += d
}

// testLogger discards the engine's log unless RAID_LOG is set.
func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("RAID_LOG") != "" {
		return slog.New(slog.NewTextHandler(tWriter{t}, nil))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// windowOf builds a remote resync window from byte offsets.
func windowOf(lo, hi int64) ownership.Window {
	return ownership.Window{Lo: uint64(lo / 512), Hi: uint64(hi / 512)}
}

// shuffleIO makes every operation on the rig's members yield a seeded
// random number of times first, so that concurrent requests' device
// operations interleave differently from member to member, even on one
// CPU.
func (r *rig) shuffleIO(seed uint64) {
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(seed, 77))
	for _, m := range r.mem {
		m.OnIO = func(Op, int64, int64, bool) {
			mu.Lock()
			n := rng.IntN(4)
			mu.Unlock()
			for range n {
				runtime.Gosched()
			}
		}
	}
}
