package broadcast

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/mdcluster/mdcluster/dlm"
)

// LVBSize is the value block length the broadcast needs: md-cluster's
// LVB_SIZE, the length every array lockspace is opened with. The message
// lock's value block holds md's 48-byte struct cluster_msg followed by this
// package's 16-byte trailer, so nothing shorter fits.
const LVBSize = 64

// MaxNode is the highest node ID that can take part in a broadcast. The
// token lock's value block keeps two bitmaps of node IDs (who joined, who
// had not answered the last broadcast) in 24 bytes each, so 192 is what
// fits; md-cluster itself can recover at most 64 slots (its recovery_map is
// one unsigned long), so nothing a real array uses is excluded.
const MaxNode = 192

// Type is a message type, md-cluster's enum msg_type. The numbers are md's:
// md appends new types at the end for compatibility, and so must we.
type Type uint32

// The message types md-cluster defines, with md's numbers.
const (
	// MetadataUpdated: the sender rewrote the superblock; receivers reload
	// it from the member named by RaidSlot.
	MetadataUpdated Type = 0
	// Resyncing: the sender resyncs sectors [Low, High); receivers keep
	// writes out of that window. Low == High == 0 ends the resync.
	Resyncing Type = 1
	// NewDisk: a disk with device UUID UUID is being added as RaidSlot;
	// every receiver must confirm it can see that disk.
	NewDisk Type = 2
	// Remove: the member RaidSlot is removed from the array.
	Remove Type = 3
	// ReAdd: the failed member RaidSlot is added back.
	ReAdd Type = 4
	// BitmapNeedsSync: the sender left with a dirty bitmap; receivers
	// recover its slot as if it had failed.
	BitmapNeedsSync Type = 5
	// ChangeCapacity: every bitmap agrees on the new size; receivers
	// publish the array's new capacity.
	ChangeCapacity Type = 6
	// BitmapResize: receivers resize their bitmap to High sectors.
	BitmapResize Type = 7
	// ResyncingStart: the sender started a resync or recovery.
	ResyncingStart Type = 8
)

// lastKnown is the highest type this version knows. A receiver answers
// anything above it with StatusUnknownType without calling its Receiver:
// md's nodes with an older kernel hung the cluster on such messages until
// the 2024 timeout fix; here a rolling upgrade just reports them.
const lastKnown = ResyncingStart

var typeNames = [...]string{
	MetadataUpdated: "METADATA_UPDATED",
	Resyncing:       "RESYNCING",
	NewDisk:         "NEWDISK",
	Remove:          "REMOVE",
	ReAdd:           "RE_ADD",
	BitmapNeedsSync: "BITMAP_NEEDS_SYNC",
	ChangeCapacity:  "CHANGE_CAPACITY",
	BitmapResize:    "BITMAP_RESIZE",
	ResyncingStart:  "RESYNCING_START",
}

// Known reports whether this version of the package knows t.
func (t Type) Known() bool { return t <= lastKnown }

// String returns md's name of the type, or type(N) for an unknown one.
func (t Type) String() string {
	if t.Known() {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// Message is one configuration change, md-cluster's struct cluster_msg.
// Which fields mean something depends on Type (see the type constants).
type Message struct {
	Type Type
	// Slot is the sender's 0-based bitmap slot (node ID - 1). Send fills
	// it in, as md's __sendmsg does, so receivers can rely on it.
	Slot     uint32
	Low      uint64
	High     uint64
	UUID     [16]byte
	RaidSlot uint32
}

func (m Message) String() string {
	return fmt.Sprintf("%s{slot %d low %d high %d raid_slot %d uuid %x}", m.Type, m.Slot, m.Low, m.High, m.RaidSlot, m.UUID)
}

// Envelope is what the message lock's value block carries: the message, the
// broadcast's sequence number and the sender.
//
// Layout (little-endian, LVBSize bytes):
//
//	offset size field
//	 0      4   type        \
//	 4      4   slot         |
//	 8      8   low          | md's struct cluster_msg, byte for byte
//	16      8   high         | (48 bytes with its tail padding)
//	24     16   uuid         |
//	40      4   raid_slot    |
//	44      4   padding, 0  /
//	48      8   seq: the broadcast's sequence number, never 0
//	56      4   sender's node ID (slot + 1)
//	60      1   trailer version, 1
//	61      1   flags: bit 0 is the toggle, which of each receiver's two
//	            ack locks the sender asks first (see AckLock)
//	62      2   reserved, 0
type Envelope struct {
	Msg    Message
	Seq    uint64
	Sender dlm.NodeID
	// Toggle (0 or 1) names the ack lock the sender asks first; it
	// alternates from one broadcast to the next.
	Toggle uint8
}

// trailerVersion is the version of the 16-byte trailer after cluster_msg.
const trailerVersion = 1

// Errors of the value block decoders. Decoders wrap them with details.
var (
	// ErrMalformed: a value block does not hold a valid encoding.
	ErrMalformed = errors.New("broadcast: malformed value block")
	// ErrEmpty: a value block was never written (all zero): no broadcast,
	// reply or token state yet.
	ErrEmpty = errors.New("broadcast: empty value block")
)

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// checkLen checks a value block's length: at least LVBSize bytes, anything
// past them zero (a lockspace with longer value blocks still works).
func checkLen(what string, b []byte) error {
	if len(b) < LVBSize {
		return fmt.Errorf("%w: %s: %d bytes, need %d", ErrMalformed, what, len(b), LVBSize)
	}
	if !isZero(b[LVBSize:]) {
		return fmt.Errorf("%w: %s: bytes past %d are not zero", ErrMalformed, what, LVBSize)
	}
	if isZero(b) {
		return fmt.Errorf("%s: %w", what, ErrEmpty)
	}
	return nil
}

// Encode returns the envelope as a value block of n bytes (n >= LVBSize;
// the bytes past LVBSize are zero).
func (e Envelope) Encode(n int) []byte {
	b := make([]byte, max(n, LVBSize))
	le := binary.LittleEndian
	le.PutUint32(b[0:], uint32(e.Msg.Type))
	le.PutUint32(b[4:], e.Msg.Slot)
	le.PutUint64(b[8:], e.Msg.Low)
	le.PutUint64(b[16:], e.Msg.High)
	copy(b[24:40], e.Msg.UUID[:])
	le.PutUint32(b[40:], e.Msg.RaidSlot)
	le.PutUint64(b[48:], e.Seq)
	le.PutUint32(b[56:], uint32(e.Sender))
	b[60] = trailerVersion
	b[61] = e.Toggle & 1
	return b
}

// DecodeEnvelope decodes the message lock's value block. An unknown message
// type decodes (it must be answered, not dropped); a value block that was
// never written gives ErrEmpty; anything inconsistent (short, non-zero
// padding or reserved bytes, sequence 0, no sender, a slot that is not the
// sender's, an unknown trailer version) gives ErrMalformed.
func DecodeEnvelope(b []byte) (Envelope, error) {
	if err := checkLen("message", b); err != nil {
		return Envelope{}, err
	}
	le := binary.LittleEndian
	var e Envelope
	e.Msg.Type = Type(le.Uint32(b[0:]))
	e.Msg.Slot = le.Uint32(b[4:])
	e.Msg.Low = le.Uint64(b[8:])
	e.Msg.High = le.Uint64(b[16:])
	copy(e.Msg.UUID[:], b[24:40])
	e.Msg.RaidSlot = le.Uint32(b[40:])
	e.Seq = le.Uint64(b[48:])
	e.Sender = dlm.NodeID(le.Uint32(b[56:]))
	e.Toggle = b[61] & 1
	switch {
	case !isZero(b[44:48]):
		return Envelope{}, fmt.Errorf("%w: message: padding after raid_slot is not zero", ErrMalformed)
	case b[60] != trailerVersion:
		return Envelope{}, fmt.Errorf("%w: message: trailer version %d, want %d", ErrMalformed, b[60], trailerVersion)
	case b[61]&^1 != 0:
		return Envelope{}, fmt.Errorf("%w: message: unknown trailer flags %#x", ErrMalformed, b[61])
	case !isZero(b[62:64]):
		return Envelope{}, fmt.Errorf("%w: message: reserved trailer bytes are not zero", ErrMalformed)
	case e.Seq == 0:
		return Envelope{}, fmt.Errorf("%w: message: sequence number 0", ErrMalformed)
	case e.Sender == 0 || e.Sender > MaxNode:
		return Envelope{}, fmt.Errorf("%w: message: sender node %d outside 1..%d", ErrMalformed, e.Sender, MaxNode)
	case e.Msg.Slot != uint32(e.Sender)-1:
		return Envelope{}, fmt.Errorf("%w: message: slot %d is not sender %d's slot %d", ErrMalformed, e.Msg.Slot, e.Sender, e.Sender-1)
	}
	return e, nil
}

// Status is a receiver's answer to a broadcast, carried in its ack lock's
// value block.
type Status uint8

// Reply statuses. New ones may be added; an unknown status from a newer
// node decodes and counts as a failure.
const (
	// StatusActed: the receiver acted on the message.
	StatusActed Status = 0
	// StatusFailed: the receiver's handler returned an error (Text).
	StatusFailed Status = 1
	// StatusUnknownType: the receiver does not know the message type.
	StatusUnknownType Status = 2
	// StatusTimeout: the receiver's handler did not finish within its
	// ReceiveTimeout.
	StatusTimeout Status = 3
	// StatusMalformed: the receiver could not decode (or trust) the message
	// lock's value block.
	StatusMalformed Status = 4
	// StatusLeft: the node left the array (written when it leaves, so a
	// sender finding its ack lock free learns why).
	StatusLeft Status = 5
	// StatusStale: the receiver was asked about a sequence older than one
	// it has already seen; it did not act.
	StatusStale Status = 6
)

var statusNames = [...]string{"acted", "failed", "unknown message type", "receive timeout", "malformed message", "left", "stale message"}

func (s Status) String() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// MaxReplyText is how much of a receiver's error text fits in its reply.
const MaxReplyText = 48

// Reply is a receiver's answer, in its ack lock's value block.
//
// Layout (little-endian, LVBSize bytes):
//
//	offset size field
//	 0      8   seq: the broadcast answered (for StatusLeft: the last seen)
//	 8      4   the replier's node ID
//	12      1   status
//	13      1   text length, 0..48
//	14      1   version, 1
//	15      1   reserved, 0
//	16     48   text (UTF-8, the receiver's error, cut at a rune boundary;
//	            bytes past its length are 0)
type Reply struct {
	Seq    uint64
	Node   dlm.NodeID
	Status Status
	Text   string
}

const replyVersion = 1

// clip cuts s to at most n bytes at a rune boundary, and replaces invalid
// UTF-8, so that what a receiver sends always decodes.
func clip(s string, n int) string {
	s = string([]rune(s)) // replaces invalid sequences with U+FFFD
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Encode returns the reply as a value block of n bytes (n >= LVBSize). Text
// longer than MaxReplyText is cut.
func (r Reply) Encode(n int) []byte {
	b := make([]byte, max(n, LVBSize))
	le := binary.LittleEndian
	le.PutUint64(b[0:], r.Seq)
	le.PutUint32(b[8:], uint32(r.Node))
	t := clip(r.Text, MaxReplyText)
	b[12] = byte(r.Status)
	b[13] = byte(len(t))
	b[14] = replyVersion
	copy(b[16:], t)
	return b
}

// DecodeReply decodes an ack lock's value block: ErrEmpty if it was never
// written, ErrMalformed if it is inconsistent.
func DecodeReply(b []byte) (Reply, error) {
	if err := checkLen("reply", b); err != nil {
		return Reply{}, err
	}
	le := binary.LittleEndian
	r := Reply{Seq: le.Uint64(b[0:]), Node: dlm.NodeID(le.Uint32(b[8:])), Status: Status(b[12])}
	n := int(b[13])
	switch {
	case b[14] != replyVersion:
		return Reply{}, fmt.Errorf("%w: reply: version %d, want %d", ErrMalformed, b[14], replyVersion)
	case b[15] != 0:
		return Reply{}, fmt.Errorf("%w: reply: reserved byte is not zero", ErrMalformed)
	case r.Node == 0 || r.Node > MaxNode:
		return Reply{}, fmt.Errorf("%w: reply: node %d outside 1..%d", ErrMalformed, r.Node, MaxNode)
	case n > MaxReplyText:
		return Reply{}, fmt.Errorf("%w: reply: text length %d over %d", ErrMalformed, n, MaxReplyText)
	case !isZero(b[16+n : LVBSize]):
		return Reply{}, fmt.Errorf("%w: reply: bytes after the text are not zero", ErrMalformed)
	case !utf8.Valid(b[16 : 16+n]):
		return Reply{}, fmt.Errorf("%w: reply: text is not UTF-8", ErrMalformed)
	}
	r.Text = string(b[16 : 16+n])
	return r, nil
}

// nodeSet is a set of node IDs 1..MaxNode as a bitmap (bit id-1), the form
// the token lock's value block carries.
type nodeSet [MaxNode / 8]byte

func (s *nodeSet) has(id dlm.NodeID) bool {
	return id >= 1 && id <= MaxNode && s[(id-1)/8]&(1<<((id-1)%8)) != 0
}

func (s *nodeSet) add(id dlm.NodeID) {
	if id >= 1 && id <= MaxNode {
		s[(id-1)/8] |= 1 << ((id - 1) % 8)
	}
}

func (s *nodeSet) del(id dlm.NodeID) {
	if id >= 1 && id <= MaxNode {
		s[(id-1)/8] &^= 1 << ((id - 1) % 8)
	}
}

func (s *nodeSet) list() []dlm.NodeID {
	var out []dlm.NodeID
	for id := dlm.NodeID(1); id <= MaxNode; id++ {
		if s.has(id) {
			out = append(out, id)
		}
	}
	return out
}

// TokenState is what the token lock's value block carries between holders:
// the highest sequence number sent, the nodes that joined, and the nodes
// that had not answered the broadcast LastSeq when its sender gave up.
//
// Layout (little-endian, LVBSize bytes):
//
//	offset size field
//	 0      8   last seq: the highest broadcast sequence number sent
//	 8      1   version, 1
//	 9      1   flags: bit 0 "unfinished": a holder died holding the
//	            token, so the broadcast in the message lock may have
//	            reached only some receivers; the next sender finishes it
//	10      6   reserved, 0
//	16     24   joined: bit (id-1) set for every joined node ID 1..192
//	40     24   laggards: nodes that had not answered broadcast `last seq`
//	            when its sender stopped waiting (they may still hold the
//	            message lock: named in the next sender's error)
type TokenState struct {
	LastSeq    uint64
	Unfinished bool
	Joined     []dlm.NodeID
	Laggards   []dlm.NodeID
}

const tokenVersion = 1

type tokenValue struct {
	last       uint64
	unfinished bool
	joined     nodeSet
	laggards   nodeSet
}

const tokenUnfinished = 1 << 0

func (t tokenValue) state() TokenState {
	return TokenState{LastSeq: t.last, Unfinished: t.unfinished, Joined: t.joined.list(), Laggards: t.laggards.list()}
}

func (t tokenValue) encode(n int) []byte {
	b := make([]byte, max(n, LVBSize))
	binary.LittleEndian.PutUint64(b[0:], t.last)
	b[8] = tokenVersion
	if t.unfinished {
		b[9] = tokenUnfinished
	}
	copy(b[16:40], t.joined[:])
	copy(b[40:64], t.laggards[:])
	return b
}

// Encode returns the token state as a value block of n bytes (n >=
// LVBSize). Node IDs outside 1..MaxNode are left out.
func (s TokenState) Encode(n int) []byte {
	t := tokenValue{last: s.LastSeq, unfinished: s.Unfinished}
	for _, id := range s.Joined {
		t.joined.add(id)
	}
	for _, id := range s.Laggards {
		t.laggards.add(id)
	}
	return t.encode(n)
}

func decodeToken(b []byte) (tokenValue, error) {
	if err := checkLen("token", b); err != nil {
		return tokenValue{}, err
	}
	var t tokenValue
	t.last = binary.LittleEndian.Uint64(b[0:])
	switch {
	case b[8] != tokenVersion:
		return tokenValue{}, fmt.Errorf("%w: token: version %d, want %d", ErrMalformed, b[8], tokenVersion)
	case b[9]&^tokenUnfinished != 0:
		return tokenValue{}, fmt.Errorf("%w: token: unknown flags %#x", ErrMalformed, b[9])
	case !isZero(b[10:16]):
		return tokenValue{}, fmt.Errorf("%w: token: reserved bytes are not zero", ErrMalformed)
	}
	t.unfinished = b[9]&tokenUnfinished != 0
	copy(t.joined[:], b[16:40])
	copy(t.laggards[:], b[40:64])
	return t, nil
}

// DecodeTokenState decodes the token lock's value block: ErrEmpty if it
// was never written, ErrMalformed if it is inconsistent.
func DecodeTokenState(b []byte) (TokenState, error) {
	t, err := decodeToken(b)
	if err != nil {
		return TokenState{}, err
	}
	return t.state(), nil
}

// Lock names in the array's lockspace. md-cluster's are "token", "message"
// and "ack"; the ack locks here are two per node.
const (
	TokenLock   = "token"
	MessageLock = "message"
)

// AckLock returns the name of node id's ack lock number toggle (0 or 1),
// "ack%04d.%d" of its 0-based bitmap slot (id - 1), like the bitmap locks'
// "bitmap%04d". A joined node holds both in EX while idle; a sender asks
// one in CR (the broadcast's Toggle), and the receiver arms the other
// before it answers on this one, so the next broadcast, which asks the
// other, always finds it armed without waiting for this sender to let go.
func AckLock(id dlm.NodeID, toggle uint8) string {
	if id >= 1 && id <= MaxNode {
		return ackLockNames[id-1][toggle&1] // a sender asks for them on every broadcast
	}
	return ackLockName(id, toggle)
}

func ackLockName(id dlm.NodeID, toggle uint8) string {
	return fmt.Sprintf("ack%04d.%d", uint32(id)-1, toggle&1)
}

// MailboxLock returns the name of node id's mailbox lock, "mbox%04d" of its
// 0-based slot. The token holder keeps it in EX between broadcasts and
// writes each broadcast into it; node id keeps a listener (an EX request)
// queued behind, and replies through it (see Machine.MailboxIncoming).
func MailboxLock(id dlm.NodeID) string {
	if id >= 1 && id <= MaxNode {
		return mailboxNames[id-1]
	}
	return fmt.Sprintf("mbox%04d", uint32(id)-1)
}

// CopyLock returns the name of node id's copy lock, "seen%04d" of its
// 0-based slot: node id holds it in PW while joined and writes into it
// each broadcast it takes from its mailbox, so that the broadcast survives
// its sender's death (the message lock's value may not: only its sender
// and its master may have held it). A catch-up, a finish and a join read
// every member's copy lock in CR (compatible with PW: nobody waits) along
// with the message lock, and take the newest broadcast.
func CopyLock(id dlm.NodeID) string { return fmt.Sprintf("seen%04d", uint32(id)-1) }

var mailboxNames = func() (t [MaxNode]string) {
	for i := range t {
		t[i] = fmt.Sprintf("mbox%04d", i)
	}
	return t
}()

// ackLockNames holds AckLock's names of nodes 1..MaxNode.
var ackLockNames = func() (t [MaxNode][2]string) {
	for i := range t {
		for k := range t[i] {
			t[i][k] = ackLockName(dlm.NodeID(i+1), uint8(k))
		}
	}
	return t
}()
