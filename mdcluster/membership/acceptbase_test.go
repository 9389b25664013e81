package membership_test

import (
	"slices"
	"testing"

	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// TestAcceptDoesNotInstallBaseWithoutQuorum: an ACCEPT whose base (the
// predecessor this node missed the COMMIT of) is a view in which this node
// is not quorate must not install that base at once. Installed, it starts
// DLM recovery (which may grant at once) in the very Ready that reports
// quorum lost: the driver stops again only after the Install. internal/sim
// seed 1835 with StartupFenceAfter found this: "node 3 granted lock …
// while its agreement says it is not quorate". The base is installed with
// the value at COMMIT, once the node is quorate in the value.
//
// Five data nodes (quorum 3). Node 3 installed gen 1 = [1..5], then missed
// gen 15 = [3 4 5]. It now sees 2, 3 and 4: quorate in gen 1 and in the
// proposed gen 18 = [2 3 4], but in gen 15 only 3 and 4 of it are alive.
func TestAcceptDoesNotInstallBaseWithoutQuorum(t *testing.T) {
	all := []NodeID{1, 2, 3, 4, 5}
	a, _ := inFirstView(t, 3, five, all)
	a.SetAlive([]NodeID{2, 3, 4})
	a.Ready()
	if !a.Quorate() {
		t.Fatal("node 3 must stay quorate in gen 1 with 2, 3 and 4 alive")
	}

	base := Proposal{Gen: 15, Members: []NodeID{3, 4, 5}, Prev: View{Gen: 1, Members: all}}
	value := Proposal{Gen: 18, Members: []NodeID{2, 3, 4}, Prev: View{Gen: 15, Members: []NodeID{3, 4, 5}}}
	if err := a.Step(2, EncodeAccept(1, 18, value, base)); err != nil {
		t.Fatal(err)
	}
	rd := a.Ready()
	if len(rd.Install) > 0 && !a.Quorate() {
		t.Fatalf("ACCEPT installed gen %d although node 3 is not quorate in it (its lock manager would recover, and may grant, before it is stopped again): %+v",
			rd.Install[0].View.Gen, rd)
	}
	var types []string
	for _, m := range rd.Messages {
		typ, err := MessageType(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		types = append(types, typ)
	}
	if !slices.Contains(types, "ACCEPTED") {
		t.Fatalf("the proposal was not accepted (messages %v): node 3 is quorate in it and the others need its answer", types)
	}
	if acc := a.HardState().Accepted; acc == nil || acc.Value.Gen != 18 {
		t.Fatalf("accepted %+v, want gen 18", acc)
	}

	// The COMMIT installs the base and then the value, in order, and the
	// node ends quorate with its lock manager running.
	if err := a.Step(2, EncodeCommit(1, 18, value, base)); err != nil {
		t.Fatal(err)
	}
	rd = a.Ready()
	var gens []uint64
	for _, in := range rd.Install {
		gens = append(gens, in.View.Gen)
	}
	if !slices.Equal(gens, []uint64{15, 18}) {
		t.Fatalf("installs %v at COMMIT, want [15 18]: %+v", gens, rd)
	}
	if last := rd.Install[1]; last.Reset || last.Prev.Gen != 15 {
		t.Fatalf("gen 18 installed as %+v, want no reset, succeeding gen 15", last)
	}
	if !a.Quorate() || a.LockManagerStopped() || rd.StopAfterInstall != nil {
		t.Fatalf("after the commit: quorate %v, stopped %v, stop after install %+v; want quorate and running",
			a.Quorate(), a.LockManagerStopped(), rd.StopAfterInstall)
	}
}
