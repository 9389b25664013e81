package array

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/store"
)

// Lock names md-cluster uses besides the broadcast's and the bitmap
// slots'.
const (
	// NoNewDevLock is md's "no-new-dev": every joined node holds it in CR;
	// a node that confirms a new device drops to NL, and the adder's
	// NOQUEUE EX succeeds only when every node has confirmed.
	NoNewDevLock = "no-new-dev"
	// ResyncLock is md's "resync": held in EX by the one node that
	// resyncs or recovers.
	ResyncLock = "resync"
)

// Create writes a new array to the devices at paths (mdadm --create; see
// the package function Create for what is written) and assembles it on
// this node. The other nodes then Assemble it. The first slot's initial
// dirty bits are cleared after Create, for clustered and internal bitmaps
// alike: mdadm sets them, but md runs a new array's resync from the
// superblock's resync offset (or skips it with --assume-clean) and ignores
// the bits, while this engine resyncs every bit it finds set at start, so
// leaving them would resync a --assume-clean array in full. A new array's
// resync runs from the resync offset here too, coordinated through the
// resync lock and its windows, so that another node takes it over when
// the resyncing node dies.
func (m *Manager) Create(ctx context.Context, spec CreateSpec, paths []string) (created *Created, err error) {
	m.mu.Lock()
	if m.phase != PhaseStopped || m.dead {
		m.mu.Unlock()
		return nil, fmt.Errorf("create: the manager is %s", m.phase)
	}
	defer func() {
		if created == nil && err != nil {
			// Nothing runs: the devices given are not kept claimed.
			m.mu.Lock()
			m.releaseUnusedLocked()
			m.mu.Unlock()
		}
	}()
	ms := make([]Member, len(paths))
	for i, p := range paths {
		if p == "" || p == "missing" {
			continue
		}
		d, err := m.deviceLocked(p)
		if err != nil {
			m.mu.Unlock()
			return nil, fmt.Errorf("create: %w", err)
		}
		ms[i] = d
	}
	m.mu.Unlock()
	if spec.Rand == nil {
		spec.Rand = m.cfg.Rand
	}
	c, err := Create(spec, ms)
	if err != nil {
		return nil, err
	}
	if c.Bitmap != nil {
		clean, err := bitmap.NewSlot(*c.Bitmap)
		if err != nil {
			return nil, fmt.Errorf("create: %w", err)
		}
		for _, d := range c.Devices {
			if d.Member == nil {
				continue
			}
			if err := bitmap.WriteSlot(d.Member, c.BitmapLayout, 0, clean); err != nil {
				return nil, fmt.Errorf("create: clear slot 0 on %s: %w", d.Member.Name(), err)
			}
			if err := d.Member.Sync(); err != nil {
				return nil, fmt.Errorf("create: %w", err)
			}
		}
	}
	m.log.Info("array created", "uuid", bitmap.FormatUUID(c.Info.UUID), "level", c.Info.Level, "raid_devices", c.Info.RaidDisks,
		"members", len(paths), "bitmap", c.Info.Bitmap, "nodes", c.Info.Nodes, "clean", c.Info.Clean)
	m.mu.Lock()
	if m.cfg.UUID == ([16]byte{}) {
		m.cfg.UUID = c.Info.UUID
	}
	m.mu.Unlock()
	if err := m.Assemble(ctx); err != nil {
		return c, fmt.Errorf("create: assemble: %w", err)
	}
	return c, nil
}

// findArrayLocked returns the array's UUID: Config.UUID, or the array of
// the first configured device that carries an md superblock. mu held.
func (m *Manager) findArrayLocked() ([16]byte, error) {
	if m.uuid != ([16]byte{}) {
		return m.uuid, nil
	}
	if m.cfg.UUID != ([16]byte{}) {
		return m.cfg.UUID, nil
	}
	for _, f := range m.scanLocked() {
		return f.Super.SetUUID, nil
	}
	return [16]byte{}, fmt.Errorf("no md superblock on any of %v", m.cfg.Devices)
}

// Attach makes this node take part in the array's lockspace without
// assembling the array. The lock manager needs every node of the view to
// have opened a lockspace before any node's locks in it are granted (the
// resource directory and masters are spread over all of them), so every
// node's daemon attaches every array it finds among its devices, whether
// or not it runs it, and stays attached while it is in the cluster:
// Create and Assemble on one node wait until the others have attached.
// Assemble attaches first; attaching again does nothing.
func (m *Manager) Attach(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.attached != nil {
		return nil
	}
	if m.cfg.Cluster == nil {
		return errors.New("attach: the manager has no Cluster")
	}
	uuid, err := m.findArrayLocked()
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	ls, err := m.cfg.Cluster.Open(LockspaceName(uuid), dlm.OpenOptions{LVBLen: broadcast.LVBSize})
	if err != nil {
		return fmt.Errorf("attach: open lockspace %s: %w", LockspaceName(uuid), err)
	}
	m.uuid, m.attached = uuid, ls
	m.log = m.cfg.Logger.With("node", m.self, "array", bitmap.FormatUUID(uuid))
	m.log.Info("attached to the array's lockspace", "lockspace", LockspaceName(uuid))
	return nil
}

// Detach leaves the array's lockspace (the node is leaving the cluster).
// The array must be stopped.
func (m *Manager) Detach() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase != PhaseStopped {
		return fmt.Errorf("detach: the array is %s", m.phase)
	}
	if m.attached == nil {
		return nil
	}
	err := m.attached.Release()
	m.attached = nil
	return err
}

// Assemble finds the array's members among the configured devices and
// starts the array on this node:
//
//  1. read every configured device; the array is Config.UUID (or the first
//     array found); members that disagree, are stale, removed or foreign
//     are not used, each with its reason logged;
//  2. open the array's lockspace (named by its UUID, 64-byte value blocks)
//     with the broadcaster, the bitmap ownership driver and this manager
//     as its recovery handlers;
//  3. join the broadcast (from here on this node acts on every change), take
//     no-new-dev in CR and an NL handle on resync;
//  4. finish any change this node's journal holds from before a crash;
//  5. read the members again (the state after the join: a change made
//     while joining is in it), start the engine;
//  6. join the bitmap slot (probing the others, recovering dead ones),
//     read the other nodes' resync windows, and start the sync and
//     maintenance loops.
//
// Messages that arrive between 3 and 6 are acted on against the state read
// so far and reach the engine when it starts (md's start-up race, "fix
// NULL pointer dereference in process_metadata_update", cannot happen).
//
// A clustered array is not assembled on a node that does not see every
// working member (ErrMemberNotSeen), unless AssembleWith's FailUnseen says
// to record those members as faulty first.
func (m *Manager) Assemble(ctx context.Context) error {
	return m.AssembleWith(ctx, AssembleOptions{})
}

// AssembleOptions are the choices of a forced assemble.
type AssembleOptions struct {
	// FailUnseen (mdadm-go --assemble --force or --run) fails, cluster-wide
	// and before the engine starts, every member of a clustered array that
	// the array lists as working but this node does not see, as md records
	// a member missing at assemble: the array then runs degraded, and the
	// member, when it shows up again, has to be re-added (a bitmap-based
	// catch-up) instead of being taken as current. For a member that is
	// really gone; a member only this node cannot reach (a path missing
	// from its configuration) is then failed for every node too.
	FailUnseen bool
}

// AssembleWith is Assemble with options.
func (m *Manager) AssembleWith(ctx context.Context, opts AssembleOptions) (err error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.AssembleTimeout)
	defer cancel()
	m.mu.Lock()
	if m.phase != PhaseStopped || m.dead {
		m.mu.Unlock()
		return fmt.Errorf("assemble: the manager is %s", m.phase)
	}
	uuid, err := m.findArrayLocked()
	if err != nil {
		m.mu.Unlock()
		return fmt.Errorf("assemble: %w", err)
	}
	m.uuid = uuid
	jr, jerr := store.NewJournal(journalNamespace(uuid))
	if jerr != nil {
		m.mu.Unlock()
		return fmt.Errorf("assemble: %w", jerr)
	}
	m.jr = jr
	m.mu.Unlock()
	if err := m.redoBitmapChange(ctx); err != nil {
		return fmt.Errorf("assemble: %w", err)
	}
	m.mu.Lock()
	st, err := m.readStateLocked()
	if err != nil {
		m.mu.Unlock()
		return fmt.Errorf("assemble %s: %w", bitmap.FormatUUID(uuid), err)
	}
	for _, r := range st.Rejected {
		m.log.Warn("device not used", "reason", r)
	}
	m.st = st
	m.phase = PhaseAssembling
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.mu.Unlock()
	defer func() {
		if err != nil && !errors.Is(err, errCrashed) {
			m.abortAssemble()
		}
	}()
	if !st.Clustered {
		return m.assembleStandalone(ctx, st)
	}
	if m.cfg.Cluster == nil {
		return errors.New("assemble: the array has a clustered bitmap but the manager has no Cluster")
	}
	if int(m.self) > st.Nodes {
		return fmt.Errorf("assemble: node %d needs bitmap slot %d but the array has %d slots (md: \"Slot allotted(%d) is greater than available slots(%d)\"): grow it with --nodes first",
			m.self, m.self-1, st.Nodes, m.self, st.Nodes)
	}
	m.log.Info("assembling", "members", st.statuses(), "events", st.Events(), "nodes", st.Nodes, "lockspace", LockspaceName(uuid))
	if err := m.Attach(ctx); err != nil {
		return fmt.Errorf("assemble: %w", err)
	}

	fan := &fanout{}
	ls, err := m.cfg.Cluster.Open(LockspaceName(uuid), dlm.OpenOptions{LVBLen: broadcast.LVBSize, Recovery: fan})
	if err != nil {
		return fmt.Errorf("assemble: open lockspace: %w", err)
	}
	bus, err := broadcast.New(broadcast.Config{Locker: ls, Self: m.self, Receiver: receiver{m}, Members: m.cfg.Cluster.Members(),
		LockTimeout: m.cfg.LockTimeout, ReceiveTimeout: m.cfg.ReceiveTimeout, SendTimeout: m.cfg.SendTimeout, Logger: m.log})
	if err != nil {
		_ = ls.Release()
		return fmt.Errorf("assemble: %w", err)
	}
	ref := &intentRef{}
	mirrors := make([]intent.Device, st.Shared.RaidDisks)
	for i := range mirrors {
		mirrors[i] = slotDevice{m: m, slot: i}
	}
	own, err := ownership.New(ownership.Config{Lockspace: serialLocker{ls}, Node: m.self, Layout: st.Layout, Mirrors: mirrors,
		Array: slotResyncer{m}, DaemonSleep: m.cfg.DaemonSleep, Logger: m.log, WrapOwner: m.cfg.WrapBitmapOwner,
		Parallel: m.cfg.ParallelMirrors,
		OnRecovered: func(gen uint64, departed []dlm.NodeID, err error) {
			if err != nil {
				m.mu.Lock()
				m.ownedRetry = true
				m.mu.Unlock()
				m.wake(m.maint)
			}
		}})
	if err != nil {
		_ = ls.Release()
		return fmt.Errorf("assemble: %w", err)
	}
	m.mu.Lock()
	m.ls, m.fan, m.bus, m.own, m.in = ls, fan, bus, own, ref
	m.view = m.cfg.Cluster.Members()
	m.runEnd = make(chan struct{})
	runCtx := m.ctx
	m.mu.Unlock()
	fan.add(bus)
	fan.add(own)
	fan.add(handler{m})
	go func() {
		defer close(m.runEnd)
		_ = bus.Run(runCtx)
	}()

	// Join the broadcast. The token may be held by a change in flight
	// (md: "can't join cluster to avoid lock issue"); wait it out.
	for {
		err := bus.Join(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil || !errors.Is(err, dlm.ErrTimeout) {
			return fmt.Errorf("assemble: join the broadcast: %w", err)
		}
		m.log.Info("joining the broadcast: the token is busy (a change in flight); retrying", "err", err)
	}
	lctx, lcancel := context.WithTimeout(ctx, m.cfg.LockTimeout)
	nnd, err := ls.Request(lctx, dlm.LockSpec{Resource: NoNewDevLock, Mode: dlm.CR})
	lcancel()
	if err != nil {
		return fmt.Errorf("assemble: take %s in CR: %w", NoNewDevLock, err)
	}
	m.mu.Lock()
	m.noNewDev = nnd
	m.mu.Unlock()

	if err := m.recoverJournal(ctx); err != nil {
		return fmt.Errorf("assemble: %w", err)
	}
	if err := m.point("assemble:joined"); err != nil {
		return err
	}

	if opts.FailUnseen {
		if err := m.failUnseen(ctx); err != nil {
			return fmt.Errorf("assemble: %w", err)
		}
	}
	// The state after the join, then the engine.
	m.mu.Lock()
	if err := m.reloadLocked(0, "assemble: state after joining the broadcast"); err != nil {
		m.mu.Unlock()
		return fmt.Errorf("assemble: %w", err)
	}
	st = m.st
	if !enoughToRun(st) {
		m.mu.Unlock()
		return fmt.Errorf("assemble: not enough in-sync members to run the array: %v", st.statuses())
	}
	m.mu.Unlock()
	if f := m.cfg.beforeStart; f != nil {
		f()
	}
	if err := m.startEngine(ctx, ref); err != nil {
		return err
	}
	if err := own.Join(ctx); err != nil {
		return fmt.Errorf("assemble: join bitmap slot %d: %w", m.self-1, err)
	}
	ref.set(own.Intent())
	m.readRemoteWindows(ctx)
	m.mu.Lock()
	m.phase = PhaseRunning
	events := m.st.Events() // under mu: the loops started next replace m.st
	m.mu.Unlock()
	m.startLoops()
	m.log.Info("array running", "members", m.Members(), "events", events)
	return nil
}

// failUnseen fails every working member this node does not see, each as
// one journalled change announced to every node (AssembleOptions).
func (m *Manager) failUnseen(ctx context.Context) error {
	m.mu.Lock()
	m.allowUnseen = true
	err := m.reloadLocked(0, "assemble --force: looking for members this node does not see")
	unseen := m.st.unseen()
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.allowUnseen = false
		m.mu.Unlock()
	}()
	if err != nil {
		return err
	}
	for _, dev := range unseen {
		m.log.Warn("forced assemble: failing a working member this node does not see", "dev", dev)
		if err := m.failMissing(ctx, dev); err != nil {
			return err
		}
	}
	return nil
}

// failMissing fails working member dev, which no device this node read
// carries, during an assemble: one journalled change (announced to every
// node for a clustered array).
func (m *Manager) failMissing(ctx context.Context, dev uint32) error {
	t, err := m.begin(ctx, fmt.Sprintf("fail missing device %d", dev), true)
	if err != nil {
		return err
	}
	st := m.state()
	p, err := planFail(st, dev, m.cfg.Now())
	if err == nil {
		_, err = t.run(ctx, "fail", p, st)
	}
	t.end(ctx)
	if err != nil {
		return fmt.Errorf("fail missing device %d: %w", dev, err)
	}
	m.log.Warn("member failed: no device found for it at assemble; the array runs degraded (re-add the member when it is back)", "dev", dev)
	return nil
}

// enoughToRun reports whether the array has enough in-sync members.
func enoughToRun(st *arrayState) bool {
	sh := st.Shared
	return Enough(sh.Level, sh.Layout, int(sh.RaidDisks), func(slot int) bool {
		m := st.slotHolder(slot)
		return m != nil && m.State == MemberInSync
	})
}

// startEngine starts the engine with the current state.
func (m *Manager) startEngine(ctx context.Context, in WriteIntent) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.st
	var ems []EngineMember
	for _, s := range st.statuses() {
		ems = append(ems, engineMember(st.Members[s.Dev]))
	}
	setup := EngineSetup{Level: st.Shared.Level, Layout: st.Shared.Layout, ChunkSectors: st.Shared.ChunkSize,
		RaidDisks: int(st.Shared.RaidDisks), DevSectors: st.Shared.Size, Members: ems,
		OnMemberError: m.memberError, Now: m.cfg.Now}
	if st.HasBitmap && in != nil {
		setup.Intent, setup.BitmapChunkBytes = in, st.Layout.ChunkSize
	}
	if err := m.cfg.Engine.Start(ctx, setup); err != nil {
		return fmt.Errorf("assemble: start the engine: %w", err)
	}
	m.engineOn = true
	return nil
}

// assembleStandalone runs an array without a clustered bitmap: no
// lockspace, no broadcast; the journal still guards bitmap changes.
func (m *Manager) assembleStandalone(ctx context.Context, st *arrayState) error {
	m.mu.Lock()
	m.standalone = true
	m.mu.Unlock()
	if err := m.recoverJournal(ctx); err != nil {
		return fmt.Errorf("assemble: %w", err)
	}
	m.mu.Lock()
	if err := m.reloadLocked(0, "assemble"); err != nil {
		m.mu.Unlock()
		return fmt.Errorf("assemble: %w", err)
	}
	missing := m.st.missingWorking()
	m.mu.Unlock()
	// md runs a node-local array degraded without a member it does not
	// find and records that member as gone in the next superblock write,
	// so that it is not taken as current if it shows up again; the same
	// here, as a fail change before anything is written to the array.
	for _, dev := range missing {
		if err := m.failMissing(ctx, dev); err != nil {
			return fmt.Errorf("assemble: %w", err)
		}
	}
	m.mu.Lock()
	st = m.st
	m.mu.Unlock()
	var in WriteIntent
	if st.HasBitmap {
		mirrors := make([]intent.Device, st.Shared.RaidDisks)
		for i := range mirrors {
			mirrors[i] = slotDevice{m: m, slot: i}
		}
		var slot *bitmap.Slot
		for _, mir := range mirrors {
			s, err := bitmap.ReadSlot(mir, st.Layout, 0)
			if err != nil {
				continue
			}
			if slot == nil {
				slot = s
				continue
			}
			for _, c := range s.DirtyChunks() {
				slot.Set(c)
			}
		}
		if slot == nil {
			return errors.New("assemble: the bitmap is not readable on any member")
		}
		if d := slot.DirtyChunks(); len(d) > 0 {
			m.log.Info("bitmap marks chunks dirty from an earlier run: they are resynced", "chunks", len(d))
		}
		var owner intent.Ownership = intent.Static(0)
		if m.cfg.WrapBitmapOwner != nil {
			owner = m.cfg.WrapBitmapOwner(owner)
		}
		iv, err := intent.New(intent.Config{Layout: st.Layout, Slot: slot, Mirrors: mirrors, Owner: owner, DaemonSleep: m.cfg.DaemonSleep,
			Parallel: m.cfg.ParallelMirrors})
		if err != nil {
			return fmt.Errorf("assemble: %w", err)
		}
		ref := &intentRef{}
		ref.set(iv)
		in = ref
		m.mu.Lock()
		m.in = ref
		m.mu.Unlock()
		if err := m.startEngine(ctx, in); err != nil {
			return err
		}
		if d := slot.DirtyChunks(); len(d) > 0 {
			if err := m.resyncChunks(ctx, d); err != nil {
				m.log.Error("resync of the bitmap's dirty chunks failed; they stay dirty", "err", err)
			} else {
				iv.ResyncDone(d)
			}
		}
	} else if err := m.startEngine(ctx, nil); err != nil {
		return err
	}
	m.mu.Lock()
	m.phase = PhaseRunning
	m.mu.Unlock()
	m.startLoops()
	m.log.Info("array running without a clustered bitmap (this node only)", "members", m.Members(), "bitmap", st.HasBitmap)
	return nil
}

// abortAssemble undoes a failed Assemble: the engine stops, locks and the
// lockspace are released, state is forgotten.
func (m *Manager) abortAssemble() {
	m.log.Warn("assemble failed: releasing what it took")
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.LockTimeout)
	defer cancel()
	m.shutdown(ctx, false, false)
}

// readRemoteWindows reads, for every slot a live node owns, the resync
// window in its value block (md's gather_all_resync_info): a node that
// joins while another resyncs learns the window there, since the
// RESYNCING message went out before it joined. A window announced by a
// message since is newer and wins.
func (m *Manager) readRemoteWindows(ctx context.Context) {
	m.mu.Lock()
	own, seen := m.own, m.remote.Seen
	m.mu.Unlock()
	for s, state := range own.States() {
		if s == int(m.self)-1 || state != ownership.Watching {
			continue
		}
		w, ok, err := own.Window(ctx, s)
		if err != nil {
			m.log.Warn("cannot read another node's resync window", "slot", s, "err", err)
			continue
		}
		if !ok || !w.Active() {
			continue
		}
		m.mu.Lock()
		if m.remote.Seen != seen || m.remote.Window.Active() {
			m.mu.Unlock()
			continue
		}
		m.remote.From, m.remote.Window = dlm.NodeID(s+1), Window{Lo: w.Lo, Hi: w.Hi}
		m.mu.Unlock()
		m.log.Info("another node is resyncing (from its slot's value block)", "from", s+1, "lo", w.Lo, "hi", w.Hi)
		if err := m.cfg.Engine.SetRemoteWindow(ctx, Window{Lo: w.Lo, Hi: w.Hi}); err != nil {
			m.log.Warn("installing the remote resync window", "err", err)
		}
	}
}

// Stop stops the array on this node (mdadm --stop) and leaves its
// lockspace: running syncs end (the others take them over), the engine
// stops, and if this node leaves work behind (a sync it did not finish, or
// dirty bits in its bitmap slot) it sends BITMAP_NEEDS_SYNC so that another
// node recovers its slot at once, as md's leave does. Then its slot lock,
// no-new-dev and the broadcast are released.
func (m *Manager) Stop(ctx context.Context) error {
	m.mu.Lock()
	if rc := m.rejoinCancel; rc != nil {
		// A re-join after lost locks is under way: end it first.
		m.mu.Unlock()
		rc()
		m.rejoinWG.Wait()
		m.mu.Lock()
	}
	if m.phase != PhaseRunning && m.phase != PhaseFailed {
		ph := m.phase
		m.mu.Unlock()
		return fmt.Errorf("stop: the array is %s", ph)
	}
	m.phase = PhaseStopping
	m.mu.Unlock()
	m.log.Info("stopping the array")
	err := m.shutdown(ctx, true, false)
	// A hold taken for a re-join that never started (or was cancelled
	// above) must not outlive the array.
	m.releaseIO()
	return err
}

// shutdownLost tears the old join down after this node lost its locks:
// the slot lock, no-new-dev and the broadcast's locks were purged by the
// lock manager, so nothing is released or sent; the loops end, the
// lockspace handle is released and the devices closed, ready for a new
// Assemble.
func (m *Manager) shutdownLost(ctx context.Context) error {
	return m.shutdown(ctx, false, true)
}

// shutdown releases everything. graceful sends BITMAP_NEEDS_SYNC when work
// is left behind.
func (m *Manager) shutdown(ctx context.Context, graceful, lost bool) error {
	m.mu.Lock()
	cancel, bus, own, ls, nnd := m.cancel, m.bus, m.own, m.ls, m.noNewDev
	runEnd := m.runEnd
	interrupted := m.local.Running || m.local.Pending
	hintLo := m.local.Lo
	m.mu.Unlock()
	// The loops end first: a running sync stops after its current copy
	// step, without announcing the end of its window (md's resync_finish
	// skips that while closing: the takers learn it from
	// BITMAP_NEEDS_SYNC).
	m.stopWorkers()
	m.mu.Lock()
	m.engineOn = false
	m.mu.Unlock()
	_ = m.cfg.Engine.Stop()
	var errs []error
	if graceful && bus != nil && own != nil && !m.isDead() {
		dirty := m.ownSlotDirty()
		if interrupted || dirty {
			sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.SendTimeout)
			_, err := bus.Send(sctx, broadcast.Message{Type: broadcast.BitmapNeedsSync, Low: hintLo})
			scancel()
			if err != nil {
				errs = append(errs, fmt.Errorf("BITMAP_NEEDS_SYNC: %w", err))
			}
			m.log.Info("left work behind: BITMAP_NEEDS_SYNC sent so that another node recovers this node's slot",
				"sync_interrupted", interrupted, "slot_dirty", dirty, "resume_at", hintLo)
		}
	}
	if own != nil {
		if m.isDead() || lost {
			own.Close()
		} else if err := own.Leave(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if nnd != nil && !m.isDead() && !lost {
		if err := nnd.Unlock(context.WithoutCancel(ctx), 0); err != nil && !errors.Is(err, dlm.ErrReleased) {
			errs = append(errs, fmt.Errorf("release %s: %w", NoNewDevLock, err))
		}
	}
	if bus != nil && !m.isDead() && !lost {
		// Leave refuses while a receive is still under way (a handler that
		// outlived its sender); it is retried for at most LockTimeout.
		deadline := time.Now().Add(m.cfg.LockTimeout)
		for {
			err := bus.Leave(ctx)
			if err == nil {
				break
			}
			if !errors.Is(err, broadcast.ErrBusy) || time.Now().After(deadline) || ctx.Err() != nil {
				errs = append(errs, err)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if cancel != nil {
		cancel()
	}
	if runEnd != nil {
		<-runEnd
	}
	if ls != nil && !m.isDead() {
		if err := ls.Release(); err != nil {
			errs = append(errs, err)
		}
	}
	m.closeDevices()
	m.mu.Lock()
	m.phase, m.engineOn = PhaseStopped, false
	m.bus, m.own, m.ls, m.noNewDev, m.fan, m.runEnd = nil, nil, nil, nil, nil, nil
	m.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		m.log.Warn("array stopped with errors", "err", err)
		return fmt.Errorf("stop: %w", err)
	}
	m.log.Info("array stopped")
	return nil
}

// ownSlotDirty reads this node's bitmap slot on the in-sync members.
func (m *Manager) ownSlotDirty() bool {
	m.mu.Lock()
	st := m.st
	m.mu.Unlock()
	if st == nil || !st.HasBitmap {
		return false
	}
	for slot := 0; slot < int(st.Shared.RaidDisks); slot++ {
		s, err := bitmap.ReadSlot(slotDevice{m: m, slot: slot}, st.Layout, int(m.self)-1)
		if err == nil && s.Dirty() > 0 {
			return true
		}
	}
	return false
}

// memberError is the engine's OnMemberError: the member is failed
// cluster-wide by the maintenance loop.
func (m *Manager) memberError(dev uint32, err error) {
	m.log.Error("member I/O error: failing the member cluster-wide", "dev", dev, "err", err)
	m.queue(maintTask{kind: taskFail, dev: dev})
}

// slotDevice is bitmap mirror i for the ownership driver and the write
// intent: whatever member holds raid slot i now (reads from an in-sync
// holder, writes to an in-sync or recovering one). A member that fails or
// is replaced drops out of the bitmap's writes with it.
type slotDevice struct {
	m    *Manager
	slot int
}

var errNoHolder = errors.New("no member holds the slot")

func (d slotDevice) holder(write bool) Member {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	if d.m.st == nil {
		return nil
	}
	h := d.m.st.slotHolder(d.slot)
	if h == nil || (!write && h.State != MemberInSync) {
		return nil
	}
	return h.Member
}

func (d slotDevice) ReadAt(p []byte, off int64) (int, error) {
	h := d.holder(false)
	if h == nil {
		return 0, fmt.Errorf("bitmap mirror %d: %w", d.slot, errNoHolder)
	}
	return h.ReadAt(p, off)
}

func (d slotDevice) WriteAt(p []byte, off int64) (int, error) {
	h := d.holder(true)
	if h == nil {
		return len(p), nil // nothing holds the slot: nothing to keep current
	}
	return h.WriteAt(p, off)
}

func (d slotDevice) Sync() error {
	if h := d.holder(true); h != nil {
		return h.Sync()
	}
	return nil
}

// handler is the manager's part of the lockspace's recovery events.
type handler struct{ m *Manager }

func (h handler) RecoverPrepare(gen uint64) { h.m.recoverPrepare(gen) }
func (h handler) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	h.m.recoverDeparted(gen, nodes)
}
func (h handler) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	h.m.recoverDone(gen, members, self)
}

// receiver is the manager's broadcast.Receiver.
type receiver struct{ m *Manager }

func (r receiver) Receive(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	return r.m.receive(ctx, from, msg)
}

// wake signals a loop's channel without blocking.
func (m *Manager) wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
