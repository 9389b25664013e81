package array

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
		if err := c.nodes[id].eng.WriteAt(pattern(seed+byte(i), 64<<10), off, 0); err != nil {
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
		c.nodes[id].eng.setBeforeCopy(func(_ context.Context, k SyncKind, lo uint64) error {
			if k == SyncRecovery {
				v, _ := copied.LoadOrStore(id, new(atomic.Int64))
				v.(*atomic.Int64).Add(1)
			}
			return nil
		})
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

// fill writes a byte pattern over an image's data area (before create, so
// that the members differ and a resync has something to do).
func (c *tcluster) fill(name string, seed byte) {
	c.t.Helper()
	p := c.image(name)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(pattern(seed, imgSize-1<<20), 1<<20); err != nil {
		c.t.Fatal(err)
	}
}

// holdSync makes node id's engine stop before copying sector at or past
// lo of a sync of kind k, report it on reached and wait for its context
// (the node's crash) to end.
func (c *tcluster) holdSync(id node.NodeID, k SyncKind, lo uint64, reached chan<- node.NodeID) {
	c.nodes[id].eng.setBeforeCopy(func(ctx context.Context, kind SyncKind, s uint64) error {
		if kind != k || s < lo {
			return nil
		}
		select {
		case reached <- id:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	})
}

// Test03SwitchResync is 03r1_switch-resync: an array created without
// --assume-clean is resynced by one node under the resync lock while the
// others see its window (REMOTE) and wait for the lock (PENDING); the
// resyncing node dies: the survivors drop its window, one takes the
// resync over from where it had got and finishes it; the dead node comes
// back and finds the array clean.
func Test03SwitchResync(t *testing.T) {
	c := newTCluster(t, 3)
	c.fill("a.img", 1)
	c.fill("b.img", 2)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	// Whichever node takes the resync lock first resyncs (usually the
	// creator, not always): it is held at the third window and dies there.
	reached := make(chan node.NodeID, 3)
	for _, id := range c.ids {
		c.holdSync(id, SyncResync, 3*testWindow/512, reached)
	}
	c.createAndAssemble(false, 2, "a.img", "b.img")
	var victim node.NodeID
	select {
	case victim = <-reached:
	case <-time.After(guard):
		t.Fatal("no node started the resync")
	}
	var others []node.NodeID
	for _, id := range c.ids {
		if id != victim {
			c.nodes[id].eng.setBeforeCopy(nil)
			others = append(others, id)
		}
	}
	t.Logf("node %d is resyncing; nodes %v wait", victim, others)
	eventually(t, guard, func() bool {
		for _, id := range others {
			st := c.nodes[id].m.Status()
			if uint32(st.Sync.RemoteFrom) != uint32(victim) || !st.Sync.Remote.Active() || !st.Sync.Pending {
				return false
			}
		}
		return true
	}, "the other nodes to see the resyncing node's window (REMOTE) and wait for the resync lock (PENDING)")
	if w := c.nodes[others[0]].eng.RemoteWindow(); w.Lo != 3*testWindow/512 {
		t.Fatalf("node %d's engine holds window %+v, want the one at sector %d", others[0], w, 3*testWindow/512)
	}
	// Writes outside the window go through; into it they wait.
	c.writeSome(others[0], 90, 0)
	c.crash(victim)
	c.waitDeparted(victim)
	c.waitSynced()
	for _, id := range others {
		if st := c.nodes[id].m.Status(); !st.Clean {
			t.Fatalf("node %d: not clean after the takeover: %+v", id, st)
		}
	}
	c.sameData("a.img", "b.img")
	// The dead node comes back: nothing to sync.
	m := c.restart(victim)
	if err := m.Assemble(c.ctx()); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	if st := m.Status(); !st.Clean || st.Sync.Running {
		t.Fatalf("node %d after restart: %+v", victim, st)
	}
}

// Test03SwitchRecovery is 03r1_switch-recovery: -n2 -x1, fail a member:
// one node activates the spare and rebuilds it; it dies mid-rebuild;
// another node takes the recovery over and completes it.
func Test03SwitchRecovery(t *testing.T) {
	c := newTCluster(t, 3)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	c.createAndAssemble(true, 2, "a.img", "b.img", "c.img")
	c.writeSome(1, 3, 0, 1<<20, 4<<20, 6<<20)
	reached := make(chan node.NodeID, 3)
	for _, id := range c.ids {
		c.holdSync(id, SyncRecovery, 4*testWindow/512, reached)
	}
	if err := c.nodes[2].m.Fail(c.ctx(), 0); err != nil {
		t.Fatal(err)
	}
	var victim node.NodeID
	select {
	case victim = <-reached:
	case <-time.After(guard):
		t.Fatal("nobody started the recovery")
	}
	for _, id := range c.ids {
		if id != victim {
			c.nodes[id].eng.setBeforeCopy(nil)
		}
	}
	t.Logf("node %d is recovering; crashing it", victim)
	c.crash(victim)
	c.waitDeparted(victim)
	c.waitSynced()
	c.agree("")
	for _, id := range c.live() {
		if ms := c.nodes[id].m.Members(); countState(ms, MemberInSync) != 2 || countState(ms, MemberFaulty) != 1 {
			t.Fatalf("node %d: %v, want the spare in sync", id, ms)
		}
	}
	c.sameData("b.img", "c.img")
	m := c.restart(victim)
	if err := m.Assemble(c.ctx()); err != nil {
		t.Fatal(err)
	}
	c.agree("")
}

// bitmapOn reads the bitmap superblock of an image ("" when it has none).
func (c *tcluster) bitmapOn(name string) (mode BitmapMode, clusterName string) {
	c.t.Helper()
	f, err := OpenFile(filepath.Join(c.dir, name), false)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	sb := readSuperOf(f)
	if sb == nil || !sb.HasBitmap() {
		return BitmapNone, ""
	}
	slots, err := readBitmap(f, sb)
	if err != nil {
		c.t.Fatalf("%s: %v", name, err)
	}
	if slots[0].Super.Nodes > 0 {
		return BitmapClustered, slots[0].Super.Name()
	}
	return BitmapInternal, ""
}

// Test01GrowBitmapSwitch is 01r1_Grow_bitmap-switch: a clustered bitmap
// cannot be removed while another node runs the array (md's
// lock_all_bitmaps: "can't change bitmap to none since the array is in use
// by more than one node"); once the others stopped it switches to none,
// internal, none, and back to clustered, after which the others assemble
// again. Dirty bits survive each switch, and --nodes changes the slot
// count.
func Test01GrowBitmapSwitch(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	m1 := c.nodes[1].m
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapNone}); !errors.Is(err, ErrInUseByOthers) {
		t.Fatalf("removing the clustered bitmap while others run the array: %v, want ErrInUseByOthers", err)
	}
	for _, id := range []node.NodeID{2, 3} {
		if err := c.nodes[id].m.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapNone}); err != nil {
		t.Fatal(err)
	}
	if mode, _ := c.bitmapOn("a.img"); mode != BitmapNone || m1.Status().Bitmap != BitmapNone {
		t.Fatalf("after --bitmap=none: on disk %s, status %s", mode, m1.Status().Bitmap)
	}
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapInternal, Chunk: testBitmapChunk}); err != nil {
		t.Fatal(err)
	}
	if mode, _ := c.bitmapOn("b.img"); mode != BitmapInternal || m1.Status().Bitmap != BitmapInternal {
		t.Fatalf("after --bitmap=internal: on disk %s", mode)
	}
	c.writeSome(1, 5, 0, 3<<20) // bits in the internal bitmap
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapClustered, ClusterName: "test"}); err != nil {
		t.Fatal(err)
	}
	if mode, name := c.bitmapOn("a.img"); mode != BitmapClustered || name != "test" {
		t.Fatalf("after --bitmap=clustered: on disk %s, cluster name %q", mode, name)
	}
	for _, id := range []node.NodeID{2, 3} {
		if err := c.nodes[id].m.Assemble(ctx); err != nil {
			t.Fatalf("node %d assembling after the switch back: %v", id, err)
		}
	}
	c.agree("")
	for _, id := range c.ids {
		if st := c.nodes[id].m.Status(); st.Bitmap != BitmapClustered || st.Nodes != 4 {
			t.Fatalf("node %d: bitmap %s, %d nodes", id, st.Bitmap, st.Nodes)
		}
	}
	// --nodes: only when alone, as well.
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapClustered, Nodes: 6}); !errors.Is(err, ErrInUseByOthers) {
		t.Fatalf("--nodes while others run the array: %v", err)
	}
	for _, id := range []node.NodeID{2, 3} {
		if err := c.nodes[id].m.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := m1.SetBitmap(ctx, BitmapSpec{Mode: BitmapClustered, Nodes: 6}); err != nil {
		t.Fatal(err)
	}
	if st := m1.Status(); st.Nodes != 6 {
		t.Fatalf("after --nodes=6: %d", st.Nodes)
	}
	c.sameData("a.img", "b.img")
}

// Test03SwitchResyncStop is 03r1_switch-resync as the suite runs it, with
// stop_md: the resyncing node stops its array gracefully mid-resync. It
// sends BITMAP_NEEDS_SYNC with where it got to (md's leave with a dirty
// bitmap); the others drop its window, one takes the resync lock and
// resumes from there.
func Test03SwitchResyncStop(t *testing.T) {
	c := newTCluster(t, 3)
	c.fill("a.img", 3)
	c.fill("b.img", 4)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	reached := make(chan node.NodeID, 3)
	for _, id := range c.ids {
		c.holdSync(id, SyncResync, 4*testWindow/512, reached)
	}
	c.createAndAssemble(false, 2, "a.img", "b.img")
	var victim node.NodeID
	select {
	case victim = <-reached:
	case <-time.After(guard):
		t.Fatal("no node reached the held sync step")
	}
	var others []node.NodeID
	for _, id := range c.ids {
		if id != victim {
			c.nodes[id].eng.setBeforeCopy(nil)
			others = append(others, id)
		}
	}
	if err := c.nodes[victim].m.Stop(c.ctx()); err != nil {
		t.Fatal(err)
	}
	var resumed uint64
	for _, id := range others {
		c.nodes[id].m.mu.Lock()
		resumed = max(resumed, c.nodes[id].m.remote.Hints[workKey(SyncResync, 0)])
		c.nodes[id].m.mu.Unlock()
	}
	c.waitSynced()
	for _, id := range others {
		if st := c.nodes[id].m.Status(); !st.Clean {
			t.Fatalf("node %d not clean: %+v", id, st)
		}
	}
	c.sameData("a.img", "b.img")
	if resumed != 4*testWindow/512 {
		t.Fatalf("the takers' resume point is %d, want %d (the stopped node's last window)", resumed, 4*testWindow/512)
	}
	c.nodes[victim].eng.setBeforeCopy(nil)
	if err := c.nodes[victim].m.Assemble(c.ctx()); err != nil {
		t.Fatal(err)
	}
	c.agree("")
}

// Test03SwitchRecoveryStop is 03r1_switch-recovery with stop_md: the node
// rebuilding the spare stops gracefully; another takes the rebuild over.
func Test03SwitchRecoveryStop(t *testing.T) {
	c := newTCluster(t, 3)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	c.createAndAssemble(true, 2, "a.img", "b.img", "c.img")
	c.writeSome(2, 9, 0, 2<<20, 6<<20)
	reached := make(chan node.NodeID, 3)
	for _, id := range c.ids {
		c.holdSync(id, SyncRecovery, 3*testWindow/512, reached)
	}
	if err := c.nodes[1].m.Fail(c.ctx(), 0); err != nil {
		t.Fatal(err)
	}
	var victim node.NodeID
	select {
	case victim = <-reached:
	case <-time.After(guard):
		t.Fatal("no node reached the held recovery step")
	}
	for _, id := range c.ids {
		if id != victim {
			c.nodes[id].eng.setBeforeCopy(nil)
		}
	}
	if err := c.nodes[victim].m.Stop(c.ctx()); err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	c.agree("")
	c.sameData("b.img", "c.img")
	c.nodes[victim].eng.setBeforeCopy(nil)
	if err := c.nodes[victim].m.Assemble(c.ctx()); err != nil {
		t.Fatal(err)
	}
	c.agree("")
}
