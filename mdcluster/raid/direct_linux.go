//go:build linux

package raid

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirectFile is a Device over a regular file, a loop device or a block
// device, opened with O_DIRECT as md does its member I/O: reads and writes
// bypass the page cache, so a write that returned is in the device (its
// volatile cache at worst, which Sync flushes) and another node reading
// the shared disk sees it.
//
// Size comes from BLKGETSIZE64 for block devices and the file size for
// files; the logical block size from BLKSSZGET, or for files from statx's
// direct-I/O offset alignment (4096 when the kernel does not say). FUA
// writes use pwritev2 with RWF_DSYNC, which the block layer turns into a
// FUA write (or a write plus flush where the device has no FUA); on
// kernels without it, WriteAtFUA falls back to a write and fdatasync.
//
// The engine does not call WriteAt for its data writes to a DirectFile
// where it can help it: it submits every member's write of a request at
// once with Linux native AIO on the descriptor (see writeCopies), and
// comes back to WriteAt for a write AIO refuses or cuts short.
type DirectFile struct {
	fd     int
	path   string
	size   int64
	bs     int
	closed atomic.Bool
	// noRWF is set once pwritev2(RWF_DSYNC) was refused, so the fallback
	// is used from then on without asking again.
	noRWF atomic.Bool
	// noAIO is set once native AIO refused a write (EINVAL: the file
	// system cannot do asynchronous direct I/O); the engine then writes
	// with pwrite.
	noAIO atomic.Bool
}

// OpenDirect opens path read-write with O_DIRECT. File systems without
// direct I/O (tmpfs before Linux 6.6, for one) refuse it; the error says so.
func OpenDirect(path string) (*DirectFile, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open %s with O_DIRECT: %w (the file system does not support direct I/O, e.g. tmpfs before Linux 6.6)", path, err)
		}
		return nil, fmt.Errorf("open %s with O_DIRECT: %w", path, err)
	}
	d := &DirectFile{fd: fd, path: path}
	if err := d.probe(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return d, nil
}

// probe reads the size and the logical block size.
func (d *DirectFile) probe() error {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", d.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		var size uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(d.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
			return fmt.Errorf("%s: BLKGETSIZE64: %w", d.path, e)
		}
		bs, err := unix.IoctlGetInt(d.fd, unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("%s: BLKSSZGET: %w", d.path, err)
		}
		d.size, d.bs = int64(size), bs
	case unix.S_IFREG:
		d.size, d.bs = st.Size, Alignment
		var sx unix.Statx_t
		if err := unix.Statx(d.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &sx); err == nil &&
			sx.Mask&unix.STATX_DIOALIGN != 0 && sx.Dio_offset_align != 0 {
			d.bs = int(sx.Dio_offset_align)
		}
	default:
		return fmt.Errorf("%s: not a regular file or block device (mode %#o)", d.path, st.Mode)
	}
	if d.bs < 512 || d.bs > Alignment || d.bs&(d.bs-1) != 0 {
		return fmt.Errorf("%s: logical block size %d not supported (512..%d, a power of two)", d.path, d.bs, Alignment)
	}
	return nil
}

// Path returns the path the device was opened with.
func (d *DirectFile) Path() string { return d.path }

// Size returns the device size in bytes, as of opening.
func (d *DirectFile) Size() int64 { return d.size }

// BlockSize returns the logical block size.
func (d *DirectFile) BlockSize() int { return d.bs }

// direct reports whether I/O of p at off can go to the device as it is.
func (d *DirectFile) direct(p []byte, off int64) bool {
	m := int64(d.bs - 1)
	return isAligned(p) && off&m == 0 && int64(len(p))&m == 0
}

// ReadAt reads len(p) bytes at off. Unaligned requests are served through
// an aligned bounce buffer covering the surrounding blocks.
func (d *DirectFile) ReadAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, fmt.Errorf("read %s: %w", d.path, ErrClosed)
	}
	if d.direct(p, off) {
		return d.pread(p, off)
	}
	lo, hi := d.blocks(off, int64(len(p)))
	b := alignedBuf(int(hi - lo))
	n, err := d.pread(b, lo)
	got := max(0, min(int64(n)-(off-lo), int64(len(p))))
	copy(p, b[off-lo:off-lo+got])
	if err == nil && got < int64(len(p)) {
		err = io.ErrUnexpectedEOF
	}
	return int(got), err
}

// WriteAt writes p at off. Unaligned requests read the partial blocks at
// either end, merge and write them back: that read-modify-write is not
// atomic against a concurrent writer of the same blocks, so callers that
// write unaligned (the bitmap superblock) must not race each other there.
func (d *DirectFile) WriteAt(p []byte, off int64) (int, error) {
	return d.write(p, off, false)
}

// WriteAtFUA writes p at off and returns once it is durable.
func (d *DirectFile) WriteAtFUA(p []byte, off int64) (int, error) {
	return d.write(p, off, true)
}

func (d *DirectFile) write(p []byte, off int64, fua bool) (int, error) {
	if d.closed.Load() {
		return 0, fmt.Errorf("write %s: %w", d.path, ErrClosed)
	}
	if d.direct(p, off) {
		return d.pwrite(p, off, fua)
	}
	lo, hi := d.blocks(off, int64(len(p)))
	b := alignedBuf(int(hi - lo))
	if lo < off || hi > off+int64(len(p)) {
		if _, err := d.pread(b, lo); err != nil {
			return 0, fmt.Errorf("write %s: read-modify-write at %d: %w", d.path, lo, err)
		}
	}
	copy(b[off-lo:], p)
	if _, err := d.pwrite(b, lo, fua); err != nil {
		return 0, err
	}
	return len(p), nil
}

// blocks returns the block-aligned range covering [off, off+n).
func (d *DirectFile) blocks(off, n int64) (lo, hi int64) {
	m := int64(d.bs - 1)
	return off &^ m, (off + n + m) &^ m
}

func (d *DirectFile) pread(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(d.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("read %s at %d+%d: %w", d.path, off, len(p), err)
		}
		if n == 0 {
			return done, fmt.Errorf("read %s at %d+%d: %w", d.path, off, len(p), io.ErrUnexpectedEOF)
		}
		done += n
	}
	return done, nil
}

func (d *DirectFile) pwrite(p []byte, off int64, fua bool) (int, error) {
	done := 0
	for done < len(p) {
		var n int
		var err error
		if fua && !d.noRWF.Load() {
			n, err = unix.Pwritev2(d.fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
			if err == unix.EOPNOTSUPP || err == unix.ENOSYS || err == unix.EINVAL {
				d.noRWF.Store(true)
				continue
			}
		} else {
			n, err = unix.Pwrite(d.fd, p[done:], off+int64(done))
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("write %s at %d+%d: %w", d.path, off, len(p), err)
		}
		if n == 0 {
			return done, fmt.Errorf("write %s at %d+%d: %w", d.path, off, len(p), io.ErrShortWrite)
		}
		done += n
	}
	if fua && d.noRWF.Load() {
		if err := d.Sync(); err != nil {
			return done, err
		}
	}
	return done, nil
}

// aioFD returns the descriptor for the engine's native AIO writes, or ok
// false when writes must go through WriteAt (closed, or AIO refused).
func (d *DirectFile) aioFD() (fd int, ok bool) {
	return d.fd, !d.closed.Load() && !d.noAIO.Load()
}

// aioRefused makes every later write go through WriteAt.
func (d *DirectFile) aioRefused() { d.noAIO.Store(true) }

// Sync flushes the device's volatile cache (fdatasync).
func (d *DirectFile) Sync() error {
	if d.closed.Load() {
		return fmt.Errorf("sync %s: %w", d.path, ErrClosed)
	}
	for {
		err := unix.Fdatasync(d.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("fdatasync %s: %w", d.path, err)
		}
		return nil
	}
}

// Close closes the descriptor. I/O must have stopped.
func (d *DirectFile) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	if err := unix.Close(d.fd); err != nil {
		return fmt.Errorf("close %s: %w", d.path, err)
	}
	return nil
}
