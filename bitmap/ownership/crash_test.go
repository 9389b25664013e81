package ownership_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
)

func sec(n int) time.Duration { return time.Duration(n) * time.Second }

// arm makes host h crash before its k-th operation from now; the crashed
// operation is classified by classify into one of the named crash points.
func (r *rig) arm(h *host, k int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	base := h.ops
	h.hook = func(_ ioOp, n int) bool { return n == base+k }
}

// victimPhase names what the victim is doing, for classifying crash points.
type victimPhase string

const (
	phaseSetBit victimPhase = "set-bit"
	phaseData   victimPhase = "data"
	phaseClear  victimPhase = "clear"
)

// Crash point names, as the issue lists them.
const (
	pointBeforeDurable = "before the bit is durable"
	pointAfterDurable  = "after the bit is durable, before the data write"
	pointDuringData    = "during the data write"
	pointDuringClear   = "during clearing"
)

// victimWorkload is the owner's work: setting bits, rewriting a set chunk,
// clearing after daemon_sleep, setting again, and leaving some bits set.
// phase is updated before each step. It returns the first error (the crash).
func victimWorkload(r *rig, v *node, phase *victimPhase) error {
	in := v.drv.Intent()
	steps := []func() error{
		func() error { *phase = phaseSetBit; return r.write(v, 1*chunkSize, sec(0)) },
		func() error { return r.write(v, 4*chunkSize, sec(1)) },
		func() error { return r.write(v, 1*chunkSize+8192, sec(2)) }, // bit already set
		func() error { *phase = phaseClear; _, err := in.Tick(sec(10)); return err },
		func() error { *phase = phaseSetBit; return r.write(v, 6*chunkSize, sec(11)) },
		func() error { return r.write(v, 9*chunkSize, sec(12)) },
		func() error { *phase = phaseClear; _, err := in.Tick(sec(14)); return err }, // nothing idle long enough
		func() error { *phase = phaseSetBit; return r.write(v, 6*chunkSize+4096, sec(15)) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

// classify names the crash point from the phase and the operation the crash
// happened before.
func classify(phase victimPhase, op ioOp) string {
	bitmapOp := op.off < dataOff && op.write || (!op.write && !op.read)
	switch {
	case phase == phaseClear:
		return pointDuringClear
	case op.read:
		return "read"
	case bitmapOp && op.write || !op.write:
		if phase == phaseData {
			return pointDuringData
		}
		return pointBeforeDurable
	case op.mirror == 0:
		return pointAfterDurable
	default:
		return pointDuringData
	}
}

// setup starts a rig, joins every node and has the survivors write one
// chunk each, so their slots carry bits of their own.
func setup(t *testing.T, seed uint64) (*rig, context.Context) {
	r := newRig(t, seed)
	ctx := ctxFor(t)
	r.joinAll(ctx)
	if err := r.write(r.node(1), 2*chunkSize, sec(0)); err != nil {
		t.Fatal(err)
	}
	if err := r.write(r.node(2), 3*chunkSize, sec(0)); err != nil {
		t.Fatal(err)
	}
	return r, ctx
}

// victimOps counts the victim workload's device operations.
func victimOps(t *testing.T) int {
	r, _ := setup(t, 1)
	v := r.node(3)
	before := v.h.ops
	var ph victimPhase
	if err := victimWorkload(r, v, &ph); err != nil {
		t.Fatal(err)
	}
	return v.h.ops - before
}

func seedFromEnv(def uint64) uint64 {
	if s := os.Getenv("OWNERSHIP_SEED"); s != "" {
		if v, err := strconv.ParseUint(s, 10, 64); err == nil {
			return v
		}
	}
	return def
}

// recoverAll delivers the recovery events of these nodes' departure to
// every live driver, concurrently, and fails on any slot recovery error.
func (r *rig) recoverAll(ctx context.Context, departed ...dlm.NodeID) {
	r.t.Helper()
	var wg sync.WaitGroup
	errs := make([]error, nNodes)
	for i, n := range r.alive() {
		wg.Go(func() { errs[i] = r.deliver(ctx, n, departed...) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		r.t.Fatalf("recovery of %v: %v", departed, err)
	}
}

// mergedBy returns every chunk the live nodes merged and resynced from
// slot s, and how many nodes did so.
func (r *rig) mergedBy(s int) (chunks []uint64, nodes int) {
	for _, n := range r.alive() {
		took := false
		for _, rec := range n.drv.Recoveries() {
			if rec.Slot == s && len(rec.Chunks) > 0 {
				if rec.Err != nil {
					r.t.Fatalf("node %d recovery of slot %d: %v", n.id, s, rec.Err)
				}
				chunks = append(chunks, rec.Chunks...)
				took = true
			}
		}
		if took {
			nodes++
		}
	}
	slices.Sort(chunks)
	return slices.Compact(chunks), nodes
}

// finish ticks every live node far into the future (clearing merged bits
// once resynced), then checks the array is consistent and every slot but
// the live nodes' own is clean and idle.
func (r *rig) finish(ctx context.Context, dead []int) {
	r.t.Helper()
	for _, n := range r.alive() {
		if _, err := n.drv.Intent().Tick(sec(1000)); err != nil {
			r.t.Fatalf("node %d tick: %v", n.id, err)
		}
	}
	imgs := r.durable()
	r.checkConsistent(imgs, "after recovery")
	for s := 0; s < r.layout.Slots; s++ {
		r.checkSlotClean(imgs, s, "after recovery and tick")
	}
	for _, s := range dead {
		r.checkIdle(ctx, s, "after recovery")
		for _, n := range r.alive() {
			if st := n.drv.States()[s]; st == ownership.Claimed || st == ownership.Dead {
				r.t.Fatalf("node %d still sees dead slot %d as %s", n.id, s, st)
			}
		}
	}
}

// TestCrashOwnerAtEveryPoint kills the owner of slot 2 (node 3) before each
// of its device operations in turn (and once after all of them), runs the
// view change and slot recovery on both survivors at once, and checks:
// right after the crash, every chunk written is identical on both mirrors
// or marked on every mirror by some slot; exactly one survivor recovered
// the slot; it resynced exactly the chunks the dead slot marked (on any
// mirror), not the whole array; afterwards the mirrors agree, the dead
// slot is clean and its lock free.
func TestCrashOwnerAtEveryPoint(t *testing.T) {
	total := victimOps(t)
	seed := seedFromEnv(1)
	seen := map[string]int{}
	for k := 0; k <= total; k++ {
		t.Run(fmt.Sprintf("op%02d", k), func(t *testing.T) {
			r, ctx := setup(t, seed+uint64(k))
			v := r.node(3)
			r.arm(v.h, k)
			var ph victimPhase
			err := victimWorkload(r, v, &ph)
			point := "after everything"
			if k < total {
				if !errors.Is(err, intent.ErrCrashed) || !v.h.crashed() {
					t.Fatalf("crash at op %d did not happen: %v", k, err)
				}
				point = classify(ph, v.h.at)
			} else if err != nil {
				t.Fatal(err)
			}
			seen[point]++
			t.Logf("crash point: %s (phase %s, op %+v); replay with OWNERSHIP_SEED=%d -run 'TestCrashOwnerAtEveryPoint/op%02d'", point, ph, v.h.at, seed, k)
			r.kill(3)
			imgs := r.durable()
			r.checkInvariant(imgs, "right after the crash")
			want := r.dirtyUnion(imgs, 2)
			r.recoverAll(ctx, 3)
			got, takers := r.mergedBy(2)
			if len(want) > 0 && takers != 1 {
				t.Fatalf("%d survivors recovered slot 2, want exactly 1", takers)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("resynced %v, the dead slot marked %v", got, want)
			}
			if len(got) >= nChunks {
				t.Fatalf("resynced the whole array (%d chunks)", len(got))
			}
			r.finish(ctx, []int{2})
		})
	}
	for _, p := range []string{pointBeforeDurable, pointAfterDurable, pointDuringData, pointDuringClear} {
		if seen[p] == 0 {
			t.Errorf("crash point %q never exercised (seen: %v)", p, seen)
		}
	}
	t.Logf("crash points exercised: %v", seen)
}

// TestCrashDuringRecovery: the owner of slot 2 dies with bits set; node 1
// wins the recovery and is killed before each of its device operations in
// turn (read, merge into its own slot, clearing the dead slot, resync,
// and once after it finished). Node 2 then recovers both dead slots. The
// invariant holds after each crash, node 2 resyncs exactly what the two
// dead slots still mark, and everything ends clean and idle.
func TestCrashDuringRecovery(t *testing.T) {
	seed := seedFromEnv(1)
	// Count node 1's recovery operations.
	total := func() int {
		r, ctx := setup(t, seed)
		var ph victimPhase
		if err := victimWorkload(r, r.node(3), &ph); err != nil {
			t.Fatal(err)
		}
		r.kill(3)
		a := r.node(1)
		before := a.h.ops
		if err := r.deliver(ctx, a, 3); err != nil {
			t.Fatal(err)
		}
		if _, n := r.mergedBy(2); n != 1 {
			t.Fatal("node 1 did not recover slot 2")
		}
		return a.h.ops - before
	}()
	for k := 0; k <= total; k++ {
		t.Run(fmt.Sprintf("op%02d", k), func(t *testing.T) {
			r, ctx := setup(t, seed+uint64(k))
			var ph victimPhase
			if err := victimWorkload(r, r.node(3), &ph); err != nil {
				t.Fatal(err)
			}
			r.kill(3)
			r.checkInvariant(r.durable(), "after the owner's crash")
			a, b := r.node(1), r.node(2)
			r.arm(a.h, k)
			err := r.deliver(ctx, a, 3)
			if k < total && (err == nil || !a.h.crashed()) {
				t.Fatalf("crash of the recovering node at op %d did not happen: %v", k, err)
			}
			t.Logf("recovering node crashed before %+v; replay with OWNERSHIP_SEED=%d -run 'TestCrashDuringRecovery/op%02d'", a.h.at, seed, k)
			// Node 2 learns of node 3's death while node 1 (crashed, not
			// yet declared dead) still holds slot 2: its probe is refused.
			if err := r.deliver(ctx, b, 3); err != nil {
				t.Fatal(err)
			}
			if k < total {
				if st := b.drv.States()[2]; st != ownership.Elsewhere {
					t.Fatalf("node 2 sees slot 2 as %s while node 1 recovers it, want elsewhere", st)
				}
			}
			r.kill(1)
			imgs := r.durable()
			r.checkInvariant(imgs, "after the recovering node's crash")
			want := r.dirtyUnion(imgs, 0, 2)
			if err := r.deliver(ctx, b, 1); err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for _, rec := range b.drv.Recoveries() {
				if rec.Err != nil {
					t.Fatalf("node 2 recovery of slot %d: %v", rec.Slot, rec.Err)
				}
				got = append(got, rec.Chunks...)
			}
			slices.Sort(got)
			got = slices.Compact(got)
			if !slices.Equal(got, want) {
				t.Fatalf("node 2 resynced %v, the dead slots marked %v", got, want)
			}
			if len(got) >= nChunks {
				t.Fatalf("resynced the whole array (%d chunks)", len(got))
			}
			r.finish(ctx, []int{0, 2})
		})
	}
}
