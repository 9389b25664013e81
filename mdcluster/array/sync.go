package array

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// syncWork is the sync this node would run next.
type syncWork struct {
	Kind SyncKind
	// Activate: Dev is a spare to be put into Slot first.
	Activate bool
	Dev      uint32
	Slot     int
	// From is the sector to start at.
	From uint64
	// Bitmap: rebuild only what the bitmaps mark (a re-added member).
	Bitmap bool
}

// nextSyncWork decides what sync the array needs, from its state and the
// progress other nodes reported (hints, by workKey). Pure: the tests call
// it directly. In md's order: a member being rebuilt first, then a spare
// into an empty slot, then a resync of an array that is not clean.
func nextSyncWork(st *arrayState, hints map[string]uint64) (syncWork, bool) {
	if st == nil || st.Shared == nil {
		return syncWork{}, false
	}
	sh := st.Shared
	size := syncSectors(sh)
	inSync := 0
	for _, s := range st.statuses() {
		if s.State == MemberInSync {
			inSync++
		}
	}
	if inSync == 0 {
		return syncWork{}, false
	}
	for _, s := range st.statuses() {
		if s.State != MemberRecovering {
			continue
		}
		r := st.Members[s.Dev]
		from := max(s.RecoveryOffset, hints[workKey(SyncRecovery, s.Dev)])
		if from >= size {
			from = 0 // a hint from a finished pass: only the in-sync mark is missing
			if s.RecoveryOffset >= size {
				from = size
			}
		}
		return syncWork{Kind: SyncRecovery, Dev: s.Dev, Slot: s.Slot, From: from,
			Bitmap: r.Super.FeatureMap&superblock.FeatureRecoveryBitmap != 0}, true
	}
	for slot := 0; slot < int(sh.RaidDisks); slot++ {
		if st.slotHolder(slot) != nil {
			continue
		}
		for _, s := range st.statuses() {
			if s.State == MemberSpare {
				return syncWork{Kind: SyncRecovery, Activate: true, Dev: s.Dev, Slot: slot}, true
			}
		}
	}
	if !sh.Clean() && inSync >= 2 {
		from := max(sh.ResyncOffset, hints[workKey(SyncResync, 0)])
		if from > size {
			from = size
		}
		return syncWork{Kind: SyncResync, From: from}, true
	}
	return syncWork{}, false
}

// syncLoop runs this node's sync work: whenever there is some (a member
// to rebuild, a spare to bring in, an unclean array), it waits for the
// cluster's resync lock (md's resync_start: one node at a time in the
// whole cluster; while it waits the work is PENDING) and runs it.
func (m *Manager) syncLoop(ctx context.Context) {
	defer m.wg.Done()
	tick := time.NewTicker(m.cfg.ResyncRetry)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.kick:
		case <-tick.C:
		}
		m.syncOnce(ctx)
	}
}

func (m *Manager) work() (syncWork, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase != PhaseRunning {
		return syncWork{}, false
	}
	return nextSyncWork(m.st, m.remote.Hints)
}

// syncOnce runs the next sync work, if any, under the resync lock.
func (m *Manager) syncOnce(ctx context.Context) {
	if _, ok := m.work(); !ok {
		return
	}
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	m.mu.Lock()
	m.local.Pending = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.local.Pending = false
		m.mu.Unlock()
	}()
	lk, err := m.lockResync(ctx)
	if err != nil {
		if ctx.Err() == nil {
			m.log.Debug("sync work PENDING: another node holds the resync lock", "err", err)
		}
		return
	}
	defer m.unlockResync(lk)
	// Another node may have done the work while this one waited.
	m.mu.Lock()
	err = m.reloadLocked(0, "resync lock granted")
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("sync: re-reading the members", "err", err)
		return
	}
	w, ok := m.work()
	if !ok {
		return
	}
	m.mu.Lock()
	m.local.Pending = false
	m.mu.Unlock()
	if err := m.runWork(ctx, w); err != nil {
		if ctx.Err() != nil || errors.Is(err, errCrashed) {
			m.log.Info("sync interrupted: another node takes it over", "kind", w.Kind, "dev", w.Dev, "err", err)
			return
		}
		m.log.Error("sync failed; retried later", "kind", w.Kind, "dev", w.Dev, "err", err)
	}
}

// lockResync takes the resync lock in EX, waiting at most ResyncLockWait.
func (m *Manager) lockResync(ctx context.Context) (dlm.LockHandle, error) {
	m.mu.Lock()
	ls := m.ls
	m.mu.Unlock()
	if ls == nil {
		return nil, nil // no cluster: nobody to coordinate with
	}
	lctx, cancel := context.WithTimeout(ctx, m.cfg.ResyncLockWait)
	defer cancel()
	lk, err := ls.Request(lctx, dlm.LockSpec{Resource: ResyncLock, Mode: dlm.EX})
	if err != nil {
		return nil, fmt.Errorf("take %s in EX: %w", ResyncLock, err)
	}
	return lk, nil
}

func (m *Manager) unlockResync(lk dlm.LockHandle) {
	if lk == nil || m.isDead() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.LockTimeout)
	defer cancel()
	if err := lk.Unlock(ctx, 0); err != nil {
		m.log.Warn("releasing the resync lock", "err", err)
	}
}

// send broadcasts outside a change (resync windows).
func (m *Manager) send(ctx context.Context, msg broadcast.Message) error {
	m.mu.Lock()
	bus := m.bus
	m.mu.Unlock()
	if bus == nil {
		return nil
	}
	if m.isDead() {
		return errCrashed
	}
	res, err := bus.Send(ctx, msg)
	if err != nil {
		return err
	}
	if p := problems(res); p != nil {
		m.log.Warn("not every node acted on a sync message", "msg", msg.Type, "err", p)
	}
	return nil
}

// announceWindow publishes this node's window in its slot lock's value
// block (for nodes that join later) and broadcasts RESYNCING: when Send
// returns, no node writes into the window any more.
func (m *Manager) announceWindow(ctx context.Context, w Window) error {
	m.mu.Lock()
	own := m.own
	m.local.Lo, m.local.Hi = w.Lo, w.Hi
	m.mu.Unlock()
	if own != nil {
		if err := own.SetWindow(ctx, ownership.Window{Lo: w.Lo, Hi: w.Hi}); err != nil {
			return err
		}
	}
	return m.send(ctx, broadcast.Message{Type: broadcast.Resyncing, Low: w.Lo, High: w.Hi})
}

// syncSectors is the extent, in sectors, of resync and recovery and of
// the windows announced for them: the array's sectors, which for raid1 are
// also each member's data-area sectors. Writes, the bitmap and md-cluster's
// RESYNCING window are all in array sectors, so for raid10 the sync runs
// over the array too. md's recovery_offset is a device offset: for raid10
// the manager's recovery offsets and hints are array offsets instead, and
// a raid10 recovery the kernel left half done is restarted from 0 by the
// engine's reads (it reads a recovering raid10 member only once in sync).
func syncSectors(sh *superblock.Superblock) uint64 {
	if n := arraySectors(sh.Level, sh.Layout, sh.ChunkSize, sh.RaidDisks, sh.Size); n > 0 {
		return n
	}
	return sh.Size // a level the engine refuses anyway
}

// runWork runs one sync (the resync lock is held).
func (m *Manager) runWork(ctx context.Context, w syncWork) error {
	if w.Activate {
		if err := m.activate(ctx, w.Dev, w.Slot); err != nil {
			return err
		}
		w = syncWork{Kind: SyncRecovery, Dev: w.Dev, Slot: w.Slot}
	}
	m.mu.Lock()
	st := m.st
	size := syncSectors(st.Shared)
	m.mu.Unlock()
	var targets []uint32
	if w.Kind == SyncRecovery {
		targets = []uint32{w.Dev}
	} else {
		targets = resyncTargets(st)
	}
	var chunks []uint64
	if w.Bitmap && st.HasBitmap {
		var err error
		if chunks, err = m.gatherBitmaps(st); err != nil {
			return err
		}
		m.log.Info("recovering a re-added member from the union of every slot's bitmap", "dev", w.Dev, "chunks", len(chunks))
	}
	target := noTarget
	if w.Kind == SyncRecovery {
		target = w.Dev
	}
	m.mu.Lock()
	m.local = localSync{Running: true, Kind: w.Kind, Target: target, Lo: w.From, Total: size}
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.local = localSync{}
		m.mu.Unlock()
	}()
	m.log.Info("sync started", "kind", w.Kind, "target", w.Dev, "from", w.From, "size", size, "bitmap_based", w.Bitmap)
	if err := m.send(ctx, broadcast.Message{Type: broadcast.ResyncingStart, RaidSlot: target, Low: w.From}); err != nil {
		return err
	}
	win := uint64(m.cfg.ResyncWindow / superblock.SectorSize)
	lo := w.From
	if w.Bitmap && len(chunks) == 0 {
		lo = size // nothing was written while it was out
	} else if w.Bitmap {
		per := uint64(st.Layout.ChunkSize) / superblock.SectorSize
		lo = max(lo, chunks[0]*per)
	}
	for lo < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		hi := min(lo+win, size)
		if w.Bitmap {
			per := uint64(st.Layout.ChunkSize) / superblock.SectorSize
			if !slices.ContainsFunc(chunks, func(c uint64) bool { return c*per < hi && (c+1)*per > lo }) {
				lo = hi
				continue
			}
		}
		if !m.stillValid(w) {
			m.endWindow(ctx)
			return fmt.Errorf("%s of device %d: the array changed under it (member failed or removed)", w.Kind, w.Dev)
		}
		if err := m.announceWindow(ctx, Window{Lo: lo, Hi: hi}); err != nil {
			return err
		}
		req := SyncRequest{Kind: w.Kind, Lo: lo, Hi: hi, Targets: targets}
		if w.Bitmap {
			req.Chunks, req.ChunkBytes = chunks, st.Layout.ChunkSize
		}
		if err := m.cfg.Engine.Sync(ctx, req); err != nil {
			if ctx.Err() == nil && !m.isDead() {
				m.endWindow(ctx)
			}
			return fmt.Errorf("%s [%d,%d): %w", w.Kind, lo, hi, err)
		}
		lo = hi
	}
	m.endWindow(ctx)
	switch w.Kind {
	case SyncRecovery:
		return m.markInSync(ctx, w.Dev)
	default:
		return m.markResynced(ctx)
	}
}

// endWindow withdraws this node's window (RESYNCING{0,0}).
func (m *Manager) endWindow(ctx context.Context) {
	if err := m.announceWindow(context.WithoutCancel(ctx), Window{}); err != nil {
		m.log.Warn("withdrawing the resync window", "err", err)
	}
}

// resyncTargets are the in-sync members other than the first (the source).
func resyncTargets(st *arrayState) []uint32 {
	var in []MemberStatus
	for _, s := range st.statuses() {
		if s.State == MemberInSync {
			in = append(in, s)
		}
	}
	slices.SortFunc(in, func(a, b MemberStatus) int { return a.Slot - b.Slot })
	var out []uint32
	for _, s := range in[min(1, len(in)):] {
		out = append(out, s.Dev)
	}
	return out
}

// stillValid reports whether the work still applies to the array (a
// member being rebuilt may have been failed meanwhile).
func (m *Manager) stillValid(w syncWork) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase != PhaseRunning {
		return false
	}
	if w.Kind == SyncRecovery {
		r := m.st.Members[w.Dev]
		return r != nil && r.State == MemberRecovering
	}
	return !m.st.Shared.Clean()
}

// gatherBitmaps returns the union of the dirty chunks of every slot on
// every in-sync member (md's gather_bitmaps for a re-add).
func (m *Manager) gatherBitmaps(st *arrayState) ([]uint64, error) {
	set := map[uint64]bool{}
	read := 0
	for _, s := range st.statuses() {
		if s.State != MemberInSync {
			continue
		}
		d := st.Members[s.Dev].Member
		for slot := 0; slot < st.Layout.Slots; slot++ {
			sl, err := bitmap.ReadSlot(d, st.Layout, slot)
			if err != nil {
				continue
			}
			read++
			for _, c := range sl.DirtyChunks() {
				set[c] = true
			}
		}
	}
	if read == 0 {
		return nil, errors.New("gather bitmaps: no slot readable on any in-sync member")
	}
	out := make([]uint64, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	slices.Sort(out)
	return out, nil
}

// resyncChunks resyncs the given bitmap chunks window by window (the
// resync lock held by the caller, if clustered).
func (m *Manager) resyncChunks(ctx context.Context, chunks []uint64) error {
	m.mu.Lock()
	st := m.st
	on := m.engineOn
	m.mu.Unlock()
	if !on {
		return errors.New("resync: the engine is not running")
	}
	chunks = slices.Sorted(slices.Values(chunks))
	per := uint64(st.Layout.ChunkSize) / superblock.SectorSize
	win := max(uint64(m.cfg.ResyncWindow/superblock.SectorSize), per)
	var targets []uint32
	for _, s := range st.statuses() {
		if s.State == MemberRecovering {
			targets = append(targets, s.Dev)
		}
	}
	targets = append(resyncTargets(st), targets...)
	if len(targets) == 0 {
		return nil
	}
	m.mu.Lock()
	m.local = localSync{Running: true, Kind: SyncResync, Target: noTarget, Total: syncSectors(st.Shared)}
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.local = localSync{}
		m.mu.Unlock()
	}()
	if err := m.send(ctx, broadcast.Message{Type: broadcast.ResyncingStart, RaidSlot: noTarget, Low: chunks[0] * per}); err != nil {
		return err
	}
	for i := 0; i < len(chunks); {
		lo := chunks[i] * per
		j := i
		for j < len(chunks) && (chunks[j]+1)*per-lo <= win {
			j++
		}
		if j == i {
			j = i + 1
		}
		hi := min((chunks[j-1]+1)*per, syncSectors(st.Shared))
		if err := m.announceWindow(ctx, Window{Lo: lo, Hi: hi}); err != nil {
			return err
		}
		if err := m.cfg.Engine.Sync(ctx, SyncRequest{Kind: SyncResync, Lo: lo, Hi: hi, Targets: targets,
			Chunks: chunks[i:j], ChunkBytes: st.Layout.ChunkSize}); err != nil {
			m.endWindow(ctx)
			return err
		}
		i = j
	}
	m.endWindow(ctx)
	m.log.Info("resynced the chunks a bitmap slot marked", "chunks", len(chunks))
	return nil
}

// activate puts a spare into an empty slot as a recovering member (md's
// spare activation before recovery).
func (m *Manager) activate(ctx context.Context, dev uint32, slot int) error {
	t, err := m.begin(ctx, fmt.Sprintf("activate spare %d into slot %d", dev, slot), false)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	st := m.state()
	r := st.Members[dev]
	if r == nil || r.State != MemberSpare || st.slotHolder(slot) != nil {
		return fmt.Errorf("activate spare %d into slot %d: no longer possible (the array changed)", dev, slot)
	}
	if err := t.journal(JournalEntry{Kind: ChangeActivate, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
		DeviceUUID: r.DeviceUUID, Path: r.Path, Slot: slot}); err != nil {
		return err
	}
	next, err := Activate(st.Shared, dev, slot)
	if err != nil {
		return err
	}
	next = BumpEvents(next, m.cfg.Now())
	if err := t.commit("activate"); err != nil {
		return err
	}
	devs := st.devicesExcept(dev, Device{Member: r.Member, Super: Recovering(r.Super, 0, false)})
	if err := t.apply(ctx, next, devs, broadcast.MetadataUpdated, dev); err != nil {
		return err
	}
	m.log.Info("spare activated: it is rebuilt now", "dev", dev, "slot", slot)
	return nil
}

// markInSync records that a rebuilt member is in sync.
func (m *Manager) markInSync(ctx context.Context, dev uint32) error {
	t, err := m.begin(ctx, fmt.Sprintf("device %d in sync", dev), false)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	st := m.state()
	r := st.Members[dev]
	if r == nil || r.State != MemberRecovering {
		return fmt.Errorf("mark device %d in sync: it is no longer recovering", dev)
	}
	if err := t.journal(JournalEntry{Kind: ChangeInSync, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
		DeviceUUID: r.DeviceUUID, Path: r.Path, Slot: r.Slot}); err != nil {
		return err
	}
	next := BumpEvents(st.Shared, m.cfg.Now())
	if err := t.commit("in-sync"); err != nil {
		return err
	}
	devs := st.devicesExcept(dev, Device{Member: r.Member, Super: InSync(r.Super)})
	if err := t.apply(ctx, next, devs, broadcast.MetadataUpdated, dev); err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.remote.Hints, workKey(SyncRecovery, dev))
	m.mu.Unlock()
	m.log.Info("recovery complete: member in sync", "dev", dev, "slot", r.Slot)
	return nil
}

// markResynced records that the array's resync is complete.
func (m *Manager) markResynced(ctx context.Context) error {
	t, err := m.begin(ctx, "resync complete", false)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	st := m.state()
	if st.Shared.Clean() {
		return nil
	}
	if err := t.journal(JournalEntry{Kind: ChangeResynced, State: StatePrepared, BaseEvents: st.Events(), Slot: -1}); err != nil {
		return err
	}
	next := BumpEvents(st.Shared, m.cfg.Now())
	next.ResyncOffset = superblock.MaxSector
	if err := t.commit("resynced"); err != nil {
		return err
	}
	if err := t.apply(ctx, next, st.devices(), broadcast.MetadataUpdated, 0); err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.remote.Hints, workKey(SyncResync, 0))
	m.mu.Unlock()
	m.log.Info("resync complete: the array is clean")
	return nil
}
