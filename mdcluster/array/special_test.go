package array

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// startCreate creates the array on node 1 and attaches the others, without
// assembling them.
func (c *tcluster) startCreate(clean bool, raidDevices int, images ...string) {
	c.t.Helper()
	var paths []string
	for _, im := range images {
		paths = append(paths, c.image(im))
	}
	for _, id := range c.ids {
		if c.nodes[id].m == nil {
			c.manager(id, nil)
		}
	}
	created := make(chan error, 1)
	go func() {
		sp := spec(clean, raidDevices)
		if c.tweakSpec != nil {
			c.tweakSpec(&sp)
		}
		_, err := c.nodes[1].m.Create(c.ctx(), sp, paths)
		created <- err
	}()
	// The others attach to the new array's lockspace as soon as they find
	// it among their devices (what every daemon does for every array).
	for _, id := range c.ids[1:] {
		c.attach(id)
	}
	if err := <-created; err != nil {
		c.t.Fatalf("create on node 1: %v", err)
	}
}

// startHeldAssembly sets up 3 nodes: the array created over a.img and b.img,
// assembled on node 2, and node 3 assembling but held after joining the
// broadcast, before its engine starts, until release is closed. Node 3's
// Assemble result arrives on asm3.
func startHeldAssembly(t *testing.T) (c *tcluster, ctx context.Context, release chan struct{}, asm3 chan error) {
	t.Helper()
	c = newTCluster(t, 3)
	release = make(chan struct{})
	inside := make(chan struct{})
	c.manager(3, func(cfg *Config) {
		cfg.beforeStart = func() {
			close(inside)
			<-release
		}
	})
	c.startCreate(true, 2, "a.img", "b.img")
	ctx = c.ctx()
	if err := c.nodes[2].m.Assemble(ctx); err != nil {
		t.Fatal(err)
	}
	asm3 = make(chan error, 1)
	go func() { asm3 <- c.nodes[3].m.Assemble(ctx) }()
	<-inside
	return c, ctx, release, asm3
}

// TestReadAutoAddRightAfterAssemble is the regression measured on the real
// md-cluster stack: an add while a peer's array was just assembled (md's
// "read-auto") stalled 22 s, failed, and on 3 nodes left the disk bound on
// one node only. Here node 2 has just assembled and node 3 is still
// assembling (joined to the broadcast, engine not started) when node 1
// adds: the add succeeds at once and the disk is a spare on every node.
func TestReadAutoAddRightAfterAssemble(t *testing.T) {
	c, ctx, release, asm3 := startHeldAssembly(t)
	start := time.Now()
	if _, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img")); err != nil {
		t.Fatalf("add right after the peers assembled: %v", err)
	}
	took := time.Since(start)
	close(release)
	if err := <-asm3; err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 1 {
			t.Fatalf("node %d: %d spares, want the added disk bound everywhere", id, n)
		}
	}
	if took > 10*time.Second {
		t.Fatalf("the add took %v (md stalled 22 s here)", took)
	}
	t.Logf("add took %v", took)
}

// TestMdBugNullPointerDereferenceInProcessMetadataUpdate is md's "fix NULL
// pointer dereference in process_metadata_update" (2026): a
// METADATA_UPDATED arriving between the join and the array's start. Node
// 3 has joined the broadcast and not started its engine when node 1 fails
// a member: node 3 acts on it (answering the sender), and starts with the
// member faulty.
func TestMdBugNullPointerDereferenceInProcessMetadataUpdate(t *testing.T) {
	c, ctx, release, asm3 := startHeldAssembly(t)
	if err := c.nodes[1].m.Fail(ctx, 1); err != nil {
		t.Fatalf("fail while node 3 assembles: %v", err)
	}
	if st := c.nodes[3].m.Status(); st.Phase != PhaseAssembling || countState(st.Members, MemberFaulty) != 1 {
		t.Fatalf("node 3 while assembling: %+v, want the failure applied to its state", st)
	}
	close(release)
	if err := <-asm3; err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, m := range c.nodes[3].eng.Members() {
		if m.Dev == 1 && m.State != MemberFaulty {
			t.Fatalf("node 3's engine started with dev 1 %s", m.State)
		}
	}
}

// TestReceiverFailsWhileApplying: node 3 cannot bind the added disk (its
// engine refuses); the add is undone on every node (md would kick the
// candidate on that node only: "Removing Candidate device because add
// failed"): no node keeps the disk, its superblock is wiped, and the next
// add of it succeeds everywhere.
func TestReceiverFailsWhileApplying(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	var refused atomic.Int32
	c.nodes[3].eng.setFailSetMember(func(m EngineMember) error {
		if m.State == MemberSpare {
			refused.Add(1)
			return errors.New("injected: cannot bind")
		}
		return nil
	})
	before := c.agree("")
	_, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img"))
	if err == nil {
		t.Fatal("add succeeded although node 3 could not bind the disk")
	}
	t.Logf("add: %v", err)
	if refused.Load() == 0 {
		t.Fatal("node 3 was never asked to bind the disk")
	}
	if after := c.agree(""); after != before {
		t.Fatalf("members after the undone add %s, before %s", after, before)
	}
	if sb := readSuperOf(mustOpen(t, filepath.Join(c.dir, "c.img"))); sb != nil {
		t.Fatalf("the undone disk still carries a superblock (set %x)", sb.SetUUID)
	}
	c.nodes[3].eng.setFailSetMember(nil)
	if _, err := c.nodes[2].m.AddSpare(ctx, filepath.Join(c.dir, "c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 1 {
			t.Fatalf("node %d: %d spares", id, n)
		}
	}
}

func mustOpen(t *testing.T, p string) Member {
	t.Helper()
	f, err := OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestMdBugFixLockingWhenNodeJoinsDuringMessageBroadcast is md's "fix
// locking when node joins cluster during message broadcast": node 3
// assembles (joins the broadcast) while node 1's add holds the token
// across NEWDISK and METADATA_UPDATED, with node 2 slow to apply. The join
// waits for the token, then reads the state after the add: the disk is a
// spare on node 3 too.
func TestMdBugFixLockingWhenNodeJoinsDuringMessageBroadcast(t *testing.T) {
	c := newTCluster(t, 3)
	c.startCreate(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	if err := c.nodes[2].m.Assemble(ctx); err != nil {
		t.Fatal(err)
	}
	slow := make(chan struct{})
	var once sync.Once
	c.nodes[2].eng.setFailSetMember(func(m EngineMember) error {
		if m.State == MemberSpare {
			once.Do(func() { close(slow) })
			time.Sleep(300 * time.Millisecond)
		}
		return nil
	})
	added := make(chan error, 1)
	go func() {
		_, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img"))
		added <- err
	}()
	<-slow // node 2 is applying METADATA_UPDATED: the token is held
	if err := c.nodes[3].m.Assemble(ctx); err != nil {
		t.Fatalf("node 3 joining during the broadcast: %v", err)
	}
	if err := <-added; err != nil {
		t.Fatal(err)
	}
	c.agree("")
	if n := countState(c.nodes[3].m.Members(), MemberSpare); n != 1 {
		t.Fatalf("node 3: %v, want the spare", c.nodes[3].m.Members())
	}
}

// slowSync makes every node's copy steps of kind k take d.
func (c *tcluster) slowSync(k SyncKind, d time.Duration) {
	for _, id := range c.ids {
		if c.nodes[id].eng == nil {
			continue
		}
		c.nodes[id].eng.setBeforeCopy(func(ctx context.Context, kind SyncKind, _ uint64) error {
			if kind == k {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return nil
		})
	}
}

// TestMdBugFixDeadlockWhenNodeIsDoingResyncJob is md's "fix deadlock when
// node is doing resync job" (2020, and the earlier "use sync way to handle
// METADATA_UPDATED msg"): while one node resyncs (sending RESYNCING for
// every window), every node makes changes at once (adds from two nodes, a
// fail and a remove from the third) and the others receive while they
// send. Everything completes, the member lists agree, the resync ends.
func TestMdBugFixDeadlockWhenNodeIsDoingResyncJob(t *testing.T) {
	c := newTCluster(t, 3)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	c.fill("a.img", 1)
	c.fill("b.img", 2)
	c.slowSync(SyncResync, 5*time.Millisecond)
	c.createAndAssemble(false, 3, "a.img", "b.img", "x.img")
	ctx := c.ctx()
	eventually(t, guard, func() bool {
		for _, id := range c.ids {
			if c.nodes[id].m.Status().Sync.Running {
				return true
			}
		}
		return false
	}, "a resync to run")
	c1, c2 := c.image("c.img"), c.image("d.img")
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Add(3)
	go func() { defer wg.Done(); _, err := c.nodes[1].m.AddSpare(ctx, c1); errs <- err }()
	go func() { defer wg.Done(); _, err := c.nodes[2].m.AddSpare(ctx, c2); errs <- err }()
	go func() {
		defer wg.Done()
		if err := c.nodes[3].m.Fail(ctx, 2); err != nil {
			errs <- err
			return
		}
		errs <- c.nodes[3].m.Remove(ctx, 2)
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	c.slowSync(SyncResync, 0)
	c.waitSynced()
	c.agree("")
	c.sameData("a.img", "b.img")
}

// TestMdBugFixDeadlockWhenAddDiskToRecoveringArray is md's "fix deadlock
// issue when add disk to an recoverying array" (and mdadm issue #37, "when
// raid1 is recovering, add new disk failed"): a disk is added while
// another node rebuilds a member; the add succeeds and the rebuild ends.
func TestMdBugFixDeadlockWhenAddDiskToRecoveringArray(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img", "c.img")
	c.writeSome(1, 7, 0, 5<<20)
	c.slowSync(SyncRecovery, 5*time.Millisecond)
	ctx := c.ctx()
	if err := c.nodes[1].m.Fail(ctx, 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, guard, func() bool {
		for _, id := range c.ids {
			if st := c.nodes[id].m.Status(); st.Sync.Running && st.Sync.Kind == SyncRecovery {
				return true
			}
		}
		return false
	}, "the recovery to run")
	if _, err := c.nodes[2].m.AddSpare(ctx, c.image("d.img")); err != nil {
		t.Fatalf("add during recovery: %v", err)
	}
	c.slowSync(SyncRecovery, 0)
	c.waitSynced()
	c.agree("")
	for _, id := range c.ids {
		ms := c.nodes[id].m.Members()
		if countState(ms, MemberInSync) != 2 || countState(ms, MemberSpare) != 1 {
			t.Fatalf("node %d: %v", id, ms)
		}
	}
	c.sameData("b.img", "c.img")
}

// TestMdBugFixHangingIssueWhileANewDiskAdding is md's "fix hanging issue
// while a new disk adding" (2024): a node that cannot see the disk and
// never confirms it (md: "timeout on a new disk adding", after which md's
// receiver kept ack and hung the cluster) answers within NewDiskTimeout;
// the add fails everywhere, no node keeps the disk, and the cluster takes
// the next change at once.
func TestMdBugFixHangingIssueWhileANewDiskAdding(t *testing.T) {
	c := newTCluster(t, 3)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	notified := make(chan struct{}, 1)
	c.manager(3, func(cfg *Config) {
		cfg.OnNewDisk = func([16]byte, uint32) { notified <- struct{}{} } // never confirms
	})
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.hide(3, "c.img")
	ctx := c.ctx()
	before := c.agree("")
	start := time.Now()
	_, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img"))
	took := time.Since(start)
	if !errors.Is(err, ErrDeviceNotSeen) {
		t.Fatalf("add of a disk node 3 cannot see: %v, want ErrDeviceNotSeen", err)
	}
	select {
	case <-notified:
	default:
		t.Fatal("node 3 was not told of the new disk")
	}
	if took > c.nodes[3].m.cfg.NewDiskTimeout+5*time.Second {
		t.Fatalf("the failed add took %v", took)
	}
	if after := c.agree(""); after != before {
		t.Fatalf("members changed: %s, was %s", after, before)
	}
	if err := c.nodes[2].m.Fail(ctx, 0); err != nil {
		t.Fatalf("the next change after a failed add: %v", err)
	}
	c.agree("")
	t.Logf("failed add took %v (NewDiskTimeout %v)", took, c.nodes[3].m.cfg.NewDiskTimeout)
}

// TestClusterConfirmAtAnotherPath is mdadm --cluster-confirm: node 3 does
// not find the disk among its configured paths, is told (OnNewDisk, md's
// udev event) and confirms it at another path; the add succeeds and node
// 3 binds the disk there. A "missing" answer fails the add everywhere.
func TestClusterConfirmAtAnotherPath(t *testing.T) {
	c := newTCluster(t, 3)
	other := t.TempDir()
	var m3 *Manager
	var reply atomic.Value
	reply.Store("")
	m3 = c.manager(3, func(cfg *Config) {
		cfg.OnNewDisk = func(_ [16]byte, slot uint32) {
			if err := m3.ClusterConfirm(slot, reply.Load().(string)); err != nil {
				t.Errorf("cluster confirm: %v", err)
			}
		}
	})
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	// Missing: the add fails everywhere.
	c.hide(3, "c.img")
	reply.Store("missing")
	if _, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img")); !errors.Is(err, ErrDeviceNotSeen) {
		t.Fatalf("add confirmed missing: %v", err)
	}
	c.agree("")
	// Another path: node 3 sees the disk as other/disk.
	alias := filepath.Join(other, "disk")
	c.image("d.img")
	if err := os.Link(filepath.Join(c.dir, "d.img"), alias); err != nil {
		t.Fatal(err)
	}
	c.hide(3, "d.img")
	reply.Store(alias)
	if _, err := c.nodes[1].m.AddSpare(ctx, filepath.Join(c.dir, "d.img")); err != nil {
		t.Fatalf("add confirmed at another path: %v", err)
	}
	c.agree("")
	var at string
	for _, s := range m3.Members() {
		if s.State == MemberSpare {
			at = s.Path
		}
	}
	if at != alias {
		t.Fatalf("node 3 bound the spare at %q, want %q", at, alias)
	}
	if err := m3.ClusterConfirm(7, alias); !errors.Is(err, ErrRefusedChange) {
		t.Fatalf("a confirmation nobody asked for: %v, want md's spurious confirmation refusal", err)
	}
}

// countingMember counts writes.
type countingMember struct {
	Member
	writes *atomic.Int64
}

func (c countingMember) WriteAt(p []byte, off int64) (int, error) {
	c.writes.Add(1)
	return c.Member.WriteAt(p, off)
}

// TestMdadmPR130ConfirmWritesNoSuperblock is mdadm's "Manage: Don't write
// superblock when slave nodes cluster confirm" (2024): confirming a new
// disk writes nothing to it; only the adding node writes its superblock.
func TestMdadmPR130ConfirmWritesNoSuperblock(t *testing.T) {
	c := newTCluster(t, 3)
	var writes atomic.Int64
	for _, id := range []node.NodeID{2, 3} {
		c.manager(id, func(cfg *Config) {
			open := cfg.Open
			cfg.Open = func(p string) (Member, error) {
				m, err := open(p)
				if err != nil || filepath.Base(p) != "c.img" {
					return m, err
				}
				return countingMember{Member: m, writes: &writes}, nil
			}
		})
	}
	c.createAndAssemble(true, 2, "a.img", "b.img")
	if _, err := c.nodes[1].m.AddSpare(c.ctx(), c.image("c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	if n := writes.Load(); n != 0 {
		t.Fatalf("confirming nodes wrote %d times to the new disk", n)
	}
}

// TestMdBugMakeResyncLockInterruptible is md's "make resync lock also
// could be interruptted" and "introduce dlm_lock_sync_interruptible to fix
// tasks hang": while one node resyncs, another waits for the resync lock
// (PENDING); stopping the waiter's array does not wait for the resync.
func TestMdBugMakeResyncLockInterruptible(t *testing.T) {
	c := newTCluster(t, 3)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	// Whichever node takes the resync lock first is held in its resync.
	reached := make(chan node.NodeID, 3)
	for _, id := range c.ids {
		c.holdSync(id, SyncResync, 0, reached)
	}
	c.fill("a.img", 1)
	c.fill("b.img", 2)
	c.createAndAssemble(false, 2, "a.img", "b.img")
	var holder node.NodeID
	select {
	case holder = <-reached:
	case <-time.After(guard):
		t.Fatal("no node reached the held sync step")
	}
	waiter := c.ids[0]
	for _, id := range c.ids {
		if id != holder {
			c.nodes[id].eng.setBeforeCopy(nil)
			waiter = id
		}
	}
	eventually(t, guard, func() bool { return c.nodes[waiter].m.Status().Sync.Pending }, fmt.Sprintf("node %d to wait for the resync lock", waiter))
	start := time.Now()
	if err := c.nodes[waiter].m.Stop(c.ctx()); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("stopping a node that waits for the resync lock took %v", took)
	}
	c.nodes[holder].eng.setBeforeCopy(nil)
}

// TestMdBugUnsupportedMessagesAnswered: md before the 2024 timeout fix
// hung the cluster on a message a node did not handle. Types the manager
// does not implement (CHANGE_CAPACITY, BITMAP_RESIZE) are answered at once
// with an error, and the next change goes through.
func TestMdBugUnsupportedMessagesAnswered(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	ctx := c.ctx()
	m1 := c.nodes[1].m
	m1.mu.Lock()
	bus := m1.bus
	m1.mu.Unlock()
	for _, typ := range []broadcast.Type{broadcast.ChangeCapacity, broadcast.BitmapResize} {
		res, err := bus.Send(ctx, broadcast.Message{Type: typ})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Failed) != 2 {
			t.Fatalf("%s: %+v, want both receivers to answer with an error", typ, res)
		}
		for n, e := range res.Failed {
			if !errors.Is(e, broadcast.ErrReceiverFailed) {
				t.Fatalf("%s from node %d: %v", typ, n, e)
			}
		}
	}
	if err := m1.Fail(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c.agree("")
}

// TestMdBugFixNoRecoveryJobWhenAddingReAddingDisk is md's "fix no recovery
// job when adding/re-adding a disk" (2024: after a kernel change no node
// started the recovery): after --fail/--remove/--add and after --re-add a
// recovery runs on some node and completes.
func TestMdBugFixNoRecoveryJobWhenAddingReAddingDisk(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	var recovered atomic.Int64
	for _, id := range c.ids {
		c.nodes[id].eng.setBeforeCopy(func(_ context.Context, k SyncKind, _ uint64) error {
			if k == SyncRecovery {
				recovered.Add(1)
			}
			return nil
		})
	}
	ctx := c.ctx()
	c.writeSome(2, 11, 1<<20)
	m := c.nodes[1].m
	if err := m.Fail(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := m.AddSpare(ctx, c.image("c.img")); err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	if recovered.Load() == 0 {
		t.Fatal("no recovery ran after --add")
	}
	c.sameData("b.img", "c.img")
	recovered.Store(0)
	if err := m.Fail(ctx, 1); err != nil {
		t.Fatal(err)
	}
	c.writeSome(3, 12, 2<<20)
	if _, err := m.ReAdd(ctx, filepath.Join(c.dir, "b.img")); err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	if recovered.Load() == 0 {
		t.Fatal("no recovery ran after --re-add")
	}
	c.agree("")
	c.sameData("b.img", "c.img")
}

// hiddenMemberCluster is two nodes and a raid1 over a.img and b.img that
// node 1 created and node 2 attached to, node 2 not seeing b.img.
func hiddenMemberCluster(t *testing.T) *tcluster {
	c := newTCluster(t, 2)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	c.hide(2, "b.img")
	c.startCreate(true, 2, "a.img", "b.img")
	return c
}

// TestAssembleRefusedWithoutAWorkingMember: a node that does not see a
// member the array lists as in sync must not run the array. It used to:
// node 2 assembled over a.img alone and its writes never reached b.img,
// which node 1 kept reading as an in-sync mirror (stale data served), and
// node 2's bitmap bits were cleared as if both mirrors had the write.
func TestAssembleRefusedWithoutAWorkingMember(t *testing.T) {
	c := hiddenMemberCluster(t)
	err := c.nodes[2].m.Assemble(c.ctx())
	if !errors.Is(err, ErrMemberNotSeen) {
		t.Fatalf("node 2 assembled without seeing b.img: %v (want ErrMemberNotSeen)", err)
	}
	if !strings.Contains(err.Error(), "device number(s) [1]") {
		t.Errorf("the error does not name the missing member: %v", err)
	}
	if p := c.nodes[2].m.Status().Phase; p == PhaseRunning {
		t.Fatal("node 2's array is running")
	}
	// Node 1 is unaffected, and once node 2 sees the member it assembles.
	if got := len(c.nodes[1].m.Members()); got != 2 {
		t.Fatalf("node 1 has %d members", got)
	}
	c.unhide(2, "b.img")
	if err := c.nodes[2].m.Assemble(c.ctx()); err != nil {
		t.Fatalf("node 2 seeing every member: %v", err)
	}
	c.agree("")
}

// TestForcedAssembleFailsUnseenMember: with FailUnseen (mdadm-go
// --assemble --force), a node that does not see a working member records
// it as faulty for every node, as md records a member missing at
// assemble, and runs degraded; the node that saw it fails it too.
func TestForcedAssembleFailsUnseenMember(t *testing.T) {
	c := hiddenMemberCluster(t)
	if err := c.nodes[2].m.AssembleWith(c.ctx(), AssembleOptions{FailUnseen: true}); err != nil {
		t.Fatalf("forced assemble: %v", err)
	}
	eventually(t, guard, func() bool {
		for _, ms := range c.nodes[1].m.Members() {
			if ms.Dev == 1 && ms.State == MemberFaulty {
				return true
			}
		}
		return false
	}, "node 1 to list device 1 as faulty")
	if p := c.nodes[2].m.Status().Phase; p != PhaseRunning {
		t.Fatalf("node 2's array is %s after the forced assemble", p)
	}
	if ms := c.nodes[2].m.Members(); len(ms) != 1 || ms[0].Dev != 0 {
		t.Fatalf("node 2 runs with members %v, want device 0 alone", ms)
	}
	if sb := readSuperOf(mustOpen(t, c.image("a.img"))); sb.DevRoles[1] != superblock.RoleFaulty {
		t.Fatalf("a.img's superblock gives device 1 role %#x, want faulty", sb.DevRoles[1])
	}
}
