// Package broadcast is md-cluster's synchronous broadcast-and-acknowledge
// for the configuration changes of a clustered array: every change reaches
// every joined node and is acted on there before the sender's call returns,
// and the sender learns each receiver's outcome.
//
// It runs over three kinds of locks in the array's lockspace: "token"
// serialises senders and joins, "message" carries the message in its lock
// value block, and one "ack%04d" lock per node is held in EX by that node
// while it is joined. A sender publishes the message, then asks for every
// other node's ack lock in CR: each request blocks on the receiver's EX,
// which is the receiver's notification; the receiver acts, writes its reply
// into its ack lock's value block and drops to NL, which grants the
// sender's request and hands it the reply. docs/broadcast.md has the
// protocol, the lock modes of every step and why each ordering is safe.
//
// The decisions (sequence numbers, what a value block or reply means, who
// must be asked, what a recovery changes) live in Machine, a pure state
// machine with no I/O, no goroutines and no clock; Broadcaster carries
// them out over a dlm.Locker, so the same code runs over the real lock
// manager and over the simulator's adapter.
package broadcast

import (
	"errors"
	"fmt"
	"slices"

	"github.com/mdcluster/mdcluster/dlm"
)

// Phase is where this node is in the array's broadcast membership.
type Phase uint8

const (
	// Unjoined: the node does not hold its ack lock; senders find it not
	// joined and it neither sends nor receives.
	Unjoined Phase = iota
	// Joined: the node holds its ack lock in EX and receives every
	// broadcast; it may send.
	Joined
	// Lost: the node's locks are gone (its lockspace was released or it
	// rejoined the cluster clean); it must Join again.
	Lost
)

func (p Phase) String() string {
	switch p {
	case Unjoined:
		return "not joined"
	case Joined:
		return "joined"
	case Lost:
		return "lost"
	}
	return fmt.Sprintf("phase(%d)", uint8(p))
}

// recvState is where the receive side is in one receive cycle.
type recvState uint8

const (
	recvIdle  recvState = iota // holding the ack lock in EX, message in NL
	recvBusy                   // reading, acting or replying: message held in CR
	recvRearm                  // replied (ack in NL); re-taking ack EX is owed, message still in CR
)

// Work is the next thing the receive side must do, as Machine.Work decides.
type Work uint8

const (
	// WorkNone: nothing to do.
	WorkNone Work = iota
	// WorkReleaseToken: another node wants the token this node keeps
	// cached in EX.
	WorkReleaseToken
	// WorkReceive: read the message lock and act on what it holds: a
	// sender is waiting for this node's reply (Notified), or a recovery
	// happened and a broadcast whose sender departed may not have reached
	// this node (catch-up).
	WorkReceive
	// WorkRearm: the reply is written; re-take the ack lock in EX, then
	// release the message lock.
	WorkRearm
)

func (w Work) String() string {
	return [...]string{"none", "release token", "receive", "re-arm"}[w]
}

// Machine makes the broadcast's decisions for one node of one array. It
// does no I/O: the driver reports what the lock manager granted and what
// the value blocks held, and asks what to do or answer. Not safe for
// concurrent use; the driver serialises it.
type Machine struct {
	self  dlm.NodeID
	phase Phase

	// The view, from recovery events; nil until the first one.
	members []dlm.NodeID
	gen     uint64
	// departed holds the nodes recovery reported departed and not seen
	// back in a view since: a sender finding their ack lock free reports
	// them departed rather than not joined.
	departed nodeSet

	// seen is the highest broadcast sequence this node has seen: sent,
	// acted on, or read at join. memo is the reply it gave to seen, given
	// again to a repeated notification for it.
	seen uint64
	memo Reply

	gaps uint64 // times a received sequence number skipped some

	notified bool // a sender's CR request blocked on our ack lock
	catchUp  bool // a recovery happened since the last read
	recv     recvState

	// The token's value as of the last grant, kept up to date while this
	// node holds the token. tokenHeld: granted in EX (maybe cached).
	tokenHeld   bool
	tokenWanted bool
	token       tokenValue
	// unfinished: the token's previous holder died holding it (or a holder
	// found it so and did not finish), so the broadcast in the message
	// lock may have reached only some receivers. The next send finishes it.
	unfinished bool
}

// NewMachine returns the machine of node self.
func NewMachine(self dlm.NodeID) (*Machine, error) {
	if self == 0 || self > MaxNode {
		return nil, fmt.Errorf("broadcast: node ID %d outside 1..%d", self, MaxNode)
	}
	return &Machine{self: self}, nil
}

// Self returns this node's ID.
func (m *Machine) Self() dlm.NodeID { return m.self }

// Phase returns where this node is.
func (m *Machine) Phase() Phase { return m.phase }

// Seen returns the highest broadcast sequence this node has seen.
func (m *Machine) Seen() uint64 { return m.seen }

// Gaps counts the times a broadcast's sequence number was not the one
// after the last this node had seen: broadcasts it never got (see
// Result.Unanswered), or numbers lost to a sender's failure.
func (m *Machine) Gaps() uint64 { return m.gaps }

// Members returns the current view (nil before the first recovery event).
func (m *Machine) Members() []dlm.NodeID { return slices.Clone(m.members) }

// --- recovery events ---

// Departed records nodes that recovery reports departed (dead and fenced,
// their locks purged).
func (m *Machine) Departed(nodes []dlm.NodeID) {
	for _, n := range nodes {
		if n != m.self {
			m.departed.add(n)
		}
	}
}

// ViewDone records the view a recovery ended in. A node back in the view is
// no longer counted departed. A joined node then checks whether the
// message lock holds a broadcast it never saw from a sender that departed
// (catch-up), since that sender can no longer tell it.
func (m *Machine) ViewDone(gen uint64, members []dlm.NodeID) {
	m.gen = gen
	m.members = slices.Clone(members)
	slices.Sort(m.members)
	for _, n := range m.members {
		m.departed.del(n)
	}
	if m.phase == Joined {
		m.catchUp = true
	}
}

// alive reports whether n is believed alive: in the view, or the view is
// not known yet.
func (m *Machine) alive(n dlm.NodeID) bool {
	if m.departed.has(n) {
		return false
	}
	return m.members == nil || slices.Contains(m.members, n)
}

// --- the token ---

// TokenGranted: this node now holds the token in EX. lvb is the value the
// grant read; invalid says the lock manager flagged it VALNOTVALID (the
// previous holder died holding it in EX, or it was never written).
//
// A blocking callback that came before this call (the callback goroutine
// can overtake the granted caller) is kept: the token is released after
// this holder's transaction.
func (m *Machine) TokenGranted(lvb []byte, invalid bool) {
	m.tokenHeld = true
	t, err := decodeToken(lvb)
	switch {
	case invalid:
		// Keep whatever the stale value says about joined nodes (a superset
		// is harmless: a node asked but not joined answers "not joined").
		// The last holder died with the token, possibly mid-broadcast.
		if err != nil {
			t = tokenValue{}
		}
		t.laggards = nodeSet{}
		m.unfinished = true
	case errors.Is(err, ErrEmpty):
		t = tokenValue{} // the array's first holder
	case err != nil:
		// Written by someone this version cannot read: trust nothing in it,
		// and finish whatever may be in flight.
		t = tokenValue{}
		m.unfinished = true
	default:
		m.unfinished = m.unfinished || t.unfinished
	}
	m.token = t
	m.seen = max(m.seen, t.last)
}

// TokenBlocked: another node's request is blocked by our token (its
// blocking callback). It is recorded even if the grant has not been
// reported yet (see TokenGranted); TokenReleased forgets it.
func (m *Machine) TokenBlocked() {
	m.tokenWanted = true
}

// TokenWanted reports whether another node waits for the token this node
// holds.
func (m *Machine) TokenWanted() bool { return m.tokenHeld && m.tokenWanted }

// TokenHeld reports whether this node holds the token in EX.
func (m *Machine) TokenHeld() bool { return m.tokenHeld }

// TokenValue returns the value to write when this node releases the token.
func (m *Machine) TokenValue(n int) []byte {
	t := m.token
	t.unfinished = m.unfinished
	return t.encode(n)
}

// TokenState returns what this node knows of the token's value.
func (m *Machine) TokenState() TokenState { return m.token.state() }

// TokenReleased: the token went back to NL with TokenValue written.
func (m *Machine) TokenReleased() {
	m.tokenHeld, m.tokenWanted = false, false
	m.unfinished = false
}

// TokenLost: the token lock is gone or its state unknown (a failed
// conversion that may or may not have happened counts as released: the
// next grant reads the value again).
func (m *Machine) TokenLost() { m.TokenReleased() }

// --- joining and leaving ---

// Joined: holding the token, this node took its ack lock in EX and read
// the message lock (lvb, invalid). Whatever broadcast the message lock
// holds was sent before this node joined: it is counted seen, so it is
// never acted on here (the joining node loads the array state after it
// instead).
func (m *Machine) Joined(lvb []byte, invalid bool) {
	if s, ok := rawSeq(lvb); ok {
		m.seen = max(m.seen, s)
	}
	m.phase = Joined
	m.recv, m.notified, m.catchUp = recvIdle, false, false
	m.memo = Reply{Seq: m.seen, Node: m.self, Status: StatusActed}
	m.token.joined.add(m.self)
	m.departed.del(m.self)
}

// rawSeq reads the sequence number of a message value block even when it
// does not decode (or was flagged invalid), as a floor for the next one.
func rawSeq(lvb []byte) (uint64, bool) {
	if len(lvb) < LVBSize {
		return 0, false
	}
	return uint64(lvb[48]) | uint64(lvb[49])<<8 | uint64(lvb[50])<<16 | uint64(lvb[51])<<24 |
		uint64(lvb[52])<<32 | uint64(lvb[53])<<40 | uint64(lvb[54])<<48 | uint64(lvb[55])<<56, true
}

// ErrBusy: the operation cannot run while a receive is in progress (a
// handler still acting, or the ack lock still being re-taken).
var ErrBusy = errors.New("broadcast: a receive is in progress")

// CanLeave reports whether this node may leave now: holding the token, no
// broadcast is in flight, but a receive of an earlier one may still be
// running (a handler that overran its sender's patience).
func (m *Machine) CanLeave() error {
	if m.recv != recvIdle {
		return fmt.Errorf("%w (node %d, receive state %d)", ErrBusy, m.self, m.recv)
	}
	return nil
}

// LeaveReply is what this node writes into its ack lock when it leaves, so
// that a sender finding the lock free learns that it left.
func (m *Machine) LeaveReply() Reply {
	return Reply{Seq: m.seen, Node: m.self, Status: StatusLeft}
}

// Left: this node released its ack and message locks; it is no longer
// joined. The token value to write on release no longer lists it.
func (m *Machine) Left() {
	m.phase = Unjoined
	m.token.joined.del(m.self)
	m.notified, m.catchUp, m.recv = false, false, recvIdle
}

// Lost: this node's locks are gone without a Leave.
func (m *Machine) Lost() {
	m.phase = Lost
	m.notified, m.catchUp, m.recv = false, false, recvIdle
	m.tokenHeld, m.tokenWanted = false, false
}

// --- sending ---

// NeedsFinish reports whether the broadcast in the message lock must be
// finished before this node sends: the token's last holder died with it.
func (m *Machine) NeedsFinish() bool { return m.unfinished }

// Finish decides, given the message lock's value (read with EX), whether
// there is a broadcast to finish: a valid message from another node. It is
// re-published as it is, same sequence number, to every receiver; those
// that acted on it answer from memory, the others act now. act says this
// node has not seen it either and must act on it itself first.
func (m *Machine) Finish(lvb []byte, invalid bool) (e Envelope, act, ok bool) {
	if invalid {
		// A value nobody can vouch for was never acted on by anyone: its
		// sender died before publishing it (PW/EX holders invalidate on
		// death), or it is stale. Nothing to finish.
		m.unfinished = false
		return Envelope{}, false, false
	}
	e, err := DecodeEnvelope(lvb)
	if err != nil || e.Sender == m.self {
		m.unfinished = false
		return Envelope{}, false, false
	}
	if e.Seq <= m.seen {
		return e, false, true
	}
	m.seen = e.Seq
	if !e.Msg.Type.Known() {
		m.memo = Reply{Seq: e.Seq, Node: m.self, Status: StatusUnknownType, Text: e.Msg.Type.String()}
		return e, false, true
	}
	m.memo = Reply{Seq: e.Seq, Node: m.self, Status: StatusFailed, Text: "handler did not finish"}
	return e, true, true
}

// Finished: the unfinished broadcast was re-published and answered.
func (m *Machine) Finished() { m.unfinished = false }

// Publish returns the envelope for msg, given the message lock's value
// (read with EX): the next sequence number is above every one this node
// knows of (the message lock's, the token's, its own), so no receiver can
// take it for one it has seen. This node counts it seen: it never acts on
// its own broadcast.
func (m *Machine) Publish(lvb []byte, msg Message) Envelope {
	next := max(m.seen, m.token.last)
	if s, ok := rawSeq(lvb); ok {
		next = max(next, s)
	}
	next++
	msg.Slot = uint32(m.self) - 1
	e := Envelope{Msg: msg, Seq: next, Sender: m.self}
	m.seen = next
	m.memo = Reply{Seq: next, Node: m.self, Status: StatusActed}
	m.token.last = next
	return e
}

// Receivers returns the nodes a broadcast must ask: every other node of
// the view and every node the token lists as joined (the view may lag a
// join by a moment, and may be unknown). Those that are not joined answer
// at once.
func (m *Machine) Receivers() []dlm.NodeID {
	set := m.token.joined
	for _, n := range m.members {
		set.add(n)
	}
	set.del(m.self)
	return set.list()
}

// Answer is one receiver's raw outcome, as the driver observed it: the
// error of its CR request on the receiver's ack lock, or the value block
// and status flags the grant returned.
type Answer struct {
	Node    dlm.NodeID
	Err     error
	LVB     []byte
	Invalid bool
}

// Outcome is what an answer means.
type Outcome uint8

const (
	// Acted: the receiver acted on the broadcast.
	Acted Outcome = iota
	// Failed: the receiver answered with an error (or an unreadable reply).
	Failed
	// Unanswered: no answer within the sender's bound; the receiver was
	// notified and may still act.
	Unanswered
	// NotJoined: the receiver's ack lock was free: it has not joined the
	// array (or left it).
	NotJoined
	// Departed: the receiver was joined but its ack lock is free: it died
	// and recovery purged its locks.
	Departed
)

var outcomeNames = [...]string{"acted", "failed", "unanswered", "not joined", "departed"}

func (o Outcome) String() string {
	if int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

// Classify says what answer a means for broadcast seq, with the error to
// report for Failed and Unanswered.
func (m *Machine) Classify(seq uint64, a Answer) (Outcome, error) {
	if a.Err != nil {
		if errors.Is(a.Err, dlm.ErrTimeout) || errors.Is(a.Err, dlm.ErrCancel) {
			return Unanswered, fmt.Errorf("node %d: no answer to broadcast %d: %w", a.Node, seq, a.Err)
		}
		return Failed, fmt.Errorf("node %d: ack lock %s: %w", a.Node, AckLock(a.Node), a.Err)
	}
	wasJoined := m.token.joined.has(a.Node) || m.departed.has(a.Node)
	gone := func() (Outcome, error) {
		if wasJoined {
			return Departed, nil
		}
		return NotJoined, nil
	}
	if a.Invalid {
		return gone() // its EX holder died, or it was never written
	}
	r, err := DecodeReply(a.LVB)
	switch {
	case errors.Is(err, ErrEmpty):
		return gone()
	case err != nil:
		return Failed, fmt.Errorf("node %d: %w", a.Node, err)
	case r.Node != a.Node:
		return Failed, fmt.Errorf("node %d: %w: reply signed by node %d", a.Node, ErrMalformed, r.Node)
	case r.Seq != seq:
		if r.Status == StatusLeft {
			return NotJoined, nil
		}
		return gone()
	case r.Status == StatusActed:
		return Acted, nil
	}
	return Failed, &RemoteError{Node: a.Node, Seq: seq, Status: r.Status, Text: r.Text}
}

// Result is the outcome of one broadcast.
type Result struct {
	// Seq is the broadcast's sequence number (its place in the array's
	// total order of broadcasts).
	Seq uint64
	// Acted lists the receivers that acted on the message.
	Acted []dlm.NodeID
	// Failed holds each receiver that answered with an error: a
	// *RemoteError matching ErrReceiverFailed, ErrUnknownType,
	// ErrReceiveTimeout or ErrMalformed, or a lock error.
	Failed map[dlm.NodeID]error
	// Unanswered lists the receivers that did not answer within the
	// sender's bound. They were notified and may still act (before any
	// later broadcast, never after one).
	Unanswered []dlm.NodeID
	// NotJoined lists the nodes asked that have not joined the array (or
	// left it): nothing was delivered to them.
	NotJoined []dlm.NodeID
	// Departed lists the receivers that died (recovery purged their locks)
	// before answering.
	Departed []dlm.NodeID
}

// Err joins the receivers' errors in node order (nil when every joined
// receiver acted).
func (r Result) Err() error {
	var errs []error
	for _, n := range slices.Sorted(mapsKeys(r.Failed)) {
		errs = append(errs, r.Failed[n])
	}
	return errors.Join(errs...)
}

func mapsKeys(m map[dlm.NodeID]error) func(func(dlm.NodeID) bool) {
	return func(yield func(dlm.NodeID) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// Sent records the answers to broadcast seq and returns its Result. The
// token's value follows: answering nodes are joined, nodes found not
// joined or departed are not, and the unanswered are the laggards of seq.
func (m *Machine) Sent(seq uint64, answers []Answer) Result {
	res := Result{Seq: seq}
	var lag nodeSet
	for _, a := range answers {
		o, err := m.Classify(seq, a)
		switch o {
		case Acted:
			res.Acted = append(res.Acted, a.Node)
			m.token.joined.add(a.Node)
		case Failed:
			if res.Failed == nil {
				res.Failed = map[dlm.NodeID]error{}
			}
			res.Failed[a.Node] = err
			if a.Err == nil {
				m.token.joined.add(a.Node) // it answered: it holds its ack lock
			}
		case Unanswered:
			res.Unanswered = append(res.Unanswered, a.Node)
			lag.add(a.Node)
			m.token.joined.add(a.Node)
		case NotJoined:
			res.NotJoined = append(res.NotJoined, a.Node)
			m.token.joined.del(a.Node)
		case Departed:
			res.Departed = append(res.Departed, a.Node)
			m.token.joined.del(a.Node)
		}
	}
	for _, l := range []*[]dlm.NodeID{&res.Acted, &res.Unanswered, &res.NotJoined, &res.Departed} {
		slices.Sort(*l)
	}
	m.token.last = max(m.token.last, seq)
	m.token.laggards = lag
	return res
}

// Laggards returns the nodes that had not answered the last broadcast the
// token knows of when its sender stopped waiting: the likely holders of
// the message lock when a send cannot take it.
func (m *Machine) Laggards() (seq uint64, nodes []dlm.NodeID) {
	return m.token.last, m.token.laggards.list()
}

// --- receiving ---

// Notify: a sender's request is blocked on our ack lock (its blocking
// callback). A receive is owed.
func (m *Machine) Notify() { m.notified = true }

// Pending reports whether Work(tokenFree) would return something to do.
func (m *Machine) Pending(tokenFree bool) bool {
	if tokenFree && m.TokenWanted() {
		return true
	}
	if m.phase != Joined {
		return false
	}
	return m.recv == recvRearm || (m.recv == recvIdle && (m.notified || m.catchUp))
}

// Work returns the next thing the receive side must do and marks it
// started. notified (for WorkReceive) says a sender waits for a reply.
// tokenFree says no local sender holds the token now (only then may it be
// released from here).
func (m *Machine) Work(tokenFree bool) (w Work, notified bool) {
	if tokenFree && m.TokenWanted() {
		return WorkReleaseToken, false
	}
	if m.phase != Joined {
		m.notified, m.catchUp = false, false
		return WorkNone, false
	}
	switch {
	case m.recv == recvRearm:
		return WorkRearm, false
	case m.recv == recvIdle && (m.notified || m.catchUp):
		notified = m.notified
		m.notified, m.catchUp = false, false
		m.recv = recvBusy
		return WorkReceive, notified
	}
	return WorkNone, false
}

// Decision is what to do with what the message lock holds.
type Decision struct {
	// Act: call the Receiver with Env, then Acted for the reply.
	Act bool
	Env Envelope
	// Reply, when Act is false and NoReply is false, is the answer to
	// write at once.
	Reply Reply
	// NoReply: nothing to answer (a catch-up that found nothing owed):
	// release the message lock and stop.
	NoReply bool
}

// Incoming decides what to do with the message lock's value (read in CR).
// notified says a sender waits for our reply; otherwise this is a
// catch-up after a recovery, which acts only on a broadcast whose sender
// departed (a live sender notifies us itself, or gave up on us).
func (m *Machine) Incoming(lvb []byte, invalid, notified bool) Decision {
	noReply := Decision{NoReply: true}
	if invalid {
		if !notified {
			return noReply
		}
		s, _ := rawSeq(lvb)
		return Decision{Reply: Reply{Seq: s, Node: m.self, Status: StatusMalformed, Text: "message value block not valid"}}
	}
	e, err := DecodeEnvelope(lvb)
	if err != nil {
		if !notified || errors.Is(err, ErrEmpty) {
			if notified {
				return Decision{Reply: Reply{Node: m.self, Status: StatusStale, Text: "no message"}}
			}
			return noReply
		}
		s, _ := rawSeq(lvb)
		return Decision{Reply: Reply{Seq: s, Node: m.self, Status: StatusMalformed, Text: err.Error()}}
	}
	switch {
	case e.Seq == m.memo.Seq && e.Seq != 0:
		if !notified {
			return noReply
		}
		return Decision{Reply: m.memo}
	case e.Seq <= m.seen:
		if !notified {
			return noReply
		}
		return Decision{Reply: Reply{Seq: e.Seq, Node: m.self, Status: StatusStale, Text: fmt.Sprintf("already at %d", m.seen)}}
	case !notified && m.alive(e.Sender):
		return noReply
	case e.Sender == m.self:
		// Our own broadcast from before we (re)joined cannot be newer than
		// what we read at join; never act on our own messages.
		m.seen = e.Seq
		m.memo = Reply{Seq: e.Seq, Node: m.self, Status: StatusActed}
		if !notified {
			return noReply
		}
		return Decision{Reply: m.memo}
	}
	// New: it counts as seen from now on, whatever the handler does, so a
	// repeated notification is answered from memory and never acted on
	// twice. Sequence numbers are consecutive unless a broadcast was
	// missed (published while this node had not even started reading the
	// one before, after its sender gave up on it) or lost in a failure.
	if e.Seq > m.seen+1 && m.seen != 0 {
		m.gaps++
	}
	m.seen = e.Seq
	if !e.Msg.Type.Known() {
		m.memo = Reply{Seq: e.Seq, Node: m.self, Status: StatusUnknownType, Text: e.Msg.Type.String()}
		if !notified {
			return noReply
		}
		return Decision{Reply: m.memo}
	}
	m.memo = Reply{Seq: e.Seq, Node: m.self, Status: StatusFailed, Text: "handler did not finish"}
	return Decision{Act: true, Env: e}
}

// Acted records the handler's outcome for e and returns the reply to
// write. overran says its context's deadline passed (ReceiveTimeout).
func (m *Machine) Acted(e Envelope, err error, overran bool) Reply {
	r := Reply{Seq: e.Seq, Node: m.self, Status: StatusActed}
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownType):
		r.Status, r.Text = StatusUnknownType, err.Error()
	case overran:
		r.Status, r.Text = StatusTimeout, err.Error()
	default:
		r.Status, r.Text = StatusFailed, err.Error()
	}
	r.Text = clip(r.Text, MaxReplyText)
	if e.Seq == m.seen {
		m.memo = r
	}
	return r
}

// Replied: the reply is written and the ack lock is in NL; re-taking it in
// EX is owed.
func (m *Machine) Replied() { m.recv = recvRearm }

// Rearmed: the ack lock is back in EX and the message lock in NL: ready
// for the next broadcast.
func (m *Machine) Rearmed() { m.recv = recvIdle }

// ReadFailed: the message lock could not be read; a notified receive is
// owed again.
func (m *Machine) ReadFailed(notified bool) {
	m.recv = recvIdle
	m.notified = m.notified || notified
}

// Released: a receive that needed no reply is over (message lock in NL).
func (m *Machine) Released() { m.recv = recvIdle }
