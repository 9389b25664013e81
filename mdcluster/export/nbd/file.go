package nbd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"
)

// zeroChunk is the most FileBackend writes at once when it has to write
// zeroes itself.
const zeroChunk = 1 << 20

var zeroes = make([]byte, zeroChunk) // never written

// FileBackend is a Backend over a regular file or a block device, for
// tests, demos and single-node use.
//
// Writes go through the page cache, so it advertises Flush: FLUSH is
// fdatasync, and a FUA write goes through a second descriptor opened with
// O_DSYNC, which makes just that write durable. Trim punches a hole
// (fallocate), and falls back to writing zeroes where the file system
// cannot; WriteZeroes punches a hole, or with NoHole zeroes the range in
// place (FALLOC_FL_ZERO_RANGE), and only writes zero buffers when neither
// works and FastZero was not asked for. One descriptor serves every
// connection, so it is multi-connection safe.
type FileBackend struct {
	f, dsync *os.File
	path     string
	size     int64
	readOnly bool
	// Set once the file system has refused a fallocate mode, so it is not
	// asked again for every request.
	noPunch, noZeroRange atomic.Bool
}

// OpenFile opens path (a regular file or a block device) as a backend. Its
// size is the file's size when opened; create and size regular files
// beforehand (os.Truncate). readOnly opens it read-only and advertises so.
func OpenFile(path string, readOnly bool) (*FileBackend, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd file backend: %w", err)
	}
	// Seeking to the end gives the size of block devices too, where
	// Stat reports 0.
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("nbd file backend: size of %s: %w", path, err)
	}
	b := &FileBackend{f: f, path: path, size: size, readOnly: readOnly}
	if !readOnly {
		if b.dsync, err = os.OpenFile(path, os.O_WRONLY|dsyncFlag, 0); err != nil {
			f.Close()
			return nil, fmt.Errorf("nbd file backend: opening %s for FUA writes: %w", path, err)
		}
	}
	return b, nil
}

// Close closes the file. The server must no longer be serving it.
func (b *FileBackend) Close() error {
	err := b.f.Close()
	if b.dsync != nil {
		err = errors.Join(err, b.dsync.Close())
	}
	if err != nil {
		return fmt.Errorf("nbd file backend: closing %s: %w", b.path, err)
	}
	return nil
}

// ReadAt implements Backend (and io.ReaderAt: a read running past the end
// returns what there is and io.EOF itself, unwrapped).
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.f.ReadAt(p, off)
	switch {
	case err == nil || n == len(p):
		return n, nil
	case err == io.EOF:
		return n, io.EOF
	}
	return n, fmt.Errorf("nbd file backend: read %d bytes at %d: %w", len(p), off, err)
}

// WriteAt implements Backend.
func (b *FileBackend) WriteAt(p []byte, off int64, flags IOFlags) error {
	if b.readOnly {
		return ErrReadOnly
	}
	if err := checkRange("write", off, int64(len(p)), b.size, true); err != nil {
		return err
	}
	f := b.f
	if flags&FUA != 0 {
		f = b.dsync
	}
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("nbd file backend: write %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// Flush implements Backend with fdatasync.
func (b *FileBackend) Flush() error {
	if err := datasync(b.f); err != nil {
		return fmt.Errorf("nbd file backend: fdatasync %s: %w", b.path, err)
	}
	return nil
}

// Trim implements Backend: it punches a hole, or writes zeroes where holes
// are not supported.
func (b *FileBackend) Trim(off, n int64, flags IOFlags) error {
	if b.readOnly {
		return ErrReadOnly
	}
	if err := checkRange("trim", off, n, b.size, false); err != nil {
		return err
	}
	if err := b.punch(off, n); err != nil {
		if !errors.Is(err, errors.ErrUnsupported) {
			return err
		}
		if err := b.writeZeroes(off, n); err != nil {
			return err
		}
	}
	return b.fuaSync(flags)
}

// WriteZeroes implements Backend.
func (b *FileBackend) WriteZeroes(off, n int64, flags IOFlags) error {
	if b.readOnly {
		return ErrReadOnly
	}
	if err := checkRange("write zeroes", off, n, b.size, true); err != nil {
		return err
	}
	err := errors.ErrUnsupported
	if flags&NoHole == 0 {
		err = b.punch(off, n)
	}
	if errors.Is(err, errors.ErrUnsupported) && !b.noZeroRange.Load() {
		if err = zeroRange(b.f, off, n); isUnsupported(err) {
			b.noZeroRange.Store(true)
			err = errors.ErrUnsupported
		} else if err != nil {
			err = fmt.Errorf("nbd file backend: zero range %d+%d: %w", off, n, err)
		}
	}
	if errors.Is(err, errors.ErrUnsupported) {
		if flags&FastZero != 0 {
			return ErrNotFast
		}
		err = b.writeZeroes(off, n)
	}
	if err != nil {
		return err
	}
	return b.fuaSync(flags)
}

// punch punches a hole, returning errors.ErrUnsupported if the file system
// cannot.
func (b *FileBackend) punch(off, n int64) error {
	if b.noPunch.Load() {
		return errors.ErrUnsupported
	}
	err := punchHole(b.f, off, n)
	if isUnsupported(err) {
		b.noPunch.Store(true)
		return errors.ErrUnsupported
	}
	if err != nil {
		return fmt.Errorf("nbd file backend: punch hole %d+%d: %w", off, n, err)
	}
	return nil
}

func isUnsupported(err error) bool {
	return errors.Is(err, errors.ErrUnsupported) || errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS)
}

// writeZeroes writes zero buffers over the range.
func (b *FileBackend) writeZeroes(off, n int64) error {
	for n > 0 {
		c := min(n, zeroChunk)
		if _, err := b.f.WriteAt(zeroes[:c], off); err != nil {
			return fmt.Errorf("nbd file backend: write zeroes at %d: %w", off, err)
		}
		off += c
		n -= c
	}
	return nil
}

// fuaSync makes a trim or zeroing durable when FUA asks for it.
func (b *FileBackend) fuaSync(flags IOFlags) error {
	if flags&FUA == 0 {
		return nil
	}
	return b.Flush()
}

// Size implements Backend.
func (b *FileBackend) Size() int64 { return b.size }

// Capabilities implements Backend.
func (b *FileBackend) Capabilities() Capabilities {
	return Capabilities{
		ReadOnly: b.readOnly, Flush: true, Trim: true, WriteZeroes: true,
		FastZero: true, MultiConn: true,
	}
}
