package raid

import (
	"errors"
	"fmt"
	"strings"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// Level is the md personality of an array. Only the two mirrored levels
// md-cluster supports are implemented.
type Level int

const (
	// RAID1 mirrors the whole data area of every member: each member holds
	// the array at the same offset of its data area.
	RAID1 Level = 1
	// RAID10 stripes chunks over the members and keeps near × far copies
	// of each, in md's near, far or offset arrangement.
	RAID10 Level = 10
)

// String returns md's name for the level ("raid1", "raid10").
func (l Level) String() string {
	switch l {
	case RAID1:
		return "raid1"
	case RAID10:
		return "raid10"
	}
	return fmt.Sprintf("level(%d)", int(l))
}

// md's raid10 layout word, as stored in the superblock's layout field:
// near copies in bits 0-7, far copies in bits 8-15, the offset flag in bit
// 16. Bit 17 and above select "far sets" (a later variant of the far
// arrangement) and are refused here.
const (
	layoutNearMask  = 0xff
	layoutFarShift  = 8
	layoutFarMask   = 0xff
	LayoutOffsetBit = 1 << 16 // far copies in adjacent stripes instead of far apart
	layoutKnownBits = LayoutOffsetBit | layoutFarMask<<layoutFarShift | layoutNearMask
)

// MaxCopies bounds the copies of one block the engine keeps per request on
// the stack; larger arrays still work (the slice grows).
const maxStackCopies = 8

// ErrGeometry is wrapped by every error about an impossible or unsupported
// array shape.
var ErrGeometry = errors.New("unsupported array geometry")

// Geometry maps array byte offsets to the places (member, offset within the
// member's data area) where md keeps each copy, for raid1 and for raid10
// with the near, far and offset layouts. It is a value: immutable, safe to
// share, and every method is a pure function. Offsets are in bytes; md's
// superblock counts 512-byte sectors, and the constructors take sectors
// where the superblock does.
//
// The raid10 rules, from md's layout description (drivers/md/raid10.c's
// header comment and md(4)):
//
//   - Array chunk c is first laid out as "virtual chunk" v = c·near. Device
//     row r = v / disks, device d = v mod disks. With the offset flag the
//     row is multiplied by far (each array row takes far device rows).
//   - The near copies are v, v+1, …, v+near−1 in that raid0-like order:
//     copy n sits on device d+n, wrapping to device 0 one chunk further down
//     (one device chunk row, also with the offset flag).
//   - Each near copy has far−1 far copies: the f-th is near copies' device
//     plus f·near (mod disks), stride·f bytes further down the device. The
//     stride is one chunk with the offset flag; otherwise it is the used
//     device size divided by far, so the far copies fill the later
//     sections of each device.
//   - md sizes the array from the per-device size (superblock "size"):
//     array chunks A = ⌊⌊devChunks/far⌋·disks/near⌋; the device space used
//     is ⌈A·copies/disks⌉ chunks; the stride is that divided by far.
type Geometry struct {
	level   Level
	disks   int
	near    int
	far     int
	offset  bool
	chunk   int64 // bytes; raid10 only
	devSize int64 // bytes of each member's data area the array uses
	stride  int64 // bytes between far copies on one device
	size    int64 // array bytes
}

// NewRAID1 returns the geometry of a raid1 array of disks mirrors whose
// members each contribute devSectors sectors (the superblock's size).
func NewRAID1(disks int, devSectors uint64) (Geometry, error) {
	if disks < 1 {
		return Geometry{}, fmt.Errorf("%w: raid1 with %d disks", ErrGeometry, disks)
	}
	if devSectors == 0 || devSectors > 1<<53 {
		return Geometry{}, fmt.Errorf("%w: raid1 device size of %d sectors", ErrGeometry, devSectors)
	}
	sz := int64(devSectors) * superblock.SectorSize
	return Geometry{level: RAID1, disks: disks, near: disks, far: 1, devSize: sz, size: sz}, nil
}

// NewRAID10 returns the geometry of a raid10 array: disks members, md's
// layout word (near copies in bits 0-7, far in 8-15, offset flag 0x10000),
// a chunk of chunkSectors sectors (a power of two, at least 8 as md
// requires), and devSectors sectors contributed by each member (the
// superblock's size).
func NewRAID10(disks int, layout uint32, chunkSectors uint32, devSectors uint64) (Geometry, error) {
	near := int(layout & layoutNearMask)
	far := int(layout >> layoutFarShift & layoutFarMask)
	offset := layout&LayoutOffsetBit != 0
	switch {
	case layout&^uint32(layoutKnownBits) != 0:
		return Geometry{}, fmt.Errorf("%w: raid10 layout %#x uses far sets (bit 17 and up), which this engine does not implement", ErrGeometry, layout)
	case disks < 2:
		return Geometry{}, fmt.Errorf("%w: raid10 with %d disks", ErrGeometry, disks)
	case near < 1 || far < 1:
		return Geometry{}, fmt.Errorf("%w: raid10 layout %#x has near=%d far=%d", ErrGeometry, layout, near, far)
	case near*far < 2 || near*far > disks:
		return Geometry{}, fmt.Errorf("%w: raid10 layout %#x: %d copies over %d disks (md needs 2 ≤ copies ≤ disks)", ErrGeometry, layout, near*far, disks)
	case chunkSectors < 8 || chunkSectors&(chunkSectors-1) != 0:
		return Geometry{}, fmt.Errorf("%w: raid10 chunk of %d sectors (md needs a power of two of at least 4 KiB)", ErrGeometry, chunkSectors)
	case offset && far > 1 && near > 1 && disks%near != 0:
		// md wraps a near copy to the next device chunk row, which with
		// the offset flag is the row holding the previous chunks' offset
		// copies: two array blocks would share a place (the property
		// tests show it). mdadm does not create such arrays.
		return Geometry{}, fmt.Errorf("%w: raid10 offset layout %#x with %d disks: near copies (%d) must divide the disks", ErrGeometry, layout, disks, near)
	case devSectors > 1<<53:
		return Geometry{}, fmt.Errorf("%w: raid10 device size of %d sectors", ErrGeometry, devSectors)
	}
	chunk := int64(chunkSectors) * superblock.SectorSize
	devChunks := int64(devSectors) / int64(chunkSectors)
	arrayChunks := func(perDev int64) int64 { return perDev / int64(far) * int64(disks) / int64(near) }
	a := arrayChunks(devChunks)
	if a == 0 {
		return Geometry{}, fmt.Errorf("%w: raid10 of %d sectors per device holds no whole chunk of %d sectors", ErrGeometry, devSectors, chunkSectors)
	}
	copies := int64(near * far)
	used := (a*copies + int64(disks) - 1) / int64(disks) // chunks per device, rounded up
	stride := chunk
	if !offset {
		stride = used / int64(far) * chunk
	}
	return Geometry{
		level: RAID10, disks: disks, near: near, far: far, offset: offset, chunk: chunk,
		devSize: used * chunk, stride: stride, size: arrayChunks(used) * chunk,
	}, nil
}

// FromSuperblock returns the geometry a member's v1 superblock describes
// (level, layout, chunk, raid_disks and size).
func FromSuperblock(sb *superblock.Superblock) (Geometry, error) {
	var g Geometry
	var err error
	switch sb.Level {
	case superblock.LevelRAID1:
		g, err = NewRAID1(int(sb.RaidDisks), sb.Size)
	case superblock.LevelRAID10:
		g, err = NewRAID10(int(sb.RaidDisks), sb.Layout, sb.ChunkSize, sb.Size)
	default:
		return Geometry{}, fmt.Errorf("%w: md level %d (only raid1 and raid10)", ErrGeometry, sb.Level)
	}
	if err != nil {
		return Geometry{}, fmt.Errorf("geometry from superblock: %w", err)
	}
	return g, nil
}

// Level returns raid1 or raid10.
func (g Geometry) Level() Level { return g.level }

// Disks returns raid_disks, the number of member slots (roles).
func (g Geometry) Disks() int { return g.disks }

// Near returns the raid10 near copies (raid1: the number of mirrors).
func (g Geometry) Near() int { return g.near }

// Far returns the raid10 far copies (raid1: 1).
func (g Geometry) Far() int { return g.far }

// Offset reports the raid10 offset flag.
func (g Geometry) Offset() bool { return g.offset }

// Copies returns how many copies of each block the array keeps.
func (g Geometry) Copies() int { return g.near * g.far }

// ChunkSize returns the raid10 chunk in bytes (0 for raid1, which has none).
func (g Geometry) ChunkSize() int64 { return g.chunk }

// Size returns the array size in bytes.
func (g Geometry) Size() int64 { return g.size }

// DevSize returns the bytes of each member's data area the array uses. A
// member must offer at least this much after its data offset.
func (g Geometry) DevSize() int64 { return g.devSize }

// Stride returns the distance in bytes between a block's far copies on the
// members (0 when there are no far copies).
func (g Geometry) Stride() int64 {
	if g.far == 1 {
		return 0
	}
	return g.stride
}

// Layout returns md's layout word for the geometry (0 for raid1).
func (g Geometry) Layout() uint32 {
	if g.level != RAID10 {
		return 0
	}
	l := uint32(g.near) | uint32(g.far)<<layoutFarShift
	if g.offset {
		l |= LayoutOffsetBit
	}
	return l
}

// String describes the geometry the way an operator reads it.
func (g Geometry) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s disks=%d", g.level, g.disks)
	if g.level == RAID10 {
		fmt.Fprintf(&b, " near=%d far=%d", g.near, g.far)
		if g.offset {
			b.WriteString(" offset")
		}
		fmt.Fprintf(&b, " chunk=%dK", g.chunk>>10)
	}
	fmt.Fprintf(&b, " size=%d", g.size)
	return b.String()
}

// Loc is one copy of an array block: the member (role) holding it and the
// byte offset within that member's data area (the member's data_offset is
// added by whoever does the I/O).
type Loc struct {
	Member int
	Off    int64
}

// Locate returns the copies of the array byte at off, appended to buf, in
// md's copy order (the order md tries them; "first in-sync copy" means the
// first of these whose member is in sync), and run: how many bytes from
// off, up to the end of the array, keep the same relation (every copy
// continues contiguously on its member). off must be in [0, Size()).
func (g Geometry) Locate(off int64, buf []Loc) (locs []Loc, run int64) {
	if g.level == RAID1 {
		for m := 0; m < g.disks; m++ {
			buf = append(buf, Loc{Member: m, Off: off})
		}
		return buf, g.size - off
	}
	c, within := off/g.chunk, off%g.chunk
	v := c * int64(g.near)
	row, dev := v/int64(g.disks), int(v%int64(g.disks))
	if g.offset {
		row *= int64(g.far)
	}
	base := row*g.chunk + within
	for n := 0; n < g.near; n++ {
		d, s := dev+n, base
		if d >= g.disks {
			// The near copies wrapped past the last device: they
			// continue on device 0 one device chunk further down.
			d -= g.disks
			s += g.chunk
		}
		for f := 0; f < g.far; f++ {
			buf = append(buf, Loc{Member: (d + f*g.near) % g.disks, Off: s + int64(f)*g.stride})
		}
	}
	run = g.chunk - within
	if rest := g.size - off; run > rest {
		run = rest
	}
	return buf, run
}

// Virt is the inverse of Locate: the array offset whose copy sits at byte
// devOff of member's data area, and which of the copies (the index into
// Locate's result) it is. ok is false when the array keeps nothing there
// (past the used area, or a chunk slot the layout leaves empty). run is
// how many bytes from devOff stay within one chunk (and so map to
// consecutive array bytes).
func (g Geometry) Virt(member int, devOff int64) (off int64, copy int, run int64, ok bool) {
	if member < 0 || member >= g.disks || devOff < 0 || devOff >= g.devSize {
		return 0, 0, 0, false
	}
	if g.level == RAID1 {
		return devOff, member, g.devSize - devOff, true
	}
	dc, within := devOff/g.chunk, devOff%g.chunk
	run = g.chunk - within
	var f, row int64
	if g.offset {
		f, row = dc%int64(g.far), dc/int64(g.far)
	} else {
		sc := g.stride / g.chunk
		f, row = dc/sc, dc%sc
		if f >= int64(g.far) {
			return 0, 0, 0, false
		}
	}
	d0 := ((member-int(f)*g.near)%g.disks + g.disks) % g.disks
	v := row*int64(g.disks) + int64(d0)
	c, n := v/int64(g.near), v%int64(g.near)
	off = c*g.chunk + within
	if off >= g.size {
		return 0, 0, 0, false
	}
	return off, int(n)*g.far + int(f), run, true
}

// Survives reports whether every array block keeps at least one copy on a
// member for which ok returns true: whether the array can still serve all
// its data with only those members. For raid10 the copy pattern repeats
// every disks chunks (it depends only on c·near mod disks), so checking
// that many chunks checks the whole array.
func (g Geometry) Survives(ok func(member int) bool) bool {
	if g.level == RAID1 {
		for m := 0; m < g.disks; m++ {
			if ok(m) {
				return true
			}
		}
		return false
	}
	var buf [maxStackCopies]Loc
	for c := int64(0); c < int64(g.disks) && c*g.chunk < g.size; c++ {
		locs, _ := g.Locate(c*g.chunk, buf[:0])
		alive := false
		for _, l := range locs {
			if ok(l.Member) {
				alive = true
				break
			}
		}
		if !alive {
			return false
		}
	}
	return true
}

// Extent is a piece of an array range that maps contiguously onto each of
// its copies.
type Extent struct {
	Off, Len int64 // array bytes
	Copies   []Loc // in md's copy order; valid only during the callback
}

// Extents calls fn for the consecutive extents of [off, off+n) (clipped to
// the array) in increasing order, stopping early when fn returns false.
// For raid1 the whole range is one extent; for raid10 an extent never
// crosses a chunk.
func (g Geometry) Extents(off, n int64, fn func(Extent) bool) {
	end := off + n
	if end > g.size {
		end = g.size
	}
	var stack [maxStackCopies]Loc
	for off < end {
		locs, run := g.Locate(off, stack[:0])
		if run > end-off {
			run = end - off
		}
		if !fn(Extent{Off: off, Len: run, Copies: locs}) {
			return
		}
		off += run
	}
}
