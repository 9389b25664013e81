package raid

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// WriteIntent is the write-intent bitmap as the engine uses it: before a
// write to [off, off+n) of the array reaches any member, StartWrite must
// have made the covering chunks' bits durable on every member; EndWrite
// ends that write (the bit may then be cleared lazily). *intent.Intent
// implements it; the node's slot in it is held through bitmap/ownership.
// If it also has ResyncDone([]uint64) (as *intent.Intent does), the
// engine calls it for chunks its own resyncs made identical everywhere, so
// bits left by a crash or a new array can be cleared.
type WriteIntent interface {
	StartWrite(off, n int64) error
	EndWrite(off, n int64, now time.Duration)
}

type resyncDoner interface {
	ResyncDone(chunks []uint64)
}

// MemberState is what the engine does with a member.
type MemberState int32

const (
	// InSync members hold current data everywhere: read and written.
	InSync MemberState = iota
	// Recovering members are being rebuilt (a spare) or caught up (a
	// re-added member): every write goes to them, but reads only below
	// their recovered point (see MemberInfo.Recovered).
	Recovering
	// Failed members had an I/O error (or were failed by the operator):
	// no I/O goes to them any more.
	Failed
	// Missing roles have no device.
	Missing
)

// String names the state for logs and status output.
func (s MemberState) String() string {
	switch s {
	case InSync:
		return "in-sync"
	case Recovering:
		return "recovering"
	case Failed:
		return "failed"
	case Missing:
		return "missing"
	}
	return fmt.Sprintf("state(%d)", int32(s))
}

// Member configures one role (raid disk slot) of the array.
type Member struct {
	// Device is the member; nil means the role is missing.
	Device Device
	// DataOffset is where the data area starts on the device, in bytes
	// (the superblock's data_offset times 512). Each member has its own.
	DataOffset int64
	// State is InSync (the default) or Recovering (a spare to rebuild
	// with Recover, or a re-added member to catch up with CatchUp).
	// Missing is implied by a nil Device.
	State MemberState
}

// Config configures an Engine. Zero values of the optional fields mean the
// documented defaults.
type Config struct {
	// Geometry is the array's shape.
	Geometry Geometry
	// Members has one entry per role: len(Members) == Geometry.Disks().
	Members []Member
	// Intent is the write-intent bitmap (nil: none, like an md array
	// without a bitmap). It can also be set later with SetIntent, since
	// bitmap/ownership builds it on Join, which needs the engine first.
	Intent WriteIntent
	// RequireIntent refuses writes while no Intent is set: a clustered
	// array must never write data whose chunk is not marked.
	RequireIntent bool
	// BitmapChunkSize is the bitmap's bytes per bit. Resync's chunk
	// numbers are in this unit; it is required with Intent or Resync.
	BitmapChunkSize int64
	// OnMemberFailed is called once when a member is failed, with the
	// error that failed it. The array manager turns it into the
	// cluster-wide metadata update. The engine has already stopped using
	// the member; writes that saw the failure are acknowledged only after
	// the callback returns (md holds such writes until the superblock
	// records the failure). Those writes wait inside the engine, so the
	// callback must not wait for the array's I/O: no writes to the array,
	// and no RemoveMember or Close until it has returned.
	OnMemberFailed func(member int, err error)
	// MaxInFlight bounds the requests (reads, writes, flushes) the engine
	// runs at once; more wait for a slot. Default 128. Each holds at most
	// one buffer of MaxIOSize, which bounds the engine's buffer memory.
	MaxInFlight int
	// MaxIOSize is the largest piece a request is cut into (a power of
	// two, at least 4 KiB). Default 1 MiB.
	MaxIOSize int
	// ResyncIOSize is the unit of resync and recovery I/O, and the
	// window the resync barrier holds writes out of. Default 1 MiB.
	ResyncIOSize int
	// SpeedLimitMin and SpeedLimitMax are md's speed_limit_min/max in
	// KiB/s: resync runs at up to SpeedLimitMax while the array is
	// otherwise idle, and yields to SpeedLimitMin while it has other I/O.
	// Defaults 1000 and 200000, md's.
	SpeedLimitMin, SpeedLimitMax int64
	// ClusterWindow is how far ahead of itself a resync, recovery or
	// catch-up announces its window through OnSyncWindow (md-cluster's 32
	// MiB for raid1). Default 32 MiB.
	ClusterWindow int64
	// OnSyncWindow, if set, is called before a resync, recovery or
	// catch-up run by FullResync, Recover or CatchUp enters each new
	// window [lo, hi) of array bytes, and with (0, 0) when it ends: the
	// array manager publishes it (md-cluster's RESYNCING message) so
	// other nodes hold their writes out of it. An error stops the
	// operation. Resync (bitmap chunks) does not call it: its caller,
	// bitmap/ownership, announces its own window.
	OnSyncWindow func(ctx context.Context, lo, hi int64) error
	// MaxCorrectedReadErrors fails a member after this many read errors
	// repaired by rewriting (md's max_corrected_read_errors). Default 20.
	MaxCorrectedReadErrors int
	// Clock paces resync and stamps EndWrite; nil means SystemClock().
	Clock Clock
	// Logger receives the engine's log; nil means slog.Default().
	Logger *slog.Logger
	// Gate, if set, may stop all of this node's array I/O (the storage
	// fencing lease, mdcluster/lease): new requests call Wait before
	// they are admitted, and every member read, write and flush calls
	// Check just before it reaches the device (and, if that fails, Wait
	// and Check again: an admitted request waits out a stop as a new one
	// would). An error fails the request with an error wrapping
	// ErrIOStopped; it never fails a member, since the members are fine
	// and this node is what stopped.
	Gate IOGate
}

// IOGate stops and resumes the engine's I/O; see Config.Gate.
type IOGate interface {
	// Wait returns nil once I/O may proceed, or an error saying why it
	// may not (after whatever time the gate allows requests to wait).
	Wait() error
	// Check returns nil if I/O may proceed now, without waiting.
	Check() error
}

// ErrIOStopped is wrapped by the error of a request refused by
// Config.Gate: this node must not do array I/O now (its lease ran out,
// it was fenced, or it lost quorum). The gate's own error is wrapped too.
var ErrIOStopped = errors.New("array I/O stopped on this node")

// gateCheck is the per-device-operation check of Config.Gate. A gate
// that closed after the request was admitted is waited for (Wait, as a
// new request would), and the operation goes to the device only if Check
// then passes: a stop that passes within the gate's wait (a survivor
// waiting for the view its fencer stamped) costs the request time, not an
// I/O error, and no device operation is ever issued while the gate is
// closed.
func (e *Engine) gateCheck() error {
	if e.cfg.Gate == nil {
		return nil
	}
	if err := e.cfg.Gate.Check(); err != nil {
		if werr := e.cfg.Gate.Wait(); werr != nil {
			return fmt.Errorf("%w: %w", ErrIOStopped, werr)
		}
		if err := e.cfg.Gate.Check(); err != nil {
			return fmt.Errorf("%w: %w", ErrIOStopped, err)
		}
	}
	return nil
}

// member is the engine's state for one role.
type member struct {
	idx     int
	state   atomic.Int32
	dev     atomic.Pointer[devRef]
	pending atomic.Int64 // device operations in flight (read balancing)
	// recovered is, while Recovering, the array offset below which the
	// member's copies are rebuilt and may be read.
	recovered atomic.Int64
	corrected atomic.Int64

	reads, writes, bytesRead, bytesWritten, errors atomic.Uint64

	failDone chan struct{} // closed when OnMemberFailed returned (under Engine.mu)
}

type devRef struct {
	dev     Device
	dataOff int64
}

func (m *member) st() MemberState { return MemberState(m.state.Load()) }

// writable reports whether writes go to the member.
func (m *member) writable() bool {
	s := m.st()
	return s == InSync || s == Recovering
}

// readable reports whether the member's copy of [off, off+n) of the array
// may be read.
func (m *member) readable(off, n int64) bool {
	switch m.st() {
	case InSync:
		return true
	case Recovering:
		return off+n <= m.recovered.Load()
	}
	return false
}

// Engine is the RAID engine of one array on this node: raid1 or raid10
// over its members, with the write-intent bitmap, read balancing, resync
// and recovery, and member failure handling. It implements nbd.Backend (so
// the export serves it), io.ReaderAt, and bitmap/ownership.Array (Resync).
// All methods are safe for concurrent use.
type Engine struct {
	cfg   Config
	geo   Geometry
	log   *slog.Logger
	clock Clock
	bs    int   // logical block size: the largest of the members'
	size  int64 // array bytes
	pool  *bufPool

	members []*member
	intent  atomic.Pointer[intentRef]

	locks rangeLock
	slots chan struct{}
	// ioMu is held shared by every request and resync window, and
	// exclusively to drain them (Close, RemoveMember).
	ioMu   sync.RWMutex
	closed atomic.Bool

	mu sync.Mutex // member transitions, window, pins
	// remote is the resync window another node announced (array bytes);
	// windowCh is closed and replaced whenever it changes.
	remote    span
	remoteWin atomic.Pointer[span] // remote, for the read path's lock-free check
	windowCh  chan struct{}
	suspendRB atomic.Bool
	needSync  spanSet
	pinMu     sync.Mutex // guards pinned; never held with mu
	pinned    map[uint64]struct{}

	syncSem  chan struct{}
	syncStop context.CancelFunc // cancels the running sync op (Close)
	throttle throttle
	progress progress
	userIO   atomic.Uint64 // non-resync requests, for the throttle's idle test
	rr       atomic.Uint64 // round-robin tie breaker for reads

	st engineStats

	// mut makes the engine deliberately wrong in one way, so tests can
	// show they catch the bug. Set only by tests in this package.
	mut mutation
}

// mutation names a deliberate bug for the tests that must catch it.
type mutation uint8

const (
	mutNoRangeLock     mutation = 1 << iota // overlapping writes are not serialised
	mutIntentAfterData                      // the bitmap bit is set after the data write
	mutNoBarrier                            // resync copies without holding writes out
	mutAIOLoseError                         // an AIO member write's error is taken for success
)

type intentRef struct{ w WriteIntent }

type engineStats struct {
	reads, writes, fuaWrites, flushes, trims, zeroes atomic.Uint64
	bytesRead, bytesWritten                          atomic.Uint64
	inFlight                                         atomic.Int64
	slotWaits, rangeWaits, windowWaits, bounced      atomic.Uint64
	readRetries, corrected, unrecoverable            atomic.Uint64
	degradedWrites, memberFailures, notFailed        atomic.Uint64
	resyncBytes                                      atomic.Uint64
	aioWrites, aioFallbacks                          atomic.Uint64
}

// Defaults for Config fields.
const (
	DefaultMaxInFlight            = 128      // requests at once: enough to keep an NVMe queue busy, small enough to bound memory
	DefaultMaxIOSize              = 1 << 20  // a request piece: the size md and the block layer favour for streaming
	DefaultResyncIOSize           = 1 << 20  // a resync window: large sequential I/O, short enough to hold writes only briefly
	DefaultClusterWindow          = 32 << 20 // md-cluster's raid1 CLUSTER_RESYNC_WINDOW
	DefaultMaxCorrectedReadErrors = 20       // md's max_corrected_read_errors
)

// New starts an engine over cfg's members. It does no I/O.
func New(cfg Config) (*Engine, error) {
	g := cfg.Geometry
	if g.Disks() == 0 {
		return nil, errors.New("raid: no geometry")
	}
	if len(cfg.Members) != g.Disks() {
		return nil, fmt.Errorf("raid: %d members for %d raid disks", len(cfg.Members), g.Disks())
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.MaxIOSize == 0 {
		cfg.MaxIOSize = DefaultMaxIOSize
	}
	if cfg.ResyncIOSize == 0 {
		cfg.ResyncIOSize = DefaultResyncIOSize
	}
	for _, v := range []struct {
		name string
		n    int
	}{{"MaxIOSize", cfg.MaxIOSize}, {"ResyncIOSize", cfg.ResyncIOSize}} {
		if v.n < Alignment || v.n&(v.n-1) != 0 {
			return nil, fmt.Errorf("raid: %s %d is not a power of two of at least %d", v.name, v.n, Alignment)
		}
	}
	if cfg.SpeedLimitMin == 0 {
		cfg.SpeedLimitMin = DefaultSpeedLimitMin
	}
	if cfg.SpeedLimitMax == 0 {
		cfg.SpeedLimitMax = DefaultSpeedLimitMax
	}
	if cfg.ClusterWindow <= 0 {
		cfg.ClusterWindow = DefaultClusterWindow
	}
	if cfg.MaxCorrectedReadErrors <= 0 {
		cfg.MaxCorrectedReadErrors = DefaultMaxCorrectedReadErrors
	}
	if cfg.BitmapChunkSize < 0 || (cfg.BitmapChunkSize > 0 && cfg.BitmapChunkSize&(cfg.BitmapChunkSize-1) != 0) {
		return nil, fmt.Errorf("raid: bitmap chunk size %d is not a power of two", cfg.BitmapChunkSize)
	}
	if (cfg.Intent != nil || cfg.RequireIntent) && cfg.BitmapChunkSize == 0 {
		return nil, errors.New("raid: a write-intent bitmap needs BitmapChunkSize")
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock()
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	e := &Engine{
		cfg: cfg, geo: g, log: lg.With("array", g.String()), clock: cfg.Clock,
		bs: 512, size: g.Size(), pool: newBufPool(max(cfg.MaxIOSize, cfg.ResyncIOSize)),
		slots: make(chan struct{}, cfg.MaxInFlight), windowCh: make(chan struct{}),
		pinned: map[uint64]struct{}{}, syncSem: make(chan struct{}, 1),
	}
	e.throttle = throttle{clock: cfg.Clock, min: cfg.SpeedLimitMin, max: cfg.SpeedLimitMax}
	e.progress.p.Member = -1
	for i, mc := range cfg.Members {
		m := &member{idx: i}
		e.members = append(e.members, m)
		if mc.Device == nil {
			m.state.Store(int32(Missing))
			continue
		}
		if err := e.checkDevice(i, mc.Device, mc.DataOffset); err != nil {
			return nil, err
		}
		switch mc.State {
		case InSync, Recovering:
		default:
			return nil, fmt.Errorf("raid: member %d: initial state %s (want in-sync or recovering)", i, mc.State)
		}
		m.dev.Store(&devRef{dev: mc.Device, dataOff: mc.DataOffset})
		m.state.Store(int32(mc.State))
		e.bs = max(e.bs, mc.Device.BlockSize())
	}
	if e.size%int64(e.bs) != 0 {
		return nil, fmt.Errorf("raid: array size %d is not a multiple of the members' %d-byte blocks", e.size, e.bs)
	}
	if cs := cfg.BitmapChunkSize; cs > 0 && cs%int64(e.bs) != 0 {
		return nil, fmt.Errorf("raid: bitmap chunk of %d bytes is not a multiple of the members' %d-byte blocks", cs, e.bs)
	}
	if cfg.Intent != nil {
		e.intent.Store(&intentRef{cfg.Intent})
	}
	if !g.Survives(func(i int) bool { return e.members[i].st() == InSync }) {
		return nil, fmt.Errorf("raid: %s: the in-sync members do not hold every block", g)
	}
	return e, nil
}

// checkDevice validates a member device against the geometry.
func (e *Engine) checkDevice(i int, d Device, dataOff int64) error {
	bs := int64(d.BlockSize())
	if bs <= 0 || bs > Alignment || bs&(bs-1) != 0 {
		return fmt.Errorf("raid: member %d: block size %d", i, bs)
	}
	if dataOff < 0 || dataOff%bs != 0 {
		return fmt.Errorf("raid: member %d: data offset %d is not a multiple of its %d-byte blocks", i, dataOff, bs)
	}
	if need := dataOff + e.geo.DevSize(); d.Size() < need {
		return fmt.Errorf("raid: member %d: %d bytes, the array needs %d (data offset %d + %d)", i, d.Size(), need, dataOff, e.geo.DevSize())
	}
	if g := e.geo; g.Level() == RAID10 && g.ChunkSize()%bs != 0 {
		return fmt.Errorf("raid: member %d: %d-byte blocks do not divide the %d-byte chunk", i, bs, g.ChunkSize())
	}
	return nil
}

// SetIntent installs (or with nil removes) the write-intent bitmap. Call
// it before writes start, typically right after bitmap/ownership's Join
// built the bitmap's engine. Writes already past their StartWrite finish
// under the previous one.
func (e *Engine) SetIntent(w WriteIntent) {
	if w == nil {
		e.intent.Store(nil)
		return
	}
	e.intent.Store(&intentRef{w})
}

func (e *Engine) writeIntent() WriteIntent {
	if r := e.intent.Load(); r != nil {
		return r.w
	}
	return nil
}

// Clock returns the engine's clock. The write-intent bitmap's daemon
// (intent.Tick) must be driven by it: EndWrite times are stamped with it.
func (e *Engine) Clock() Clock { return e.clock }

// Geometry returns the array's geometry.
func (e *Engine) Geometry() Geometry { return e.geo }

// BlockSize returns the logical block size of the array (the largest of
// its members'): offsets and lengths that are multiples of it need no
// read-modify-write.
func (e *Engine) BlockSize() int { return e.bs }

// Size returns the array size in bytes.
func (e *Engine) Size() int64 { return e.size }

// SetResyncWindow records the resync window another node announced (md-
// cluster's RESYNCING message; ownership.Window's lo/hi in sectors) and
// returns once no write overlapping it is in flight here. Until it moves,
// writes overlapping it wait, and reads there go to the first in-sync
// copy, as in md's area_resyncing. The zero Window clears it.
func (e *Engine) SetResyncWindow(w ownership.Window) {
	var s span
	if w.Active() {
		s = span{int64(w.Lo) * 512, int64(w.Hi) * 512}
	}
	e.mu.Lock()
	e.remote = s
	if s.lo < s.hi {
		e.remoteWin.Store(&s)
	} else {
		e.remoteWin.Store(nil)
	}
	close(e.windowCh)
	e.windowCh = make(chan struct{})
	e.mu.Unlock()
	if s.lo < s.hi {
		// Drain writes that took their range lock before the window was
		// set: later ones see it once they hold their lock.
		lk, _ := e.locks.lock(s.lo, s.hi)
		e.locks.unlock(lk)
	}
}

// ResyncWindow returns the remote resync window in effect, in bytes.
func (e *Engine) ResyncWindow() (lo, hi int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.remote.lo, e.remote.hi
}

// inWindow reports whether [lo, hi) overlaps the remote window, and the
// channel that is closed when the window next changes.
func (e *Engine) inWindow(lo, hi int64) (bool, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.remote.lo < hi && lo < e.remote.hi, e.windowCh
}

// SuspendReadBalancing turns read balancing off (every read goes to the
// first in-sync copy) or back on. md-cluster does this from DLM recovery's
// start (recover_prep) to its end (recover_done), so that a cluster file
// system recovering a dead node's journal cannot read a stale mirror of
// a chunk the dead node was writing before its bits are resynced.
func (e *Engine) SuspendReadBalancing(on bool) { e.suspendRB.Store(on) }

// MarkNeedSync records that [off, off+n) of the array may differ between
// copies (for example chunks a crash left dirty, before Resync runs):
// reads there go to the first in-sync copy until a resync covers it.
func (e *Engine) MarkNeedSync(off, n int64) { e.needSync.add(off, off+n) }

// MemberInfo describes one role.
type MemberInfo struct {
	State MemberState
	// Recovered is, for a Recovering member, the array offset below which
	// it has been rebuilt (reads may use it there).
	Recovered int64
	// Pending is the number of device operations in flight.
	Pending int64
	// Reads, Writes, BytesRead, BytesWritten and Errors count the
	// engine's operations on the member; CorrectedReads the read errors
	// repaired by rewriting.
	Reads, Writes, BytesRead, BytesWritten, Errors uint64
	CorrectedReads                                 int64
}

// Members returns every role's state and counters.
func (e *Engine) Members() []MemberInfo {
	out := make([]MemberInfo, len(e.members))
	for i, m := range e.members {
		out[i] = MemberInfo{
			State: m.st(), Recovered: m.recovered.Load(), Pending: m.pending.Load(),
			Reads: m.reads.Load(), Writes: m.writes.Load(), BytesRead: m.bytesRead.Load(),
			BytesWritten: m.bytesWritten.Load(), Errors: m.errors.Load(), CorrectedReads: m.corrected.Load(),
		}
		if out[i].State == InSync {
			out[i].Recovered = e.size
		}
	}
	return out
}

// Degraded reports whether some role is not in sync.
func (e *Engine) Degraded() bool {
	for _, m := range e.members {
		if m.st() != InSync {
			return true
		}
	}
	return false
}

// Stats counts what the engine did; the daemon exports them as metrics.
type Stats struct {
	Reads, Writes, FUAWrites, Flushes, Trims, WriteZeroes uint64
	BytesRead, BytesWritten                               uint64
	// InFlight is the number of requests running now; MaxInFlight the
	// bound; SlotWaits counts requests that waited for a slot.
	InFlight    int64
	MaxInFlight int
	SlotWaits   uint64
	// RangeWaits counts requests (and resync windows) that waited for an
	// overlapping one; WindowWaits writes held by a remote resync window.
	RangeWaits, WindowWaits uint64
	// Bounced counts pieces copied through an aligned buffer (the caller's
	// buffer was not aligned, or a partial block needed read-modify-write).
	Bounced uint64
	// ReadRetries counts reads retried on another copy after an error;
	// ReadErrorsCorrected the bad copies rewritten from a good one;
	// ReadErrorsUnrecoverable reads that found no good copy.
	ReadRetries, ReadErrorsCorrected, ReadErrorsUnrecoverable uint64
	// DegradedWrites counts writes that could not reach every copy (their
	// bitmap chunks stay dirty); MemberFailures members failed;
	// FailuresRefused errors on a member that was not failed because it
	// holds the last copy of some data.
	DegradedWrites, MemberFailures, FailuresRefused uint64
	// ResyncBytes counts bytes copied by resync, recovery and catch-up.
	ResyncBytes uint64
	// AIOWrites counts member writes submitted with Linux native AIO (on
	// DirectFile members every copy of a request is submitted at once
	// from the calling thread, instead of a blocking write per member);
	// AIOFallbacks member writes that AIO refused or cut short and that
	// were finished with a plain write.
	AIOWrites, AIOFallbacks uint64
}

// Stats returns the engine's counters.
func (e *Engine) Stats() Stats {
	s := &e.st
	return Stats{
		Reads: s.reads.Load(), Writes: s.writes.Load(), FUAWrites: s.fuaWrites.Load(), Flushes: s.flushes.Load(),
		Trims: s.trims.Load(), WriteZeroes: s.zeroes.Load(), BytesRead: s.bytesRead.Load(), BytesWritten: s.bytesWritten.Load(),
		InFlight: s.inFlight.Load(), MaxInFlight: e.cfg.MaxInFlight, SlotWaits: s.slotWaits.Load(),
		RangeWaits: s.rangeWaits.Load(), WindowWaits: s.windowWaits.Load(), Bounced: s.bounced.Load(),
		ReadRetries: s.readRetries.Load(), ReadErrorsCorrected: s.corrected.Load(), ReadErrorsUnrecoverable: s.unrecoverable.Load(),
		DegradedWrites: s.degradedWrites.Load(), MemberFailures: s.memberFailures.Load(), FailuresRefused: s.notFailed.Load(),
		ResyncBytes: s.resyncBytes.Load(), AIOWrites: s.aioWrites.Load(), AIOFallbacks: s.aioFallbacks.Load(),
	}
}

// admit takes an in-flight slot and the shared I/O lock. release undoes it.
func (e *Engine) admit() error {
	if g := e.cfg.Gate; g != nil && !e.closed.Load() {
		// Wait before taking ioMu, so a stopped node can still Close.
		if err := g.Wait(); err != nil {
			return fmt.Errorf("raid: %w: %w", ErrIOStopped, err)
		}
	}
	e.ioMu.RLock()
	if e.closed.Load() {
		e.ioMu.RUnlock()
		return fmt.Errorf("raid: %w: %w", ErrClosed, nbd.ErrShutdown)
	}
	select {
	case e.slots <- struct{}{}:
	default:
		e.st.slotWaits.Add(1)
		e.slots <- struct{}{}
	}
	e.st.inFlight.Add(1)
	return nil
}

func (e *Engine) release() {
	e.st.inFlight.Add(-1)
	<-e.slots
	e.ioMu.RUnlock()
}

// Close stops the engine: new requests fail (with nbd.ErrShutdown, so NBD
// clients disconnect cleanly), a running resync is cancelled, and Close
// returns once requests in flight have finished. It does not close the
// member devices, which belong to the caller.
func (e *Engine) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.mu.Lock()
	stop := e.syncStop
	close(e.windowCh) // wake writes held by a remote window
	e.windowCh = make(chan struct{})
	e.mu.Unlock()
	if stop != nil {
		stop()
	}
	// Wait for a running sync op to notice (it takes ioMu only per
	// window, so this must come before draining requests).
	e.syncSem <- struct{}{}
	<-e.syncSem
	e.ioMu.Lock()
	e.ioMu.Unlock()
	return nil
}
