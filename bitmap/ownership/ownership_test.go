package ownership_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/ownership"
)

func TestWindowLVB(t *testing.T) {
	w := ownership.Window{Lo: 65536, Hi: 131072}
	b := w.MarshalLVB()
	if len(b) != ownership.LVBSize || b[0] != 0 || b[2] != 1 || b[10] != 2 {
		t.Fatalf("encoding % x", b[:16])
	}
	got, err := ownership.UnmarshalLVB(b)
	if err != nil || got != w {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	if _, err := ownership.UnmarshalLVB(ownership.Window{Lo: 9, Hi: 3}.MarshalLVB()); err == nil {
		t.Fatal("hi below lo accepted")
	}
	if _, err := ownership.UnmarshalLVB(make([]byte, 8)); err == nil {
		t.Fatal("short value block accepted")
	}
	if ownership.LockName(2) != "bitmap0002" {
		t.Fatal(ownership.LockName(2))
	}
}

// TestMachineRecoverySequence steps the pure machine through a join, a
// death, a recovery and a competing survivor's view of it.
func TestMachineRecoverySequence(t *testing.T) {
	m, err := ownership.NewMachine(3, 0)
	if err != nil {
		t.Fatal(err)
	}
	acts := m.Joined([]uint64{4})
	want := []string{"resync(0, [4])", "probe(1)", "probe(2)"}
	if got := strs(acts); !slices.Equal(got, want) {
		t.Fatalf("joined: %v, want %v", got, want)
	}
	m.ProbeRefused(1)
	m.ProbeRefused(2)
	if m.State(1) != ownership.Watching || m.State(0) != ownership.Active {
		t.Fatal(m.States())
	}
	if got := strs(m.Departed([]int{2})); !slices.Equal(got, []string{"probe(2)"}) {
		t.Fatalf("departed: %v", got)
	}
	step := func(got []ownership.Action, want string) {
		t.Helper()
		if s := strs(got); len(s) != 1 || s[0] != want {
			t.Fatalf("got %v, want %s", s, want)
		}
	}
	step(m.ProbeGranted(2), "read(2)")
	step(m.Read(2, []uint64{3, 7}), "merge(2, [3 7])")
	step(m.Merged(2), "clear(2)")
	step(m.Cleared(2), "resync(2, [3 7])")
	step(m.Resynced(2, []uint64{3, 7}, false), "release(2)") // failed resync: owed
	m.Released(2)
	if m.State(2) != ownership.Idle || !slices.Equal(m.Owed(), []uint64{3, 7}) {
		t.Fatal(m.States(), m.Owed())
	}
	if got := strs(m.Reprobe()); !slices.Equal(got, []string{"resync(0, [3 7])", "probe(1)", "probe(2)"}) {
		t.Fatalf("reprobe: %v", got)
	}
	// A survivor that loses the probe of a dead slot re-probes it when the
	// winner dies too.
	o, _ := ownership.NewMachine(3, 1)
	o.Joined(nil)
	o.Departed([]int{2})
	o.ProbeRefused(2)
	if o.State(2) != ownership.Elsewhere {
		t.Fatal(o.States())
	}
	if got := strs(o.Departed([]int{0})); !slices.Equal(got, []string{"probe(0)", "probe(2)"}) {
		t.Fatalf("second departure: %v", got)
	}
	// A failed step keeps the slot dead for a retry.
	step(o.ProbeGranted(2), "read(2)")
	step(o.StepFailed(2), "release(2)")
	o.Released(2)
	if o.State(2) != ownership.Dead {
		t.Fatal(o.States())
	}
	if len(o.Departed([]int{1})) != 0 || o.State(1) != ownership.Lost {
		t.Fatal("a node told it departed itself must stop", o.States())
	}
}

func strs(acts []ownership.Action) []string {
	var out []string
	for _, a := range acts {
		out = append(out, a.String())
	}
	return out
}

// TestProbeWatchIdleAndWindow on three real nodes: every node watches the
// two others; a node that leaves becomes idle to a re-probe (granted, then
// released); the resync window published by one node is read by another;
// a killed node's engine refuses to write its slot.
func TestProbeWatchIdleAndWindow(t *testing.T) {
	r := newRig(t, 1)
	ctx := ctxFor(t)
	r.joinAll(ctx)
	for _, n := range r.nodes {
		for s, st := range n.drv.States() {
			want := ownership.Watching
			if s == n.drv.Slot() {
				want = ownership.Active
			}
			// Nodes that joined earlier probed later nodes' slots before
			// those joined: granted and clean, so idle until re-probed.
			if st != want && !(st == ownership.Idle && s > n.drv.Slot()) {
				t.Fatalf("node %d sees slot %d as %s", n.id, s, st)
			}
		}
		if err := n.drv.Reprobe(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range r.nodes {
		for s, st := range n.drv.States() {
			if s != n.drv.Slot() && st != ownership.Watching {
				t.Fatalf("after reprobe node %d sees slot %d as %s, want watching", n.id, s, st)
			}
		}
	}

	// LVB round trip of the resync window.
	w := ownership.Window{Lo: 128, Hi: 256}
	if err := r.node(1).drv.SetWindow(ctx, w); err != nil {
		t.Fatal(err)
	}
	got, ok, err := r.node(2).drv.Window(ctx, 0)
	if err != nil || !ok || got != w {
		t.Fatalf("window read by node 2: %+v valid=%v %v", got, ok, err)
	}
	if err := r.node(1).drv.SetWindow(ctx, ownership.Window{}); err != nil {
		t.Fatal(err)
	}
	if got, ok, err := r.node(3).drv.Window(ctx, 0); err != nil || !ok || got.Active() {
		t.Fatalf("cleared window read by node 3: %+v valid=%v %v", got, ok, err)
	}

	// Node 3 leaves cleanly: a re-probe is granted (idle) and released. The
	// unlock reaches the lock's master a moment after Leave returns, so an
	// early probe may still be refused: re-probe until idle (guarded).
	if err := r.node(3).drv.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	for r.node(1).drv.States()[2] != ownership.Idle {
		if ctx.Err() != nil {
			t.Fatal("slot 2 never probed idle after its owner left")
		}
		time.Sleep(time.Millisecond)
		if err := r.node(1).drv.Reprobe(ctx); err != nil {
			t.Fatal(err)
		}
	}
	r.checkIdle(ctx, 2, "after leave and reprobe")

	// A killed node's write-intent engine refuses to write.
	r.kill(2)
	if err := r.node(2).drv.Check(); !errors.Is(err, ownership.ErrNotOwner) {
		t.Fatalf("check after kill: %v", err)
	}
}
