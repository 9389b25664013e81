//go:build linux

package nbd

import (
	"os"

	"golang.org/x/sys/unix"
)

// punchHole deallocates [off, off+n) so it reads back as zeroes.
func punchHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// zeroRange zeroes [off, off+n) keeping it allocated, without writing data.
func zeroRange(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// datasync makes f's written data durable; file metadata only as far as
// reading the data back needs it, which is what a block device needs.
func datasync(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }

// dsyncFlag opens a file whose writes are durable on return: FUA.
const dsyncFlag = unix.O_DSYNC
