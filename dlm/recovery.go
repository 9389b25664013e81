package dlm

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
)

// Recovery, when the membership changes.
//
// The membership layer first stops the lockspace on every member (Stop),
// agrees on the new view and fences the departed nodes, then tells every
// member to recover into the new view (Recover). Recovery rebuilds all
// remote lock state from the requesters' side, in Linux's order:
//
//  1. Apply the membership; drop cached idle resources; every master drops
//     the master copies of all remote locks (a departed PW/EX holder
//     invalidates the resource's LVB); forget masters that departed; clear
//     the directory.
//  2. Rebuild the directory: every node sends each directory node the names
//     of the resources it still masters (names). A directory node answers
//     lookups only once it has heard from every member.
//  3. Choose new masters and resend locks: every node looks up, in the
//     rebuilt directory, the master of each remote resource it holds locks on
//     (cached masters are not trusted across a view change), and sends each
//     lock (granted or converting) there (recover-lock); the first node to
//     look up a resource whose master departed becomes its new master. Then
//     it tells every member it is done (locks-done).
//  4. When every member is done: new masters recover the LVB (from a lock
//     above CR, else from the highest sequence and marked invalid), every
//     master grants what became grantable, and the node resumes: pending
//     requests and conversions are sent again, held messages are applied.
//
// Because the masters rebuild from what the requesters hold, a message of
// the old generation lost in flight (a grant, an unlock) changes nothing:
// those messages are dropped, never applied. A second failure during
// recovery simply starts it again in the next generation.

type recovery struct {
	gen       uint64
	mastered  map[string]bool // resources this node masters that survive
	rebuilt   map[string]bool // resources this node masters afresh
	names     map[NodeID]bool // members whose names arrived (this node included)
	dirReady  bool
	held      []mkeyName         // lookups waiting for the directory
	asked     map[string]bool    // master lookups this node started
	lookups   map[string][]*Proc // locks waiting for their master to be known
	resend    []*Proc            // locks still to resend (while their master is looked up)
	reconvert []*Proc            // conversions to send again after recovery
	sentDone  bool
	done      map[NodeID]bool
	rwrites   []recoverWrite // writes resent to this node, applied when recovery ends
	// starting is set while Recover itself runs: a recovery that could
	// complete at once (a lone survivor) completes at its end, not halfway.
	starting bool

	// strong lists, per resource, the remote nodes whose PW/EX locks were
	// dropped for rebuilding: if recovery is interrupted and one of them
	// departs before resending, its death must still invalidate the LVB.
	strong map[string][]NodeID
}

type recoverWrite struct {
	from NodeID
	wid  uint64
	name string
	base uint32
	lvb  []byte
}

type mkeyName struct {
	from NodeID
	name string
}

type heldMsg struct {
	from    NodeID
	gen     uint64
	payload []byte
}

// Stop suspends the lockspace for a membership change (or because this node
// lost quorum): local operations fail with ErrStopped until a recovery ends,
// and received messages other than recovery's wait. A Stop during a recovery
// outlasts it: that recovery completes its bookkeeping but grants nothing
// and the lockspace stays stopped until the next Recover.
func (s *Space) Stop() {
	if s.rec != nil {
		s.stopAgain = true
	}
	s.stopped = true
}

// Stopped reports whether the lockspace is stopped or recovering.
func (s *Space) Stopped() bool { return s.stopped }

// TakeRecovered reports, once, that recovery into a generation finished on
// this node since the last call.
func (s *Space) TakeRecovered() (gen uint64, ok bool) {
	if s.recoveredGen == 0 {
		return 0, false
	}
	g := s.recoveredGen
	s.recoveredGen = 0
	return g, true
}

// StaleDropped counts messages dropped because they came from an older
// generation.
func (s *Space) StaleDropped() uint64 { return s.staleDrops }

// Recover starts recovery into view (gen, members). departed are the nodes
// that failed since the last view and have been fenced; reset says this node
// rejoins from an older generation and must drop all its lock state (its
// owners' locks end with ErrReleased).
func (s *Space) Recover(gen uint64, members []NodeID, departed []NodeID, reset bool) error {
	ms := slices.Clone(members)
	slices.Sort(ms)
	ms = slices.Compact(ms)
	if !slices.Contains(ms, s.self) {
		return fmt.Errorf("recover to generation %d: %w: members %v lack this node %d", gen, ErrInvalid, ms, s.self)
	}
	if gen <= s.gen {
		return fmt.Errorf("recover to generation %d: %w: already at generation %d", gen, ErrInvalid, s.gen)
	}
	s.gen, s.members, s.stopped, s.stopAgain = gen, ms, true, false
	if reset {
		s.resetAll()
	}
	gone := map[NodeID]bool{}
	for _, n := range departed {
		gone[n] = true
	}
	rec := &recovery{gen: gen, starting: true, mastered: map[string]bool{}, rebuilt: map[string]bool{}, names: map[NodeID]bool{},
		asked: map[string]bool{}, lookups: map[string][]*Proc{}, done: map[NodeID]bool{}, strong: map[string][]NodeID{}}

	// 1. Master side: idle cached resources go; remote locks are dropped
	// (their holders resend them); what is left with locks is still ours,
	// and so is what an interrupted recovery was still rebuilding.
	var keep map[string]bool
	if old := s.rec; old != nil {
		keep = old.mastered
		for name := range old.rebuilt {
			keep[name] = true
		}
	}
	for _, name := range s.core.dropEmptyResources(keep) {
		if r := s.rsbs[name]; r != nil && r.master == s.self && len(r.waiting) == 0 && r.remote == 0 {
			delete(s.rsbs, name)
		}
	}
	for name := range s.core.res {
		rec.mastered[name] = true
	}
	departedNow := func(n NodeID) bool { return gone[n] || !slices.Contains(ms, n) }
	if old := s.rec; old != nil {
		for _, name := range slices.Sorted(maps.Keys(old.strong)) {
			r := s.core.res[name]
			for _, n := range old.strong[name] {
				switch {
				case departedNow(n) && r != nil:
					r.valNotValid = true
				case !departedNow(n):
					// Still a member, maybe still to resend: remember
					// it through this recovery too.
					rec.strong[name] = append(rec.strong[name], n)
				}
			}
		}
	}
	if old := s.rec; old != nil {
		// Lookups the interrupted recovery held go with it (their
		// senders ask again in this one).
		for _, h := range old.held {
			if h.from != s.self {
				s.unholdOne(h.from)
			}
		}
	}
	s.rec = rec
	s.core.dropLocks(func(l *lkb) bool { return l.owner&remoteOwner != 0 },
		func(l *lkb) bool {
			n := NodeID(l.owner &^ remoteOwner)
			rec.strong[l.res.name] = append(rec.strong[l.res.name], n)
			return departedNow(n)
		})
	s.clearMcopies()
	s.core.evicted = s.core.evicted[:0]
	// Requester side: every cached master is forgotten, so that each lock
	// is resent where the rebuilt directory says, never on a stale cache's
	// word; lookups in flight were lost with the old generation.
	for _, name := range slices.Sorted(maps.Keys(s.rsbs)) {
		r := s.rsbs[name]
		r.lookingUp = false
		if r.master != s.self || !rec.mastered[name] {
			r.master = 0
		}
	}
	s.clearDir()

	// 2. The directory.
	byDir := map[NodeID][]string{}
	for _, name := range slices.Sorted(maps.Keys(rec.mastered)) {
		d := s.dirNode(name)
		if d == s.self {
			s.setDir(name, s.self)
		} else {
			byDir[d] = append(byDir[d], name)
		}
	}
	for _, d := range ms {
		if d == s.self {
			continue
		}
		names := byDir[d]
		for len(names) > 512 {
			s.send(d, &message{typ: msgNames, names: names[:512]})
			names = names[512:]
		}
		s.send(d, &message{typ: msgNames, names: names, last: true})
	}
	s.namesFrom(s.self)

	// 3. Resend locks held on remote resources; requests start over later.
	for _, id := range slices.Sorted(maps.Keys(s.procs)) {
		p := s.procs[id]
		switch p.state {
		case pGranted, pConverting:
			rec.resend = append(rec.resend, p)
		case pRequesting:
			delete(s.procs, p.id)
			p.state = pLookup
			p.rsb.waiting = append(p.rsb.waiting, p)
		}
	}
	resend := rec.resend
	rec.resend = nil
	for _, p := range resend {
		s.resendLock(p)
	}
	// Unacknowledged LVB writes go to the resources' masters too.
	for _, name := range slices.Sorted(maps.Keys(s.writes)) {
		r := s.rsb(name)
		if r.master == s.self {
			s.resendWrites(name, s.self)
		} else {
			s.askMaster(r)
		}
	}
	rec.starting = false
	s.maybeLocksDone()
	s.maybeFinish()

	// Messages of this generation that arrived early.
	future := s.future
	s.future = nil
	s.unhold(future)
	for _, h := range future {
		if err := s.Step(h.from, h.gen, h.payload); err != nil {
			return err
		}
	}
	return nil
}

// resetAll drops every lock this node knows: it rejoins from an older
// generation, so its state must not merge with the cluster's.
func (s *Space) resetAll() {
	var ended []*Proc
	for _, l := range s.core.slots {
		if l.state != stFree {
			if p, ok := l.tag.(*Proc); ok {
				ended = append(ended, p)
			}
		}
	}
	for _, id := range slices.Sorted(maps.Keys(s.procs)) {
		ended = append(ended, s.procs[id])
	}
	for _, name := range slices.Sorted(maps.Keys(s.rsbs)) {
		ended = append(ended, s.rsbs[name].waiting...)
	}
	core, _ := NewCore(CoreConfig{LVBLen: s.lvbLen, TossLimit: s.core.tossLimit})
	s.core = core
	s.rsbs, s.procs = map[string]*rsbInfo{}, map[uint64]*Proc{}
	s.clearDir()
	s.clearMcopies()
	// Held messages belong to the old state; those of the generation being
	// recovered into (s.future) are kept: Recover replays them.
	s.unhold(s.held)
	s.held = nil
	s.writes, s.writeAt = map[string][]pendingWrite{}, map[uint64]string{}
	for _, p := range ended {
		p.state, p.grmode, p.rqmode = pFree, ModeIV, ModeIV
		s.cast(p, StatusReleased, 0)
	}
}

// resendLock re-establishes p at its master, or looks the master up first.
func (s *Space) resendLock(p *Proc) {
	rec := s.rec
	r := p.rsb
	if r.master == 0 {
		rec.lookups[r.name] = append(rec.lookups[r.name], p)
		s.askMaster(r)
		return
	}
	middle := undecided(p)
	// A ConvDeadlk conversion may have been demoted to NL, after which a
	// PW/EX holder may have come and gone: its value cannot vouch for the
	// resource's.
	bad := !p.lvbKnown || (middle && p.flags&ConvDeadlk != 0)
	if r.master == s.self {
		// This node is the resource's new master: the lock becomes local.
		delete(s.procs, p.id)
		r.remote--
		p.local, p.master = true, s.self
		if !rec.mastered[p.name] {
			rec.rebuilt[p.name] = true
		}
		// A PR<->CW conversion in flight is restored in its old mode for
		// now and settled when recovery ends (see Core.settleUndecided).
		p.coreID = s.core.restoreGranted(p.name, p.grmode, p.flags&^Convert, p.lvb, p.lvbseq, bad, middle,
			p.owner, p.blocking, p)
		if p.orphan {
			s.core.lookup(p.coreID).orphan = true
			s.core.res[p.name].orphans++
		}
		return
	}
	if p.state == pConverting {
		rec.reconvert = append(rec.reconvert, p)
	}
	p.master = r.master
	m := message{typ: msgRecoverLock, lock: p.id, name: p.name, mode: p.grmode, rqmode: ModeIV, flags: p.flags &^ Convert,
		seq: p.lvbseq, bad: bad}
	if middle {
		m.rqmode = p.rqmode
	}
	if p.lvb != nil {
		m.lvb = p.lvb
	}
	s.send(r.master, &m)
}

// askMaster starts a recovery lookup of r's master, once.
func (s *Space) askMaster(r *rsbInfo) {
	rec := s.rec
	if rec.asked[r.name] {
		return
	}
	rec.asked[r.name] = true
	if d := s.dirNode(r.name); d == s.self {
		rec.held = append(rec.held, mkeyName{s.self, r.name})
		s.answerLookups()
	} else {
		s.send(d, &message{typ: msgLookup, name: r.name})
	}
}

// resendWrites sends name's unacknowledged LVB writes to its master.
func (s *Space) resendWrites(name string, master NodeID) {
	for _, w := range s.writes[name] {
		if master == s.self {
			s.rec.rwrites = append(s.rec.rwrites, recoverWrite{s.self, w.wid, name, w.base, w.lvb})
			continue
		}
		s.send(master, &message{typ: msgRecoverWrite, wid: w.wid, seq: w.base, name: name, lvb: w.lvb})
	}
}

// maybeLocksDone tells every member this node has resent its locks, once
// no master lookup is outstanding.
func (s *Space) maybeLocksDone() {
	rec := s.rec
	if rec == nil || rec.sentDone || len(rec.asked) > 0 {
		return
	}
	rec.sentDone = true
	for _, d := range s.members {
		if d != s.self {
			s.send(d, &message{typ: msgLocksDone})
		}
	}
	s.locksDoneFrom(s.self)
}

func (s *Space) namesFrom(from NodeID) {
	rec := s.rec
	rec.names[from] = true
	if !rec.dirReady && len(rec.names) == len(s.members) {
		rec.dirReady = true
		s.answerLookups()
		s.maybeFinish()
	}
}

// answerLookups answers the lookups held until the directory was rebuilt.
func (s *Space) answerLookups() {
	rec := s.rec
	if !rec.dirReady {
		return
	}
	held := rec.held
	rec.held = nil
	for _, h := range held {
		if h.from != s.self {
			s.unholdOne(h.from)
		}
		master := s.dirLookup(h.name, h.from, s.recoveryCap())
		if master == 0 {
			s.stats.RecoveryDropped++ // no honest peer gets here; it is not answered
			continue
		}
		if h.from == s.self {
			s.recoveryLookupReply(h.name, master)
		} else {
			s.send(h.from, &message{typ: msgLookupReply, name: h.name, master: master})
		}
	}
}

// recoveryLookupReply resends the locks that waited for name's master.
func (s *Space) recoveryLookupReply(name string, master NodeID) {
	rec := s.rec
	if !rec.asked[name] {
		return
	}
	delete(rec.asked, name)
	ps := rec.lookups[name]
	delete(rec.lookups, name)
	s.rsb(name).master = master
	for _, p := range ps {
		s.resendLock(p)
	}
	s.resendWrites(name, master)
	s.maybeLocksDone()
}

func (s *Space) locksDoneFrom(from NodeID) {
	s.rec.done[from] = true
	s.maybeFinish()
}

// recoverLock rebuilds a remote node's lock at this, its master.
func (s *Space) recoverLock(from NodeID, m *message) {
	rec := s.rec
	name := string(m.nameb)
	key := mkey{from, m.lock}
	if s.mcopies[key] == nil && s.mcBy[from] >= s.recoveryCap() {
		s.stats.RecoveryDropped++ // no honest peer holds that many
		return
	}
	r := s.rsb(name)
	r.master = s.self // the directory sent the holder here
	if !rec.mastered[name] {
		rec.rebuilt[name] = true
	}
	mc := s.newMcopy()
	mc.key, mc.grmode, mc.flags = key, m.mode, m.flags
	if len(m.lvb) > 0 {
		if mc.lvb == nil {
			mc.lvb = make([]byte, s.lvbLen)
		}
		copy(mc.lvb, m.lvb)
	} else {
		mc.lvb = nil
	}
	mc.rqmode = m.rqmode
	mc.coreID = s.core.restoreGranted(name, m.mode, m.flags, mc.lvb, m.seq, m.bad, m.rqmode != ModeIV,
		OwnerID(remoteOwner|uint32(from)), true, mc)
	if s.mcopies[key] == nil {
		s.mcBy[from]++
	}
	s.mcopies[key] = mc
}

// maybeFinish ends recovery once the directory is rebuilt and every member
// has resent its locks.
func (s *Space) maybeFinish() {
	rec := s.rec
	if rec == nil || rec.starting || !rec.dirReady || len(rec.done) < len(s.members) {
		return
	}
	// PR<->CW conversions in flight get the granted mode the other holders
	// allow; their owners ask for the conversion again below.
	s.core.settleUndecided(func(l *lkb) Mode {
		switch t := l.tag.(type) {
		case *Proc:
			return t.rqmode
		case *mcopy:
			return t.rqmode
		}
		return l.grmode
	})
	for _, l := range s.core.slots {
		if mc, ok := l.tag.(*mcopy); ok && l.state != stFree {
			mc.grmode, mc.rqmode = l.grmode, ModeIV
		}
	}
	for _, name := range slices.Sorted(maps.Keys(rec.rebuilt)) {
		if r := s.core.res[name]; r != nil {
			r.recoverLVB(s.lvbLen)
		}
	}
	// Writes that may have been lost with the old generation: each applies
	// only if the value is still the one it replaced (nobody else can have
	// written in between: the writer held PW or EX until the write).
	for _, w := range rec.rwrites {
		// Only a sequence with a known history can be compared: a
		// resource this node kept mastering, or one rebuilt with a valid
		// value. A resource whose master died with no valid value left (or
		// that nobody holds) keeps ValNotValid: a PW/EX holder may have
		// written after the resent write, and died.
		r := s.core.res[w.name]
		trusted := r != nil && (rec.mastered[w.name] || !r.valNotValid)
		switch {
		case !trusted || r.lvbSeq != w.base:
		case w.lvb == nil:
			r.valNotValid = true
		default:
			if r.lvb == nil {
				r.lvb = make([]byte, s.lvbLen)
			}
			copy(r.lvb, w.lvb)
			r.lvbSeq++
			r.valNotValid = false
		}
		if w.from == s.self {
			s.writeAcked(w.wid)
		} else {
			s.sendDeferred(w.from, &message{typ: msgWriteAck, wid: w.wid})
		}
	}
	s.recoveredGen = rec.gen
	if s.stopAgain {
		// Stopped again meanwhile: nothing may be granted or sent now;
		// the next recovery rebuilds from here.
		s.rec, s.stopAgain = nil, false
		return
	}
	s.rec, s.stopped = nil, false
	s.core.grantAll()
	s.drainCore()
	// Conversions pending at the time of the failure are asked again,
	// unless they were cancelled (the cancel may have been lost): those
	// resent to a remote master in this recovery, and local locks whose
	// owner waits on a conversion the core no longer has (restored as
	// granted, in this or an interrupted earlier recovery).
	for _, l := range s.core.slots {
		if p, ok := l.tag.(*Proc); ok && l.state == stGranted && p.state == pConverting {
			rec.reconvert = append(rec.reconvert, p)
		}
	}
	for _, p := range rec.reconvert {
		if p.state != pConverting {
			continue
		}
		st := p.cancelSt
		p.cancelSt = 0
		// An undecided conversion's outcome is not known here (the master
		// chose the mode): it is always asked again, and a cancel follows.
		if st != 0 && !undecided(p) {
			p.state, p.rqmode = pGranted, ModeIV
			s.cast(p, st, 0)
			continue
		}
		// Queue order did not survive the view change: QueCvt goes (it may
		// not even be valid if the master chose the requested mode).
		p.flags &^= QueCvt
		if p.local {
			if err := s.core.Convert(p.coreID, p.rqmode, p.flags, nil); err != nil {
				p.state = pGranted
				s.cast(p, statusOf(err), 0)
			} else if st != 0 {
				_ = s.core.CancelStatus(p.coreID, st)
			}
			s.drainCore()
			continue
		}
		s.send(p.master, &message{typ: msgConvert, lock: p.id, mode: p.rqmode, flags: p.flags, lvb: lvbIf(p)})
		if st != 0 {
			p.cancelSt = st
			s.send(p.master, &message{typ: msgCancel, lock: p.id, status: st})
		}
	}
	// Requests waiting for a master, including those sent before the
	// failure, start over.
	for _, name := range slices.Sorted(maps.Keys(s.rsbs)) {
		r := s.rsbs[name]
		r.waiting = slices.DeleteFunc(r.waiting, func(p *Proc) bool {
			if p.cancelSt == 0 {
				return false
			}
			st := p.cancelSt
			p.cancelSt = 0
			s.freeProc(p)
			s.cast(p, st, 0)
			return true
		})
		if len(r.waiting) == 0 {
			continue
		}
		if r.master != 0 {
			s.lookupReply(name, r.master)
		} else {
			s.lookup(r)
		}
	}
	// Cancels asked for while stopped.
	cancels := s.cancels
	s.cancels = nil
	for _, c := range cancels {
		if c.p.state != pFree {
			_ = s.Cancel(c.p, c.st)
		}
	}
	held := s.held
	s.held = nil
	s.unhold(held)
	for _, h := range held {
		_ = s.Step(h.from, h.gen, h.payload)
	}
}

// undecided reports a conversion in flight whose outcome the master may have
// decided without this node knowing: PR<->CW, or a ConvDeadlk demotion.
func undecided(p *Proc) bool {
	return p.state == pConverting && (middleConversion(p.grmode, p.rqmode) || p.flags&ConvDeadlk != 0)
}

func lvbIf(p *Proc) []byte {
	if p.flags&ValBlk != 0 {
		return p.lvb
	}
	return nil
}

// stepRecovery handles a recovery message (and lookups) while recovering.
func (s *Space) stepRecovery(from NodeID, m *message) {
	rec := s.rec
	switch m.typ {
	case msgNames:
		for _, n := range m.namesb {
			if _, ok := s.dir[string(n)]; !ok && s.dirBy[from] >= s.recoveryCap() {
				s.stats.RecoveryDropped++
				continue
			}
			s.setDir(string(n), from)
		}
		if m.last {
			s.namesFrom(from)
		}
	case msgLookup:
		if !s.holdOne(from) {
			return
		}
		rec.held = append(rec.held, mkeyName{from, string(m.nameb)})
		s.answerLookups()
	case msgLookupReply:
		s.recoveryLookupReply(string(m.nameb), m.master)
	case msgRecoverLock:
		s.recoverLock(from, m)
	case msgLocksDone:
		s.locksDoneFrom(from)
	case msgRemove:
		s.delDir(string(m.nameb), from)
	case msgRecoverWrite:
		var v []byte
		if len(m.lvb) > 0 {
			v = bytes.Clone(m.lvb)
		}
		rec.rwrites = append(rec.rwrites, recoverWrite{from, m.wid, string(m.nameb), m.seq, v})
	}
}

// holdMessage keeps a message for later (a copy: payloads are not
// retained), within SpaceConfig.MaxHeld and MaxHeldPerPeer; beyond them it
// is dropped and counted.
func (s *Space) holdMessage(to *[]heldMsg, from NodeID, gen uint64, payload []byte) {
	if !s.holdOne(from) {
		return
	}
	*to = append(*to, heldMsg{from, gen, bytes.Clone(payload)})
}

// holdOne counts one more message held from a node, or reports (and
// counts) that the bounds do not allow it.
func (s *Space) holdOne(from NodeID) bool {
	if s.heldN >= s.maxHeld || s.heldBy[from] >= s.maxHeldPeer {
		s.stats.HeldDropped++
		return false
	}
	s.heldN++
	s.heldBy[from]++
	return true
}

func (s *Space) unholdOne(from NodeID) {
	s.heldN--
	if s.heldBy[from]--; s.heldBy[from] <= 0 {
		delete(s.heldBy, from)
	}
}

// unhold uncounts messages taken off a held list.
func (s *Space) unhold(hs []heldMsg) {
	for _, h := range hs {
		s.unholdOne(h.from)
	}
}
