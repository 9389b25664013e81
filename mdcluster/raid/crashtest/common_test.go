package crashtest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// spec describes the array every process opens; the parent passes it to
// the children in the environment (crashSpecEnv) as the fields of
// spec.String.
type spec struct {
	Level        string // "raid1" or "raid10"
	Disks        int
	Layout       uint32 // raid10 layout word (0x102: near 2)
	ChunkSectors uint32 // raid10 chunk
	DevSectors   uint64 // member data area
	DataOff      int64  // where each member's data area starts
	BitmapStart  int64  // where the bitmap starts on each member
	Slots        int    // bitmap slots (nodes)
	BitmapChunk  int64  // bytes of array per bitmap bit
	DaemonSleep  int    // ms: the bitmap daemon's idle time before clearing
	// AIO: the members are aioDev (the engine's native AIO write path, no
	// volatile cache) instead of cacheDev.
	AIO   bool
	Files []string
}

func (s spec) String() string {
	return fmt.Sprintf("%s %d %d %d %d %d %d %d %d %d %t %s", s.Level, s.Disks, s.Layout, s.ChunkSectors, s.DevSectors,
		s.DataOff, s.BitmapStart, s.Slots, s.BitmapChunk, s.DaemonSleep, s.AIO, strings.Join(s.Files, ","))
}

func parseSpec(str string) (spec, error) {
	f := strings.Fields(str)
	if len(f) != 12 {
		return spec{}, fmt.Errorf("spec %q: %d fields, want 12", str, len(f))
	}
	var s spec
	s.Level = f[0]
	nums := make([]int64, 9)
	for i := range nums {
		v, err := strconv.ParseInt(f[i+1], 10, 64)
		if err != nil {
			return spec{}, fmt.Errorf("spec %q: field %d: %w", str, i+1, err)
		}
		nums[i] = v
	}
	s.Disks, s.Layout, s.ChunkSectors, s.DevSectors = int(nums[0]), uint32(nums[1]), uint32(nums[2]), uint64(nums[3])
	s.DataOff, s.BitmapStart, s.Slots, s.BitmapChunk, s.DaemonSleep = nums[4], nums[5], int(nums[6]), nums[7], int(nums[8])
	aio, err := strconv.ParseBool(f[10])
	if err != nil {
		return spec{}, fmt.Errorf("spec %q: field 10: %w", str, err)
	}
	s.AIO = aio
	s.Files = strings.Split(f[11], ",")
	return s, nil
}

func (s spec) geometry() (raid.Geometry, error) {
	switch s.Level {
	case "raid1":
		return raid.NewRAID1(s.Disks, s.DevSectors)
	case "raid10":
		return raid.NewRAID10(s.Disks, s.Layout, s.ChunkSectors, s.DevSectors)
	}
	return raid.Geometry{}, fmt.Errorf("unknown level %q", s.Level)
}

// bitmap returns the clustered bitmap's superblock and layout.
func (s spec) bitmap(g raid.Geometry) (bitmap.Superblock, bitmap.Layout, error) {
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: uint32(s.Slots),
		UUID: [16]byte{0xc7, 0xa5, 0x11}, SyncSize: uint64(g.Size() / 512), ChunkSize: uint32(s.BitmapChunk), DaemonSleep: 5}
	l, err := bitmap.NewLayout(&sb, s.BitmapStart, bitmap.SlotAlign)
	if err != nil {
		return sb, l, err
	}
	if err := l.CheckFits(s.BitmapStart, s.DataOff); err != nil {
		return sb, l, err
	}
	return sb, l, nil
}

// Chunks of the array belong to the nodes in turn (chunk c to node c%3+1)
// and, within a node, to its two writers in turn: nobody writes another's
// chunks, as a cluster file system keeps nodes off each other's blocks.
// (Cross-node writes to one chunk would need the array manager's resync
// window broadcast, which this test does not run; see docs/raid.md.)
const (
	nodes          = 3
	writersPerNode = 2
)

func chunkOwner(c uint64) (node, writer int) {
	return int(c%nodes) + 1, int(c/nodes) % writersPerNode
}

// Block format: every 4 KiB block a writer writes holds a header (magic,
// the block's array index, the write's version) and a body generated from
// the two, so any block read back names the write it came from, and a
// torn or misplaced block is caught. Versions are epoch<<32 | sequence:
// each restart of a node is a new epoch, so a block's versions only grow.
var blockMagic = [8]byte{'m', 'd', 'c', 'r', 'a', 's', 'h', '1'}

var le = binary.LittleEndian

func fillBlock(b []byte, blk, ver uint64) {
	copy(b, blockMagic[:])
	le.PutUint64(b[8:], blk)
	le.PutUint64(b[16:], ver)
	s := blk*0x9e3779b97f4a7c15 ^ ver*0xbf58476d1ce4e5b9 ^ 0x94d049bb133111eb
	for i := 24; i < pageSize; i += 8 {
		s ^= s << 13
		s ^= s >> 7
		s ^= s << 17
		le.PutUint64(b[i:], s)
	}
}

// decodeBlock returns the version a block holds (0: never written).
func decodeBlock(b []byte, blk uint64) (uint64, error) {
	if !bytes.Equal(b[:8], blockMagic[:]) {
		for _, x := range b {
			if x != 0 {
				return 0, fmt.Errorf("block %d: neither written by a writer nor zero (starts % x)", blk, b[:16])
			}
		}
		return 0, nil
	}
	if got := le.Uint64(b[8:]); got != blk {
		return 0, fmt.Errorf("block %d holds block %d's data", blk, got)
	}
	ver := le.Uint64(b[16:])
	want := make([]byte, pageSize)
	fillBlock(want, blk, ver)
	if !bytes.Equal(b, want) {
		return 0, fmt.Errorf("block %d: version %s torn (body does not match its header)", blk, verString(ver))
	}
	return ver, nil
}

func verString(v uint64) string { return fmt.Sprintf("%d.%d", v>>32, v&0xffffffff) }
