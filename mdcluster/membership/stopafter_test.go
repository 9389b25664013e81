package membership

import (
	"slices"
	"strings"
	"testing"
)

// lone is one machine driven by hand: the test plays every other node.
type lone struct {
	t *testing.T
	a *Agreement
}

func (l lone) step(from NodeID, m message) {
	l.t.Helper()
	if err := l.a.Step(from, encodeMessage(m)); err != nil {
		l.t.Fatal(err)
	}
}

// sent returns the messages of rd of type typ, by recipient.
func (l lone) sent(rd Ready, typ msgType) map[NodeID]message {
	l.t.Helper()
	out := map[NodeID]message{}
	for _, o := range rd.Messages {
		m, err := decodeMessage(o.Payload)
		if err != nil {
			l.t.Fatal(err)
		}
		if m.Type == typ {
			out[o.To] = m
		}
	}
	return out
}

// round answers, as each peer, the PREPARE (with its installed view inst)
// or ACCEPT the machine sent in rd, and returns the Ready that follows the
// last answer.
func (l lone) round(rd Ready, peers []NodeID, inst Proposal) Ready {
	l.t.Helper()
	prep, acc := l.sent(rd, mPrepare), l.sent(rd, mAccept)
	for _, p := range peers {
		switch {
		case prep[p].Type == mPrepare:
			l.step(p, message{Type: mPrepared, Gen: inst.Gen, Ballot: prep[p].Ballot, Installed: inst})
		case acc[p].Type == mAccept:
			l.step(p, message{Type: mAccepted, Gen: inst.Gen, Ballot: acc[p].Ballot})
		default:
			l.t.Fatalf("no PREPARE or ACCEPT to node %s in %+v", p, rd)
		}
	}
	return l.a.Ready()
}

// TestStopAfterInstallInOneReady: one Ready of the coordinator installs a
// view and also stops for a newer ballot (its failure detector lost a node
// while the view was being accepted, so right after committing it, it
// proposes a view without that node). The stop outlasts the install: the
// Ready says so (StopAfterInstall, which the driver's applier follows) and
// the machine counts its lock manager as stopped. That newer ballot is then
// refused and the lost node is seen again, so nothing differs from the
// installed view. The node must still get a fresh view with the same
// members, and resume through it, within a bounded number of ticks: before
// this was modelled, the machine believed its lock manager ran and never
// asked (random seed 3678 of internal/sim).
func TestStopAfterInstallInOneReady(t *testing.T) {
	a, err := New(Config{Self: 1, Quorum: three})
	if err != nil {
		t.Fatal(err)
	}
	l := lone{t, a}
	all, peers := []NodeID{1, 2, 3}, []NodeID{2, 3}
	a.SetAlive(all)
	rd := l.round(l.round(a.Ready(), peers, Proposal{}), peers, Proposal{}) // the first view
	if len(rd.Install) != 1 || rd.StopAfterInstall != nil || a.LockManagerStopped() {
		t.Fatalf("first view: %+v, stopped %v", rd, a.LockManagerStopped())
	}
	v1 := a.HardState().Installed

	// Node 3 asks for a fresh view (its lock manager is stopped); node 1
	// proposes V2 with the same members and sends ACCEPT.
	l.step(3, message{Type: mHello, Gen: v1.Gen, Stopped: true})
	rd = l.round(a.Ready(), peers, v1)
	if len(l.sent(rd, mAccept)) != 2 {
		t.Fatalf("no ACCEPT for the same-members view: %+v", rd)
	}
	// Node 1's detector loses node 3 before the answers arrive.
	a.SetAlive([]NodeID{1, 2})
	a.Ready()
	rd = l.round(rd, peers, v1)
	if len(rd.Install) != 1 || rd.Install[0].View.Gen <= v1.Gen || rd.Stop == nil || rd.Stop.Gen <= rd.Install[0].View.Gen {
		t.Fatalf("want one Ready that installs V2 and stops for a newer ballot, got %+v", rd)
	}
	v2, b := rd.Install[0].View, rd.Stop.Gen
	sa := rd.StopAfterInstall
	if sa == nil || sa.Change == nil || !sa.Change.Equal(*rd.Stop) || sa.NotQuorate {
		t.Fatalf("StopAfterInstall %v, want the change towards ballot %d", sa, b)
	}
	if !a.LockManagerStopped() {
		t.Fatal("the machine counts its lock manager as running after a Ready that stops it after the install")
	}

	// The newer ballot is refused, and node 3 is back: V2 lists exactly
	// the nodes alive, and nobody else is stopped.
	l.step(2, message{Type: mNack, Ballot: b, Promised: b + 2})
	a.SetAlive(all)
	a.Ready()
	if Phase(a) != "idle" || !a.LockManagerStopped() {
		t.Fatalf("after the refusal: phase %s, stopped %v", Phase(a), a.LockManagerStopped())
	}
	// It waits 2 × PrepareTimeout without a sign of a change, then, as the
	// coordinator, proposes a fresh view for itself.
	bound := 2*a.cfg.PrepareTimeout + 2
	var asked bool
	for range bound {
		a.Tick()
		rd = a.Ready()
		if rd.Stop != nil && slices.Equal(rd.Stop.Members, all) && len(l.sent(rd, mPrepare)) == 2 {
			asked = slices.ContainsFunc(rd.Log, func(e Event) bool { return strings.Contains(e.Msg, "proposing") })
			break
		}
	}
	if !asked {
		t.Fatalf("no fresh view proposed within %d ticks of the abandoned change", bound)
	}
	rd = l.round(l.round(rd, peers, proposalOf(v2, v1.View())), peers, proposalOf(v2, v1.View()))
	if len(rd.Install) != 1 || !slices.Equal(rd.Install[0].View.Members, all) || rd.Install[0].Prev.Gen != v2.Gen ||
		rd.Install[0].Reset || rd.StopAfterInstall != nil || a.LockManagerStopped() {
		t.Fatalf("want a view with the same members after gen %d that resumes the lock manager, got %+v (stopped %v)",
			v2.Gen, rd, a.LockManagerStopped())
	}
	// And that is the end of it.
	for range 100 {
		a.Tick()
		if rd := a.Ready(); rd.Stop != nil || len(rd.Install) != 0 {
			t.Fatalf("a resumed node went on changing: %+v", rd)
		}
	}
}

func proposalOf(v, prev View) Proposal { return Proposal{Gen: v.Gen, Members: v.Members, Prev: prev} }
