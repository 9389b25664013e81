package main

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"syscall"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// zeroSuperblockOne implements --zero-superblock for one device: it
// overwrites the md superblock with zeroes, so that neither md nor
// mdclusterd takes the device for an array member any more, and leaves
// everything else (the bitmap, the data) as it was, as mdadm does.
//
// As mdadm 4.2 does, it opens a block device exclusively, so a device
// that a running array (mdclusterd's or the kernel's), a mount or
// device-mapper holds is refused with "Couldn't open ... for write - not
// zeroing" and status 2; and a device without a superblock is reported as
// "Unrecognised md component device" with status 0, so that wiping is
// idempotent in scripts. Unlike mdadm, a device whose superblock carries
// md's magic but cannot be read as one (a wrong major version, a
// super_offset that does not match where it was found) is left alone
// unless --force is given, with status 1 and the reason.
//
// A clustered array's member is shared: zero it only when no node of the
// cluster uses the array (mdadm's manual gives the same warning); the
// exclusive open only protects against this node's users.
func zeroSuperblockOne(e *env, o *options, name string) int {
	flag := os.O_RDWR
	if fi, err := os.Stat(name); err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		flag |= syscall.O_EXCL
	}
	f, err := os.OpenFile(name, flag, 0)
	if err != nil {
		e.errorf("Couldn't open %s for write - not zeroing\n", name)
		if o.verbose > 0 {
			e.errorf("%s: %s\n", name, errText(err))
		}
		return exitUsage
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		size = 0
	}
	sectors := uint64(size) / superblock.SectorSize
	var offs []int64 // byte offsets of the superblocks to wipe
	var lens []int
	sb, perr := superblock.Probe(f, sectors)
	switch {
	case perr == nil:
		offs, lens = append(offs, int64(sb.SuperOffset)*superblock.SectorSize), append(lens, wipeLen(sb))
	case errors.Is(perr, superblock.ErrBadMagic) || !o.force:
		e.errorf("Unrecognised md component device - %s\n", name)
		if errors.Is(perr, superblock.ErrBadMagic) {
			return exitOK
		}
		e.errorf("%s: %v: not zeroed; --force wipes a damaged superblock\n", name, perr)
		return exitFail
	default:
		// --force on a damaged superblock: wipe every v1 location that
		// carries md's magic.
		for minor := 0; minor <= 2; minor++ {
			sec, _ := superblock.Offset(minor, sectors)
			var m [4]byte
			off := int64(sec) * superblock.SectorSize
			if _, err := f.ReadAt(m[:], off); err == nil && binary.LittleEndian.Uint32(m[:]) == superblock.Magic {
				offs, lens = append(offs, off), append(lens, superblock.MaxSize)
			}
		}
	}
	for i, off := range offs {
		if _, err := f.WriteAt(make([]byte, lens[i]), off); err != nil {
			e.errorf("Could not zero superblock on %s: %s\n", name, errText(err))
			return exitFail
		}
	}
	if err := f.Sync(); err != nil {
		e.errorf("Could not zero superblock on %s: %s\n", name, errText(err))
		return exitFail
	}
	if o.verbose > 0 {
		for _, off := range offs {
			e.errorf("%s: superblock at sector %d zeroed\n", name, off/superblock.SectorSize)
		}
	}
	return exitOK
}

// wipeLen is how many bytes of sb's location --zero-superblock
// overwrites: the superblock's own length rounded up to a sector, which
// never reaches an internal bitmap placed right after it.
func wipeLen(sb *superblock.Superblock) int {
	n := (sb.Len() + superblock.SectorSize - 1) / superblock.SectorSize * superblock.SectorSize
	if sb.FeatureMap&superblock.FeatureBitmapOffset != 0 && sb.BitmapOffset > 0 {
		n = min(n, int(sb.BitmapOffset)*superblock.SectorSize)
	}
	return min(n, superblock.MaxSize)
}
