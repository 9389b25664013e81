// Package broadcast is md-cluster's synchronous broadcast-and-acknowledge
// for the configuration changes of a clustered array: every change reaches
// every joined node and is acted on there before the sender's call returns,
// and the sender learns each receiver's outcome.
//
// It runs over three kinds of locks in the array's lockspace: "token"
// serialises senders and joins, "message" carries the message in its lock
// value block, and each node has two ack locks ("ack%04d.0", "ack%04d.1")
// which it holds in EX while it is joined and idle. A sender publishes the
// message, then asks one ack lock of every other node in CR: each request
// blocks on the receiver's EX, which is the receiver's notification; the
// receiver reads the message, makes sure its other ack lock is in EX (the
// one the next broadcast asks), acts, writes its reply into the asked
// lock's value block and drops it to NL, which grants the sender's request
// and hands it the reply.
//
// That is the fallback. The fast path is each node's mailbox lock
// ("mbox%04d"): the token holder keeps it in EX while the node keeps an EX
// request queued behind it; a send writes the message into it as it
// converts EX -> NL, which grants the receiver's request (notification and
// message in one grant), and converts back to EX, which the receiver's
// reply grants: one round trip instead of two. A copy lock per node
// ("seen%04d") keeps what came through the mailbox recoverable when its
// sender dies. docs/broadcast.md has the protocol, the lock modes of every
// step and why each ordering is safe.
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
	// Unjoined: the node holds no ack lock; senders find it not joined
	// and it neither sends nor receives.
	Unjoined Phase = iota
	// Joined: the node holds at least one of its ack locks in EX and
	// receives every broadcast; it may send.
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

// Work is the next thing the receive side must do, as Machine.Work decides.
type Work uint8

const (
	// WorkNone: nothing to do.
	WorkNone Work = iota
	// WorkReleaseToken: another node wants the token this node keeps
	// cached in EX.
	WorkReleaseToken
	// WorkReceive: read the message lock and act on what it holds: a
	// sender waits on one of our ack locks (Job.Notified, Job.Lock), or a
	// recovery happened and a broadcast whose sender departed may not have
	// reached this node (catch-up).
	WorkReceive
	// WorkListen: queue a listener (a new EX request) on this node's
	// mailbox, behind the sender that holds it.
	WorkListen
	// WorkReleaseMailbox: a listener granted with nothing to answer is kept
	// until a request blocks behind it; one does now. Queue the next
	// listener, then release the kept one without touching its value.
	WorkReleaseMailbox
)

func (w Work) String() string {
	return [...]string{"none", "release token", "receive", "listen", "release mailbox"}[w]
}

// Job is one piece of receive-side work.
type Job struct {
	Work Work
	// Notified: a sender waits on ack lock Lock (0 or 1) for our answer.
	// Otherwise a WorkReceive is a catch-up and answers nobody.
	Notified bool
	Lock     uint8
	// Mailbox: the sender waits on this node's mailbox, whose granted
	// listener holds the broadcast (Notified is set, Lock unused).
	Mailbox bool
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

	// The receive side. armed says which of our two ack locks we hold in
	// EX (the others are in NL, answered); notified which ones blocked a
	// sender since. busy: a receive is under way (between Work and
	// Replied or Done).
	armed    [2]bool
	notified [2]bool
	catchUp  bool // a recovery happened since the last read
	busy     bool
	box      mailbox

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

// mailbox is the receive side's state of this node's mailbox lock.
type mailbox struct {
	// on: the driver can queue a listener without waiting (an asynchronous
	// request); otherwise this node has no mailbox and senders fall back to
	// its ack locks.
	on bool
	// listening: a listener is queued; owed: listeners granted and not yet
	// handled; held: one was granted with nothing to answer and is kept
	// (its value untouched) until a request blocks behind it (heldBlocked).
	listening, held, heldBlocked bool
	owed                         int
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
	// t.last is only a floor for the next sequence number (Publish): it
	// says what was sent, not what this node saw, so seen stays.
	m.token = t
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

// Joined: holding the token, this node took both its ack locks in EX and read
// the message lock (lvb, invalid). Whatever broadcast the message lock
// holds was sent before this node joined: it is counted seen, so it is
// never acted on here (the joining node loads the array state after it
// instead).
func (m *Machine) Joined(lvb []byte, invalid bool) {
	// The joiner holds the token, so no broadcast is in flight and the
	// value read is the cluster's current numbering. It replaces what this
	// machine saw before it left: when every node let go of the broadcast
	// locks meanwhile, the value blocks were dropped and numbering started
	// again at 1, and keeping the old, higher number would answer every new
	// broadcast "stale" (found by the simulator, seed 1372).
	if s, ok := rawSeq(lvb); ok {
		m.seen = s
	}
	m.phase = Joined
	m.armed, m.notified, m.catchUp, m.busy = [2]bool{true, true}, [2]bool{}, false, false
	m.box = mailbox{on: m.box.on}
	m.memo = Reply{Seq: m.seen, Node: m.self, Status: StatusActed}
	m.token.joined.add(m.self)
	m.departed.del(m.self)
}

// TokenValueAfterJoin returns the token's value as it will be once this
// node has joined (listed as joined), for the joiner to write as it
// releases the token; Joined records the join itself afterwards.
func (m *Machine) TokenValueAfterJoin(n int) []byte {
	t := m.token
	t.joined.add(m.self)
	t.unfinished = m.unfinished
	return t.encode(n)
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
// handler still acting on an earlier broadcast).
var ErrBusy = errors.New("broadcast: a receive is in progress")

// CanLeave reports whether this node may leave now: holding the token, no
// broadcast is in flight, but a receive of an earlier one may still be
// running (a handler that outlived its sender's patience).
func (m *Machine) CanLeave() error {
	if m.busy {
		return fmt.Errorf("%w (node %d)", ErrBusy, m.self)
	}
	return nil
}

// Armed reports which of this node's ack locks it holds in EX.
func (m *Machine) Armed() [2]bool { return m.armed }

// LeaveReply is what this node writes into its ack locks when it leaves,
// so that a sender finding them free learns that it left.
func (m *Machine) LeaveReply() Reply {
	return Reply{Seq: m.seen, Node: m.self, Status: StatusLeft}
}

// Left: this node is about to release its ack and message locks; it is
// no longer joined (the receive side starts nothing more). The token value to write on release no longer lists it.
func (m *Machine) Left() {
	m.phase = Unjoined
	m.token.joined.del(m.self)
	m.armed, m.notified, m.catchUp, m.busy = [2]bool{}, [2]bool{}, false, false
	m.box = mailbox{on: m.box.on}
}

// Lost: this node's locks are gone without a Leave.
func (m *Machine) Lost() {
	m.phase = Lost
	m.armed, m.notified, m.catchUp, m.busy = [2]bool{}, [2]bool{}, false, false
	m.box = mailbox{on: m.box.on}
	m.tokenHeld, m.tokenWanted = false, false
}

// --- sending ---

// NeedsFinish reports whether the broadcast in the message lock must be
// finished before this node sends: the token's last holder died with it.
func (m *Machine) NeedsFinish() bool { return m.unfinished }

// Finish decides, given the message lock's value (read with EX), whether
// there is a broadcast to finish: a message from another node. It is
// re-published as it is, same sequence number, to every receiver; those
// that acted on it answer from memory, the others act now. act says this
// node has not seen it either and must act on it itself first.
//
// The value is used even when the lock manager flags it VALNOTVALID (see
// Incoming for why that is safe).
func (m *Machine) Finish(lvb []byte) (e Envelope, act, ok bool) {
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
	// Ask first the ack lock the previous broadcast did not: its receivers
	// armed it before they answered that one.
	var toggle uint8 = 1
	if len(lvb) >= LVBSize {
		toggle = lvb[61]&1 ^ 1
	}
	e := Envelope{Msg: msg, Seq: next, Sender: m.self, Toggle: toggle}
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
// error of a CR request on one of the receiver's ack locks, or the value
// blocks and status flags the grants returned. The driver asks the lock
// the broadcast's Toggle names first, and the other one only if the first
// was granted at once with an answer that is not for this broadcast
// (Matches says which).
type Answer struct {
	Node dlm.NodeID
	Err  error
	// Tried counts the ack locks asked (1 or 2); LVB and Invalid hold what
	// each grant returned, in the order asked.
	Tried   int
	LVB     [2][]byte
	Invalid [2]bool
}

// Matches reports whether an ack lock's value block holds node's answer
// to broadcast seq: then asking the receiver's other lock is pointless.
func Matches(seq uint64, node dlm.NodeID, lvb []byte) bool {
	r, err := DecodeReply(lvb)
	return err == nil && r.Seq == seq && r.Node == node
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
		return Failed, fmt.Errorf("node %d: ack lock: %w", a.Node, a.Err)
	}
	var left bool
	var bad error
	for i := range min(a.Tried, 2) {
		if a.Invalid[i] {
			continue // its EX holder died, or it was never written
		}
		r, err := DecodeReply(a.LVB[i])
		switch {
		case errors.Is(err, ErrEmpty):
		case err != nil:
			bad = err
		case r.Node != a.Node:
			bad = fmt.Errorf("%w: reply signed by node %d", ErrMalformed, r.Node)
		case r.Seq == seq && r.Status == StatusActed:
			return Acted, nil
		case r.Seq == seq:
			return Failed, &RemoteError{Node: a.Node, Seq: seq, Status: r.Status, Text: r.Text}
		case r.Status == StatusLeft:
			left = true
		}
	}
	switch {
	case bad != nil:
		return Failed, fmt.Errorf("node %d: %w", a.Node, bad)
	case left:
		return NotJoined, nil
	case m.token.joined.has(a.Node) || m.departed.has(a.Node):
		// Joined, yet neither ack lock held: it died and recovery purged
		// its locks.
		return Departed, nil
	}
	return NotJoined, nil
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
	// sender's bound: the outcome there is unknown. A receiver that had
	// read the message acts on it when its handler gets to it (before any
	// later broadcast); one that had not yet read it when a later
	// broadcast was published reads that one instead and never acts on
	// this one (its Stats count a gap). Either way it never acts on a
	// broadcast after a later one.
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
// token knows of when its sender stopped waiting (named in errors, as the
// likely culprits when the next send cannot make progress).
func (m *Machine) Laggards() (seq uint64, nodes []dlm.NodeID) {
	return m.token.last, m.token.laggards.list()
}

// --- receiving ---

// Notify: a sender's request is blocked on our ack lock number lock (its
// blocking callback). A receive is owed.
func (m *Machine) Notify(lock uint8) { m.notified[lock&1] = true }

// Pending reports whether Work(tokenFree) would return something to do.
func (m *Machine) Pending(tokenFree bool) bool {
	if tokenFree && m.TokenWanted() {
		return true
	}
	if m.phase != Joined || m.busy {
		return false
	}
	b := m.box
	return (m.notified[0] && m.armed[0]) || (m.notified[1] && m.armed[1]) || m.catchUp ||
		(b.held && b.heldBlocked) || (b.owed > 0 && !b.held) || (b.on && !b.listening && b.owed == 0 && !b.held)
}

// Work returns the next thing the receive side must do and marks it
// started. tokenFree says no local sender holds the token now (only then
// may it be released from here).
func (m *Machine) Work(tokenFree bool) Job {
	if tokenFree && m.TokenWanted() {
		return Job{Work: WorkReleaseToken}
	}
	if m.phase != Joined {
		m.notified, m.catchUp = [2]bool{}, false
		return Job{}
	}
	if m.busy {
		return Job{}
	}
	if m.box.held && m.box.heldBlocked {
		m.busy = true
		return Job{Work: WorkReleaseMailbox}
	}
	if m.box.owed > 0 && !m.box.held {
		m.box.owed--
		m.busy = true
		return Job{Work: WorkReceive, Notified: true, Mailbox: true}
	}
	for i := range uint8(2) {
		if !m.notified[i] {
			continue
		}
		m.notified[i] = false
		if !m.armed[i] {
			continue // a stale callback: an answered lock blocks nobody
		}
		m.busy, m.catchUp = true, false
		return Job{Work: WorkReceive, Notified: true, Lock: i}
	}
	if m.catchUp {
		m.busy, m.catchUp = true, false
		return Job{Work: WorkReceive}
	}
	if m.box.on && !m.box.listening && m.box.owed == 0 && !m.box.held {
		m.busy = true
		return Job{Work: WorkListen}
	}
	return Job{}
}

// Decision is what to do with what the message lock holds.
type Decision struct {
	// Act: call the Receiver with Env, then Acted for the reply.
	Act bool
	Env Envelope
	// Reply, when Act is false and NoReply is false, is the answer to
	// write at once.
	Reply Reply
	// NoReply: nothing to answer (a catch-up): the receive is over (Done)
	// once Act, if set, is carried out.
	NoReply bool
}

// Incoming decides what to do with the message lock's value (read in CR).
// notified says a sender waits for our reply; otherwise this is a
// catch-up after a recovery, which acts only on a broadcast whose sender
// departed (a live sender notifies us itself, or gave up on us).
//
// The lock manager's VALNOTVALID flag on the message lock is not a reason
// to drop its value. While a sender holds the lock in CW its value is
// vouched for (a recovering master takes it from the CW holder); the flag
// shows up only after the lock's master died while no holder above CR
// knew the value, and then the recovered value is the newest copy a
// surviving reader held: a broadcast that was published (readers only
// ever copy a published value) and that some node may have acted on. An
// older one is refused by the sequence check like any repeat, so acting
// on it here, if this node has not seen it, only brings this node to
// where that reader is.
func (m *Machine) Incoming(lvb []byte, notified bool) Decision {
	noReply := Decision{NoReply: true}
	e, err := DecodeEnvelope(lvb)
	if err != nil {
		if !notified {
			return noReply
		}
		s, _ := rawSeq(lvb)
		if errors.Is(err, ErrEmpty) {
			return Decision{Reply: Reply{Node: m.self, Status: StatusStale, Text: "no message"}}
		}
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
	// missed (published after its sender gave up waiting for this node)
	// or lost in a failure.
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
	return Decision{Act: true, Env: e, NoReply: !notified}
}

// NeedArm returns the ack lock to arm (take back to EX) before answering
// on lock, if any: a receiver always holds one ack lock in EX, so the
// next broadcast, which asks the lock this one did not, finds it armed
// however soon it comes.
func (m *Machine) NeedArm(lock uint8) (other uint8, need bool) {
	other = lock&1 ^ 1
	return other, !m.armed[other]
}

// Rearmed: ack lock number lock is held in EX again.
func (m *Machine) Rearmed(lock uint8) { m.armed[lock&1] = true }

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

// Replied: the reply is written to ack lock number lock, now in NL: the
// receive is over.
func (m *Machine) Replied(lock uint8) {
	m.armed[lock&1] = false
	m.busy = false
}

// Retry: the receive could not finish (the message lock or the other ack
// lock could not be taken in time); it is owed again, from the start
// (answered from memory if it was acted on).
func (m *Machine) Retry(job Job) {
	m.busy = false
	if job.Mailbox {
		m.box.owed++ // the driver keeps the granted listener first in line
		return
	}
	if job.Notified {
		m.notified[job.Lock&1] = true
	} else {
		m.catchUp = true
	}
}

// Done: a receive that answers nobody (a catch-up) is over.
func (m *Machine) Done() { m.busy = false }

// Busy reports whether a receive is under way.
func (m *Machine) Busy() bool { return m.busy }

// --- the mailbox ---
//
// Each node has a mailbox lock (MailboxLock), which the node that holds the
// token keeps in EX between broadcasts while the node itself keeps a new EX
// request, its listener, queued behind it. A send writes the envelope into
// the mailbox as it converts EX -> NL (which grants the listener: the
// receiver is notified and has the message, with no request of its own)
// and converts back to EX at once, which waits behind the listener; the
// receiver queues its next listener, acts, and releases the granted one
// with its reply as the value, which grants the sender's conversion and
// hands it the reply. See docs/broadcast.md, "The mailbox".

// EnableMailbox says the driver can queue listeners (it has asynchronous
// requests): this node keeps a listener queued on its mailbox while it is
// joined.
func (m *Machine) EnableMailbox() { m.box.on = true }

// Listening: a listener request is queued (or about to be).
func (m *Machine) Listening() { m.box.listening = true }

// ListenerGranted: the queued listener was granted; handling it is owed.
func (m *Machine) ListenerGranted() {
	m.box.listening = false
	if m.phase == Joined {
		m.box.owed++
	}
}

// ListenerFailed: the queued listener ended without a grant (cancelled,
// or the lock is gone); WorkListen queues another while joined.
func (m *Machine) ListenerFailed() { m.box.listening = false }

// MailboxIncoming decides what a granted listener means. Its value is a
// broadcast when it decodes as one and was not flagged VALNOTVALID: it is
// then answered like a notification on an ack lock (Incoming), including
// a repeat (from memory) or a stale one. Anything else (the receiver's own
// last reply, a value never written, one its last EX holder died with)
// means the listener was granted because its holder let go without sending:
// the sender's down-conversion reached the master before the conversion
// that should follow it, a sender released the mailbox with the token, or
// it died. ok is false then: the driver keeps the listener (Hold) until a
// request blocks behind it.
func (m *Machine) MailboxIncoming(lvb []byte, invalid bool) (d Decision, ok bool) {
	if invalid {
		return Decision{}, false
	}
	if _, err := DecodeEnvelope(lvb); err != nil {
		return Decision{}, false
	}
	return m.Incoming(lvb, true), true
}

// Hold: the listener of the current mailbox job is kept, with nothing to
// answer; the receive is over. blocked says a request already waits behind
// it.
func (m *Machine) Hold(blocked bool) {
	m.box.held, m.box.heldBlocked = true, blocked
	m.busy = false
}

// HeldBlocked: a request waits behind the kept listener.
func (m *Machine) HeldBlocked() {
	if m.box.held {
		m.box.heldBlocked = true
	}
}

// MailboxReleased: the kept listener was released (after the next one was
// queued).
func (m *Machine) MailboxReleased() {
	m.box.held, m.box.heldBlocked = false, false
	m.busy = false
}

// MailboxReplied: the reply was written into the mailbox as the granted
// listener was released: the receive is over.
func (m *Machine) MailboxReplied() { m.busy = false }

// CopyHolders returns the nodes whose copy locks a catch-up, a finish or a
// join reads: the other nodes the token lists as joined (as of this node's
// last look at it). Only a joined node has a copy lock, and reading one
// that does not exist would make the reader its master, so that its node's
// writes into it, when it joins, would each cost a round trip.
func (m *Machine) CopyHolders() []dlm.NodeID {
	set := m.token.joined
	set.del(m.self)
	return set.list()
}

// MailboxReceiver reports whether a sender should ask n through its
// mailbox: n is listed as joined in the token and believed alive, so it
// keeps a listener queued. The others (and any whose mailbox answer is not
// a reply to the broadcast) are asked through their ack locks.
func (m *Machine) MailboxReceiver(n dlm.NodeID) bool {
	return m.token.joined.has(n) && m.alive(n)
}
