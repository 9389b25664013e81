package raid

import (
	"bytes"
	"context"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
)

// TestOwnershipDrivesEngine wires the engine to bitmap/ownership the way
// the daemon will: the driver's mirrors are the engine's BitmapMirrors,
// its Array is the engine, and the engine writes under the driver's
// write-intent bitmap. Before Join, the members hold what two crashes
// left: this node's own slot marks chunks 1 and 3, a departed node's
// slot marks chunk 5, and in those chunks the mirrors differ. Join (over
// a real one-node lock manager) must have the engine resync exactly those
// chunks; afterwards the mirrors agree everywhere, writes go through the
// bitmap, and the bitmap's clearing empties both slots.
func TestOwnershipDrivesEngine(t *testing.T) {
	g := testGeometries(t)["raid10-n2-3"]
	const cs = 64 << 10
	r := newRig(t, g, rigOpts{})
	// Format a two-slot clustered bitmap, with dirty bits.
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 2,
		UUID: [16]byte{4, 2}, SyncSize: uint64(g.Size() / 512), ChunkSize: cs, DaemonSleep: 5}
	l, err := bitmap.NewLayout(&sb, rigBitmapStart, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	dirty := map[int][]uint64{0: {1, 3}, 1: {5}}
	for _, m := range r.mem {
		if err := bitmap.Format(m, sb, l, false); err != nil {
			t.Fatal(err)
		}
		for slot, chunks := range dirty {
			s, err := bitmap.ReadSlot(m, l, slot)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range chunks {
				s.Set(c)
			}
			if err := bitmap.WriteSlot(m, l, slot, s); err != nil {
				t.Fatal(err)
			}
		}
	}
	rng := rand.New(rand.NewPCG(5, 5))
	model := make([]byte, g.Size())
	fillRandom(rng, model)
	if err := r.e.WriteAt(model, 0, 0); err != nil {
		t.Fatal(err)
	}
	for _, c := range []int64{1, 3, 5} {
		r.scribble(rng, 1, c*cs, cs)
		r.scribble(rng, 2, c*cs, cs)
	}
	// The first copy of every block now holds the model; after the
	// resync every copy must.
	want := make([]byte, g.Size())
	g.Extents(0, g.Size(), func(x Extent) bool {
		copy(want[x.Off:], r.copyOf(x.Copies[0].Member, x.Copies[0], x.Len))
		return true
	})

	node, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	ls, err := node.Open("raid-test", dlm.OpenOptions{LVBLen: ownership.LVBSize})
	if err != nil {
		t.Fatal(err)
	}
	var dataWritten atomic.Int64
	for _, m := range r.mem {
		m.OnIO = func(op Op, off, n int64, fua bool) {
			if op == OpWrite && off >= rigDataOff {
				dataWritten.Add(n)
			}
		}
	}
	drv, err := ownership.New(ownership.Config{Lockspace: ls, Node: 1, Layout: l, Mirrors: r.e.BitmapMirrors(), Array: r.e, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := drv.Join(ctx); err != nil {
		t.Fatal(err)
	}
	r.e.SetIntent(drv.Intent())
	r.checkCopies(want)
	// Exactly chunks 1, 3 and 5 were copied: every copy but the first.
	var wantBytes uint64
	for _, c := range []int64{1, 3, 5} {
		g.Extents(c*cs, cs, func(x Extent) bool {
			wantBytes += uint64(x.Len) * uint64(len(x.Copies)-1)
			return true
		})
	}
	if got := dataWritten.Load(); got != int64(wantBytes) {
		t.Fatalf("join wrote %d bytes of data, the resync of chunks 1, 3 and 5 needs exactly %d", got, wantBytes)
	}
	if recs := drv.Recoveries(); len(recs) != 1 || recs[0].Slot != 1 || !slices.Equal(recs[0].Chunks, []uint64{5}) || recs[0].Err != nil {
		t.Fatalf("recoveries %+v", recs)
	}
	// Writes now go through the bitmap.
	if err := r.e.WriteAt(bytes.Repeat([]byte{1}, 4096), 9*cs, 0); err != nil {
		t.Fatal(err)
	}
	if !drv.Intent().Dirty(9) {
		t.Fatal("a write's chunk is not marked")
	}
	if _, err := drv.Intent().Tick(time.Hour); err != nil {
		t.Fatal(err)
	}
	for _, m := range r.mem {
		for slot := 0; slot < 2; slot++ {
			s, err := bitmap.ReadSlot(m, l, slot)
			if err != nil {
				t.Fatal(err)
			}
			if d := s.DirtyChunks(); len(d) != 0 {
				t.Errorf("%s: slot %d still marks %v after the resync and the bitmap's clearing", m.Name(), slot, d)
			}
		}
	}
	if err := drv.Leave(ctx); err != nil {
		t.Fatal(err)
	}
}
