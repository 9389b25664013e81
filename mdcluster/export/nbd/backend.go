package nbd

import (
	"errors"
	"syscall"
)

// Backend is the block store an export serves: the RAID array in the daemon,
// a file or memory in tests and demos.
//
// The server calls a Backend from many goroutines at once (one per request
// in flight, on every connection to the export), so every method must be
// safe for concurrent use. Requests that overlap in range may run
// concurrently: NBD leaves the outcome of overlapping writes undefined, and
// so may the Backend, but it must not corrupt anything outside the ranges.
// The server checks every range against Size and the block size
// constraints before calling, and calls only the operations Capabilities
// enables, so implementations need not re-check either.
//
// Errors are reported to the client as NBD error numbers (see the package
// documentation for the mapping); return ErrNotFast, ErrShutdown or a
// syscall.Errno where the distinction matters to the client, anything else
// becomes EIO.
type Backend interface {
	// ReadAt reads len(p) bytes at off, with io.ReaderAt's contract. A
	// short read is an I/O error to the client.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. With FUA in flags it returns only once the
	// data is on stable storage, which lets a client make one write
	// durable without paying for a whole-device Flush.
	WriteAt(p []byte, off int64, flags IOFlags) error
	// Flush makes every write that has returned durable, on whichever
	// connection it came (NBD's FLUSH covers all replied writes).
	Flush() error
	// Trim tells the backend the range's contents are no longer needed. It
	// is a hint: the range may read back as anything afterwards. FUA in
	// flags asks for whatever the trim changed to be durable on return.
	Trim(off, n int64, flags IOFlags) error
	// WriteZeroes makes the range read back as zeroes. Without NoHole it
	// may deallocate the range (punch a hole); with NoHole it must keep the
	// range allocated, so later writes there cannot fail for lack of space.
	// With FastZero it must fail with ErrNotFast, changing nothing, if
	// zeroing would be no faster than writing zero-filled buffers: the
	// client (e.g. a copy tool) then knows to skip or write zeroes itself.
	WriteZeroes(off, n int64, flags IOFlags) error
	// Size is the export size in bytes. It must not change while the
	// export is served (NBD has no resize in the baseline protocol).
	Size() int64
	// Capabilities says which optional operations and guarantees the
	// backend offers; the server advertises exactly these to clients.
	Capabilities() Capabilities
}

// IOFlags modify a write-type Backend call. They mirror the NBD command
// flags the server passes through.
type IOFlags uint8

const (
	// FUA (force unit access): the call returns only after its effect is
	// on stable storage.
	FUA IOFlags = 1 << iota
	// NoHole (WriteZeroes only): zero the range but keep it allocated.
	NoHole
	// FastZero (WriteZeroes only): fail with ErrNotFast, changing nothing,
	// rather than fall back to writing zero buffers.
	FastZero
)

// Capabilities describes a Backend's optional features. The zero value is a
// read-write backend without a volatile cache, trim or efficient zeroing,
// safe for a single connection, with no block size constraints.
type Capabilities struct {
	// ReadOnly refuses writes, trims and zeroing (clients get EPERM). The
	// export's own ReadOnly setting can also impose it.
	ReadOnly bool
	// Flush says the backend has a volatile write cache that Flush and FUA
	// commit. Advertising it lets clients (the kernel in particular) send
	// FLUSH and FUA; a backend without a cache, whose writes are durable on
	// return, leaves it false.
	Flush bool
	// Trim enables Trim calls (NBD_CMD_TRIM, the kernel's discard).
	Trim bool
	// WriteZeroes enables WriteZeroes calls. Without it clients write
	// zero-filled buffers themselves.
	WriteZeroes bool
	// FastZero says WriteZeroes honours the FastZero flag. Ignored unless
	// WriteZeroes is set.
	FastZero bool
	// MultiConn says the backend has no per-connection cache: a Flush or
	// FUA write on one connection makes data written on every connection
	// durable and visible. Clients then use several connections in
	// parallel (nbdcopy uses four, the kernel one per socket).
	MultiConn bool
	// Rotational hints that the medium seeks, so clients may sort I/O.
	Rotational bool
	// MinBlockSize is the smallest unit requests must be aligned to (a
	// power of two, at most 64 KiB); 0 means 1, any byte offset.
	// PreferredBlockSize is the size below which writes cost a
	// read-modify-write (power of two, at least the minimum); 0 means 4096.
	// MaxPayload caps one read or write; 0 means the server's
	// Config.MaxPayload. All three are announced with NBD_INFO_BLOCK_SIZE.
	MinBlockSize, PreferredBlockSize, MaxPayload uint32
}

var (
	// ErrReadOnly reports a write to a read-only backend; clients get
	// EPERM. The server refuses writes to read-only exports itself, so a
	// backend returns it only if it became read-only while served.
	ErrReadOnly = errors.New("nbd: backend is read-only")
	// ErrNotFast is what WriteZeroes returns when asked for FastZero and
	// it cannot do better than writing zeroes; clients get ENOTSUP, which
	// is how NBD's FAST_ZERO says "do it yourself".
	ErrNotFast = errors.New("nbd: zeroing would not be faster than writing")
	// ErrShutdown reports that the backend is stopping (the array is being
	// stopped or lost quorum); clients get ESHUTDOWN, which tells them to
	// disconnect cleanly instead of retrying.
	ErrShutdown = errors.New("nbd: backend is shutting down")
)

// errnoOf maps a Backend error to an NBD error number. The set NBD clients
// understand is small; anything unrecognised is an I/O error.
func errnoOf(err error) uint32 {
	if err == nil {
		return errnoOK
	}
	switch {
	case errors.Is(err, ErrReadOnly):
		return errnoPerm
	case errors.Is(err, ErrNotFast):
		return errnoNotSup
	case errors.Is(err, ErrShutdown):
		return errnoShutdown
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		switch e {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return errnoPerm
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return errnoNoSpc
		case syscall.EINVAL:
			return errnoInval
		case syscall.ENOMEM:
			return errnoNoMem
		case syscall.EOVERFLOW:
			return errnoOverflow
		case syscall.EOPNOTSUPP:
			return errnoNotSup
		case syscall.ESHUTDOWN:
			return errnoShutdown
		}
	}
	return errnoIO
}
