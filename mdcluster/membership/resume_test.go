package membership_test

import (
	"slices"
	"testing"

	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// These tests cover members whose lock manager was stopped (Quorate=false,
// or a Stop for a change that never completed) while the agreed view itself
// did not change. The driver resumes its lock manager only through an
// Install, and DLM recovery needs every member of the view, so such a member
// must get a new view (same members, next generation) once the cluster is
// quorate and stable again.

// settleResumed runs c until no up node's lock manager is stopped and the
// cluster has converged, then checks that it stays that way for quiet ticks
// without installing anything more (the request for a new view is
// idempotent: one stopped episode costs one view change, not a stream).
func settleResumed(t *testing.T, c *cluster, budget, quiet int) {
	t.Helper()
	if !c.runUntil(budget, func() bool { return len(c.stoppedNodes()) == 0 && c.converged() }) {
		c.mustOK(t)
		t.Fatalf("lock manager still stopped on %v after %d ticks:\n%s\ntrace:\n%s",
			c.stoppedNodes(), budget, c.describe(), c.dumpTrace())
	}
	c.mustOK(t)
	installs := c.installsN
	c.run(quiet)
	c.mustOK(t)
	if c.installsN != installs || len(c.stoppedNodes()) != 0 {
		t.Fatalf("a settled cluster kept changing: %d more installs, stopped %v:\n%s\ntrace:\n%s",
			c.installsN-installs, c.stoppedNodes(), c.describe(), c.dumpTrace())
	}
}

// checkSameMembersView checks that every node moved from view old to one
// newer view with the same members, continuing from old (no reset, nobody
// departed, nobody fenced).
func checkSameMembersView(t *testing.T, c *cluster, old View) {
	t.Helper()
	for _, id := range old.Members {
		in := lastInstall(c.nodes[id])
		if in.View.Gen <= old.Gen || !slices.Equal(in.View.Members, old.Members) || !in.Prev.Equal(old) ||
			in.Reset || len(in.Departed) != 0 || len(in.Joined) != 0 || len(in.Rejoined) != 0 {
			t.Errorf("node %s: last install %+v; want a view after gen %d with members %v succeeding it, no reset, nobody departed",
				id, in, old.Gen, old.Members)
		}
	}
	if c.fenceCalls != 0 {
		t.Errorf("%d fence requests; nobody failed", c.fenceCalls)
	}
}

// TestQuorumFlapResumesLockManager: node 3's failure detector briefly
// believes it is alone (it loses quorum and stops its lock manager) while
// nodes 1 and 2 keep seeing everyone. When its detector recovers, the view's
// members are unchanged, yet node 3 must get a new view to resume through.
func TestQuorumFlapResumesLockManager(t *testing.T) {
	c := formed(t, three, nil, calm)
	old := c.nodes[1].a.View()
	c.believe(3, 3)
	if n := c.nodes[3]; n.quorate || !n.dlmStopped {
		t.Fatalf("node 3 alone: quorate=%v dlm_stopped=%v; want it to lose quorum and stop", n.quorate, n.dlmStopped)
	}
	c.run(5)
	c.believe(3, 1, 2, 3)
	if !c.nodes[3].quorate {
		t.Fatal("node 3 did not report quorate again")
	}
	settleResumed(t, c, 500, 300)
	checkSameMembersView(t, c, old)
}

// TestAbandonedChangeResumesLockManager: the coordinator starts a change
// (node 2 promises and stops), then loses quorum for a moment and abandons
// it; when its detector recovers nothing differs from the view. Nodes 1 and
// 2 were stopped for a change that never completed and must resume through
// a new view, which node 3 (never stopped) installs with them.
func TestAbandonedChangeResumesLockManager(t *testing.T) {
	c := formed(t, three, nil, calm)
	old := c.nodes[1].a.View()
	c.believe(1, 1, 2) // node 1 thinks 3 died: it proposes {1 2}
	if Phase(c.nodes[1].a) != "preparing" || !c.nodes[1].dlmStopped {
		t.Fatalf("node 1 did not start a change:\n%s", c.describe())
	}
	c.step() // the PREPARE reaches node 2, which stops
	if !c.nodes[2].dlmStopped {
		t.Fatalf("node 2 did not stop for the PREPARE:\n%s", c.describe())
	}
	c.believe(1, 1) // node 1 loses quorum: it abandons the change
	if Phase(c.nodes[1].a) != "idle" {
		t.Fatalf("node 1 kept coordinating without quorum:\n%s", c.describe())
	}
	c.believe(1, 1, 2, 3)
	settleResumed(t, c, 500, 300)
	checkSameMembersView(t, c, old)
}

// TestStoppedCoordinatorResumes: the coordinator itself loses quorum
// briefly. It is the one that must notice, since it sends nobody a request.
func TestStoppedCoordinatorResumes(t *testing.T) {
	c := formed(t, five, nil, calm)
	old := c.nodes[1].a.View()
	c.believe(1, 1, 2)
	c.run(3)
	c.believe(1, 1, 2, 3, 4, 5)
	settleResumed(t, c, 500, 300)
	checkSameMembersView(t, c, old)
}
