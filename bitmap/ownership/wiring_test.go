package ownership_test

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
)

// TestRecoveryEventsFromTheLockManager wires each driver to its lockspace
// the way the daemon does, as the lockspace's RecoveryHandler
// (dlm.OpenOptions.Recovery), and nothing else: no test code hands the
// drivers an event. A node dies in the middle of mirrored writes to two
// chunks; the lock manager's own view change must make exactly one
// survivor recover its slot, resync exactly those chunks, and leave the
// slot clean and idle. With Config.Parallel = intent.ParallelGo (the
// daemon's setting) the same must hold, and the mirrors' I/O must really
// overlap (each operation lasts 5 ms there).
func TestRecoveryEventsFromTheLockManager(t *testing.T) {
	t.Run("serial", func(t *testing.T) { testRecoveryEvents(t, nil) })
	t.Run("parallel", func(t *testing.T) { testRecoveryEvents(t, intent.ParallelGo) })
}

func testRecoveryEvents(t *testing.T, parallel func(int, func(int))) {
	var delay time.Duration
	if parallel != nil {
		delay = 5 * time.Millisecond
	}
	r := newRigWith(t, 7, parallel, delay)
	ctx := ctxFor(t)
	for _, n := range r.nodes {
		// A second handle of the same lockspace carries the events; the
		// driver's locks stay on the first.
		if _, err := n.dlm.Open(n.ls.Name(), dlm.OpenOptions{LVBLen: ownership.LVBSize, Recovery: n.drv}); err != nil {
			t.Fatal(err)
		}
	}
	r.joinAll(ctx)

	// Node 3 marks chunks 1 and 2 and gets its data onto mirror 0 only.
	victim := r.node(3)
	torn := []uint64{1, 2}
	for _, c := range torn {
		if err := victim.drv.Intent().StartWrite(int64(c)*chunkSize, 4096); err != nil {
			t.Fatal(err)
		}
		r.written[c] = true
		if _, err := r.disks[0].WriteAt(bytes.Repeat([]byte{0xee}, 4096), dataOff+int64(c)*chunkSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.disks[0].Sync(); err != nil {
		t.Fatal(err)
	}
	imgs := r.durable()
	if got := r.dirtyUnion(imgs, 2); !slices.Equal(got, torn) {
		t.Fatalf("victim's slot marks %v before the crash, want %v", got, torn)
	}

	r.kill(3) // Stop and Recover on the survivors: the lock manager's events follow
	for _, n := range r.alive() {
		select {
		case err := <-n.recovered:
			if err != nil {
				t.Fatalf("node %d: slot recovery: %v", n.id, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("node %d: the lock manager's recovery events started no slot recovery", n.id)
		}
	}

	var resyncers []dlm.NodeID
	for _, n := range r.alive() {
		if got := n.arr.allResynced(); len(got) > 0 {
			if !slices.Equal(got, torn) {
				t.Fatalf("node %d resynced %v, want exactly %v", n.id, got, torn)
			}
			resyncers = append(resyncers, n.id)
		}
	}
	if len(resyncers) != 1 {
		t.Fatalf("nodes %v resynced the dead slot's chunks, want exactly one", resyncers)
	}
	imgs = r.durable()
	r.checkSlotClean(imgs, 2, "after recovery")
	r.checkConsistent(imgs, "after recovery")
	r.checkIdle(ctx, 2, "after recovery")
	if parallel != nil {
		for _, n := range r.alive() {
			if m := n.h.maxInflight.Load(); m < 2 {
				t.Fatalf("node %d: at most %d I/O operation at a time with parallel mirror I/O, want 2", n.id, m)
			}
		}
	}
}
