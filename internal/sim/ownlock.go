package sim

import (
	"bytes"
	"context"
	"fmt"
	"slices"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// spaceLocker is a dlm.Locker over one simulated node's dlm.Space, for code
// that blocks on lock calls (bitmap ownership's Driver) running as one of
// the node's coroutines. A call issues its operation to the Space at once,
// from within the simulation's step, and parks the coroutine until the
// Space's completion callback for it arrives (the simulation collects
// callbacks with the Space's Ready and hands them to ownSim.callback). A
// call made while the Space is stopped for recovery waits until it runs
// again, as the real lockspace's calls do.
type spaceLocker struct{ on *coHost }

// coHost is what a spaceLocker and its locks run on: one incarnation of a
// layer of blocking code on one node (an array's ownership driver, a
// broadcaster), with its coroutines, the locks it holds, and whether it is
// gone (its node crashed or was fenced: every call then fails at once).
type coHost struct {
	s     *Sim
	n     *Node
	tag   string      // trace prefix ("own", "bc")
	owner dlm.OwnerID // the Space owner of its locks
	epoch int         // the incarnation's number, in trace lines
	dead  bool
	// ops are the operations queued, run one at a time as coroutine cur.
	ops []ownOp
	cur *coro
	// prepared: RecoverPrepare delivered, RecoverDone not yet.
	// recovering: a view was installed, RecoverDone is due when the Space
	// runs again.
	prepared, recovering bool
	// running is the coroutine being stepped; side are coroutines run
	// besides the host's main ones (blocking callbacks, parallel tasks).
	running *coro
	side    []*coro
	handles []*simLock
	// releasing, if set, is called before an unlock or a conversion below
	// PW of one of its locks reaches the Space.
	releasing func(h *simLock)
}

// ownOwner and bcOwner are the Space owners of ownership and broadcast
// locks (the model's owners are 1 and 2).
const (
	ownOwner dlm.OwnerID = 3
	bcOwner  dlm.OwnerID = 4
)

// errGone is returned by every call of an array incarnation that is gone
// (its node crashed, was fenced, or rejoined clean).
var errGone = fmt.Errorf("array incarnation gone: %w", dlm.ErrReleased)

// LVBLen implements dlm.Locker.
func (l *spaceLocker) LVBLen() int { return l.on.s.cfg.LVBLen }

// Request implements dlm.Locker.
func (l *spaceLocker) Request(ctx context.Context, spec dlm.LockSpec) (dlm.LockHandle, error) {
	on := l.on
	n := l.LVBLen()
	if spec.LVB != nil && len(spec.LVB) != n {
		return nil, fmt.Errorf("lock %q: %w: LVB is %d bytes, lockspace uses %d", spec.Resource, dlm.ErrInvalid, len(spec.LVB), n)
	}
	if err := on.awaitRunning(); err != nil {
		return nil, fmt.Errorf("lock %q: %w", spec.Resource, err)
	}
	h := &simLock{on: on, res: spec.Resource, mode: dlm.ModeIV, onBlock: spec.OnBlock, op: "lock"}
	switch {
	case spec.LVB != nil:
		h.lvb = bytes.Clone(spec.LVB)
	case spec.Flags&dlm.ValBlk != 0:
		h.lvb = make([]byte, n)
	}
	err := on.n.Sp.Lock(&h.p, dlm.Request{Resource: spec.Resource, Mode: spec.Mode, Flags: spec.Flags, LVB: h.lvb,
		Owner: on.owner, Blocking: spec.OnBlock != nil, Tag: h})
	if err != nil {
		return nil, fmt.Errorf("lock %q: %w", spec.Resource, err)
	}
	h.pending = true
	on.handles = append(on.handles, h)
	on.s.tracef("%s %s: lock %q %v %v", on.tag, on.n.ID, spec.Resource, spec.Mode, spec.Flags)
	if err := h.await(); err != nil {
		return nil, err
	}
	return h, nil
}

// RequestAsync implements broadcast.AsyncLocker: the request is issued as
// Request issues it (waiting, like it, for a stopped Space to run), and
// done is called with its outcome from the simulation's delivery of the
// completion, outside any coroutine.
func (l *spaceLocker) RequestAsync(spec dlm.LockSpec, done func(error)) (dlm.LockHandle, error) {
	on := l.on
	n := l.LVBLen()
	if spec.LVB != nil && len(spec.LVB) != n {
		return nil, fmt.Errorf("lock %q: %w: LVB is %d bytes, lockspace uses %d", spec.Resource, dlm.ErrInvalid, len(spec.LVB), n)
	}
	if err := on.awaitRunning(); err != nil {
		return nil, fmt.Errorf("lock %q: %w", spec.Resource, err)
	}
	h := &simLock{on: on, res: spec.Resource, mode: dlm.ModeIV, onBlock: spec.OnBlock, op: "lock"}
	switch {
	case spec.LVB != nil:
		h.lvb = bytes.Clone(spec.LVB)
	case spec.Flags&dlm.ValBlk != 0:
		h.lvb = make([]byte, n)
	}
	if err := on.n.Sp.Lock(&h.p, dlm.Request{Resource: spec.Resource, Mode: spec.Mode, Flags: spec.Flags, LVB: h.lvb,
		Owner: on.owner, Blocking: spec.OnBlock != nil, Tag: h}); err != nil {
		return nil, fmt.Errorf("lock %q: %w", spec.Resource, err)
	}
	h.pending = true
	h.done = done
	on.handles = append(on.handles, h)
	on.s.tracef("%s %s: lock async %q %v %v", on.tag, on.n.ID, spec.Resource, spec.Mode, spec.Flags)
	return h, nil
}

// simLock is one lock taken through a spaceLocker; it implements
// dlm.LockHandle. p is the Space's record of the lock, which the
// simulation's invariants read to learn what the DLM granted.
type simLock struct {
	on      *coHost
	p       dlm.Proc
	res     string
	onBlock func(dlm.Mode)
	op      string // the operation pending or last completed

	mode      dlm.Mode
	sbf       dlm.StatusFlags
	lvb       []byte
	pending   bool
	unlocking bool
	gone      bool
	result    error
	// done, for a request made with RequestAsync, gets its outcome.
	done func(error)
}

// await parks the calling coroutine until the pending operation completes
// and returns its outcome.
func (h *simLock) await() error {
	if h.pending && !h.on.park(func() bool { return !h.pending }) {
		return errGone
	}
	return h.result
}

// complete applies the Space's completion callback for h.
func (h *simLock) complete(cb dlm.Callback) {
	h.mode, h.sbf, h.pending = cb.Mode, cb.Flags, false
	switch {
	case cb.Status == dlm.StatusOK, cb.Status == dlm.StatusUnlock && h.unlocking:
		h.result = nil
	default:
		h.result = fmt.Errorf("lock %q: %w", h.res, cb.Status)
	}
	h.unlocking = false
	if cb.Mode == dlm.ModeIV {
		h.gone = true
		h.on.handles = slices.DeleteFunc(h.on.handles, func(o *simLock) bool { return o == h })
	}
	if f := h.done; f != nil {
		h.done = nil
		f(h.result)
	}
}

// Resource implements dlm.LockHandle.
func (h *simLock) Resource() string { return h.res }

// Mode implements dlm.LockHandle.
func (h *simLock) Mode() dlm.Mode { return h.mode }

// StatusFlags implements dlm.LockHandle.
func (h *simLock) StatusFlags() dlm.StatusFlags { return h.sbf }

// LVB implements dlm.LockHandle.
func (h *simLock) LVB() []byte { return bytes.Clone(h.lvb) }

// SetLVB implements dlm.LockHandle. The buffer is the one the Space holds
// for the lock, so the next write from PW or EX carries it.
func (h *simLock) SetLVB(b []byte) error {
	if len(b) != h.on.s.cfg.LVBLen {
		return fmt.Errorf("lock %q: %w: LVB is %d bytes, lockspace uses %d", h.res, dlm.ErrInvalid, len(b), h.on.s.cfg.LVBLen)
	}
	switch {
	case h.gone:
		return fmt.Errorf("lock %q: %w: lock already released", h.res, dlm.ErrNotFound)
	case h.pending:
		return fmt.Errorf("lock %q: %w", h.res, dlm.ErrBusy)
	}
	if h.lvb == nil {
		h.lvb = make([]byte, len(b))
	}
	copy(h.lvb, b)
	return nil
}

// usable checks that an operation may start on h, waiting for the Space to
// run first.
func (h *simLock) usable(op string) error {
	if h.gone {
		return fmt.Errorf("%s %q: %w: lock already released", op, h.res, dlm.ErrNotFound)
	}
	if err := h.on.awaitRunning(); err != nil {
		return fmt.Errorf("%s %q: %w", op, h.res, err)
	}
	if h.gone { // released (the node rejoined clean) while waiting
		return fmt.Errorf("%s %q: %w: lock already released", op, h.res, dlm.ErrNotFound)
	}
	return nil
}

// Convert implements dlm.LockHandle.
func (h *simLock) Convert(_ context.Context, mode dlm.Mode, flags dlm.Flags) error {
	if err := h.usable("convert"); err != nil {
		return err
	}
	if h.pending {
		return fmt.Errorf("convert %q: %w", h.res, dlm.ErrBusy)
	}
	if flags&dlm.ValBlk != 0 && h.lvb == nil {
		h.lvb = make([]byte, h.on.s.cfg.LVBLen)
	}
	if mode < dlm.PW && h.on.releasing != nil {
		h.on.releasing(h)
	}
	if err := h.on.n.Sp.Convert(&h.p, mode, flags|dlm.Convert, h.lvb); err != nil {
		return fmt.Errorf("convert %q: %w", h.res, err)
	}
	h.pending, h.op = true, "convert"
	h.on.s.tracef("%s %s: convert %q %v->%v %v", h.on.tag, h.on.n.ID, h.res, h.mode, mode, flags)
	return h.await()
}

// Unlock implements dlm.LockHandle.
func (h *simLock) Unlock(_ context.Context, flags dlm.Flags) error {
	if flags&dlm.Cancel != 0 && flags&dlm.ForceUnlock == 0 {
		switch {
		case h.gone || !h.pending:
			return nil
		case h.on.dead:
			return errGone
		}
		// A stopped Space queues the cancel until its recovery ends.
		return h.on.n.Sp.Cancel(&h.p, dlm.StatusCancel)
	}
	if err := h.usable("unlock"); err != nil {
		return err
	}
	wasPending := h.pending
	if wasPending && flags&dlm.ForceUnlock == 0 {
		return fmt.Errorf("unlock %q: %w", h.res, dlm.ErrBusy)
	}
	if h.on.releasing != nil {
		h.on.releasing(h)
	}
	if !wasPending {
		h.unlocking = true
	}
	if err := h.on.n.Sp.Unlock(&h.p, flags, h.lvb); err != nil {
		h.unlocking = false
		return fmt.Errorf("unlock %q: %w", h.res, err)
	}
	h.on.s.tracef("%s %s: unlock %q %v", h.on.tag, h.on.n.ID, h.res, flags)
	if wasPending {
		// A force-unlock overtook the pending operation, whose waiter gets
		// ErrUnlocked; this call itself succeeded.
		return nil
	}
	h.pending, h.op = true, "unlock"
	return h.await()
}

// recoverer is the recovery side of the layer a coHost runs (an ownership
// driver, a broadcaster): the lockspace's recovery events.
type recoverer interface {
	RecoverPrepare(gen uint64)
	RecoverDeparted(gen uint64, nodes []dlm.NodeID)
	RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID)
}

// install delivers to r a view being installed on the host's node:
// RecoverPrepare (if the stop was not seen yet) and RecoverDeparted for the
// other nodes that departed, left or rejoined; RecoverDone is then due.
func (on *coHost) install(r recoverer, in membership.Install) {
	n := on.n
	if !on.prepared {
		on.prepared = true
		r.RecoverPrepare(n.Sp.Generation())
	}
	var gone []dlm.NodeID
	for _, id := range slices.Concat(in.Departed, in.Left, in.Rejoined) {
		if id != n.ID {
			gone = append(gone, dlm.NodeID(id))
		}
	}
	slices.Sort(gone)
	gone = slices.Compact(gone)
	if len(gone) > 0 {
		r.RecoverDeparted(in.View.Gen, gone)
	}
	on.recovering = true
}

// recover delivers to r the recovery events now due: RecoverPrepare once
// the node's Space has stopped, RecoverDone once it runs again after an
// installed view.
func (on *coHost) recover(r recoverer) {
	n := on.n
	if !on.prepared && n.Sp.Stopped() {
		on.prepared = true
		r.RecoverPrepare(n.Sp.Generation())
	}
	if on.recovering && !n.Sp.Stopped() {
		on.recovering, on.prepared = false, false
		r.RecoverDone(n.Sp.Generation(), n.Sp.Members(), dlm.NodeID(n.ID))
	}
}
