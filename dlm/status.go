package dlm

import (
	"context"
	"errors"
)

// Status is the outcome of a lock operation, the sb_status of Linux's lock
// status block. A Status other than StatusOK is also an error: the package's Err
// variables are Status values, so errors.Is(err, dlm.ErrAgain) works on errors
// returned or wrapped by this package.
type Status uint8

const (
	// StatusOK: the request or conversion was granted.
	StatusOK Status = iota
	// StatusAgain (EAGAIN): a NoQueue request could not be granted at once.
	StatusAgain
	// StatusDeadlock (EDEADLK): the conversion would have deadlocked with
	// another conversion and was cancelled; the lock keeps its granted mode.
	StatusDeadlock
	// StatusCancel (DLM_ECANCEL): the request or conversion was cancelled.
	StatusCancel
	// StatusUnlock (DLM_EUNLOCK): the lock was released. For Unlock this is
	// success; for a pending request it means a force-unlock overtook it.
	StatusUnlock
	// StatusTimeout (ETIMEDOUT): the request's deadline passed while it waited.
	StatusTimeout
	// StatusBusy (EBUSY): another operation on the lock is still in progress,
	// e.g. converting or unlocking a lock that is waiting or converting.
	StatusBusy
	// StatusInvalid (EINVAL): the arguments are invalid; nothing changed.
	StatusInvalid
	// StatusNotFound (ENOENT): no such lock (already unlocked, or never
	// existed), or no orphan to adopt.
	StatusNotFound
	// StatusReleased: the lockspace handle was released, or the node
	// rejoined the cluster from an older generation and its locks were
	// dropped.
	StatusReleased
	// StatusStopped: the lockspace is stopped for a membership change;
	// retry once recovery is over.
	StatusStopped
	// StatusNoMem (ENOMEM, as Linux's dlm_lock returns when it cannot
	// allocate): a resource limit of the master or directory node was
	// reached: this node already holds as many remote locks there
	// (SpaceConfig.MaxPeerLocks) or masters as many resources recorded
	// there (MaxPeerDirEntries) as it allows. Nothing was granted; retry
	// after releasing locks.
	StatusNoMem
)

// The errors below are the Status values as errors. Functions of this package
// return them wrapped with context; test with errors.Is. A request that its
// context ended fails with an error that matches both ErrTimeout (deadline)
// or ErrCancel (cancellation) and the context's error, so
// errors.Is(err, context.DeadlineExceeded) and errors.Is(err,
// context.Canceled) work too.
var (
	ErrAgain    error = StatusAgain
	ErrDeadlock error = StatusDeadlock
	ErrCancel   error = StatusCancel
	ErrUnlocked error = StatusUnlock
	ErrTimeout  error = StatusTimeout
	ErrBusy     error = StatusBusy
	ErrInvalid  error = StatusInvalid
	ErrNotFound error = StatusNotFound
	ErrReleased error = StatusReleased
	ErrStopped  error = StatusStopped
	ErrNoMem    error = StatusNoMem
)

var statusText = [...]string{
	StatusOK:       "granted",
	StatusAgain:    "dlm: request would block (EAGAIN)",
	StatusDeadlock: "dlm: conversion deadlock (EDEADLK)",
	StatusCancel:   "dlm: request cancelled (ECANCEL)",
	StatusUnlock:   "dlm: lock released (EUNLOCK)",
	StatusTimeout:  "dlm: request timed out (ETIMEDOUT)",
	StatusBusy:     "dlm: operation in progress on the lock (EBUSY)",
	StatusInvalid:  "dlm: invalid argument (EINVAL)",
	StatusNotFound: "dlm: no such lock (ENOENT)",
	StatusReleased: "dlm: lockspace released",
	StatusStopped:  "dlm: lockspace stopped for recovery",
	StatusNoMem:    "dlm: a resource limit of a remote node was reached (ENOMEM)",
}

// Error returns a short description naming the Linux errno.
func (s Status) Error() string {
	if int(s) < len(statusText) {
		return statusText[s]
	}
	return "dlm: unknown status"
}

// String is Error; StatusOK prints as "granted".
func (s Status) String() string { return s.Error() }

// Err returns nil for StatusOK and s otherwise, so a completion's status can be
// returned as an error directly. It knows nothing of contexts: the Lockspace
// API, which does, returns errors that match the context's error as well.
func (s Status) Err() error {
	if s == StatusOK {
		return nil
	}
	return s
}

// ctxError is how a request ended by its context fails: it is both the DLM
// status (ErrTimeout for a deadline, ErrCancel otherwise) and the context's
// own error, so that errors.Is(err, dlm.ErrTimeout) and
// errors.Is(err, context.DeadlineExceeded) both hold. Callers that think in
// DLM terms and callers that think in context terms both get their answer.
// It is built only on the error path.
type ctxError struct {
	st    Status
	cause error // ctx.Err() (or its cause), never nil
}

func (e *ctxError) Error() string { return e.st.Error() + ": " + e.cause.Error() }

// Unwrap exposes both the status and the context error to errors.Is/As.
func (e *ctxError) Unwrap() []error { return []error{e.st, e.cause} }

// ctxStatus maps a context's error to the status a request it ended
// completes with: StatusTimeout for a deadline, StatusCancel otherwise.
func ctxStatus(err error) Status {
	if errors.Is(err, context.DeadlineExceeded) {
		return StatusTimeout
	}
	return StatusCancel
}

// ctxErr returns the error of a request ended by a context whose Err is
// err: the matching status wrapped together with err.
func ctxErr(err error) error {
	if err == nil {
		err = context.Canceled
	}
	return &ctxError{st: ctxStatus(err), cause: err}
}
