// Package bitmap reads and writes md's write-intent bitmap in the exact on-disk
// format used by the Linux md driver and mdadm, including the clustered variant
// (version 5) in which every cluster node owns a slot of its own, and keeps the
// write-intent state (bits set before writes, cleared lazily after) for one slot.
//
// The on-disk format, per slot:
//
//	offset 0    256-byte bitmap superblock (little-endian)
//	offset 256  one bit per chunk, bit i in byte i/8 at position i%8
//	...         zero padding up to the slot size (a multiple of 4 KiB)
//
// Slots follow each other without gaps; see Layout.
package bitmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// On-disk constants of md's bitmap superblock. They are fixed by the kernel's
// format and must never change.
const (
	// Magic is the bitmap superblock magic ("bitm" read as little-endian).
	Magic uint32 = 0x6d746962

	// VersionHostEndian (3) is the oldest version md accepts: bits stored in
	// host byte order. Read-only support; we never write it.
	VersionHostEndian uint32 = 3
	// VersionLE (4) is the normal, non-clustered bitmap.
	VersionLE uint32 = 4
	// VersionClustered (5) marks a clustered bitmap: one slot per node.
	VersionClustered uint32 = 5

	// SuperblockSize is the size of the bitmap superblock in bytes.
	SuperblockSize = 256
	// ClusterNameLen is the size of the cluster_name field.
	ClusterNameLen = 64

	// StateStale is set by md when the bitmap may not describe the data (e.g.
	// after it was out of date at assembly); a stale bitmap forces a full resync.
	StateStale uint32 = 1 << 1
	// StateWriteError is set by md when writing the bitmap failed.
	StateWriteError uint32 = 1 << 2
	// StateHostEndian is set for version-3 bitmaps written in host byte order.
	StateHostEndian uint32 = 1 << 15

	// MaxWriteBehind is md's COUNTER_MAX, the largest write_behind value and
	// the largest number of writes in flight per chunk.
	MaxWriteBehind = 16383

	// DefaultDaemonSleep is md's and mdadm's default flush period in seconds.
	DefaultDaemonSleep = 5
	// DefaultChunkSize is mdadm's default bitmap chunk for internal bitmaps
	// when it has room (64 MiB).
	DefaultChunkSize = 64 << 20
	// MinChunkSize is the smallest chunk md accepts (one sector).
	MinChunkSize = 512

	// SlotAlign is the boundary slots are rounded to when the bitmap offset
	// is 4 KiB aligned (the normal case, and the only one the kernel's
	// clustered code supports).
	SlotAlign = 4096
)

// ErrBadMagic is returned (wrapped) when the magic number is not Magic.
var ErrBadMagic = errors.New("bad bitmap magic")

// ErrCorrupt is returned (wrapped) when a bitmap superblock is internally
// inconsistent: impossible chunk size, version, or node count.
var ErrCorrupt = errors.New("corrupt bitmap superblock")

// Superblock is md's 256-byte bitmap superblock (bitmap_super_t). For
// clustered bitmaps every slot begins with its own copy; the copies agree on
// everything except the event counters and state.
type Superblock struct {
	Magic   uint32   // must be Magic
	Version uint32   // 3, 4, or 5 (clustered)
	UUID    [16]byte // md array UUID; must match the v1 superblock's set uuid
	// Events is the bitmap's copy of the array event counter; md updates it
	// before the md superblock so a stale bitmap is detected at assembly.
	Events uint64
	// EventsCleared is the event count when bits were last cleared; a
	// member whose events are older than this cannot be re-added from the
	// bitmap alone.
	EventsCleared uint64
	// SyncSize is the number of 512-byte sectors the bitmap covers (raid1:
	// the used size per device; raid10: the array size).
	SyncSize uint64
	State    uint32 // StateStale, StateWriteError, StateHostEndian bits
	// ChunkSize is the number of bytes each bit covers (power of two, >= 512).
	ChunkSize uint32
	// DaemonSleep is the flush period in seconds: how long a chunk must be
	// idle before its bit is cleared.
	DaemonSleep uint32
	// WriteBehind is the maximum number of outstanding write-behind writes
	// (0 = normal write mode).
	WriteBehind uint32
	// SectorsReserved is the number of sectors reserved for the bitmap
	// (md sets it for external/space-checked bitmaps; often 0 for internal).
	SectorsReserved uint32
	// Nodes is the number of node slots of a clustered bitmap (0 when not
	// clustered).
	Nodes uint32
	// ClusterName is the cluster name, NUL padded; it must match the DLM's
	// cluster name for md-cluster to join.
	ClusterName [ClusterNameLen]byte
}

// Name returns ClusterName up to its first NUL byte.
func (s *Superblock) Name() string {
	n := bytes.IndexByte(s.ClusterName[:], 0)
	if n < 0 {
		n = len(s.ClusterName)
	}
	return string(s.ClusterName[:n])
}

// SetName stores name as the cluster name. It fails when name does not fit
// with a terminating NUL, because md and mdadm treat the field as a C string.
func (s *Superblock) SetName(name string) error {
	if len(name) >= ClusterNameLen {
		return fmt.Errorf("cluster name %q: longer than %d bytes", name, ClusterNameLen-1)
	}
	if bytes.IndexByte([]byte(name), 0) >= 0 {
		return fmt.Errorf("cluster name %q: contains a NUL byte", name)
	}
	s.ClusterName = [ClusterNameLen]byte{}
	copy(s.ClusterName[:], name)
	return nil
}

// Clustered reports whether this is a clustered bitmap with node slots.
func (s *Superblock) Clustered() bool { return s.Nodes > 0 }

// Bits returns the number of chunk bits the bitmap holds:
// ceil(SyncSize*512 / ChunkSize). It returns 0 for a zero chunk size.
func (s *Superblock) Bits() uint64 { return ChunkBits(s.SyncSize, s.ChunkSize) }

// ChunkBits returns ceil(sectors*512/chunkSize), the number of bits needed
// to cover sectors with chunks of chunkSize bytes. This is the formula both
// mdadm and the kernel use; the kernel used floor division before 2020 and
// disagreed with mdadm about slot positions as a result.
func ChunkBits(sectors uint64, chunkSize uint32) uint64 {
	if chunkSize == 0 {
		return 0
	}
	c := uint64(chunkSize)
	// sectors*512 can overflow for absurd sizes; do it in 128 bits.
	hi, lo := bits.Mul64(sectors, 512)
	lo, carry := bits.Add64(lo, c-1, 0)
	hi += carry
	if hi >= c {
		return ^uint64(0) // does not fit; callers reject it as too large
	}
	q, _ := bits.Div64(hi, lo, c)
	return q
}

// SlotBytes returns the size of one node slot: the superblock plus
// ceil(bits/8) bytes, rounded up to align. mdadm uses align 4096 when the
// bitmap offset is a multiple of 8 sectors and 512 otherwise; the kernel
// always strides 4 KiB pages for clustered bitmaps.
func (s *Superblock) SlotBytes(align uint64) uint64 {
	b := s.Bits()
	if b > (1<<62) || align == 0 {
		return ^uint64(0)
	}
	n := (b+7)/8 + SuperblockSize
	return (n + align - 1) / align * align
}

// Validate checks what md checks before it trusts a bitmap superblock. It
// does not compare the UUID with the array; callers that know the array do.
func (s *Superblock) Validate() error {
	if s.Magic != Magic {
		return fmt.Errorf("%w: %#08x, want %#08x", ErrBadMagic, s.Magic, Magic)
	}
	if s.Version < VersionHostEndian || s.Version > VersionClustered {
		return fmt.Errorf("%w: unknown version %d (want %d..%d)", ErrCorrupt, s.Version, VersionHostEndian, VersionClustered)
	}
	if s.ChunkSize < MinChunkSize || s.ChunkSize&(s.ChunkSize-1) != 0 {
		return fmt.Errorf("%w: chunk size %d is not a power of two >= %d", ErrCorrupt, s.ChunkSize, MinChunkSize)
	}
	if s.WriteBehind > MaxWriteBehind {
		return fmt.Errorf("%w: write_behind %d exceeds %d", ErrCorrupt, s.WriteBehind, MaxWriteBehind)
	}
	if s.Nodes > 0 && s.Version != VersionClustered {
		return fmt.Errorf("%w: %d node slots in a version %d bitmap (only version %d is clustered)", ErrCorrupt, s.Nodes, s.Version, VersionClustered)
	}
	if s.Nodes > MaxNodes {
		return fmt.Errorf("%w: %d node slots exceeds %d", ErrCorrupt, s.Nodes, MaxNodes)
	}
	if s.Bits() > MaxBits {
		return fmt.Errorf("%w: %d chunks (sync size %d sectors / chunk %d bytes) exceeds %d", ErrCorrupt, s.Bits(), s.SyncSize, s.ChunkSize, MaxBits)
	}
	return nil
}

// MaxNodes bounds the node count we accept. md-cluster addresses slots with
// DLM slot numbers and a 64-bit recovery map, so more than 64 cannot work.
const MaxNodes = 64

// DefaultNodes is mdadm's node count for --bitmap=clustered when --nodes
// is not given.
const DefaultNodes = 4

// MaxBits bounds the number of chunks in one slot (2^31 bits = 256 MiB of
// bitmap). mdadm caps internal bitmaps far below this; anything larger is
// certainly corrupt and would make us allocate absurd buffers.
const MaxBits = 1 << 31

// MarshalBinary encodes the superblock into its 256-byte on-disk form. The
// reserved tail is zero.
func (s *Superblock) MarshalBinary() ([]byte, error) {
	b := make([]byte, SuperblockSize)
	s.encode(b)
	return b, nil
}

func (s *Superblock) encode(b []byte) {
	_ = b[SuperblockSize-1]
	le := binary.LittleEndian
	le.PutUint32(b[0:], s.Magic)
	le.PutUint32(b[4:], s.Version)
	copy(b[8:24], s.UUID[:])
	le.PutUint64(b[24:], s.Events)
	le.PutUint64(b[32:], s.EventsCleared)
	le.PutUint64(b[40:], s.SyncSize)
	le.PutUint32(b[48:], s.State)
	le.PutUint32(b[52:], s.ChunkSize)
	le.PutUint32(b[56:], s.DaemonSleep)
	le.PutUint32(b[60:], s.WriteBehind)
	le.PutUint32(b[64:], s.SectorsReserved)
	le.PutUint32(b[68:], s.Nodes)
	copy(b[72:136], s.ClusterName[:])
	clear(b[136:SuperblockSize])
}

// UnmarshalBinary decodes a bitmap superblock from the first 256 bytes of b.
// It only fails when b is too short; use Validate to check the contents, so
// that tools can still display a damaged superblock the way mdadm does.
func (s *Superblock) UnmarshalBinary(b []byte) error {
	if len(b) < SuperblockSize {
		return fmt.Errorf("bitmap superblock: need %d bytes, have %d", SuperblockSize, len(b))
	}
	le := binary.LittleEndian
	s.Magic = le.Uint32(b[0:])
	s.Version = le.Uint32(b[4:])
	copy(s.UUID[:], b[8:24])
	s.Events = le.Uint64(b[24:])
	s.EventsCleared = le.Uint64(b[32:])
	s.SyncSize = le.Uint64(b[40:])
	s.State = le.Uint32(b[48:])
	s.ChunkSize = le.Uint32(b[52:])
	s.DaemonSleep = le.Uint32(b[56:])
	s.WriteBehind = le.Uint32(b[60:])
	s.SectorsReserved = le.Uint32(b[64:])
	s.Nodes = le.Uint32(b[68:])
	copy(s.ClusterName[:], b[72:136])
	return nil
}

// ParseSuperblock decodes and validates a bitmap superblock.
func ParseSuperblock(b []byte) (*Superblock, error) {
	var s Superblock
	if err := s.UnmarshalBinary(b); err != nil {
		return nil, err
	}
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("bitmap superblock: %w", err)
	}
	return &s, nil
}
