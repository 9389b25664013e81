package array

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/node"
)

// TestClusterCreateAssemble is clustermd_tests' 00r1_Create: create on
// node 1 (with --assume-clean), assemble on nodes 2 and 3; every node runs
// the same members, nothing resyncs.
func TestClusterCreateAssemble(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	got := c.agree("")
	for _, id := range c.ids {
		st := c.nodes[id].m.Status()
		if st.Phase != PhaseRunning || !st.Clean || st.Bitmap != BitmapClustered || st.Nodes != 4 {
			t.Fatalf("node %d: %+v", id, st)
		}
	}
	t.Logf("members everywhere: %s", got)
}

// waitSync waits until no node has sync work running or pending and every
// member is in sync or a spare.
func (c *tcluster) waitSynced() {
	c.t.Helper()
	eventually(c.t, guard, func() bool {
		for _, id := range c.live() {
			st := c.nodes[id].m.Status()
			if st.Sync.Running || st.Sync.Remote.Active() || !st.Clean {
				return false
			}
			for _, s := range st.Members {
				if s.State == MemberRecovering {
					return false
				}
			}
			if _, ok := nextSyncWork(c.nodes[id].m.stateCopy(), nil); ok {
				return false
			}
		}
		return true
	}, "every sync to finish")
}

func countState(ms []MemberStatus, s MemberState) int {
	n := 0
	for _, m := range ms {
		if m.State == s {
			n++
		}
	}
	return n
}

// writeSome writes distinct data through node id's engine at a few places.
func (c *tcluster) writeSome(id node.NodeID, seed byte, offs ...int64) {
	c.t.Helper()
	for i, off := range offs {
		if err := c.nodes[id].eng.Write(c.ctx(), off, pattern(seed+byte(i), 64<<10)); err != nil {
			c.t.Fatalf("node %d: write at %d: %v", id, off, err)
		}
	}
}

// TestClusterManageAdd is 02r1_Manage_add: fail and remove a member, add a
// new disk: it becomes a spare on every node, one node activates it and
// rebuilds it under the resync lock, and it ends in sync everywhere with
// the data of the surviving member. Then, on the healthy array, --add
// gives a spare on every node.
func TestClusterManageAdd(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.writeSome(1, 10, 0, 1<<20, 5<<20)
	c.writeSome(2, 20, 3<<20)
	ctx := c.ctx()
	m1 := c.nodes[1].m
	if err := m1.Fail(ctx, 0); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	if err := m1.Remove(ctx, 0); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.writeSome(3, 30, 2<<20) // degraded writes
	added, err := m1.AddSpare(ctx, c.image("c.img"))
	if err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	got := c.agree("")
	for _, id := range c.ids {
		ms := c.nodes[id].m.Members()
		if countState(ms, MemberInSync) != 2 || len(ms) != 2 {
			t.Fatalf("node %d: %v, want two in-sync members (the added disk rebuilt)", id, ms)
		}
	}
	c.sameData("b.img", "c.img")
	t.Logf("after add: %s (added dev %d)", got, added.Dev)

	// Healthy array: the new disk is a spare on every node.
	if _, err := m1.AddSpare(ctx, c.image("d.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 1 {
			t.Fatalf("node %d: %d spares, want 1", id, n)
		}
	}
}

// TestClusterManageAddSpare is 02r1_Manage_add-spare: with a spare from
// create (-x1), adding another gives two spares on every node.
func TestClusterManageAddSpare(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img", "c.img")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 1 {
			t.Fatalf("node %d: %d spares after create -x1, want 1", id, n)
		}
	}
	if _, err := c.nodes[2].m.AddSpare(c.ctx(), c.image("d.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 2 {
			t.Fatalf("node %d: %d spares, want 2", id, n)
		}
	}
}

// TestClusterManageFailRemove: --fail makes a member faulty on every node
// (no I/O reaches it there), --remove unbinds it everywhere; a removed
// member is not picked up again by a node that assembles later, and
// failing the last in-sync copy is refused.
func TestClusterManageFailRemove(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	if err := c.nodes[3].m.Fail(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if ms := c.nodes[id].m.Members(); countState(ms, MemberFaulty) != 1 {
			t.Fatalf("node %d: %v, want dev 1 faulty", id, ms)
		}
	}
	before := c.dataOf("b.img")
	c.writeSome(2, 40, 0, 6<<20)
	if after := c.dataOf("b.img"); string(after) != string(before) {
		t.Fatal("a write reached the failed member")
	}
	if err := c.nodes[1].m.Fail(ctx, 0); err == nil || !errorsIs(err, ErrRefusedChange) {
		t.Fatalf("failing the last in-sync member: %v, want refused", err)
	}
	if err := c.nodes[1].m.Remove(ctx, 0); err == nil || !errorsIs(err, ErrRefusedChange) {
		t.Fatalf("removing an active member: %v, want refused", err)
	}
	if err := c.nodes[2].m.Remove(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if ms := c.nodes[id].m.Members(); len(ms) != 1 {
			t.Fatalf("node %d: %v, want one member", id, ms)
		}
	}
	// Node 3 stops and assembles again: b.img (removed) stays out.
	if err := c.nodes[3].m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[3].m.Assemble(ctx); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	st := c.nodes[3].m.Status()
	if len(st.Members) != 1 || len(st.NotUsed) != 1 {
		t.Fatalf("node 3 after reassembly: members %v, not used %v", st.Members, st.NotUsed)
	}
	t.Logf("not used: %v", st.NotUsed)
}

// TestClusterManageReAdd is 02r1_Manage_re-add: fail and remove a member,
// write from every node while degraded (each node's bits stay set in its
// own slot), re-add it: it recovers only the chunks the union of all slots
// marks (md's gather_bitmaps), and ends identical to the other member.
func TestClusterManageReAdd(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	c.writeSome(1, 1, 0, 2<<20)
	if err := c.nodes[1].m.Fail(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[1].m.Remove(ctx, 0); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.writeSome(1, 50, 1<<20)
	c.writeSome(2, 60, 3<<20)
	c.writeSome(3, 70, 5<<20, 6<<20+64<<10)
	var copied sync.Map
	for _, id := range c.ids {
		id := id
		c.nodes[id].eng.beforeCopy = func(_ context.Context, k SyncKind, lo uint64) error {
			if k == SyncRecovery {
				v, _ := copied.LoadOrStore(id, new(atomic.Int64))
				v.(*atomic.Int64).Add(1)
			}
			return nil
		}
	}
	if _, err := c.nodes[2].m.ReAdd(ctx, filepath.Join(c.dir, "a.img")); err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	c.agree("")
	for _, id := range c.ids {
		if ms := c.nodes[id].m.Members(); countState(ms, MemberInSync) != 2 {
			t.Fatalf("node %d: %v, want both in sync", id, ms)
		}
	}
	c.sameData("a.img", "b.img")
	var steps int64
	copied.Range(func(_, v any) bool { steps += v.(*atomic.Int64).Load(); return true })
	total := int64(imgSize-1<<20) / copyStep
	if steps == 0 || steps >= total/2 {
		t.Fatalf("re-add copied %d steps of %d: want only the dirty chunks", steps, total)
	}
	t.Logf("re-add copied %d of %d steps", steps, total)
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
