package membership_test

import (
	"testing"

	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// restartThenJoin restarts node 2 from a persisted state in which it was a
// member of gen 28 and had promised ballot promised, then has node 1 send it
// an ACCEPT and the COMMIT of ballot 33 for gen 32 = [1 2 3], which joins it
// anew after gen 31 = [1 3]. It returns the Agreement after the install.
func restartThenJoin(t *testing.T, promised uint64) *Agreement {
	t.Helper()
	all := []NodeID{1, 2, 3}
	hs := HardState{Promised: promised, PromisedTo: 1, Installed: Proposal{Gen: 28, Members: all, Prev: View{Gen: 27, Members: all}}}
	a, err := New(Config{Self: 2, Quorum: three, PrepareTimeout: 12, State: hs})
	if err != nil {
		t.Fatal(err)
	}
	if !Restarted(a) {
		t.Fatal("node 2 restarted as a member of its persisted view but does not ask to be readmitted")
	}
	a.SetAlive(all)
	a.Ready()
	base := Proposal{Gen: 31, Members: []NodeID{1, 3}, Prev: View{Gen: 29, Members: []NodeID{1, 3}}}
	value := Proposal{Gen: 32, Members: all, Prev: base.View()}
	if err := a.Step(1, EncodeAccept(31, 33, value, base)); err != nil {
		t.Fatal(err)
	}
	a.Ready()
	if acc := a.HardState().Accepted; acc == nil || acc.Value.Gen != 32 {
		t.Fatalf("this run did not accept gen 32: accepted %+v", acc)
	}
	if err := a.Step(1, EncodeCommit(31, 33, value, base)); err != nil {
		t.Fatal(err)
	}
	rd := a.Ready()
	if len(rd.Install) != 1 || rd.Install[0].View.Gen != 32 || !rd.Install[0].Reset {
		t.Fatalf("installs %+v, want gen 32 with a reset", rd.Install)
	}
	return a
}

// TestRestartedNodeJoinedByViewEarlierRunAccepted: the previous run of node
// 2 accepted gen 32 (ballot 33), which joins it anew; node 1 chose it, installed
// it and sent its DLM recovery traffic to that run, which then crashed (the
// traffic was lost with its connections). A duplicate of the ACCEPT and the
// COMMIT reach the new run, which accepts and installs gen 32 with a reset.
// Its lock manager cannot finish that recovery (the peers' recovery messages
// went to the previous run, and the peers, done, send none again), so the
// new run must still ask to be readmitted as Rejoined: that view makes every
// member recover again. internal/sim seed 55079 found node 2 stopped in gen
// 32 for ever: this run had accepted gen 32, which was taken as proof that
// the others installed it only after the restart.
func TestRestartedNodeJoinedByViewEarlierRunAccepted(t *testing.T) {
	a := restartThenJoin(t, 33)
	if !Restarted(a) {
		t.Fatal("after installing gen 32, which the previous run had promised (ballot 33), node 2 stopped asking to be readmitted: its lock manager waits for recovery traffic sent to the previous run")
	}
}

// TestRestartedNodeJoinedByViewOnlyThisRunSaw: the same join, but the
// previous run promised nothing above gen 28, so only this run can have
// answered gen 32's PREPARE; nobody installed it before this run began, and
// the join readmits it with no further view.
func TestRestartedNodeJoinedByViewOnlyThisRunSaw(t *testing.T) {
	a := restartThenJoin(t, 28)
	if Restarted(a) {
		t.Fatal("after a view that joins it anew and that only this run took part in, node 2 still asks to be readmitted (a needless view change)")
	}
}
