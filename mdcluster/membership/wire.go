package membership

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
)

// Wire format. Every message is
//
//	version (1 byte) | type (1 byte) | gen (uvarint) | ballot (uvarint) | body
//
// where gen is the sender's installed generation and ballot the attempt the
// message belongs to (0 where none). Integers are unsigned varints, node
// lists are a count followed by strictly increasing non-zero IDs, and a
// proposal is gen, members, prev gen, prev members, left, rejoined. The
// encoding is canonical: a payload decodes only if re-encoding it gives the
// same bytes, so trailing garbage, padded varints and unsorted lists are all
// refused. The decoder never panics and bounds every count before
// allocating.

const wireVersion = 1

// MaxMembers bounds node lists on the wire (and so the size of a cluster).
const MaxMembers = 1024

type msgType uint8

const (
	mPrepare   msgType = 1 + iota // coordinator → targets: promise this ballot, stop
	mPrepared                     // promise, with the node's installed view and accepted proposal
	mAccept                       // coordinator → targets: accept this value (and catch up to its base)
	mAccepted                     // value accepted
	mNack                         // ballot refused: already promised a higher one
	mCommit                       // coordinator → members: the value is chosen, install it
	mCommitted                    // installed (acknowledges a commit)
	mDone                         // DLM recovery for the view finished on the sender
	mLeave                        // the sender is leaving gracefully
	mHello                        // the sender restarted, missed a view, or is stopped: it asks for a new view
	mTypeEnd
)

func (t msgType) String() string {
	switch t {
	case mPrepare:
		return "PREPARE"
	case mPrepared:
		return "PREPARED"
	case mAccept:
		return "ACCEPT"
	case mAccepted:
		return "ACCEPTED"
	case mNack:
		return "NACK"
	case mCommit:
		return "COMMIT"
	case mCommitted:
		return "COMMITTED"
	case mDone:
		return "DONE"
	case mLeave:
		return "LEAVE"
	case mHello:
		return "HELLO"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// message is the decoded form of every message type; fields not used by a
// type are zero.
type message struct {
	Type   msgType
	Gen    uint64 // sender's installed generation
	Ballot uint64

	Intended  []NodeID  // PREPARE: the members the coordinator aims for
	Installed Proposal  // PREPARED
	Accepted  *Accepted // PREPARED (optional)
	Restarted bool      // PREPARED, HELLO
	Stopped   bool      // HELLO: the sender's lock manager is stopped since its installed view
	Leaving   bool      // PREPARED
	Value     Proposal  // ACCEPT, COMMIT
	Base      Proposal  // ACCEPT, COMMIT
	Promised  uint64    // NACK
	ViewGen   uint64    // COMMITTED, DONE
}

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("membership: malformed message")

func encodeMessage(m message) []byte {
	e := encoder{b: make([]byte, 0, 64)}
	e.b = append(e.b, wireVersion, byte(m.Type))
	e.u(m.Gen)
	e.u(m.Ballot)
	switch m.Type {
	case mPrepare:
		e.ids(m.Intended)
	case mPrepared:
		e.prop(m.Installed)
		if m.Accepted != nil {
			e.u(1)
			e.u(m.Accepted.Ballot)
			e.prop(m.Accepted.Value)
			e.prop(m.Accepted.Base)
		} else {
			e.u(0)
		}
		e.flag(m.Restarted)
		e.flag(m.Leaving)
	case mAccept, mCommit:
		e.prop(m.Value)
		e.prop(m.Base)
	case mNack:
		e.u(m.Promised)
	case mCommitted, mDone:
		e.u(m.ViewGen)
	case mHello:
		e.flag(m.Restarted)
		e.flag(m.Stopped)
	}
	return e.b
}

func decodeMessage(b []byte) (message, error) {
	d := decoder{b: b}
	var m message
	if len(b) < 2 {
		return m, fmt.Errorf("%w: %d bytes, need at least 2", ErrMalformed, len(b))
	}
	if b[0] != wireVersion {
		return m, fmt.Errorf("%w: version %d, want %d", ErrMalformed, b[0], wireVersion)
	}
	m.Type = msgType(b[1])
	if m.Type == 0 || m.Type >= mTypeEnd {
		return m, fmt.Errorf("%w: unknown type %d", ErrMalformed, b[1])
	}
	d.b = b[2:]
	m.Gen = d.u()
	m.Ballot = d.u()
	switch m.Type {
	case mPrepare:
		m.Intended = d.ids()
	case mPrepared:
		m.Installed = d.prop()
		switch d.u() {
		case 0:
		case 1:
			m.Accepted = &Accepted{Ballot: d.u(), Value: d.prop(), Base: d.prop()}
		default:
			d.fail("accepted flag not 0 or 1")
		}
		m.Restarted = d.flag()
		m.Leaving = d.flag()
	case mAccept, mCommit:
		m.Value = d.prop()
		m.Base = d.prop()
	case mNack:
		m.Promised = d.u()
	case mCommitted, mDone:
		m.ViewGen = d.u()
	case mHello:
		m.Restarted = d.flag()
		m.Stopped = d.flag()
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail(fmt.Sprintf("%d trailing bytes", len(d.b)))
	}
	if d.err != nil {
		return message{}, fmt.Errorf("%w: %s: %s", ErrMalformed, m.Type, d.err)
	}
	if err := checkMessage(m); err != nil {
		return message{}, fmt.Errorf("%w: %s: %v", ErrMalformed, m.Type, err)
	}
	return m, nil
}

// checkMessage refuses values that decode but cannot come from a correct
// peer, so that a corrupted message cannot break the machine's invariants.
func checkMessage(m message) error {
	switch m.Type {
	case mPrepare, mAccept:
		if m.Ballot == 0 {
			return errors.New("ballot 0")
		}
	}
	switch m.Type {
	case mPrepared:
		if err := checkProposal(m.Installed, true); err != nil {
			return fmt.Errorf("installed: %w", err)
		}
		if a := m.Accepted; a != nil {
			if err := checkAccepted(*a); err != nil {
				return err
			}
		}
	case mAccept, mCommit:
		if err := checkAccepted(Accepted{Ballot: m.Ballot, Value: m.Value, Base: m.Base}); err != nil {
			return err
		}
	}
	return nil
}

func checkAccepted(a Accepted) error {
	if err := checkProposal(a.Value, false); err != nil {
		return fmt.Errorf("value: %w", err)
	}
	if err := checkProposal(a.Base, true); err != nil {
		return fmt.Errorf("base: %w", err)
	}
	if a.Value.Gen > a.Ballot {
		return fmt.Errorf("value generation %d above its ballot %d", a.Value.Gen, a.Ballot)
	}
	if a.Base.Gen != a.Value.Prev.Gen || !slices.Equal(a.Base.Members, a.Value.Prev.Members) {
		return fmt.Errorf("base %d does not match prev %d", a.Base.Gen, a.Value.Prev.Gen)
	}
	return nil
}

// checkProposal checks a proposal's internal consistency. zeroOK allows the
// empty proposal (generation 0: no view yet).
func checkProposal(p Proposal, zeroOK bool) error {
	if p.Gen == 0 {
		if zeroOK && len(p.Members) == 0 && p.Prev.Gen == 0 && len(p.Prev.Members) == 0 &&
			len(p.Left) == 0 && len(p.Rejoined) == 0 {
			return nil
		}
		return errors.New("generation 0")
	}
	if len(p.Members) == 0 {
		return fmt.Errorf("generation %d has no members", p.Gen)
	}
	if p.Prev.Gen >= p.Gen {
		return fmt.Errorf("prev generation %d not below %d", p.Prev.Gen, p.Gen)
	}
	if p.Prev.Gen == 0 && len(p.Prev.Members) != 0 {
		return errors.New("prev generation 0 with members")
	}
	for _, id := range p.Left {
		if !contains(p.Prev.Members, id) || contains(p.Members, id) {
			return fmt.Errorf("leaver %s not a departed member", id)
		}
	}
	for _, id := range p.Rejoined {
		if !contains(p.Prev.Members, id) || !contains(p.Members, id) {
			return fmt.Errorf("rejoined %s not a continuing member", id)
		}
	}
	return nil
}

// Marshal encodes the hard state for the driver's store.
func (h HardState) Marshal() []byte {
	e := encoder{b: make([]byte, 0, 64)}
	e.b = append(e.b, wireVersion)
	e.u(h.Promised)
	e.u(uint64(h.PromisedTo))
	if h.Accepted != nil {
		e.u(1)
		e.u(h.Accepted.Ballot)
		e.prop(h.Accepted.Value)
		e.prop(h.Accepted.Base)
	} else {
		e.u(0)
	}
	e.prop(h.Installed)
	return e.b
}

// UnmarshalHardState decodes what Marshal produced.
func UnmarshalHardState(b []byte) (HardState, error) {
	var h HardState
	if len(b) < 1 || b[0] != wireVersion {
		return h, fmt.Errorf("%w: hard state: bad version", ErrMalformed)
	}
	d := decoder{b: b[1:]}
	h.Promised = d.u()
	to := d.u()
	if to > math.MaxUint32 {
		d.fail("promised-to out of range")
	}
	h.PromisedTo = NodeID(to)
	switch d.u() {
	case 0:
	case 1:
		h.Accepted = &Accepted{Ballot: d.u(), Value: d.prop(), Base: d.prop()}
	default:
		d.fail("accepted flag not 0 or 1")
	}
	h.Installed = d.prop()
	if d.err == nil && len(d.b) != 0 {
		d.fail("trailing bytes")
	}
	if d.err != nil {
		return HardState{}, fmt.Errorf("%w: hard state: %s", ErrMalformed, d.err)
	}
	if err := checkProposal(h.Installed, true); err != nil {
		return HardState{}, fmt.Errorf("%w: hard state: installed: %v", ErrMalformed, err)
	}
	if h.Accepted != nil {
		if err := checkAccepted(*h.Accepted); err != nil {
			return HardState{}, fmt.Errorf("%w: hard state: %v", ErrMalformed, err)
		}
	}
	return h, nil
}

type encoder struct{ b []byte }

func (e *encoder) u(v uint64) { e.b = binary.AppendUvarint(e.b, v) }

func (e *encoder) flag(v bool) {
	if v {
		e.u(1)
	} else {
		e.u(0)
	}
}

func (e *encoder) ids(ids []NodeID) {
	e.u(uint64(len(ids)))
	for _, id := range ids {
		e.u(uint64(id))
	}
}

func (e *encoder) prop(p Proposal) {
	e.u(p.Gen)
	e.ids(p.Members)
	e.u(p.Prev.Gen)
	e.ids(p.Prev.Members)
	e.ids(p.Left)
	e.ids(p.Rejoined)
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(why string) {
	if d.err == nil {
		d.err = errors.New(why)
	}
}

func (d *decoder) u() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	// Refuse padded encodings so that every value has one encoding.
	if n != len(binary.AppendUvarint(nil, v)) {
		d.fail("non-minimal varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) flag() bool {
	switch d.u() {
	case 0:
		return false
	case 1:
		return true
	}
	d.fail("flag not 0 or 1")
	return false
}

func (d *decoder) ids() []NodeID {
	n := d.u()
	if d.err != nil {
		return nil
	}
	if n > MaxMembers || n > uint64(len(d.b)) {
		d.fail(fmt.Sprintf("node list of %d entries", n))
		return nil
	}
	if n == 0 {
		return nil
	}
	out := make([]NodeID, 0, n)
	for range n {
		v := d.u()
		if d.err != nil {
			return nil
		}
		if v == 0 || v > math.MaxUint32 {
			d.fail(fmt.Sprintf("node ID %d out of range", v))
			return nil
		}
		if len(out) > 0 && NodeID(v) <= out[len(out)-1] {
			d.fail("node list not strictly increasing")
			return nil
		}
		out = append(out, NodeID(v))
	}
	return out
}

func (d *decoder) prop() Proposal {
	var p Proposal
	p.Gen = d.u()
	p.Members = d.ids()
	p.Prev.Gen = d.u()
	p.Prev.Members = d.ids()
	p.Left = d.ids()
	p.Rejoined = d.ids()
	return p
}
