package ownership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/dlm"
)

// Array is what slot recovery needs from the RAID engine: make the given
// chunks identical on every mirror and durable before returning. It must
// keep writes to those chunks out of the copy's way (md's resync barrier,
// across nodes through the announced resync window), or a write racing the
// copy could leave the mirrors different with no bit left to say so.
type Array interface {
	Resync(ctx context.Context, chunks []uint64) error
}

// ErrNotOwner is returned (wrapped) by Check once this node no longer holds
// its slot lock: the write-intent engine must not write the slot any more.
var ErrNotOwner = errors.New("bitmap slot not owned")

// Config configures a Driver.
type Config struct {
	// Lockspace is the array's lockspace (one per array, e.g. named by the
	// array UUID), opened with an LVBSize value block: the real
	// *dlm.Lockspace, or the simulator's adapter over a dlm.Space. Its
	// recovery events must reach the driver (it is a dlm.RecoveryHandler).
	Lockspace dlm.Locker
	// Node is this node's DLM ID; it owns bitmap slot Node-1.
	Node dlm.NodeID
	// Layout is the bitmap layout on each member device.
	Layout bitmap.Layout
	// Mirrors are the member devices, as this node reaches them.
	Mirrors []intent.Device
	// Array resyncs chunks during recovery.
	Array Array
	// DaemonSleep overrides the bitmap's daemon_sleep for the write-intent
	// engine when non-zero.
	DaemonSleep time.Duration
	// Logger receives the driver's log; nil means slog.Default().
	Logger *slog.Logger
	// Go runs the slot recovery a RecoverDone event starts, off the
	// lockspace's callback context (a handler must not block there); nil
	// means a new goroutine. The simulator runs it as a coroutine of its
	// own schedule instead.
	Go func(func())
	// OnRecovered, if set, is called with the outcome of each slot
	// recovery a RecoverDone event started (for logs, metrics and tests).
	OnRecovered func(gen uint64, departed []dlm.NodeID, err error)
	// WrapOwner, if set, wraps the ownership the write-intent bitmap checks
	// before each flush: the daemon adds its storage lease there
	// (mdcluster/lease.Owner re-reads the generation stamp first).
	WrapOwner func(intent.Ownership) intent.Ownership
	// Parallel runs the per-mirror I/O of slot reads and clears, and is
	// handed to the write-intent engine (intent.Config.Parallel); nil runs
	// it one mirror after the other (simulators, crash tests). A daemon
	// sets intent.ParallelGo: a dead slot's read, merge and clear then
	// cost one mirror's latency each instead of the sum.
	Parallel func(n int, f func(i int))
	// Mutation, when not zero, makes the driver deliberately wrong in one
	// way, so tests (the simulator's invariants) can prove they catch it.
	// Never set it outside tests.
	Mutation Mutation
}

// Mutation names a deliberate bug for fault-injection tests.
type Mutation uint8

const (
	// MutSkipResync: a claimed slot's chunks are merged and cleared but
	// never resynced, and the slot is released as if they had been.
	MutSkipResync Mutation = iota + 1
	// MutReleaseBeforeResync: a claimed slot's lock is released after its
	// bits are cleared but before its chunks are resynced.
	MutReleaseBeforeResync
	// MutClearAfterRelease: a claimed slot's lock is released before its
	// bits are cleared, so the clear writes a slot this node no longer
	// holds.
	MutClearAfterRelease
	// MutClearBeforeMerge: a claimed slot's bits are cleared before they
	// are merged into this node's own slot, so for a moment no slot marks
	// the chunks.
	MutClearBeforeMerge
)

// Driver carries out a Machine's actions with a dlm.Locker (the real
// lockspace, or the simulator's adapter), the member devices and the array.
// It is the write-intent engine's Ownership, and the lockspace's
// dlm.RecoveryHandler: a RecoverDone after nodes departed starts the
// recovery of their slots. Operations (Join, Departed, Reprobe, Leave, and
// the recoveries the events start) are serialised; Check may be called
// concurrently with them.
type Driver struct {
	cfg  Config
	log  *slog.Logger
	slot int
	// ctx bounds the recoveries started by recovery events; Close ends it.
	ctx    context.Context
	cancel context.CancelFunc

	op sync.Mutex // serialises operations and the machine

	mu      sync.Mutex // guards the fields below; never held across I/O
	m       *Machine
	own     dlm.LockHandle
	held    map[int]dlm.LockHandle // claimed slots' locks
	in      *intent.Intent
	closed  bool
	history []Recovery
	// departed gathers RecoverDeparted's nodes until RecoverDone.
	departed []dlm.NodeID
}

// Recovery records one recovered slot (for logs and tests).
type Recovery struct {
	Slot   int
	Chunks []uint64 // the chunks merged and resynced
	Err    error    // nil when the slot ended idle and clean
}

// New returns a driver for the node cfg.Node. It takes no lock yet: Join
// does.
func New(cfg Config) (*Driver, error) {
	if cfg.Lockspace == nil || cfg.Array == nil || len(cfg.Mirrors) == 0 {
		return nil, errors.New("bitmap ownership: lockspace, array and at least one mirror are required")
	}
	if l := cfg.Lockspace.LVBLen(); l < 16 {
		return nil, fmt.Errorf("bitmap ownership: the lockspace has a %d-byte value block, the resync window needs 16", l)
	}
	slot := int(cfg.Node) - 1
	m, err := NewMachine(cfg.Layout.Slots, slot)
	if err != nil {
		return nil, fmt.Errorf("bitmap ownership: node %d: %w", cfg.Node, err)
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	if cfg.Go == nil {
		cfg.Go = func(f func()) { go f() }
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Driver{cfg: cfg, log: lg.With("node", cfg.Node, "slot", slot), slot: slot, m: m,
		held: map[int]dlm.LockHandle{}, ctx: ctx, cancel: cancel}, nil
}

// Slot returns this node's bitmap slot (intent.Ownership).
func (d *Driver) Slot() int { return d.slot }

// Check returns an error once this node no longer holds its slot lock in PW
// (intent.Ownership): the write-intent engine calls it before every bitmap
// write, so a node that lost its slot stops writing it.
func (d *Driver) Check() error {
	d.mu.Lock()
	own, closed, st := d.own, d.closed, d.m.State(d.slot)
	d.mu.Unlock()
	switch {
	case closed:
		return fmt.Errorf("slot %d: driver closed: %w", d.slot, ErrNotOwner)
	case own == nil || st != Active:
		return fmt.Errorf("slot %d is %s: %w", d.slot, st, ErrNotOwner)
	case own.Mode() != dlm.PW:
		return fmt.Errorf("slot %d: lock %s is held in %s: %w", d.slot, LockName(d.slot), own.Mode(), ErrNotOwner)
	}
	return nil
}

// Intent returns the write-intent engine of this node's slot (nil before
// Join).
func (d *Driver) Intent() *intent.Intent {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.in
}

// States returns what this node knows about every slot.
func (d *Driver) States() []State {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.m.States()
}

// Recoveries returns the slots this node has recovered, in order.
func (d *Driver) Recoveries() []Recovery {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.history)
}

// Join takes this node's slot lock in PW (waiting, as a prober may hold it
// for a moment), reads the slot, starts the write-intent engine on it,
// resyncs any bits this node's earlier crash left, then probes every other
// slot and recovers those that are granted and dirty.
func (d *Driver) Join(ctx context.Context) error {
	d.op.Lock()
	defer d.op.Unlock()
	if d.own != nil {
		return fmt.Errorf("join slot %d: already joined", d.slot)
	}
	name := LockName(d.slot)
	lk, err := d.cfg.Lockspace.Request(ctx, dlm.LockSpec{Resource: name, Mode: dlm.PW, Flags: dlm.ValBlk})
	if err != nil {
		return fmt.Errorf("join slot %d: lock %s in PW: %w", d.slot, name, err)
	}
	slot, err := d.readUnion(d.slot)
	if err != nil {
		_ = lk.Unlock(context.WithoutCancel(ctx), 0)
		return fmt.Errorf("join slot %d: %w", d.slot, err)
	}
	dirty := slot.DirtyChunks()
	var owner intent.Ownership = d
	if d.cfg.WrapOwner != nil {
		owner = d.cfg.WrapOwner(d)
	}
	in, err := intent.New(intent.Config{Layout: d.cfg.Layout, Slot: slot, Mirrors: d.cfg.Mirrors, Owner: owner, DaemonSleep: d.cfg.DaemonSleep,
		Parallel: d.cfg.Parallel})
	if err != nil {
		_ = lk.Unlock(context.WithoutCancel(ctx), 0)
		return fmt.Errorf("join slot %d: %w", d.slot, err)
	}
	d.mu.Lock()
	d.own, d.in = lk, in
	acts := d.m.Joined(dirty)
	d.mu.Unlock()
	d.log.Info("joined: own bitmap slot locked in PW", "lock", name, "inherited_dirty", len(dirty))
	return d.run(ctx, acts)
}

// Departed tells the driver that these nodes died and were fenced, and that
// the DLM has recovered without them (so their locks are gone). Their slots
// are probed; the one survivor whose NOQUEUE PW is granted merges each
// slot's dirty bits into its own slot, clears them in the dead slot,
// resyncs exactly those chunks and releases the lock. A slot another
// survivor was recovering is probed again too, in case that survivor is
// among the dead.
func (d *Driver) Departed(ctx context.Context, nodes []dlm.NodeID) error {
	d.op.Lock()
	defer d.op.Unlock()
	slots := make([]int, 0, len(nodes))
	for _, n := range nodes {
		slots = append(slots, int(n)-1)
	}
	d.mu.Lock()
	acts := d.m.Departed(slots)
	d.mu.Unlock()
	d.log.Info("nodes departed: probing their slots", "departed", nodes, "probes", len(acts))
	return d.run(ctx, acts)
}

// RecoverPrepare (dlm.RecoveryHandler) notes that the lockspace stopped
// for a membership change. Nothing needs doing yet: until RecoverDone,
// nothing a departed node held is granted to anyone, so no slot changes
// hands, and this node's own lock stays held.
func (d *Driver) RecoverPrepare(gen uint64) {
	d.log.Debug("lockspace stopped for a membership change", "gen", gen)
}

// RecoverDeparted (dlm.RecoveryHandler) remembers the nodes that departed;
// their slots are recovered once the lockspace has recovered without them
// (RecoverDone), when their locks are purged and the probes can be granted.
func (d *Driver) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range nodes {
		if !slices.Contains(d.departed, n) {
			d.departed = append(d.departed, n)
		}
	}
	d.log.Info("nodes departed: their slots are recovered when the lockspace has recovered", "gen", gen, "departed", nodes)
}

// RecoverDone (dlm.RecoveryHandler): the lockspace recovered into gen. If
// nodes departed since the last RecoverDone, their slots are recovered
// (Departed), on cfg.Go since a recovery handler must not block. If this
// node's own lock did not survive (it rejoined the cluster clean), the slot
// is lost: the write-intent engine stops writing it.
func (d *Driver) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	d.mu.Lock()
	nodes, own := d.departed, d.own
	d.departed = nil
	d.mu.Unlock()
	if own != nil {
		if mode := own.Mode(); mode != dlm.PW {
			d.mu.Lock()
			if d.own == own && d.m.State(d.slot) == Active {
				d.m.OwnLost()
				d.log.Error("own bitmap slot lock lost in recovery: no more bitmap writes", "gen", gen, "mode", mode)
			}
			d.mu.Unlock()
		}
	}
	if len(nodes) == 0 {
		return
	}
	slices.Sort(nodes)
	d.cfg.Go(func() {
		err := d.Departed(d.ctx, nodes)
		if err != nil {
			d.log.Error("slot recovery after a membership change failed", "gen", gen, "departed", nodes, "err", err)
		}
		if f := d.cfg.OnRecovered; f != nil {
			f(gen, nodes, err)
		}
	})
}

// Reprobe probes every other slot again and retries owed resyncs: stale
// Watching or Elsewhere knowledge is refreshed, and failed recoveries are
// retried.
func (d *Driver) Reprobe(ctx context.Context) error {
	d.op.Lock()
	defer d.op.Unlock()
	d.mu.Lock()
	acts := d.m.Reprobe()
	d.mu.Unlock()
	return d.run(ctx, acts)
}

// SetWindow publishes this node's resync window in its slot lock's value
// block (a PW to PW conversion with VALBLK writes it, as md-cluster's
// resync_info_update does). Nodes that join later, or watch the slot, read
// it with Window.
func (d *Driver) SetWindow(ctx context.Context, w Window) error {
	d.mu.Lock()
	own := d.own
	d.mu.Unlock()
	if own == nil {
		return fmt.Errorf("set resync window of slot %d: not joined", d.slot)
	}
	if err := own.SetLVB(w.MarshalLVB()[:d.cfg.Lockspace.LVBLen()]); err != nil {
		return fmt.Errorf("set resync window of slot %d: %w", d.slot, err)
	}
	if err := own.Convert(ctx, dlm.PW, dlm.ValBlk); err != nil {
		return fmt.Errorf("set resync window of slot %d: publish: %w", d.slot, err)
	}
	return nil
}

// Window reads slot s's announced resync window with a CR lock (compatible
// with the owner's PW, so it never disturbs it). ok is false when the value
// is not valid (its owner died holding it, or it was never written).
func (d *Driver) Window(ctx context.Context, s int) (w Window, ok bool, err error) {
	name := LockName(s)
	lk, err := d.cfg.Lockspace.Request(ctx, dlm.LockSpec{Resource: name, Mode: dlm.CR, Flags: dlm.ValBlk})
	if err != nil {
		return Window{}, false, fmt.Errorf("read resync window of slot %d: lock %s in CR: %w", s, name, err)
	}
	defer func() {
		if uerr := lk.Unlock(context.WithoutCancel(ctx), 0); uerr != nil && err == nil {
			err = fmt.Errorf("read resync window of slot %d: unlock: %w", s, uerr)
		}
	}()
	if lk.StatusFlags()&dlm.ValNotValid != 0 {
		return Window{}, false, nil
	}
	w, err = UnmarshalLVB(lk.LVB())
	if err != nil {
		return Window{}, false, fmt.Errorf("slot %d: %w", s, err)
	}
	return w, true, nil
}

// Leave releases this node's slot lock after stopping the write-intent
// engine. Bits still set stay on disk: the slot is then idle but dirty,
// and the next node to probe it recovers it (md-cluster sends
// BITMAP_NEEDS_SYNC for the same reason).
func (d *Driver) Leave(ctx context.Context) error {
	d.op.Lock()
	defer d.op.Unlock()
	d.mu.Lock()
	own, in := d.own, d.in
	d.own, d.closed = nil, true
	d.m.Left()
	d.mu.Unlock()
	if in != nil {
		_ = in.Close()
	}
	if own == nil {
		return nil
	}
	if err := own.SetLVB(Window{}.MarshalLVB()[:d.cfg.Lockspace.LVBLen()]); err != nil {
		return fmt.Errorf("leave slot %d: %w", d.slot, err)
	}
	if err := own.Unlock(ctx, dlm.ValBlk); err != nil {
		return fmt.Errorf("leave slot %d: unlock %s: %w", d.slot, LockName(d.slot), err)
	}
	return nil
}

// Close stops the driver without touching the DLM: used when this node is
// being torn down (or was fenced) and its locks go with its lockspace.
func (d *Driver) Close() {
	d.cancel()
	d.mu.Lock()
	in := d.in
	d.closed = true
	d.m.OwnLost()
	d.mu.Unlock()
	if in != nil {
		_ = in.Close()
	}
}

// run carries out actions in order, feeding each outcome back to the
// machine and appending what it asks for next. It stops at the first error
// that leaves this node unable to continue (its own slot lost); other
// errors are remembered and returned at the end, after the machine has
// put every claimed slot back.
func (d *Driver) run(ctx context.Context, acts []Action) error {
	var errs []error
	for len(acts) > 0 {
		d.mu.Lock()
		closed := d.closed
		d.mu.Unlock()
		if closed {
			// Torn down or fenced: no more DLM calls or writes. Claimed
			// locks go with the lockspace, their slots' bits with them
			// still on disk for the next survivor.
			errs = append(errs, fmt.Errorf("slot %d: driver closed with %d actions left: %w", d.slot, len(acts), ErrNotOwner))
			break
		}
		a := acts[0]
		acts = acts[1:]
		next, err := d.do(ctx, a)
		if err != nil {
			errs = append(errs, err)
			if errors.Is(err, ErrNotOwner) || errors.Is(err, intent.ErrClosed) {
				// Our own slot is gone: nothing more may be written. The
				// claimed locks go with the lockspace.
				break
			}
		}
		acts = append(acts, next...)
	}
	return errors.Join(errs...)
}

// do carries out one action and returns the machine's next actions.
func (d *Driver) do(ctx context.Context, a Action) ([]Action, error) {
	switch a.Op {
	case OpProbe:
		return d.probe(ctx, a.Slot)
	case OpRead:
		s, err := d.readUnion(a.Slot)
		if err != nil {
			return d.failed(a, err)
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.m.Read(a.Slot, s.DirtyChunks()), nil
	case OpMerge:
		if d.cfg.Mutation == MutClearBeforeMerge {
			_ = d.clear(a.Slot)
		}
		in := d.Intent()
		if in == nil {
			return d.failed(a, errors.New("not joined"))
		}
		if err := in.Merge(a.Chunks); err != nil {
			return d.failed(a, fmt.Errorf("into own slot %d: %w", d.slot, err))
		}
		d.log.Info("dead slot's dirty bits merged into own slot (durable on every mirror)", "from", a.Slot, "chunks", len(a.Chunks))
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.m.Merged(a.Slot), nil
	case OpClear:
		if d.cfg.Mutation == MutClearAfterRelease {
			_ = d.dropClaim(ctx, a.Slot)
		}
		if err := d.clear(a.Slot); err != nil {
			return d.failed(a, err)
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.m.Cleared(a.Slot), nil
	case OpResync:
		var err error
		switch {
		case a.Slot != d.slot && d.cfg.Mutation == MutSkipResync:
		case a.Slot != d.slot && d.cfg.Mutation == MutReleaseBeforeResync:
			_ = d.dropClaim(ctx, a.Slot)
			err = d.resync(ctx, a.Chunks)
		default:
			err = d.resync(ctx, a.Chunks)
		}
		if err != nil {
			err = fmt.Errorf("bitmap ownership: resync of %d chunks from slot %d: %w", len(a.Chunks), a.Slot, err)
			d.log.Error("resync failed: the chunks stay dirty in our own slot and are retried", "from", a.Slot, "err", err)
		} else if in := d.Intent(); in != nil {
			in.ResyncDone(a.Chunks)
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if a.Slot != d.slot {
			d.history = append(d.history, Recovery{Slot: a.Slot, Chunks: slices.Clone(a.Chunks), Err: err})
		}
		return d.m.Resynced(a.Slot, a.Chunks, err == nil), err
	case OpRelease:
		return d.release(ctx, a.Slot)
	}
	return nil, fmt.Errorf("bitmap ownership: unknown action %v", a)
}

// failed reports a failed read, merge or clear of a claimed slot.
func (d *Driver) failed(a Action, err error) ([]Action, error) {
	err = fmt.Errorf("bitmap ownership: %s of slot %d: %w", a.Op, a.Slot, err)
	d.log.Error("slot recovery step failed: releasing the slot with its bits still on disk", "op", a.Op, "slot", a.Slot, "err", err)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.history = append(d.history, Recovery{Slot: a.Slot, Chunks: slices.Clone(a.Chunks), Err: err})
	return d.m.StepFailed(a.Slot), err
}

// probe requests slot s's lock in PW with NOQUEUE.
func (d *Driver) probe(ctx context.Context, s int) ([]Action, error) {
	name := LockName(s)
	lk, err := d.cfg.Lockspace.Request(ctx, dlm.LockSpec{Resource: name, Mode: dlm.PW, Flags: dlm.NoQueue | dlm.ValBlk})
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case err == nil:
		d.held[s] = lk
		d.log.Debug("probe granted: slot idle or its owner dead", "probe_slot", s)
		return d.m.ProbeGranted(s), nil
	case errors.Is(err, dlm.ErrAgain):
		d.log.Debug("probe refused: slot owned by a live node", "probe_slot", s)
		return d.m.ProbeRefused(s), nil
	default:
		return d.m.ProbeFailed(s), fmt.Errorf("bitmap ownership: probe %s: %w", name, err)
	}
}

// release unlocks a claimed slot, writing a zero resync window: whatever
// window its dead owner announced is over.
func (d *Driver) release(ctx context.Context, s int) ([]Action, error) {
	err := d.dropClaim(ctx, s)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.m.Released(s), err
}

// dropClaim unlocks claimed slot s's lock, if still held, with a zero
// window in its value block.
func (d *Driver) dropClaim(ctx context.Context, s int) error {
	d.mu.Lock()
	lk := d.held[s]
	delete(d.held, s)
	d.mu.Unlock()
	if lk == nil {
		return nil
	}
	err := lk.SetLVB(Window{}.MarshalLVB()[:d.cfg.Lockspace.LVBLen()])
	if err == nil {
		err = lk.Unlock(context.WithoutCancel(ctx), dlm.ValBlk)
	}
	if err != nil {
		return fmt.Errorf("bitmap ownership: release %s: %w", LockName(s), err)
	}
	return nil
}

// readUnion reads slot s on every mirror and returns it with the union of
// the bits: a crash can leave a bit durable on some mirrors only (the owner
// writes them one after the other), and any copy's bit may guard data that
// differs. Unreadable copies are skipped as long as one is readable.
func (d *Driver) readUnion(s int) (*bitmap.Slot, error) {
	slots := make([]*bitmap.Slot, len(d.cfg.Mirrors))
	readErrs := make([]error, len(d.cfg.Mirrors))
	intent.EachMirror(d.cfg.Parallel, len(d.cfg.Mirrors), func(i int) error {
		slots[i], readErrs[i] = bitmap.ReadSlot(d.cfg.Mirrors[i], d.cfg.Layout, s)
		return nil // every mirror is read; the errors are weighed below
	})
	var out *bitmap.Slot
	var errs []error
	for i, sl := range slots {
		if err := readErrs[i]; err != nil {
			errs = append(errs, fmt.Errorf("mirror %d: %w", i, err))
			continue
		}
		if out == nil {
			out = sl
			continue
		}
		for _, c := range sl.DirtyChunks() {
			out.Set(c)
		}
	}
	if out == nil {
		return nil, fmt.Errorf("read slot %d: no mirror readable: %w", s, errors.Join(errs...))
	}
	if len(errs) > 0 {
		d.log.Warn("slot unreadable on some mirrors; using the others", "read_slot", s, "err", errors.Join(errs...))
	}
	return out, nil
}

// clear writes slot s with every bit clear to every mirror, syncing each.
// It runs only after the bits were merged durably into our own slot.
func (d *Driver) clear(s int) error {
	cur, err := d.readUnion(s)
	if err != nil {
		return err
	}
	clean, err := bitmap.NewSlot(cur.Super)
	if err != nil {
		return fmt.Errorf("clear slot %d: %w", s, err)
	}
	return intent.EachMirror(d.cfg.Parallel, len(d.cfg.Mirrors), func(i int) error {
		m := d.cfg.Mirrors[i]
		if err := bitmap.WriteSlot(m, d.cfg.Layout, s, clean); err != nil {
			return fmt.Errorf("clear slot %d: mirror %d: %w", s, i, err)
		}
		if err := m.Sync(); err != nil {
			return fmt.Errorf("clear slot %d: mirror %d: sync: %w", s, i, err)
		}
		return nil
	})
}

// resync announces the window covering chunks in our own value block, has
// the array resync them, and withdraws the window.
func (d *Driver) resync(ctx context.Context, chunks []uint64) error {
	if len(chunks) == 0 {
		return nil
	}
	per := uint64(d.cfg.Layout.ChunkSize) / 512
	w := Window{Lo: slices.Min(chunks) * per, Hi: (slices.Max(chunks) + 1) * per}
	if err := d.SetWindow(ctx, w); err != nil {
		return err
	}
	err := d.cfg.Array.Resync(ctx, chunks)
	if werr := d.SetWindow(context.WithoutCancel(ctx), Window{}); werr != nil && err == nil {
		err = werr
	}
	return err
}
