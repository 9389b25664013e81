package nbd

import (
	"fmt"
	"io"
	"syscall"
)

// ReadWriterAt adapts a Backend to io.ReaderAt and io.WriterAt, so Go code
// in the same process (a format or check tool, a test) can use an export's
// backend with the standard library, e.g. io.NewSectionReader(rw, 0,
// b.Size()) or io.Copy into an io.NewOffsetWriter(rw, 0), without going
// through a socket.
type ReadWriterAt struct {
	// Backend is the device read and written.
	Backend Backend
	// Flags are passed to every WriteAt call; FUA makes each write durable
	// on return, which io.WriterAt callers cannot ask for any other way.
	Flags IOFlags
}

// NewReadWriterAt returns an adapter over b with no write flags.
func NewReadWriterAt(b Backend) *ReadWriterAt { return &ReadWriterAt{Backend: b} }

// ReadAt implements io.ReaderAt: a read that reaches the end of the device
// returns the bytes before the end and io.EOF, as for a file.
func (a *ReadWriterAt) ReadAt(p []byte, off int64) (int, error) {
	size := a.Backend.Size()
	if off < 0 {
		return 0, fmt.Errorf("nbd: read at negative offset %d: %w", off, syscall.EINVAL)
	}
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		want = p[:size-off]
	}
	n, err := a.Backend.ReadAt(want, off)
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// WriteAt implements io.WriterAt. Unlike a regular file a device cannot
// grow: a write that would run past the end writes nothing and fails with
// an error wrapping syscall.ENOSPC.
func (a *ReadWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange("write", off, int64(len(p)), a.Backend.Size(), true); err != nil {
		return 0, err
	}
	if err := a.Backend.WriteAt(p, off, a.Flags); err != nil {
		return 0, err
	}
	return len(p), nil
}
