package broadcast

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/dlm"
)

func env(seq uint64, from dlm.NodeID, ty Type) []byte {
	return Envelope{Msg: Message{Type: ty, Slot: uint32(from) - 1}, Seq: seq, Sender: from}.Encode(LVBSize)
}

func joined(t *testing.T, self dlm.NodeID, lastSeq uint64) *Machine {
	t.Helper()
	m, err := NewMachine(self)
	if err != nil {
		t.Fatal(err)
	}
	m.TokenGranted(TokenState{LastSeq: lastSeq, Joined: []dlm.NodeID{1, 2, 3}}.Encode(LVBSize), false)
	var lvb []byte
	if lastSeq > 0 {
		lvb = env(lastSeq, 1, MetadataUpdated)
	} else {
		lvb = make([]byte, LVBSize)
	}
	m.Joined(lvb, lastSeq == 0)
	m.TokenReleased()
	m.ViewDone(1, []dlm.NodeID{1, 2, 3})
	m.catchUp = false
	return m
}

func TestMachineNodeRange(t *testing.T) {
	for _, id := range []dlm.NodeID{0, MaxNode + 1} {
		if _, err := NewMachine(id); err == nil {
			t.Fatalf("node %d accepted", id)
		}
	}
}

// TestMachineJoinCountsLastBroadcastSeen: the broadcast in the message
// lock at join time was sent before this node joined: it is never acted
// on, and a repeated notification for it is answered "acted".
func TestMachineJoinCountsLastBroadcastSeen(t *testing.T) {
	m := joined(t, 2, 41)
	if m.Seen() != 41 || m.Phase() != Joined || !slices.Contains(m.TokenState().Joined, 2) {
		t.Fatalf("seen %d phase %v token %+v", m.Seen(), m.Phase(), m.TokenState())
	}
	d := m.Incoming(env(41, 1, Remove), true)
	if d.Act || d.Reply.Seq != 41 || d.Reply.Status != StatusActed {
		t.Fatalf("%+v", d)
	}
	d = m.Incoming(env(42, 1, Remove), true)
	if !d.Act || d.Env.Seq != 42 {
		t.Fatalf("%+v", d)
	}
}

// TestMachinePublishSequence: the next sequence number is above the
// message lock's, the token's and this node's own.
func TestMachinePublishSequence(t *testing.T) {
	for _, c := range []struct {
		lvb         []byte
		seen, token uint64
		want        uint64
	}{
		{make([]byte, LVBSize), 0, 0, 1},
		{env(10, 2, Remove), 3, 4, 11},
		{env(10, 2, Remove), 30, 4, 31},
		{env(10, 2, Remove), 3, 50, 51},
	} {
		m, _ := NewMachine(1)
		m.seen = c.seen
		m.token.last = c.token
		e := m.Publish(c.lvb, Message{Type: NewDisk, Slot: 99})
		if e.Seq != c.want || e.Sender != 1 || e.Msg.Slot != 0 || m.Seen() != c.want || m.token.last != c.want {
			t.Fatalf("%+v: envelope %+v seen %d token %d", c, e, m.Seen(), m.token.last)
		}
		// Its own broadcast, notified to it somehow, is answered, not acted on.
		m.phase = Joined
		if d := m.Incoming(e.Encode(LVBSize), true); d.Act || d.Reply.Status != StatusActed {
			t.Fatalf("own broadcast: %+v", d)
		}
	}
}

func TestMachineIncoming(t *testing.T) {
	m := joined(t, 2, 5)
	// New: act, once.
	d := m.Incoming(env(6, 1, NewDisk), true)
	if !d.Act {
		t.Fatalf("%+v", d)
	}
	r := m.Acted(d.Env, errors.New("no disk"), false)
	if r.Status != StatusFailed || r.Text != "no disk" || r.Seq != 6 {
		t.Fatalf("reply %+v", r)
	}
	// Repeated: the same answer from memory.
	if d := m.Incoming(env(6, 1, NewDisk), true); d.Act || d.Reply != r {
		t.Fatalf("repeat: %+v", d)
	}
	// Older: stale, not acted on.
	if d := m.Incoming(env(4, 3, NewDisk), true); d.Act || d.Reply.Status != StatusStale || d.Reply.Seq != 4 {
		t.Fatalf("older: %+v", d)
	}
	// Unknown type: answered without the handler.
	if d := m.Incoming(env(7, 3, 99), true); d.Act || d.Reply.Status != StatusUnknownType || d.Reply.Seq != 7 {
		t.Fatalf("unknown: %+v", d)
	}
	// A value that does not decode is answered malformed, with the
	// sequence it seems to carry so the sender can match the answer.
	bad := env(8, 3, Remove)
	bad[45] = 1
	if d := m.Incoming(bad, true); d.Act || d.Reply.Status != StatusMalformed || d.Reply.Seq != 8 {
		t.Fatalf("malformed: %+v", d)
	}
	if m.Seen() != 7 {
		t.Fatalf("seen %d", m.Seen())
	}
	if m.Gaps() != 0 {
		t.Fatalf("gaps %d", m.Gaps())
	}
	if d := m.Incoming(env(10, 3, Remove), true); !d.Act || m.Gaps() != 1 {
		t.Fatalf("gap: %+v %d", d, m.Gaps())
	}
}

// TestMachineCatchUp: after a recovery, a broadcast this node never saw
// is acted on only if its sender departed (a live sender notifies, or gave
// up); nothing is answered, since nobody waits.
func TestMachineCatchUp(t *testing.T) {
	m := joined(t, 2, 5)
	if d := m.Incoming(env(6, 1, Remove), false); !d.NoReply || d.Act {
		t.Fatalf("live sender: %+v", d)
	}
	m.Departed([]dlm.NodeID{1})
	m.ViewDone(2, []dlm.NodeID{2, 3})
	d := m.Incoming(env(6, 1, Remove), false)
	if !d.Act {
		t.Fatalf("departed sender: %+v", d)
	}
	m.Acted(d.Env, nil, false)
	if d := m.Incoming(env(6, 1, Remove), false); !d.NoReply {
		t.Fatalf("again: %+v", d)
	}
	// The notification that follows (the finishing sender) gets "acted".
	if d := m.Incoming(env(6, 1, Remove), true); d.Act || d.Reply.Status != StatusActed {
		t.Fatalf("finish: %+v", d)
	}
}

func TestMachineActedStatuses(t *testing.T) {
	m := joined(t, 2, 0)
	e := Envelope{Seq: 1, Sender: 1}
	for _, c := range []struct {
		err     error
		overran bool
		want    Status
	}{
		{nil, false, StatusActed},
		{nil, true, StatusActed}, // it finished its work, late
		{fmt.Errorf("no: %w", ErrUnknownType), false, StatusUnknownType},
		{context.DeadlineExceeded, true, StatusTimeout},
		{errors.New("boom"), false, StatusFailed},
	} {
		if r := m.Acted(e, c.err, c.overran); r.Status != c.want {
			t.Fatalf("%v/%v: %v", c.err, c.overran, r.Status)
		}
	}
	r := m.Acted(e, errors.New(strings.Repeat("x", 100)), false)
	if len(r.Text) != MaxReplyText {
		t.Fatalf("text of %d bytes", len(r.Text))
	}
}

func TestMachineClassify(t *testing.T) {
	m := joined(t, 1, 10) // the token lists 1, 2, 3 as joined
	m.token.joined.del(3)
	reply := func(seq uint64, node dlm.NodeID, st Status, text string) []byte {
		return Reply{Seq: seq, Node: node, Status: st, Text: text}.Encode(LVBSize)
	}
	one := func(n dlm.NodeID, lvb []byte) Answer { return Answer{Node: n, Tried: 1, LVB: [2][]byte{lvb}} }
	two := func(n dlm.NodeID, a, b []byte) Answer { return Answer{Node: n, Tried: 2, LVB: [2][]byte{a, b}} }
	zero := make([]byte, LVBSize)
	timeout := fmt.Errorf("lock: %w", dlm.ErrTimeout)
	for _, c := range []struct {
		name string
		a    Answer
		want Outcome
		is   error
	}{
		{"acted", one(2, reply(11, 2, StatusActed, "")), Acted, nil},
		{"acted on the other lock", two(2, reply(9, 2, StatusActed, ""), reply(11, 2, StatusActed, "")), Acted, nil},
		{"failed", one(2, reply(11, 2, StatusFailed, "x")), Failed, ErrReceiverFailed},
		{"unknown", one(2, reply(11, 2, StatusUnknownType, "")), Failed, ErrUnknownType},
		{"receive timeout", one(2, reply(11, 2, StatusTimeout, "")), Failed, ErrReceiveTimeout},
		{"future status", one(2, reply(11, 2, Status(99), "")), Failed, ErrReceiverFailed},
		{"no answer", Answer{Node: 2, Err: timeout}, Unanswered, dlm.ErrTimeout},
		{"lock error", Answer{Node: 2, Err: dlm.ErrReleased}, Failed, dlm.ErrReleased},
		{"joined, both purged", Answer{Node: 2, Tried: 2, Invalid: [2]bool{true, false}, LVB: [2][]byte{reply(10, 2, StatusActed, ""), reply(9, 2, StatusActed, "")}}, Departed, nil},
		{"left", two(2, reply(9, 2, StatusActed, ""), reply(10, 2, StatusLeft, "")), NotJoined, nil},
		{"never joined", Answer{Node: 3, Tried: 2, Invalid: [2]bool{true, true}, LVB: [2][]byte{zero, zero}}, NotJoined, nil},
		{"never written", two(3, zero, zero), NotJoined, nil},
		{"wrong signer", two(2, reply(11, 3, StatusActed, ""), zero), Failed, ErrMalformed},
		{"garbage", two(2, append([]byte{1}, make([]byte, LVBSize-1)...), zero), Failed, ErrMalformed},
	} {
		o, err := m.Classify(11, c.a)
		if o != c.want || (c.is == nil) != (err == nil) || (c.is != nil && !errors.Is(err, c.is)) {
			t.Errorf("%s: %v %v", c.name, o, err)
		}
	}
	// Recovery's word counts as joined: a purged node it reported is
	// departed even if the token did not list it.
	m.Departed([]dlm.NodeID{3})
	if o, _ := m.Classify(11, Answer{Node: 3, Tried: 2, Invalid: [2]bool{true, true}}); o != Departed {
		t.Fatalf("departed per recovery: %v", o)
	}
	if !Matches(11, 2, reply(11, 2, StatusFailed, "")) || Matches(11, 2, reply(10, 2, StatusActed, "")) || Matches(11, 2, reply(11, 3, StatusActed, "")) {
		t.Fatal("Matches")
	}
}

// TestMachineSentUpdatesToken: after a broadcast the token lists the nodes
// that answered as joined, drops the ones found gone, and remembers the
// unanswered as laggards of that broadcast.
func TestMachineSentUpdatesToken(t *testing.T) {
	m := joined(t, 1, 0)
	m.ViewDone(2, []dlm.NodeID{1, 2, 3, 4, 5})
	if got := m.Receivers(); !slices.Equal(got, []dlm.NodeID{2, 3, 4, 5}) {
		t.Fatalf("receivers %v", got)
	}
	e := m.Publish(make([]byte, LVBSize), Message{})
	ok := func(n dlm.NodeID) Answer {
		return Answer{Node: n, Tried: 1, LVB: [2][]byte{Reply{Seq: e.Seq, Node: n}.Encode(LVBSize)}}
	}
	res := m.Sent(e.Seq, []Answer{
		ok(2),
		{Node: 3, Tried: 2, Invalid: [2]bool{true, true}},
		{Node: 4, Err: dlm.ErrTimeout},
		{Node: 5, Tried: 2, Invalid: [2]bool{true, true}},
	})
	if !slices.Equal(res.Acted, []dlm.NodeID{2}) || !slices.Equal(res.Departed, []dlm.NodeID{3}) ||
		!slices.Equal(res.Unanswered, []dlm.NodeID{4}) || !slices.Equal(res.NotJoined, []dlm.NodeID{5}) {
		t.Fatalf("%+v", res)
	}
	ts := m.TokenState()
	if !slices.Equal(ts.Joined, []dlm.NodeID{1, 2, 4}) || !slices.Equal(ts.Laggards, []dlm.NodeID{4}) || ts.LastSeq != e.Seq {
		t.Fatalf("token %+v", ts)
	}
	if seq, lag := m.Laggards(); seq != e.Seq || !slices.Equal(lag, []dlm.NodeID{4}) {
		t.Fatalf("laggards %d %v", seq, lag)
	}
}

// TestMachineReceiversWithoutView: before any view is known the joined
// list alone names the receivers; the view adds the nodes not joined.
func TestMachineReceiversWithoutView(t *testing.T) {
	m, _ := NewMachine(2)
	m.TokenGranted(TokenState{Joined: []dlm.NodeID{1, 2, 7}}.Encode(LVBSize), false)
	if got := m.Receivers(); !slices.Equal(got, []dlm.NodeID{1, 7}) {
		t.Fatalf("%v", got)
	}
	m.ViewDone(3, []dlm.NodeID{2, 4})
	if got := m.Receivers(); !slices.Equal(got, []dlm.NodeID{1, 4, 7}) {
		t.Fatalf("%v", got)
	}
}

// TestMachineUnfinished: a token whose holder died (VALNOTVALID), or that
// says a holder did not finish, makes the next send finish the broadcast
// in the message lock first: re-published as it is; this node acts on it
// if it had not. A joiner that finds it so passes the flag on.
func TestMachineUnfinished(t *testing.T) {
	m := joined(t, 2, 5)
	m.TokenGranted(TokenState{LastSeq: 6, Joined: []dlm.NodeID{1, 2, 3}}.Encode(LVBSize), true)
	if !m.NeedsFinish() {
		t.Fatal("an invalid token does not ask for a finish")
	}
	e, act, ok := m.Finish(env(6, 1, Remove))
	if !ok || !act || e.Seq != 6 || m.Seen() != 6 {
		t.Fatalf("finish: %+v %v %v seen %d", e, act, ok, m.Seen())
	}
	m.Finished()
	if m.NeedsFinish() {
		t.Fatal("still unfinished")
	}
	// Its own broadcast, or nothing decodable: nothing to finish.
	m.TokenGranted(nil, true)
	if _, _, ok := m.Finish(env(7, 2, Remove)); ok || m.NeedsFinish() {
		t.Fatal("finished its own broadcast")
	}
	m.TokenGranted(nil, true)
	if _, _, ok := m.Finish(make([]byte, LVBSize)); ok || m.NeedsFinish() {
		t.Fatal("finished an empty value")
	}
	// A value finished again after everyone saw it: nobody acts.
	m.TokenGranted(nil, true)
	if _, act, ok := m.Finish(env(6, 1, Remove)); !ok || act {
		t.Fatalf("refinish: %v %v", act, ok)
	}
	// The flag travels through the token's value.
	j, _ := NewMachine(3)
	j.TokenGranted(make([]byte, LVBSize), true)
	j.Joined(env(6, 1, Remove), false)
	v := j.TokenValue(LVBSize)
	if s, err := DecodeTokenState(v); err != nil || !s.Unfinished || !slices.Equal(s.Joined, []dlm.NodeID{3}) {
		t.Fatalf("joiner's token: %+v %v", s, err)
	}
	n, _ := NewMachine(1)
	n.TokenGranted(v, false)
	if !n.NeedsFinish() {
		t.Fatal("the flag was lost")
	}
	// A fresh array: nothing to finish.
	f, _ := NewMachine(1)
	f.TokenGranted(make([]byte, LVBSize), false)
	if f.NeedsFinish() {
		t.Fatal("fresh token unfinished")
	}
}

// TestMachineWork: the receive side does one thing at a time: a
// notification on an armed ack lock starts a receive; nothing else starts
// until it ends; before answering on one lock the other must be armed; a
// notification on an answered lock is stale; the token is released from
// here only when no local sender holds it; a node not joined does nothing.
func TestMachineWork(t *testing.T) {
	m, _ := NewMachine(2)
	m.Notify(0)
	if j := m.Work(true); j.Work != WorkNone || m.Pending(true) {
		t.Fatalf("not joined: %+v", j)
	}
	m = joined(t, 2, 0)
	if m.Armed() != [2]bool{true, true} {
		t.Fatalf("armed at join: %v", m.Armed())
	}
	m.Notify(1)
	if !m.Pending(false) {
		t.Fatal("not pending")
	}
	j := m.Work(false)
	if j.Work != WorkReceive || !j.Notified || j.Lock != 1 {
		t.Fatalf("%+v", j)
	}
	if other, need := m.NeedArm(1); other != 0 || need {
		t.Fatalf("need arm %d %v", other, need)
	}
	m.Notify(0) // a second notification while busy waits its turn
	if j := m.Work(false); j.Work != WorkNone || m.Pending(false) {
		t.Fatalf("busy: %+v", j)
	}
	if err := m.CanLeave(); !errors.Is(err, ErrBusy) {
		t.Fatalf("leave while busy: %v", err)
	}
	m.Replied(1)
	if m.Armed() != [2]bool{true, false} || m.Busy() {
		t.Fatalf("after the reply: armed %v busy %v", m.Armed(), m.Busy())
	}
	j = m.Work(false)
	if j.Work != WorkReceive || j.Lock != 0 {
		t.Fatalf("second notification: %+v", j)
	}
	if other, need := m.NeedArm(0); other != 1 || !need {
		t.Fatalf("lock 1 must be armed before answering on 0: %d %v", other, need)
	}
	m.Retry(j) // the arm timed out: owed again
	if j2 := m.Work(false); j2 != j {
		t.Fatalf("retry: %+v", j2)
	}
	m.Rearmed(1)
	m.Replied(0)
	if m.Armed() != [2]bool{false, true} {
		t.Fatalf("armed %v", m.Armed())
	}
	m.Notify(0) // stale: lock 0 is answered, it blocks nobody
	if j := m.Work(false); j.Work != WorkNone {
		t.Fatalf("stale notification: %+v", j)
	}
	m.TokenGranted(make([]byte, LVBSize), false)
	m.TokenBlocked()
	if j := m.Work(false); j.Work != WorkNone || m.Pending(false) {
		t.Fatalf("token held by a local sender: %+v", j)
	}
	if j := m.Work(true); j.Work != WorkReleaseToken {
		t.Fatalf("token wanted: %+v", j)
	}
	m.TokenReleased()
	if m.TokenWanted() || m.Pending(true) {
		t.Fatal("still wanted")
	}
	// A blocking callback that overtakes the grant's report is kept.
	m.TokenBlocked()
	m.TokenGranted(make([]byte, LVBSize), false)
	if !m.TokenWanted() {
		t.Fatal("early blocking callback lost")
	}
	// Recovery asks for a catch-up read.
	m.TokenReleased()
	m.ViewDone(9, []dlm.NodeID{2, 3})
	if j := m.Work(false); j.Work != WorkReceive || j.Notified {
		t.Fatalf("catch-up: %+v", j)
	}
	m.Done()
	if err := m.CanLeave(); err != nil {
		t.Fatal(err)
	}
	m.Left()
	if m.Phase() != Unjoined || slices.Contains(m.TokenState().Joined, 2) || m.LeaveReply().Status != StatusLeft {
		t.Fatalf("left: %v %+v", m.Phase(), m.TokenState())
	}
}

// TestMachineToggleAlternates: each broadcast asks first the ack lock the
// one before it did not; a finish re-publishes with the same toggle.
func TestMachineToggleAlternates(t *testing.T) {
	m := joined(t, 1, 0)
	lvb := make([]byte, LVBSize)
	var last uint8 = 9
	for range 4 {
		e := m.Publish(lvb, Message{})
		if e.Toggle == last {
			t.Fatalf("toggle %d twice in a row", e.Toggle)
		}
		last = e.Toggle
		lvb = e.Encode(LVBSize)
	}
	n := joined(t, 2, 0)
	n.TokenGranted(nil, true)
	e, _, ok := n.Finish(Envelope{Msg: Message{Slot: 2}, Seq: 50, Sender: 3, Toggle: 1}.Encode(LVBSize))
	if !ok || e.Toggle != 1 {
		t.Fatalf("finish: %+v %v", e, ok)
	}
}
