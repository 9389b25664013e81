package dlm

import (
	"encoding/binary"
	"fmt"
)

// NodeID is a cluster node's stable identity. 0 is never a node.
type NodeID uint32

// msgType names a lock-manager message between nodes. The transport carries
// them as opaque payloads, stamped with lockspace and generation.
type msgType uint8

const (
	// msgLookup asks a resource's directory node who masters it.
	msgLookup msgType = iota + 1
	// msgLookupReply answers with the master (the asker, if nobody had it).
	msgLookupReply
	// msgRemove tells the directory node that the master dropped the resource.
	msgRemove
	// msgRequest asks the master for a new lock.
	msgRequest
	// msgConvert asks the master to convert a lock.
	msgConvert
	// msgUnlock releases a lock at the master.
	msgUnlock
	// msgCancel cancels a pending request or conversion at the master.
	msgCancel
	// msgCast is a completion from the master.
	msgCast
	// msgBast is a blocking callback from the master.
	msgBast
	// msgNotMaster refuses a request sent to a node that no longer masters
	// the resource; the requester looks the master up again.
	msgNotMaster
	// msgNames (recovery) lists resources the sender masters whose
	// directory entry is on the receiver; the last one of a batch says so.
	msgNames
	// msgLocksDone (recovery): the sender has resent all its locks.
	msgLocksDone
	// msgRecoverLock (recovery) re-establishes a lock at its master: the
	// requester's view of it is the truth the master rebuilds from.
	msgRecoverLock
	// msgWriteAck tells a writer its LVB write (an unlock or down-conversion
	// nobody waited for) reached the master.
	msgWriteAck
	// msgRecoverWrite (recovery) resends an unacknowledged LVB write (or,
	// without a value, an invalidation); the master applies it only if the
	// value is still the one it replaced.
	msgRecoverWrite
	msgMax
)

var msgTypeNames = [...]string{"", "lookup", "lookup-reply", "remove", "request", "convert", "unlock", "cancel",
	"cast", "bast", "not-master", "names", "locks-done", "recover-lock", "write-ack", "recover-write"}

// recovery reports whether t is handled while the lockspace recovers; other
// messages wait until it is over. The directory's messages (lookup, its
// reply, remove) are all handled at once, so that they keep their order.
func (t msgType) recovery() bool {
	return t == msgNames || t == msgLocksDone || t == msgRecoverLock || t == msgRecoverWrite ||
		t == msgLookup || t == msgLookupReply || t == msgRemove
}

func (t msgType) String() string {
	if t > 0 && t < msgMax {
		return msgTypeNames[t]
	}
	return fmt.Sprintf("msg(%d)", uint8(t))
}

// message is the decoded form of every message; fields not used by a type
// are zero.
type message struct {
	typ    msgType
	lock   uint64 // the requester's lock ID
	name   string // resource name (lookup, lookup-reply, remove, request), to encode
	nameb  []byte // the same, decoded (aliases the input; no allocation)
	master NodeID // lookup-reply
	mode   Mode
	flags  Flags
	status Status
	sbf    StatusFlags
	bast   bool     // request: the owner wants blocking callbacks
	seq    uint32   // cast, recover-lock: LVB sequence
	lvb    []byte   // request/convert/unlock: the value to write; cast: the value read; recover-lock: the holder's value
	names  []string // names (to encode)
	namesb [][]byte // names (decoded, aliasing the input)
	last   bool     // names: the last batch from the sender
	bad    bool     // recover-lock: the holder's value came with ValNotValid
	wid    uint64   // convert, unlock, write-ack, recover-write: the writer's write ID (0: none)
	rqmode Mode     // recover-lock: a conversion in flight whose outcome is undecided (PR<->CW, ConvDeadlk), else ModeIV
}

// Wire layout, little-endian: type(1) then per type:
//
//	lookup, remove:  namelen(1) name
//	lookup-reply:    master(4) namelen(1) name (master 0: refused, ENOMEM)
//	request:         lock(8) mode(1) flags(4) bast(1) namelen(1) name lvblen(2) lvb
//	convert, unlock: lock(8) mode(1) flags(4) wid(8) lvblen(2) lvb
//	cancel:          lock(8) status(1)
//	cast:            lock(8) status(1) mode(1) sbflags(1) seq(4) lvblen(2) lvb
//	bast:            lock(8) mode(1)
//	not-master:      lock(8)
//	names:           last(1) count(2) { namelen(1) name }
//	locks-done:      (nothing)
//	recover-lock:    lock(8) mode(1) rqmode(1) flags(4) seq(4) bad(1) namelen(1) name lvblen(2) lvb
//	write-ack:       wid(8)
//	recover-write:   wid(8) seq(4) namelen(1) name lvblen(2) lvb

func appendName(b []byte, n string) []byte {
	b = append(b, byte(len(n)))
	return append(b, n...)
}

func appendLVB(b []byte, v []byte) []byte {
	b = binary.LittleEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

// appendMessage encodes m onto b.
func appendMessage(b []byte, m *message) []byte {
	b = append(b, byte(m.typ))
	switch m.typ {
	case msgLookup, msgRemove:
		b = appendName(b, m.name)
	case msgLookupReply:
		b = binary.LittleEndian.AppendUint32(b, uint32(m.master))
		b = appendName(b, m.name)
	case msgRequest:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.mode))
		b = binary.LittleEndian.AppendUint32(b, uint32(m.flags))
		bast := byte(0)
		if m.bast {
			bast = 1
		}
		b = append(b, bast)
		b = appendName(b, m.name)
		b = appendLVB(b, m.lvb)
	case msgConvert, msgUnlock:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.mode))
		b = binary.LittleEndian.AppendUint32(b, uint32(m.flags))
		b = binary.LittleEndian.AppendUint64(b, m.wid)
		b = appendLVB(b, m.lvb)
	case msgCancel:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.status))
	case msgCast:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.status), byte(m.mode), byte(m.sbf))
		b = binary.LittleEndian.AppendUint32(b, m.seq)
		b = appendLVB(b, m.lvb)
	case msgBast:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.mode))
	case msgNotMaster:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
	case msgNames:
		last := byte(0)
		if m.last {
			last = 1
		}
		b = append(b, last)
		b = binary.LittleEndian.AppendUint16(b, uint16(len(m.names)))
		for _, n := range m.names {
			b = appendName(b, n)
		}
	case msgLocksDone:
	case msgRecoverLock:
		b = binary.LittleEndian.AppendUint64(b, m.lock)
		b = append(b, byte(m.mode), byte(m.rqmode))
		b = binary.LittleEndian.AppendUint32(b, uint32(m.flags))
		b = binary.LittleEndian.AppendUint32(b, m.seq)
		bad := byte(0)
		if m.bad {
			bad = 1
		}
		b = append(b, bad)
		b = appendName(b, m.name)
		b = appendLVB(b, m.lvb)
	case msgWriteAck:
		b = binary.LittleEndian.AppendUint64(b, m.wid)
	case msgRecoverWrite:
		b = binary.LittleEndian.AppendUint64(b, m.wid)
		b = binary.LittleEndian.AppendUint32(b, m.seq)
		b = appendName(b, m.name)
		b = appendLVB(b, m.lvb)
	}
	return b
}

// reader decodes little-endian fields, remembering the first error.
type reader struct {
	b   []byte
	err error
}

func (r *reader) need(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.err = fmt.Errorf("%w: message truncated in %s", ErrInvalid, what)
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8(what string) uint8 {
	if v := r.need(1, what); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16(what string) uint16 {
	if v := r.need(2, what); v != nil {
		return binary.LittleEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u32(what string) uint32 {
	if v := r.need(4, what); v != nil {
		return binary.LittleEndian.Uint32(v)
	}
	return 0
}

func (r *reader) u64(what string) uint64 {
	if v := r.need(8, what); v != nil {
		return binary.LittleEndian.Uint64(v)
	}
	return 0
}

func (r *reader) name() []byte {
	n := int(r.u8("name length"))
	if r.err == nil && (n == 0 || n > MaxResourceName) {
		r.err = fmt.Errorf("%w: resource name length %d", ErrInvalid, n)
		return nil
	}
	return r.need(n, "name")
}

func (r *reader) mode(what string) Mode {
	m := Mode(int8(r.u8(what)))
	if r.err == nil && !m.Valid() && m != ModeIV {
		r.err = fmt.Errorf("%w: bad %s %d", ErrInvalid, what, int(m))
	}
	return m
}

func (r *reader) lvb(max int) []byte {
	n := int(r.u16("lvb length"))
	if r.err == nil && n > max {
		r.err = fmt.Errorf("%w: LVB of %d bytes, lockspace uses %d", ErrInvalid, n, max)
		return nil
	}
	return r.need(n, "lvb")
}

// decodeMessage parses a payload holding exactly one message. lvbLen bounds
// the LVB. The returned message's lvb and nameb alias b. Every malformed
// input yields an error, never a panic.
func decodeMessage(b []byte, lvbLen int) (message, error) {
	var m message
	rest, err := decodeNext(b, lvbLen, &m)
	if err == nil && len(rest) != 0 {
		err = fmt.Errorf("%w: %d bytes after %v message", ErrInvalid, len(rest), m.typ)
	}
	if err != nil {
		return message{}, err
	}
	return m, nil
}

// decodeNext parses the first message of b into m (which must be zero) and
// returns the bytes after it: a payload may carry several messages back to
// back (the driver batches what goes to one node). m's lvb and nameb alias b.
func decodeNext(b []byte, lvbLen int, m *message) ([]byte, error) {
	r := reader{b: b}
	m.typ = msgType(r.u8("type"))
	if r.err == nil && (m.typ == 0 || m.typ >= msgMax) {
		return nil, fmt.Errorf("%w: unknown message type %d", ErrInvalid, uint8(m.typ))
	}
	switch m.typ {
	case msgLookup, msgRemove:
		m.nameb = r.name()
	case msgLookupReply:
		m.master = NodeID(r.u32("master"))
		m.nameb = r.name() // master 0: refused (ENOMEM, see Space.lookupRefused)
	case msgRequest:
		m.lock = r.u64("lock")
		m.mode = r.mode("mode")
		m.flags = Flags(r.u32("flags"))
		switch r.u8("bast") {
		case 0:
		case 1:
			m.bast = true
		default:
			if r.err == nil {
				r.err = fmt.Errorf("%w: bast flag is not 0 or 1", ErrInvalid)
			}
		}
		m.nameb = r.name()
		m.lvb = r.lvb(lvbLen)
	case msgConvert, msgUnlock:
		m.lock = r.u64("lock")
		m.mode = r.mode("mode")
		m.flags = Flags(r.u32("flags"))
		m.wid = r.u64("write id")
		m.lvb = r.lvb(lvbLen)
	case msgCancel:
		m.lock = r.u64("lock")
		m.status = Status(r.u8("status"))
		if r.err == nil && m.status != StatusCancel && m.status != StatusTimeout {
			r.err = fmt.Errorf("%w: cancel with status %d", ErrInvalid, m.status)
		}
	case msgCast:
		m.lock = r.u64("lock")
		m.status = Status(r.u8("status"))
		m.mode = r.mode("mode")
		m.sbf = StatusFlags(r.u8("status flags"))
		m.seq = r.u32("lvb sequence")
		m.lvb = r.lvb(lvbLen)
		if r.err == nil && m.status > StatusReleased && m.status != StatusNoMem {
			r.err = fmt.Errorf("%w: cast with status %d", ErrInvalid, m.status)
		}
	case msgBast:
		m.lock = r.u64("lock")
		m.mode = r.mode("mode")
		if r.err == nil && !m.mode.Valid() {
			r.err = fmt.Errorf("%w: blocking callback for mode %v", ErrInvalid, m.mode)
		}
	case msgNotMaster:
		m.lock = r.u64("lock")
	case msgNames:
		switch r.u8("last") {
		case 0:
		case 1:
			m.last = true
		default:
			if r.err == nil {
				r.err = fmt.Errorf("%w: names last flag is not 0 or 1", ErrInvalid)
			}
		}
		n := int(r.u16("name count"))
		for i := 0; i < n && r.err == nil; i++ {
			m.namesb = append(m.namesb, r.name())
		}
	case msgLocksDone:
	case msgRecoverLock:
		m.lock = r.u64("lock")
		m.mode = r.mode("mode")
		m.rqmode = r.mode("requested mode")
		m.flags = Flags(r.u32("flags"))
		m.seq = r.u32("lvb sequence")
		switch r.u8("bad") {
		case 0:
		case 1:
			m.bad = true
		default:
			if r.err == nil {
				r.err = fmt.Errorf("%w: recover-lock bad flag is not 0 or 1", ErrInvalid)
			}
		}
		m.nameb = r.name()
		m.lvb = r.lvb(lvbLen)
		if r.err == nil && !m.mode.Valid() {
			r.err = fmt.Errorf("%w: recovered lock in mode %v", ErrInvalid, m.mode)
		}
		if r.err == nil && m.rqmode != ModeIV && !middleConversion(m.mode, m.rqmode) && m.flags&ConvDeadlk == 0 {
			r.err = fmt.Errorf("%w: recovered lock %v with undecided conversion to %v", ErrInvalid, m.mode, m.rqmode)
		}
	case msgWriteAck:
		m.wid = r.u64("write id")
	case msgRecoverWrite:
		m.wid = r.u64("write id")
		m.seq = r.u32("lvb sequence")
		m.nameb = r.name()
		m.lvb = r.lvb(lvbLen)

	}
	if r.err != nil {
		return nil, fmt.Errorf("decode %v: %w", m.typ, r.err)
	}
	return r.b, nil
}
