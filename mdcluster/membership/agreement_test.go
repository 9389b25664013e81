package membership

import (
	"bytes"
	"errors"
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
)

// Message-level tests of one machine. The cluster tests (cluster_test.go,
// random_test.go, resume_test.go) are in the external package
// membership_test, so that their driver can be the real apply.Applier.

var (
	three = ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}
	five  = ddraid.Config{DataNodes: []NodeID{1, 2, 3, 4, 5}, Quorum: 3}
)

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
