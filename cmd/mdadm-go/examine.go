package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// device is an opened member device, loop device or image file.
type device struct {
	f     *os.File
	size  int64 // bytes
	block bool  // a block device (mdadm treats those differently for -X)
}

func openDevice(path string) (*device, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		// Directories and some special files cannot seek to the end;
		// mdadm treats them as too small.
		size = 0
	}
	block := st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0
	return &device{f: f, size: size, block: block}, nil
}

func (d *device) sectors() uint64 { return uint64(d.size) / superblock.SectorSize }

// ReadAt reads from the device and never fails on a directory or other
// unreadable file in a way that differs from a short read.
func (d *device) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

// runExamine implements --examine (-E).
func runExamine(e *env, o *options) int {
	if len(o.devices) == 0 {
		e.errorf("No devices to examine\n")
		return exitUsage
	}
	status := exitOK
	for _, name := range names(o.devices) {
		if examineOne(e, o, name) != exitOK {
			status = exitFail
		}
	}
	return status
}

func examineOne(e *env, o *options, name string) int {
	d, err := openDevice(name)
	if err != nil {
		e.errorf("cannot open %s: %s\n", name, errText(err))
		return exitFail
	}
	defer d.f.Close()
	sb, err := superblock.Probe(d, d.sectors())
	if err != nil {
		e.errorf("No md superblock detected on %s.\n", name)
		if !errors.Is(err, superblock.ErrBadMagic) {
			e.errorf("%s: %v\n", name, err)
		}
		return exitFail
	}
	fmt.Fprintf(e.stdout, "%s:\n", name)
	err = sb.Examine(e.stdout, superblock.ExamineOptions{
		DevSectors: d.sectors(),
		Bitmap:     superblock.LoadBitmapSuper(d, sb),
		Location:   e.location,
		HomeHost:   o.homehostFor(e),
	})
	if err != nil {
		e.errorf("%s: %v\n", name, err)
		return exitFail
	}
	return exitOK
}

// runExamineBitmap implements --examine-bitmap (-X).
func runExamineBitmap(e *env, o *options) int {
	if len(o.devices) == 0 {
		e.errorf("No devices given.\n")
		return exitUsage
	}
	status := exitOK
	for _, name := range names(o.devices) {
		status |= examineBitmapOne(e, name)
	}
	return status
}

// examineBitmapOne finds the bitmap the way mdadm does, with one
// extension: mdadm reads a regular file as an external bitmap file, while
// we first look for an md superblock in it, so member images can be
// examined without attaching them to a loop device. A file without md
// superblock is read as a bitmap file, as by mdadm.
func examineBitmapOne(e *env, name string) int {
	d, err := openDevice(name)
	if err != nil {
		e.errorf("failed to open bitmap file %s: %s\n", name, errText(err))
		return exitFail
	}
	defer d.f.Close()
	src := bitmap.ExamineSource{Name: name, Dev: d}
	sb, perr := superblock.Probe(d, d.sectors())
	switch {
	case perr == nil:
		bsb := superblock.LoadBitmapSuper(d, sb)
		if bsb == nil {
			e.errorf("%s doesn't have bitmap\n", name)
			return exitFail
		}
		src.Locate = bitmap.Internal(sb.BitmapStart(), bitmap.MdadmStride(bsb))
	case d.block:
		// mdadm: a block device without md superblock is read from its start, every slot.
		src.Locate = func(int, int64) (int64, error) { return 0, nil }
	default:
		src.Locate = bitmap.ExternalFile()
	}
	return bitmap.Examine(e.stdout, e.stderr, e.prog, src)
}

// errText renders an OS error the way strerror does (without Go's "open
// path:" prefix), for mdadm-compatible messages.
func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	s := err.Error()
	if s != "" {
		s = string(s[0]-('a'-'A')*boolByte(s[0] >= 'a' && s[0] <= 'z')) + s[1:]
	}
	return s
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}
