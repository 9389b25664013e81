package membership_test

import (
	"slices"
	"testing"

	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// After a whole-cluster restart, a member of the persisted view that boots
// late but within StartupFenceAfter is waited for: the first view has every
// member and nobody is fenced.
func TestStartupWaitsForPersistedMembers(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.mkCfg = withStartupWait
	f0, i0 := c.fenceCalls, c.installsN
	for _, id := range c.ids {
		c.crash(id)
	}
	c.run(5)
	c.start(1)
	c.start(2)
	c.run(20) // 1 and 2 are quorate; the wait is 36 ticks
	c.start(3)
	if !c.runUntil(300, func() bool { return c.converged() && len(lastInstall(c.nodes[1]).View.Members) == 3 }) {
		t.Fatalf("cluster did not re-form:\n%s", c.describe())
	}
	c.mustOK(t)
	if c.fenceCalls != f0 {
		t.Fatalf("%d fences; a member that came back within StartupFenceAfter must not be fenced\n%s", c.fenceCalls-f0, c.dumpTrace())
	}
	if n := c.installsN - i0; n != 3 {
		t.Errorf("%d installs after the restart, want 3 (one view, every member)\n%s", n, c.dumpTrace())
	}
}

// A member of the persisted view that does not come back within
// StartupFenceAfter is fenced before the first view without it is installed.
func TestStartupFencesMembersThatNeverReturn(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.mkCfg = withStartupWait
	f0 := c.fenceCalls
	for _, id := range c.ids {
		c.crash(id)
	}
	c.run(5)
	start := c.now
	c.start(1)
	c.start(2)
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[1]).View.Members, []NodeID{1, 2})
	}) {
		t.Fatalf("no view without the missing member:\n%s", c.describe())
	}
	c.mustOK(t) // the checker fails any install that removes an unfenced node
	if c.fenceCalls-f0 != 1 || !c.fenced[[2]uint64{3, lastInstall(c.nodes[1]).View.Gen}] {
		t.Fatalf("fences %d, want node 3 fenced once for the new view\n%s", c.fenceCalls-f0, c.dumpTrace())
	}
	if in := lastInstall(c.nodes[1]); !slices.Equal(in.Departed, []NodeID{3}) {
		t.Fatalf("install %+v, want departed [3]", in)
	}
	if waited := c.now - start; waited < 36 {
		t.Fatalf("view without node 3 after %d ticks, before StartupFenceAfter (36)", waited)
	}
}

func withStartupWait(cfg Config) Config {
	cfg.StartupFenceAfter = 3 * cfg.PrepareTimeout // 36 ticks
	return cfg
}

// A node that restarts alone and is readmitted by the running cluster ends
// its start-up wait with that view: the persisted view is superseded, so
// when the coordinator fails right after, the restarted node (now the
// coordinator) proposes the view without it at once instead of holding
// failover back until StartupFenceAfter has passed since its start.
func TestStartupWaitEndsWhenReadmitted(t *testing.T) {
	c := formed(t, three, nil, calm)
	c.mkCfg = withStartupWait
	c.crash(2)
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[1]).View.Members, []NodeID{1, 3})
	}) {
		t.Fatalf("node 2 was not removed:\n%s", c.describe())
	}
	start := c.now
	c.start(2)
	gen := c.nodes[2].persisted.Installed.Gen
	if !c.runUntil(300, func() bool {
		in := lastInstall(c.nodes[2])
		return c.converged() && in.View.Gen > gen && slices.Equal(in.View.Members, []NodeID{1, 2, 3})
	}) {
		t.Fatalf("node 2 was not readmitted:\n%s", c.describe())
	}
	readmitted := c.now - start
	if readmitted >= 36 {
		t.Fatalf("node 2 readmitted %d ticks after its start, not before StartupFenceAfter (36): the test needs it earlier", readmitted)
	}
	c.crash(1)
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[2]).View.Members, []NodeID{2, 3})
	}) {
		t.Fatalf("no view without the failed coordinator:\n%s", c.describe())
	}
	c.mustOK(t)
	if took := c.now - start; took >= 36 {
		t.Fatalf("view without node 1 installed %d ticks after node 2's start (readmitted after %d): held back by the start-up wait of a persisted view already superseded\n%s", took, readmitted, c.dumpTrace())
	}
}
