package array

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Engine is the data path of one array on one node, as the manager (the
// control plane) drives it. The RAID engine (package mdcluster/raid)
// implements it for real I/O through RAIDEngine, which is also what the
// daemon exports over NBD.
//
// The manager decides, the engine carries out: which members exist and in
// which state, which window another node is resyncing (writes into it wait,
// reads in it are not balanced), when read balancing is suspended (while the
// lock manager recovers from a node failure, md's SUSPEND_READ_BALANCING),
// and which sectors to copy onto which members. The engine decides nothing
// about the cluster and takes no lock.
//
// Every method but Sync returns promptly. Methods are called from the
// manager's goroutines, never concurrently for the same member, and may be
// called before Start (the manager tells the engine the state it starts
// with through Start's setup) only where documented.
type Engine interface {
	// Start binds the members and starts serving the data path with them.
	// Writes go to every member that is InSync or Recovering, reads come
	// from InSync members (and Recovering ones below their recovery
	// offset, if the engine tracks it). setup.Intent must be consulted
	// before every write (the write-intent bit durable before the data).
	Start(ctx context.Context, setup EngineSetup) error
	// Stop stops the data path: no more writes reach any member once it
	// returns. A running Sync ends with an error.
	Stop() error
	// SetMember adds a member or changes its state (a spare activated into
	// a slot and recovering, a recovering member now in sync).
	SetMember(m EngineMember) error
	// FailMember stops all I/O to member dev: no write reaches it once
	// FailMember returns (md: a faulty rdev gets no more I/O).
	FailMember(dev uint32) error
	// RemoveMember unbinds member dev (a faulty member or a spare).
	RemoveMember(dev uint32) error
	// SetRemoteWindow installs the window another node resyncs (Hi == 0
	// clears it). Writes overlapping the window wait until it moves on;
	// reads in it go to the first in-sync member. It returns once no
	// write that overlaps the new window is in flight (md quiesces the
	// personality around the change), or with ctx's error.
	SetRemoteWindow(ctx context.Context, w Window) error
	// SuspendReadBalancing(true) sends every read to the first in-sync
	// member until SuspendReadBalancing(false): during lock recovery a dead
	// node's dirty chunks may still differ between mirrors.
	SuspendReadBalancing(on bool)
	// Sync makes [Lo, Hi) (array sectors; for raid1 also the sectors of
	// each member's data area) identical on the targets by copying it from an in-sync member, keeping this
	// node's own writes out of the range while it copies (md's resync
	// barrier), and makes the copies durable before it returns. With
	// Chunks set only those bitmap chunks inside [Lo, Hi) are copied.
	Sync(ctx context.Context, r SyncRequest) error
	// Progress reports the running Sync, if any.
	Progress() SyncProgress
}

// MemberState is what a member is to the engine.
type MemberState int

// Member states as the engine sees them.
const (
	// MemberInSync: holds a slot and current data; read and written.
	MemberInSync MemberState = iota
	// MemberRecovering: holds a slot and is being rebuilt; written, not
	// read (above its recovery offset).
	MemberRecovering
	// MemberSpare: bound, no slot; neither read nor written.
	MemberSpare
	// MemberFaulty: bound but failed; no I/O at all.
	MemberFaulty
)

var memberStateNames = [...]string{"in_sync", "recovering", "spare", "faulty"}

// String returns a short name ("in_sync", "recovering", "spare", "faulty").
func (s MemberState) String() string {
	if s >= 0 && int(s) < len(memberStateNames) {
		return memberStateNames[s]
	}
	return fmt.Sprintf("member_state(%d)", int(s))
}

// EngineMember is one member as the engine is told about it.
type EngineMember struct {
	// Dev is md's device number (dev_number, desc_nr): the member's name
	// in every message and in the superblock's role table.
	Dev uint32
	// Slot is the raid slot for InSync and Recovering members, else -1.
	Slot int
	// State is what the member is to the data path.
	State MemberState
	// Member is the device (as this node reaches it).
	Member Member
	// DataOffset is where the member's data area starts (sectors).
	DataOffset uint64
	// RecoveryOffset is how far a Recovering member is rebuilt (sectors).
	RecoveryOffset uint64
}

// EngineSetup is what Start needs.
type EngineSetup struct {
	// Level is 1 (raid1) or 10 (raid10).
	Level int32
	// Layout is the superblock's layout word (raid10).
	Layout uint32
	// ChunkSectors is the raid10 chunk in sectors (0 for raid1).
	ChunkSectors uint32
	// RaidDisks is the number of slots.
	RaidDisks int
	// DevSectors is the used size of each member's data area (sectors).
	DevSectors uint64
	// Members are the bound members.
	Members []EngineMember
	// BitmapChunkBytes is the bitmap's chunk (bytes of the array per bit),
	// with Intent.
	BitmapChunkBytes uint32
	// Intent is the write-intent bitmap of this node's slot: StartWrite
	// before a write reaches any member, EndWrite after it completed on
	// every member. Nil when the array has no bitmap.
	Intent WriteIntent
	// OnMemberError is called (from any goroutine) when I/O to a member
	// fails: the manager fails the member cluster-wide.
	OnMemberError func(dev uint32, err error)
	// Now is the engine's clock for the bitmap's lazy clearing (nil:
	// time.Now).
	Now func() time.Time
}

// WriteIntent is the slice of bitmap/intent.Intent the data path uses.
type WriteIntent interface {
	// StartWrite returns once the chunks of [off, off+n) (bytes of the
	// bitmap's address space) are marked dirty and durable.
	StartWrite(off, n int64) error
	// EndWrite records that the write completed on every member.
	EndWrite(off, n int64, now time.Duration)
	// Tick clears bits of chunks idle for the bitmap's daemon sleep; md
	// does not clear bits while the array is degraded, so that a re-added
	// member can catch up from them.
	Tick(now time.Duration) (int, error)
}

// Window is a range of sectors [Lo, Hi) being resynced by some node; Hi ==
// 0 means none. It is md-cluster's suspend_lo/suspend_hi.
type Window struct {
	// Lo is the first sector of the window, Hi the first after it.
	Lo, Hi uint64
}

// Active reports whether the window covers anything.
func (w Window) Active() bool { return w.Hi != 0 }

// Overlaps reports whether [lo, hi) meets the window.
func (w Window) Overlaps(lo, hi uint64) bool { return w.Active() && hi > w.Lo && lo < w.Hi }

// SyncKind says why sectors are copied.
type SyncKind int

// Sync kinds, md's sync actions.
const (
	// SyncResync makes the in-sync members agree (after create without
	// --assume-clean, or for a dead node's dirty chunks).
	SyncResync SyncKind = iota
	// SyncRecovery rebuilds a member from the in-sync ones (a spare
	// activated into an empty slot, or a re-added member).
	SyncRecovery
)

// String returns md's word for the action ("resync", "recovery").
func (k SyncKind) String() string {
	if k == SyncRecovery {
		return "recovery"
	}
	return "resync"
}

// SyncRequest asks the engine to copy sectors.
type SyncRequest struct {
	// Kind says why (for progress and logs; the copy is the same).
	Kind SyncKind
	// Lo and Hi bound the array sectors to copy.
	Lo, Hi uint64
	// Targets are the device numbers to write. For a resync, every in-sync
	// member other than the source; for a recovery, the recovering member.
	Targets []uint32
	// Chunks, when set, restricts the copy to these bitmap chunks (of
	// ChunkBytes each); a re-add copies only what the bitmaps mark.
	Chunks []uint64
	// ChunkBytes is the size of one bitmap chunk (with Chunks).
	ChunkBytes uint32
}

// SyncProgress is a snapshot of the engine's running Sync.
type SyncProgress struct {
	// Running: a Sync is copying; Kind is its kind.
	Running bool
	// Kind is the running Sync's kind.
	Kind SyncKind
	// Done and Total are sectors of the current request.
	Done, Total uint64
}

// ErrEngineStopped is returned (wrapped) by an engine that was stopped.
var ErrEngineStopped = errors.New("array engine stopped")
