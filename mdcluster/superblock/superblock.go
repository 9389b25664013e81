// Package superblock reads and writes md's version-1 member superblock
// (struct mdp_superblock_1), byte-compatible with the Linux md driver and
// mdadm, and renders it the way `mdadm --examine` does.
//
// A v1 superblock is 256 bytes of fixed fields followed by a 16-bit role
// for every device slot (max_dev of them), all little-endian. Versions 1.0,
// 1.1 and 1.2 share the format and differ only in where the superblock sits:
// at the end of the device (1.0), at its start (1.1) or 4 KiB from its start
// (1.2, mdadm's default and the only one md-cluster supports).
package superblock

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// On-disk constants, fixed by the kernel's format.
const (
	// Magic is MD_SB_MAGIC, the first word of every md superblock.
	Magic uint32 = 0xa92b4efc
	// MajorVersion is the only major version of this format.
	MajorVersion = 1

	// FixedSize is the size of the fixed part; roles follow it.
	FixedSize = 256
	// MaxSize is the most the kernel reads for a v1 superblock (4 KiB).
	MaxSize = 4096
	// MaxDevs is the largest max_dev that fits in MaxSize: (4096-256)/2.
	MaxDevs = (MaxSize - FixedSize) / 2

	// SectorSize is md's unit for all offsets and sizes in the superblock.
	SectorSize = 512
	// V12Offset is super_offset for v1.2: 8 sectors (4 KiB) into the device.
	V12Offset = 8

	// MaxSector is resync_offset / recovery_offset meaning "complete".
	MaxSector = ^uint64(0)
)

// Feature bits of feature_map.
const (
	FeatureBitmapOffset     uint32 = 1    // bitmap_offset is valid: internal bitmap
	FeatureRecoveryOffset   uint32 = 2    // recovery_offset is valid (partial rebuild)
	FeatureReshapeActive    uint32 = 4    // a reshape is in progress
	FeatureBadBlocks        uint32 = 8    // the bad block log is not empty
	FeatureReplacement      uint32 = 16   // this device is replacing another with the same role
	FeatureReshapeBackwards uint32 = 32   // reshape runs towards lower addresses
	FeatureNewOffset        uint32 = 64   // new_offset must be honoured
	FeatureRecoveryBitmap   uint32 = 128  // recovery is guided by the bitmap
	FeatureClustered        uint32 = 256  // clustered md: bitmap has one slot per node
	FeatureJournal          uint32 = 512  // array has a write journal
	FeaturePPL              uint32 = 1024 // partial parity log in use
	FeatureMultiplePPLs     uint32 = 2048 // several PPLs
	FeatureRAID0Layout      uint32 = 4096 // layout is meaningful for raid0
	// FeatureAll is every bit the kernel knows; others make it refuse the device.
	FeatureAll uint32 = 8191
)

// Special device roles in dev_roles.
const (
	RoleSpare   uint16 = 0xffff // not part of the array (yet)
	RoleFaulty  uint16 = 0xfffe // failed
	RoleJournal uint16 = 0xfffd // write journal device
	RoleMax     uint16 = 0xff00 // largest value of a normal role
)

// devflags bits.
const (
	DevFlagWriteMostly uint8 = 1
	DevFlagFailFast    uint8 = 2
)

// Level numbers (md personalities) used in the level field.
const (
	LevelLinear    int32 = -1
	LevelMultipath int32 = -4
	LevelFaulty    int32 = -5
	LevelRAID0     int32 = 0
	LevelRAID1     int32 = 1
	LevelRAID4     int32 = 4
	LevelRAID5     int32 = 5
	LevelRAID6     int32 = 6
	LevelRAID10    int32 = 10
)

// ErrBadMagic is returned (wrapped) when there is no md superblock.
var ErrBadMagic = errors.New("no md superblock (bad magic)")

// ErrChecksum is returned (wrapped) when sb_csum does not match.
var ErrChecksum = errors.New("md superblock checksum mismatch")

// ErrCorrupt is returned (wrapped) when fields are impossible.
var ErrCorrupt = errors.New("corrupt md superblock")

// Superblock is struct mdp_superblock_1. Field names follow the kernel's,
// in Go style; every on-disk byte is kept, including reserved padding, so
// that reading and writing back a superblock is lossless and keeps its
// checksum.
type Superblock struct {
	Magic        uint32
	MajorVersion uint32
	FeatureMap   uint32
	Pad0         uint32
	SetUUID      [16]byte
	SetName      [32]byte // "homehost:name", NUL padded
	// CTime is the creation time: seconds in the low 40 bits, microseconds
	// in the high 24.
	CTime     uint64
	Level     int32
	Layout    uint32
	Size      uint64 // sectors of each device used by the array
	ChunkSize uint32 // sectors (raid0/4/5/6/10)
	RaidDisks uint32
	// BitmapOffset is the signed offset of the internal bitmap from the
	// superblock, in sectors (valid with FeatureBitmapOffset). When PPL is
	// used the same four bytes hold the PPL offset and size instead; see PPL.
	BitmapOffset     int32
	NewLevel         uint32
	ReshapePos       uint64
	DeltaDisks       uint32
	NewLayout        uint32
	NewChunk         uint32
	NewOffset        int32
	DataOffset       uint64 // sectors from device start to the data
	DataSize         uint64 // sectors available for data
	SuperOffset      uint64 // sectors from device start to this superblock
	RecoveryOffset   uint64 // sectors recovered so far (FeatureRecoveryOffset); journal_tail for journals
	DevNumber        uint32 // this device's index into DevRoles
	CntCorrectedRead uint32
	DeviceUUID       [16]byte
	DevFlags         uint8
	BBLogShift       uint8
	BBLogSize        uint16 // sectors of bad block log
	BBLogOffset      int32  // signed sectors from the superblock
	UTime            uint64 // update time, same encoding as CTime
	Events           uint64
	ResyncOffset     uint64 // MaxSector when the array is clean
	Checksum         uint32 // sb_csum as stored
	MaxDev           uint32
	Pad3             [32]byte
	// DevRoles has MaxDev entries: the role (slot in the array) of every
	// device, or RoleSpare / RoleFaulty / RoleJournal.
	DevRoles []uint16
}

// Len returns the on-disk length: 256 + 2*MaxDev bytes.
func (s *Superblock) Len() int { return FixedSize + 2*int(s.MaxDev) }

// Name returns SetName up to its first NUL.
func (s *Superblock) Name() string {
	n := bytes.IndexByte(s.SetName[:], 0)
	if n < 0 {
		n = len(s.SetName)
	}
	return string(s.SetName[:n])
}

// SetNameString stores name ("host:name" by mdadm's convention); it fails
// when name is longer than the 32-byte field.
func (s *Superblock) SetNameString(name string) error {
	if len(name) > len(s.SetName) {
		return fmt.Errorf("array name %q: longer than %d bytes", name, len(s.SetName))
	}
	s.SetName = [32]byte{}
	copy(s.SetName[:], name)
	return nil
}

// PPL returns the partial parity log offset (signed sectors from the
// superblock) and size, which share storage with BitmapOffset.
func (s *Superblock) PPL() (offset int16, size uint16) {
	u := uint32(s.BitmapOffset)
	return int16(uint16(u)), uint16(u >> 16)
}

// Role returns this device's role: DevRoles[DevNumber], or RoleSpare when
// DevNumber is outside the table (what mdadm reports for such a device).
func (s *Superblock) Role() uint16 {
	if s.DevNumber < uint32(len(s.DevRoles)) {
		return s.DevRoles[s.DevNumber]
	}
	return RoleSpare
}

// Clean reports whether the array was marked clean (resync_offset is
// MaxSector). md never marks clustered arrays clean.
func (s *Superblock) Clean() bool { return s.ResyncOffset == MaxSector }

// HasBitmap reports whether the superblock points at an internal bitmap.
func (s *Superblock) HasBitmap() bool { return s.FeatureMap&FeatureBitmapOffset != 0 }

// BitmapStart returns the byte offset of the internal bitmap on the device
// (slot 0 for clustered bitmaps).
func (s *Superblock) BitmapStart() int64 {
	return (int64(s.SuperOffset) + int64(s.BitmapOffset)) * SectorSize
}

// MinorVersion returns the 1.x minor version mdadm infers from
// super_offset: 1 at the start of the device, 2 within the first 4 KiB,
// 0 (end of device) otherwise.
func (s *Superblock) MinorVersion() int {
	switch {
	case s.SuperOffset <= 4:
		return 1
	case s.SuperOffset <= 8:
		return 2
	}
	return 0
}

// ComputeChecksum returns the checksum md stores in sb_csum: the sum of the
// superblock's little-endian 32-bit words (sb_csum itself counted as zero,
// roles included, a trailing 16-bit word added on its own) in 64 bits, then
// the high 32 bits folded once into the low 32.
func (s *Superblock) ComputeChecksum() uint32 {
	b := s.encodeRaw()
	return checksum(b)
}

func checksum(b []byte) uint32 {
	var sum uint64
	le := binary.LittleEndian
	n := len(b)
	i := 0
	for ; n-i >= 4; i += 4 {
		if i == 216 { // sb_csum counts as zero
			continue
		}
		sum += uint64(le.Uint32(b[i:]))
	}
	if n-i == 2 {
		sum += uint64(le.Uint16(b[i:]))
	}
	return uint32(sum&0xffffffff) + uint32(sum>>32)
}

// UpdateChecksum stores ComputeChecksum in Checksum.
func (s *Superblock) UpdateChecksum() { s.Checksum = s.ComputeChecksum() }

// ChecksumOK reports whether the stored checksum is correct.
func (s *Superblock) ChecksumOK() bool { return s.Checksum == s.ComputeChecksum() }

// MarshalBinary returns the on-disk bytes (Len() of them) exactly as stored,
// with the Checksum field as it is; call UpdateChecksum first when writing a
// modified superblock.
func (s *Superblock) MarshalBinary() ([]byte, error) {
	if s.MaxDev > MaxDevs {
		return nil, fmt.Errorf("md superblock: %w: max_dev %d exceeds %d", ErrCorrupt, s.MaxDev, MaxDevs)
	}
	if len(s.DevRoles) != int(s.MaxDev) {
		return nil, fmt.Errorf("md superblock: %d device roles but max_dev is %d", len(s.DevRoles), s.MaxDev)
	}
	return s.encodeRaw(), nil
}

func (s *Superblock) encodeRaw() []byte {
	b := make([]byte, FixedSize+2*len(s.DevRoles))
	le := binary.LittleEndian
	le.PutUint32(b[0:], s.Magic)
	le.PutUint32(b[4:], s.MajorVersion)
	le.PutUint32(b[8:], s.FeatureMap)
	le.PutUint32(b[12:], s.Pad0)
	copy(b[16:32], s.SetUUID[:])
	copy(b[32:64], s.SetName[:])
	le.PutUint64(b[64:], s.CTime)
	le.PutUint32(b[72:], uint32(s.Level))
	le.PutUint32(b[76:], s.Layout)
	le.PutUint64(b[80:], s.Size)
	le.PutUint32(b[88:], s.ChunkSize)
	le.PutUint32(b[92:], s.RaidDisks)
	le.PutUint32(b[96:], uint32(s.BitmapOffset))
	le.PutUint32(b[100:], s.NewLevel)
	le.PutUint64(b[104:], s.ReshapePos)
	le.PutUint32(b[112:], s.DeltaDisks)
	le.PutUint32(b[116:], s.NewLayout)
	le.PutUint32(b[120:], s.NewChunk)
	le.PutUint32(b[124:], uint32(s.NewOffset))
	le.PutUint64(b[128:], s.DataOffset)
	le.PutUint64(b[136:], s.DataSize)
	le.PutUint64(b[144:], s.SuperOffset)
	le.PutUint64(b[152:], s.RecoveryOffset)
	le.PutUint32(b[160:], s.DevNumber)
	le.PutUint32(b[164:], s.CntCorrectedRead)
	copy(b[168:184], s.DeviceUUID[:])
	b[184] = s.DevFlags
	b[185] = s.BBLogShift
	le.PutUint16(b[186:], s.BBLogSize)
	le.PutUint32(b[188:], uint32(s.BBLogOffset))
	le.PutUint64(b[192:], s.UTime)
	le.PutUint64(b[200:], s.Events)
	le.PutUint64(b[208:], s.ResyncOffset)
	le.PutUint32(b[216:], s.Checksum)
	le.PutUint32(b[220:], s.MaxDev)
	copy(b[224:256], s.Pad3[:])
	for i, r := range s.DevRoles {
		le.PutUint16(b[FixedSize+2*i:], r)
	}
	return b
}

// Decode parses a superblock from b without judging its contents beyond
// what is needed to parse it: the magic must be right, and max_dev must fit
// in the 4 KiB the kernel reads and in b. It does not verify the checksum
// (see Validate), so that damaged superblocks can still be displayed.
func Decode(b []byte) (*Superblock, error) {
	if len(b) < FixedSize {
		return nil, fmt.Errorf("md superblock: truncated: %d bytes, need at least %d", len(b), FixedSize)
	}
	le := binary.LittleEndian
	s := &Superblock{}
	s.Magic = le.Uint32(b[0:])
	if s.Magic != Magic {
		return nil, fmt.Errorf("%w: found %08x, expected %08x", ErrBadMagic, s.Magic, Magic)
	}
	s.MajorVersion = le.Uint32(b[4:])
	s.FeatureMap = le.Uint32(b[8:])
	s.Pad0 = le.Uint32(b[12:])
	copy(s.SetUUID[:], b[16:32])
	copy(s.SetName[:], b[32:64])
	s.CTime = le.Uint64(b[64:])
	s.Level = int32(le.Uint32(b[72:]))
	s.Layout = le.Uint32(b[76:])
	s.Size = le.Uint64(b[80:])
	s.ChunkSize = le.Uint32(b[88:])
	s.RaidDisks = le.Uint32(b[92:])
	s.BitmapOffset = int32(le.Uint32(b[96:]))
	s.NewLevel = le.Uint32(b[100:])
	s.ReshapePos = le.Uint64(b[104:])
	s.DeltaDisks = le.Uint32(b[112:])
	s.NewLayout = le.Uint32(b[116:])
	s.NewChunk = le.Uint32(b[120:])
	s.NewOffset = int32(le.Uint32(b[124:]))
	s.DataOffset = le.Uint64(b[128:])
	s.DataSize = le.Uint64(b[136:])
	s.SuperOffset = le.Uint64(b[144:])
	s.RecoveryOffset = le.Uint64(b[152:])
	s.DevNumber = le.Uint32(b[160:])
	s.CntCorrectedRead = le.Uint32(b[164:])
	copy(s.DeviceUUID[:], b[168:184])
	s.DevFlags = b[184]
	s.BBLogShift = b[185]
	s.BBLogSize = le.Uint16(b[186:])
	s.BBLogOffset = int32(le.Uint32(b[188:]))
	s.UTime = le.Uint64(b[192:])
	s.Events = le.Uint64(b[200:])
	s.ResyncOffset = le.Uint64(b[208:])
	s.Checksum = le.Uint32(b[216:])
	s.MaxDev = le.Uint32(b[220:])
	copy(s.Pad3[:], b[224:256])
	if s.MaxDev > MaxDevs {
		return nil, fmt.Errorf("md superblock: %w: max_dev %d exceeds %d (roles would not fit in %d bytes)", ErrCorrupt, s.MaxDev, MaxDevs, MaxSize)
	}
	if need := s.Len(); len(b) < need {
		return nil, fmt.Errorf("md superblock: truncated: max_dev %d needs %d bytes, have %d", s.MaxDev, need, len(b))
	}
	s.DevRoles = make([]uint16, s.MaxDev)
	for i := range s.DevRoles {
		s.DevRoles[i] = le.Uint16(b[FixedSize+2*i:])
	}
	return s, nil
}

// Validate checks what the kernel checks before it uses a member: major
// version, checksum, known feature bits, offsets that are possible for a
// device of devSectors sectors (0 = size unknown, skip those checks).
func (s *Superblock) Validate(devSectors uint64) error {
	if s.Magic != Magic {
		return fmt.Errorf("%w: found %08x", ErrBadMagic, s.Magic)
	}
	if s.MajorVersion != MajorVersion {
		return fmt.Errorf("%w: major version %d, only %d is supported", ErrCorrupt, s.MajorVersion, MajorVersion)
	}
	if s.MaxDev > MaxDevs || len(s.DevRoles) != int(s.MaxDev) {
		return fmt.Errorf("%w: max_dev %d (%d roles), at most %d", ErrCorrupt, s.MaxDev, len(s.DevRoles), MaxDevs)
	}
	if want := s.ComputeChecksum(); s.Checksum != want {
		return fmt.Errorf("%w: stored %08x, computed %08x", ErrChecksum, s.Checksum, want)
	}
	if f := s.FeatureMap &^ FeatureAll; f != 0 {
		return fmt.Errorf("%w: unknown feature bits %#x", ErrCorrupt, f)
	}
	if s.RaidDisks > MaxDevs {
		return fmt.Errorf("%w: raid_disks %d exceeds %d", ErrCorrupt, s.RaidDisks, MaxDevs)
	}
	if s.DataSize > 1<<54 || s.Size > 1<<54 || s.DataOffset > 1<<54 || s.SuperOffset > 1<<54 {
		return fmt.Errorf("%w: sizes beyond 8 EiB (data_offset %d, data_size %d, size %d, super_offset %d)", ErrCorrupt, s.DataOffset, s.DataSize, s.Size, s.SuperOffset)
	}
	if s.Level > 0 && s.Size > s.DataSize {
		return fmt.Errorf("%w: used size %d sectors exceeds data size %d", ErrCorrupt, s.Size, s.DataSize)
	}
	// The data area must not overlap the superblock.
	sbEnd := s.SuperOffset + (uint64(s.Len())+SectorSize-1)/SectorSize
	if s.DataOffset >= s.SuperOffset {
		if s.DataOffset < sbEnd {
			return fmt.Errorf("%w: data offset %d overlaps the superblock at %d..%d", ErrCorrupt, s.DataOffset, s.SuperOffset, sbEnd)
		}
	} else if s.DataOffset+s.DataSize > s.SuperOffset {
		return fmt.Errorf("%w: data %d+%d runs into the superblock at %d", ErrCorrupt, s.DataOffset, s.DataSize, s.SuperOffset)
	}
	if devSectors > 0 {
		if sbEnd > devSectors {
			return fmt.Errorf("%w: superblock at sector %d beyond device end %d", ErrCorrupt, s.SuperOffset, devSectors)
		}
		if s.DataOffset+s.DataSize > devSectors {
			return fmt.Errorf("%w: data %d+%d sectors beyond device end %d", ErrCorrupt, s.DataOffset, s.DataSize, devSectors)
		}
	}
	if s.HasBitmap() && s.BitmapOffset == 0 {
		return fmt.Errorf("%w: internal bitmap at offset 0 would overwrite the superblock", ErrCorrupt)
	}
	return nil
}

// Parse decodes and validates a superblock (devSectors as for Validate).
func Parse(b []byte, devSectors uint64) (*Superblock, error) {
	s, err := Decode(b)
	if err != nil {
		return nil, err
	}
	if err := s.Validate(devSectors); err != nil {
		return nil, fmt.Errorf("md superblock: %w", err)
	}
	return s, nil
}

// Offset returns super_offset (in sectors) for minor version 0, 1 or 2 on a
// device of devSectors sectors, exactly as mdadm and the kernel place it.
func Offset(minor int, devSectors uint64) (uint64, error) {
	switch minor {
	case 0:
		if devSectors < 16 {
			return 0, fmt.Errorf("v1.0 superblock: device of %d sectors is too small", devSectors)
		}
		return (devSectors - 16) &^ 7, nil
	case 1:
		return 0, nil
	case 2:
		return V12Offset, nil
	}
	return 0, fmt.Errorf("md superblock version 1.%d: unknown minor version", minor)
}

// ReadAt reads the superblock at sector offset sectorOff of r (the 4 KiB
// the kernel reads, or less near the end of the device) and decodes it
// without validation. Use Validate afterwards for anything but display.
func ReadAt(r io.ReaderAt, sectorOff uint64) (*Superblock, error) {
	buf := make([]byte, MaxSize)
	n, err := r.ReadAt(buf, int64(sectorOff)*SectorSize)
	if n < FixedSize {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("md superblock at sector %d: read %d bytes: %w", sectorOff, n, err)
	}
	s, err := Decode(buf[:n])
	if err != nil {
		return nil, fmt.Errorf("md superblock at sector %d: %w", sectorOff, err)
	}
	return s, nil
}

// Probe finds a v1.x superblock on a device of devSectors sectors the way
// mdadm does: it tries 1.0, 1.1 and 1.2 and keeps the one with the latest
// creation time (the first one on ties). A candidate counts only if its
// magic and major version are right and its super_offset names its own
// position. It returns ErrBadMagic (wrapped) when there is none.
func Probe(r io.ReaderAt, devSectors uint64) (*Superblock, error) {
	if devSectors < 24 {
		return nil, fmt.Errorf("%w: device of %d sectors is too small for md", ErrBadMagic, devSectors)
	}
	var best *Superblock
	var firstErr error
	for minor := 0; minor <= 2; minor++ {
		off, _ := Offset(minor, devSectors)
		s, err := ReadAt(r, off)
		if err == nil && s.MajorVersion != MajorVersion {
			err = fmt.Errorf("%w: major version %d", ErrCorrupt, s.MajorVersion)
		}
		if err == nil && s.SuperOffset != off {
			err = fmt.Errorf("%w: super_offset %d but found at sector %d", ErrCorrupt, s.SuperOffset, off)
		}
		if err != nil {
			if firstErr == nil || (errors.Is(firstErr, ErrBadMagic) && !errors.Is(err, ErrBadMagic)) {
				firstErr = fmt.Errorf("v1.%d: %w", minor, err)
			}
			continue
		}
		if best == nil || s.CTime > best.CTime {
			best = s
		}
	}
	if best == nil {
		if firstErr == nil {
			firstErr = ErrBadMagic
		}
		return nil, firstErr
	}
	return best, nil
}

// Write stores s at its super_offset after recomputing the checksum. It
// writes the whole 4 KiB block, zero-filled after the roles, so that stale
// bytes of an older, larger superblock cannot remain.
func (s *Superblock) Write(w io.WriterAt) error {
	s.UpdateChecksum()
	b, err := s.MarshalBinary()
	if err != nil {
		return err
	}
	blk := make([]byte, MaxSize)
	copy(blk, b)
	if _, err := w.WriteAt(blk, int64(s.SuperOffset)*SectorSize); err != nil {
		return fmt.Errorf("md superblock at sector %d: write: %w", s.SuperOffset, err)
	}
	return nil
}
