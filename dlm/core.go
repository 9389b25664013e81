package dlm

import (
	"fmt"
	"maps"
	"slices"
)

// MaxResourceName is the longest resource name, in bytes (Linux's
// DLM_RESNAME_MAXLEN).
const MaxResourceName = 64

// DefaultLVBLen is the lock value block length used when a lockspace does not
// choose one. md-cluster needs 64 bytes for its messages.
const DefaultLVBLen = 64

// LockID names a lock inside one Core. The low 32 bits are a slot in the lock
// table (plus one, so the zero LockID is never valid); the high 32 bits count
// how often the slot was reused, so an ID kept after its lock was released can
// never name another lock.
type LockID uint64

// OwnerID names who owns a lock within a Core: a lockspace handle on this node,
// or (on a master) a remote node's process copy. Owner 0 is reserved for
// orphans.
type OwnerID uint32

// CoreConfig configures a Core.
type CoreConfig struct {
	// LVBLen is the length of every lock value block in the lockspace, a
	// positive multiple of 8. Zero means DefaultLVBLen.
	LVBLen int
	// TossLimit is how many unused resources are kept cached (with their
	// LVBs) before the least recently used are dropped. Zero means 1024.
	TossLimit int
}

// Request is a new lock request to Core.Lock.
type Request struct {
	// Resource names the resource, 1..MaxResourceName bytes.
	Resource string
	// Mode is the requested mode.
	Mode Mode
	// Flags are the request flags; Convert, Cancel and ForceUnlock are not
	// allowed here (use Core.Convert and Core.Unlock).
	Flags Flags
	// LVB is the caller's lock value block buffer, exactly LVBLen bytes, or
	// nil. Like the lksb's sb_lvbptr in Linux it is both input and output:
	// the core copies the resource's value into it on grant (with ValBlk) and
	// copies it to the resource on down-conversion or unlock from PW/EX (with
	// ValBlk). It must stay valid for as long as the lock exists.
	LVB []byte
	// Owner owns the lock; see PurgeOwner. Must not be 0.
	Owner OwnerID
	// Blocking asks for blocking callbacks for this lock. Without it the
	// core never queues one (Linux: no bastfn).
	Blocking bool
	// Tag is returned unchanged in every callback for the lock, so the driver
	// can route callbacks without a lookup.
	Tag any
}

// CallbackKind tells completion callbacks from blocking callbacks.
type CallbackKind uint8

const (
	// Completion (Linux: AST, "cast") ends one operation on a lock.
	Completion CallbackKind = iota + 1
	// Blocking (Linux: BAST) tells a holder that its granted mode blocks a
	// request for Mode; it is a hint to release or down-convert.
	Blocking
)

// Callback is one completion or blocking callback, handed to the driver by
// Core.Callbacks in the order the core produced them. For any one lock the
// order is the order the owner must see them in.
type Callback struct {
	Kind CallbackKind
	Lock LockID
	Tag  any
	// Status is the operation's outcome (completions only).
	Status Status
	// Mode is, for a completion, the lock's granted mode after the operation
	// (ModeIV when the lock no longer exists), and for a blocking callback
	// the requested mode that is blocked.
	Mode Mode
	// Flags are the status-block flags of a completion.
	Flags StatusFlags
	// LVBSeq is the sequence number of the value now in the lock's LVB
	// buffer (completions only).
	LVBSeq uint32
}

type lkbState uint8

const (
	stFree lkbState = iota
	stGranted
	stConverting
	stWaiting
)

var stateNames = [...]string{"free", "granted", "converting", "waiting"}

func (s lkbState) String() string { return stateNames[s] }

// lkb is a lock block: one lock on one resource.
type lkb struct {
	id       LockID
	res      *resource
	state    lkbState
	grmode   Mode
	rqmode   Mode
	exflags  Flags // flags of the latest request or conversion
	sbflags  StatusFlags
	lvb      []byte
	lvbseq   uint32
	owner    OwnerID
	tag      any
	blocking bool
	orphan   bool

	highbast     Mode // highest mode a blocking callback was sent for since the last grant
	lastCastMode Mode // mode of the last completion queued
	lastCbMode   Mode // mode of the last callback queued
	lastCbBast   bool // whether the last callback queued was a blocking one
	lvbBad       bool // restored by recovery with a value its holder knew to be invalid
	undecided    bool // restored by recovery amid a PR<->CW conversion: its granted mode is settled when recovery ends

	prev, next *lkb // links in the resource queue named by state
}

// queue is an intrusive FIFO of lock blocks.
type queue struct {
	head, tail *lkb
	n          int
}

func (q *queue) pushBack(l *lkb) {
	l.prev, l.next = q.tail, nil
	if q.tail != nil {
		q.tail.next = l
	} else {
		q.head = l
	}
	q.tail = l
	q.n++
}

func (q *queue) pushFront(l *lkb) {
	l.prev, l.next = nil, q.head
	if q.head != nil {
		q.head.prev = l
	} else {
		q.tail = l
	}
	q.head = l
	q.n++
}

func (q *queue) remove(l *lkb) {
	if l.prev != nil {
		l.prev.next = l.next
	} else {
		q.head = l.next
	}
	if l.next != nil {
		l.next.prev = l.prev
	} else {
		q.tail = l.prev
	}
	l.prev, l.next = nil, nil
	q.n--
}

// resource is a lock resource (Linux: rsb) with its three queues.
type resource struct {
	name    string
	granted queue
	convert queue
	wait    queue
	// grModes and cvModes count the granted modes of the locks on the grant
	// and convert queues, so conflict checks cost O(modes), not O(locks).
	grModes [6]int32
	cvModes [6]int32

	lvb         []byte // nil until first written
	lvbSeq      uint32
	valNotValid bool

	orphans int // orphaned locks on the grant queue

	tossPrev, tossNext *resource
	tossed             bool
}

func (r *resource) empty() bool { return r.granted.n+r.convert.n+r.wait.n == 0 }

// Core is the lock engine of one lockspace on one node: resources, their
// grant, convert and wait queues, the VMS grant rules, conversion deadlock
// handling, lock value blocks and callback generation.
//
// Core is a pure state machine: it does no I/O, starts no goroutines, reads no
// clock and is not safe for concurrent use. Callers step it with Lock,
// Convert, Unlock, Cancel and PurgeOwner and collect the callbacks it produced
// with Callbacks. Deadlines are the caller's business: when one passes, the
// caller cancels the request with CancelStatus(id, StatusTimeout).
type Core struct {
	lvbLen    int
	tossLimit int

	res   map[string]*resource
	slots []*lkb
	free  []uint32

	tossHead, tossTail *resource
	tossN              int
	// evicted names the cached resources dropped since the owner of the
	// core last looked (a master must tell the directory).
	evicted []string

	out []Callback
}

// NewCore returns an empty Core.
func NewCore(cfg CoreConfig) (*Core, error) {
	if cfg.LVBLen == 0 {
		cfg.LVBLen = DefaultLVBLen
	}
	if cfg.LVBLen < 0 || cfg.LVBLen%8 != 0 {
		return nil, fmt.Errorf("%w: LVB length %d is not a positive multiple of 8", ErrInvalid, cfg.LVBLen)
	}
	if cfg.TossLimit == 0 {
		cfg.TossLimit = 1024
	}
	if cfg.TossLimit < 0 {
		return nil, fmt.Errorf("%w: toss limit %d is negative", ErrInvalid, cfg.TossLimit)
	}
	return &Core{
		lvbLen:    cfg.LVBLen,
		tossLimit: cfg.TossLimit,
		res:       make(map[string]*resource),
	}, nil
}

// LVBLen returns the lockspace's lock value block length.
func (c *Core) LVBLen() int { return c.lvbLen }

// Callbacks returns the callbacks produced since the previous call, in order,
// and forgets them. The slice is reused by the next step of the core: the
// caller must be done with it before stepping the core again.
func (c *Core) Callbacks() []Callback {
	out := c.out
	c.out = c.out[:0]
	return out
}

// HasCallbacks reports whether callbacks are waiting to be collected.
func (c *Core) HasCallbacks() bool { return len(c.out) > 0 }

func (c *Core) lookup(id LockID) *lkb {
	slot := uint32(id) - 1
	if uint64(slot) >= uint64(len(c.slots)) {
		return nil
	}
	l := c.slots[slot]
	if l.id != id || l.state == stFree {
		return nil
	}
	return l
}

func (c *Core) allocLkb() *lkb {
	var l *lkb
	if n := len(c.free); n > 0 {
		slot := c.free[n-1]
		c.free = c.free[:n-1]
		l = c.slots[slot]
		gen := uint64(l.id>>32) + 1
		*l = lkb{id: LockID(gen<<32 | uint64(slot+1))}
	} else {
		l = &lkb{id: LockID(1<<32 | uint64(len(c.slots)+1))}
		c.slots = append(c.slots, l)
	}
	l.grmode, l.rqmode = ModeIV, ModeIV
	l.highbast, l.lastCastMode, l.lastCbMode = NL, ModeIV, ModeIV
	return l
}

func (c *Core) freeLkb(l *lkb) {
	r := l.res
	l.state = stFree
	l.res, l.tag, l.lvb = nil, nil, nil
	c.free = append(c.free, uint32(l.id)-1)
	if r != nil && r.empty() {
		c.toss(r)
	}
}

// getResource finds or creates the resource, taking it off the toss list.
func (c *Core) getResource(name string) *resource {
	r := c.res[name]
	if r == nil {
		// A new resource has no value yet. (It may also be one whose
		// master died with no survivor holding a lock on it, so that
		// nobody can tell it from a new one.)
		r = &resource{name: name, valNotValid: true}
		c.res[name] = r
		return r
	}
	if r.tossed {
		c.untoss(r)
	}
	return r
}

func (c *Core) toss(r *resource) {
	r.tossed = true
	r.tossPrev, r.tossNext = c.tossTail, nil
	if c.tossTail != nil {
		c.tossTail.tossNext = r
	} else {
		c.tossHead = r
	}
	c.tossTail = r
	c.tossN++
	for c.tossN > c.tossLimit {
		old := c.tossHead
		c.untoss(old)
		delete(c.res, old.name)
		c.evicted = append(c.evicted, old.name)
	}
}

func (c *Core) untoss(r *resource) {
	if r.tossPrev != nil {
		r.tossPrev.tossNext = r.tossNext
	} else {
		c.tossHead = r.tossNext
	}
	if r.tossNext != nil {
		r.tossNext.tossPrev = r.tossPrev
	} else {
		c.tossTail = r.tossPrev
	}
	r.tossPrev, r.tossNext, r.tossed = nil, nil, false
	c.tossN--
}

// --- queue membership, keeping the mode counts right ---

func (r *resource) add(l *lkb, st lkbState, head bool) {
	l.state = st
	var q *queue
	switch st {
	case stGranted:
		q = &r.granted
		r.grModes[l.grmode]++
	case stConverting:
		q = &r.convert
		r.cvModes[l.grmode]++
	case stWaiting:
		q = &r.wait
	}
	if head {
		q.pushFront(l)
	} else {
		q.pushBack(l)
	}
}

func (r *resource) del(l *lkb) {
	switch l.state {
	case stGranted:
		r.granted.remove(l)
		r.grModes[l.grmode]--
	case stConverting:
		r.convert.remove(l)
		r.cvModes[l.grmode]--
	case stWaiting:
		r.wait.remove(l)
	}
}

// setGrmode changes a queued lock's granted mode, keeping the counts right.
func (r *resource) setGrmode(l *lkb, m Mode) {
	switch l.state {
	case stGranted:
		r.grModes[l.grmode]--
		r.grModes[m]++
	case stConverting:
		r.cvModes[l.grmode]--
		r.cvModes[m]++
	}
	l.grmode = m
}

// --- callbacks ---

func (c *Core) queueCast(l *lkb, st Status) {
	l.lastCastMode = l.grmode
	l.lastCbMode, l.lastCbBast = l.grmode, false
	c.out = append(c.out, Callback{
		Kind: Completion, Lock: l.id, Tag: l.tag, Status: st,
		Mode: l.grmode, Flags: l.sbflags, LVBSeq: l.lvbseq,
	})
}

// queueBast queues a blocking callback for l, unless Linux's suppression
// rules say it is redundant: the blocked mode is compatible with the mode the
// owner was last told it holds, or the callback just before it was a
// blocking callback for the same or a more restrictive mode.
func (c *Core) queueBast(l *lkb, m Mode) {
	if !l.blocking {
		return
	}
	if l.lastCastMode != ModeIV && Compatible(m, l.lastCastMode) {
		return
	}
	if l.lastCbBast {
		prev := l.lastCbMode
		if prev == m || (prev > m && prev > PR) {
			return
		}
	}
	l.lastCbMode, l.lastCbBast = m, true
	c.out = append(c.out, Callback{Kind: Blocking, Lock: l.id, Tag: l.tag, Mode: m})
}

// modesRequireBast: must holder gr be told that rq's request is blocked by it?
func modesRequireBast(gr, rq *lkb) bool {
	if middleConversion(gr.grmode, rq.rqmode) {
		return gr.highbast < EX
	}
	return gr.highbast < rq.rqmode && !Compatible(gr.grmode, rq.rqmode)
}

func (c *Core) sendBastQueue(q *queue, rq *lkb) {
	for gr := q.head; gr != nil; gr = gr.next {
		if gr == rq || !gr.blocking {
			continue
		}
		if modesRequireBast(gr, rq) {
			c.queueBast(gr, rq.rqmode)
			gr.highbast = rq.rqmode
		}
	}
}

// sendBlockingASTs tells the granted holders that rq is now queued behind them.
func (c *Core) sendBlockingASTs(r *resource, rq *lkb) { c.sendBastQueue(&r.granted, rq) }

// sendBlockingASTsAll also tells the converting locks (NoQueueBast).
func (c *Core) sendBlockingASTsAll(r *resource, rq *lkb) {
	c.sendBastQueue(&r.granted, rq)
	c.sendBastQueue(&r.convert, rq)
}

// --- LVB rules ---

// setLVBOnGrant applies the LVB transfer of a grant (new request or
// conversion) from l.grmode to l.rqmode, before the mode changes.
// Like Linux, only a lock using its LVB (ValBlk and a buffer) is told that
// the value is invalid.
//
// Every grant also tells the lock the resource's current LVB sequence, even
// without ValBlk: a holder that later writes the value (an unlock with
// ValBlk) names the sequence its write replaces, which recovery relies on.
func (c *Core) setLVBOnGrant(r *resource, l *lkb) {
	uses := l.lvb != nil && l.exflags&ValBlk != 0
	defer func() { l.lvbseq = r.lvbSeq }()
	switch lvbOperation(l.grmode, l.rqmode) {
	case lvbRead:
		if uses {
			if r.lvb != nil {
				copy(l.lvb, r.lvb)
			} else {
				clear(l.lvb)
			}
		}
	case lvbWrite:
		if l.exflags&IVValBlk != 0 {
			r.valNotValid = true
			return
		}
		if uses {
			c.writeLVB(r, l)
		}
	case lvbNone:
		return
	}
	if uses && r.valNotValid {
		l.sbflags |= ValNotValid
	}
}

func (c *Core) writeLVB(r *resource, l *lkb) {
	if r.lvb == nil {
		r.lvb = make([]byte, c.lvbLen)
	}
	copy(r.lvb, l.lvb)
	r.lvbSeq++
	l.lvbseq = r.lvbSeq
	r.valNotValid = false
}

// setLVBOnUnlock applies the LVB rule of an unlock with the given flags.
func (c *Core) setLVBOnUnlock(r *resource, l *lkb, flags Flags) {
	if l.grmode < PW {
		return
	}
	if flags&IVValBlk != 0 {
		r.valNotValid = true
		return
	}
	if l.lvb != nil && flags&ValBlk != 0 {
		c.writeLVB(r, l)
	}
}

// --- grant rules ---

// conflicts reports whether rq's requested mode conflicts with a granted mode
// counted in modes; self, when counted there with mode selfMode, is left out.
func conflicts(modes *[6]int32, rq Mode, self bool, selfMode Mode) bool {
	for m := NL; m <= EX; m++ {
		n := modes[m]
		if self && m == selfMode {
			n--
		}
		if n > 0 && !compat[m][rq] {
			return true
		}
	}
	return false
}

// canBeGrantedRaw is the VMS grant rule for l at its current rqmode. now is
// true when the request or conversion is being made (not when queued
// requests are re-examined).
func (r *resource) canBeGrantedRaw(l *lkb, now bool) bool {
	conv := l.grmode != ModeIV
	if l.exflags&Expedite != 0 {
		return true
	}
	// Never grant anything that conflicts with a granted lock, or with the
	// granted mode of a lock waiting to convert (6-3).
	if conflicts(&r.grModes, l.rqmode, l.state == stGranted, l.grmode) {
		return false
	}
	if conflicts(&r.cvModes, l.rqmode, l.state == stConverting, l.grmode) {
		return false
	}
	if now && conv {
		// A compatible conversion is granted in place, unless QueCvt asks
		// it to take its turn behind earlier conversions.
		if l.exflags&QueCvt == 0 || r.convert.n == 0 {
			return true
		}
	}
	if l.exflags&NoOrder != 0 {
		return true
	}
	// HeadQue puts the request at the head of its queue, so it is judged as
	// the head would be. (Linux queues it and leaves it there until some
	// other change re-examines the queue; we grant what is grantable.)
	if now && l.exflags&HeadQue != 0 && (conv || r.convert.n == 0) {
		return true
	}
	// 6-3: a queued conversion waits for every conversion ahead of it.
	if !now && conv && r.convert.head == l {
		return true
	}
	// 6-4: a new request is granted at once only when nothing is queued...
	if now && !conv && r.convert.n == 0 && r.wait.n == 0 {
		return true
	}
	// ...and once queued, only when no conversion is queued and it is first.
	if !now && !conv && r.convert.n == 0 && r.wait.head == l {
		return true
	}
	return false
}

// conversionDeadlock reports whether converting l would deadlock with a
// conversion already queued: a lock ahead of l whose requested mode l's
// granted mode blocks (that lock cannot be granted while l holds its mode,
// and l cannot pass it), or a lock behind l that blocks l as l blocks it.
func (r *resource) conversionDeadlock(l *lkb) bool {
	ahead := true
	for o := r.convert.head; o != nil; o = o.next {
		if o == l {
			ahead = false
			continue
		}
		if ahead {
			if !Compatible(l.grmode, o.rqmode) {
				return true
			}
		} else if !Compatible(l.grmode, o.rqmode) && !Compatible(o.grmode, l.rqmode) {
			return true
		}
	}
	return false
}

// canBeGranted wraps the raw rule with conversion deadlock handling (which
// may demote l to NL under ConvDeadlk) and the alternate modes of AltPR and
// AltCW. deadlk reports an unresolved conversion deadlock.
func (c *Core) canBeGranted(r *resource, l *lkb, now bool) (ok, deadlk bool) {
	if r.canBeGrantedRaw(l, now) {
		return true, false
	}
	if l.grmode != ModeIV && l.exflags&NoQueue == 0 && r.conversionDeadlock(l) {
		if l.exflags&ConvDeadlk != 0 {
			r.setGrmode(l, NL)
			l.sbflags |= Demoted
			return false, false
		}
		return false, true
	}
	rq := l.rqmode
	alt := ModeIV
	if rq != PR && l.exflags&AltPR != 0 {
		alt = PR
	} else if rq != CW && l.exflags&AltCW != 0 {
		alt = CW
	}
	if alt != ModeIV {
		l.rqmode = alt
		if r.canBeGrantedRaw(l, now) {
			l.sbflags |= AltMode
			return true, false
		}
		l.rqmode = rq
	}
	return false, false
}

// grant makes l's requested mode its granted mode and puts it on the grant
// queue, applying the LVB rules.
func (c *Core) grant(r *resource, l *lkb) {
	c.setLVBOnGrant(r, l)
	if l.state != stFree {
		r.del(l)
	}
	l.grmode, l.rqmode = l.rqmode, ModeIV
	l.highbast = NL
	r.add(l, stGranted, false)
}

// grantPendingConvert grants what it can from the convert queue, rescanning
// after every grant, and returns the highest mode still blocked.
func (c *Core) grantPendingConvert(r *resource, high Mode, cw *bool) Mode {
	quit := false
rescan:
	hi := ModeIV
	granted, demoted := false, false
	for l := r.convert.head; l != nil; {
		next := l.next
		wasDemoted := l.sbflags&Demoted != 0
		ok, deadlk := c.canBeGranted(r, l, false)
		switch {
		case ok:
			c.grant(r, l)
			c.queueCast(l, StatusOK)
			granted = true
		case !wasDemoted && l.sbflags&Demoted != 0:
			demoted = true
		case deadlk:
			// Only NoDlckWt conversions can sit in a deadlock: tell the
			// owner, so it can cancel or down-convert.
			if l.exflags&NoDlckWt != 0 && l.highbast < l.rqmode {
				c.queueBast(l, l.rqmode)
				l.highbast = l.rqmode
			}
		default:
			hi = max(hi, l.rqmode)
			if l.rqmode == CW {
				*cw = true
			}
		}
		l = next
	}
	if granted {
		goto rescan
	}
	if demoted && !quit {
		quit = true
		goto rescan
	}
	return max(high, hi)
}

// grantPendingWait grants waiting requests in order and returns the highest
// mode still blocked.
func (c *Core) grantPendingWait(r *resource, high Mode, cw *bool) Mode {
	for l := r.wait.head; l != nil; {
		next := l.next
		if ok, _ := c.canBeGranted(r, l, false); ok {
			c.grant(r, l)
			c.queueCast(l, StatusOK)
		} else {
			high = max(high, l.rqmode)
			if l.rqmode == CW {
				*cw = true
			}
		}
		l = next
	}
	return high
}

// grantPending grants whatever the last change made grantable, then tells
// the granted holders about the most restrictive request still blocked.
func (c *Core) grantPending(r *resource) {
	if r.convert.n == 0 && r.wait.n == 0 {
		return
	}
	cw := false
	high := c.grantPendingConvert(r, ModeIV, &cw)
	high = c.grantPendingWait(r, high, &cw)
	if high == ModeIV {
		return
	}
	for l := r.granted.head; l != nil; l = l.next {
		if !l.blocking || !lockRequiresBast(l, high, cw) {
			continue
		}
		if cw && high == PR && l.grmode == PR {
			c.queueBast(l, CW)
		} else {
			c.queueBast(l, high)
		}
		l.highbast = high
	}
}

func lockRequiresBast(gr *lkb, high Mode, cw bool) bool {
	if (gr.grmode == PR && cw) || (gr.grmode == CW && high == PR) {
		return gr.highbast < EX
	}
	return gr.highbast < high && !Compatible(gr.grmode, high)
}

// --- operations ---

func (c *Core) checkLVB(b []byte) error {
	if b != nil && len(b) != c.lvbLen {
		return fmt.Errorf("%w: LVB is %d bytes, lockspace uses %d", ErrInvalid, len(b), c.lvbLen)
	}
	return nil
}

func checkName(name string) error {
	if len(name) == 0 {
		return fmt.Errorf("%w: empty resource name", ErrInvalid)
	}
	if len(name) > MaxResourceName {
		return fmt.Errorf("%w: resource name is %d bytes, at most %d allowed", ErrInvalid, len(name), MaxResourceName)
	}
	return nil
}

func checkLockFlags(mode Mode, flags Flags, conv bool) error {
	if !mode.Valid() {
		return fmt.Errorf("%w: unknown lock mode %d", ErrInvalid, int(mode))
	}
	if bad := flags &^ lockFlagsMask; bad != 0 {
		return fmt.Errorf("%w: flags %v not allowed on a lock request", ErrInvalid, bad)
	}
	if !conv && flags&Convert != 0 {
		return fmt.Errorf("%w: CONVERT on a new request (use Convert)", ErrInvalid)
	}
	if !conv && flags&(QueCvt|ConvDeadlk) != 0 {
		return fmt.Errorf("%w: %v need CONVERT", ErrInvalid, flags&(QueCvt|ConvDeadlk))
	}
	if flags&ConvDeadlk != 0 && flags&NoQueue != 0 {
		return fmt.Errorf("%w: CONVDEADLK with NOQUEUE", ErrInvalid)
	}
	if flags&Expedite != 0 && (conv || flags&(NoQueue|QueCvt) != 0 || mode != NL) {
		return fmt.Errorf("%w: EXPEDITE is only for new NL requests without NOQUEUE", ErrInvalid)
	}
	if flags&Orphan != 0 && conv {
		return fmt.Errorf("%w: ORPHAN on a conversion", ErrInvalid)
	}
	return nil
}

// Lock makes a new lock request. It returns the new lock's ID, or an error
// (ErrInvalid and friends) when the request is refused outright, in which case
// nothing changed and no callback will follow. Otherwise exactly one
// completion callback follows for the request, possibly queued already:
// StatusOK when granted, StatusAgain under NoQueue, StatusCancel or
// StatusTimeout when cancelled, StatusUnlock when force-unlocked first.
//
// With Orphan the request adopts an orphaned Persistent lock of the same
// resource held in the same mode instead of making a new one: the orphan's ID
// is returned; ErrNotFound if the resource has no orphan, ErrAgain if its
// orphans hold other modes.
func (c *Core) Lock(req Request) (LockID, error) {
	if err := c.checkRequest(req); err != nil {
		return 0, err
	}
	if req.Flags&Orphan != 0 {
		return c.adopt(req)
	}
	return c.lockChecked(req), nil
}

// checkRequest refuses a new lock request with bad arguments.
func (c *Core) checkRequest(req Request) error {
	if err := checkName(req.Resource); err != nil {
		return err
	}
	if err := checkLockFlags(req.Mode, req.Flags, false); err != nil {
		return fmt.Errorf("resource %q: %w", req.Resource, err)
	}
	if err := c.checkLVB(req.LVB); err != nil {
		return fmt.Errorf("resource %q: %w", req.Resource, err)
	}
	if req.Flags&ValBlk != 0 && req.LVB == nil {
		return fmt.Errorf("resource %q: %w: VALBLK without an LVB buffer", req.Resource, ErrInvalid)
	}
	if req.Owner == 0 {
		return fmt.Errorf("resource %q: %w: owner 0 is reserved for orphans", req.Resource, ErrInvalid)
	}
	return nil
}

// lockChecked makes a new (not Orphan) request that checkRequest accepted.
func (c *Core) lockChecked(req Request) LockID {
	r := c.getResource(req.Resource)
	l := c.allocLkb()
	l.res = r
	l.rqmode = req.Mode
	l.exflags = req.Flags
	l.lvb = req.LVB
	l.owner = req.Owner
	l.tag = req.Tag
	l.blocking = req.Blocking

	if ok, _ := c.canBeGranted(r, l, true); ok {
		c.grant(r, l)
		c.queueCast(l, StatusOK)
		return l.id
	}
	if l.exflags&NoQueue != 0 {
		if l.exflags&NoQueueBast != 0 {
			c.sendBlockingASTsAll(r, l)
		}
		c.queueCast(l, StatusAgain)
		c.freeLkb(l)
		return l.id
	}
	r.add(l, stWaiting, l.exflags&HeadQue != 0)
	c.sendBlockingASTs(r, l)
	return l.id
}

func (c *Core) adopt(req Request) (LockID, error) {
	r := c.res[req.Resource]
	if r == nil || r.orphans == 0 {
		return 0, fmt.Errorf("resource %q: %w: no orphan lock to adopt", req.Resource, ErrNotFound)
	}
	for l := r.granted.head; l != nil; l = l.next {
		if !l.orphan || l.grmode != req.Mode {
			continue
		}
		l.orphan = false
		r.orphans--
		l.owner, l.tag, l.blocking = req.Owner, req.Tag, req.Blocking
		l.exflags = req.Flags &^ Orphan
		l.lvb = req.LVB
		l.sbflags = 0
		l.lastCastMode, l.lastCbMode, l.lastCbBast = ModeIV, ModeIV, false
		l.highbast = NL
		if l.lvb != nil && l.exflags&ValBlk != 0 {
			if r.lvb != nil {
				copy(l.lvb, r.lvb)
			} else {
				clear(l.lvb)
			}
			l.lvbseq = r.lvbSeq
		}
		if r.valNotValid && l.lvb != nil && l.exflags&ValBlk != 0 {
			l.sbflags |= ValNotValid
		}
		c.queueCast(l, StatusOK)
		return l.id, nil
	}
	return 0, fmt.Errorf("resource %q: %w: orphans hold another mode than %v", req.Resource, ErrAgain, req.Mode)
}

// Convert asks to change a granted lock's mode. lvb, when not nil, replaces
// the lock's LVB buffer (it must be LVBLen bytes). Errors are returned
// synchronously and change nothing: ErrNotFound for an unknown lock, ErrBusy
// when the lock is not granted (a request or conversion is still pending),
// ErrInvalid for bad arguments. Otherwise exactly one completion follows:
// StatusOK (granted), StatusAgain (NoQueue), StatusDeadlock (the conversion
// would deadlock and was cancelled; the lock keeps its mode), StatusCancel or
// StatusTimeout (cancelled), StatusUnlock (force-unlocked first).
func (c *Core) Convert(id LockID, mode Mode, flags Flags, lvb []byte) error {
	l := c.lookup(id)
	if l == nil || l.orphan {
		return fmt.Errorf("lock %x: %w", uint64(id), ErrNotFound)
	}
	if err := checkLockFlags(mode, flags, true); err != nil {
		return fmt.Errorf("lock %x on %q: %w", uint64(id), l.res.name, err)
	}
	if err := c.checkLVB(lvb); err != nil {
		return fmt.Errorf("lock %x on %q: %w", uint64(id), l.res.name, err)
	}
	if l.state != stGranted {
		return fmt.Errorf("lock %x on %q is %v: %w", uint64(id), l.res.name, l.state, ErrBusy)
	}
	if flags&QueCvt != 0 && !quecvtOK[l.grmode][mode] {
		return fmt.Errorf("lock %x on %q: %w: QUECVT from %v to %v is not an up-conversion",
			uint64(id), l.res.name, ErrInvalid, l.grmode, mode)
	}
	if flags&ValBlk != 0 && lvb == nil && l.lvb == nil {
		return fmt.Errorf("lock %x on %q: %w: VALBLK without an LVB buffer", uint64(id), l.res.name, ErrInvalid)
	}
	if lvb != nil {
		l.lvb = lvb
	}
	r := l.res
	l.rqmode = mode
	l.exflags = flags | Convert
	l.sbflags = 0

	ok, deadlk := c.canBeGranted(r, l, true)
	if ok {
		c.grant(r, l)
		c.queueCast(l, StatusOK)
		c.grantPending(r)
		return nil
	}
	if deadlk && l.exflags&NoDlckWt == 0 {
		l.rqmode = ModeIV
		c.queueCast(l, StatusDeadlock)
		return nil
	}
	if l.sbflags&Demoted != 0 {
		// Dropping to NL may have let other conversions through, and then
		// perhaps this one.
		cw := false
		c.grantPendingConvert(r, ModeIV, &cw)
		if r.canBeGrantedRaw(l, true) {
			c.grant(r, l)
			c.queueCast(l, StatusOK)
			c.grantPending(r)
			return nil
		}
	}
	if l.exflags&NoQueue != 0 {
		if l.exflags&NoQueueBast != 0 {
			c.sendBlockingASTsAll(r, l)
		}
		l.rqmode = ModeIV
		c.queueCast(l, StatusAgain)
		return nil
	}
	r.del(l)
	r.add(l, stConverting, l.exflags&HeadQue != 0)
	c.sendBlockingASTs(r, l)
	if deadlk && l.highbast < l.rqmode {
		c.queueBast(l, l.rqmode)
		l.highbast = l.rqmode
	}
	return nil
}

// Unlock releases a lock. flags may hold ValBlk and IVValBlk (the LVB rules
// of an unlock from PW or EX), Cancel (then it is CancelStatus with
// StatusCancel) and ForceUnlock (release even a waiting or converting lock).
// lvb, when not nil, replaces the lock's LVB buffer first. Errors are returned
// synchronously and change nothing: ErrNotFound for an unknown lock, ErrBusy
// for a waiting or converting lock without ForceUnlock. Otherwise one
// completion with StatusUnlock follows (and none for the pending request a
// force-unlock overtook: that request completes with this one).
func (c *Core) Unlock(id LockID, flags Flags, lvb []byte) error {
	if bad := flags &^ unlockFlagsMask; bad != 0 {
		return fmt.Errorf("lock %x: %w: flags %v not allowed on unlock", uint64(id), ErrInvalid, bad)
	}
	if flags&Cancel != 0 && flags&ForceUnlock != 0 {
		return fmt.Errorf("lock %x: %w: CANCEL with FORCEUNLOCK", uint64(id), ErrInvalid)
	}
	if flags&Cancel != 0 {
		return c.CancelStatus(id, StatusCancel)
	}
	l := c.lookup(id)
	if l == nil || l.orphan {
		return fmt.Errorf("lock %x: %w", uint64(id), ErrNotFound)
	}
	if err := c.checkLVB(lvb); err != nil {
		return fmt.Errorf("lock %x on %q: %w", uint64(id), l.res.name, err)
	}
	if l.state != stGranted && flags&ForceUnlock == 0 {
		return fmt.Errorf("lock %x on %q is %v: %w", uint64(id), l.res.name, l.state, ErrBusy)
	}
	if flags&ValBlk != 0 && lvb == nil && l.lvb == nil {
		return fmt.Errorf("lock %x on %q: %w: VALBLK without an LVB buffer", uint64(id), l.res.name, ErrInvalid)
	}
	if lvb != nil {
		l.lvb = lvb
	}
	c.unlock(l, flags, true)
	return nil
}

// unlock removes l, with or without telling its owner, and grants what its
// departure made grantable.
func (c *Core) unlock(l *lkb, flags Flags, notify bool) {
	r := l.res
	c.remove(l, flags, notify)
	c.grantPending(r)
}

// remove takes l off its resource, applying the unlock LVB rule.
func (c *Core) remove(l *lkb, flags Flags, notify bool) {
	r := l.res
	if l.grmode != ModeIV {
		c.setLVBOnUnlock(r, l, flags)
	}
	r.del(l)
	if l.orphan {
		l.orphan = false
		r.orphans--
	}
	l.grmode, l.rqmode = ModeIV, ModeIV
	if notify {
		c.queueCast(l, StatusUnlock)
	}
	c.freeLkb(l)
}

// CancelStatus cancels l's pending request or conversion and completes it
// with status st (StatusCancel for an explicit cancel, StatusTimeout when its
// deadline passed). A cancelled new request ends the lock; a cancelled
// conversion leaves the lock granted in its previous mode (NL if ConvDeadlk
// demoted it). A lock with nothing pending is left alone and nil is returned
// with no callback, as Linux does.
func (c *Core) CancelStatus(id LockID, st Status) error {
	l := c.lookup(id)
	if l == nil || l.orphan {
		return fmt.Errorf("lock %x: %w", uint64(id), ErrNotFound)
	}
	r := l.res
	switch l.state {
	case stWaiting:
		r.del(l)
		c.queueCast(l, st)
		c.freeLkb(l)
		c.grantPending(r)
	case stConverting:
		r.del(l)
		l.rqmode = ModeIV
		r.add(l, stGranted, false)
		c.queueCast(l, st)
		c.grantPending(r)
	}
	return nil
}

// PurgeOwner removes every lock of owner, as when a process holding locks
// exits: locks whose latest request carried Persistent stay granted as
// orphans (a pending conversion of theirs is cancelled), everything else is
// force-unlocked. No callbacks are produced for the owner's locks; others'
// locks may be granted as a result. It returns how many locks were orphaned
// and released.
func (c *Core) PurgeOwner(owner OwnerID) (orphaned, released int) {
	if owner == 0 {
		return 0, 0
	}
	// Detach every lock of the owner before granting anything, so none of
	// its locks is granted (and announced) on the way out.
	var touched []*resource
	for _, l := range c.slots {
		if l.state == stFree || l.owner != owner || l.orphan {
			continue
		}
		r := l.res
		if !slices.Contains(touched, r) {
			touched = append(touched, r)
		}
		if l.exflags&Persistent != 0 && l.state != stWaiting {
			if l.state == stConverting {
				r.del(l)
				l.rqmode = ModeIV
				r.add(l, stGranted, false)
			}
			l.orphan = true
			l.owner, l.tag, l.lvb, l.blocking = 0, nil, nil, false
			r.orphans++
			orphaned++
			continue
		}
		c.remove(l, ForceUnlock, false)
		released++
	}
	for _, r := range touched {
		c.grantPending(r)
	}
	return orphaned, released
}

// --- recovery primitives: used by Space while the lockspace is stopped ---

// dropLocks removes every lock for which drop returns true, without granting
// anything, queueing callbacks or dropping resources (recovery rebuilds
// them). A removed lock held in PW or EX for which invalidate returns true
// invalidates its resource's LVB: its holder died, so the value may be half
// written.
func (c *Core) dropLocks(drop func(*lkb) bool, invalidate func(*lkb) bool) {
	for _, l := range c.slots {
		if l.state == stFree || !drop(l) {
			continue
		}
		r := l.res
		if l.grmode >= PW && invalidate(l) {
			r.valNotValid = true
		}
		r.del(l)
		if l.orphan {
			r.orphans--
		}
		l.state = stFree
		l.res, l.tag, l.lvb = nil, nil, nil
		c.free = append(c.free, uint32(l.id)-1)
	}
}

// restoreGranted puts back a lock granted in mode, as its holder reports it
// during recovery: no grant rules, no callbacks.
func (c *Core) restoreGranted(name string, mode Mode, flags Flags, lvb []byte, lvbseq uint32, lvbBad, undecided bool, owner OwnerID, blocking bool, tag any) LockID {
	r := c.getResource(name)
	l := c.allocLkb()
	l.res, l.grmode, l.exflags, l.lvb, l.lvbseq, l.lvbBad, l.undecided = r, mode, flags, lvb, lvbseq, lvbBad, undecided
	l.owner, l.blocking, l.tag = owner, blocking, tag
	l.lastCastMode = mode
	r.add(l, stGranted, false)
	return l.id
}

// settleUndecided gives every lock restored amid a conversion whose outcome
// its owner could not know the granted mode the other holders allow. A
// PR<->CW conversion: CW if another holds (or converts from) CW, PR if
// another holds PR, else the mode it asked for (Linux: recover_conversion).
// A ConvDeadlk conversion: its old mode, unless the others' modes show it was
// demoted to NL. The owner asks for its conversion again afterwards.
func (c *Core) settleUndecided(requested func(*lkb) Mode) {
	for _, l := range c.slots {
		if l.state == stFree || !l.undecided {
			continue
		}
		l.undecided = false
		r := l.res
		others := func(m Mode) int32 {
			n := r.grModes[m] + r.cvModes[m]
			if l.grmode == m {
				n--
			}
			return n
		}
		mode := l.grmode
		if middleConversion(l.grmode, requested(l)) {
			mode = requested(l)
			if others(CW) > 0 {
				mode = CW
			} else if others(PR) > 0 {
				mode = PR
			}
		}
		// A ConvDeadlk conversion may have been demoted to NL already.
		for m := NL; m <= EX; m++ {
			if others(m) > 0 && !compat[m][mode] {
				mode = NL
				l.sbflags |= Demoted
				break
			}
		}
		r.setGrmode(l, mode)
		l.lastCastMode = mode
	}
}

// recoverLVB sets a rebuilt resource's value the way Linux's recover_lvb
// does: from a lock held above CR if there is one (no writer can have
// changed the value since its holder read or wrote it); otherwise from the
// lock with the highest sequence, and the value is marked invalid, since a
// PW/EX holder may have died with it. Unlike Linux, a holder whose value
// itself came with ValNotValid does not make it valid again.
func (r *resource) recoverLVB(lvbLen int) {
	var best *lkb
	for l := r.granted.head; l != nil; l = l.next {
		if l.lvb == nil {
			continue
		}
		if l.grmode > CR && !l.lvbBad {
			best = l
			break
		}
		if best == nil || int32(l.lvbseq-best.lvbseq) > 0 {
			best = l
		}
	}
	if r.lvb == nil {
		r.lvb = make([]byte, lvbLen)
	}
	if best == nil {
		clear(r.lvb)
		r.lvbSeq, r.valNotValid = 0, true
		return
	}
	copy(r.lvb, best.lvb)
	r.lvbSeq = best.lvbseq
	r.valNotValid = best.grmode <= CR || best.lvbBad
}

// dropEmptyResources forgets every resource without locks, except those in
// keep (recovery clears the cache, as Linux's dlm_clear_toss does), and
// returns their names.
func (c *Core) dropEmptyResources(keep map[string]bool) []string {
	var names []string
	for _, name := range slices.Sorted(maps.Keys(c.res)) {
		r := c.res[name]
		if !r.empty() || keep[name] {
			continue
		}
		if r.tossed {
			c.untoss(r)
		}
		delete(c.res, name)
		names = append(names, name)
	}
	return names
}

// grantAll re-examines every resource's queues after recovery and tosses
// those left empty.
func (c *Core) grantAll() {
	for _, name := range slices.Sorted(maps.Keys(c.res)) {
		r := c.res[name]
		if r == nil {
			continue // dropped by a toss earlier in this loop
		}
		c.grantPending(r)
		if r.empty() && !r.tossed {
			c.toss(r)
		}
	}
}
