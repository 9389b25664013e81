package membership

import (
	"bytes"
	"errors"
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
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
	c.fenceDone(3, c.nodes[1].a.value.Gen, true)
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
	if !c.nodes[3].a.Coordinating() || c.nodes[3].a.phase != fencing {
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
	chosen := c.nodes[1].a.value
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
		if err := a.Step(1, encodeMessage(message{Type: mCommit, Gen: v.Gen, Ballot: v.Gen, Value: v, Base: base})); err != nil {
			t.Fatal(err)
		}
		rd := a.Ready()
		ms := decodeAll(t, rd)
		if len(rd.Install) != 0 || len(ms) != 1 || ms[0].Type != mCommitted || !bytes.Equal(a.HardState().Marshal(), before) {
			t.Fatalf("duplicate commit: %+v", rd)
		}
	}
}

// direct returns a lone machine for message-level tests.
func direct(t *testing.T, self NodeID, q ddraid.Config, st HardState) *Agreement {
	t.Helper()
	a, err := New(Config{Self: self, Quorum: q, State: st})
	if err != nil {
		t.Fatal(err)
	}
	a.SetAlive(q.DataNodes)
	a.Ready()
	return a
}

func decodeAll(t *testing.T, rd Ready) []message {
	t.Helper()
	var out []message
	for _, m := range rd.Messages {
		d, err := decodeMessage(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

func TestSameBallotFromTwoCoordinators(t *testing.T) {
	a := direct(t, 5, five, HardState{})
	if err := a.Step(4, encodeMessage(message{Type: mPrepare, Ballot: 7, Intended: []NodeID{1, 2, 3, 4, 5}})); err != nil {
		t.Fatal(err)
	}
	if ms := decodeAll(t, a.Ready()); len(ms) != 1 || ms[0].Type != mPrepared {
		t.Fatalf("first PREPARE answered with %+v", ms)
	}
	// The same ballot from another coordinator must not get this vote too.
	if err := a.Step(3, encodeMessage(message{Type: mPrepare, Ballot: 7})); err != nil {
		t.Fatal(err)
	}
	ms := decodeAll(t, a.Ready())
	if len(ms) != 1 || ms[0].Type != mNack || ms[0].Promised != 7 {
		t.Fatalf("second PREPARE for ballot 7 answered with %+v, want NACK", ms)
	}
	// And neither may its ACCEPT.
	val := Proposal{Gen: 7, Members: []NodeID{1, 2, 3, 4, 5}}
	if err := a.Step(3, encodeMessage(message{Type: mAccept, Ballot: 7, Value: val})); err != nil {
		t.Fatal(err)
	}
	if ms := decodeAll(t, a.Ready()); len(ms) != 1 || ms[0].Type != mNack {
		t.Fatalf("ACCEPT from the second coordinator answered with %+v", ms)
	}
	if a.HardState().Accepted != nil {
		t.Fatal("accepted a value from a coordinator it did not promise")
	}
}

func TestStaleGenerationsDropped(t *testing.T) {
	v1 := Proposal{Gen: 4, Members: []NodeID{1, 2, 3}, Prev: View{Gen: 2, Members: []NodeID{1, 2}}}
	st := HardState{Promised: 4, PromisedTo: 1, Installed: v1}
	a := direct(t, 3, three, st)
	before := a.HardState().Marshal()
	old := Proposal{Gen: 3, Members: []NodeID{1, 3}, Prev: View{Gen: 2, Members: []NodeID{1, 2}}}
	msgs := []struct {
		from NodeID
		m    message
	}{
		{1, message{Type: mPrepare, Ballot: 3, Intended: []NodeID{1, 3}}},                        // ballot below promise
		{2, message{Type: mAccept, Ballot: 2, Value: Proposal{Gen: 2, Members: []NodeID{2, 3}}}}, // older ballot
		{1, message{Type: mCommit, Ballot: 3, Value: old, Base: Proposal{Gen: 2, Members: []NodeID{1, 2}}}},
		{2, message{Type: mLeave, Gen: 2}},            // leaver behind our view
		{1, message{Type: mPrepared, Ballot: 9}},      // not our ballot
		{2, message{Type: mDone, Gen: 4, ViewGen: 4}}, // we committed nothing
	}
	for i, x := range msgs {
		if err := a.Step(x.from, encodeMessage(x.m)); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	rd := a.Ready()
	if got := a.Stats().Stale; got != uint64(len(msgs)) {
		t.Fatalf("stale drops %d, want %d (log %v)", got, len(msgs), rd.Log)
	}
	if len(rd.Install) != 0 || rd.Stop != nil || rd.State != nil || !bytes.Equal(a.HardState().Marshal(), before) {
		t.Fatalf("stale messages changed something: %+v", rd)
	}
	for _, m := range decodeAll(t, rd) {
		if m.Type != mNack {
			t.Fatalf("answered a stale message with %s", m.Type)
		}
	}
}

func TestMalformedChangesNothing(t *testing.T) {
	a := direct(t, 2, three, HardState{})
	before := a.HardState().Marshal()
	good := encodeMessage(message{Type: mPrepare, Ballot: 3, Intended: []NodeID{1, 2, 3}})
	bad := [][]byte{
		nil, {wireVersion}, {9, 1, 0, 0}, {wireVersion, 99, 0, 0},
		append(slices.Clone(good), 0),                   // trailing byte
		good[:len(good)-1],                              // truncated
		{wireVersion, byte(mPrepare), 0, 0, 0},          // ballot 0
		{wireVersion, byte(mPrepare), 0x80, 0x00, 1, 0}, // padded varint
		{wireVersion, byte(mPrepare), 0, 1, 2, 2, 1},    // unsorted list
	}
	for i, p := range bad {
		err := a.Step(1, p)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("payload %d %x: err %v, want ErrMalformed", i, p, err)
		}
	}
	if err := a.Step(0, good); err == nil {
		t.Error("message from node 0 accepted")
	}
	if rd := a.Ready(); !rd.Empty() || !bytes.Equal(a.HardState().Marshal(), before) {
		t.Fatalf("malformed input changed state: %+v", rd)
	}
}

func TestCodecRoundTrip(t *testing.T) {
	p := Proposal{Gen: 9, Members: []NodeID{1, 2, 5}, Prev: View{Gen: 6, Members: []NodeID{1, 2, 3, 4}},
		Left: []NodeID{4}, Rejoined: []NodeID{2}}
	base := Proposal{Gen: 6, Members: []NodeID{1, 2, 3, 4}, Prev: View{Gen: 1, Members: []NodeID{1}}}
	msgs := []message{
		{Type: mPrepare, Gen: 6, Ballot: 9, Intended: []NodeID{1, 2, 5}},
		{Type: mPrepared, Gen: 6, Ballot: 9, Installed: base, Accepted: &Accepted{Ballot: 9, Value: p, Base: base}, Restarted: true, Leaving: true},
		{Type: mPrepared, Gen: 0, Ballot: 9},
		{Type: mAccept, Gen: 6, Ballot: 11, Value: p, Base: base},
		{Type: mAccepted, Ballot: 11},
		{Type: mNack, Ballot: 3, Promised: 11},
		{Type: mCommit, Gen: 6, Ballot: 11, Value: p, Base: base},
		{Type: mCommitted, Gen: 9, ViewGen: 9},
		{Type: mDone, Gen: 9, ViewGen: 9},
		{Type: mLeave, Gen: 9},
		{Type: mHello, Restarted: true},
		{Type: mHello, Gen: 9, Stopped: true},
	}
	for _, m := range msgs {
		b := encodeMessage(m)
		d, err := decodeMessage(b)
		if err != nil {
			t.Fatalf("%s: %v", m.Type, err)
		}
		if !bytes.Equal(encodeMessage(d), b) {
			t.Fatalf("%s: re-encoding differs", m.Type)
		}
	}
	hs := HardState{Promised: 11, PromisedTo: 3, Accepted: &Accepted{Ballot: 11, Value: p, Base: base}, Installed: base}
	got, err := UnmarshalHardState(hs.Marshal())
	if err != nil || !bytes.Equal(got.Marshal(), hs.Marshal()) {
		t.Fatalf("hard state round trip: %v", err)
	}
	if _, err := UnmarshalHardState(append(hs.Marshal(), 1)); err == nil {
		t.Fatal("hard state with trailing byte accepted")
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	if _, err := New(Config{Quorum: three}); err == nil {
		t.Error("Self 0 accepted")
	}
	if _, err := New(Config{Self: 1, Quorum: ddraid.Config{DataNodes: []NodeID{1, 2}, Quorum: 1}}); !errors.Is(err, ddraid.ErrSplitBrain) {
		t.Errorf("split-brain config: %v", err)
	}
	bad := HardState{Installed: Proposal{Gen: 3, Members: []NodeID{1}, Prev: View{Gen: 5}}}
	if _, err := New(Config{Self: 1, Quorum: three, State: bad}); err == nil {
		t.Error("inconsistent persisted view accepted")
	}
}

// FuzzStep feeds arbitrary payloads to machines in a few states: Step must
// never panic, a refused payload must change nothing, and an accepted one
// must re-encode to the same bytes.
func FuzzStep(f *testing.F) {
	base := Proposal{Gen: 4, Members: []NodeID{1, 2, 3}, Prev: View{Gen: 2, Members: []NodeID{1, 2}}}
	val := Proposal{Gen: 6, Members: []NodeID{1, 2}, Prev: base.View()}
	seeds := []message{
		{Type: mPrepare, Gen: 4, Ballot: 6, Intended: []NodeID{1, 2}},
		{Type: mPrepared, Gen: 4, Ballot: 6, Installed: base, Accepted: &Accepted{Ballot: 6, Value: val, Base: base}},
		{Type: mAccept, Gen: 4, Ballot: 6, Value: val, Base: base},
		{Type: mCommit, Gen: 4, Ballot: 6, Value: val, Base: base},
		{Type: mNack, Ballot: 6, Promised: 8},
		{Type: mLeave, Gen: 4},
		{Type: mHello, Restarted: true},
		{Type: mHello, Gen: 4, Stopped: true},
		{Type: mDone, Gen: 6, ViewGen: 6},
	}
	for _, m := range seeds {
		f.Add(uint32(1), encodeMessage(m))
	}
	states := []HardState{{}, {Promised: 4, PromisedTo: 1, Installed: base}}
	f.Fuzz(func(t *testing.T, from uint32, payload []byte) {
		if m, err := decodeMessage(payload); err == nil {
			if !bytes.Equal(encodeMessage(m), payload) {
				t.Fatalf("decoded payload re-encodes differently")
			}
		}
		for _, st := range states {
			a, err := New(Config{Self: 2, Quorum: three, State: st})
			if err != nil {
				t.Fatal(err)
			}
			a.SetAlive([]NodeID{1, 2, 3})
			a.Ready()
			before := a.HardState().Marshal()
			if err := a.Step(NodeID(from), payload); err != nil {
				if rd := a.Ready(); !rd.Empty() || !bytes.Equal(a.HardState().Marshal(), before) {
					t.Fatalf("refused payload changed the machine: %v", err)
				}
				continue
			}
			a.Ready()
			a.Tick()
			a.Ready()
		}
	})
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
			if err := c.nodes[1].a.Step(2, encodeMessage(message{Type: mCommit, Gen: v.Gen, Ballot: v.Gen, Value: v,
				Base: Proposal{Gen: first.Gen, Members: first.Members}})); err != nil {
				t.Fatal(err)
			}
			c.process(c.nodes[1])
			if !c.nodes[1].a.excluded {
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
