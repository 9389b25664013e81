// Package dlm is a distributed lock manager with the semantics of the VMS and
// Linux DLM: six lock modes, resources with grant, convert and wait queues,
// conversions, blocking callbacks and lock value blocks, spread over the
// nodes of a cluster and recovered when nodes fail. mdcluster uses it the way
// Linux md-cluster uses the kernel DLM; it is usable on its own.
//
// # The model
//
// A Node is this process's part of the lock manager. NewNode starts one
// from a Config; DefaultConfig is a cluster of one (node 1, no peers), in
// which every resource is mastered locally and no message is ever sent. With
// Config.Peers, ListenAddr and ClusterKey the node joins other nodes over
// authenticated TCP (package dlm/transport); every node of the cluster must
// list the others.
//
// A lockspace is a named set of resources shared by the nodes. Node.Open
// returns a Lockspace handle to it, creating it on first use; each handle
// is an owner of locks, like a process that opened a Linux lockspace, and
// Lockspace.Release drops the locks it owns. Every member of the view is a
// member of every lockspace, so every member must open a lockspace before
// locks in it are used: messages for a lockspace wait at a node until it
// opens it, and a lockspace's recovery into a view ends only when every
// member has opened it. A node that opens a lockspace after it recovered
// into the current view joins that view's recovery of it.
//
// A Lock is a handle to one lock on one resource (a name of up to 64 bytes)
// in a Mode: NL, CR, CW, PR, PW or EX, compatible as in Linux (NL with
// everything, EX with nothing but NL, PR with PR and CR, ...). Lockspace.Lock
// and Acquire wait for the grant; LockAsync returns at once and reports the
// outcome to a callback. Lock.Convert changes the mode, Lock.Unlock releases
// the lock, Lock.Cancel gives up a pending request or conversion. A failed
// request returns a nil *Lock.
//
// # Flags
//
// Flags modify a request as Linux's DLM_LKF_ flags do, with the same
// values: NoQueue fails at once with ErrAgain instead of waiting; ValBlk
// reads or writes the lock value block; IVValBlk invalidates it;
// Persistent keeps a granted lock (as an orphan) when its handle is
// released, and Orphan adopts such a lock; ConvDeadlk, NoDlckWt, QueCvt,
// HeadQue, Expedite, NoQueueBast, AltPR, AltCW and NoOrder tune conversions
// and queueing; ForceUnlock and Cancel modify an unlock.
//
// # Lock value blocks
//
// Each resource carries a lock value block (LVB) of the lockspace's length
// (OpenOptions.LVBLen, 64 bytes unless set). With ValBlk, a grant or an
// up-conversion reads the resource's value into the lock's block; a
// down-conversion or unlock from PW or EX writes the lock's block to the
// resource. Set the value to write with Lock.SetLVB or pass it with the
// request (LockRequest.LVB); read it with Lock.LVB. When the value cannot be
// trusted (never written, invalidated, or its writer died) a grant reports
// ValNotValid in Lock.StatusFlags.
//
// # Callbacks
//
// A lock requested with LockRequest.OnBlock is told, with the mode that is
// waiting, when it blocks another request: the hint to release or
// down-convert (Linux's blocking AST). Asynchronous completions, blocking
// callbacks and recovery events of one lockspace run on one callback
// goroutine per lockspace, one at a time, in the order the lock manager
// produced them; they may make locking calls but should not block for long.
//
// # Errors
//
// Errors are Status values wrapped with context: test them with errors.Is
// (ErrAgain, ErrTimeout, ErrCancel, ErrDeadlock, ErrBusy, ErrNotFound,
// ErrInvalid, ErrReleased, ...). A request ended by its context's deadline
// fails with an error matching both ErrTimeout and context.DeadlineExceeded;
// one ended by cancellation matches ErrCancel and context.Canceled.
//
// # Membership and recovery
//
// The members of a cluster change when nodes fail, leave or join. The
// membership layer (mdcluster/node) drives that through the node's
// Controller, kept apart from Node so that code that only takes locks cannot
// stop the cluster: Controller.Stop suspends every lockspace (lock calls
// wait, within their contexts), and Controller.Recover installs the agreed
// view and recovers the locks: those of departed nodes are purged, masters
// are re-elected, LVBs rebuilt. A node created with Config.Managed starts
// stopped, at generation 0, until the first view is installed.
//
// A lockspace handle opened with OpenOptions.Recovery receives that
// lockspace's recovery events, RecoverPrepare, RecoverDeparted and
// RecoverDone (see RecoveryHandler), on the callback goroutine in order with
// its locks' callbacks, as Linux md-cluster receives recover_prep,
// recover_slot and recover_done. Controller.OnRecovered tells the membership
// layer when each lockspace has recovered into a generation.
//
// Core and Space are the pure state machines under the API (no I/O,
// goroutines or clock): one lockspace on one node, and one node's part of a
// distributed lockspace. The simulator drives them directly. docs/dlm.md
// describes the design and the deliberate differences from Linux.
package dlm
