package dlm

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
)

// The errors below are the Status values as errors. Functions of this package
// return them wrapped with context; test with errors.Is.
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
// returned as an error directly.
func (s Status) Err() error {
	if s == StatusOK {
		return nil
	}
	return s
}
