package sim

import (
	"fmt"
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/dlm"
)

// believe makes node id's failure detector believe alive (a lagging or
// mistaken detector on that node only) until the next detector event for it.
func believe(s *Sim, id NodeID, alive ...NodeID) {
	n := s.nodes[id]
	n.alive = slices.Sorted(slices.Values(alive))
	s.tracef("%s's detector believes %v", id, n.alive)
	n.Ag.SetAlive(n.alive)
	s.pump(n)
}

// cutSilently drops, from now on, every membership message between the
// groups and holds the DLM traffic between them, without telling any
// failure detector (they have not noticed yet); nil restores the links.
func cutSilently(s *Sim, groups map[NodeID]int) {
	s.tracef("links cut silently: %v", groups)
	s.group = groups
	if groups == nil {
		s.group = map[NodeID]int{}
	}
}

// dropInFlight loses the membership messages from one node to another that
// are still on their way.
func dropInFlight(s *Sim, from, to NodeID) {
	s.events = slices.DeleteFunc(s.events, func(e event) bool { return e.kind == evMsg && e.from == from && e.to == to })
}

// tickUntil runs the clock (delivering DLM traffic and checking the
// invariants at every step) until cond holds; false when limit ticks
// passed first.
func tickUntil(s *Sim, limit int, cond func() bool) bool {
	for range limit {
		if s.Failed() != "" {
			return false
		}
		if cond() {
			return true
		}
		for s.DeliverDLM() && s.Failed() == "" {
			s.Check()
		}
		s.Tick()
		s.Check()
	}
	return s.Failed() == "" && cond()
}

// TestStopAfterInstallThenAbandoned is the situation of random seed 3678,
// made deterministic. One Ready on node 2 installs a view and also stops
// for a newer ballot; that newer change is then abandoned, and the view it
// would have replaced lists exactly the nodes everyone sees, so nobody
// else has a reason for a change. Node 2's lock manager stays stopped (its
// applier stops it again after the install, as it must), so node 2 must ask
// for a fresh view with the same members, and resume through it: its lock
// request is granted within a bounded number of ticks.
//
//  1. Node 3 loses quorum for a moment and asks for a view (HELLO stopped);
//     node 1 proposes V (same members), every node accepts it, node 1
//     commits and installs it.
//  2. Node 1's links to the others fail before its COMMIT arrives (the
//     detectors of nodes 2 and 3 soon suspect it; node 1's does not notice).
//     Node 2, now the lowest node that 2 and 3 see, completes V by adoption
//     and, in the same Ready, proposes a view without node 1 under a newer
//     ballot: it installs V and stops (the applier stops it again after the
//     install).
//  3. That newer PREPARE is lost, the links come back, and node 2 sees node
//     1 again: no longer the coordinator, it abandons its ballot. Node 3 gets
//     V by the repeated COMMIT. V = {1 2 3} is what everyone sees alive:
//     nothing differs, and only node 2 is stopped.
func TestStopAfterInstallThenAbandoned(t *testing.T) {
	f := Faults{MsgMaxDelay: 1, DLMMaxDelay: 1, FDLag: 1, FenceLag: 1}
	s := scenario(t, []NodeID{1, 2, 3}, 2, f)
	g0 := s.Node(1).Ag.View().Gen

	// 1. A same-members change, V.
	believe(s, 3, 3)
	s.Tick()
	believe(s, 3, 1, 2, 3)
	if !tickUntil(s, 200, func() bool { return s.Node(1).Ag.View().Gen > g0 }) {
		fatal(t, s, "node 1 never installed a new view after node 3's quorum flap")
	}
	v := s.Node(1).Ag.View()
	if !slices.Equal(v.Members, []NodeID{1, 2, 3}) {
		t.Fatalf("view %+v; the scenario needs the same members", v)
	}
	for _, id := range []NodeID{2, 3} {
		if acc := s.Node(id).Ag.HardState().Accepted; acc == nil || acc.Value.Gen != v.Gen || s.Node(id).Ag.View().Gen != g0 {
			t.Fatalf("node %s: accepted %+v, view %d; the scenario needs it to have accepted gen %d and not installed it",
				id, acc, s.Node(id).Ag.View().Gen, v.Gen)
		}
	}

	// 2. Node 1 is cut off before its COMMIT arrives.
	for _, id := range []NodeID{2, 3} {
		dropInFlight(s, 1, id)
		dropInFlight(s, id, 1)
	}
	cutSilently(s, map[NodeID]int{1: 1})
	believe(s, 2, 2, 3)
	believe(s, 3, 2, 3)
	stops := s.Stats().StopsAfterInstall
	if !tickUntil(s, 200, func() bool { return s.Node(2).Ag.View().Gen == v.Gen }) {
		fatal(t, s, "node 2 never completed V")
	}
	if s.Stats().StopsAfterInstall != stops+1 || !s.Node(2).Sp.Stopped() || !s.Node(2).Ag.Coordinating() {
		t.Fatalf("the scenario needs node 2 to install V and stop for a newer ballot in one Ready (stops after install %d → %d, stopped %v, coordinating %v)",
			stops, s.Stats().StopsAfterInstall, s.Node(2).Sp.Stopped(), s.Node(2).Ag.Coordinating())
	}

	// 3. The newer ballot is abandoned; nothing differs from V.
	dropInFlight(s, 2, 3)
	cutSilently(s, nil)
	believe(s, 2, 1, 2, 3)
	believe(s, 3, 1, 2, 3)
	if s.Node(2).Ag.Coordinating() {
		t.Fatal("node 2 still coordinates although it sees node 1")
	}
	if l := s.NewLock(2, "r0", dlm.EX, 0); l != nil {
		t.Fatalf("node 2's lockspace took a request (lock %d) although it is stopped", l.ID)
	}
	// Node 2 waits 2 × PrepareTimeout (24 ticks) without a sign of a change,
	// asks at its next HELLO tick (every 5), node 1 runs a change (maybe
	// once more, above the ballot node 2 promised), and every member
	// recovers into it: well under 80 ticks.
	const bound = 80
	if !tickUntil(s, bound, func() bool { return s.ConvergedOn(1, 2, 3) }) {
		fatal(t, s, fmt.Sprintf("node 2's lock manager did not resume within %d ticks", bound))
	}
	if gen := s.Node(2).Ag.View().Gen; gen <= v.Gen {
		t.Fatalf("node 2 runs in gen %d; it can resume only through a view newer than %d", gen, v.Gen)
	}
	req := s.NewLock(2, "r0", dlm.EX, 0)
	s.QuiesceDLM(100)
	if !granted(req, dlm.EX) {
		fatal(t, s, "node 2 resumed, but its lock request was not granted")
	}
	finish(t, s)
}
