package membership_test

import (
	"slices"
	"testing"

	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// A node the failure detector lists as alive but that never answers the
// agreement is removed once (with the view that removes a crashed node) and stays out: no view change after that until
// it speaks; once it answers again it is readmitted.
func TestSilentNodeRemovedOnceNoFlapping(t *testing.T) {
	c := formed(t, five, nil, simNet{MaxDelay: 1, FenceLag: 1, StorageFence: 1})
	before := c.installsN
	c.nodes[5].mute = true
	c.crash(4) // a change, to which node 5 stays silent
	removed := func() bool {
		for _, id := range []NodeID{1, 2, 3} {
			if in := lastInstall(c.nodes[id]); slices.Contains(in.View.Members, 5) {
				return false
			}
		}
		return true
	}
	if !c.runUntil(300, removed) {
		t.Fatalf("silent node not removed:\n%s", c.describe())
	}
	c.mustOK(t)
	afterRemoval := c.installsN
	if afterRemoval-before != 3 {
		t.Errorf("%d installs to remove the silent node, want 3 (one view on each of 3 nodes)\n%s", afterRemoval-before, c.dumpTrace())
	}
	c.run(2000) // 40 × SilentTicks
	c.mustOK(t)
	if n := c.installsN - afterRemoval; n != 0 {
		t.Fatalf("%d more installs while the node stayed silent (flapping):\n%s", n, c.dumpTrace())
	}
	for _, id := range []NodeID{1, 2, 3} {
		if c.nodes[id].dlmStopped {
			t.Errorf("node %s left with its lock manager stopped", id)
		}
	}
	// It speaks again: readmitted.
	c.nodes[5].mute = false
	if !c.runUntil(400, func() bool { return c.converged() && slices.Contains(lastInstall(c.nodes[1]).View.Members, 5) }) {
		t.Fatalf("node not readmitted after it answered:\n%s", c.describe())
	}
	c.mustOK(t)
}
