package sim

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// Bitmap slot ownership in the simulation.
//
// Every node runs the real bitmap/ownership Driver for one clustered RAID1
// array of two mirrors, over its own dlm.Space (through spaceLocker), with
// the real write-intent engine (bitmap/intent) on simulated member devices
// that all nodes share. Driver operations block on lock calls, so each runs
// as a coroutine in lockstep with the scheduler (see coro). The array's data
// is abstract: a write to a chunk makes it differ between the mirrors from
// the moment it reaches the first mirror until it reaches the second or a
// resync copies the chunk. Recovery events reach each driver as the
// lockspace delivers them: RecoverPrepare when the Space stops,
// RecoverDeparted when a view with departed nodes is installed, RecoverDone
// when the Space runs again.
//
// The invariants, checked after every step and where the events happen:
//
//	(a) recovery: the chunks a node's death may leave differing (its
//	    unfinished writes) are debts of its slot. A debt is paid by a resync
//	    of its chunk by a node holding the debt's slot in PW, which only one
//	    node can. A slot may not be released clean (unlocked from PW by a
//	    node other than its owner while its bit for the chunk is clear)
//	    while it owes the debt. When a node dies holding a slot whose bits it
//	    had cleared after merging them into its own slot, the debts move to
//	    its own slot. At the end of a run every debt is paid.
//	(b) exclusive writes: no slot's bits are written on a member device by
//	    a node whose Space does not grant it that slot's lock in PW at the
//	    time of the write.
//	(c) coverage: every chunk that differs between the mirrors is marked
//	    dirty, on every mirror, by some slot.
//	(d) one holder: at most one counting node is granted a slot's lock in
//	    PW, and none while a crashed node not yet fenced may still hold it.

// OwnershipConfig turns on bitmap slot ownership in a simulation.
type OwnershipConfig struct {
	// Chunks is how many chunks the bitmap covers (0: 16).
	Chunks int
	// DaemonSleep is the write-intent engine's daemon sleep in ticks (0: 3).
	DaemonSleep int
	// MaxWrites bounds each node's writes in flight (0: 3).
	MaxWrites int
	// Mutation makes the drivers deliberately wrong (see
	// ownership.Mutation), so tests can prove the invariants catch it.
	Mutation ownership.Mutation
}

// OwnStats counts what the ownership layer did in a run.
type OwnStats struct {
	Joins, WritesStarted, WritesDone, ClaimsReleased, ChunksResynced int
	// Debts were left by deaths; DebtsPaid were paid, DebtsPaidByOwner of
	// them by the dead node's own next incarnation (its join resyncs what
	// its slot marks) rather than by a survivor; DebtsMoved moved to the
	// slot of a recoverer that died after clearing the slot it recovered.
	Debts, DebtsPaid, DebtsPaidByOwner, DebtsMoved int
	// ResetsAfterLeave counts rejoins with reset after every node left the
	// array at the end of the run (the manager's crash rounds): they start
	// no array, as a daemon whose array is stopped does not join it again.
	ResetsAfterLeave int
}

// resync records one chunk resynced, by whom.
type resync struct {
	node  NodeID
	epoch int
	chunk uint64
	step  int
}

const (
	ownChunkSize = 64 << 10
	ownBitmapAt  = 4096
	ownWriteLen  = 4096
)

// ownSim is the ownership layer of one simulation.
type ownSim struct {
	s      *Sim
	cfg    OwnershipConfig
	layout bitmap.Layout
	disks  []*simDisk
	names  []string            // the slots' lock names
	nodes  map[NodeID]*ownNode // current array incarnation per running node
	epochs int
	// over: finish ran; nodes that restart or rejoin clean later (the
	// manager's crash rounds, bcast.go) start no array.
	over bool
	// pending lists, per chunk, the writes that reached the first mirror
	// and neither reached the second nor were resynced.
	pending [][]*dataWrite
	nextW   int
	debts   []*debt
	// resyncs records every chunk resynced, in order.
	resyncs []resync
	stats   OwnStats
}

// dataWrite is a write in flight to one chunk.
type dataWrite struct {
	id    int
	on    *ownNode
	chunk uint64
}

// debt is a chunk a dead node's unfinished write left differing.
type debt struct {
	chunk  uint64
	origin NodeID // the node whose death left it
	epoch  int
	holder int    // the slot that owes it
	paidBy NodeID // 0 while unpaid
}

// ownNode is one incarnation of the array on a node: its driver, lock
// adapter, device handles and coroutines. A crash, a fence or a clean
// rejoin ends it (dead); a restart or the rejoin starts the next.
type ownNode struct {
	coHost // node, coroutines, locks, operations (the driver serialises them too); dead once the incarnation is over
	o      *ownSim
	slot   int
	drv    *ownership.Driver
	joined bool
	writes []*dataWrite
}

type ownOp struct {
	name string
	f    func()
}

func newOwnSim(s *Sim) *ownSim {
	if s.cfg.Ownership == nil {
		return nil
	}
	cfg := *s.cfg.Ownership
	if cfg.Chunks <= 0 {
		cfg.Chunks = 16
	}
	if cfg.DaemonSleep <= 0 {
		cfg.DaemonSleep = 3
	}
	if cfg.MaxWrites <= 0 {
		cfg.MaxWrites = 3
	}
	o := &ownSim{s: s, cfg: cfg, nodes: map[NodeID]*ownNode{}, pending: make([][]*dataWrite, cfg.Chunks)}
	slots := int(slices.Max(s.ids))
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: uint32(slots),
		UUID: [16]byte{0x5e, 0xed}, SyncSize: uint64(cfg.Chunks) * ownChunkSize / 512, ChunkSize: ownChunkSize,
		DaemonSleep: uint32(cfg.DaemonSleep)}
	l, err := bitmap.NewLayout(&sb, ownBitmapAt, bitmap.SlotAlign)
	if err != nil {
		s.fail("ownership: bitmap layout: %v", err)
		return o
	}
	o.layout = l
	for i := range l.Slots {
		o.names = append(o.names, ownership.LockName(i))
	}
	for range 2 {
		d := &simDisk{b: make([]byte, l.End())}
		if err := bitmap.Format(d, sb, l, false); err != nil {
			s.fail("ownership: format: %v", err)
		}
		o.disks = append(o.disks, d)
	}
	return o
}

// OwnStats returns the ownership layer's counters (zero when it is off).
func (s *Sim) OwnStats() OwnStats {
	if s.own == nil {
		return OwnStats{}
	}
	return s.own.stats
}

func (o *ownSim) fail(format string, args ...any) { o.s.fail("ownership "+format, args...) }

// --- incarnations ---

// started (hook: Sim.Start) starts the array on a booted node: a new
// driver whose Join waits until the node's Space first runs.
func (o *ownSim) started(n *Node) {
	if o == nil || o.over {
		return
	}
	o.newIncarnation(n)
}

func (o *ownSim) newIncarnation(n *Node) *ownNode {
	o.epochs++
	on := &ownNode{coHost: coHost{s: o.s, n: n, tag: "own", owner: ownOwner, epoch: o.epochs, releasing: o.releasing}, o: o, slot: int(n.ID) - 1}
	var mirrors []intent.Device
	for i, d := range o.disks {
		mirrors = append(mirrors, &simDev{on: on, d: d, mirror: i})
	}
	drv, err := ownership.New(ownership.Config{
		Lockspace: &spaceLocker{on: &on.coHost}, Node: dlm.NodeID(n.ID), Layout: o.layout, Mirrors: mirrors,
		Array:       &simArray{on: on},
		DaemonSleep: time.Duration(o.cfg.DaemonSleep) * time.Second,
		Logger:      slog.New(&traceLog{s: o.s, prefix: fmt.Sprintf("own %s.%d:", n.ID, on.epoch)}),
		Go:          func(f func()) { on.ops = append(on.ops, ownOp{"recover", f}) },
		Mutation:    o.cfg.Mutation,
	})
	if err != nil {
		o.fail("node %s: %v", n.ID, err)
		on.dead = true
		return on
	}
	on.drv = drv
	o.nodes[n.ID] = on
	on.ops = append(on.ops, ownOp{"join", func() {
		if err := drv.Join(context.Background()); err != nil {
			if !on.dead {
				o.fail("node %s: join: %v", n.ID, err)
			}
			return
		}
		on.joined = true
		o.stats.Joins++
	}})
	o.s.tracef("own %s.%d: array started (join queued)", n.ID, on.epoch)
	return on
}

// crashed (hook: model.crashed, before the node's state is dropped): the
// node's array dies with it. Its slot locks become ghosts until it is
// fenced or proven restarted.
func (o *ownSim) crashed(n *Node) {
	if o == nil {
		return
	}
	on := o.nodes[n.ID]
	if on == nil {
		return
	}
	if o.s.m.counts(n) && !on.dead {
		for _, h := range on.handles {
			if _, slot := o.slotOf(h.res); slot && h.p.Mode() >= dlm.PW {
				o.s.m.ghosts = append(o.s.m.ghosts, ghost{node: n.ID, res: h.res, mode: h.p.Mode(), lock: -1})
			}
		}
	}
	o.retire(on, "crash")
	delete(o.nodes, n.ID)
}

// fenced (hook: model.fencedAlive): a storage-fenced or self-fenced node
// keeps running, but its I/O to the members is refused from now on, so its
// array incarnation is over; the next starts when it rejoins clean.
func (o *ownSim) fenced(n *Node) {
	if o == nil {
		return
	}
	if on := o.nodes[n.ID]; on != nil {
		o.retire(on, "fenced")
	}
}

// retire ends an incarnation: its unfinished writes become debts of its
// slot, its devices and locker refuse everything, and its coroutines are
// stopped (they unwind at once, every call failing).
func (o *ownSim) retire(on *ownNode, why string) {
	if on.dead {
		return
	}
	o.s.tracef("own %s.%d: array gone (%s)", on.n.ID, on.epoch, why)
	o.death(on)
	on.dead = true
	if on.drv != nil {
		on.drv.Close()
	}
	on.kill(on.cur)
	on.cur, on.side, on.ops = nil, nil, nil
}

// death turns an incarnation's unfinished writes into debts of its slot,
// and moves to its slot the debts of slots it held and had already cleared
// (their bits live on only in its own slot).
func (o *ownSim) death(on *ownNode) {
	for _, d := range o.debts {
		if d.paidBy == 0 && d.holder != on.slot && on.holdsPW(d.holder) && !o.marks(d.holder, d.chunk) && o.marks(on.slot, d.chunk) {
			o.s.tracef("own: debt chunk %d (from node %s) moves from slot %d to slot %d: its holder died after clearing it",
				d.chunk, d.origin, d.holder, on.slot)
			d.holder = on.slot
			o.stats.DebtsMoved++
		}
	}
	for _, w := range on.writes {
		if !slices.Contains(o.pending[w.chunk], w) {
			continue // resynced meanwhile: the chunk is the same on both mirrors
		}
		o.debts = append(o.debts, &debt{chunk: w.chunk, origin: on.n.ID, epoch: on.epoch, holder: on.slot})
		o.stats.Debts++
		o.s.tracef("own: debt chunk %d of slot %d: node %s died with a write to it unfinished", w.chunk, on.slot, on.n.ID)
	}
	on.writes = nil
}

// installing (hook: model.installed, before the Space recovers into the
// view) delivers RecoverPrepare (if the stop was not seen yet) and
// RecoverDeparted; a node rejoining clean (reset) loses its array
// incarnation and starts the next, unless every node has left the array
// (finish ran): the array is stopped there, and a stopped array does not
// join again (the array manager re-joins after lost locks only while
// running), so nothing would ever leave it and release its slot lock.
func (o *ownSim) installing(n *Node, in membership.Install) {
	if o == nil {
		return
	}
	on := o.nodes[n.ID]
	if on == nil {
		return
	}
	if in.Reset {
		o.retire(on, "rejoining clean")
		if o.over {
			o.stats.ResetsAfterLeave++
			o.s.tracef("own %s: the array was left: rejoining clean starts no array", n.ID)
			return
		}
		on = o.newIncarnation(n)
		if on.dead {
			return
		}
	}
	if on.dead {
		return
	}
	on.install(on.drv, in)
}

// --- running the coroutines ---

// park parks the incarnation's running coroutine until wake holds; false
// when the incarnation is gone.
func (on *coHost) park(wake func() bool) bool {
	c := on.running
	if c == nil {
		on.s.fail("%s: node %s: a blocking call outside a coroutine", on.tag, on.n.ID)
		return false
	}
	if on.dead {
		return false
	}
	if !c.park(wake) {
		return false
	}
	on.running = c
	return !on.dead
}

// awaitRunning waits until the node's Space runs (not stopped for
// recovery), as a real lockspace call waits for recovery to end.
func (on *coHost) awaitRunning() error {
	for {
		if on.dead {
			return errGone
		}
		if !on.n.Sp.Stopped() {
			return nil
		}
		if !on.park(func() bool { return on.dead || !on.n.Sp.Stopped() }) {
			return errGone
		}
	}
}

// resume (hook: the Sim.pump loop) delivers due recovery events and steps
// one runnable coroutine of node n. It reports whether anything happened,
// so the pump collects what the coroutine asked of the Space.
func (o *ownSim) resume(n *Node) bool {
	if o == nil {
		return false
	}
	on := o.nodes[n.ID]
	if on == nil || on.dead || !n.Up {
		return false
	}
	on.recover(on.drv)
	on.startOp()
	return on.stepOp() || on.stepSide()
}

// step runs one of the incarnation's coroutines until it parks or ends.
func (on *coHost) step(c *coro) {
	on.running = c
	c.step()
	on.running = nil
}

// callback (hook: model.callback) applies a Space callback for one of a
// host's locks: a blocking callback runs as a coroutine of its own (it may
// make lock calls), a completion wakes the call that waits for it.
func (on *coHost) callback(h *simLock, cb dlm.Callback) {
	if cb.Kind == dlm.Blocking {
		if h.onBlock != nil && !h.gone && !on.dead {
			f, m := h.onBlock, cb.Mode
			on.side = append(on.side, newCoro("blocking callback", func() { f(m) }))
		}
		return
	}
	if !h.pending && cb.Status != dlm.StatusReleased {
		on.s.fail("%s: node %s: second completion %v for lock %q", on.tag, on.n.ID, cb.Status, h.res)
		return
	}
	on.s.tracef("%s %s: %s %q -> %v %v %v", on.tag, on.n.ID, h.op, h.res, cb.Status, cb.Mode, cb.Flags)
	h.complete(cb)
}

// tick (hook: Sim.Tick) runs each node's bitmap daemon on the simulated
// clock: idle chunks' bits are cleared lazily.
func (o *ownSim) tick(n *Node) {
	if o == nil {
		return
	}
	on := o.nodes[n.ID]
	if on == nil || on.dead || !on.joined {
		return
	}
	if in := on.drv.Intent(); in != nil {
		if k, err := in.Tick(o.now()); err == nil && k > 0 {
			o.s.tracef("own %s.%d: bitmap daemon cleared %d bits", n.ID, on.epoch, k)
		}
	}
}

func (o *ownSim) now() time.Duration { return time.Duration(o.s.now) * time.Second }

// --- random operations ---

// randomOp (hook: model.randomOp) does an ownership operation instead of a
// lock owner's, about a third of the time, and reports whether it did.
func (o *ownSim) randomOp() bool {
	if o == nil || o.s.intn(3) != 0 {
		return false
	}
	s := o.s
	var live []*ownNode
	for _, id := range s.ids {
		if on := o.nodes[id]; on != nil && !on.dead && on.joined {
			live = append(live, on)
		}
	}
	if len(live) == 0 {
		return true
	}
	on := live[s.intn(len(live))]
	switch k := s.intn(20); {
	case k < 9:
		o.startWrite(on, uint64(s.intn(o.cfg.Chunks)))
	case k < 18:
		if len(on.writes) > 0 {
			o.endWrite(on, on.writes[s.intn(len(on.writes))])
		}
	case k < 19:
		on.ops = append(on.ops, ownOp{"reprobe", func() { _ = on.drv.Reprobe(context.Background()) }})
		s.pump(on.n)
	default:
		slot := s.intn(o.layout.Slots)
		on.ops = append(on.ops, ownOp{fmt.Sprintf("read window %d", slot), func() {
			w, ok, err := on.drv.Window(context.Background(), slot)
			s.tracef("own %s.%d: window of slot %d: %+v valid=%v err=%v", on.n.ID, on.epoch, slot, w, ok, err)
		}})
		s.pump(on.n)
	}
	return true
}

// startWrite begins a write to chunk c on node on: the write-intent engine
// marks the chunk durably first, then the write reaches the first mirror,
// and the chunk differs between the mirrors until endWrite. The array
// writes only while its node is in a quorate view.
func (o *ownSim) startWrite(on *ownNode, c uint64) {
	n := on.n
	in := on.drv.Intent()
	if in == nil || !n.quorate || !n.Ag.Quorate() || !o.s.m.counts(n) || len(on.writes) >= o.cfg.MaxWrites {
		return
	}
	if err := in.StartWrite(int64(c)*ownChunkSize, ownWriteLen); err != nil {
		o.s.tracef("own %s.%d: write to chunk %d refused: %v", n.ID, on.epoch, c, err)
		return
	}
	o.nextW++
	w := &dataWrite{id: o.nextW, on: on, chunk: c}
	o.pending[c] = append(o.pending[c], w)
	on.writes = append(on.writes, w)
	o.stats.WritesStarted++
	o.s.tracef("own %s.%d: write %d to chunk %d reached mirror 0", n.ID, on.epoch, w.id, c)
}

// endWrite completes a write: it reaches the second mirror.
func (o *ownSim) endWrite(on *ownNode, w *dataWrite) {
	on.writes = slices.DeleteFunc(on.writes, func(x *dataWrite) bool { return x == w })
	o.pending[w.chunk] = slices.DeleteFunc(o.pending[w.chunk], func(x *dataWrite) bool { return x == w })
	on.drv.Intent().EndWrite(int64(w.chunk)*ownChunkSize, ownWriteLen, o.now())
	o.stats.WritesDone++
	o.s.tracef("own %s.%d: write %d to chunk %d complete", on.n.ID, on.epoch, w.id, w.chunk)
}

// --- debts ---

// resyncChunk records that node on resynced chunk c (the mirrors agree on it
// now) and pays the chunk's debts owed by a slot the node holds in PW.
func (o *ownSim) resyncChunk(on *ownNode, c uint64) {
	o.pending[c] = nil
	o.stats.ChunksResynced++
	o.resyncs = append(o.resyncs, resync{node: on.n.ID, epoch: on.epoch, chunk: c, step: o.s.step})
	o.s.tracef("own %s.%d: resynced chunk %d", on.n.ID, on.epoch, c)
	for _, d := range o.debts {
		if d.paidBy == 0 && d.chunk == c && on.holdsPW(d.holder) {
			d.paidBy = on.n.ID
			o.stats.DebtsPaid++
			if on.n.ID == d.origin && on.slot == d.holder {
				o.stats.DebtsPaidByOwner++
			}
			o.s.tracef("own: debt chunk %d of slot %d (from node %s) paid by node %s", c, d.holder, d.origin, on.n.ID)
		}
	}
}

// holdsPW reports whether the node's Space grants this incarnation slot
// s's lock in PW (or EX): the DLM's word, not the driver's.
func (on *ownNode) holdsPW(s int) bool {
	name := on.o.names[s]
	for _, h := range on.handles {
		if h.res == name {
			if m := h.p.Mode(); m == dlm.PW || m == dlm.EX {
				return true
			}
		}
	}
	return false
}

// releasing (called by the locker before an unlock, or a conversion below
// PW, reaches the Space) checks invariant (a): a node other than the owner
// giving up a slot lock held in PW makes the slot idle; if the slot's bit
// for an unpaid debt is clear by then, the chunk would be forgotten.
func (o *ownSim) releasing(h *simLock) {
	on := h.on
	onSlot := int(on.n.ID) - 1
	if m := h.p.Mode(); m != dlm.PW && m != dlm.EX {
		return
	}
	slot, ok := o.slotOf(h.res)
	if !ok || slot == onSlot {
		return
	}
	o.stats.ClaimsReleased++
	for _, d := range o.debts {
		if d.paidBy == 0 && d.holder == slot && !o.marks(slot, d.chunk) {
			o.fail("(a): node %s released slot %d clean while chunk %d, left differing by node %s's death, was not resynced",
				on.n.ID, slot, d.chunk, d.origin)
			return
		}
	}
}

// slotOf returns the slot whose lock is named res.
func (o *ownSim) slotOf(res string) (int, bool) {
	i := slices.Index(o.names, res)
	return i, i >= 0
}

// marks reports whether slot s marks chunk c dirty on every mirror.
func (o *ownSim) marks(s int, c uint64) bool {
	off := o.layout.SlotOffset(s) + bitmap.SuperblockSize + int64(c/8)
	for _, d := range o.disks {
		if d.b[off]&(1<<(c%8)) == 0 {
			return false
		}
	}
	return true
}

// --- invariants checked after every step ---

// check (hook: Sim.Check) verifies invariants (c) and (d).
func (o *ownSim) check() {
	if o == nil {
		return
	}
	if !o.checkCoverage("between steps") {
		return
	}
	holders := make([]NodeID, o.layout.Slots)
	for _, id := range o.s.ids {
		on := o.nodes[id]
		if on == nil || on.dead || !o.s.m.counts(on.n) {
			continue
		}
		for _, h := range on.handles {
			if m := h.p.Mode(); m != dlm.PW && m != dlm.EX {
				continue
			}
			s, ok := o.slotOf(h.res)
			if !ok {
				continue
			}
			if holders[s] != 0 && holders[s] != id {
				o.fail("(d): nodes %s and %s both hold %s in PW", holders[s], id, h.res)
				return
			}
			holders[s] = id
			for _, g := range o.s.m.ghosts {
				if g.res == h.res && g.node != id {
					o.fail("(d): node %s holds %s in PW while crashed node %s, not yet fenced, may still hold it", id, h.res, g.node)
					return
				}
			}
		}
	}
}

// checkCoverage verifies invariant (c) now.
func (o *ownSim) checkCoverage(when string) bool {
	for c, ws := range o.pending {
		if len(ws) == 0 {
			continue
		}
		covered := false
		for s := 0; s < o.layout.Slots && !covered; s++ {
			covered = o.marks(s, uint64(c))
		}
		if !covered {
			o.fail("(c): %s, chunk %d differs between the mirrors (write %d of node %s) and no slot marks it on every mirror",
				when, c, ws[0].id, ws[0].on.n.ID)
			return false
		}
	}
	return true
}

// --- the end of a run ---

// finish (hook: Sim.Finish, once the cluster has settled) lets every
// driver finish its work, completes the writes in flight, requires every
// debt to be paid, then has every node leave the array (releasing its own
// slot lock) so the lock model's end checks see an empty lockspace.
func (o *ownSim) finish() {
	if o == nil || o.over || o.s.failed != "" {
		return
	}
	s := o.s
	s.tracef("--- ownership: letting the drivers finish ---")
	if !o.runQuiet(5000) {
		return
	}
	for _, id := range s.ids {
		if on := o.nodes[id]; on != nil && !on.dead {
			for len(on.writes) > 0 {
				o.endWrite(on, on.writes[0])
			}
			if !on.joined {
				o.fail("node %s.%d never joined the array", id, on.epoch)
				return
			}
		}
	}
	for _, d := range o.debts {
		if d.paidBy == 0 {
			o.fail("(a): at the end, chunk %d left differing by node %s's death is still owed by slot %d", d.chunk, d.origin, d.holder)
			return
		}
	}
	for c, ws := range o.pending {
		if len(ws) > 0 {
			o.fail("(a): at the end, chunk %d still differs between the mirrors", c)
			return
		}
	}
	s.tracef("--- ownership: every node leaves the array ---")
	for _, id := range s.ids {
		if on := o.nodes[id]; on != nil && !on.dead {
			on.ops = append(on.ops, ownOp{"leave", func() {
				if err := on.drv.Leave(context.Background()); err != nil {
					o.fail("node %s: leave: %v", id, err)
				}
			}})
			s.pump(on.n)
		}
	}
	o.runQuiet(5000)
	o.close()
	o.over = true
}

// runQuiet runs the simulation (deliveries and ticks) until every running
// node's array has no operation left, at most limit rounds.
func (o *ownSim) runQuiet(limit int) bool {
	s := o.s
	if quiet, out := s.settle(limit, o.quiet); !out {
		return quiet
	}
	var busy []string
	for _, id := range s.ids {
		if on := o.nodes[id]; on != nil && !on.dead && (on.cur != nil || len(on.ops) > 0) {
			name := "queued"
			if on.cur != nil {
				name = on.cur.name
			}
			busy = append(busy, fmt.Sprintf("%s: %s (+%d queued)", id, name, len(on.ops)))
		}
	}
	o.fail("the drivers did not finish within %d rounds: %v\n%s", limit, busy, s.Describe())
	return false
}

func (o *ownSim) quiet() bool {
	for _, id := range o.s.ids {
		on := o.nodes[id]
		if on == nil || on.dead {
			continue
		}
		if on.cur != nil || len(on.ops) > 0 || len(on.side) > 0 || on.recovering {
			return false
		}
	}
	return true
}

// close stops every coroutine still parked, so none outlives the run.
func (o *ownSim) close() {
	if o == nil {
		return
	}
	for _, id := range o.s.ids {
		if on := o.nodes[id]; on != nil {
			on.close(on.cur)
		}
	}
}

// Close releases what a run still holds (the ownership layer's parked
// coroutines); Finish does it at its end. A Sim is not used after Close.
func (s *Sim) Close() {
	s.own.close()
	s.bc.close()
}

// --- trace ---

// traceLog is a slog.Handler writing a driver's log into the trace.
type traceLog struct {
	s      *Sim
	prefix string
}

// Enabled implements slog.Handler: a driver logs only when tracing.
func (h *traceLog) Enabled(context.Context, slog.Level) bool { return h.s.cfg.Trace != nil }

// Handle implements slog.Handler: one trace line per record.
func (h *traceLog) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s", a)
		return true
	})
	h.s.tracef("%s %s", h.prefix, b.String())
	return nil
}

// WithAttrs implements slog.Handler. The driver's own attributes (node and
// slot) are dropped: the prefix names the node and incarnation.
func (h *traceLog) WithAttrs([]slog.Attr) slog.Handler { return h }

// WithGroup implements slog.Handler; groups are not shown.
func (h *traceLog) WithGroup(string) slog.Handler { return h }
