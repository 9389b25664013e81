package sim

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// The array manager's change protocol in the simulation.
//
// The change protocol's decisions are pure code in mdcluster/array
// (protocol.go): PlanFail, PlanRemove, PlanAdd, PlanReAdd decide what a
// change journals, which superblock images go to which members in which
// order and what is broadcast; ChangePlan.Steps is the order of the steps;
// Announcement, CheckApplied and NewDiskAnswer are what senders announce
// and what receivers answer; DecideRecovery and Reconcile are what a
// restarted sender (or a survivor of a dead one) does with a change left
// half done. The Manager runs exactly these with its node's store, devices
// and broadcaster; here they run with simulated ones: one array (raid1, two
// slots, a spare, two blank devices) on shared in-memory disks that every
// node reads and writes (durable: they survive every crash), a journal per
// node (durable too), and the real broadcaster of each node (bcast.go),
// whose Txn holds the token across a change as the Manager's does.
//
// Random nodes fail, remove, add and re-add members. Between any two steps
// of a change the sender may crash (after the journal entry, after the
// candidate superblock, after NEWDISK, after the commit, in the middle of
// the member writes, in the middle of the announcement's broadcast); the
// chaos schedule crashes, fences and partitions nodes besides. A node that
// restarts with journal entries runs the recovery (Manager.recoverJournal)
// once it has joined; the survivors of a departure run Manager.afterDeparture
// (candidates the departed node was adding, members left disagreeing).
//
// Invariants (failures start with "manager (a)" ... "(e)"):
//
//	(a) a change whose caller got success is in the view of every node
//	    that was joined, alive and in the same incarnation throughout, and
//	    on the disks;
//	(b) superblock event counts only move forward: on each disk (for one
//	    device UUID) and the array's freshest;
//	(c) after a recovery (restart or departure), the members' superblocks
//	    agree (none is behind the freshest) and no candidate superblock is
//	    left;
//	(d) when the run is over (every node back, joined and quiet): no
//	    journal holds an entry, every node's member view is what the
//	    superblocks it sees say, every node has the same event count, the
//	    members agree, and no candidate superblock is left: every change is
//	    applied on every node or on none;
//	(e) a receiver can always apply a change every node confirmed (the
//	    disks are shared): a failed answer to an announcement is a bug.

// ManagerConfig turns on the manager's change protocol (it needs the
// broadcast).
type ManagerConfig struct {
	// ChangeProb is the probability that a random operation of the
	// simulation is a change (or the join a change needs).
	ChangeProb float64
	// CrashProb is the probability that the sender crashes before any one
	// step of a change (or a recovery).
	CrashProb float64
	// Invisible is the probability that a node does not have one of the
	// blank devices configured (it answers NEWDISK with "missing").
	Invisible float64
	// CrashRound adds, on the healed cluster at the end, a round of
	// changes in which a sender dies (see bcSim.finish).
	CrashRound bool
	// Mutation plants a bug, so tests can show the invariants catch it.
	Mutation MgrMutation
}

// MgrMutation is a deliberate bug in the simulated manager.
type MgrMutation uint8

const (
	// MgrNoAnnounce: the sender commits and writes the superblocks but
	// does not broadcast the change, and reports success.
	MgrNoAnnounce MgrMutation = iota + 1
	// MgrNoRecovery: a restarted node drops its journal without deciding
	// or reconciling anything, and survivors do nothing after a departure.
	MgrNoRecovery
)

// MgrStats counts what the manager workload did in a run.
type MgrStats struct {
	Changes, OK, Refused, NotSeen, Busy int
	Fail, Remove, Add, ReAdd            int
	// Crashes counts senders crashed by the workload, by the step before
	// which they died ("write/2": after 2 of the member writes).
	Crashes                              map[string]int
	Recoveries, Completed, RolledBack    int
	Reconciled, Departures, ZeroedCands  int
	Received, ReceivedNewDisk, Confirmed int
}

// mgrDisks is the number of shared disks.
const mgrDisks = 5

// memDisk is a shared disk: a sparse in-memory block device.
type memDisk struct {
	name   string
	size   int64
	blocks map[int64]*[4096]byte
	mg     *mgrSim
	// sb caches the disk's superblock (probed says it is valid): every
	// write drops it.
	sb     *superblock.Superblock
	probed bool
}

func (d *memDisk) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		o := off + int64(n)
		if o >= d.size {
			return n, fmt.Errorf("%s: read past the end", d.name)
		}
		b := d.blocks[o/4096]
		k := min(len(p)-n, int(4096-o%4096))
		if b == nil {
			clear(p[n : n+k])
		} else {
			copy(p[n:n+k], b[o%4096:])
		}
		n += k
	}
	return n, nil
}

func (d *memDisk) WriteAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		o := off + int64(n)
		if o >= d.size {
			return n, fmt.Errorf("%s: write past the end", d.name)
		}
		b := d.blocks[o/4096]
		if b == nil {
			b = new([4096]byte)
			d.blocks[o/4096] = b
		}
		n += copy(b[o%4096:], p[n:])
	}
	d.mg.dirty, d.probed, d.sb = true, false, nil
	return n, nil
}

func (d *memDisk) Size() (int64, error) { return d.size, nil }
func (d *memDisk) Sync() error          { return nil }
func (d *memDisk) Name() string         { return d.name }

// rngReader feeds UUIDs from the simulation's generator (deterministic).
type rngReader struct{ s *Sim }

func (r rngReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r.s.rng.Uint32())
	}
	return len(p), nil
}

// mgrCand is a device a receiver confirmed for a sender's add (the
// Manager's candidates): resolved from the disk if the sender departs.
type mgrCand struct {
	from NodeID
	dev  uint32
	uuid [16]byte
	base uint64
}

type mgrSim struct {
	bs    *bcSim
	cfg   ManagerConfig
	uuid  [16]byte
	disks []*memDisk
	// visible[id][i]: node id has disk i among its configured devices
	// when it answers NEWDISK (an invisible one is "missing" there). Reads
	// see every disk: the storage is shared, as md-cluster assumes (see
	// docs/simulation.md on a node that cannot see a member).
	visible map[NodeID][]bool
	// journal: per node, durable; the entries of changes not done.
	journal map[NodeID][]array.JournalEntry
	// views: per node incarnation (dropped at a crash), what it last read.
	views map[NodeID]*array.State
	cands map[NodeID]map[[16]byte]mgrCand
	// seen: per disk, the highest events seen for (set, device) UUIDs.
	seen  map[int]diskSeen
	fresh uint64
	dirty bool
	// crashOK lets senders die on a healed cluster (bcSim.finish).
	crashOK bool
	stats   MgrStats
}

type diskSeen struct {
	set, dev [16]byte
	events   uint64
}

func newMgrSim(bs *bcSim, cfg ManagerConfig) *mgrSim {
	s := bs.s
	mg := &mgrSim{bs: bs, cfg: cfg, visible: map[NodeID][]bool{}, journal: map[NodeID][]array.JournalEntry{},
		views: map[NodeID]*array.State{}, cands: map[NodeID]map[[16]byte]mgrCand{}, seen: map[int]diskSeen{}}
	mg.stats.Crashes = map[string]int{}
	var ms []array.Member
	for i := range mgrDisks {
		d := &memDisk{name: fmt.Sprintf("disk%d", i), size: 8 << 20, blocks: map[int64]*[4096]byte{}, mg: mg}
		mg.disks = append(mg.disks, d)
		if i < 3 {
			ms = append(ms, d)
		}
	}
	c, err := array.Create(array.CreateSpec{Level: 1, RaidDevices: 2, Name: "sim", AssumeClean: true, Bitmap: array.BitmapNone,
		Rand: rngReader{s}, Now: func() time.Time { return time.Unix(s.now, 0) }}, ms)
	if err != nil {
		bs.fail("manager: create the array: %v", err)
		return mg
	}
	mg.uuid = c.Shared.SetUUID
	for _, id := range s.ids {
		v := make([]bool, mgrDisks)
		for i := range v {
			v[i] = i < 3 || s.rng.Float64() >= cfg.Invisible
		}
		mg.visible[id] = v
	}
	mg.checkDisks()
	return mg
}

func (mg *mgrSim) fail(format string, args ...any) { mg.bs.s.fail("manager "+format, args...) }

func (mg *mgrSim) tracef(bn *bcNode, format string, args ...any) {
	mg.bs.s.tracef("mgr %s.%d: %s", bn.n.ID, bn.epoch, fmt.Sprintf(format, args...))
}

func (mg *mgrSim) now() time.Time { return time.Unix(mg.bs.s.now, 0) }

// read is the node's Manager.readStateLocked: the member set from the
// disks it sees that carry the array's UUID.
func (mg *mgrSim) read(id NodeID) (*array.State, error) {
	var ms []array.Member
	for _, d := range mg.disks {
		if sb := probe(d); sb != nil && sb.SetUUID == mg.uuid {
			ms = append(ms, d)
		}
	}
	return array.ReadState(ms, mg.uuid, nil)
}

// supers returns the superblock of every disk (nil: none).
func (mg *mgrSim) supers() []*superblock.Superblock {
	out := make([]*superblock.Superblock, len(mg.disks))
	for i, d := range mg.disks {
		out[i] = probe(d)
	}
	return out
}

// probe returns the disk's superblock, nil if it has none. Callers must
// not modify it.
func probe(d *memDisk) *superblock.Superblock {
	if !d.probed {
		sb, err := superblock.Probe(d, uint64(d.size/superblock.SectorSize))
		if err != nil {
			sb = nil
		}
		d.sb, d.probed = sb, true
	}
	return d.sb
}

// --- hooks from the broadcast layer ---

// started: a new incarnation knows nothing until it joins.
func (mg *mgrSim) started(bn *bcNode) {
	if mg == nil {
		return
	}
	delete(mg.views, bn.n.ID)
	delete(mg.cands, bn.n.ID)
}

// joined: the node reads the members (Manager.Assemble after joining the
// broadcast), then resolves its journal before anything else.
func (mg *mgrSim) joined(bn *bcNode) {
	if mg == nil {
		return
	}
	id := bn.n.ID
	st, err := mg.read(id)
	if err != nil {
		mg.fail("(d): node %s cannot read the array after joining: %v", id, err)
		return
	}
	mg.views[id] = st
	if len(mg.journal[id]) > 0 {
		bn.ops = append([]ownOp{{"recover", func() { mg.recoverJournal(bn) }}}, bn.ops...)
	}
}

// departed: survivors resolve what departed nodes left (afterDeparture).
func (mg *mgrSim) departed(bn *bcNode, nodes []NodeID) {
	if mg == nil || len(nodes) == 0 || !bn.joined {
		return
	}
	bn.ops = append(bn.ops, ownOp{"after-departure", func() { mg.afterDeparture(bn, nodes) }})
}

// --- the changes ---

// mgrReq is a change a caller asks for.
type mgrReq struct {
	kind array.ChangeKind
	dev  uint32 // fail, remove
	disk int    // add, re-add
}

// randomOp (hook: bcSim.randomOp) queues, ChangeProb of the time, a
// change on a random idle node (or a join on one that is not joined), and
// reports whether it did.
func (mg *mgrSim) randomOp() bool {
	if mg == nil {
		return false
	}
	s := mg.bs.s
	if s.rng.Float64() >= mg.cfg.ChangeProb {
		return false
	}
	var idle []*bcNode
	for _, id := range s.ids {
		if bn := mg.bs.nodes[id]; bn != nil && !bn.dead && !bn.crashReq && bn.cur == nil && len(bn.ops) == 0 {
			idle = append(idle, bn)
		}
	}
	if len(idle) == 0 {
		return true
	}
	bn := idle[s.intn(len(idle))]
	if !bn.joined {
		mg.bs.queueJoin(bn)
	} else {
		mg.randomChange(bn)
	}
	s.pump(bn.n)
	return true
}

// randomChange queues a random change on bn: mostly one its view makes
// plausible (fail a working member, remove a faulty one or a spare, add a
// disk that is no member, re-add one that held a slot), a fifth of the
// time any change at all (refusals are part of the protocol too).
func (mg *mgrSim) randomChange(bn *bcNode) {
	s := mg.bs.s
	st := mg.views[bn.n.ID]
	if st == nil {
		return
	}
	ms := st.Members()
	members := map[[16]byte]bool{}
	var fail, remove []uint32
	for _, m := range ms {
		members[m.DeviceUUID] = true
		switch m.State {
		case array.MemberFaulty:
			remove = append(remove, m.Dev)
		case array.MemberSpare:
			remove = append(remove, m.Dev)
			fail = append(fail, m.Dev)
		default:
			fail = append(fail, m.Dev)
		}
	}
	var add, readd []int
	for i, d := range mg.disks {
		sb := probe(d)
		switch {
		case sb == nil || !members[sb.DeviceUUID] && sb.SetUUID != mg.uuid:
			add = append(add, i)
		case sb.SetUUID == mg.uuid && !members[sb.DeviceUUID] && sb.Role() < superblock.RoleMax:
			readd = append(readd, i)
		case sb.SetUUID == mg.uuid && !members[sb.DeviceUUID]:
			add = append(add, i) // a removed spare
		}
	}
	req := mgrReq{kind: []array.ChangeKind{array.ChangeFail, array.ChangeRemove, array.ChangeAdd, array.ChangeReAdd}[s.intn(4)],
		dev: ms[s.intn(len(ms))].Dev, disk: s.intn(mgrDisks)}
	if s.intn(5) != 0 {
		switch k := s.intn(4); {
		case k == 0 && len(fail) > 0:
			req = mgrReq{kind: array.ChangeFail, dev: fail[s.intn(len(fail))]}
		case k == 1 && len(remove) > 0:
			req = mgrReq{kind: array.ChangeRemove, dev: remove[s.intn(len(remove))]}
		case k == 2 && len(add) > 0:
			req = mgrReq{kind: array.ChangeAdd, disk: add[s.intn(len(add))]}
		case k == 3 && len(readd) > 0:
			req = mgrReq{kind: array.ChangeReAdd, disk: readd[s.intn(len(readd))]}
		}
	}
	bn.ops = append(bn.ops, ownOp{"change " + string(req.kind), func() { mg.change(bn, req) }})
}

// burst (on a healed cluster, every node joined): every node asks for a
// change at once; they contend for the token and must all finish.
func (mg *mgrSim) burst() {
	if mg == nil {
		return
	}
	s := mg.bs.s
	s.tracef("--- manager: every node makes a change at once ---")
	for _, id := range s.ids {
		if bn := mg.bs.nodes[id]; bn != nil && !bn.dead && bn.joined {
			mg.randomChange(bn)
		}
	}
	for _, id := range s.ids {
		s.pump(s.nodes[id])
	}
}

// crashing reports whether senders may die: while the chaos schedule
// crashes nodes, and in the crash rounds on the healed cluster.
// On the healed cluster one node at most is down at a time (quorum holds).
func (mg *mgrSim) crashing() bool {
	s := mg.bs.s
	if s.cfg.Faults.Crash > 0 {
		return true
	}
	if !mg.crashOK {
		return false
	}
	for _, id := range s.ids {
		if bn := mg.bs.nodes[id]; !s.nodes[id].Up || bn == nil || bn.crashReq || bn.crashInSend {
			return false
		}
	}
	return true
}

// crashNow draws whether the sender dies before step; it then asks the
// simulation to crash the node once the coroutine returns.
func (mg *mgrSim) crashNow(bn *bcNode, step string) bool {
	if !mg.crashing() || mg.bs.s.rng.Float64() >= mg.cfg.CrashProb {
		return false
	}
	mg.stats.Crashes[step]++
	mg.tracef(bn, "crashes before %s", step)
	bn.crashReq = true
	return true
}

// sendTx broadcasts msg within txn, checking the broadcast's invariants
// on its result as for every other send. ok is false if the sender died.
func (mg *mgrSim) sendTx(bn *bcNode, txn *broadcast.Txn, msg broadcast.Message, crash bool) (broadcast.Result, error, bool) {
	bs := mg.bs
	bs.nextID++
	msg.High = bs.nextID // the simulation's message identity (see msgID)
	bs.opSeq++
	start := bs.opSeq
	joined := map[NodeID]bcJoined{}
	for nid, o := range bs.nodes {
		if !o.dead && o.joined {
			joined[nid] = bcJoined{o.epoch, o.joinedAt}
		}
	}
	bn.sending, bn.crashInSend = true, crash
	bs.stats.Sends++
	res, err := txn.Send(bcCtx, msg)
	bn.sending, bn.crashInSend = false, false
	if bn.dead {
		return res, err, false
	}
	mg.tracef(bn, "sent %v: seq %d acted %v failed %v unanswered %v not joined %v departed %v: err %v",
		msg, res.Seq, res.Acted, res.Failed, res.Unanswered, res.NotJoined, res.Departed, err)
	bs.sent(bn, msg, joined, start, res, err)
	return res, err, true
}

// snapshot records who is joined when a change begins, for invariant (a).
func (mg *mgrSim) snapshot() (map[NodeID]bcJoined, int) {
	bs := mg.bs
	bs.opSeq++
	joined := map[NodeID]bcJoined{}
	for nid, o := range bs.nodes {
		if !o.dead && o.joined {
			joined[nid] = bcJoined{o.epoch, o.joinedAt}
		}
	}
	return joined, bs.opSeq
}

// setState replaces the node's last journal entry's state.
func (mg *mgrSim) setState(id NodeID, s array.JournalState) {
	j := mg.journal[id]
	j[len(j)-1].State = s
}

// done drops the node's last journal entry (Manager: changeTxn.end).
func (mg *mgrSim) done(id NodeID) {
	j := mg.journal[id]
	mg.journal[id] = j[:len(j)-1]
}

// change runs one change on bn the way Manager.Fail / Remove / AddSpare /
// ReAdd and changeTxn.run do, with the same plan and the same steps.
func (mg *mgrSim) change(bn *bcNode, req mgrReq) {
	s, id := mg.bs.s, bn.n.ID
	if !bn.joined || len(mg.journal[id]) > 0 || mg.views[id] == nil {
		mg.stats.Busy++
		return
	}
	mg.stats.Changes++
	joined, start := mg.snapshot()
	txn, err := bn.b.Begin(bcCtx)
	if bn.dead {
		return
	}
	if err != nil {
		mg.stats.Busy++
		mg.tracef(bn, "change %s: begin: %v", req.kind, err)
		return
	}
	ended := false
	defer func() {
		if !ended && !bn.dead && !bn.crashReq {
			if err := txn.End(bcCtx); err != nil && !bn.dead {
				mg.tracef(bn, "end: %v", err)
			}
		}
	}()
	st, err := mg.read(id) // under the token
	if err != nil {
		mg.fail("(d): node %s cannot read the array under the token: %v", id, err)
		return
	}
	mg.views[id] = st
	var p *array.ChangePlan
	switch req.kind {
	case array.ChangeFail:
		mg.stats.Fail++
		p, err = array.PlanFail(st, req.dev, mg.now())
	case array.ChangeRemove:
		mg.stats.Remove++
		p, err = array.PlanRemove(st, req.dev, mg.now())
	case array.ChangeAdd:
		mg.stats.Add++
		if !mg.visible[id][req.disk] {
			err = fmt.Errorf("%w: disk %d is not among this node's devices", array.ErrRefusedChange, req.disk)
			break
		}
		var inUse []uint32
		for _, sb := range mg.supers() {
			if sb != nil && (sb.SetUUID == mg.uuid || sb.SetUUID == array.CandidateUUID(mg.uuid)) {
				inUse = append(inUse, sb.DevNumber)
			}
		}
		for _, c := range mg.cands[id] {
			inUse = append(inUse, c.dev)
		}
		p, err = array.PlanAdd(st, mg.disks[req.disk], mg.disks[req.disk].name, inUse, rngReader{s}, mg.now())
	case array.ChangeReAdd:
		mg.stats.ReAdd++
		var dsb *superblock.Superblock
		if mg.visible[id][req.disk] {
			dsb = probe(mg.disks[req.disk])
		}
		if dsb == nil || dsb.SetUUID != mg.uuid {
			err = fmt.Errorf("%w: disk %d carries no superblock of the array", array.ErrRefusedChange, req.disk)
			break
		}
		p, err = array.PlanReAdd(st, mg.disks[req.disk], dsb, mg.disks[req.disk].name, mg.now())
	}
	if err != nil {
		if !errors.Is(err, array.ErrRefusedChange) {
			mg.fail("node %s: plan %s: %v", id, req.kind, err)
			return
		}
		mg.stats.Refused++
		mg.tracef(bn, "change %s refused: %v", req.kind, err)
		return
	}
	e := p.Entry
	e.Array, e.Node, e.Started = mg.uuid, uint32(id), mg.now()
	mg.tracef(bn, "change %s dev %d (base events %d): steps %v", e.Kind, e.Dev, e.BaseEvents, p.Steps())
	for _, step := range p.Steps() {
		if mg.crashNow(bn, string(step)) {
			return
		}
		switch step {
		case array.StepJournal:
			mg.journal[id] = append(mg.journal[id], e)
		case array.StepCandidate:
			if err := array.WriteOwnSuper(p.Candidate.Member, p.Candidate.Super); err != nil {
				mg.fail("node %s: candidate: %v", id, err)
				return
			}
			mg.setState(id, array.StateCandidate)
		case array.StepConfirm:
			res, err, ok := mg.sendTx(bn, txn, *p.Confirm, false)
			if !ok {
				return
			}
			if err != nil {
				ended = true // a failed Send ended the transaction
				mg.tracef(bn, "NEWDISK: %v: the change stays journalled until the node recovers", err)
				return
			}
			if len(res.Failed)+len(res.Unanswered) == 0 {
				continue
			}
			// Abandoned: not every node sees the device.
			mg.stats.NotSeen++
			if e.Kind == array.ChangeAdd {
				mg.setState(id, array.StateUndoing)
				if mg.crashNow(bn, "undo") {
					return
				}
				if err := array.ZeroSuper(p.Candidate.Member); err != nil {
					mg.fail("node %s: wipe the candidate: %v", id, err)
					return
				}
			}
			if !mg.announce(bn, txn, broadcast.MetadataUpdated, e.Dev, &ended) {
				return
			}
			mg.done(id)
			return
		case array.StepConfirmed:
			mg.setState(id, array.StateConfirmed)
		case array.StepCommit:
			mg.setState(id, array.StateCommitted)
		case array.StepMark:
			if err := array.WriteOwnSuper(p.Mark.Member, p.Mark.Super); err != nil {
				mg.fail("node %s: mark: %v", id, err)
				return
			}
		case array.StepWrite:
			for k := 1; k < len(p.Writes); k++ {
				if mg.crashNow(bn, fmt.Sprintf("write/%d", k)) {
					if _, err := array.WriteAll(p.Next, p.Writes[:k]); err != nil {
						mg.fail("node %s: write: %v", id, err)
					}
					return
				}
			}
			if _, err := array.WriteAll(p.Next, p.Writes); err != nil {
				mg.fail("node %s: write: %v", id, err)
				return
			}
		case array.StepReload:
			st, err := mg.read(id)
			if err != nil {
				mg.fail("node %s: reload after its own write: %v", id, err)
				return
			}
			if st.Events() < p.Next.Events {
				mg.fail("node %s: reload after its own write found events %d, it wrote %d", id, st.Events(), p.Next.Events)
				return
			}
			mg.views[id] = st
		case array.StepAnnounce:
			if mg.cfg.Mutation == MgrNoAnnounce {
				continue
			}
			if !mg.announce(bn, txn, p.Announce, e.Dev, &ended) {
				return
			}
		}
	}
	if bn.dead || bn.crashReq {
		return
	}
	mg.done(id)
	mg.stats.OK++
	mg.succeeded(bn, e, p.Next.Events, joined, start)
}

// announce broadcasts the sender's reloaded state (Announcement) within
// txn, and checks invariant (e). It reports false if the sender is gone,
// crashed or its transaction failed.
func (mg *mgrSim) announce(bn *bcNode, txn *broadcast.Txn, typ broadcast.Type, dev uint32, ended *bool) bool {
	id := bn.n.ID
	msg := array.Announcement(typ, dev, mg.views[id])
	crash := mg.crashing() && mg.bs.s.rng.Float64() < mg.cfg.CrashProb
	if crash {
		mg.stats.Crashes["announce/mid"]++
	}
	res, err, ok := mg.sendTx(bn, txn, msg, crash)
	if !ok {
		return false
	}
	if err != nil {
		*ended = true
		mg.tracef(bn, "announce: %v: the change stays journalled until the node recovers", err)
		return false
	}
	if len(res.Failed) > 0 {
		mg.fail("(e): node %s's %v (events %d) was not applied by %v", id, typ, msg.Low, res.Failed)
		return false
	}
	return true
}

// succeeded checks invariant (a) for a change that returned success.
func (mg *mgrSim) succeeded(bn *bcNode, e array.JournalEntry, events uint64, joined map[NodeID]bcJoined, start int) {
	bs := mg.bs
	mg.tracef(bn, "change %s dev %d done: events %d", e.Kind, e.Dev, events)
	for _, id := range bs.s.ids {
		j, ok := joined[id]
		o := bs.nodes[id]
		if !ok || j.at >= start || o == nil || o.dead || !o.joined || o.epoch != j.epoch {
			continue
		}
		v := mg.views[id]
		if v == nil || v.Events() < events {
			have := uint64(0)
			if v != nil {
				have = v.Events()
			}
			mg.fail("(a): node %s's %s of device %d returned success at events %d, but node %s, joined and alive throughout, has events %d",
				bn.n.ID, e.Kind, e.Dev, events, id, have)
			return
		}
	}
	if f := mg.freshest(); f < events {
		mg.fail("(a): node %s's %s of device %d returned success at events %d, but the disks' freshest is %d", bn.n.ID, e.Kind, e.Dev, events, f)
	}
}

// --- recovery ---

// recoverJournal is Manager.recoverJournal: every entry is decided from the
// disk under the token, the members made to agree, and METADATA_UPDATED
// makes every node re-read them.
func (mg *mgrSim) recoverJournal(bn *bcNode) {
	id := bn.n.ID
	if mg.cfg.Mutation == MgrNoRecovery {
		mg.journal[id] = nil
		return
	}
	txn, err := bn.b.Begin(bcCtx)
	if bn.dead {
		return
	}
	if err != nil {
		// Manager.Assemble fails and is retried: so is the recovery, while
		// the node is joined (else at its next join).
		mg.tracef(bn, "recovery: begin: %v", err)
		if bn.joined {
			bn.ops = append(bn.ops, ownOp{"recover", func() { mg.recoverJournal(bn) }})
		}
		return
	}
	mg.stats.Recoveries++
	ended := false
	defer func() {
		if !ended && !bn.dead && !bn.crashReq {
			_ = txn.End(bcCtx)
		}
	}()
	st, err := mg.read(id)
	if err != nil {
		mg.fail("(c): node %s cannot read the array to recover: %v", id, err)
		return
	}
	for len(mg.journal[id]) > 0 {
		if mg.crashNow(bn, "recover") {
			return
		}
		e := mg.journal[id][0]
		if !mg.resolve(bn, e, st) {
			return
		}
		mg.journal[id] = mg.journal[id][1:]
	}
	if !mg.reconcileAndAnnounce(bn, txn, true, &ended) {
		return
	}
	mg.checkRecovered(bn, "restart")
}

// resolve is Manager.resolve: DecideRecovery from the disk, and the
// candidate wiped if it says so. False if the node crashed.
func (mg *mgrSim) resolve(bn *bcNode, e array.JournalEntry, st *array.State) bool {
	id := bn.n.ID
	f := array.DiskFacts{Shared: st.Shared()}
	dev := -1
	for i, sb := range mg.supers() {
		if e.DeviceUUID != ([16]byte{}) && array.MatchesNewDisk(sb, e.Array, e.DeviceUUID) {
			f.Device, dev = sb, i
			break
		}
	}
	d := array.DecideRecovery(e, f)
	if d.Outcome == array.OutcomeCompleted {
		mg.stats.Completed++
	} else {
		mg.stats.RolledBack++
	}
	mg.tracef(bn, "recovery: %s of dev %d (journal state %s, by node %d): %s: %s", e.Kind, e.Dev, e.State, e.Node, d.Outcome, d.Reason)
	if d.ZeroCandidate && dev >= 0 {
		if err := array.ZeroSuper(mg.disks[dev]); err != nil {
			mg.fail("node %s: wipe a candidate: %v", id, err)
			return false
		}
		mg.stats.ZeroedCands++
	}
	return true
}

// reconcileAndAnnounce is Manager.reconcile, then the announcement
// (always after a restart; after a departure only if something was
// written, as afterDeparture does).
func (mg *mgrSim) reconcileAndAnnounce(bn *bcNode, txn *broadcast.Txn, always bool, ended *bool) bool {
	id := bn.n.ID
	st, err := mg.read(id)
	if err != nil {
		mg.fail("(c): node %s cannot read the array: %v", id, err)
		return false
	}
	behind, next, devs := array.Reconcile(st, mg.now())
	if len(behind) > 0 {
		if mg.crashNow(bn, "reconcile") {
			return false
		}
		mg.tracef(bn, "reconcile: members %v behind events %d: rewriting", behind, st.Events())
		if _, err := array.WriteAll(next, devs); err != nil {
			mg.fail("node %s: reconcile: %v", id, err)
			return false
		}
		mg.stats.Reconciled++
		if st, err = mg.read(id); err != nil {
			mg.fail("(c): node %s cannot read the array: %v", id, err)
			return false
		}
	}
	mg.views[id] = st
	if !always && len(behind) == 0 {
		return true
	}
	return mg.announce(bn, txn, broadcast.MetadataUpdated, 0, ended)
}

// afterDeparture is Manager.afterDeparture on a survivor.
func (mg *mgrSim) afterDeparture(bn *bcNode, nodes []NodeID) {
	id := bn.n.ID
	if mg.cfg.Mutation == MgrNoRecovery || !bn.joined || mg.views[id] == nil {
		return
	}
	txn, err := bn.b.Begin(bcCtx)
	if bn.dead {
		return
	}
	if err != nil {
		mg.tracef(bn, "after departure: begin: %v", err)
		return
	}
	mg.stats.Departures++
	ended := false
	defer func() {
		if !ended && !bn.dead && !bn.crashReq {
			_ = txn.End(bcCtx)
		}
	}()
	st, err := mg.read(id)
	if err != nil {
		mg.fail("(c): node %s cannot read the array: %v", id, err)
		return
	}
	wrote := false
	for _, u := range slices.SortedFunc(maps.Keys(mg.cands[id]), func(a, b [16]byte) int { return bytes.Compare(a[:], b[:]) }) {
		c := mg.cands[id][u]
		if !slices.Contains(nodes, c.from) {
			continue
		}
		delete(mg.cands[id], u)
		e := array.JournalEntry{Kind: array.ChangeAdd, Array: mg.uuid, Node: uint32(c.from), BaseEvents: c.base, Dev: c.dev, DeviceUUID: c.uuid}
		z := mg.stats.ZeroedCands
		if !mg.resolve(bn, e, st) {
			return
		}
		wrote = wrote || mg.stats.ZeroedCands > z
	}
	if !mg.reconcileAndAnnounce(bn, txn, wrote, &ended) {
		return
	}
	mg.checkRecovered(bn, "departure")
}

// checkRecovered checks invariant (c) after a recovery.
func (mg *mgrSim) checkRecovered(bn *bcNode, what string) {
	st, err := mg.read(bn.n.ID)
	if err != nil {
		mg.fail("(c): after the %s recovery, node %s cannot read the array: %v", what, bn.n.ID, err)
		return
	}
	if behind := mg.behind(st); len(behind) > 0 {
		mg.fail("(c): after the %s recovery on node %s, members %v are behind events %d", what, bn.n.ID, behind, st.Events())
	}
}

// behind lists the working members (in st) whose superblock on disk is
// not at st's event count: the check reads the disks itself rather than
// trust Reconcile, the code under test.
func (mg *mgrSim) behind(st *array.State) []string {
	working := map[[16]byte]bool{}
	for _, m := range st.Members() {
		if m.State != array.MemberFaulty {
			working[m.DeviceUUID] = true
		}
	}
	var out []string
	for _, d := range mg.disks {
		if sb := probe(d); sb != nil && sb.SetUUID == mg.uuid && working[sb.DeviceUUID] && sb.Events != st.Events() {
			out = append(out, fmt.Sprintf("%s (dev %d at events %d)", d.name, sb.DevNumber, sb.Events))
		}
	}
	return out
}

// --- the receiver ---

// isMgr tells the manager's messages from the broadcast's random sends.
func isMgr(m broadcast.Message) bool { return m.High != 0 }

// msgID is the simulation's identity of a message.
func msgID(m broadcast.Message) uint64 {
	if isMgr(m) {
		return m.High
	}
	return m.Low
}

// receive is the Manager's receive for the manager's messages.
func (mg *mgrSim) receive(bn *bcNode, from dlm.NodeID, m broadcast.Message) error {
	id := bn.n.ID
	mg.stats.Received++
	switch m.Type {
	case broadcast.MetadataUpdated, broadcast.Remove, broadcast.ReAdd:
		st, err := mg.read(id)
		if err == nil {
			err = array.CheckApplied(m, st)
		}
		if err != nil {
			return fmt.Errorf("%s from node %d: %w", m.Type, from, err)
		}
		mg.views[id] = st
		for u, c := range mg.cands[id] {
			if c.from == NodeID(from) {
				delete(mg.cands[id], u)
			}
		}
		return nil
	case broadcast.NewDisk:
		mg.stats.ReceivedNewDisk++
		var found *superblock.Superblock
		for i, sb := range mg.supers() {
			if mg.visible[id][i] && array.MatchesNewDisk(sb, mg.uuid, m.UUID) {
				found = sb
				break
			}
		}
		if err := array.NewDiskAnswer(m, found, "the disks node "+id.String()+" sees"); err != nil {
			return err
		}
		mg.stats.Confirmed++
		if mg.cands[id] == nil {
			mg.cands[id] = map[[16]byte]mgrCand{}
		}
		mg.cands[id][m.UUID] = mgrCand{from: NodeID(from), dev: m.RaidSlot, uuid: m.UUID, base: m.Low}
		return nil
	}
	return fmt.Errorf("%s: %w", m.Type, broadcast.ErrUnknownType)
}

// --- invariants ---

// freshest is the highest event count on a disk carrying the array.
func (mg *mgrSim) freshest() uint64 {
	var f uint64
	for _, d := range mg.disks {
		if sb := probe(d); sb != nil && sb.SetUUID == mg.uuid && sb.Events > f {
			f = sb.Events
		}
	}
	return f
}

// crashes carries out the crashes the workload asked for: a sender that
// died between two steps, or one to die while its announcement is on its
// way (its send coroutine is parked, somewhere in the broadcast).
func (mg *mgrSim) crashes() {
	if mg == nil {
		return
	}
	s := mg.bs.s
	for _, id := range s.ids {
		bn := mg.bs.nodes[id]
		if bn == nil || bn.dead || !s.nodes[id].Up {
			continue
		}
		if bn.crashReq || (bn.crashInSend && bn.sending && s.intn(3) == 0) {
			s.tracef("mgr %s.%d: the manager workload crashes the node", id, bn.epoch)
			s.Crash(id)
		}
	}
}

// checkDisks checks invariant (b) after disks were written.
func (mg *mgrSim) checkDisks() {
	if mg == nil || !mg.dirty && len(mg.seen) > 0 {
		return
	}
	mg.dirty = false
	for i, d := range mg.disks {
		sb := probe(d)
		if sb == nil {
			delete(mg.seen, i)
			continue
		}
		prev, ok := mg.seen[i]
		if ok && prev.set == sb.SetUUID && prev.dev == sb.DeviceUUID && sb.Events < prev.events {
			mg.fail("(b): %s's superblock went back from events %d to %d", d.name, prev.events, sb.Events)
			return
		}
		mg.seen[i] = diskSeen{set: sb.SetUUID, dev: sb.DeviceUUID, events: sb.Events}
	}
	if f := mg.freshest(); f < mg.fresh {
		mg.fail("(b): the array's freshest superblock went back from events %d to %d", mg.fresh, f)
	} else {
		mg.fresh = f
	}
}

// finish checks invariant (d) on a healed cluster where every node joined
// and the operations are over.
func (mg *mgrSim) finish() {
	if mg == nil || mg.bs.s.failed != "" {
		return
	}
	s := mg.bs.s
	var events uint64
	var first NodeID
	for _, id := range s.ids {
		bn := mg.bs.nodes[id]
		if bn == nil || bn.dead || !bn.joined {
			continue
		}
		if j := mg.journal[id]; len(j) > 0 {
			mg.fail("(d): node %s's journal still holds %d entries (first: %s of dev %d, %s) on a quiet cluster", id, len(j), j[0].Kind, j[0].Dev, j[0].State)
			return
		}
		v := mg.views[id]
		st, err := mg.read(id)
		if err != nil || v == nil {
			mg.fail("(d): node %s: view %v, read: %v", id, v != nil, err)
			return
		}
		if got, want := viewKey(v), viewKey(st); got != want {
			mg.fail("(d): node %s's member view is %s, the superblocks it sees say %s", id, got, want)
			return
		}
		if events == 0 {
			events, first = v.Events(), id
		} else if v.Events() != events {
			mg.fail("(d): node %s is at events %d, node %s at %d", id, v.Events(), first, events)
			return
		}
		if behind := mg.behind(st); len(behind) > 0 {
			mg.fail("(d): members %v are behind events %d on a quiet cluster", behind, st.Events())
			return
		}
	}
	for _, d := range mg.disks {
		if sb := probe(d); sb != nil && sb.SetUUID == array.CandidateUUID(mg.uuid) {
			mg.fail("(d): %s still carries a candidate superblock (device number %d) on a quiet cluster", d.name, sb.DevNumber)
			return
		}
	}
}

// viewKey renders a member set for comparison.
func viewKey(st *array.State) string {
	out := fmt.Sprintf("events %d:", st.Events())
	for _, m := range st.Members() {
		out += fmt.Sprintf(" [%d %x slot %d %s]", m.Dev, m.DeviceUUID[:2], m.Slot, m.State)
	}
	return out
}

// ManagerStats returns the manager workload's counters (zero when off).
func (s *Sim) ManagerStats() MgrStats {
	if s.bc == nil || s.bc.mg == nil {
		return MgrStats{}
	}
	return s.bc.mg.stats
}
