package bitmap

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
)

// ErrNoRoom is returned (wrapped) when the bitmap slots do not fit in the
// space the md superblock leaves for them.
var ErrNoRoom = errors.New("bitmap does not fit")

// Layout says where each node slot of a bitmap lives on a member device.
// Slot i occupies [Start+i*SlotSize, Start+(i+1)*SlotSize). A non-clustered
// bitmap has exactly one slot.
type Layout struct {
	// Start is the byte offset of slot 0's superblock on the device
	// (super_offset + bitmap_offset sectors, times 512, for an internal
	// bitmap).
	Start int64
	// SlotSize is the stride between slots in bytes (a multiple of the
	// alignment; see Superblock.SlotBytes).
	SlotSize int64
	// Slots is the number of slots: Nodes for a clustered bitmap, else 1.
	Slots int
	// Bits is the number of chunk bits in each slot.
	Bits uint64
	// ChunkSize is the number of bytes each bit covers.
	ChunkSize uint32
}

// NewLayout computes the layout of the bitmap whose (slot 0) superblock is
// sb and which starts at byte start. align is 4096 for normal internal
// bitmaps (use AlignFor to pick it the way mdadm does).
func NewLayout(sb *Superblock, start int64, align uint64) (Layout, error) {
	if err := sb.Validate(); err != nil {
		return Layout{}, fmt.Errorf("bitmap layout: %w", err)
	}
	if start < 0 {
		return Layout{}, fmt.Errorf("bitmap layout: negative start offset %d", start)
	}
	slots := 1
	if sb.Nodes > 0 {
		slots = int(sb.Nodes)
	}
	size := sb.SlotBytes(align)
	hi, total := bits.Mul64(size, uint64(slots))
	if hi != 0 || total > 1<<62 || uint64(start)+total > 1<<62 {
		return Layout{}, fmt.Errorf("bitmap layout: %d slots of %d bytes: %w: size overflows", slots, size, ErrCorrupt)
	}
	return Layout{Start: start, SlotSize: int64(size), Slots: slots, Bits: sb.Bits(), ChunkSize: sb.ChunkSize}, nil
}

// AlignFor returns the slot alignment mdadm uses for a bitmap at
// bitmapOffset sectors from the md superblock: 4096 when the offset is a
// multiple of 8 sectors, 512 otherwise.
func AlignFor(bitmapOffset int32) uint64 {
	if bitmapOffset&7 != 0 {
		return 512
	}
	return SlotAlign
}

// SlotOffset returns the byte offset of slot i's superblock.
func (l Layout) SlotOffset(i int) int64 { return l.Start + int64(i)*l.SlotSize }

// End returns the byte offset just past the last slot.
func (l Layout) End() int64 { return l.Start + int64(l.Slots)*l.SlotSize }

// BitBytes returns the number of bytes holding the chunk bits of one slot.
func (l Layout) BitBytes() int { return int((l.Bits + 7) / 8) }

// CheckFits verifies that all slots end at or before limit (a byte offset,
// e.g. the start of the data area) and do not start before floor (e.g. the
// end of the md superblock). It is how a slot count that cannot fit before
// data_offset is reported.
func (l Layout) CheckFits(floor, limit int64) error {
	if l.Start < floor {
		return fmt.Errorf("%w: bitmap starts at byte %d, inside the md superblock (ends at %d)", ErrNoRoom, l.Start, floor)
	}
	if l.End() > limit {
		return fmt.Errorf("%w: %d slot(s) of %d bytes from byte %d end at %d, beyond %d (data offset)", ErrNoRoom, l.Slots, l.SlotSize, l.Start, l.End(), limit)
	}
	return nil
}

// Chunk returns the chunk index that covers byte offset off of the data
// area (as seen by the bitmap: device offset for raid1, array offset for
// raid10).
func (l Layout) Chunk(off int64) uint64 { return uint64(off) / uint64(l.ChunkSize) }

// Slot is one node's bitmap: its superblock and its chunk bits.
type Slot struct {
	Super Superblock
	bits  []byte
	nbits uint64
}

// NewSlot returns a slot with every bit clear for the bitmap described by sb.
func NewSlot(sb Superblock) (*Slot, error) {
	if err := sb.Validate(); err != nil {
		return nil, fmt.Errorf("new bitmap slot: %w", err)
	}
	n := sb.Bits()
	return &Slot{Super: sb, bits: make([]byte, (n+7)/8), nbits: n}, nil
}

// Len returns the number of chunk bits.
func (s *Slot) Len() uint64 { return s.nbits }

// Test reports whether chunk i is marked dirty.
func (s *Slot) Test(i uint64) bool { return i < s.nbits && s.bits[i/8]&(1<<(i%8)) != 0 }

// Set marks chunk i dirty and reports whether the bit changed (0 -> 1).
func (s *Slot) Set(i uint64) bool {
	if i >= s.nbits || s.bits[i/8]&(1<<(i%8)) != 0 {
		return false
	}
	s.bits[i/8] |= 1 << (i % 8)
	return true
}

// Clear marks chunk i clean and reports whether the bit changed (1 -> 0).
func (s *Slot) Clear(i uint64) bool {
	if i >= s.nbits || s.bits[i/8]&(1<<(i%8)) == 0 {
		return false
	}
	s.bits[i/8] &^= 1 << (i % 8)
	return true
}

// SetAll marks every chunk dirty (a full resync), the state mdadm gives
// slot 0 of a new bitmap.
func (s *Slot) SetAll() {
	for i := uint64(0); i < s.nbits; i++ {
		s.Set(i)
	}
}

// Dirty returns the number of dirty chunks.
func (s *Slot) Dirty() uint64 {
	var n uint64
	for i, b := range s.bits {
		if uint64(i+1)*8 > s.nbits {
			b &= byte(1<<(s.nbits%8)) - 1
		}
		n += uint64(bits.OnesCount8(b))
	}
	return n
}

// DirtyChunks returns the indices of the dirty chunks in increasing order.
func (s *Slot) DirtyChunks() []uint64 {
	var out []uint64
	for i := uint64(0); i < s.nbits; i++ {
		if s.Test(i) {
			out = append(out, i)
		}
	}
	return out
}

// BitBytes returns the raw on-disk bit bytes (shared, not a copy).
func (s *Slot) BitBytes() []byte { return s.bits }

// Encode returns the slot's on-disk image, exactly size bytes long
// (normally Layout.SlotSize): superblock, bits, then fill in the padding.
// mdadm fills the padding of a new slot 0 with 0xff and others with 0x00;
// md itself never reads it.
func (s *Slot) Encode(size int64, fill byte) ([]byte, error) {
	need := int64(SuperblockSize) + int64(len(s.bits))
	if size < need {
		return nil, fmt.Errorf("bitmap slot: %w: %d bytes needed, slot is %d", ErrNoRoom, need, size)
	}
	b := make([]byte, size)
	s.Super.encode(b)
	copy(b[SuperblockSize:], s.bits)
	if fill != 0 {
		for i := need; i < size; i++ {
			b[i] = fill
		}
	}
	return b, nil
}

// DecodeSlot parses a slot image (superblock followed by the bits).
func DecodeSlot(b []byte) (*Slot, error) {
	sb, err := ParseSuperblock(b)
	if err != nil {
		return nil, err
	}
	if err := sb.Validate(); err != nil {
		return nil, fmt.Errorf("new bitmap slot: %w", err)
	}
	// Check the length before NewSlot allocates what the header promises.
	n := sb.Bits()
	if need := SuperblockSize + (n+7)/8; uint64(len(b)) < need {
		return nil, fmt.Errorf("bitmap slot: truncated: %d chunk bits need %d bytes, have %d", n, need, len(b))
	}
	s, err := NewSlot(*sb)
	if err != nil {
		return nil, err
	}
	copy(s.bits, b[SuperblockSize:])
	return s, nil
}

// ReadSlot reads and validates slot i of the bitmap laid out as l.
func ReadSlot(r io.ReaderAt, l Layout, i int) (*Slot, error) {
	if i < 0 || i >= l.Slots {
		return nil, fmt.Errorf("bitmap slot %d: out of range (0..%d)", i, l.Slots-1)
	}
	want := SuperblockSize + l.BitBytes()
	buf, err := readGrowing(r, l.SlotOffset(i), want)
	if len(buf) < want {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("bitmap slot %d at byte %d: read %d of %d bytes: %w", i, l.SlotOffset(i), len(buf), want, err)
	}
	s, err := DecodeSlot(buf)
	if err != nil {
		return nil, fmt.Errorf("bitmap slot %d: %w", i, err)
	}
	if s.nbits != l.Bits {
		return nil, fmt.Errorf("bitmap slot %d: %w: %d chunk bits, slot 0 has %d", i, ErrCorrupt, s.nbits, l.Bits)
	}
	return s, nil
}

// firstRead is the size of readGrowing's first read.
const firstRead = 64 << 10

// readGrowing reads up to want bytes at off. It starts with a small buffer
// and doubles it only while the reader keeps filling it, so a header that
// promises far more than the device holds (up to MaxBits/8 bytes) costs
// about what the device holds, not what the header promises. It returns
// what it read, and the read error when that is less than want.
func readGrowing(r io.ReaderAt, off int64, want int) ([]byte, error) {
	buf := make([]byte, min(want, firstRead))
	got := 0
	for {
		n, err := r.ReadAt(buf[got:], off+int64(got))
		got += n
		if got < len(buf) {
			return buf[:got], err
		}
		if got == want {
			return buf, nil
		}
		grow := min(want-got, got)
		buf = slices.Grow(buf, grow)[:got+grow]
	}
}

// WriteSlot writes slot i (superblock and bits; the padding is left alone).
func WriteSlot(w io.WriterAt, l Layout, i int, s *Slot) error {
	if i < 0 || i >= l.Slots {
		return fmt.Errorf("bitmap slot %d: out of range (0..%d)", i, l.Slots-1)
	}
	if s.nbits != l.Bits {
		return fmt.Errorf("bitmap slot %d: has %d bits, layout has %d", i, s.nbits, l.Bits)
	}
	b := make([]byte, SuperblockSize+len(s.bits))
	s.Super.encode(b)
	copy(b[SuperblockSize:], s.bits)
	if _, err := w.WriteAt(b, l.SlotOffset(i)); err != nil {
		return fmt.Errorf("bitmap slot %d: write: %w", i, err)
	}
	return nil
}

// Format writes a fresh bitmap: every slot gets a copy of sb (events
// as given) and full padding. Slot 0 is all dirty when initialDirty is true,
// as mdadm does at create time so that the first assembly resyncs the whole
// array; the other slots start clean.
func Format(w io.WriterAt, sb Superblock, l Layout, initialDirty bool) error {
	for i := 0; i < l.Slots; i++ {
		s, err := NewSlot(sb)
		if err != nil {
			return err
		}
		fill := byte(0)
		if i == 0 && initialDirty {
			// Like mdadm: every byte after the superblock is 0xff,
			// including unused bits of the last byte.
			for j := range s.bits {
				s.bits[j] = 0xff
			}
			fill = 0xff
		}
		img, err := s.Encode(l.SlotSize, fill)
		if err != nil {
			return fmt.Errorf("bitmap slot %d: %w", i, err)
		}
		if _, err := w.WriteAt(img, l.SlotOffset(i)); err != nil {
			return fmt.Errorf("bitmap slot %d: write: %w", i, err)
		}
	}
	return nil
}
