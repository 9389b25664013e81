package array

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// BitmapSpec is mdadm --grow --bitmap=MODE [--nodes=N] [--bitmap-chunk=C]
// [--home-cluster=NAME].
type BitmapSpec struct {
	// Mode is the bitmap wanted: none, internal or clustered.
	Mode BitmapMode
	// Nodes is the slot count of a clustered bitmap (0: keep the current
	// one, or mdadm's 4 when switching to clustered).
	Nodes int
	// ClusterName is required when switching to clustered.
	ClusterName string
	// Chunk is the bitmap chunk in bytes when a bitmap is created from
	// none (0: mdadm's rule); ignored otherwise.
	Chunk int64
}

// SetBitmap changes the array's bitmap (mdadm --grow --bitmap=, --nodes=).
//
// Leaving a clustered bitmap, or changing its node count, needs this node
// to be the only one using the array: like md's lock_all_bitmaps it takes
// every other slot's lock with NOQUEUE PW, and refuses with md's words
// ("can't change bitmap to none since the array is in use by more than one
// node") if any is held; the locks are kept until the change is done, so
// no node can start the array meanwhile. The array is then stopped here,
// the bitmaps and superblocks rewritten (every slot's dirty bits are kept:
// they are merged into the single slot of an internal bitmap, resynced
// before a bitmap is removed, or carried into slot 0 of a new clustered
// bitmap), and started again in the new mode, so I/O pauses for the
// switch. The change is journalled; a crash during it is finished when the
// array is next assembled here.
func (m *Manager) SetBitmap(ctx context.Context, spec BitmapSpec) error {
	m.mu.Lock()
	st, ph, attached := m.st, m.phase, m.attached
	m.mu.Unlock()
	if ph != PhaseRunning {
		return fmt.Errorf("grow bitmap: %w (%s)", ErrNotRunning, ph)
	}
	cur := BitmapNone
	if st.HasBitmap {
		cur = BitmapInternal
		if st.Clustered {
			cur = BitmapClustered
		}
	}
	nodes := spec.Nodes
	switch spec.Mode {
	case BitmapNone, BitmapInternal:
		if nodes != 0 {
			return fmt.Errorf("grow bitmap: %w: --nodes is only meaningful with a clustered bitmap", ErrRefusedChange)
		}
	case BitmapClustered:
		if nodes == 0 {
			nodes = max(st.Nodes, DefaultNodes)
			if cur == BitmapClustered {
				nodes = st.Nodes
			}
		}
		if nodes < 2 {
			return fmt.Errorf("grow bitmap: %w: At least 2 nodes are needed for cluster-md", ErrRefusedChange)
		}
		if nodes > MaxNodes {
			return fmt.Errorf("grow bitmap: %w: %d nodes: at most %d slots", ErrRefusedChange, nodes, MaxNodes)
		}
		if int(m.self) > nodes && m.cfg.Cluster != nil {
			return fmt.Errorf("grow bitmap: %w: this node needs slot %d", ErrRefusedChange, m.self-1)
		}
		if cur != BitmapClustered && spec.ClusterName == "" {
			return fmt.Errorf("grow bitmap: %w: a clustered bitmap needs the cluster name", ErrRefusedChange)
		}
		if m.cfg.Cluster == nil {
			return fmt.Errorf("grow bitmap: %w: the manager has no Cluster to run a clustered bitmap with", ErrRefusedChange)
		}
	default:
		return fmt.Errorf("grow bitmap: %w: unknown mode %q", ErrRefusedChange, spec.Mode)
	}
	if spec.Mode == cur && (cur != BitmapClustered || nodes == st.Nodes) {
		return nil
	}
	// md's lock_all_bitmaps: every other slot must be free.
	var held []dlm.LockHandle
	release := func() {
		for _, h := range held {
			_ = h.Unlock(context.WithoutCancel(ctx), 0)
		}
	}
	defer release()
	if cur == BitmapClustered {
		if attached == nil {
			return errors.New("grow bitmap: not attached to the array's lockspace")
		}
		for s := 0; s < st.Nodes; s++ {
			if s == int(m.self)-1 {
				continue
			}
			h, err := attached.Request(ctx, dlm.LockSpec{Resource: ownership.LockName(s), Mode: dlm.PW, Flags: dlm.NoQueue})
			if errors.Is(err, dlm.ErrAgain) {
				return fmt.Errorf("grow bitmap: %w: can't change bitmap to %s since the array is in use by more than one node (slot %d is held)",
					ErrInUseByOthers, spec.Mode, s)
			}
			if err != nil {
				return fmt.Errorf("grow bitmap: lock slot %d: %w", s, err)
			}
			held = append(held, h)
		}
	}
	m.log.Info("changing the bitmap: stopping the array here, rewriting, starting again", "from", cur, "to", spec.Mode, "nodes", nodes)
	if err := m.Stop(ctx); err != nil {
		return fmt.Errorf("grow bitmap: %w", err)
	}
	if cur == BitmapClustered {
		h, err := attached.Request(ctx, dlm.LockSpec{Resource: ownership.LockName(int(m.self) - 1), Mode: dlm.PW, Flags: dlm.NoQueue})
		if err != nil {
			return fmt.Errorf("grow bitmap: lock this node's slot: %w", err)
		}
		held = append(held, h)
	}
	e := JournalEntry{Kind: ChangeBitmap, State: StatePrepared, BaseEvents: st.Events(), Bitmap: spec.Mode, Nodes: nodes, Slot: -1}
	if spec.Mode == BitmapClustered && cur != BitmapClustered {
		e.Path = spec.ClusterName
	}
	e.Array, e.Node, e.Started = m.uuid, uint32(m.self), m.cfg.Now()
	if err := m.rewriteBitmap(e, spec.Chunk); err != nil {
		return fmt.Errorf("grow bitmap: %w", err)
	}
	release()
	held = nil
	if err := m.Assemble(ctx); err != nil {
		return fmt.Errorf("grow bitmap: start again: %w", err)
	}
	return nil
}

// rewriteBitmap carries out a journalled bitmap change on the stopped
// array: journal, rewrite, done.
func (m *Manager) rewriteBitmap(e JournalEntry, chunk int64) error {
	b, err := e.encode()
	if err != nil {
		return err
	}
	var seq uint64
	if err := m.cfg.Store.Update(func(tx store.Txn) (err error) {
		seq, err = m.jr.Append(tx, b)
		return err
	}); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if err := m.point("bitmap:journalled"); err != nil {
		return err
	}
	if err := m.applyBitmap(e, chunk); err != nil {
		return err
	}
	if err := m.point("bitmap:written"); err != nil {
		return err
	}
	return m.cfg.Store.Update(func(tx store.Txn) error { return m.jr.Done(tx, seq) })
}

// applyBitmap rewrites the members for e. It is idempotent: after a crash
// it runs again from whatever the last run left (the dirty bits are read
// from every slot of both the old and the new layout).
func (m *Manager) applyBitmap(e JournalEntry, chunk int64) error {
	m.mu.Lock()
	insp, err := m.inspectLocked()
	m.mu.Unlock()
	if err != nil {
		return err
	}
	if insp.Freshest < 0 {
		return errors.New("no superblock of the array")
	}
	return rewriteBitmap(insp, m.uuid, BitmapSpec{Mode: e.Bitmap, Nodes: e.Nodes, ClusterName: e.Path, Chunk: chunk}, m.cfg.Now(), m.log)
}

// ConvertBitmap changes the bitmap of a stopped array on its members, the
// rewrite SetBitmap does (and mdadm --grow --bitmap= asks for), without a
// manager: the dirty chunks of every slot are kept (merged into the one
// slot of an internal bitmap, carried into slot 0 of a new clustered one;
// removing a bitmap that marks dirty chunks schedules a full resync), the
// bitmap area is reformatted and every member's superblock rewritten with
// the events bumped. spec.Nodes 0 keeps a clustered bitmap's slot count
// (mdadm's 4 when switching to clustered); spec.ClusterName is needed when
// switching to clustered.
//
// Nothing is locked and nothing is journalled: the caller must know that
// no node (and no kernel) has the array running, e.g. a tool working on
// member images, or a test. A running array changes its bitmap with
// Manager.SetBitmap, which takes every slot's lock first and survives a
// crash half-way.
func ConvertBitmap(members []Member, spec BitmapSpec, now time.Time, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	insp, err := Inspect(members, InspectOptions{})
	if err != nil {
		return fmt.Errorf("convert bitmap: %w", err)
	}
	if insp.Info == nil || insp.Freshest < 0 {
		return errors.New("convert bitmap: no member holds a superblock of the array")
	}
	switch spec.Mode {
	case BitmapNone, BitmapInternal:
		if spec.Nodes != 0 {
			return fmt.Errorf("convert bitmap: %w: --nodes is only meaningful with a clustered bitmap", ErrRefusedChange)
		}
	case BitmapClustered:
		if spec.Nodes == 0 {
			spec.Nodes = DefaultNodes
			if insp.Info.Bitmap == BitmapClustered {
				spec.Nodes = insp.Info.Nodes
			}
		}
		if spec.Nodes < 2 || spec.Nodes > MaxNodes {
			return fmt.Errorf("convert bitmap: %w: %d nodes: a clustered bitmap has 2 to %d slots", ErrRefusedChange, spec.Nodes, MaxNodes)
		}
		if spec.ClusterName == "" && insp.Info.Bitmap != BitmapClustered {
			return fmt.Errorf("convert bitmap: %w: a clustered bitmap needs the cluster name", ErrRefusedChange)
		}
	default:
		return fmt.Errorf("convert bitmap: %w: unknown mode %q", ErrRefusedChange, spec.Mode)
	}
	if err := rewriteBitmap(insp, insp.Info.UUID, spec, now, log); err != nil {
		return fmt.Errorf("convert bitmap: %w", err)
	}
	return nil
}

// rewriteBitmap rewrites the bitmap and superblocks of the array insp
// describes to spec's mode (see applyBitmap and ConvertBitmap).
func rewriteBitmap(insp *Inspection, uuid [16]byte, spec BitmapSpec, now time.Time, log *slog.Logger) error {
	fresh := insp.Members[insp.Freshest].Super
	var devs []Device
	for _, r := range insp.Members {
		if r.Super != nil && r.Status.Used() {
			devs = append(devs, Device{Member: r.Member, Super: r.Super})
		}
	}
	// The dirty chunks of every slot, on every member, in whatever layout
	// the bitmap area now has (slot 0's superblock says which).
	var old *bitmap.Superblock
	dirty := map[uint64]bool{}
	for _, d := range devs {
		if !d.Super.HasBitmap() {
			continue
		}
		buf := make([]byte, bitmap.SuperblockSize)
		if _, err := d.Member.ReadAt(buf, d.Super.BitmapStart()); err != nil {
			continue
		}
		bsb, err := bitmap.ParseSuperblock(buf)
		if err != nil || bsb.UUID != uuid {
			continue
		}
		if old == nil {
			old = bsb
		}
		l, err := bitmap.NewLayout(bsb, d.Super.BitmapStart(), bitmap.AlignFor(d.Super.BitmapOffset))
		if err != nil {
			continue
		}
		for s := 0; s < l.Slots; s++ {
			sl, err := bitmap.ReadSlot(d.Member, l, s)
			if err != nil {
				continue
			}
			for _, c := range sl.DirtyChunks() {
				dirty[c] = true
			}
		}
	}
	next := clone(fresh)
	next.FeatureMap &^= superblock.FeatureClustered
	if spec.Mode == BitmapNone {
		if len(dirty) > 0 {
			// No bitmap will remember them: resync the whole array once.
			next.ResyncOffset = 0
			log.Info("removing a bitmap that marks dirty chunks: the array resyncs fully when it starts", "dirty", len(dirty))
		}
		next.FeatureMap &^= superblock.FeatureBitmapOffset
		next.BitmapOffset = 0
		next = BumpEvents(next, now)
		if _, err := WriteAll(next, devs); err != nil {
			return err
		}
		log.Info("bitmap removed")
		return nil
	}
	// A new or changed bitmap.
	var bsb bitmap.Superblock
	if old != nil {
		bsb = *old
	} else {
		sync := fresh.Size
		c, err := bitmapChunk(fresh.Size, sync, spec.Chunk)
		if err != nil {
			return err
		}
		bsb = bitmap.Superblock{Magic: bitmap.Magic, UUID: uuid, SyncSize: sync, ChunkSize: c, DaemonSleep: bitmap.DefaultDaemonSleep}
	}
	bsb.State, bsb.EventsCleared = 0, 0
	next.FeatureMap |= superblock.FeatureBitmapOffset
	next.BitmapOffset = bitmapOffset
	if spec.Mode == BitmapClustered {
		bsb.Version, bsb.Nodes = bitmap.VersionClustered, uint32(spec.Nodes)
		if spec.ClusterName != "" {
			if err := bsb.SetName(spec.ClusterName); err != nil {
				return err
			}
		}
		next.FeatureMap |= superblock.FeatureClustered
	} else {
		bsb.Version, bsb.Nodes = bitmap.VersionLE, 0
		bsb.ClusterName = [bitmap.ClusterNameLen]byte{}
	}
	next = BumpEvents(next, now)
	bsb.Events = next.Events
	start := int64(next.SuperOffset+bitmapOffset) * superblock.SectorSize
	l, err := bitmap.NewLayout(&bsb, start, bitmap.SlotAlign)
	if err != nil {
		return err
	}
	if err := l.CheckFits(start, int64(next.DataOffset)*superblock.SectorSize); err != nil {
		return fmt.Errorf("%w: %v", ErrRefusedChange, err)
	}
	slot0, err := bitmap.NewSlot(bsb)
	if err != nil {
		return err
	}
	for c := range dirty {
		slot0.Set(c)
	}
	for _, d := range devs {
		if err := bitmap.Format(d.Member, bsb, l, false); err != nil {
			return fmt.Errorf("%s: %w", d.Member.Name(), err)
		}
		if err := bitmap.WriteSlot(d.Member, l, 0, slot0); err != nil {
			return fmt.Errorf("%s: %w", d.Member.Name(), err)
		}
		if err := d.Member.Sync(); err != nil {
			return err
		}
	}
	if _, err := WriteAll(next, devs); err != nil {
		return err
	}
	log.Info("bitmap rewritten", "mode", spec.Mode, "nodes", bsb.Nodes, "chunk", bsb.ChunkSize, "dirty_kept", len(dirty))
	return nil
}

// inspectLocked scans and inspects the array's members, claiming the
// ones the array uses (a bitmap rewrite writes to them). mu held.
func (m *Manager) inspectLocked() (*Inspection, error) {
	insp, _, err := m.inspectArrayLocked(func(insp *Inspection, _ map[Member]string) []Member {
		var out []Member
		for _, r := range insp.Members {
			if r.Super != nil && r.Status.Used() {
				out = append(out, r.Member)
			}
		}
		return out
	})
	return insp, err
}

// redoBitmapChange finishes a bitmap change this node's journal holds
// (it crashed while rewriting): if the superblock already has the target
// mode the change is done; otherwise it is carried out again, which is
// safe because it starts only when no other node can run the array (for
// a clustered array: every slot lock free, taken with NOQUEUE PW and held
// while rewriting). If another node runs the array meanwhile, the change
// never reached the disk in a way that node accepted: it is dropped.
func (m *Manager) redoBitmapChange(ctx context.Context) error {
	var pend []store.Entry
	if err := m.cfg.Store.View(func(tx store.Txn) (err error) {
		pend, err = m.jr.Pending(tx)
		return err
	}); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	for _, p := range pend {
		e, err := decodeEntry(p.Data)
		if err != nil {
			return fmt.Errorf("journal entry %d: %w", p.Seq, err)
		}
		if e.Kind != ChangeBitmap || e.Array != m.uuid {
			continue
		}
		m.mu.Lock()
		insp, err := m.inspectLocked()
		m.mu.Unlock()
		if err != nil {
			return err
		}
		var sh *superblock.Superblock
		if insp.Freshest >= 0 {
			sh = insp.Members[insp.Freshest].Super
		}
		d := DecideRecovery(e, DiskFacts{Shared: sh})
		outcome := d.Outcome
		if outcome != OutcomeCompleted || (insp.Info != nil && e.Bitmap == BitmapClustered && insp.Info.Nodes != e.Nodes) {
			held, busy, err := m.lockAllSlots(ctx, sh)
			if err != nil {
				return err
			}
			if busy {
				outcome = OutcomeRolledBack
				m.log.Warn("journal: a bitmap change found after a crash, but another node runs the array: dropped", "to", e.Bitmap)
			} else {
				err = m.applyBitmap(e, 0)
				outcome = OutcomeCompleted
			}
			for _, h := range held {
				_ = h.Unlock(context.WithoutCancel(ctx), 0)
			}
			if err != nil {
				return fmt.Errorf("finishing an interrupted bitmap change: %w", err)
			}
		}
		m.log.Info("journal: bitmap change found after a crash", "to", e.Bitmap, "nodes", e.Nodes, "outcome", outcome)
		if err := m.cfg.Store.Update(func(tx store.Txn) error { return m.jr.Done(tx, p.Seq) }); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
	}
	return nil
}

// lockAllSlots takes every slot lock of a clustered array with NOQUEUE PW
// (md's lock_all_bitmaps); busy reports that some slot is held (the locks
// taken are then released).
func (m *Manager) lockAllSlots(ctx context.Context, sh *superblock.Superblock) (held []dlm.LockHandle, busy bool, err error) {
	if sh == nil || sh.FeatureMap&superblock.FeatureClustered == 0 || m.cfg.Cluster == nil {
		return nil, false, nil
	}
	if err := m.Attach(ctx); err != nil {
		return nil, false, err
	}
	m.mu.Lock()
	ls := m.attached
	m.mu.Unlock()
	for s := 0; s < MaxNodes; s++ {
		h, err := ls.Request(ctx, dlm.LockSpec{Resource: ownership.LockName(s), Mode: dlm.PW, Flags: dlm.NoQueue})
		if errors.Is(err, dlm.ErrAgain) {
			for _, x := range held {
				_ = x.Unlock(context.WithoutCancel(ctx), 0)
			}
			return nil, true, nil
		}
		if err != nil {
			return held, false, err
		}
		held = append(held, h)
	}
	return held, false, nil
}
