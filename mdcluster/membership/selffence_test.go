package membership

import (
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
)

// prepareBallot returns the ballot of the PREPARE this Ready sends, or 0.
func prepareBallot(t *testing.T, rd Ready) uint64 {
	t.Helper()
	for _, m := range decodeAll(t, rd) {
		if m.Type == mPrepare {
			return m.Ballot
		}
	}
	return 0
}

// TestSelfFenceLoggedForEveryView: a coordinator that completes an adopted
// view naming itself as failed stands in for its own fence, and the log
// line saying so is the only record of it (the "view chosen" line lists
// nobody to fence). It must be logged for every such view, not only when
// the node stops: internal/sim seed 39598 had node 1, already stopped as a
// failed member of gen 5, complete gen 14, which removed it again (gen 12,
// installed by the others while node 1 was cut off, had readmitted it).
// The line was logged only for gen 5, so gen 14 looked like a view that
// removed a failed node nobody fenced ("node 3 installed gen 14 removing
// failed node 1, which was not fenced for it").
//
// The same shape: four data nodes, quorum 2, tie-breaker 2; node 1 sees 1,
// 3 and 4. It first completes gen 5 = [2 3 4] (prev its own gen 4), then
// gen 15 = [2 3 4] whose predecessor gen 10 = [1 2 3] it missed and is
// not quorate in (1 and 3 alive, tie-breaker absent), so it installs
// nothing in between and stays excluded. Its persisted promise (ballot 12,
// to node 2) puts its first ballot above the one gen 5 was accepted at.
func TestSelfFenceLoggedForEveryView(t *testing.T) {
	q := ddraid.Config{DataNodes: []NodeID{1, 2, 3, 4}, Quorum: 2, TieBreaker: 2}
	v4 := Proposal{Gen: 4, Members: []NodeID{1, 2, 3, 4}, Prev: View{Gen: 2, Members: []NodeID{2, 4}}}
	a, err := New(Config{Self: 1, Quorum: q, State: HardState{Promised: 12, PromisedTo: 2, Installed: v4}})
	if err != nil {
		t.Fatal(err)
	}
	a.SetAlive([]NodeID{1, 3, 4})
	peers := []NodeID{3, 4}

	// Round 1: adopt gen 5, which names node 1 as failed.
	b1 := prepareBallot(t, a.Ready())
	if b1 == 0 {
		t.Fatal("node 1 (restarted, lowest alive) proposed no change")
	}
	v5 := Proposal{Gen: 5, Members: []NodeID{2, 3, 4}, Prev: v4.View()}
	for _, p := range peers {
		acc := &Accepted{Ballot: 5, Value: v5, Base: v4}
		if err := a.Step(p, encodeMessage(message{Type: mPrepared, Gen: 4, Ballot: b1, Installed: v4, Accepted: acc})); err != nil {
			t.Fatal(err)
		}
	}
	a.Ready()
	for _, p := range peers {
		if err := a.Step(p, encodeMessage(message{Type: mAccepted, Gen: 4, Ballot: b1})); err != nil {
			t.Fatal(err)
		}
	}
	rd := a.Ready()
	if got := rd.SelfFenceGens(); !slices.Equal(got, []uint64{5}) || SelfFenced(a) != 5 {
		t.Fatalf("gen 5: self-fence lines for %v (recorded %d), want [5]; log %v", got, SelfFenced(a), rd.Log)
	}
	if a.Quorate() || !a.LockManagerStopped() || !Excluded(a) {
		t.Fatalf("after gen 5 (excluded %v): quorate %v, lock manager stopped %v; want stopped", Excluded(a), a.Quorate(), a.LockManagerStopped())
	}

	// Round 2: still excluded, it proposes again. Meanwhile node 2 ran
	// ballots 10 and 15: gen 10 = [1 2 3] (readmitting node 1, which was
	// cut off and never installed it) and gen 15 = [2 3 4], accepted by 3
	// and 4, which refuse node 1's next ballot until it goes above 15.
	b2 := prepareBallot(t, rd)
	for range 100 {
		if b2 > 15 {
			break
		}
		if b2 != 0 {
			if err := a.Step(3, encodeMessage(message{Type: mNack, Gen: 10, Ballot: b2, Promised: 15})); err != nil {
				t.Fatal(err)
			}
			a.Ready()
		}
		a.Tick()
		b2 = prepareBallot(t, a.Ready())
	}
	if b2 <= 15 {
		t.Fatalf("no second change proposed above ballot 15 (last %d)", b2)
	}
	v10 := Proposal{Gen: 10, Members: []NodeID{1, 2, 3}, Prev: v5.View()}
	v15 := Proposal{Gen: 15, Members: []NodeID{2, 3, 4}, Prev: v10.View()}
	for _, p := range peers {
		acc := &Accepted{Ballot: 15, Value: v15, Base: v10}
		if err := a.Step(p, encodeMessage(message{Type: mPrepared, Gen: 10, Ballot: b2, Installed: v10, Accepted: acc})); err != nil {
			t.Fatal(err)
		}
	}
	if rd := a.Ready(); len(rd.Install) != 0 {
		t.Fatalf("node 1 installed %+v: it is not quorate in gen 10 (only 1 and 3 alive)", rd.Install)
	}
	for _, p := range peers {
		if err := a.Step(p, encodeMessage(message{Type: mAccepted, Gen: 10, Ballot: b2})); err != nil {
			t.Fatal(err)
		}
	}
	rd = a.Ready()
	if len(rd.Fence) != 0 {
		t.Fatalf("asked to fence %+v; gen 15 departs only node 1 itself; log %v", rd.Fence, rd.Log)
	}
	committed := false
	for _, m := range decodeAll(t, rd) {
		committed = committed || (m.Type == mCommit && m.Value.Gen == 15)
	}
	if !committed || SelfFenced(a) != 15 {
		t.Fatalf("gen 15 not committed as a self-fenced view (commit sent %v, recorded %d)", committed, SelfFenced(a))
	}
	if got := rd.SelfFenceGens(); !slices.Equal(got, []uint64{15}) {
		t.Fatalf("gen 15 removes node 1 without a fence, and its commit went out with self-fence lines for %v, want [15]: "+
			"nothing records who stood in for the fence; log %v", got, rd.Log)
	}
	if a.Quorate() || !a.LockManagerStopped() {
		t.Fatalf("after gen 15: quorate %v, lock manager stopped %v; want stopped", a.Quorate(), a.LockManagerStopped())
	}
}
