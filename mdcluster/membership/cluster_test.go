package membership_test

import (
	"bytes"
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

var (
	three = ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}
	five  = ddraid.Config{DataNodes: []NodeID{1, 2, 3, 4, 5}, Quorum: 3}
)

// calm is a network without loss: every message takes one tick.
var calm = simNet{MaxDelay: 1, FenceLag: 1}

func formed(t *testing.T, q ddraid.Config, extra []NodeID, net simNet) *cluster {
	t.Helper()
	c := newCluster(t, 1, q, extra, net)
	for _, id := range c.ids {
		c.start(id)
	}
	if !c.runUntil(200, c.converged) {
		t.Fatalf("cluster did not form: %s\n%s", c.failed, c.describe())
	}
	return c
}

func (c *cluster) mustOK(t *testing.T) {
	t.Helper()
	if c.failed != "" {
		t.Fatalf("invariant violated: %s\n%s\ntrace:\n%s", c.failed, c.describe(), c.dumpTrace())
	}
}

func lastInstall(n *simNode) Install {
	if len(n.installs) == 0 {
		return Install{}
	}
	return n.installs[len(n.installs)-1]
}

func TestFailureFencedThenRemoved(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.crash(3)
	if !c.runUntil(200, c.converged) {
		t.Fatalf("no view without the crashed node:\n%s", c.describe())
	}
	c.mustOK(t)
	for _, id := range []NodeID{1, 2} {
		in := lastInstall(c.nodes[id])
		if !slices.Equal(in.View.Members, []NodeID{1, 2}) || !slices.Equal(in.Departed, []NodeID{3}) || in.Reset {
			t.Errorf("node %s: last install %+v, want members [1 2], departed [3], no reset", id, in)
		}
	}
	if c.fenceCalls != 1 {
		t.Errorf("fence requests: %d, want 1", c.fenceCalls)
	}
}

func TestFailedFenceRetriedAndNothingInstalledMeanwhile(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.manualFence = true
	gen := c.nodes[1].a.View().Gen
	c.crash(3)
	if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
		t.Fatalf("no fence request:\n%s", c.describe())
	}
	if f := c.fenceQueue[0]; f.Node != 3 {
		t.Fatalf("fence request %+v, want node 3", f)
	}
	c.fenceQueue = nil
	c.nodes[1].a.FenceResult(3, false)
	c.process(c.nodes[1])
	// The machine must ask again, and install nothing until it succeeds.
	for round := range 3 {
		if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
			t.Fatalf("round %d: fence not asked again", round)
		}
		for _, id := range []NodeID{1, 2} {
			if g := c.nodes[id].a.View().Gen; g != gen {
				t.Fatalf("node %s installed gen %d while the fence was failing", id, g)
			}
		}
		c.fenceQueue = nil
		c.nodes[1].a.FenceResult(3, false)
		c.process(c.nodes[1])
	}
	if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
		t.Fatal("fence not asked again")
	}
	c.fenceQueue = nil
	c.fenceDone(3, CoordinatorValue(c.nodes[1].a).Gen, true)
	c.nodes[1].a.FenceResult(3, true)
	c.process(c.nodes[1])
	if !c.runUntil(100, c.converged) {
		t.Fatalf("no view after the fence succeeded:\n%s", c.describe())
	}
	c.mustOK(t)
}

func TestMinorityNeverInstallsOrFences(t *testing.T) {
	c := formed(t, five, nil, calm)
	before := map[NodeID]int{1: len(c.nodes[1].installs), 2: len(c.nodes[2].installs)}
	c.manualFence = true
	c.partition(map[NodeID]int{1: 0, 2: 0, 3: 1, 4: 1, 5: 1})
	c.run(100)
	c.mustOK(t)
	for _, id := range []NodeID{1, 2} {
		n := c.nodes[id]
		if len(n.installs) != before[id] {
			t.Errorf("minority node %s installed %+v", id, lastInstall(n))
		}
		if n.quorate {
			t.Errorf("minority node %s still reports quorate", id)
		}
		if n.a.Coordinating() {
			t.Errorf("minority node %s coordinates", id)
		}
	}
	// Only the majority's coordinator (node 3) fences, and it fences both
	// minority nodes before anything is installed.
	got := map[NodeID]bool{}
	for _, f := range c.fenceQueue {
		got[f.Node] = true
	}
	if !got[1] || !got[2] || len(c.fenceQueue) != 2 {
		t.Fatalf("fence requests %+v, want nodes 1 and 2 once each", c.fenceQueue)
	}
	if !c.nodes[3].a.Coordinating() || Phase(c.nodes[3].a) != "fencing" {
		t.Fatalf("node 3 should be fencing as coordinator:\n%s", c.describe())
	}
	for _, f := range c.fenceQueue {
		c.fenceDone(f.Node, f.Gen, false) // storage fencing: the minority runs on
		c.nodes[3].a.FenceResult(f.Node, true)
	}
	c.fenceQueue = nil
	c.process(c.nodes[3])
	c.run(20)
	c.mustOK(t)
	for _, id := range []NodeID{3, 4, 5} {
		if v := c.nodes[id].a.View(); !slices.Equal(v.Members, []NodeID{3, 4, 5}) {
			t.Errorf("majority node %s has view %+v", id, v)
		}
	}
}

func TestCoordinatorDiesMidChange(t *testing.T) {
	c := formed(t, five, nil, calm)
	c.manualFence = true
	c.crash(5)
	// Node 1 gets its value chosen and then waits for the fence of 5.
	if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
		t.Fatalf("no fence request:\n%s", c.describe())
	}
	chosen := CoordinatorValue(c.nodes[1].a)
	c.fenceQueue = nil
	c.crash(1) // dies before committing
	// Node 2 takes over: it must complete node 1's value first (same
	// generation, same members), then remove node 1.
	c.manualFence = false
	if !c.runUntil(300, c.converged) {
		t.Fatalf("no convergence after the coordinator died:\n%s\n%s", c.describe(), c.dumpTrace())
	}
	c.mustOK(t)
	var gens []uint64
	for _, in := range c.nodes[2].installs {
		gens = append(gens, in.View.Gen)
	}
	in, ok := c.views[chosen.Gen]
	if !ok || !slices.Equal(in.View.Members, chosen.Members) {
		t.Fatalf("gen %d %v (chosen by the dead coordinator) was not installed as chosen; node 2 installed %v",
			chosen.Gen, chosen.Members, gens)
	}
	if v := c.nodes[2].a.View(); !slices.Equal(v.Members, []NodeID{2, 3, 4}) || v.Gen <= chosen.Gen {
		t.Fatalf("final view %+v", v)
	}
}

func TestCutOffNodeRejoinsWithReset(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.manualFence = true
	c.partition(map[NodeID]int{3: 1})
	if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
		t.Fatalf("no fence request:\n%s", c.describe())
	}
	// The fence "succeeds" without powering node 3 off (say, storage
	// fencing): it stays up with its old state.
	f := c.fenceQueue[0]
	c.fenceQueue = nil
	c.fenceDone(f.Node, f.Gen, false)
	c.nodes[1].a.FenceResult(f.Node, true)
	c.process(c.nodes[1])
	c.run(30)
	c.mustOK(t)
	if v := c.nodes[1].a.View(); !slices.Equal(v.Members, []NodeID{1, 2}) {
		t.Fatalf("view %+v without the cut-off node expected", v)
	}
	oldGen := c.nodes[3].a.View().Gen
	c.heal()
	if !c.runUntil(200, c.converged) {
		t.Fatalf("no convergence after healing:\n%s", c.describe())
	}
	c.mustOK(t)
	in := lastInstall(c.nodes[3])
	if !in.Reset || !slices.Equal(in.Joined, []NodeID{3}) {
		t.Fatalf("node 3 rejoined with %+v; want reset and joined [3] (it came back from gen %d)", in, oldGen)
	}
	if in1 := lastInstall(c.nodes[1]); in1.Reset || !slices.Equal(in1.Joined, []NodeID{3}) {
		t.Fatalf("node 1 install %+v", in1)
	}
}

func TestGracefulLeaveNotFenced(t *testing.T) {
	c := formed(t, three, []NodeID{9}, calm)
	for _, id := range []NodeID{9, 2} { // a non-data node, then a data node
		c.nodes[id].a.Leave()
		c.process(c.nodes[id])
		if !c.runUntil(200, func() bool { return c.nodes[id].exited }) {
			t.Fatalf("node %s never completed its leave:\n%s", id, c.describe())
		}
		c.mustOK(t)
		in := lastInstall(c.nodes[1])
		if !slices.Equal(in.Left, []NodeID{id}) || len(in.Departed) != 0 {
			t.Fatalf("after %s left: install %+v, want left [%s] and nobody departed", id, in, id)
		}
	}
	if c.fenceCalls != 0 {
		t.Fatalf("%d fence requests for graceful leaves", c.fenceCalls)
	}
	// The coordinator itself leaves: it hands over by removing itself.
	c2 := formed(t, five, nil, calm)
	c2.nodes[1].a.Leave()
	c2.process(c2.nodes[1])
	if !c2.runUntil(200, c2.converged) {
		t.Fatalf("coordinator leave did not complete:\n%s", c2.describe())
	}
	c2.mustOK(t)
	if in := lastInstall(c2.nodes[2]); !slices.Equal(in.Left, []NodeID{1}) || c2.fenceCalls != 0 {
		t.Fatalf("install %+v, fences %d", in, c2.fenceCalls)
	}
}

func TestRestartedMemberRejoinsClean(t *testing.T) {
	c := formed(t, three, nil, calm)
	// Crash and restart before the failure detector notices.
	c.crash(2)
	c.start(2)
	if !c.runUntil(200, func() bool { return len(lastInstall(c.nodes[2]).Rejoined) > 0 && c.converged() }) {
		t.Fatalf("restart not noticed:\n%s", c.describe())
	}
	c.mustOK(t)
	if in := lastInstall(c.nodes[1]); !slices.Equal(in.Rejoined, []NodeID{2}) || len(in.Departed) != 0 || c.fenceCalls != 0 {
		t.Fatalf("install %+v with %d fences; want rejoined [2], no fencing", in, c.fenceCalls)
	}
	if in := lastInstall(c.nodes[2]); !in.Reset {
		t.Fatalf("restarted node installed %+v without reset\n%s", in, c.dumpTrace())
	}
}

func TestDuplicatesAndReordering(t *testing.T) {
	c := formed(t, five, []NodeID{7}, simNet{MaxDelay: 6, Dup: 0.5, FenceLag: 3})
	c.crash(4)
	if !c.runUntil(500, c.converged) {
		t.Fatalf("no convergence:\n%s", c.describe())
	}
	c.start(4)
	if !c.runUntil(500, c.converged) {
		t.Fatalf("no convergence:\n%s", c.describe())
	}
	c.mustOK(t)

	// A duplicate of the commit of the installed view is acknowledged
	// again and installs nothing.
	a := c.nodes[3].a
	v := a.HardState().Installed
	base := Proposal{Gen: v.Prev.Gen, Members: v.Prev.Members}
	before := a.HardState().Marshal()
	for range 2 {
		if err := a.Step(1, EncodeCommit(v.Gen, v.Gen, v, base)); err != nil {
			t.Fatal(err)
		}
		rd := a.Ready()
		var types []string
		for _, m := range rd.Messages {
			typ, err := MessageType(m.Payload)
			if err != nil {
				t.Fatal(err)
			}
			types = append(types, typ)
		}
		if len(rd.Install) != 0 || !slices.Equal(types, []string{"COMMITTED"}) || !bytes.Equal(a.HardState().Marshal(), before) {
			t.Fatalf("duplicate commit: %+v (messages %v)", rd, types)
		}
	}
}

// TestFencedNodeThatNeverInstalledRejoinsWithReset: node 3 accepts the
// first view but is cut off before its COMMIT arrives, so it never installs
// anything. The majority removes it (fencing it: storage fencing, it runs on)
// and readmits it after the heal. Although node 3 has no installed view, it
// was fenced, so the view that readmits it must reset it, and for the others
// it is a joiner whose old locks went with the view that departed it.
func TestFencedNodeThatNeverInstalledRejoinsWithReset(t *testing.T) {
	c := newCluster(t, 1, three, nil, calm)
	c.manualFence = true
	for _, id := range c.ids {
		c.start(id)
	}
	// The first view is committed by node 1; cut node 3 off at once, so
	// the COMMIT on its way to node 3 is lost (retransmissions go only to
	// nodes node 1 believes alive).
	if !c.runUntil(100, func() bool { return c.nodes[1].a.View().Gen != 0 }) {
		t.Fatalf("no first view:\n%s", c.describe())
	}
	first := c.nodes[1].a.View()
	if !slices.Equal(first.Members, []NodeID{1, 2, 3}) {
		t.Fatalf("first view %+v, want [1 2 3]", first)
	}
	c.partition(map[NodeID]int{3: 1})
	if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
		t.Fatalf("no fence request:\n%s", c.describe())
	}
	if g := c.nodes[3].a.View().Gen; g != 0 {
		t.Fatalf("node 3 installed gen %d; the scenario needs it to have installed nothing", g)
	}
	f := c.fenceQueue[0]
	if f.Node != 3 {
		t.Fatalf("fence request %+v, want node 3", f)
	}
	c.fenceQueue = nil
	c.fenceDone(f.Node, f.Gen, false) // storage fencing: node 3 runs on
	c.nodes[1].a.FenceResult(f.Node, true)
	c.process(c.nodes[1])
	c.manualFence = false
	if !c.runUntil(100, func() bool { return slices.Equal(c.nodes[2].a.View().Members, []NodeID{1, 2}) }) {
		t.Fatalf("no view without node 3:\n%s", c.describe())
	}
	c.mustOK(t)
	c.heal()
	if !c.runUntil(300, c.converged) {
		c.mustOK(t)
		t.Fatalf("no convergence after healing:\n%s", c.describe())
	}
	c.mustOK(t)
	if len(c.nodes[3].installs) == 0 {
		t.Fatal("node 3 installed nothing")
	}
	in := c.nodes[3].installs[0]
	if !in.Reset || in.Prev.Gen != f.Gen || !slices.Equal(in.Joined, []NodeID{3}) {
		t.Fatalf("node 3's first install %+v; want a reset, joined [3], succeeding gen %d (the view that fenced it)", in, f.Gen)
	}
	if in1 := lastInstall(c.nodes[1]); in1.Reset || !slices.Equal(in1.Joined, []NodeID{3}) {
		t.Fatalf("node 1's install %+v; want node 3 joined, no reset for node 1", in1)
	}
}

// TestFencedLowestNodeReadmitted: the failure detectors of nodes 2 and 3
// falsely suspect node 1, the lowest ID, while node 1 keeps seeing everyone
// (so it never loses quorum). Nodes 2 and 3 remove it and fence it with
// storage fencing, so it runs on. Node 1 never learns of that view (the
// COMMIT goes to the view's members), or learns of it only as an excluded
// node. Once the detectors recover, it is the lowest node alive, hence the
// only one that may coordinate, and its own view lists exactly the nodes it
// sees alive. It must still find out that it was left out and run the
// change that readmits it, with a reset.
func TestFencedLowestNodeReadmitted(t *testing.T) {
	for _, sawCommit := range []bool{false, true} {
		c := formed(t, three, nil, calm)
		c.manualFence = true
		first := c.nodes[1].a.View()
		c.believe(2, 2, 3)
		c.believe(3, 2, 3)
		if !c.runUntil(100, func() bool { return len(c.fenceQueue) == 1 }) {
			t.Fatalf("no fence request:\n%s", c.describe())
		}
		f := c.fenceQueue[0]
		if f.Node != 1 {
			t.Fatalf("fence request %+v, want node 1", f)
		}
		c.fenceQueue = nil
		c.fenceDone(f.Node, f.Gen, false) // storage fencing: node 1 runs on
		c.nodes[2].a.FenceResult(f.Node, true)
		c.process(c.nodes[2])
		c.manualFence = false
		if !c.runUntil(100, func() bool { return c.nodes[3].a.View().Gen == f.Gen }) {
			t.Fatalf("no view without node 1:\n%s", c.describe())
		}
		c.mustOK(t)
		if !c.nodes[1].quorate {
			t.Fatal("node 1 lost quorum; the scenario needs it to see everyone all along")
		}
		if sawCommit {
			// The COMMIT that removes it reaches node 1 after all.
			v := c.nodes[2].a.HardState().Installed
			if err := c.nodes[1].a.Step(2, EncodeCommit(v.Gen, v.Gen, v, Proposal{Gen: first.Gen, Members: first.Members})); err != nil {
				t.Fatal(err)
			}
			c.process(c.nodes[1])
			if !Excluded(c.nodes[1].a) {
				t.Fatal("node 1 does not know it was left out")
			}
		}
		if g := c.nodes[1].a.View().Gen; g != first.Gen {
			t.Fatalf("node 1 installed gen %d; the scenario needs it still at gen %d", g, first.Gen)
		}
		c.fdChanged() // the detectors of nodes 2 and 3 see node 1 again
		if !c.runUntil(300, c.converged) {
			c.mustOK(t)
			t.Fatalf("saw commit %v: node 1 was not readmitted:\n%s\ntrace:\n%s", sawCommit, c.describe(), c.dumpTrace())
		}
		c.mustOK(t)
		in := lastInstall(c.nodes[1])
		if !in.Reset || in.Prev.Gen != f.Gen || !slices.Equal(in.Joined, []NodeID{1}) {
			t.Fatalf("saw commit %v: node 1 rejoined with %+v; want a reset, joined [1], succeeding gen %d", sawCommit, in, f.Gen)
		}
	}
}

// TestLeaverLingeringInGossipIsNotProposedBack: a node that left
// gracefully shuts its gossip down only after it learns it is out, so the
// others' failure detectors list it alive for a while (here: for good).
// It must not be proposed back into a view meanwhile: that costs a view
// change that stops the lock manager for nothing, and if the leaver
// accepted it just before exiting (the mdclusterd 3-daemon test saw a
// PREPARE overtake the COMMIT of its leave) it would be a member again,
// and its exit a failure that is fenced.
func TestLeaverLingeringInGossipIsNotProposedBack(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.nodes[3].a.Leave()
	c.process(c.nodes[3])
	if !c.runUntil(200, func() bool { return c.nodes[3].exited && c.converged() }) {
		t.Fatalf("node 3 never completed its leave:\n%s", c.describe())
	}
	installs, stops := c.installsN, [2]uint64{c.nodes[1].stopped, c.nodes[2].stopped}
	gen := c.nodes[1].a.View().Gen
	c.run(300) // node 3 stays up and reachable: every detector lists it
	c.mustOK(t)
	if v := c.nodes[1].a.View(); v.Gen != gen || !slices.Equal(v.Members, []NodeID{1, 2}) {
		t.Fatalf("view after the leave settled: %+v, want gen %d with [1 2]", v, gen)
	}
	if c.installsN != installs || c.nodes[1].stopped != stops[0] || c.nodes[2].stopped != stops[1] {
		t.Fatalf("a view change began after the leave (installs %d→%d, stops %v→[%d %d]):\n%s",
			installs, c.installsN, stops, c.nodes[1].stopped, c.nodes[2].stopped, c.dumpTrace())
	}
	if c.fenceCalls != 0 {
		t.Fatalf("%d fence requests after a graceful leave", c.fenceCalls)
	}
	// Restarted, the node is admitted again.
	c.crash(3)
	c.start(3)
	if !c.runUntil(300, func() bool { v := c.nodes[1].a.View(); return len(v.Members) == 3 && c.converged() }) {
		t.Fatalf("node 3 not readmitted after its restart:\n%s", c.describe())
	}
	c.mustOK(t)
}
