package dlm

import (
	"context"
	"fmt"
)

// errNoLock is the error of a call on a zero or nil Lock: only the
// Lockspace's Lock, Acquire and LockAsync make usable ones.
var errNoLock = fmt.Errorf("%w: lock handle not from a Lockspace", ErrInvalid)

// valid reports whether lk came from a Lockspace (not nil, not a zero Lock).
func (lk *Lock) valid() bool { return lk != nil && lk.ls != nil }

// failure is the error a completion with status st (not StatusOK) gives:
// the status, and also the context error if a context's end cancelled the
// operation. The lock keeps only a flag for that, not the error: ctx.Err()
// is always context.Canceled or context.DeadlineExceeded, which the status
// tells apart, and an error field would push the handle into a larger
// allocation size class. Called with mu held.
func (lk *Lock) failure(st Status) error {
	if lk.byContext {
		switch st {
		case StatusTimeout:
			return fmt.Errorf("lock %q: %w", lk.resource, &ctxError{st: st, cause: context.DeadlineExceeded})
		case StatusCancel:
			return fmt.Errorf("lock %q: %w", lk.resource, &ctxError{st: st, cause: context.Canceled})
		}
	}
	return fmt.Errorf("lock %q: %w", lk.resource, st)
}

// ID returns the lock's ID on this node: the ID Lockspace.Dump shows for
// it, on this node and (with this node's ID as LockInfo.Node) on its
// master. It is set when the request starts and stays until the lock is
// released; 0 for a zero or nil Lock.
func (lk *Lock) ID() LockID {
	if !lk.valid() {
		return 0
	}
	return LockID(lk.proc.id)
}

// Resource returns the name of the locked resource ("" for a zero or nil
// Lock).
func (lk *Lock) Resource() string {
	if lk == nil {
		return ""
	}
	return lk.resource
}

// Mode returns the granted mode (ModeIV once the lock is released, if it
// was never granted, or for a zero or nil Lock).
func (lk *Lock) Mode() Mode {
	if !lk.valid() {
		return ModeIV
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return lk.mode
}

// StatusFlags returns the status-block flags of the latest completed
// operation: Demoted, ValNotValid, AltMode (none for a zero or nil Lock).
func (lk *Lock) StatusFlags() StatusFlags {
	if !lk.valid() {
		return 0
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return lk.sbflags
}

// LVB returns a copy of the lock's value block as last read (on a grant with
// ValBlk) or set (SetLVB); nil if the lock never used one. Check
// StatusFlags for ValNotValid before trusting it.
func (lk *Lock) LVB() []byte {
	if !lk.valid() {
		return nil
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if lk.lvb == nil {
		return nil
	}
	return append([]byte(nil), lk.lvb...)
}

// LVBSeq returns the sequence number of the value in the lock's LVB: the
// resource's count of LVB writes when the value was read or written.
func (lk *Lock) LVBSeq() uint32 {
	if !lk.valid() {
		return 0
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return lk.lvbseq
}

// SetLVB sets the value the next down-conversion or unlock from PW or EX with
// ValBlk writes to the resource. b must be exactly the lockspace's LVB length.
func (lk *Lock) SetLVB(b []byte) error {
	if !lk.valid() {
		return fmt.Errorf("set LVB: %w", errNoLock)
	}
	sp := lk.ls.sp
	if len(b) != sp.sp.LVBLen() {
		return fmt.Errorf("lock %q: %w: LVB is %d bytes, lockspace uses %d", lk.resource, ErrInvalid, len(b), sp.sp.LVBLen())
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if lk.gone {
		return fmt.Errorf("lock %q: %w: lock already released", lk.resource, ErrNotFound)
	}
	if lk.pending {
		return fmt.Errorf("lock %q: %w", lk.resource, ErrBusy)
	}
	if lk.lvb == nil {
		lk.lvb = make([]byte, len(b))
	}
	copy(lk.lvb, b)
	return nil
}

// usable checks that an operation may start on lk. Called with mu held.
func (lk *Lock) usable(op string) error {
	if lk.ls.released.Load() {
		return fmt.Errorf("%s %q: %w", op, lk.resource, ErrReleased)
	}
	if lk.gone {
		return fmt.Errorf("%s %q: %w: lock already released", op, lk.resource, ErrNotFound)
	}
	return nil
}

// Convert changes the lock's mode and waits for the outcome: nil when
// granted; ErrAgain (NoQueue), ErrDeadlock (conversion deadlock: the lock
// keeps its mode), ErrCancel or ErrTimeout (cancelled; the lock keeps its
// mode; when ctx ended it, the error also matches ctx's error). Converting
// a lock with an operation pending fails with ErrBusy.
func (lk *Lock) Convert(ctx context.Context, mode Mode, flags Flags) error {
	wait, err := lk.startConvert(ctx, mode, flags, nil)
	if err != nil || !wait {
		return err // done already: its outcome, read under the lockspace's mutex
	}
	return lk.awaitDone(ctx)
}

// ConvertAsync starts a conversion; done is called once with its outcome on
// the lockspace's callback goroutine, unless ConvertAsync itself returns an
// error.
func (lk *Lock) ConvertAsync(ctx context.Context, mode Mode, flags Flags, done func(*Lock, error)) error {
	if !lk.valid() {
		return fmt.Errorf("convert: %w", errNoLock)
	}
	if done == nil {
		return fmt.Errorf("convert %q: %w: nil completion callback", lk.resource, ErrInvalid)
	}
	_, err := lk.startConvert(ctx, mode, flags, done)
	return err
}

// startConvert starts a conversion; for a synchronous one (done == nil) it
// also readies the wait, and wait says whether there is one (else err is
// the outcome, read under the lockspace's mutex).
func (lk *Lock) startConvert(ctx context.Context, mode Mode, flags Flags, done func(*Lock, error)) (wait bool, err error) {
	if !lk.valid() {
		return false, fmt.Errorf("convert: %w", errNoLock)
	}
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("convert %q: %w", lk.resource, ctxErr(err))
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if err := sp.awaitResume(ctx, "convert", lk.resource); err != nil {
		return false, err
	}
	if err := lk.usable("convert"); err != nil {
		return false, err
	}
	allocated := false
	if flags&ValBlk != 0 && lk.lvb == nil {
		lk.lvb = make([]byte, sp.sp.LVBLen())
		allocated = true
	}
	if err := sp.sp.Convert(&lk.proc, mode, flags|Convert, lk.lvb); err != nil {
		if allocated {
			lk.lvb = nil
		}
		return false, err
	}
	lk.pending = true
	lk.done = done
	lk.op++
	sp.flush()
	if lk.pending {
		lk.ls.track(ctx, lk)
	}
	if done == nil {
		if lk.prepareWait(ctx) {
			return true, nil
		}
		// Completed at once: hand back its outcome now, while mu is held
		// (recovery may write lk.result again as soon as it is released).
		return false, lk.result
	}
	return false, nil
}

// Unlock releases the lock. flags may hold ValBlk or IVValBlk (the LVB rules
// for a PW/EX holder), ForceUnlock (release even while a request or
// conversion is pending; that operation then ends with ErrUnlocked) and
// Cancel (same as Cancel). Unlocking twice fails with ErrNotFound.
func (lk *Lock) Unlock(ctx context.Context, flags Flags) error {
	return lk.startUnlock(ctx, flags, nil)
}

// UnlockAsync is Unlock with the outcome handed to done on the callback
// goroutine (nil on success).
func (lk *Lock) UnlockAsync(ctx context.Context, flags Flags, done func(*Lock, error)) error {
	if !lk.valid() {
		return fmt.Errorf("unlock: %w", errNoLock)
	}
	if done == nil {
		return fmt.Errorf("unlock %q: %w: nil completion callback", lk.resource, ErrInvalid)
	}
	return lk.startUnlock(ctx, flags, done)
}

func (lk *Lock) startUnlock(ctx context.Context, flags Flags, done func(*Lock, error)) error {
	if !lk.valid() {
		return fmt.Errorf("unlock: %w", errNoLock)
	}
	if flags&Cancel != 0 && flags&ForceUnlock == 0 {
		if err := lk.Cancel(); err != nil {
			return err
		}
		if done != nil {
			sp := lk.ls.sp
			sp.mu.Lock()
			sp.enqueue(event{lk: lk, kind: Completion, done: done})
			sp.mu.Unlock()
		}
		return nil
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	if err := sp.awaitResume(ctx, "unlock", lk.resource); err != nil {
		sp.mu.Unlock()
		return err
	}
	if err := lk.usable("unlock"); err != nil {
		sp.mu.Unlock()
		return err
	}
	wasPending := lk.pending
	if !wasPending {
		lk.pending, lk.unlocking, lk.done = true, true, done
		lk.op++
	}
	if err := sp.sp.Unlock(&lk.proc, flags, lk.lvb); err != nil {
		if !wasPending {
			lk.pending, lk.unlocking, lk.done = false, false, nil
		}
		sp.mu.Unlock()
		return err
	}
	sp.flush()
	if wasPending {
		// A force-unlock overtook the pending operation, which ended with
		// ErrUnlocked; this call itself succeeded.
		if done != nil {
			sp.enqueue(event{lk: lk, kind: Completion, done: done})
		}
		sp.mu.Unlock()
		return nil
	}
	if lk.pending {
		lk.ls.track(ctx, lk)
	}
	if done != nil {
		sp.mu.Unlock()
		return nil
	}
	if !lk.prepareWait(ctx) {
		err := lk.result
		sp.mu.Unlock()
		return err
	}
	sp.mu.Unlock()
	return lk.awaitDone(ctx)
}

// Cancel cancels the lock's pending request or conversion, which then ends
// with ErrCancel (a cancelled conversion leaves the lock in its granted mode).
// With nothing pending it does nothing and returns nil.
func (lk *Lock) Cancel() error {
	if !lk.valid() {
		return fmt.Errorf("cancel: %w", errNoLock)
	}
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if err := lk.usable("cancel"); err != nil {
		return err
	}
	if !lk.pending {
		return nil
	}
	if err := sp.sp.Cancel(&lk.proc, StatusCancel); err != nil {
		return err
	}
	sp.flush()
	return nil
}

// Release closes the handle: its locks are released, except those whose
// latest request carried Persistent, which stay granted as orphans for a
// later request with Orphan to adopt. Operations still pending end with
// ErrReleased. Every later call on the handle or its locks fails with
// ErrReleased.
func (ls *Lockspace) Release() error {
	if ls == nil || ls.sp == nil {
		return fmt.Errorf("release: %w", errNoLockspace)
	}
	if !ls.released.CompareAndSwap(false, true) {
		return fmt.Errorf("release lockspace %q: %w", ls.sp.name, ErrReleased)
	}
	sp := ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	orphaned, released := sp.sp.PurgeOwner(ls.owner)
	sp.flush()
	for lk := ls.pending; lk != nil; {
		next := lk.nextPending
		lk.prevPending, lk.nextPending = nil, nil
		lk.pending, lk.gone, lk.inflight = false, true, false
		lk.result = fmt.Errorf("lock %q: %w", lk.resource, ErrReleased)
		if lk.stopAfter != nil {
			lk.stopAfter()
			lk.stopAfter = nil
		}
		switch {
		case lk.waiter:
			lk.waiter = false
			lk.waitW.Wake()
		case lk.done != nil:
			sp.enqueue(event{lk: lk, kind: Completion, err: lk.result, done: lk.done})
			lk.done = nil
		}
		lk = next
	}
	ls.pending = nil
	delete(sp.open, ls)
	sp.handles--
	if sp.handles == 0 {
		sp.stopDispatcher()
	}
	sp.removeHandler(ls)
	sp.log.Debug("lockspace handle released", "owner", ls.owner, "orphaned", orphaned, "released", released)
	return nil
}

// Dump describes the lockspace as this node sees it, in the spirit of
// dlm_tool lockdebug, sorted by name: each resource mastered here with its
// queues (modes, owning node and owner) and LVB with its sequence,
// including the idle ones the master keeps cached with no locks (Idle;
// their LVB survives for the next user), then each resource mastered
// elsewhere on which this node holds locks. A lock's LockInfo.ID is the ID
// its own node (LockInfo.Node) gives it, the one its Lock.ID returns
// there. Nil for a zero or nil Lockspace.
func (ls *Lockspace) Dump() []ResourceInfo {
	if ls == nil || ls.sp == nil {
		return nil
	}
	sp := ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.sp.Dump()
}
