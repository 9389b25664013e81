package membership_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// TestRestartedNodeNotQuorateInStaleView: a node powered off, removed by
// the others (gen G+1 without it) and booted again from its persisted
// state (gen G with it) must not call itself quorate in gen G, although
// the failure detector soon lists every member of gen G as alive. Its
// lock state is gone and the cluster is a generation ahead without it: it
// is not quorate until a view that readmits it is installed. (The
// three-VM test saw node 2 log quorate=true in its old view right after
// the restart, until it was readmitted.)
func TestRestartedNodeNotQuorateInStaleView(t *testing.T) {
	c := formed(t, three, nil, calm)
	old := c.nodes[1].a.View().Gen
	c.crash(2)
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[1]).View.Members, []NodeID{1, 3})
	}) {
		t.Fatalf("node 2 was not removed:\n%s", c.describe())
	}
	removed := c.nodes[1].a.View().Gen
	if removed <= old {
		t.Fatalf("view without node 2 has gen %d, not above %d", removed, old)
	}
	c.start(2)
	n := c.nodes[2]
	gen := n.a.View().Gen
	if gen != old {
		t.Fatalf("node 2 restarted in gen %d, want its persisted gen %d", gen, old)
	}
	sawAllAlive := false
	for range 300 {
		if n.a.View().Gen > removed {
			break
		}
		if slices.Equal(n.alive, []NodeID{1, 2, 3}) {
			sawAllAlive = true
		}
		if n.quorate || n.a.Quorate() {
			t.Fatalf("t=%d: restarted node 2 reports quorate in its persisted view gen %d (alive %v) while the cluster is at gen %d without it\n%s\n%s",
				c.now, n.a.View().Gen, n.alive, removed, c.describe(), c.dumpTrace())
		}
		c.step()
	}
	if !sawAllAlive {
		t.Fatalf("node 2's detector never listed every member: the test did not exercise the stale view\n%s", c.describe())
	}
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[2]).View.Members, []NodeID{1, 2, 3})
	}) {
		t.Fatalf("node 2 was not readmitted:\n%s", c.describe())
	}
	c.mustOK(t)
	if in := lastInstall(n); !in.Reset || in.View.Gen <= removed || !n.quorate {
		t.Fatalf("node 2 readmitted as %+v (quorate %v), want a reset into a view after gen %d, quorate", in, n.quorate, removed)
	}
}

// TestLeftBehindNodeNotQuorate: a node that did not restart, but was cut
// off while the others installed a newer view without it, calls itself
// quorate in its old view once its detector lists the members again (it
// cannot know better yet). The first message from a peer carries that
// peer's installed generation: from then on it must report not quorate
// (Ready.Quorate=false, so the driver stops I/O and lock traffic at once),
// say why in its log, and stay so until it installs a view that includes
// it.
func TestLeftBehindNodeNotQuorate(t *testing.T) {
	all := []NodeID{1, 2, 3}
	a, _ := inFirstView(t, 2, three, all)

	// Nodes 1 and 3 installed gen 5 = [1 3] meanwhile; node 1 now prepares
	// a view that readmits node 2. Its PREPARE carries gen 5.
	if err := a.Step(1, EncodePrepare(5, 6, all)); err != nil {
		t.Fatal(err)
	}
	rd := a.Ready()
	if a.Quorate() || rd.Quorate == nil || *rd.Quorate {
		t.Fatalf("after a PREPARE from a peer at gen 5, node 2 (gen 1) reports quorate=%v (Ready.Quorate %v): it is quorate in a view the cluster has left",
			a.Quorate(), rd.Quorate)
	}
	if !a.LockManagerStopped() {
		t.Fatal("lock manager not counted as stopped")
	}
	var logged bool
	for _, e := range rd.Log {
		if strings.Contains(e.Msg, "left behind") {
			logged = true
		}
	}
	if !logged {
		t.Fatalf("no log line says the node was left behind: %+v", rd.Log)
	}

	// The readmitting view: ACCEPT on base gen 5 (without node 2), COMMIT.
	base := Proposal{Gen: 5, Members: []NodeID{1, 3}, Prev: View{Gen: 1, Members: all}}
	value := Proposal{Gen: 6, Members: all, Prev: base.View()}
	if err := a.Step(1, EncodeAccept(5, 6, value, base)); err != nil {
		t.Fatal(err)
	}
	if rd := a.Ready(); a.Quorate() || len(rd.Install) > 0 {
		t.Fatalf("after the ACCEPT: quorate %v, installs %+v; want not quorate, nothing installed", a.Quorate(), rd.Install)
	}
	if err := a.Step(1, EncodeCommit(5, 6, value, base)); err != nil {
		t.Fatal(err)
	}
	rd = a.Ready()
	if len(rd.Install) != 1 || rd.Install[0].View.Gen != 6 || !rd.Install[0].Reset {
		t.Fatalf("COMMIT installs %+v, want gen 6 with reset", rd.Install)
	}
	if !a.Quorate() || rd.Quorate == nil || !*rd.Quorate || a.LockManagerStopped() || rd.StopAfterInstall != nil {
		t.Fatalf("after readmission: quorate %v (Ready.Quorate %v), stopped %v, stop after install %+v; want quorate and running",
			a.Quorate(), rd.Quorate, a.LockManagerStopped(), rd.StopAfterInstall)
	}
}

// TestStorageFencedNodeNotQuorateAfterHeal: the cut-off node keeps running
// (storage fencing), the others install a view without it, the partition
// heals. The cluster checker fails any node that reports quorate in a view
// older than one a peer told it about (checkQuorateNotStale).
func TestStorageFencedNodeNotQuorateAfterHeal(t *testing.T) {
	c := formed(t, three, nil, simNet{MaxDelay: 1, FenceLag: 1, StorageFence: 1})
	c.partition(map[NodeID]int{3: 1})
	if !c.runUntil(300, func() bool { return slices.Equal(lastInstall(c.nodes[1]).View.Members, []NodeID{1, 2}) }) {
		t.Fatalf("node 3 was not removed:\n%s", c.describe())
	}
	c.mustOK(t)
	if !c.nodes[3].up {
		t.Fatal("node 3 was powered off; the test needs it running (storage fencing)")
	}
	c.heal()
	if !c.runUntil(300, func() bool {
		return c.converged() && slices.Equal(lastInstall(c.nodes[3]).View.Members, []NodeID{1, 2, 3})
	}) {
		c.mustOK(t)
		t.Fatalf("node 3 was not readmitted:\n%s", c.describe())
	}
	c.mustOK(t)
}

// TestSupersededViewNotInstalled: a node that knows the cluster is at a
// newer generation does not install an older view it missed, neither from
// its COMMIT nor as the base of an ACCEPT. Installed, the older view would
// leave it not quorate (the cluster is past it) while its DLM recovery
// resumed the lock manager for the length of the Ready, which may grant
// at once (simulator seed 54061: node 5, left behind at gen 16 by a
// PREPARE from gen 20, then got the repeated COMMIT of gen 17 and granted
// a lock in it).
func TestSupersededViewNotInstalled(t *testing.T) {
	all := []NodeID{1, 2, 3}
	a, v1 := inFirstView(t, 2, three, all)
	// A PREPARE from node 3, at gen 5: node 2 is left behind.
	if err := a.Step(3, EncodePrepare(5, 6, all)); err != nil {
		t.Fatal(err)
	}
	if rd := a.Ready(); a.Quorate() || !a.LockManagerStopped() {
		t.Fatalf("after a PREPARE from gen 5: quorate %v, lock manager stopped %v (%+v)", a.Quorate(), a.LockManagerStopped(), rd)
	}
	// The repeated COMMIT of gen 2 (which node 2 missed) arrives from node
	// 1, which still sends it: it must not be installed.
	v2 := Proposal{Gen: 2, Members: all, Prev: v1.View()}
	if err := a.Step(1, EncodeCommit(1, 2, v2, v1)); err != nil {
		t.Fatal(err)
	}
	rd := a.Ready()
	if len(rd.Install) > 0 || a.View().Gen != 1 {
		t.Fatalf("a view the cluster has moved past was installed: %+v (view now %d)", rd.Install, a.View().Gen)
	}
	if a.Quorate() || !a.LockManagerStopped() {
		t.Fatalf("after the old COMMIT: quorate %v, lock manager stopped %v", a.Quorate(), a.LockManagerStopped())
	}
	// Nor as the base of an ACCEPT whose base is older than gen 5.
	v3 := Proposal{Gen: 3, Members: all, Prev: v2.View()}
	if err := a.Step(1, EncodeAccept(2, 7, v3, v2)); err != nil {
		t.Fatal(err)
	}
	if rd := a.Ready(); len(rd.Install) > 0 {
		t.Fatalf("an ACCEPT's base older than the cluster's view was installed: %+v", rd.Install)
	}
	// The newest view's COMMIT, carrying its base, is installed, and the
	// node is quorate and running in it.
	v5 := Proposal{Gen: 5, Members: all, Prev: v1.View()}
	v6 := Proposal{Gen: 6, Members: all, Prev: v5.View()}
	if err := a.Step(3, EncodeCommit(5, 8, v6, v5)); err != nil {
		t.Fatal(err)
	}
	rd = a.Ready()
	if len(rd.Install) == 0 || a.View().Gen != 6 || !a.Quorate() || a.LockManagerStopped() {
		t.Fatalf("the newest view: installs %+v, view %d, quorate %v, stopped %v", rd.Install, a.View().Gen, a.Quorate(), a.LockManagerStopped())
	}
}

// inFirstView returns an Agreement for node self with every node of all
// alive, running in view gen 1 = all (committed by node 1), and that view.
func inFirstView(t *testing.T, self NodeID, q ddraid.Config, all []NodeID) (*Agreement, Proposal) {
	t.Helper()
	a, err := New(Config{Self: self, Quorum: q, PrepareTimeout: 12})
	if err != nil {
		t.Fatal(err)
	}
	a.SetAlive(all)
	v1 := Proposal{Gen: 1, Members: all}
	if err := a.Step(1, EncodeCommit(1, 1, v1, Proposal{})); err != nil {
		t.Fatal(err)
	}
	if rd := a.Ready(); len(rd.Install) != 1 || !a.Quorate() || a.LockManagerStopped() {
		t.Fatalf("first view not installed and running: %+v", rd)
	}
	return a, v1
}

// TestWholeClusterRestartResumes: a node is not quorate in its persisted
// view until it installs a new one, so when every node restarts at once
// (a power outage of the whole cluster, or a cluster of one) none is
// quorate at first; they must still agree a new view and run in it.
func TestWholeClusterRestartResumes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		q     ddraid.Config
		nodes []NodeID
	}{
		{"one node", ddraid.Config{DataNodes: []NodeID{1}, Quorum: 1}, []NodeID{1}},
		{"three nodes", three, []NodeID{1, 2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := formed(t, tc.q, nil, calm)
			before := c.nodes[1].a.View().Gen
			for _, id := range tc.nodes {
				c.crash(id)
			}
			for _, id := range tc.nodes {
				c.start(id)
				if n := c.nodes[id]; n.a.Quorate() {
					t.Fatalf("node %d quorate in its persisted view right after the restart", id)
				}
			}
			if !c.runUntil(600, func() bool {
				for _, id := range tc.nodes {
					if n := c.nodes[id]; !n.a.Quorate() || n.a.LockManagerStopped() || n.a.View().Gen <= before {
						return false
					}
				}
				return c.converged()
			}) {
				t.Fatalf("not running in a new view after every node restarted:\n%s", c.describe())
			}
			c.mustOK(t)
		})
	}
}
