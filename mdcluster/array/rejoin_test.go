package array

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// isolate makes the failure detectors of id and of the other nodes lose
// sight of each other (a false suspicion under load: nobody restarts), or
// shows everyone again (on == false).
func (c *tcluster) isolate(id node.NodeID, on bool) {
	c.t.Helper()
	var others []node.NodeID
	for _, o := range c.ids {
		if o != id {
			others = append(others, o)
		}
	}
	for _, o := range c.ids {
		switch {
		case !on:
			c.nodes[o].n.HideNodes(nil)
		case o == id:
			c.nodes[o].n.HideNodes(others)
		default:
			c.nodes[o].n.HideNodes([]node.NodeID{id})
		}
	}
}

// TestClusterRejoinAfterExclusion: node 2 stays alive but the cluster
// leaves it out of a view (and fences it, and recovers its slot), then
// readmits it clean: its lock manager purged the array's locks, its slot
// lock among them. The manager must notice, stop its I/O, and re-join the
// array by itself: re-take its slot, re-read the members (a member failed
// by the others meanwhile must be out on node 2 too), re-join the
// broadcast, and serve writes again, consistent on every mirror. Before,
// node 2 ended failed ("stop and assemble the array again").
func TestClusterRejoinAfterExclusion(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 3, "a.img", "b.img", "c.img")
	c.writeSome(2, 10, 0, 4<<20)
	c.writeSome(1, 20, 2<<20)
	ctx := c.ctx()

	c.isolate(2, true)
	c.waitDeparted(2)
	t.Log("node 2 left out of the view (still running)")
	// Meanwhile the survivors fail a member and write.
	if err := c.nodes[1].m.Fail(ctx, 2); err != nil {
		t.Fatalf("fail dev 2 while node 2 is out: %v", err)
	}
	c.writeSome(3, 30, 1<<20)

	c.isolate(2, false)
	c.waitView(c.ids)
	t.Log("node 2 readmitted")
	// Writes through node 2 from the readmitting view on wait for the
	// re-join (held), none fails.
	stopW, wdone := make(chan struct{}), make(chan error, 1)
	var nw int
	go func() {
		for {
			select {
			case <-stopW:
				wdone <- nil
				return
			default:
			}
			if err := c.nodes[2].eng.WriteAt(pattern(60, 64<<10), 6<<20, 0); err != nil {
				wdone <- err
				return
			}
			nw++
		}
	}()
	m2 := c.nodes[2].m
	start := time.Now()
	eventually(t, guard, func() bool {
		st := m2.Status()
		if st.Phase == PhaseFailed {
			t.Fatalf("node 2 failed instead of re-joining: %s", st.FailReason)
		}
		return st.Phase == PhaseRunning && st.Rejoins == 1 && !st.Rejoining
	}, "node 2 to re-join the array")
	t.Logf("node 2 re-joined %v after the readmitting view", time.Since(start).Round(time.Millisecond))
	time.Sleep(50 * time.Millisecond)
	close(stopW)
	if err := <-wdone; err != nil {
		t.Fatalf("a write through node 2 failed during its re-join (after %d good ones): %v", nw, err)
	}
	waited, _ := c.nodes[2].eng.HoldStats()
	t.Logf("node 2: %d writes during and after the re-join, %d of them held", nw, waited)

	// The member failed while node 2 was out is out on node 2 too.
	c.agree("")
	if ms := m2.Members(); countState(ms, MemberFaulty) != 1 {
		t.Fatalf("node 2 members after re-join: %v, want dev 2 faulty", ms)
	}
	// Node 2 sees the write made while it was out, and writes again.
	got := make([]byte, 64<<10)
	if _, err := c.nodes[2].eng.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(30, len(got))) {
		t.Fatal("node 2 does not read the data node 3 wrote while node 2 was out")
	}
	c.writeSome(2, 40, 0, 3<<20)
	c.writeSome(1, 50, 5<<20)
	for _, id := range c.ids {
		if _, err := c.nodes[id].eng.ReadAt(got, 3<<20); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern(41, len(got))) { // writeSome: seed+1 for the second offset
			t.Fatalf("node %d does not read node 2's write after the re-join", id)
		}
	}
	// Its slot is its own again: a second exclusion would be noticed too,
	// and its writes are on both in-sync mirrors.
	if err := m2.own.Check(); err != nil {
		t.Fatalf("node 2 does not own its slot after the re-join: %v", err)
	}
	c.sameData("a.img", "b.img")
}

// TestClusterRejoinBounded: a node that lost its locks retries its re-join
// (here its devices cannot be opened) for at most RejoinLimit, then fails
// the array here with the reason; once it can open them again, Stop and
// Assemble by hand bring it back.
func TestClusterRejoinBounded(t *testing.T) {
	c := newTCluster(t, 3)
	c.manager(2, func(cfg *Config) { cfg.RejoinLimit = 2 * time.Second })
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.writeSome(2, 10, 0)
	ctx := c.ctx()

	c.isolate(2, true)
	c.waitDeparted(2)
	tn := c.nodes[2]
	tn.hideMu.Lock()
	tn.openFail = func(p string) error { return errors.New("injected: device unavailable") }
	tn.hideMu.Unlock()
	c.isolate(2, false)
	c.waitView(c.ids)
	m2 := tn.m
	start := time.Now()
	sawRejoining := false
	eventually(t, guard, func() bool {
		st := m2.Status()
		sawRejoining = sawRejoining || st.Rejoining
		return st.Phase == PhaseFailed
	}, "node 2 to give up re-joining")
	took := time.Since(start)
	st := m2.Status()
	t.Logf("node 2 gave up after %v: %s", took.Round(time.Millisecond), st.FailReason)
	if !strings.Contains(st.FailReason, "did not succeed within 2s") || !strings.Contains(st.FailReason, "no device") {
		t.Fatalf("fail reason %q does not say why", st.FailReason)
	}
	if !sawRejoining && took < time.Second {
		t.Fatalf("node 2 failed after %v without retrying its re-join", took)
	}
	if st.Rejoining || st.Rejoins != 0 {
		t.Fatalf("status after giving up: rejoining %v, rejoins %d", st.Rejoining, st.Rejoins)
	}
	if err := tn.eng.WriteAt(pattern(1, 4096), 0, 0); !errors.Is(err, ErrEngineStopped) {
		t.Fatalf("write on the failed node: %v, want ErrEngineStopped", err)
	}

	tn.hideMu.Lock()
	tn.openFail = nil
	tn.hideMu.Unlock()
	if err := m2.Stop(ctx); err != nil {
		t.Fatalf("stop after giving up: %v", err)
	}
	if err := m2.Assemble(ctx); err != nil {
		t.Fatalf("assemble by hand: %v", err)
	}
	c.writeSome(2, 20, 1<<20)
	c.agree("")
	c.sameData("a.img", "b.img")
}

// TestRAIDEngineHoldIO: while the manager holds I/O (re-joining the array),
// requests wait, even once the engine has started again, until it releases
// them, and then succeed; a hold never released fails them after HoldWait
// with ErrEngineStopped; a stop without a hold fails them at once.
func TestRAIDEngineHoldIO(t *testing.T) {
	mems, ems := engineMembers(2, 2048)
	e := NewRAIDEngine(RAIDEngineConfig{ResyncIOSize: 64 << 10, HoldWait: 300 * time.Millisecond})
	ctx := context.Background()
	setup := EngineSetup{Level: superblock.LevelRAID1, RaidDisks: 2, DevSectors: 2048, Members: ems}
	if err := e.Start(ctx, setup); err != nil {
		t.Fatal(err)
	}
	defer e.Stop()
	e.HoldIO()
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.WriteAt(bytes.Repeat([]byte{9}, 4096), 0, 0) }()
	if err := e.Start(ctx, setup); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("a held write went on before ReleaseIO: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	e.ReleaseIO()
	if err := <-done; err != nil {
		t.Fatalf("held write after release: %v", err)
	}
	for i, m := range mems {
		if dataOf(m)[0] != 9 {
			t.Fatalf("member %d lacks the held write", i)
		}
	}
	if w, to := e.HoldStats(); w != 1 || to != 0 {
		t.Fatalf("HoldStats = %d waited, %d timed out; want 1, 0", w, to)
	}

	// Held and never released: fails after HoldWait.
	e.HoldIO()
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := e.WriteAt(make([]byte, 4096), 0, 0)
	if !errors.Is(err, ErrEngineStopped) || !errors.Is(err, nbd.ErrShutdown) || time.Since(start) < 250*time.Millisecond {
		t.Fatalf("held write never released: %v after %v, want ErrEngineStopped after HoldWait", err, time.Since(start))
	}
	if _, to := e.HoldStats(); to != 1 {
		t.Fatalf("timed out count %d, want 1", to)
	}
	// Released while stopped: fails at once.
	e.ReleaseIO()
	start = time.Now()
	if err := e.WriteAt(make([]byte, 4096), 0, 0); !errors.Is(err, ErrEngineStopped) || time.Since(start) > 100*time.Millisecond {
		t.Fatalf("write on a stopped engine without a hold: %v after %v", err, time.Since(start))
	}
}
