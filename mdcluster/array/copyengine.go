package array

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// CopyEngine is a small raid1 data path over Members that implements
// Engine: writes go to every in-sync and recovering member (after the
// write-intent bit is durable), reads come from an in-sync member (balanced
// round-robin unless read balancing is suspended or the read falls into a
// remote resync window), writes into a remote resync window or into this
// node's own running sync wait, and Sync really copies sectors between the
// members and syncs them.
//
// It exists so that the control plane (the Manager) is tested on its own,
// with file-backed members whose contents the tests compare, while the real
// RAID engine (mdcluster/raid) is built; it is also usable by tools that
// need a raid1's data moved and nothing more. It has no caching, no request
// merging and no raid10.
type CopyEngine struct {
	// WriteWait bounds how long a write waits for a resync window to move
	// on (0: one minute). md waits without a bound; a bounded wait turns
	// a stuck window into an error the caller sees.
	WriteWait time.Duration
	// TickInterval is how often the bitmap's lazy clearing runs (0: one
	// second).
	TickInterval time.Duration

	mu      sync.Mutex
	cond    *sync.Cond
	started bool
	stopped bool
	setup   EngineSetup
	members map[uint32]*EngineMember
	remote  Window
	local   Window // the range this node's Sync is copying
	noBal   bool
	rr      int
	flights map[uint64]Window // writes in flight, by id
	nextID  uint64
	prog    SyncProgress
	epoch   time.Time
	tickEnd chan struct{}
	tickWG  sync.WaitGroup

	// Test hooks (same package only; set with setHooks).
	hookMu        sync.Mutex
	failSetMember func(EngineMember) error
	beforeCopy    func(ctx context.Context, kind SyncKind, lo uint64) error
}

// setBeforeCopy installs a test hook called before each copy step.
func (e *CopyEngine) setBeforeCopy(f func(ctx context.Context, kind SyncKind, lo uint64) error) {
	e.hookMu.Lock()
	e.beforeCopy = f
	e.hookMu.Unlock()
}

// setFailSetMember installs a test hook that can fail SetMember.
func (e *CopyEngine) setFailSetMember(f func(EngineMember) error) {
	e.hookMu.Lock()
	e.failSetMember = f
	e.hookMu.Unlock()
}

func (e *CopyEngine) hooks() (func(EngineMember) error, func(context.Context, SyncKind, uint64) error) {
	e.hookMu.Lock()
	defer e.hookMu.Unlock()
	return e.failSetMember, e.beforeCopy
}

var _ Engine = (*CopyEngine)(nil)

// NewCopyEngine returns an engine that is not started.
func NewCopyEngine() *CopyEngine {
	e := &CopyEngine{members: map[uint32]*EngineMember{}, flights: map[uint64]Window{}}
	e.cond = sync.NewCond(&e.mu)
	return e
}

func (e *CopyEngine) now() time.Time {
	if e.setup.Now != nil {
		return e.setup.Now()
	}
	return time.Now()
}

// Start binds setup's members and starts the bitmap's clearing ticker.
func (e *CopyEngine) Start(ctx context.Context, setup EngineSetup) error {
	if setup.Level != superblock.LevelRAID1 {
		return fmt.Errorf("copy engine: level %d: only raid1 is supported", setup.Level)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.started && !e.stopped {
		return errors.New("copy engine: already started")
	}
	// (A stopped engine starts afresh: the array was stopped and is
	// assembled again.)
	e.started, e.stopped, e.setup = true, false, setup
	e.setup.Members = nil
	e.members, e.flights = map[uint32]*EngineMember{}, map[uint64]Window{}
	e.remote, e.local, e.noBal, e.prog = Window{}, Window{}, false, SyncProgress{}
	for _, m := range setup.Members {
		mm := m
		e.members[m.Dev] = &mm
	}
	e.epoch = e.now()
	e.tickEnd = make(chan struct{})
	if setup.Intent != nil {
		iv := e.TickInterval
		if iv <= 0 {
			iv = time.Second
		}
		e.tickWG.Add(1)
		go e.ticker(iv, setup.Intent)
	}
	return nil
}

// ticker clears idle bits while the array is not degraded.
func (e *CopyEngine) ticker(iv time.Duration, in WriteIntent) {
	defer e.tickWG.Done()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-e.tickEnd:
			return
		case <-t.C:
		}
		e.mu.Lock()
		deg := e.degradedLocked()
		now := e.now().Sub(e.epoch)
		e.mu.Unlock()
		if !deg {
			_, _ = in.Tick(now)
		}
	}
}

// degradedLocked: some slot lacks an in-sync member. md keeps bitmap bits
// set while degraded so that a member that comes back catches up from them.
func (e *CopyEngine) degradedLocked() bool {
	inSync := map[int]bool{}
	for _, m := range e.members {
		if m.State == MemberInSync {
			inSync[m.Slot] = true
		}
	}
	return len(inSync) < e.setup.RaidDisks
}

// Stop ends the data path: later writes fail, waiters wake up.
func (e *CopyEngine) Stop() error {
	e.mu.Lock()
	if e.stopped || !e.started {
		e.stopped = true
		e.mu.Unlock()
		return nil
	}
	e.stopped = true
	close(e.tickEnd)
	e.cond.Broadcast()
	e.mu.Unlock()
	e.tickWG.Wait()
	return nil
}

// SetMember adds or updates a member.
func (e *CopyEngine) SetMember(m EngineMember) error {
	if f, _ := e.hooks(); f != nil {
		if err := f(m); err != nil {
			return err
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return ErrEngineStopped
	}
	mm := m
	e.members[m.Dev] = &mm
	e.cond.Broadcast()
	return nil
}

// FailMember marks dev faulty; writes in flight to it may still complete,
// later ones skip it.
func (e *CopyEngine) FailMember(dev uint32) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.members[dev]
	if m == nil {
		return fmt.Errorf("copy engine: fail: no member %d", dev)
	}
	m.State, m.Slot = MemberFaulty, -1
	return nil
}

// RemoveMember forgets dev.
func (e *CopyEngine) RemoveMember(dev uint32) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.members[dev] == nil {
		return fmt.Errorf("copy engine: remove: no member %d", dev)
	}
	delete(e.members, dev)
	return nil
}

// Members returns the bound members, by device number.
func (e *CopyEngine) Members() []EngineMember {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]EngineMember, 0, len(e.members))
	for _, m := range e.members {
		out = append(out, *m)
	}
	slices.SortFunc(out, func(a, b EngineMember) int { return int(a.Dev) - int(b.Dev) })
	return out
}

// RemoteWindow returns the window another node resyncs, as last set.
func (e *CopyEngine) RemoteWindow() Window {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.remote
}

// ReadBalancingSuspended reports SuspendReadBalancing's state.
func (e *CopyEngine) ReadBalancingSuspended() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.noBal
}

// SetRemoteWindow installs w and waits for writes in flight into it.
func (e *CopyEngine) SetRemoteWindow(ctx context.Context, w Window) error {
	e.mu.Lock()
	e.remote = w
	e.cond.Broadcast()
	e.mu.Unlock()
	if !w.Active() {
		return nil
	}
	return e.waitLocked(ctx, func() bool {
		for _, f := range e.flights {
			if w.Overlaps(f.Lo, f.Hi) {
				return false
			}
		}
		return true
	})
}

// waitLocked waits (taking mu) until ok holds, the engine stops, or ctx
// ends.
func (e *CopyEngine) waitLocked(ctx context.Context, ok func() bool) error {
	stop := context.AfterFunc(ctx, func() {
		e.mu.Lock()
		e.cond.Broadcast()
		e.mu.Unlock()
	})
	defer stop()
	e.mu.Lock()
	defer e.mu.Unlock()
	for !ok() {
		if e.stopped || !e.started {
			return ErrEngineStopped
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		e.cond.Wait()
	}
	return nil
}

// SuspendReadBalancing switches read balancing off or back on.
func (e *CopyEngine) SuspendReadBalancing(on bool) {
	e.mu.Lock()
	e.noBal = on
	e.mu.Unlock()
}

// Progress reports the running Sync.
func (e *CopyEngine) Progress() SyncProgress {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.prog
}

func (e *CopyEngine) writeWait() time.Duration {
	if e.WriteWait > 0 {
		return e.WriteWait
	}
	return time.Minute
}

// Write writes p at byte off of the array to every in-sync and recovering
// member. It waits while [off, off+len(p)) meets a resync window (another
// node's, or this node's own running Sync), at most WriteWait.
func (e *CopyEngine) Write(ctx context.Context, off int64, p []byte) error {
	if off < 0 || off%superblock.SectorSize != 0 || len(p)%superblock.SectorSize != 0 {
		return fmt.Errorf("copy engine: write at %d of %d bytes: not whole sectors", off, len(p))
	}
	lo := uint64(off) / superblock.SectorSize
	hi := lo + uint64(len(p))/superblock.SectorSize
	wctx, cancel := context.WithTimeout(ctx, e.writeWait())
	defer cancel()
	var id uint64
	err := e.waitLocked(wctx, func() bool {
		if e.stopped || !e.started {
			return false // waitLocked reports ErrEngineStopped
		}
		if e.remote.Overlaps(lo, hi) || e.local.Overlaps(lo, hi) {
			return false
		}
		e.nextID++
		id = e.nextID
		e.flights[id] = Window{Lo: lo, Hi: hi}
		return true
	})
	if err != nil {
		return fmt.Errorf("copy engine: write of sectors [%d,%d): waiting for a resync window to move on: %w", lo, hi, err)
	}
	defer func() {
		e.mu.Lock()
		delete(e.flights, id)
		e.cond.Broadcast()
		e.mu.Unlock()
	}()
	e.mu.Lock()
	if hi > e.setup.DevSectors {
		e.mu.Unlock()
		return fmt.Errorf("copy engine: write of sectors [%d,%d) beyond the array's %d sectors", lo, hi, e.setup.DevSectors)
	}
	var targets []EngineMember
	for _, m := range e.members {
		if m.State == MemberInSync || m.State == MemberRecovering {
			targets = append(targets, *m)
		}
	}
	in := e.setup.Intent
	e.mu.Unlock()
	if len(targets) == 0 {
		return errors.New("copy engine: write: no member to write")
	}
	if in != nil {
		if err := in.StartWrite(off, int64(len(p))); err != nil {
			return fmt.Errorf("copy engine: write intent: %w", err)
		}
		defer func() { in.EndWrite(off, int64(len(p)), e.now().Sub(e.epoch)) }()
	}
	ok := 0
	for _, m := range targets {
		if _, err := m.Member.WriteAt(p, int64(m.DataOffset)*superblock.SectorSize+off); err != nil {
			e.memberError(m.Dev, err)
			continue
		}
		ok++
	}
	if ok == 0 {
		return errors.New("copy engine: write failed on every member")
	}
	return nil
}

func (e *CopyEngine) memberError(dev uint32, err error) {
	if f := e.setup.OnMemberError; f != nil {
		f(dev, err)
	}
}

// Read reads len(p) bytes at byte off of the array from one in-sync member.
func (e *CopyEngine) Read(ctx context.Context, off int64, p []byte) error {
	if off < 0 {
		return fmt.Errorf("copy engine: read at negative offset %d", off)
	}
	lo := uint64(off) / superblock.SectorSize
	hi := (uint64(off) + uint64(len(p)) + superblock.SectorSize - 1) / superblock.SectorSize
	e.mu.Lock()
	if e.stopped || !e.started {
		e.mu.Unlock()
		return ErrEngineStopped
	}
	var in []EngineMember
	for _, m := range e.members {
		if m.State == MemberInSync {
			in = append(in, *m)
		}
	}
	slices.SortFunc(in, func(a, b EngineMember) int { return a.Slot - b.Slot })
	if len(in) == 0 {
		e.mu.Unlock()
		return errors.New("copy engine: read: no in-sync member")
	}
	pick := 0
	if !e.noBal && !e.remote.Overlaps(lo, hi) {
		e.rr++
		pick = e.rr % len(in)
	}
	e.mu.Unlock()
	m := in[pick]
	if _, err := m.Member.ReadAt(p, int64(m.DataOffset)*superblock.SectorSize+off); err != nil && !errors.Is(err, io.EOF) {
		e.memberError(m.Dev, err)
		return fmt.Errorf("copy engine: read from member %d: %w", m.Dev, err)
	}
	return nil
}

// copyStep is how much Sync copies per read/write pair.
const copyStep = 64 << 10

// Sync copies [r.Lo, r.Hi) from an in-sync member onto r.Targets.
func (e *CopyEngine) Sync(ctx context.Context, r SyncRequest) error {
	if r.Hi <= r.Lo {
		return nil
	}
	e.mu.Lock()
	if e.stopped || !e.started {
		e.mu.Unlock()
		return ErrEngineStopped
	}
	if r.Hi > e.setup.DevSectors {
		r.Hi = e.setup.DevSectors
	}
	var src *EngineMember
	srcs := make([]EngineMember, 0, len(e.members))
	for _, m := range e.members {
		if m.State == MemberInSync && !slices.Contains(r.Targets, m.Dev) {
			srcs = append(srcs, *m)
		}
	}
	slices.SortFunc(srcs, func(a, b EngineMember) int { return a.Slot - b.Slot })
	if len(srcs) > 0 {
		src = &srcs[0]
	}
	var dsts []EngineMember
	for _, d := range r.Targets {
		if m := e.members[d]; m != nil && m.State != MemberFaulty {
			dsts = append(dsts, *m)
		}
	}
	e.mu.Unlock()
	if src == nil {
		return errors.New("copy engine: sync: no in-sync member to copy from")
	}
	if len(dsts) == 0 {
		return nil
	}
	// Raise the barrier: this node's writes into the range wait, and those
	// in flight drain first.
	w := Window{Lo: r.Lo, Hi: r.Hi}
	if err := e.waitLocked(ctx, func() bool {
		if e.local.Active() {
			return false
		}
		for _, f := range e.flights {
			if w.Overlaps(f.Lo, f.Hi) {
				return false
			}
		}
		e.local = w
		e.prog = SyncProgress{Running: true, Kind: r.Kind, Total: r.Hi - r.Lo}
		return true
	}); err != nil {
		return fmt.Errorf("copy engine: sync [%d,%d): %w", r.Lo, r.Hi, err)
	}
	defer func() {
		e.mu.Lock()
		e.local = Window{}
		e.prog = SyncProgress{}
		e.cond.Broadcast()
		e.mu.Unlock()
	}()
	ranges := [][2]uint64{{r.Lo, r.Hi}}
	if len(r.Chunks) > 0 && r.ChunkBytes > 0 {
		per := uint64(r.ChunkBytes) / superblock.SectorSize
		ranges = nil
		for _, c := range r.Chunks {
			lo, hi := max(c*per, r.Lo), min((c+1)*per, r.Hi)
			if lo < hi {
				ranges = append(ranges, [2]uint64{lo, hi})
			}
		}
	}
	buf := make([]byte, copyStep)
	for _, rg := range ranges {
		for s := rg[0]; s < rg[1]; {
			if _, f := e.hooks(); f != nil {
				if err := f(ctx, r.Kind, s); err != nil {
					return err
				}
			}
			e.mu.Lock()
			stopped := e.stopped
			e.mu.Unlock()
			if stopped {
				return ErrEngineStopped
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(uint64(copyStep/superblock.SectorSize), rg[1]-s)
			b := buf[:n*superblock.SectorSize]
			if _, err := src.Member.ReadAt(b, int64(src.DataOffset+s)*superblock.SectorSize); err != nil && !errors.Is(err, io.EOF) {
				e.memberError(src.Dev, err)
				return fmt.Errorf("copy engine: sync: read member %d at sector %d: %w", src.Dev, s, err)
			}
			for _, d := range dsts {
				if _, err := d.Member.WriteAt(b, int64(d.DataOffset+s)*superblock.SectorSize); err != nil {
					e.memberError(d.Dev, err)
					return fmt.Errorf("copy engine: sync: write member %d at sector %d: %w", d.Dev, s, err)
				}
			}
			s += n
			e.mu.Lock()
			e.prog.Done += n
			e.mu.Unlock()
		}
	}
	for _, d := range dsts {
		if err := d.Member.Sync(); err != nil {
			e.memberError(d.Dev, err)
			return fmt.Errorf("copy engine: sync: flush member %d: %w", d.Dev, err)
		}
	}
	return nil
}
