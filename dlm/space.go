package dlm

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"strings"
)

// SpaceConfig configures one node's part of a lockspace.
type SpaceConfig struct {
	// Self is this node's ID.
	Self NodeID
	// LVBLen is the lockspace's LVB length (0: DefaultLVBLen). Every node of
	// the lockspace must use the same.
	LVBLen int
	// TossLimit bounds the unused resources this node keeps mastering (0:
	// 1024). When one is dropped its directory entry is removed, so the next
	// user anywhere becomes its master.
	TossLimit int
	// CacheTicks is how many Ticks an unused cached master is remembered;
	// after that the master is looked up again on next use (0: 10).
	CacheTicks int

	// Bounds on what other nodes can make this node keep (see docs/dlm.md,
	// "Bounded resources"); 0 takes the default, SpaceStats counts.

	// MaxPeerLocks bounds the master copies of one remote node's locks
	// kept here (0: DefaultMaxPeerLocks). A request beyond it is refused
	// with StatusNoMem, which the requester's owner gets as ErrNoMem.
	MaxPeerLocks int
	// MaxPeerDirEntries bounds the directory entries here naming one
	// remote node as master, i.e. the resources its lookups created (0:
	// DefaultMaxPeerDirEntries). A lookup that would create one more is
	// refused: the requests waiting on it end with ErrNoMem.
	MaxPeerDirEntries int
	// MaxHeld bounds the messages held for later (of a newer generation,
	// or while the lockspace is stopped) in total (0: DefaultMaxHeld), and
	// MaxHeldPerPeer those from one node (0: DefaultMaxHeldPerPeer). A
	// message beyond them is dropped and counted (SpaceStats.HeldDropped).
	MaxHeld        int
	MaxHeldPerPeer int
}

// Defaults of SpaceConfig's bounds: far above what a node's honest traffic
// needs, small enough that no peer can exhaust memory.
const (
	DefaultMaxPeerLocks      = 1 << 16
	DefaultMaxPeerDirEntries = 1 << 16
	DefaultMaxHeld           = 1 << 18
	DefaultMaxHeldPerPeer    = 1 << 16
)

// SpaceStats are a Space's counters and gauges of its bounded state.
type SpaceStats struct {
	// StaleDropped counts messages dropped for an older generation.
	StaleDropped uint64
	// Held is the number of messages held for later now; HeldDropped
	// counts those dropped because MaxHeld or MaxHeldPerPeer was reached.
	Held        int
	HeldDropped uint64
	// PeerLocks is the number of remote nodes' master copies kept here,
	// PeerDirEntries the directory entries naming a remote master.
	PeerLocks      int
	PeerDirEntries int
	// RefusedLocks and RefusedLookups count requests and lookups refused
	// with StatusNoMem (MaxPeerLocks, MaxPeerDirEntries); RecoveryDropped
	// counts recovery records (names, lookups, locks) beyond what any
	// honest peer can send, ignored.
	RefusedLocks    uint64
	RefusedLookups  uint64
	RecoveryDropped uint64
}

// Outgoing is a message for another node, produced by a Space step. Payload
// is valid until the Space is stepped again.
type Outgoing struct {
	To      NodeID
	Payload []byte
	// Defer marks a message nobody waits for (an unlock, a down-conversion):
	// the driver may hold it briefly so that it travels with the next message
	// to the same node, as long as order is kept.
	Defer bool
	// Flush (with no payload) asks the driver to send at once whatever it
	// holds for To: that node is waiting on something held back.
	Flush bool
}

// Space is one node's part of a lockspace spread over several nodes: the
// resource directory entries that hash to this node, the resources it masters
// (a Core holding local locks and the master copies of remote ones), and the
// process copies of local locks whose resource is mastered elsewhere.
//
// It follows Linux's design: a resource's directory node is chosen by hashing
// its name over the members; the first node to look a resource up becomes its
// master; requesters cache the master; a lock request costs no message when
// the resource is mastered here, and one round trip when the master is known
// and remote. Down-conversions and unlocks are sent without waiting for a
// reply, in order with everything sent later.
//
// Like Core, Space is a pure state machine: no I/O, goroutines or clock. The
// driver calls the local operations and Step for each received message, then
// Ready for the messages to send and the callbacks to run. Messages between
// two nodes must be delivered in order, exactly once (the transport's job).
type Space struct {
	self       NodeID
	gen        uint64
	members    []NodeID
	lvbLen     int
	cacheTicks uint64

	core *Core
	dir  map[string]NodeID   // directory entries this node holds
	rsbs map[string]*rsbInfo // what this node knows of each resource's master
	// procs are local locks on resources mastered elsewhere, by ID.
	procs  map[uint64]*Proc
	nextID uint64
	// mcopies are the master copies of remote nodes' locks; mfree keeps
	// released ones for reuse.
	mcopies map[mkey]*mcopy
	mfree   []*mcopy
	tick    uint64

	// writes are this node's LVB writes sent without waiting (unlocks and
	// down-conversions of locks mastered elsewhere) and not yet acknowledged,
	// per resource in order; recovery resends them (see recovery.go).
	writes  map[string][]pendingWrite
	writeAt map[uint64]string
	nextWID uint64

	// Recovery (see recovery.go).
	stopped      bool
	stopAgain    bool // Stop was called during the current recovery
	rec          *recovery
	held         []heldMsg // messages waiting for recovery to end
	future       []heldMsg // messages of a generation not yet installed here
	cancels      []pendingCancel
	staleDrops   uint64
	recoveredGen uint64

	// Bounds (SpaceConfig) and what each peer uses of them.
	maxPeerLocks, maxPeerDir, maxHeld, maxHeldPeer int
	mcBy, dirBy, heldBy                            map[NodeID]int
	heldN                                          int
	stats                                          SpaceStats

	out    []Outgoing
	outBuf []byte
	cbs    []Callback
}

type pendingWrite struct {
	wid  uint64
	base uint32 // the resource's LVB sequence the write replaces
	lvb  []byte
}

type pendingCancel struct {
	p  *Proc
	st Status
}

// rsbInfo is the requester's view of a resource.
type rsbInfo struct {
	name      string
	master    NodeID // 0 while unknown
	lookingUp bool
	waiting   []*Proc // requests held until the master is known
	remote    int     // local locks mastered elsewhere
	lastUse   uint64
}

type mkey struct {
	node NodeID
	id   uint64
}

// mcopy is the master's copy of a remote node's lock.
type mcopy struct {
	key    mkey
	coreID LockID
	grmode Mode
	rqmode Mode // during recovery: an undecided PR<->CW conversion's target
	flags  Flags
	lvb    []byte
	silent bool // the requester completed this operation itself (down-conversion, unlock)
}

type procState uint8

const (
	pFree       procState = iota
	pLookup               // waiting for the master to be known
	pRequesting           // new request sent to the master
	pGranted
	pConverting
)

// Proc is one local lock as its own node sees it (Linux: the process copy).
// The driver allocates it (typically inside its lock handle) and passes it to
// every operation on that lock; Space fills it in.
type Proc struct {
	name     string
	id       uint64
	coreID   LockID // when the resource is mastered here
	local    bool   // mastered here: the core holds the lock
	master   NodeID // where the request went: every later message for the lock goes there
	state    procState
	grmode   Mode
	rqmode   Mode
	flags    Flags
	lvb      []byte
	lvbseq   uint32
	tag      any
	blocking bool
	owner    OwnerID
	orphan   bool
	rsb      *rsbInfo
	cancelSt Status // a cancel was sent for the pending operation
	// lvbKnown: lvb holds the resource's value as of lvbseq: the last
	// completed operation read or wrote it (ValBlk) and it was valid.
	// Recovery may take only such a value for the resource's.
	lvbKnown bool
}

// Mode returns the lock's granted mode as this node knows it.
func (p *Proc) Mode() Mode { return p.grmode }

// NewSpace returns a node's part of a lockspace; members start as just Self.
func NewSpace(cfg SpaceConfig) (*Space, error) {
	if cfg.Self == 0 {
		return nil, fmt.Errorf("%w: node ID 0", ErrInvalid)
	}
	if cfg.CacheTicks == 0 {
		cfg.CacheTicks = 10
	}
	for _, b := range []struct {
		v   *int
		def int
	}{{&cfg.MaxPeerLocks, DefaultMaxPeerLocks}, {&cfg.MaxPeerDirEntries, DefaultMaxPeerDirEntries},
		{&cfg.MaxHeld, DefaultMaxHeld}, {&cfg.MaxHeldPerPeer, DefaultMaxHeldPerPeer}} {
		if *b.v <= 0 {
			*b.v = b.def
		}
	}
	core, err := NewCore(CoreConfig{LVBLen: cfg.LVBLen, TossLimit: cfg.TossLimit})
	if err != nil {
		return nil, err
	}
	return &Space{
		self: cfg.Self, members: []NodeID{cfg.Self}, lvbLen: core.LVBLen(), cacheTicks: uint64(cfg.CacheTicks),
		core: core, dir: map[string]NodeID{}, rsbs: map[string]*rsbInfo{},
		procs: map[uint64]*Proc{}, mcopies: map[mkey]*mcopy{},
		writes: map[string][]pendingWrite{}, writeAt: map[uint64]string{},
		maxPeerLocks: cfg.MaxPeerLocks, maxPeerDir: cfg.MaxPeerDirEntries, maxHeld: cfg.MaxHeld, maxHeldPeer: cfg.MaxHeldPerPeer,
		mcBy: map[NodeID]int{}, dirBy: map[NodeID]int{}, heldBy: map[NodeID]int{},
	}, nil
}

// Stats returns the Space's counters and the size of its bounded state.
func (s *Space) Stats() SpaceStats {
	st := s.stats
	st.StaleDropped, st.Held, st.PeerLocks = s.staleDrops, s.heldN, len(s.mcopies)
	for _, n := range s.dirBy {
		st.PeerDirEntries += n
	}
	return st
}

// recoveryCap bounds what one peer may make this node keep through
// recovery, where refusing would lose lock state: an honest peer cannot
// exceed it (what it holds was created under the per-node bounds at each
// of the members).
func (s *Space) recoveryCap() int {
	return (s.maxPeerLocks + s.maxPeerDir) * len(s.members)
}

// setDir records name's master in the directory, counting per remote node.
func (s *Space) setDir(name string, master NodeID) {
	if old, ok := s.dir[name]; ok && old != s.self {
		s.dirBy[old]--
	}
	s.dir[name] = master
	if master != s.self {
		s.dirBy[master]++
	}
}

// delDir removes name's directory entry if master holds it.
func (s *Space) delDir(name string, master NodeID) {
	if m, ok := s.dir[name]; ok && m == master {
		delete(s.dir, name)
		if m != s.self {
			if s.dirBy[m]--; s.dirBy[m] <= 0 {
				delete(s.dirBy, m)
			}
		}
	}
}

// clearDir empties the directory.
func (s *Space) clearDir() {
	s.dir, s.dirBy = map[string]NodeID{}, map[NodeID]int{}
}

// clearMcopies forgets every master copy.
func (s *Space) clearMcopies() {
	s.mcopies, s.mcBy = map[mkey]*mcopy{}, map[NodeID]int{}
}

// LVBLen returns the lockspace's LVB length.
func (s *Space) LVBLen() int { return s.core.LVBLen() }

// Generation returns the generation of the current member list.
func (s *Space) Generation() uint64 { return s.gen }

// Members returns the current member list, sorted.
func (s *Space) Members() []NodeID { return slices.Clone(s.members) }

// SetMembers sets the initial member list (which must include this node) and
// its generation, before use. Later changes go through Stop and Recover.
// Agreed, changing views and recovery come with the membership layer.
func (s *Space) SetMembers(gen uint64, members []NodeID) error {
	ms := slices.Clone(members)
	slices.Sort(ms)
	ms = slices.Compact(ms)
	if !slices.Contains(ms, s.self) {
		return fmt.Errorf("%w: member list %v lacks this node %d", ErrInvalid, ms, s.self)
	}
	if slices.Contains(ms, 0) {
		return fmt.Errorf("%w: member list contains node 0", ErrInvalid)
	}
	if gen < s.gen {
		return fmt.Errorf("%w: generation %d is older than %d", ErrInvalid, gen, s.gen)
	}
	s.gen, s.members = gen, ms
	return nil
}

// dirNode returns the directory node of a resource: its name hashed over the
// sorted members, as Linux does (upper bits of the hash).
func (s *Space) dirNode(name string) NodeID {
	if len(s.members) == 1 {
		return s.members[0]
	}
	h := fnv.New32a()
	h.Write([]byte(name))
	return s.members[(h.Sum32()>>16)%uint32(len(s.members))]
}

// Ready returns the messages to send and the callbacks to run that the last
// steps produced, and forgets them. Both are valid until the next step.
func (s *Space) Ready() ([]Outgoing, []Callback) {
	out, cbs := s.out, s.cbs
	s.out, s.outBuf, s.cbs = s.out[:0], s.outBuf[:0], s.cbs[:0]
	return out, cbs
}

// HasReady reports whether Ready has anything.
func (s *Space) HasReady() bool { return len(s.out) > 0 || len(s.cbs) > 0 }

func (s *Space) send(to NodeID, m *message) {
	start := len(s.outBuf)
	s.outBuf = appendMessage(s.outBuf, m)
	s.out = append(s.out, Outgoing{To: to, Payload: s.outBuf[start:len(s.outBuf):len(s.outBuf)]})
}

// sendDeferred sends a message nobody waits for; see Outgoing.Defer.
func (s *Space) sendDeferred(to NodeID, m *message) {
	s.send(to, m)
	s.out[len(s.out)-1].Defer = true
}

func (s *Space) cast(p *Proc, st Status, sbf StatusFlags) {
	if p.tag == nil {
		return
	}
	s.cbs = append(s.cbs, Callback{Kind: Completion, Lock: LockID(p.id), Tag: p.tag, Status: st, Mode: p.grmode, Flags: sbf, LVBSeq: p.lvbseq})
}

// --- local operations ---

func (s *Space) rsb(name string) *rsbInfo {
	r := s.rsbs[name]
	if r == nil {
		r = &rsbInfo{name: name}
		s.rsbs[name] = r
	}
	r.lastUse = s.tick
	return r
}

// Lock starts a new lock request for p (which must be new or released). It
// validates like Core.Lock; on success exactly one completion follows.
func (s *Space) Lock(p *Proc, req Request) error {
	if s.stopped {
		return fmt.Errorf("resource %q: %w", req.Resource, ErrStopped)
	}
	if err := s.core.checkRequest(req); err != nil {
		return err
	}
	if req.Flags&Orphan != 0 {
		return s.adopt(p, req)
	}
	s.nextID++
	// Field by field: copying a whole struct with pointers costs a bulk
	// write barrier whenever the collector runs, which is often here.
	p.name, p.id, p.coreID, p.local, p.master, p.state = req.Resource, s.nextID, 0, false, 0, pFree
	p.grmode, p.rqmode, p.flags, p.lvb, p.lvbseq = ModeIV, req.Mode, req.Flags, req.LVB, 0
	p.tag, p.blocking, p.owner, p.orphan, p.cancelSt, p.lvbKnown = req.Tag, req.Blocking, req.Owner, false, 0, false
	r := s.rsb(req.Resource)
	p.rsb = r
	switch {
	case r.master == s.self:
		s.lockLocal(p)
	case r.master == 0:
		p.state = pLookup
		r.waiting = append(r.waiting, p)
		r.remote++
		s.lookup(r)
	default:
		r.remote++
		s.request(p)
	}
	return nil
}

// lookup finds the master of r for the requests waiting on it: at once when
// this node holds r's directory entry, else by asking the directory node.
func (s *Space) lookup(r *rsbInfo) {
	if r.lookingUp {
		return
	}
	if d := s.dirNode(r.name); d != s.self {
		r.lookingUp = true
		s.send(d, &message{typ: msgLookup, name: r.name})
		return
	}
	s.lookupReply(r.name, s.dirLookup(r.name, s.self, 0))
}

func (s *Space) lockLocal(p *Proc) {
	p.local = true
	// Space.Lock checked the request already.
	p.coreID = s.core.lockChecked(Request{Resource: p.name, Mode: p.rqmode, Flags: p.flags, LVB: p.lvb,
		Owner: p.owner, Blocking: p.blocking, Tag: p})
	p.state = pRequesting
	s.drainCore()
}

func (s *Space) request(p *Proc) {
	p.state = pRequesting
	p.master = p.rsb.master
	s.procs[p.id] = p
	// Blocking callbacks are always asked for: besides the owner's handler
	// (if any), they tell this node that someone waits, so that it sends
	// what it holds back at once.
	m := message{typ: msgRequest, lock: p.id, name: p.name, mode: p.rqmode, flags: p.flags, bast: true}
	s.send(p.master, &m)
}

// ReplyFrom returns the node whose message is expected to complete p's
// pending operation: its master, or the directory node while the master is
// being looked up; 0 when no remote message is awaited (mastered here, or
// the lockspace is stopped and recovery will settle it). It is a hint for
// the driver's waiting, never a promise.
func (s *Space) ReplyFrom(p *Proc) NodeID {
	switch {
	case s.stopped || p.local:
		return 0
	case p.state == pLookup:
		if d := s.dirNode(p.name); d != s.self {
			return d
		}
		return 0
	case p.master != 0 && p.master != s.self:
		return p.master
	}
	return 0
}

// statusOf maps an error of this package to its Status.
func statusOf(err error) Status {
	var st Status
	if errors.As(err, &st) {
		return st
	}
	return StatusInvalid
}

func (s *Space) adopt(p *Proc, req Request) error {
	other := false
	for _, id := range slices.Sorted(maps.Keys(s.procs)) { // deterministic: the oldest orphan first
		o := s.procs[id]
		if !o.orphan || o.name != req.Resource {
			continue
		}
		if o.grmode != req.Mode {
			other = true
			continue
		}
		// A remote-mastered orphan: ownership moves here; the master's copy
		// is unchanged. (Its LVB is not re-read.)
		delete(s.procs, o.id)
		*p = *o
		p.orphan, p.owner, p.tag, p.blocking, p.lvb = false, req.Owner, req.Tag, req.Blocking, req.LVB
		p.flags = req.Flags &^ Orphan
		s.procs[p.id] = p
		s.cast(p, StatusOK, 0)
		return nil
	}
	if r := s.rsbs[req.Resource]; r != nil && r.master == s.self {
		*p = Proc{name: req.Resource, grmode: ModeIV, rqmode: req.Mode, lvb: req.LVB, tag: req.Tag,
			blocking: req.Blocking, owner: req.Owner, flags: req.Flags &^ Orphan, local: true, rsb: r}
		id, err := s.core.Lock(Request{Resource: req.Resource, Mode: req.Mode, Flags: req.Flags, LVB: req.LVB,
			Owner: req.Owner, Blocking: req.Blocking, Tag: p})
		if err == nil {
			s.nextID++
			p.id, p.coreID, p.state = s.nextID, id, pRequesting
			s.drainCore()
			return nil
		}
		if errors.Is(err, ErrAgain) {
			return err
		}
	}
	if other {
		return fmt.Errorf("resource %q: %w: orphans hold another mode than %v", req.Resource, ErrAgain, req.Mode)
	}
	return fmt.Errorf("resource %q: %w: no orphan lock to adopt", req.Resource, ErrNotFound)
}

func (s *Space) checkProc(p *Proc) error {
	if p.state == pFree || p.orphan {
		return fmt.Errorf("lock on %q: %w", p.name, ErrNotFound)
	}
	return nil
}

// Convert starts a conversion of p. Errors are returned at once and change
// nothing; otherwise one completion follows. A down-conversion of a lock
// mastered elsewhere completes at once: the master applies it in order
// before anything this node sends later.
func (s *Space) Convert(p *Proc, mode Mode, flags Flags, lvb []byte) error {
	if err := s.checkProc(p); err != nil {
		return err
	}
	if s.stopped {
		return fmt.Errorf("lock on %q: %w", p.name, ErrStopped)
	}
	if p.local {
		if lvb != nil {
			p.lvb = lvb
		}
		if err := s.core.Convert(p.coreID, mode, flags, lvb); err != nil {
			return err
		}
		p.flags = flags | Convert
		p.state = pConverting
		s.drainCore()
		return nil
	}
	if err := checkLockFlags(mode, flags, true); err != nil {
		return fmt.Errorf("lock on %q: %w", p.name, err)
	}
	if err := s.core.checkLVB(lvb); err != nil {
		return fmt.Errorf("lock on %q: %w", p.name, err)
	}
	if p.state != pGranted {
		return fmt.Errorf("lock on %q: %w", p.name, ErrBusy)
	}
	if flags&QueCvt != 0 && !quecvtOK[p.grmode][mode] {
		return fmt.Errorf("lock on %q: %w: QUECVT from %v to %v is not an up-conversion", p.name, ErrInvalid, p.grmode, mode)
	}
	if flags&ValBlk != 0 && lvb == nil && p.lvb == nil {
		return fmt.Errorf("lock on %q: %w: VALBLK without an LVB buffer", p.name, ErrInvalid)
	}
	if lvb != nil {
		p.lvb = lvb
	}
	p.flags, p.cancelSt = flags|Convert, 0
	m := message{typ: msgConvert, lock: p.id, mode: mode, flags: p.flags}
	if flags&ValBlk != 0 {
		m.lvb = p.lvb
	}
	if lvbOperation(p.grmode, mode) == lvbWrite {
		switch {
		case flags&IVValBlk != 0:
			p.lvbKnown = false
			m.wid = s.recordWrite(p, true)
		case flags&ValBlk != 0 && p.lvb != nil:
			p.lvbKnown = true // it is now the resource's value
			m.wid = s.recordWrite(p, false)
		}
	}
	if downConversion(p.grmode, mode) {
		s.sendDeferred(p.master, &m)
		p.grmode = mode
		s.cast(p, StatusOK, 0)
		return nil
	}
	s.send(p.master, &m)
	p.state, p.rqmode = pConverting, mode
	return nil
}

// Unlock releases p (see Core.Unlock for the flags). The completion comes at
// once: for a lock mastered elsewhere the unlock is sent without waiting.
func (s *Space) Unlock(p *Proc, flags Flags, lvb []byte) error {
	if bad := flags &^ unlockFlagsMask; bad != 0 {
		return fmt.Errorf("lock on %q: %w: flags %v not allowed on unlock", p.name, ErrInvalid, bad)
	}
	if flags&Cancel != 0 && flags&ForceUnlock != 0 {
		return fmt.Errorf("lock on %q: %w: CANCEL with FORCEUNLOCK", p.name, ErrInvalid)
	}
	if flags&Cancel != 0 {
		return s.Cancel(p, StatusCancel)
	}
	if err := s.checkProc(p); err != nil {
		return err
	}
	if s.stopped {
		return fmt.Errorf("lock on %q: %w", p.name, ErrStopped)
	}
	if err := s.core.checkLVB(lvb); err != nil {
		return fmt.Errorf("lock on %q: %w", p.name, err)
	}
	if p.local {
		if err := s.core.Unlock(p.coreID, flags, lvb); err != nil {
			return err
		}
		if lvb != nil {
			p.lvb = lvb
		}
		s.drainCore()
		return nil
	}
	if p.state != pGranted && flags&ForceUnlock == 0 {
		return fmt.Errorf("lock on %q: %w", p.name, ErrBusy)
	}
	if flags&ValBlk != 0 && lvb == nil && p.lvb == nil {
		return fmt.Errorf("lock on %q: %w: VALBLK without an LVB buffer", p.name, ErrInvalid)
	}
	if lvb != nil {
		p.lvb = lvb
	}
	if p.state == pLookup {
		p.rsb.waiting = slices.DeleteFunc(p.rsb.waiting, func(o *Proc) bool { return o == p })
	} else {
		m := message{typ: msgUnlock, lock: p.id, flags: flags}
		if flags&ValBlk != 0 {
			m.lvb = p.lvb
		}
		if p.state == pGranted && p.grmode >= PW {
			switch {
			case flags&IVValBlk != 0:
				m.wid = s.recordWrite(p, true)
			case flags&ValBlk != 0 && p.lvb != nil:
				m.wid = s.recordWrite(p, false)
			}
		}
		if p.state == pGranted {
			s.sendDeferred(p.master, &m)
		} else {
			s.send(p.master, &m) // it may be granted meanwhile: let it go
		}
	}
	s.freeProc(p)
	s.cast(p, StatusUnlock, 0)
	return nil
}

// knowsValue reports whether, after a grant from prev to mode, p's buffer
// holds the resource's current value: the grant read or wrote it (ValBlk),
// did not invalidate it, and the value was valid.
func knowsValue(p *Proc, prev, mode Mode, sbf StatusFlags) bool {
	if p.flags&ValBlk == 0 || p.flags&IVValBlk != 0 || sbf&ValNotValid != 0 {
		return false
	}
	return lvbOperation(prev, mode) != lvbNone
}

// recordWrite remembers an LVB write sent without waiting until the master
// acknowledges it, and returns its ID.
// An invalidation (IVValBlk) is recorded as a write without a value.
func (s *Space) recordWrite(p *Proc, invalidate bool) uint64 {
	s.nextWID++
	w := pendingWrite{wid: s.nextWID, base: p.lvbseq}
	if !invalidate {
		w.lvb = bytes.Clone(p.lvb)
		p.lvbseq++ // what the master's sequence becomes
	}
	s.writes[p.name] = append(s.writes[p.name], w)
	s.writeAt[w.wid] = p.name
	return w.wid
}

// writeAcked forgets an acknowledged write.
func (s *Space) writeAcked(wid uint64) {
	name, ok := s.writeAt[wid]
	if !ok {
		return
	}
	delete(s.writeAt, wid)
	ws := slices.DeleteFunc(s.writes[name], func(w pendingWrite) bool { return w.wid == wid })
	if len(ws) == 0 {
		delete(s.writes, name)
	} else {
		s.writes[name] = ws
	}
}

func (s *Space) freeProc(p *Proc) {
	p.state, p.grmode, p.rqmode = pFree, ModeIV, ModeIV
	if !p.local {
		delete(s.procs, p.id)
		p.rsb.remote--
		p.rsb.lastUse = s.tick
	}
}

// Cancel cancels p's pending request or conversion, which completes with st
// (StatusCancel or StatusTimeout). With nothing pending it does nothing.
func (s *Space) Cancel(p *Proc, st Status) error {
	if err := s.checkProc(p); err != nil {
		return err
	}
	if s.stopped {
		// Done when recovery ends (the request may even be granted first).
		s.cancels = append(s.cancels, pendingCancel{p, st})
		return nil
	}
	if p.local {
		if err := s.core.CancelStatus(p.coreID, st); err != nil {
			return err
		}
		s.drainCore()
		return nil
	}
	switch p.state {
	case pLookup:
		p.rsb.waiting = slices.DeleteFunc(p.rsb.waiting, func(o *Proc) bool { return o == p })
		s.freeProc(p)
		s.cast(p, st, 0)
	case pRequesting, pConverting:
		p.cancelSt = st
		s.send(p.master, &message{typ: msgCancel, lock: p.id, status: st})
	}
	return nil
}

// PurgeOwner drops every lock of owner on this node, as Core.PurgeOwner does:
// Persistent granted locks become orphans (kept at their master), the rest
// are released. No callbacks are produced for the owner.
func (s *Space) PurgeOwner(owner OwnerID) (orphaned, released int) {
	o, r := s.core.PurgeOwner(owner)
	orphaned, released = o, r
	ids := make([]uint64, 0, len(s.procs))
	for id, p := range s.procs {
		if p.owner == owner && !p.orphan {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		p := s.procs[id]
		if p.flags&Persistent != 0 && (p.state == pGranted || p.state == pConverting) {
			if p.state == pConverting {
				s.send(p.master, &message{typ: msgCancel, lock: p.id, status: StatusCancel})
			}
			p.orphan, p.owner, p.tag, p.lvb, p.blocking = true, 0, nil, nil, false
			orphaned++
			continue
		}
		s.send(p.master, &message{typ: msgUnlock, lock: p.id, flags: ForceUnlock})
		s.freeProc(p)
		released++
	}
	for _, rb := range s.rsbs {
		n := len(rb.waiting)
		rb.waiting = slices.DeleteFunc(rb.waiting, func(p *Proc) bool { return p.owner == owner })
		rb.remote -= n - len(rb.waiting)
		released += n - len(rb.waiting)
	}
	s.drainCore()
	return orphaned, released
}

// Tick advances the Space's clock by one unit: cached masters unused for
// CacheTicks are forgotten.
func (s *Space) Tick() {
	s.tick++
	for name, r := range s.rsbs {
		if r.master != s.self && r.remote == 0 && !r.lookingUp && s.tick-r.lastUse > s.cacheTicks {
			delete(s.rsbs, name)
		}
	}
}

// --- the directory ---

// dirLookup answers a lookup at this (directory) node: the recorded master,
// or asker as the new master; 0 (refused) when that would give a remote
// asker more than limit entries.
func (s *Space) dirLookup(name string, asker NodeID, limit int) NodeID {
	if m, ok := s.dir[name]; ok {
		return m
	}
	if asker != s.self && s.dirBy[asker] >= limit {
		return 0
	}
	s.setDir(name, asker)
	return asker
}

// newMcopy returns a reset master copy, reusing a released one (keeping
// its LVB buffer) when there is one.
func (s *Space) newMcopy() *mcopy {
	if n := len(s.mfree); n > 0 {
		mc := s.mfree[n-1]
		s.mfree = s.mfree[:n-1]
		*mc = mcopy{lvb: mc.lvb}
		return mc
	}
	return &mcopy{}
}

// --- master side: the core's callbacks ---

// drainCore turns the core's callbacks into local callbacks (for local
// locks) and messages (for remote nodes' locks), and acts on dropped
// resources.
func (s *Space) drainCore() {
	for _, cb := range s.core.Callbacks() {
		switch t := cb.Tag.(type) {
		case *Proc:
			p := t
			if cb.Kind == Blocking {
				s.cbs = append(s.cbs, Callback{Kind: Blocking, Lock: LockID(p.id), Tag: p.tag, Mode: cb.Mode})
				continue
			}
			if cb.Status == StatusOK {
				p.lvbKnown = knowsValue(p, p.grmode, cb.Mode, cb.Flags)
			}
			p.grmode, p.lvbseq = cb.Mode, cb.LVBSeq
			if cb.Mode == ModeIV {
				p.state = pFree
			} else {
				p.state = pGranted
			}
			s.cbs = append(s.cbs, Callback{Kind: Completion, Lock: LockID(p.id), Tag: p.tag, Status: cb.Status,
				Mode: cb.Mode, Flags: cb.Flags, LVBSeq: cb.LVBSeq})
		case *mcopy:
			mc := t
			if cb.Kind == Blocking {
				s.send(mc.key.node, &message{typ: msgBast, lock: mc.key.id, mode: cb.Mode})
				continue
			}
			mc.grmode = cb.Mode
			if !mc.silent {
				m := message{typ: msgCast, lock: mc.key.id, status: cb.Status, mode: cb.Mode, sbf: cb.Flags, seq: cb.LVBSeq}
				if cb.Status == StatusOK && mc.flags&ValBlk != 0 && mc.lvb != nil {
					m.lvb = mc.lvb
				}
				s.send(mc.key.node, &m)
			}
			mc.silent = false
			if cb.Mode == ModeIV {
				// The lock is gone: nothing refers to the copy any more.
				delete(s.mcopies, mc.key)
				if s.mcBy[mc.key.node]--; s.mcBy[mc.key.node] <= 0 {
					delete(s.mcBy, mc.key.node)
				}
				s.mfree = append(s.mfree, mc)
			}
		}
	}
	for _, name := range s.core.evicted {
		s.dropMastery(name)
	}
	s.core.evicted = s.core.evicted[:0]
}

// dropMastery forgets a resource this node mastered and no longer caches,
// clearing its directory entry so the next user becomes master.
func (s *Space) dropMastery(name string) {
	if r := s.rsbs[name]; r != nil && r.master == s.self {
		// No longer master: the next use anywhere, here included, goes
		// through the directory.
		r.master = 0
		if r.remote == 0 && len(r.waiting) == 0 {
			delete(s.rsbs, name)
		}
	}
	if d := s.dirNode(name); d == s.self {
		s.delDir(name, s.self)
	} else {
		s.send(d, &message{typ: msgRemove, name: name})
	}
}

// --- received messages ---

// Step applies a message that node from sent in generation gen. A message
// of an older generation is dropped (and counted), never applied; one of a
// newer generation waits until this node recovers into it; while the
// lockspace is stopped, all but recovery's messages wait. A malformed
// message is refused with an error and changes nothing.
func (s *Space) Step(from NodeID, gen uint64, payload []byte) error {
	if gen < s.gen {
		s.staleDrops++
		return nil
	}
	if gen > s.gen {
		s.holdMessage(&s.future, from, gen, payload)
		return nil
	}
	if len(payload) == 0 {
		return fmt.Errorf("from node %d: %w: empty payload", from, ErrInvalid)
	}
	// A payload carries one message or several back to back; each is
	// handled as if it had come alone, in order.
	for len(payload) > 0 {
		var m message
		rest, err := decodeNext(payload, s.lvbLen, &m)
		if err != nil {
			return fmt.Errorf("from node %d: %w", from, err)
		}
		if err := s.stepOne(from, gen, payload[:len(payload)-len(rest)], &m); err != nil {
			return err
		}
		payload = rest
	}
	return nil
}

// stepOne handles one decoded message; raw is its encoding (kept if the
// message must wait for recovery to end).
func (s *Space) stepOne(from NodeID, gen uint64, raw []byte, mp *message) error {
	m := mp
	if from == 0 || from == s.self {
		return fmt.Errorf("%w: %v message from node %d", ErrInvalid, m.typ, from)
	}
	if s.stopped {
		if s.rec != nil && m.typ.recovery() {
			s.stepRecovery(from, m)
		} else {
			s.holdMessage(&s.held, from, gen, raw)
		}
		return nil
	}
	if m.typ == msgNames || m.typ == msgLocksDone || m.typ == msgRecoverLock || m.typ == msgRecoverWrite {
		return fmt.Errorf("%w: %v message from node %d outside recovery", ErrInvalid, m.typ, from)
	}
	switch m.typ {
	case msgLookup:
		name := string(m.nameb)
		master := s.dirLookup(name, from, s.maxPeerDir)
		if master == 0 {
			s.stats.RefusedLookups++ // master 0 on the wire: refused
		}
		s.send(from, &message{typ: msgLookupReply, name: name, master: master})
	case msgRemove:
		s.delDir(string(m.nameb), from)
	case msgLookupReply:
		if m.master == 0 {
			s.lookupRefused(string(m.nameb))
			return nil
		}
		s.lookupReply(string(m.nameb), m.master)
	case msgRequest:
		s.masterRequest(from, m)
	case msgConvert, msgUnlock, msgCancel:
		s.masterOp(from, m)
	case msgCast:
		s.remoteCast(m)
	case msgBast:
		p := s.procs[m.lock]
		if p == nil || Compatible(m.mode, p.grmode) {
			// Released or down-converted here already, maybe still held
			// back: someone waits for it at the master.
			s.out = append(s.out, Outgoing{To: from, Flush: true})
			return nil
		}
		if p.tag != nil && p.blocking {
			s.cbs = append(s.cbs, Callback{Kind: Blocking, Lock: LockID(p.id), Tag: p.tag, Mode: m.mode})
		}
	case msgWriteAck:
		s.writeAcked(m.wid)
	case msgNotMaster:
		if p := s.procs[m.lock]; p != nil && p.state == pRequesting {
			delete(s.procs, p.id)
			r := p.rsb
			if r.master != 0 && r.master != s.self {
				r.master = 0
			}
			p.state = pLookup
			r.waiting = append(r.waiting, p)
			if r.master == 0 {
				s.lookup(r)
			} else {
				s.lookupReply(r.name, r.master)
			}
		}
	}
	return nil
}

func (s *Space) lookupReply(name string, master NodeID) {
	r := s.rsbs[name]
	if r == nil {
		return
	}
	r.lookingUp = false
	r.master = master
	waiting := r.waiting
	r.waiting = nil
	for _, p := range waiting {
		if master == s.self {
			r.remote--
			s.lockLocal(p)
		} else {
			s.request(p)
		}
	}
}

// lookupRefused ends the requests waiting for name's master with
// StatusNoMem: the directory node refused to record this node as the
// master of one more resource (SpaceConfig.MaxPeerDirEntries there).
func (s *Space) lookupRefused(name string) {
	r := s.rsbs[name]
	if r == nil || !r.lookingUp {
		return
	}
	r.lookingUp = false
	waiting := r.waiting
	r.waiting = nil
	for _, p := range waiting {
		s.freeProc(p)
		s.cast(p, StatusNoMem, 0)
	}
}

func (s *Space) masterRequest(from NodeID, m *message) {
	r := s.rsbs[string(m.nameb)]
	if r == nil || r.master != s.self {
		s.send(from, &message{typ: msgNotMaster, lock: m.lock})
		return
	}
	key := mkey{from, m.lock}
	if s.mcopies[key] != nil {
		return // a duplicate: the transport should never deliver one
	}
	if s.mcBy[from] >= s.maxPeerLocks {
		s.stats.RefusedLocks++
		s.send(from, &message{typ: msgCast, lock: m.lock, status: StatusNoMem, mode: ModeIV})
		return
	}
	mc := s.newMcopy()
	mc.key, mc.grmode, mc.flags = key, ModeIV, m.flags
	if m.flags&ValBlk != 0 && mc.lvb == nil {
		mc.lvb = make([]byte, s.lvbLen)
	}
	id, err := s.core.Lock(Request{Resource: r.name, Mode: m.mode, Flags: m.flags &^ Orphan, LVB: mc.lvb,
		Owner: OwnerID(remoteOwner | uint32(from)), Blocking: m.bast, Tag: mc})
	if err != nil {
		s.mfree = append(s.mfree, mc)
		s.send(from, &message{typ: msgCast, lock: m.lock, status: statusOf(err), mode: ModeIV})
		return
	}
	mc.coreID = id
	s.mcopies[key] = mc
	s.mcBy[from]++
	s.drainCore()
}

func (s *Space) masterOp(from NodeID, m *message) {
	mc := s.mcopies[mkey{from, m.lock}]
	if mc == nil {
		if m.wid != 0 {
			s.sendDeferred(from, &message{typ: msgWriteAck, wid: m.wid})
		}
		return // the lock is gone here already (e.g. cancelled and released)
	}
	if len(m.lvb) > 0 {
		if mc.lvb == nil {
			mc.lvb = make([]byte, s.lvbLen)
		}
		copy(mc.lvb, m.lvb)
	}
	var err error
	switch m.typ {
	case msgConvert:
		mc.flags = m.flags
		if mc.flags&ValBlk != 0 && mc.lvb == nil {
			mc.lvb = make([]byte, s.lvbLen)
		}
		mc.silent = downConversion(mc.grmode, m.mode)
		err = s.core.Convert(mc.coreID, m.mode, m.flags, mc.lvb)
	case msgUnlock:
		mc.silent = true
		err = s.core.Unlock(mc.coreID, m.flags|ForceUnlock, mc.lvb)
	case msgCancel:
		err = s.core.CancelStatus(mc.coreID, m.status)
	}
	if m.wid != 0 {
		s.sendDeferred(from, &message{typ: msgWriteAck, wid: m.wid})
	}
	if err != nil {
		mc.silent = false
		if m.typ == msgConvert {
			s.send(from, &message{typ: msgCast, lock: m.lock, status: statusOf(err), mode: mc.grmode})
		}
		return
	}
	s.drainCore()
}

func (s *Space) remoteCast(m *message) {
	p := s.procs[m.lock]
	if p == nil {
		return // released here meanwhile
	}
	prev := p.grmode
	if p.state == pConverting && m.sbf&Demoted != 0 {
		prev = NL
	}
	if m.status == StatusOK && p.flags&ValBlk != 0 && p.lvb != nil && lvbOperation(prev, m.mode) == lvbRead && len(m.lvb) == len(p.lvb) {
		copy(p.lvb, m.lvb)
	}
	if m.status == StatusOK {
		p.lvbKnown = knowsValue(p, prev, m.mode, m.sbf)
	}
	p.grmode, p.lvbseq = m.mode, m.seq
	p.rqmode, p.cancelSt = ModeIV, 0
	if m.mode == ModeIV {
		s.freeProc(p)
	} else {
		p.state = pGranted
	}
	s.cast(p, m.status, m.sbf)
}

// remoteOwner marks core owners that stand for another node's locks.
const remoteOwner = 0x80000000

// Dump describes the lockspace as this node sees it, sorted by name: every
// resource mastered here with its full queues (each lock with its node),
// the idle cached ones included (ResourceInfo.Idle), then every resource
// mastered elsewhere on which this node has locks, with those locks only.
// Each lock shows the ID its own node gives it (see LockInfo.ID).
func (s *Space) Dump() []ResourceInfo {
	out := s.core.resources(true, func(l *lkb, li *LockInfo) {
		switch t := l.tag.(type) {
		case *Proc:
			li.ID, li.Node = LockID(t.id), s.self
		case *mcopy:
			li.ID, li.Node = LockID(t.key.id), t.key.node
		default: // an orphan of this node: no handle knows it
			li.ID, li.Node = 0, s.self
		}
	})
	for i := range out {
		out[i].Master = s.self
	}
	idx := map[string]int{}
	var remote []ResourceInfo
	add := func(p *Proc) {
		i, ok := idx[p.name]
		if !ok {
			i = len(remote)
			idx[p.name] = i
			remote = append(remote, ResourceInfo{Name: p.name, Master: p.rsb.master})
		}
		ri := &remote[i]
		li := LockInfo{ID: LockID(p.id), Node: s.self, Owner: p.owner, Granted: p.grmode, Requested: p.rqmode,
			Flags: p.flags, Orphan: p.orphan}
		switch p.state {
		case pGranted:
			li.State, li.Requested = "granted", ModeIV
			ri.Granted = append(ri.Granted, li)
		case pConverting:
			li.State = "converting"
			ri.Converting = append(ri.Converting, li)
		default:
			li.State = "waiting"
			ri.Waiting = append(ri.Waiting, li)
		}
	}
	for _, id := range slices.Sorted(maps.Keys(s.procs)) {
		add(s.procs[id])
	}
	for _, name := range slices.Sorted(maps.Keys(s.rsbs)) {
		for _, p := range s.rsbs[name].waiting {
			add(p)
		}
	}
	out = append(out, remote...)
	slices.SortFunc(out, func(a, b ResourceInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}
