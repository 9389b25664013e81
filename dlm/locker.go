package dlm

import (
	"context"
)

// Locker is the small lock interface that the lock users above the DLM
// (bitmap slot ownership, the configuration broadcast) are written against,
// so the same code runs over the real lockspace (*Lockspace, goroutines and
// TCP) and over the deterministic simulator's adapter around a Space (one
// goroutine, a seeded scheduler). It holds exactly what md-cluster asks of
// the kernel DLM: blocking requests with NOQUEUE and VALBLK, an initial value
// block, conversions, unlocks with flags, the value block and its status
// flags, the granted mode, and blocking callbacks.
//
// Recovery events are the other half of the contract: a lock user that must
// act when nodes depart implements RecoveryHandler, and whoever builds the
// Locker delivers that lockspace's events to it (the simulator's adapter
// does; the real lockspace takes the handler when it is opened). They are
// not a method here because the handler belongs to the lockspace handle, not
// to each call.
//
// Calls block until their outcome is known; errors wrap the Status values
// (test with errors.Is, e.g. ErrAgain for a refused NOQUEUE request).
type Locker interface {
	// LVBLen is the value block length of every lock of the lockspace.
	LVBLen() int
	// Request asks for a new lock and waits until it is granted (nil
	// error), refused (ErrAgain with NoQueue) or ctx ends. On error no lock
	// is held and the handle is nil.
	Request(ctx context.Context, spec LockSpec) (LockHandle, error)
}

// LockSpec is a request for a new lock through a Locker.
type LockSpec struct {
	// Resource names the lock (at most MaxResourceName bytes).
	Resource string
	// Mode is the requested mode.
	Mode Mode
	// Flags are request flags: NoQueue, ValBlk, and the other request
	// flags the DLM accepts.
	Flags Flags
	// LVB, when set, is the initial content of the lock's value block
	// (exactly LVBLen bytes), as the buffer a Linux caller hands over in
	// its lock status block: with ValBlk the grant reads the resource's
	// value into the block, replacing it; without ValBlk the block keeps
	// it, and a later Convert or Unlock with ValBlk from PW or EX writes it
	// to the resource. Nil means a zeroed block with ValBlk, none without.
	LVB []byte
	// OnBlock, when set, is called with the blocked mode each time this
	// lock blocks another request (md-cluster's ack_bast). It runs on the
	// lockspace's callback context, not the caller's: it may start lock
	// calls of its own but must not wait long.
	OnBlock func(blocked Mode)
}

// LockHandle is one lock taken through a Locker. Its accessors report the
// state as of its last completed operation. *Lock implements it.
type LockHandle interface {
	// Resource returns the locked resource's name.
	Resource() string
	// Mode returns the granted mode (ModeIV once released or lost, e.g.
	// when the node rejoined the cluster clean).
	Mode() Mode
	// StatusFlags returns the status flags of the last completed operation;
	// ValNotValid says the value block read is not to be trusted (its last
	// PW or EX holder died or invalidated it).
	StatusFlags() StatusFlags
	// LVB returns a copy of the lock's value block as last read or set.
	LVB() []byte
	// SetLVB sets the value the next Convert or Unlock with ValBlk from PW
	// or EX writes to the resource. b must be LVBLen bytes.
	SetLVB(b []byte) error
	// Convert changes the lock's mode and waits for the outcome; on error
	// the lock keeps its mode (see Lock.Convert).
	Convert(ctx context.Context, mode Mode, flags Flags) error
	// Unlock releases the lock; flags may hold ValBlk or IVValBlk (the LVB
	// rules for a PW or EX holder), ForceUnlock and Cancel.
	Unlock(ctx context.Context, flags Flags) error
}

// The real lockspace and its locks implement the interface.
var (
	_ Locker     = (*Lockspace)(nil)
	_ LockHandle = (*Lock)(nil)
)

// Request implements Locker for the real lockspace: Acquire, with the
// blocking callback adapted to the handle-free form and the initial value
// block passed as LockRequest.LVB.
func (ls *Lockspace) Request(ctx context.Context, spec LockSpec) (LockHandle, error) {
	req := LockRequest{Resource: spec.Resource, Mode: spec.Mode, Flags: spec.Flags, LVB: spec.LVB}
	if f := spec.OnBlock; f != nil {
		req.OnBlock = func(_ *Lock, blocked Mode) { f(blocked) }
	}
	lk, err := ls.Acquire(ctx, req)
	if err != nil {
		return nil, err // never a typed nil: callers compare handles with nil
	}
	return lk, nil
}
