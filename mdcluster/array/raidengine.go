package array

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// RAIDEngine is the array's data path over the RAID engine
// (mdcluster/raid): it implements Engine for the Manager, and nbd.Backend
// so that the array's NBD export serves it. raid1 and raid10 (near, far,
// offset) are supported.
//
// The manager speaks in md's device numbers and member states; the RAID
// engine in raid slots ("roles"). RAIDEngine keeps the mapping: an in-sync
// or recovering member holds its slot's role in the RAID engine, a spare
// holds none until it is activated (then it is added to the role as
// recovering and rebuilt by the manager's Sync calls), a faulty member is
// failed in its role until it is removed. Sync copies through
// raid.Engine.CopyRange, so the RAID engine's resync barrier, throttle
// (md's speed_limit_min/max) and progress apply.
//
// An I/O error the RAID engine finds on a member fails it there at once
// (no more I/O to it) and is reported through EngineSetup.OnMemberError,
// which the manager turns into a cluster-wide fail. As md holds a write
// that failed a member until the superblocks record the failure, the
// writes that saw the error are held until the manager applies the fail to
// this engine (FailMember), or FailRecordWait has passed, or the engine
// stops.
//
// Start creates a new RAID engine each time (an array stopped and
// assembled again starts afresh); requests between Stop and the next Start
// fail with an error wrapping ErrEngineStopped and nbd.ErrShutdown, except
// while the manager holds I/O (HoldIO: it is re-joining the array after
// this node lost its locks): then they wait until it releases them
// (ReleaseIO, once the engine runs again with the slot re-taken), for at
// most RAIDEngineConfig.HoldWait.
type RAIDEngine struct {
	cfg RAIDEngineConfig
	log *slog.Logger

	mu       sync.Mutex
	eng      *raid.Engine // nil when not started
	setup    EngineSetup
	members  map[uint32]*raidMember
	noBal    bool
	remote   Window
	failing  map[uint32]bool          // fails the manager asked for (not reported back)
	recorded map[uint32]chan struct{} // closed when the manager applied a member's fail
	stopped  chan struct{}            // closed by Stop
	kind     SyncKind
	size     int64
	tickEnd  chan struct{}
	tickWG   sync.WaitGroup
	hold     chan struct{} // non-nil while HoldIO; closed by Start or ReleaseIO

	holdWaits, holdTimeouts atomic.Uint64

	// Test hooks (same package only).
	hookMu        sync.Mutex
	failSetMember func(EngineMember) error
	beforeCopy    func(ctx context.Context, kind SyncKind, lo uint64) error
}

// raidMember is one bound member and the role it holds.
type raidMember struct {
	EngineMember
	role  int         // the RAID engine's role, or -1
	dev   raid.Device // the data path's device while it holds a role
	owned bool        // dev was opened here (closed on removal)
}

// RAIDEngineConfig configures a RAIDEngine. Zero values mean the defaults.
type RAIDEngineConfig struct {
	// OpenDevice opens a member's device for the data path. Nil: a
	// FileMember's path is opened again with O_DIRECT (raid.OpenDirect),
	// as md does member I/O, so that another node reading the shared disk
	// sees every completed write; if the file system refuses O_DIRECT
	// (tmpfs) a regular file is used through its Member with buffered
	// I/O, with a warning (all nodes then have to share one page cache:
	// one machine, as in tests and the demo); a block device is an error.
	// Other Members are used as they are.
	OpenDevice func(m EngineMember) (raid.Device, error)
	// Gate may stop all of this node's array I/O (the storage lease,
	// mdcluster/lease.Guard): see raid.Config.Gate.
	Gate raid.IOGate
	// SpeedLimitMin and SpeedLimitMax are md's speed_limit_min/max in
	// KiB/s (defaults raid.DefaultSpeedLimitMin/Max, md's 1000/200000).
	SpeedLimitMin, SpeedLimitMax int64
	// ResyncIOSize is the unit of sync I/O and of the resync barrier
	// (default raid.DefaultResyncIOSize).
	ResyncIOSize int
	// MaxInFlight bounds the requests running at once (default
	// raid.DefaultMaxInFlight).
	MaxInFlight int
	// TickInterval is how often the bitmap's lazy clearing runs (default
	// one second, md's bitmap daemon).
	TickInterval time.Duration
	// FailRecordWait bounds how long writes that failed a member wait for
	// the manager to apply the cluster-wide fail (default 30 s).
	FailRecordWait time.Duration
	// HoldWait bounds how long a request waits while the manager holds
	// I/O to re-join the array (HoldIO) before it fails with
	// ErrEngineStopped (default 30 s). The requests waiting are the NBD
	// server's in-flight ones, which it bounds.
	HoldWait time.Duration
	// Logger receives the engine's log; nil means slog.Default().
	Logger *slog.Logger
	// OnStart, if set, is called at the end of every successful Start,
	// before the manager does any I/O through the engine: the daemon
	// renews the storage lease there (its stamp reads need the devices
	// Start opened).
	OnStart func()
}

var (
	_ Engine      = (*RAIDEngine)(nil)
	_ nbd.Backend = (*RAIDEngine)(nil)
	_ ioHolder    = (*RAIDEngine)(nil)
)

// NewRAIDEngine returns an engine that is not started.
func NewRAIDEngine(cfg RAIDEngineConfig) *RAIDEngine {
	if cfg.TickInterval <= 0 {
		cfg.TickInterval = time.Second
	}
	if cfg.FailRecordWait <= 0 {
		cfg.FailRecordWait = 30 * time.Second
	}
	if cfg.HoldWait <= 0 {
		cfg.HoldWait = 30 * time.Second
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	return &RAIDEngine{cfg: cfg, log: lg, members: map[uint32]*raidMember{}, failing: map[uint32]bool{},
		recorded: map[uint32]chan struct{}{}}
}

func (e *RAIDEngine) setBeforeCopy(f func(ctx context.Context, kind SyncKind, lo uint64) error) {
	e.hookMu.Lock()
	e.beforeCopy = f
	e.hookMu.Unlock()
}

func (e *RAIDEngine) setFailSetMember(f func(EngineMember) error) {
	e.hookMu.Lock()
	e.failSetMember = f
	e.hookMu.Unlock()
}

func (e *RAIDEngine) hooks() (func(EngineMember) error, func(context.Context, SyncKind, uint64) error) {
	e.hookMu.Lock()
	defer e.hookMu.Unlock()
	return e.failSetMember, e.beforeCopy
}

// geometry builds the RAID engine's geometry from the setup.
func geometry(s EngineSetup) (raid.Geometry, error) {
	switch s.Level {
	case superblock.LevelRAID1:
		return raid.NewRAID1(s.RaidDisks, s.DevSectors)
	case superblock.LevelRAID10:
		return raid.NewRAID10(s.RaidDisks, s.Layout, s.ChunkSectors, s.DevSectors)
	}
	return raid.Geometry{}, fmt.Errorf("raid engine: level %d: only raid1 and raid10 are supported", s.Level)
}

// open opens m's device for the data path.
func (e *RAIDEngine) open(m EngineMember) (raid.Device, bool, error) {
	if e.cfg.OpenDevice != nil {
		d, err := e.cfg.OpenDevice(m)
		return d, true, err
	}
	fm, ok := m.Member.(*FileMember)
	if !ok {
		d, err := memberDevice(m.Member)
		return d, false, err
	}
	d, err := raid.OpenDirect(fm.path)
	if err == nil {
		return d, true, nil
	}
	if fm.block {
		return nil, false, fmt.Errorf("raid engine: member %s: %w", fm.path, err)
	}
	e.log.Warn("member file without direct I/O: using buffered I/O (only safe while every node runs on this machine)",
		"member", fm.path, "err", err)
	md, merr := memberDevice(m.Member)
	return md, false, merr
}

// bufferedDevice is a raid.Device over a Member (buffered I/O): for
// members that are not files, and files where O_DIRECT is refused.
type bufferedDevice struct {
	m    Member
	size int64
}

func memberDevice(m Member) (raid.Device, error) {
	sz, err := m.Size()
	if err != nil {
		return nil, fmt.Errorf("raid engine: member %s: %w", m.Name(), err)
	}
	return &bufferedDevice{m: m, size: sz - sz%superblock.SectorSize}, nil
}

func (d *bufferedDevice) ReadAt(p []byte, off int64) (int, error) { return d.m.ReadAt(p, off) }
func (d *bufferedDevice) WriteAt(p []byte, off int64) (int, error) {
	return d.m.WriteAt(p, off)
}
func (d *bufferedDevice) WriteAtFUA(p []byte, off int64) (int, error) {
	n, err := d.m.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, d.m.Sync()
}
func (d *bufferedDevice) Sync() error    { return d.m.Sync() }
func (d *bufferedDevice) Size() int64    { return d.size }
func (d *bufferedDevice) BlockSize() int { return superblock.SectorSize }
func (d *bufferedDevice) Close() error   { return nil } // the Member belongs to the manager

// holdsRole: the member's state gives it its slot's role in the RAID
// engine.
func holdsRole(m EngineMember, disks int) bool {
	return (m.State == MemberInSync || m.State == MemberRecovering) && m.Slot >= 0 && m.Slot < disks
}

// Start builds a RAID engine over setup's members and starts the bitmap's
// clearing ticker.
func (e *RAIDEngine) Start(ctx context.Context, setup EngineSetup) error {
	g, err := geometry(setup)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.eng != nil {
		return errors.New("raid engine: already started")
	}
	members := map[uint32]*raidMember{}
	roles := make([]raid.Member, setup.RaidDisks)
	closeAll := func() {
		for _, rm := range members {
			if rm.owned && rm.dev != nil {
				rm.dev.Close()
			}
		}
	}
	for _, m := range setup.Members {
		rm := &raidMember{EngineMember: m, role: -1}
		members[m.Dev] = rm
		if !holdsRole(m, setup.RaidDisks) {
			continue
		}
		if roles[m.Slot].Device != nil {
			closeAll()
			return fmt.Errorf("raid engine: devices %d and another both hold slot %d", m.Dev, m.Slot)
		}
		d, owned, err := e.open(m)
		if err != nil {
			closeAll()
			return err
		}
		rm.role, rm.dev, rm.owned = m.Slot, d, owned
		st := raid.InSync
		if m.State == MemberRecovering {
			st = raid.Recovering
		}
		roles[m.Slot] = raid.Member{Device: d, DataOffset: int64(m.DataOffset) * superblock.SectorSize, State: st}
	}
	rc := raid.Config{Geometry: g, Members: roles, OnMemberFailed: e.onFailed, Gate: e.cfg.Gate,
		SpeedLimitMin: e.cfg.SpeedLimitMin, SpeedLimitMax: e.cfg.SpeedLimitMax, ResyncIOSize: e.cfg.ResyncIOSize,
		MaxInFlight: e.cfg.MaxInFlight, Logger: e.log}
	if setup.Intent != nil {
		if setup.BitmapChunkBytes == 0 {
			closeAll()
			return errors.New("raid engine: a write-intent bitmap without its chunk size")
		}
		rc.Intent, rc.RequireIntent, rc.BitmapChunkSize = setup.Intent, true, int64(setup.BitmapChunkBytes)
	}
	eng, err := raid.New(rc)
	if err != nil {
		closeAll()
		return fmt.Errorf("raid engine: %w", err)
	}
	e.eng, e.setup, e.members, e.size = eng, setup, members, eng.Size()
	e.setup.Members = nil
	e.failing, e.recorded, e.stopped = map[uint32]bool{}, map[uint32]chan struct{}{}, make(chan struct{})
	e.remote, e.noBal = Window{}, false
	for _, rm := range members {
		if rm.role >= 0 && rm.State == MemberRecovering {
			e.setRecoveredLocked(rm)
		}
	}
	e.tickEnd = make(chan struct{})
	if setup.Intent != nil {
		e.tickWG.Add(1)
		go e.ticker(eng, setup.Intent)
	}
	if f := e.cfg.OnStart; f != nil {
		e.mu.Unlock()
		f()
		e.mu.Lock()
	}
	return nil
}

// Devices returns the devices of the members the data path uses (in sync
// or recovering; not failed ones), as opened for it (O_DIRECT by
// default), in slot order. The storage lease reads and writes the
// generation stamp through them: raw, never gated by the lease itself.
func (e *RAIDEngine) Devices() []raid.Device {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.eng == nil {
		return nil
	}
	infos := e.eng.Members()
	var out []raid.Device
	for slot := range infos {
		for _, rm := range e.members {
			if rm.role == slot && rm.dev != nil && (infos[slot].State == raid.InSync || infos[slot].State == raid.Recovering) {
				out = append(out, rm.dev)
			}
		}
	}
	return out
}

// setRecoveredLocked tells the RAID engine how far a recovering member is
// rebuilt. Only for raid1, where the superblock's recovery offset (device
// sectors) is also an array offset; a raid10 member is not read until it
// is in sync.
func (e *RAIDEngine) setRecoveredLocked(rm *raidMember) {
	if e.setup.Level != superblock.LevelRAID1 || rm.RecoveryOffset == 0 {
		return
	}
	if err := e.eng.SetRecovered(rm.role, int64(rm.RecoveryOffset)*superblock.SectorSize); err != nil {
		e.log.Warn("raid engine: recovery offset not applied", "dev", rm.Dev, "err", err)
	}
}

// ticker runs the bitmap's lazy clearing on the RAID engine's clock (the
// one EndWrite is stamped with) while the array is not degraded; the RAID
// engine also keeps the bits of writes that missed a copy.
func (e *RAIDEngine) ticker(eng *raid.Engine, in WriteIntent) {
	defer e.tickWG.Done()
	t := time.NewTicker(e.cfg.TickInterval)
	defer t.Stop()
	for {
		select {
		case <-e.tickEnd:
			return
		case <-t.C:
		}
		if !eng.Degraded() {
			_, _ = in.Tick(eng.Clock().Now())
		}
	}
}

// onFailed is the RAID engine's OnMemberFailed.
func (e *RAIDEngine) onFailed(role int, cause error) {
	e.mu.Lock()
	var rm *raidMember
	for _, m := range e.members {
		if m.role == role {
			rm = m
		}
	}
	if rm == nil || e.failing[rm.Dev] || e.eng == nil {
		e.mu.Unlock()
		return
	}
	dev := rm.Dev
	ch := e.recorded[dev]
	if ch == nil {
		ch = make(chan struct{})
		e.recorded[dev] = ch
	}
	report, stopped := e.setup.OnMemberError, e.stopped
	e.mu.Unlock()
	if report == nil {
		return
	}
	report(dev, cause)
	t := time.NewTimer(e.cfg.FailRecordWait)
	defer t.Stop()
	select {
	case <-ch:
	case <-stopped:
	case <-t.C:
		e.log.Warn("raid engine: the manager has not recorded a member's failure: acknowledging the writes that saw it",
			"dev", dev, "waited", e.cfg.FailRecordWait)
	}
}

// markRecordedLocked releases the writes held for dev's failure.
func (e *RAIDEngine) markRecordedLocked(dev uint32) {
	if ch := e.recorded[dev]; ch != nil {
		close(ch)
		delete(e.recorded, dev)
	}
}

// Stop closes the RAID engine (a running Sync is cancelled, requests in
// flight finish, new ones fail) and the devices opened for it.
func (e *RAIDEngine) Stop() error {
	e.mu.Lock()
	eng := e.eng
	if eng == nil {
		e.mu.Unlock()
		return nil
	}
	close(e.tickEnd)
	close(e.stopped)
	e.mu.Unlock()
	e.tickWG.Wait()
	err := eng.Close()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, rm := range e.members {
		if rm.owned && rm.dev != nil {
			err = errors.Join(err, rm.dev.Close())
		}
		rm.dev, rm.role = nil, -1
	}
	e.eng = nil
	return err
}

// SetMember adds a member or changes its state: a spare is only recorded;
// a member entering a slot as recovering is added to the RAID engine's
// role (writes reach it from now on, reads once rebuilt); a recovering
// member now in sync becomes readable; a faulty one is failed.
func (e *RAIDEngine) SetMember(m EngineMember) error {
	if f, _ := e.hooks(); f != nil {
		if err := f(m); err != nil {
			return err
		}
	}
	if m.State == MemberFaulty {
		e.mu.Lock()
		rm := e.members[m.Dev]
		if rm == nil {
			e.members[m.Dev] = &raidMember{EngineMember: m, role: -1}
			e.mu.Unlock()
			return nil
		}
		e.mu.Unlock()
		return e.FailMember(m.Dev)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	eng := e.eng
	if eng == nil {
		return ErrEngineStopped
	}
	rm := e.members[m.Dev]
	if rm == nil {
		rm = &raidMember{role: -1}
	}
	want := -1
	if holdsRole(m, e.setup.RaidDisks) {
		want = m.Slot
	}
	if rm.role >= 0 && rm.role != want {
		// Leaves its role (a slot change, or back to spare).
		if err := e.unbindLocked(rm); err != nil {
			return err
		}
	}
	delete(e.failing, m.Dev)
	if want < 0 {
		rm.EngineMember = m
		e.members[m.Dev] = rm
		return nil
	}
	if rm.role < 0 {
		d, owned, err := e.open(m)
		if err != nil {
			return err
		}
		if err := eng.AddMember(want, d, int64(m.DataOffset)*superblock.SectorSize); err != nil {
			if owned {
				d.Close()
			}
			return fmt.Errorf("raid engine: device %d into slot %d: %w", m.Dev, want, err)
		}
		rm.role, rm.dev, rm.owned = want, d, owned
	}
	rm.EngineMember = m
	e.members[m.Dev] = rm
	cur := eng.Members()[want].State
	switch {
	case m.State == MemberInSync && cur == raid.Recovering:
		if err := eng.SetInSync(want); err != nil {
			return err
		}
	case m.State == MemberRecovering && cur == raid.Recovering:
		e.setRecoveredLocked(rm)
	case m.State == MemberRecovering && cur == raid.InSync:
		return fmt.Errorf("raid engine: device %d is in sync in slot %d; it cannot become recovering without leaving it", m.Dev, want)
	case cur == raid.Failed:
		return fmt.Errorf("raid engine: device %d in slot %d has failed; remove it first", m.Dev, want)
	}
	return nil
}

// unbindLocked takes rm out of its role (failing it first if it is in
// sync) and closes its device.
func (e *RAIDEngine) unbindLocked(rm *raidMember) error {
	eng := e.eng
	if eng.Members()[rm.role].State == raid.InSync {
		e.failing[rm.Dev] = true
		e.markRecordedLocked(rm.Dev)
		e.mu.Unlock()
		err := eng.FailMember(rm.role, errors.New("leaving its slot"))
		e.mu.Lock()
		if err != nil {
			return fmt.Errorf("raid engine: device %d out of slot %d: %w", rm.Dev, rm.role, err)
		}
	}
	e.mu.Unlock()
	d, err := eng.RemoveMember(rm.role)
	e.mu.Lock()
	if err != nil {
		return fmt.Errorf("raid engine: device %d out of slot %d: %w", rm.Dev, rm.role, err)
	}
	if d != nil && rm.owned {
		d.Close()
	}
	rm.role, rm.dev, rm.owned = -1, nil, false
	return nil
}

// FailMember fails dev in the RAID engine: once it returns, no write
// reaches it (the requests that had chosen it have finished), and its slot
// is empty there (a spare may be activated into it); it stays bound as a
// faulty member until RemoveMember.
func (e *RAIDEngine) FailMember(dev uint32) error {
	e.mu.Lock()
	rm := e.members[dev]
	if rm == nil {
		e.mu.Unlock()
		return fmt.Errorf("raid engine: fail: no member %d", dev)
	}
	eng, role := e.eng, rm.role
	e.failing[dev] = true
	e.markRecordedLocked(dev)
	e.mu.Unlock()
	if eng != nil && role >= 0 {
		if err := eng.FailMember(role, errors.New("failed by the array manager")); err != nil {
			e.mu.Lock()
			delete(e.failing, dev)
			e.mu.Unlock()
			return fmt.Errorf("raid engine: fail device %d: %w", dev, err)
		}
	}
	// Out of its role, as md takes a faulty device out of the
	// personality: the slot is free for a spare, the device stays bound
	// (a faulty member) until the manager removes it.
	e.mu.Lock()
	defer e.mu.Unlock()
	rm.State, rm.Slot = MemberFaulty, -1
	if role >= 0 && eng != nil && e.eng == eng && rm.role == role {
		e.mu.Unlock()
		d, err := eng.RemoveMember(role)
		e.mu.Lock()
		if err != nil {
			return fmt.Errorf("raid engine: fail device %d: out of slot %d: %w", dev, role, err)
		}
		if d != nil && rm.owned {
			d.Close()
		}
		rm.role, rm.dev, rm.owned = -1, nil, false
	}
	return nil
}

// RemoveMember unbinds dev (failing it first if it still holds data).
func (e *RAIDEngine) RemoveMember(dev uint32) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	rm := e.members[dev]
	if rm == nil {
		return fmt.Errorf("raid engine: remove: no member %d", dev)
	}
	if rm.role >= 0 && e.eng != nil {
		if err := e.unbindLocked(rm); err != nil {
			return err
		}
	}
	e.markRecordedLocked(dev)
	delete(e.members, dev)
	delete(e.failing, dev)
	return nil
}

// Members returns the bound members, by device number, as the engine has
// them (for tests and status).
func (e *RAIDEngine) Members() []EngineMember {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]EngineMember, 0, len(e.members))
	for _, rm := range e.members {
		out = append(out, rm.EngineMember)
	}
	sortMembers(out)
	return out
}

// SetRemoteWindow installs another node's resync window (array sectors)
// and returns once no write overlapping it is in flight here.
func (e *RAIDEngine) SetRemoteWindow(ctx context.Context, w Window) error {
	e.mu.Lock()
	eng := e.eng
	e.remote = w
	e.mu.Unlock()
	if eng == nil {
		return nil
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		eng.SetResyncWindow(ownership.Window{Lo: w.Lo, Hi: w.Hi})
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("raid engine: waiting for writes into window [%d,%d): %w", w.Lo, w.Hi, ctx.Err())
	}
}

// RemoteWindow returns the remote window as last set.
func (e *RAIDEngine) RemoteWindow() Window {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.remote
}

// SuspendReadBalancing sends every read to the first in-sync copy (on),
// or balances them again (off).
func (e *RAIDEngine) SuspendReadBalancing(on bool) {
	e.mu.Lock()
	e.noBal = on
	eng := e.eng
	e.mu.Unlock()
	if eng != nil {
		eng.SuspendReadBalancing(on)
	}
}

// ReadBalancingSuspended reports SuspendReadBalancing's state.
func (e *RAIDEngine) ReadBalancingSuspended() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.noBal
}

// Sync copies [r.Lo, r.Hi) (array sectors) onto r.Targets through the
// RAID engine: a resync writes every copy other than the first readable
// one, a recovery the target's copies only.
func (e *RAIDEngine) Sync(ctx context.Context, r SyncRequest) error {
	if r.Hi <= r.Lo {
		return nil
	}
	e.mu.Lock()
	eng := e.eng
	if eng == nil {
		e.mu.Unlock()
		return ErrEngineStopped
	}
	targets := []int{-1}
	if r.Kind == SyncRecovery {
		targets = targets[:0]
		for _, d := range r.Targets {
			rm := e.members[d]
			if rm == nil || rm.role < 0 {
				e.mu.Unlock()
				return fmt.Errorf("raid engine: recovery onto device %d: it holds no slot here", d)
			}
			targets = append(targets, rm.role)
		}
	}
	e.kind = r.Kind
	e.mu.Unlock()
	lo := min(int64(r.Lo)*superblock.SectorSize, e.size)
	hi := min(int64(r.Hi)*superblock.SectorSize, e.size)
	if lo >= hi {
		return nil
	}
	_, before := e.hooks()
	var hook func(context.Context, int64) error
	if before != nil {
		hook = func(ctx context.Context, off int64) error {
			return before(ctx, r.Kind, uint64(off)/superblock.SectorSize)
		}
	}
	// The ranges to copy: the listed chunks inside [lo, hi), or all of it.
	ranges := [][2]int64{{lo, hi}}
	if len(r.Chunks) > 0 && r.ChunkBytes > 0 {
		ranges = nil
		cb := int64(r.ChunkBytes)
		for _, c := range r.Chunks {
			clo, chi := max(int64(c)*cb, lo), min(int64(c+1)*cb, hi)
			if clo >= chi {
				continue
			}
			if k := len(ranges); k > 0 && ranges[k-1][1] >= clo {
				ranges[k-1][1] = max(ranges[k-1][1], chi)
				continue
			}
			ranges = append(ranges, [2]int64{clo, chi})
		}
	}
	for _, t := range targets {
		for _, rg := range ranges {
			err := eng.CopyRange(ctx, raid.CopyRequest{Op: r.Kind.String(), Target: t, Lo: rg[0], Hi: rg[1], BeforeWindow: hook})
			if err != nil {
				if errors.Is(err, raid.ErrClosed) {
					return fmt.Errorf("%w: %w", ErrEngineStopped, err)
				}
				return err
			}
		}
	}
	return nil
}

// EngineStats is a snapshot of the data path's counters, for metrics read
// at scrape time (nothing is added to the I/O path for them).
type EngineStats struct {
	// Running: the RAID engine is started; the rest is zero otherwise.
	Running bool
	// Degraded: some raid slot has no in-sync member.
	Degraded bool
	// Stats are the RAID engine's counters; they start again at zero
	// with every Start.
	Stats raid.Stats
	// SyncSpeed is the running sync's copy rate (bytes per second, over
	// the last few seconds); 0 when none runs.
	SyncSpeed float64
	// MemberErrors counts I/O errors by device number, for the members
	// holding a raid slot (a member's count starts at zero when it takes
	// its slot and goes with it when it is failed).
	MemberErrors map[uint32]uint64
}

// Stats returns the data path's counters (see EngineStats).
func (e *RAIDEngine) Stats() EngineStats {
	e.mu.Lock()
	eng := e.eng
	roles := map[int]uint32{}
	for _, rm := range e.members {
		if rm.role >= 0 {
			roles[rm.role] = rm.Dev
		}
	}
	e.mu.Unlock()
	if eng == nil {
		return EngineStats{}
	}
	s := EngineStats{Running: true, Degraded: eng.Degraded(), Stats: eng.Stats(), MemberErrors: map[uint32]uint64{}}
	for role, mi := range eng.Members() {
		if dev, ok := roles[role]; ok {
			s.MemberErrors[dev] = mi.Errors
		}
	}
	if p := eng.Progress(); p.Running {
		s.SyncSpeed = p.Speed
	}
	return s
}

// Progress reports the running Sync (sectors of the current request).
func (e *RAIDEngine) Progress() SyncProgress {
	e.mu.Lock()
	eng, kind := e.eng, e.kind
	e.mu.Unlock()
	if eng == nil {
		return SyncProgress{}
	}
	p := eng.Progress()
	if !p.Running {
		return SyncProgress{}
	}
	return SyncProgress{Running: true, Kind: kind, Done: uint64(p.Done) / superblock.SectorSize,
		Total: uint64(p.Total) / superblock.SectorSize}
}

// SetSpeedLimits changes md's speed_limit_min/max (KiB/s) of the running
// engine and of later starts; 0 keeps a limit.
func (e *RAIDEngine) SetSpeedLimits(min, max int64) {
	e.mu.Lock()
	if min > 0 {
		e.cfg.SpeedLimitMin = min
	}
	if max > 0 {
		e.cfg.SpeedLimitMax = max
	}
	eng := e.eng
	e.mu.Unlock()
	if eng != nil {
		eng.SetSpeedLimits(min, max)
	}
}

// RAID returns the running RAID engine (nil when stopped), for statistics.
func (e *RAIDEngine) RAID() *raid.Engine {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.eng
}

// current returns the running RAID engine, or an error for a request
// that comes while it is stopped (an NBD client then disconnects).
func (e *RAIDEngine) current() (*raid.Engine, error) {
	e.mu.Lock()
	if hold := e.hold; hold != nil {
		e.mu.Unlock()
		e.holdWaits.Add(1)
		t := time.NewTimer(e.cfg.HoldWait)
		select {
		case <-hold:
			t.Stop()
		case <-t.C:
			e.holdTimeouts.Add(1)
			return nil, fmt.Errorf("%w: %w (waited %s while the node re-joins the array)", ErrEngineStopped, nbd.ErrShutdown, e.cfg.HoldWait)
		}
		e.mu.Lock()
	}
	defer e.mu.Unlock()
	if e.eng == nil {
		return nil, fmt.Errorf("%w: %w", ErrEngineStopped, nbd.ErrShutdown)
	}
	return e.eng, nil
}

// HoldIO makes new requests wait until ReleaseIO (for at most HoldWait)
// instead of failing at once while the engine is stopped. The manager
// holds I/O while it re-joins the array after this node lost its locks:
// the engine is stopped (no write may go out without the slot lock),
// started again, and I/O released once the node has its slot back.
func (e *RAIDEngine) HoldIO() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.hold == nil {
		e.hold = make(chan struct{})
	}
}

// ReleaseIO ends HoldIO: waiting requests go on (and fail if the engine
// is still stopped: the re-join gave up or the manager stopped).
func (e *RAIDEngine) ReleaseIO() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.hold != nil {
		close(e.hold)
		e.hold = nil
	}
}

// HoldStats reports how many requests waited for a held engine to start,
// and how many of them gave up after HoldWait.
func (e *RAIDEngine) HoldStats() (waited, timedOut uint64) {
	return e.holdWaits.Load(), e.holdTimeouts.Load()
}

// ReadAt implements nbd.Backend (and io.ReaderAt).
func (e *RAIDEngine) ReadAt(p []byte, off int64) (int, error) {
	eng, err := e.current()
	if err != nil {
		return 0, err
	}
	return eng.ReadAt(p, off)
}

// WriteAt implements nbd.Backend.
func (e *RAIDEngine) WriteAt(p []byte, off int64, flags nbd.IOFlags) error {
	return e.retryLost(func(eng *raid.Engine) error { return eng.WriteAt(p, off, flags) })
}

// Flush implements nbd.Backend.
func (e *RAIDEngine) Flush() error {
	return e.retryLost(func(eng *raid.Engine) error { return eng.Flush() })
}

// Trim implements nbd.Backend.
func (e *RAIDEngine) Trim(off, n int64, flags nbd.IOFlags) error {
	return e.retryLost(func(eng *raid.Engine) error { return eng.Trim(off, n, flags) })
}

// WriteZeroes implements nbd.Backend.
func (e *RAIDEngine) WriteZeroes(off, n int64, flags nbd.IOFlags) error {
	return e.retryLost(func(eng *raid.Engine) error { return eng.WriteZeroes(off, n, flags) })
}

// retryLost runs op on the running engine. If op fails because this
// node's bitmap slot lock was lost (the cluster excluded the node and
// readmitted it clean), the manager is about to re-join the array
// (Manager.startRejoin holds I/O, stops and restarts the engine): the
// request then waits for that, as one arriving during the re-join does
// (HoldWait), and runs once more on the engine the re-join starts. Nothing
// of it reached a member: the write intent, which failed, goes first.
func (e *RAIDEngine) retryLost(op func(*raid.Engine) error) error {
	eng, err := e.current()
	if err != nil {
		return err
	}
	err = op(eng)
	if err == nil || !errors.Is(err, ownership.ErrNotOwner) {
		return err
	}
	deadline := time.Now().Add(e.cfg.HoldWait)
	for {
		e.mu.Lock()
		moved := e.hold != nil || e.eng != eng
		e.mu.Unlock()
		if moved {
			break
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(2 * time.Millisecond)
	}
	eng, cerr := e.current()
	if cerr != nil {
		return fmt.Errorf("%w (after: %w)", cerr, err)
	}
	return op(eng)
}

// Size implements nbd.Backend: the array's size as of the last Start.
func (e *RAIDEngine) Size() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.size
}

// Capabilities implements nbd.Backend.
func (e *RAIDEngine) Capabilities() nbd.Capabilities {
	e.mu.Lock()
	eng := e.eng
	e.mu.Unlock()
	if eng != nil {
		return eng.Capabilities()
	}
	return nbd.Capabilities{Flush: true, Trim: true, WriteZeroes: true, FastZero: true, MultiConn: true,
		MinBlockSize: superblock.SectorSize}
}

// sortMembers orders members by device number.
func sortMembers(ms []EngineMember) {
	slices.SortFunc(ms, func(a, b EngineMember) int { return cmp.Compare(a.Dev, b.Dev) })
}
