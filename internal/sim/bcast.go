package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// The configuration broadcast in the simulation.
//
// Every node runs the real broadcast.Broadcaster for the array's lockspace
// over its own dlm.Space, through the same coroutine adapter as the bitmap
// ownership driver (spaceLocker over a coHost). The broadcaster is driven
// without goroutines: its receive loop is a coroutine the simulation starts
// whenever Pending() holds (one Step each), joins, leaves and sends are
// coroutines run one at a time per node, and Config.Parallel runs the
// per-receiver requests of a send as coroutines of their own. Each node's
// Receiver appends what it acted on (sequence number, sender, message) to
// the node's journal, which is durable: it survives crashes, as an array's
// on-disk state would, so the order invariants hold across incarnations.
//
// The invariants (failures start with "broadcast (a)" ... "(d)"):
//
//	(a) a Send that returned success was acted on (or failed in the
//	    handler) by every node that was joined, alive and in the same
//	    incarnation from before the send began until it returned;
//	(b) the journals form one order: on each node sequence numbers
//	    strictly increase (nobody acts twice, nobody goes back), and a
//	    sequence number names the same broadcast (sender, message) on
//	    every node, and a broadcast has one sequence number;
//	(c) while the cluster is calm (every node up, every lockspace running
//	    in one generation, no partition) a send returns within
//	    BroadcastConfig.Bound ticks of calm;
//	(d) each node a Result classifies is classified truthfully, against
//	    the journals: Acted acted on exactly this broadcast, Failed had
//	    its handler fail (or, for an unknown type or a stale answer, has
//	    no record), NotJoined did not act, and neither NotJoined nor
//	    Departed is a node that stayed joined and alive throughout
//	    (Departed may have acted just before it died).

// BroadcastConfig turns on the configuration broadcast in a simulation (it
// needs 64-byte value blocks).
type BroadcastConfig struct {
	// FailProb is the probability that a receiver's handler fails.
	FailProb float64
	// Bound is invariant (c)'s bound in ticks (0: 200).
	Bound int
	// ReleaseToken is broadcast.Config.ReleaseToken (false: the token is
	// cached and released by the receive loop when another node wants it).
	ReleaseToken bool
	// Mutation plants a bug, so tests can show the invariants catch it.
	Mutation BcastMutation
	// Manager, if set, runs the array manager's change protocol over the
	// broadcast (mgr.go).
	Manager *ManagerConfig
}

// BcastMutation is a deliberate bug in the simulation's receiver.
type BcastMutation uint8

const (
	// BcastDropAction: node 2's receiver reports success without acting.
	BcastDropAction BcastMutation = iota + 1
	// BcastActTwice: node 2's receiver acts on every broadcast twice.
	BcastActTwice
	// BcastNoFail: node 2's receiver acts even when it is to fail, and
	// reports the failure anyway (a failure report that lies).
	BcastNoFail
	// BcastStall: node 2's receive loop is never stepped once it has
	// joined (md's receive thread stuck: every sender waits).
	BcastStall
	// BcastSkipReceiver: senders leave node 2 out of their Results, as a
	// broadcaster that never asked it would.
	BcastSkipReceiver
)

// BcastStats counts what the broadcast layer did in a run.
type BcastStats struct {
	Joins, Leaves, LeaveBusy, Sends, SendOK, SendErr  int
	Acted, Failed, Unknown, NotJoined, Departed, Unan int
	Records, StepErrors                               int
	// Stale counts receivers that answered "stale": a broadcaster that
	// left and joined again after every node had let go of the broadcast's
	// locks keeps the highest sequence number it saw, while numbering
	// starts again at 1 (seed 1372; see docs/simulation.md).
	Stale int
}

// bcRecord is one journal entry: a broadcast a node's handler was called
// for.
type bcRecord struct {
	seq    uint64
	from   dlm.NodeID
	id     uint64 // the message's identity (Message.Low)
	typ    broadcast.Type
	failed bool
	epoch  int
	era    int
}

// bcKey names a broadcast: its era and sequence number.
type bcKey struct {
	era int
	seq uint64
}

type bcSim struct {
	s      *Sim
	cfg    BroadcastConfig
	nodes  map[NodeID]*bcNode
	epochs int
	// journal: per node, durable across crashes.
	journal map[NodeID][]bcRecord
	seqs    map[bcKey]bcRecord // the first record of each broadcast
	ids     map[uint64]bcKey   // message id -> broadcast
	// era counts the lifetimes of the broadcast's lock state: it ends when
	// no live node holds a broadcast lock, so that the value blocks (the
	// last sequence number) may be gone, and numbering starts again.
	era     int
	eraHeld bool
	nextID  uint64
	opSeq   int // orders joins and sends
	// calmSince is the tick since which the cluster is calm (-1: not).
	calmSince int64
	stats     BcastStats
	mg        *mgrSim // the manager workload, nil when off
}

// bcNode is one incarnation of the broadcaster on a node.
type bcNode struct {
	coHost   // node, coroutines, locks, operations (cur: the one in progress)
	bs       *bcSim
	b        *broadcast.Broadcaster
	joined   bool
	joinedAt int // opSeq when Join returned
	opStart  int64
	sending  bool
	recv     *coro
	recvHold int64 // no receive step before this tick (after a failed one)
	// crashReq: the manager workload crashed this node's process (it
	// stops at once; the simulation crashes it at its next check);
	// crashInSend: it is to die while its announcement is on its way.
	crashReq, crashInSend bool
}

// bcCtx is the context of every broadcaster call. It is cancelled: the
// adapter does not read contexts (real-time bounds mean nothing in
// simulated time; invariant (c) bounds waits in ticks), and the
// broadcaster's two waits on local channels (for this node's other sender,
// and Leave's wait for a receive in progress) then fail at once instead of
// blocking the simulation's only thread. The simulation runs one operation
// per node at a time and starts none while a receive step runs, so the
// first never fails; the second makes Leave return an error, which the
// simulation counts (LeaveBusy) and retries later.
var bcCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

func newBcSim(s *Sim) *bcSim {
	if s.cfg.Broadcast == nil {
		return nil
	}
	cfg := *s.cfg.Broadcast
	if cfg.Bound <= 0 {
		cfg.Bound = 200
	}
	if s.cfg.LVBLen < broadcast.LVBSize {
		s.fail("broadcast: needs %d-byte value blocks, the lockspace has %d", broadcast.LVBSize, s.cfg.LVBLen)
	}
	bs := &bcSim{s: s, cfg: cfg, nodes: map[NodeID]*bcNode{}, journal: map[NodeID][]bcRecord{},
		seqs: map[bcKey]bcRecord{}, ids: map[uint64]bcKey{}, calmSince: -1}
	if cfg.Manager != nil {
		bs.mg = newMgrSim(bs, *cfg.Manager)
	}
	return bs
}

// BcastStats returns the broadcast layer's counters (zero when it is off).
func (s *Sim) BcastStats() BcastStats {
	if s.bc == nil {
		return BcastStats{}
	}
	return s.bc.stats
}

func (bs *bcSim) fail(format string, args ...any) { bs.s.fail("broadcast "+format, args...) }

// --- incarnations ---

// started (hook: Sim.Start): a new broadcaster, not joined.
func (bs *bcSim) started(n *Node) {
	if bs == nil {
		return
	}
	bs.newIncarnation(n)
}

func (bs *bcSim) newIncarnation(n *Node) *bcNode {
	bs.epochs++
	bn := &bcNode{coHost: coHost{s: bs.s, n: n, tag: "bc", owner: bcOwner, epoch: bs.epochs}, bs: bs}
	b, err := broadcast.New(broadcast.Config{
		Locker: &spaceLocker{on: &bn.coHost}, Self: dlm.NodeID(n.ID), Receiver: bn,
		LockTimeout: time.Hour, ReceiveTimeout: time.Hour, SendTimeout: 4 * time.Hour,
		ReleaseToken: bs.cfg.ReleaseToken,
		Parallel:     bn.parallel,
		Now:          func() time.Time { return time.Unix(bs.s.now, 0) },
		Logger:       slog.New(&traceLog{s: bs.s, prefix: fmt.Sprintf("bc %s.%d:", n.ID, bn.epoch)}),
	})
	if err != nil {
		bs.fail("node %s: %v", n.ID, err)
		bn.dead = true
		return bn
	}
	bn.b = b
	bs.nodes[n.ID] = bn
	bs.mg.started(bn)
	bs.s.tracef("bc %s.%d: broadcaster started", n.ID, bn.epoch)
	return bn
}

// crashed (hook: model.crashed): the broadcaster dies with the process;
// the journal survives.
func (bs *bcSim) crashed(n *Node) {
	if bs == nil {
		return
	}
	if bn := bs.nodes[n.ID]; bn != nil {
		bs.retire(bn, "crash")
		delete(bs.nodes, n.ID)
	}
}

// fenced (hook: model.fencedAlive): the node's lock state no longer
// counts; its broadcaster is over until it rejoins clean.
func (bs *bcSim) fenced(n *Node) {
	if bs == nil {
		return
	}
	if bn := bs.nodes[n.ID]; bn != nil {
		bs.retire(bn, "fenced")
	}
}

func (bs *bcSim) retire(bn *bcNode, why string) {
	if bn.dead {
		return
	}
	bs.s.tracef("bc %s.%d: broadcaster gone (%s)", bn.n.ID, bn.epoch, why)
	bn.dead, bn.joined = true, false
	bn.kill(bn.cur, bn.recv)
	bn.cur, bn.recv, bn.side, bn.ops = nil, nil, nil, nil
}

// installing (hook: model.installed): recovery events as the lockspace
// delivers them; a clean rejoin starts a new broadcaster.
func (bs *bcSim) installing(n *Node, in membership.Install) {
	if bs == nil {
		return
	}
	bn := bs.nodes[n.ID]
	if bn == nil {
		return
	}
	if in.Reset {
		bs.retire(bn, "rejoining clean")
		bn = bs.newIncarnation(n)
	}
	if bn.dead {
		return
	}
	bn.install(bn.b, in)
	if !in.Reset {
		bs.mg.departed(bn, append(slices.Clone(in.Departed), in.Rejoined...))
	}
}

// --- running the coroutines ---

// parallel is the broadcaster's Config.Parallel: the tasks run as side
// coroutines of the node, and the caller parks until all have returned.
func (bn *bcNode) parallel(n int, task func(i int)) {
	cs := make([]*coro, n)
	for i := range n {
		cs[i] = newCoro("ask", func() { task(i) })
	}
	bn.side = append(bn.side, cs...)
	bn.park(func() bool {
		for _, c := range cs {
			if !c.done {
				return false
			}
		}
		return true
	})
}

// resume (hook: Sim.pump) delivers due recovery events and steps one
// runnable coroutine of node n: a side coroutine (blocking callback,
// parallel task), the operation in progress, or a receive step.
func (bs *bcSim) resume(n *Node) bool {
	if bs == nil {
		return false
	}
	bn := bs.nodes[n.ID]
	if bn == nil || bn.dead || !n.Up || bn.crashReq {
		return false
	}
	bn.recover(bn.b)
	if bn.stepSide() {
		return true
	}
	if bn.recv == nil && bn.startOp() {
		bn.opStart = bs.s.now
	}
	if bn.stepOp() {
		return true
	}
	if bn.recv == nil && !bs.stalled(bn) && bs.s.now >= bn.recvHold && bn.b.Pending() {
		bn.recv = newCoro("receive", func() {
			if _, err := bn.b.Step(bcCtx); err != nil && !bn.dead {
				bs.stats.StepErrors++
				bn.recvHold = bs.s.now + 1 // as Run pauses before retrying
				bs.s.tracef("bc %s.%d: receive step failed: %v", n.ID, bn.epoch, err)
			}
		})
	}
	if c := bn.recv; c != nil && c.runnable() {
		bn.step(c)
		if c.done {
			bn.recv = nil
		}
		return true
	}
	return false
}

// --- the receiver ---

// Receive implements broadcast.Receiver: it journals what it acts on.
func (bn *bcNode) Receive(ctx context.Context, from dlm.NodeID, m broadcast.Message) error {
	bs := bn.bs
	seq, ok := broadcast.SequenceOf(ctx)
	if !ok {
		bs.fail("(b): node %s: handler called without a sequence number", bn.n.ID)
	}
	if bs.mg != nil && isMgr(m) {
		err := bs.mg.receive(bn, from, m)
		bs.updateEra()
		bs.record(bn, bcRecord{seq: seq, from: from, id: msgID(m), typ: m.Type, failed: err != nil, epoch: bn.epoch, era: bs.era})
		return err
	}
	fail := bs.s.rng.Float64() < bs.cfg.FailProb
	bs.updateEra()
	rec := bcRecord{seq: seq, from: from, id: msgID(m), typ: m.Type, failed: fail, epoch: bn.epoch, era: bs.era}
	two := bn.n.ID == 2
	switch {
	case two && bs.cfg.Mutation == BcastDropAction && !fail:
		return nil
	case two && bs.cfg.Mutation == BcastNoFail && fail:
		rec.failed = false
	}
	bs.record(bn, rec)
	if two && bs.cfg.Mutation == BcastActTwice {
		bs.record(bn, rec)
	}
	if fail {
		return errors.New("simulated receiver failure")
	}
	return nil
}

// record journals rec on bn's node and checks invariant (b) for it.
func (bs *bcSim) record(bn *bcNode, rec bcRecord) {
	id := bn.n.ID
	bs.s.tracef("bc %s.%d: acts on broadcast %d from %d (message %d, %v) failed=%v", id, bn.epoch, rec.seq, rec.from, rec.id, rec.typ, rec.failed)
	bs.stats.Records++
	j := bs.journal[id]
	if len(j) > 0 && j[len(j)-1].era == rec.era && j[len(j)-1].seq >= rec.seq {
		last := j[len(j)-1]
		bs.fail("(b): node %s acts on broadcast %d (from %d, message %d) after broadcast %d (from %d, message %d)",
			id, rec.seq, rec.from, rec.id, last.seq, last.from, last.id)
	}
	key := bcKey{rec.era, rec.seq}
	if first, ok := bs.seqs[key]; ok && (first.from != rec.from || first.id != rec.id) {
		bs.fail("(b): broadcast %d is message %d from %d on node %s but message %d from %d elsewhere",
			rec.seq, rec.id, rec.from, id, first.id, first.from)
	} else if !ok {
		bs.seqs[key] = rec
	}
	if k, ok := bs.ids[rec.id]; ok && k != key {
		bs.fail("(b): message %d acted on as broadcast %d (era %d) on node %s and as broadcast %d (era %d) elsewhere",
			rec.id, rec.seq, rec.era, id, k.seq, k.era)
	}
	bs.ids[rec.id] = key
	bs.journal[id] = append(j, rec)
}

// recordOf returns node id's journal entry for broadcast seq of the
// current era.
func (bs *bcSim) recordOf(id NodeID, seq uint64) (bcRecord, bool) {
	bs.updateEra()
	for _, r := range slices.Backward(bs.journal[id]) {
		if r.era != bs.era || r.seq < seq {
			break
		}
		if r.seq == seq {
			return r, true
		}
	}
	return bcRecord{}, false
}

// updateEra starts a new era when no live node holds a broadcast lock
// granted (a request still waiting keeps no value block alive).
func (bs *bcSim) updateEra() {
	held := false
	for _, bn := range bs.nodes {
		for _, h := range bn.handles {
			if !bn.dead && h.mode != dlm.ModeIV {
				held = true
			}
		}
	}
	if bs.eraHeld && !held {
		bs.era++
		bs.s.tracef("bc: no node holds a broadcast lock: era %d begins", bs.era)
	}
	bs.eraHeld = held
}

// --- random operations ---

// randomOp (hook: model.randomOp) queues a broadcast operation on a random
// node a quarter of the time, and reports whether it did.
func (bs *bcSim) randomOp() bool {
	if bs == nil {
		return false
	}
	if bs.mg.randomOp() {
		return true
	}
	if bs.s.intn(4) != 0 {
		return false
	}
	s := bs.s
	var idle []*bcNode
	for _, id := range s.ids {
		if bn := bs.nodes[id]; bn != nil && !bn.dead && bn.cur == nil && len(bn.ops) == 0 {
			idle = append(idle, bn)
		}
	}
	if len(idle) == 0 {
		return true
	}
	bn := idle[s.intn(len(idle))]
	switch {
	case !bn.joined:
		bs.queueJoin(bn)
	case s.intn(8) == 0:
		bs.queueLeave(bn)
	default:
		typ := broadcast.Type(s.intn(10))
		if typ == 9 {
			typ = 42 // unknown to every receiver
		}
		bs.queueSend(bn, typ)
	}
	s.pump(bn.n)
	return true
}

func (bs *bcSim) queueJoin(bn *bcNode) {
	bn.ops = append(bn.ops, ownOp{"join", func() {
		err := bn.b.Join(bcCtx)
		if bn.dead {
			return
		}
		if err != nil {
			bs.fail("node %s.%d: join: %v", bn.n.ID, bn.epoch, err)
			return
		}
		bs.opSeq++
		bn.joined, bn.joinedAt = true, bs.opSeq
		bs.stats.Joins++
		bs.mg.joined(bn)
	}})
}

func (bs *bcSim) queueLeave(bn *bcNode) {
	bn.ops = append(bn.ops, ownOp{"leave", func() {
		err := bn.b.Leave(bcCtx)
		if bn.dead {
			return
		}
		if errors.Is(err, broadcast.ErrBusy) {
			bs.stats.LeaveBusy++
			return
		}
		if err != nil {
			bs.fail("node %s.%d: leave: %v", bn.n.ID, bn.epoch, err)
			return
		}
		bn.joined = false
		bs.stats.Leaves++
	}})
}

// bcJoined is what the simulation knew of a node when a send began.
type bcJoined struct {
	epoch int
	at    int
}

func (bs *bcSim) queueSend(bn *bcNode, typ broadcast.Type) {
	bs.nextID++
	id := bs.nextID
	msg := broadcast.Message{Type: typ, Low: id, RaidSlot: uint32(id % 7)}
	bn.ops = append(bn.ops, ownOp{"send", func() {
		bs.opSeq++
		start := bs.opSeq
		joined := map[NodeID]bcJoined{}
		for nid, o := range bs.nodes {
			if !o.dead && o.joined {
				joined[nid] = bcJoined{o.epoch, o.joinedAt}
			}
		}
		bn.sending = true
		bs.stats.Sends++
		res, err := bn.b.Send(bcCtx, msg)
		bn.sending = false
		if bn.dead {
			return
		}
		if bs.cfg.Mutation == BcastSkipReceiver {
			res.Acted = slices.DeleteFunc(res.Acted, func(id dlm.NodeID) bool { return id == 2 })
			delete(res.Failed, 2)
		}
		bs.s.tracef("bc %s.%d: send of message %d (%v): seq %d acted %v failed %v unanswered %v not joined %v departed %v: err %v",
			bn.n.ID, bn.epoch, id, typ, res.Seq, res.Acted, res.Failed, res.Unanswered, res.NotJoined, res.Departed, err)
		bs.sent(bn, msg, joined, start, res, err)
	}})
}

// sent checks invariants (a) and (d) for a send that returned.
func (bs *bcSim) sent(bn *bcNode, msg broadcast.Message, joined map[NodeID]bcJoined, start int, res broadcast.Result, err error) {
	bs.stats.Acted += len(res.Acted)
	bs.stats.Failed += len(res.Failed)
	bs.stats.NotJoined += len(res.NotJoined)
	bs.stats.Departed += len(res.Departed)
	bs.stats.Unan += len(res.Unanswered)
	if err != nil {
		bs.stats.SendErr++
		if errors.Is(err, broadcast.ErrNotJoined) && !bn.joined {
			return
		}
		bs.fail("node %s.%d: send of message %d: %v", bn.n.ID, bn.epoch, msgID(msg), err)
		return
	}
	bs.stats.SendOK++
	if !msg.Type.Known() {
		bs.stats.Unknown++
	}
	// stayed: joined before the send began, and still joined, alive and in
	// the same incarnation now.
	stayed := func(id NodeID) bool {
		j, ok := joined[id]
		o := bs.nodes[id]
		return ok && j.at < start && o != nil && !o.dead && o.joined && o.epoch == j.epoch
	}
	seen := map[NodeID]bool{}
	check := func(id NodeID, what string, want func(r bcRecord, ok bool) string) {
		seen[id] = true
		r, ok := bs.recordOf(id, res.Seq)
		if ok && (r.id != msgID(msg) || r.from != dlm.NodeID(bn.n.ID)) {
			bs.fail("(d): broadcast %d (message %d from %s) reported node %s %s, whose journal has message %d from %d under that number",
				res.Seq, msgID(msg), bn.n.ID, id, what, r.id, r.from)
			return
		}
		if why := want(r, ok); why != "" {
			bs.fail("(d): broadcast %d (message %d, %v, from %s) reported node %s %s, but %s", res.Seq, msgID(msg), msg.Type, bn.n.ID, id, what, why)
		}
	}
	for _, a := range res.Acted {
		check(NodeID(a), "acted", func(r bcRecord, ok bool) string {
			switch {
			case !msg.Type.Known():
				return "the type is unknown"
			case !ok:
				return "its journal has no record of it"
			case r.failed:
				return "its handler failed"
			}
			return ""
		})
	}
	for a, ferr := range res.Failed {
		check(NodeID(a), fmt.Sprintf("failed (%v)", ferr), func(r bcRecord, ok bool) string {
			switch {
			case errors.Is(ferr, broadcast.ErrUnknownType):
				if msg.Type.Known() {
					return "the type is known"
				}
				if ok {
					return "its handler was called"
				}
			case errors.Is(ferr, broadcast.ErrReceiverFailed):
				if !ok || !r.failed {
					return "its handler did not fail"
				}
			case errors.Is(ferr, broadcast.ErrStale):
				// The receiver had seen a higher number (see Stale).
				bs.stats.Stale++
				if ok {
					return "its handler was called"
				}
			default:
				return "no such failure was planted"
			}
			return ""
		})
	}
	for _, a := range res.NotJoined {
		check(NodeID(a), "not joined", func(r bcRecord, ok bool) string {
			switch {
			case ok:
				return "it acted"
			case stayed(NodeID(a)):
				return "it was joined throughout"
			}
			return ""
		})
	}
	for _, a := range res.Departed {
		// It may have acted before it died: the outcome there is lost.
		check(NodeID(a), "departed", func(r bcRecord, ok bool) string {
			if stayed(NodeID(a)) {
				return "it was joined and alive throughout"
			}
			return ""
		})
	}
	for _, a := range res.Unanswered {
		seen[NodeID(a)] = true
	}
	// (a): a successful send reached every node that stayed joined.
	for _, id := range bs.s.ids {
		if id != bn.n.ID && stayed(id) && !seen[id] {
			bs.fail("(a): broadcast %d (message %d from %s) returned success, but node %s, joined and alive throughout, is not in its result",
				res.Seq, msgID(msg), bn.n.ID, id)
			return
		}
	}
}

// --- invariants checked after every step ---

// calm reports whether nothing disturbs the broadcast: every node up and
// not fenced, every lockspace running in one generation, no partition.
func (bs *bcSim) calm() bool {
	s := bs.s
	var gen uint64
	for _, id := range s.ids {
		n := s.nodes[id]
		if !n.Up || n.fenced || n.Sp.Stopped() || s.group[id] != s.group[s.ids[0]] {
			return false
		}
		if g := n.Sp.Generation(); gen == 0 {
			gen = g
		} else if g != gen {
			return false
		}
	}
	return true
}

// check (hook: Sim.Check) verifies invariant (c).
func (bs *bcSim) check() {
	if bs == nil {
		return
	}
	s := bs.s
	bs.mg.crashes()
	bs.mg.checkDisks()
	if s.failed != "" {
		return
	}
	bs.updateEra()
	if !bs.calm() {
		bs.calmSince = -1
		return
	}
	if bs.calmSince < 0 {
		bs.calmSince = s.now
	}
	for _, id := range s.ids {
		bn := bs.nodes[id]
		if bn == nil || bn.dead || bn.cur == nil {
			continue
		}
		since := max(bn.opStart, bs.calmSince)
		if s.now-since > int64(bs.cfg.Bound) {
			bs.fail("(c): node %s's %s has waited %d ticks (since t=%d) on a calm cluster (bound %d)\n%s",
				id, bn.cur.name, s.now-since, since, bs.cfg.Bound, s.Describe())
			return
		}
	}
}

// --- the end of a run ---

// finish (hook: Sim.Finish, on a healed, settled cluster): every operation
// completes; every node joins; one last broadcast must reach every node;
// then every node leaves, so the lock model's end checks see an empty
// lockspace.
func (bs *bcSim) finish() {
	if bs == nil || bs.s.failed != "" {
		return
	}
	s := bs.s
	s.tracef("--- broadcast: letting the operations finish ---")
	if !bs.runQuiet(5000) {
		return
	}
	if !bs.joinAll() {
		return
	}
	if bs.mg != nil {
		// A round of changes on the healed cluster in which senders die
		// between steps; the dead come back, join and recover.
		if bs.mg.cfg.CrashRound {
			bs.mg.crashOK = true
			bs.mg.burst()
			ok := bs.runQuiet(5000)
			bs.mg.crashOK = false
			if !ok {
				return
			}
			bs.mg.crashes()
			s.Settle(3000)
			if s.failed != "" || !bs.joinAll() {
				return
			}
		}
		bs.mg.burst()
		if !bs.runQuiet(5000) {
			return
		}
		bs.mg.finish()
		if s.failed != "" {
			return
		}
	}
	// Every node sends one broadcast, all at once: they contend for the
	// token, and each must succeed.
	before, want := bs.stats.SendOK, 0
	for _, id := range s.ids {
		if bn := bs.nodes[id]; bn != nil && !bn.dead {
			bs.queueSend(bn, broadcast.MetadataUpdated)
			want++
		}
	}
	for _, id := range s.ids {
		s.pump(s.nodes[id])
	}
	if !bs.runQuiet(5000) {
		return
	}
	if got := bs.stats.SendOK - before; got != want {
		bs.fail("on a healed cluster, %d of the last %d broadcasts succeeded", got, want)
		return
	}
	s.tracef("--- broadcast: every node leaves ---")
	for range 10 {
		left := true
		for _, id := range s.ids {
			if bn := bs.nodes[id]; bn != nil && !bn.dead && bn.joined {
				left = false
				bs.queueLeave(bn)
				s.pump(bn.n)
			}
		}
		if left || !bs.runQuiet(5000) {
			break
		}
	}
	for _, id := range s.ids {
		if bn := bs.nodes[id]; bn != nil && !bn.dead && (bn.joined || len(bn.handles) > 0) && s.failed == "" {
			bs.fail("node %s.%d could not leave (joined %v, %d locks)", id, bn.epoch, bn.joined, len(bn.handles))
		}
	}
	bs.close()
}

// joinAll makes every live node join and waits until the operations are
// over (a node with an unfinished change recovers it once joined).
func (bs *bcSim) joinAll() bool {
	s := bs.s
	for _, id := range s.ids {
		if bn := bs.nodes[id]; bn != nil && !bn.dead && !bn.joined {
			bs.queueJoin(bn)
			s.pump(bn.n)
		}
	}
	return bs.runQuiet(5000)
}

func (bs *bcSim) runQuiet(limit int) bool {
	s := bs.s
	if quiet, out := s.settle(limit, bs.quiet); !out {
		return quiet
	}
	bs.fail("the broadcasters did not finish within %d rounds\n%s", limit, s.Describe())
	return false
}

func (bs *bcSim) quiet() bool {
	for _, id := range bs.s.ids {
		bn := bs.nodes[id]
		if bn == nil || bn.dead {
			continue
		}
		if bn.cur != nil || bn.recv != nil || len(bn.ops) > 0 || len(bn.side) > 0 || bn.recovering || (bn.b.Pending() && !bs.stalled(bn)) {
			return false
		}
	}
	return true
}

// stalled reports whether bn's receive loop is never stepped
// (BcastStall). Its pending work does not keep the run from settling: a
// joined receiver always has some (its mailbox listener to queue), and
// what must show is the senders waiting for it.
func (bs *bcSim) stalled(bn *bcNode) bool {
	return bs.cfg.Mutation == BcastStall && bn.n.ID == 2 && bn.joined
}

// close stops every coroutine still parked.
func (bs *bcSim) close() {
	if bs == nil {
		return
	}
	for _, id := range bs.s.ids {
		if bn := bs.nodes[id]; bn != nil {
			bn.close(bn.cur, bn.recv)
		}
	}
}
