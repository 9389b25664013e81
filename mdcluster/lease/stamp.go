// Package lease is storage fencing that needs nothing but the shared member
// devices: a generation stamp written in a region of each member that md
// never touches, and an I/O lease every node keeps by re-reading it.
//
//   - Record is the on-disk stamp (Encode, Decode), kept in the first 4 KiB
//     of each v1.2 member, before md's superblock (see docs/quorum-and-fencing.md).
//   - Stamper writes the generation of a new view on every member
//     (fence.GenerationStamper) and reads the highest valid stamp back.
//   - State is the lease's pure decision logic (time is an input).
//   - Guard drives it: it re-reads the stamp before each bitmap flush
//     (Owner, an intent.Ownership) and at least once per half lease (Run),
//     and gates the RAID engine's I/O (raid.IOGate).
//   - FenceWait is how long the fencing node waits after stamping before
//     it may recover the victim's slot: lease + margin.
//
// Only local monotonic clocks are used. No two nodes compare timestamps.
package lease

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"time"
	"unsafe"
)

// On-disk layout of the stamp region.
const (
	// RegionOffset is where the stamp region starts on a member (byte 0).
	RegionOffset = 0
	// RegionSize is the region: sectors 0-7, everything before the v1.2
	// superblock at 4 KiB. The stamp is read and written as this one
	// 4 KiB block (so 4Kn devices with O_DIRECT work); only the first
	// RecordSize bytes are ours, the rest is preserved on write.
	RegionSize = 4096
	// RecordSize is the encoded size of a Record.
	RecordSize = 128
	// Version is the record format version this code writes and reads.
	Version = 1
)

// Magic opens every record. It is not md's superblock magic (0xa92b4efc),
// so mdadm's and the kernel's probe for a v1.1 superblock at sector 0
// never mistake a stamp for one, and mdadm --create's zeroing of old
// superblocks (which checks that magic) never erases it.
var Magic = [8]byte{'M', 'D', 'C', 'F', 'E', 'N', 'C', 'E'}

// Record is one member's generation stamp.
type Record struct {
	// Array is the array's UUID (the superblock's set_uuid): a stamp from
	// another array is refused, not obeyed.
	Array [16]byte
	// Generation is the agreed view generation that stamped it. Nodes
	// whose view is older stop their I/O.
	Generation uint64
	// Node is the node that wrote it.
	Node uint32
	// Time is the stamping node's wall clock (Unix nanoseconds), for
	// logs and humans only: no decision uses it.
	Time int64
}

// Errors of the stamp region; test with errors.Is.
var (
	// ErrNoStamp: the record is all zero (never stamped). It reads as
	// generation 0.
	ErrNoStamp = errors.New("no generation stamp")
	// ErrCorrupt: the record is neither blank nor valid (a torn write, a
	// bad CRC, an unknown version, or foreign bytes).
	ErrCorrupt = errors.New("generation stamp torn or corrupt")
	// ErrForeign: a valid record of another array.
	ErrForeign = errors.New("generation stamp of another array")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Encode returns the RecordSize-byte encoding (little-endian):
//
//	0   magic "MDCFENCE"   8
//	8   version (1)        4
//	12  record size (128)  4
//	16  array UUID         16
//	32  generation         8
//	40  node ID            4
//	44  reserved (0)       4
//	48  time, Unix ns      8
//	56  reserved (0)       68
//	124 CRC32C of 0..123   4
func (r Record) Encode() []byte {
	b := make([]byte, RecordSize)
	le := binary.LittleEndian
	copy(b[0:], Magic[:])
	le.PutUint32(b[8:], Version)
	le.PutUint32(b[12:], RecordSize)
	copy(b[16:], r.Array[:])
	le.PutUint64(b[32:], r.Generation)
	le.PutUint32(b[40:], r.Node)
	le.PutUint64(b[48:], uint64(r.Time))
	le.PutUint32(b[124:], crc32.Checksum(b[:124], castagnoli))
	return b
}

// Decode parses a record from the start of b. A blank (all-zero) record
// is ErrNoStamp; anything else that is not a valid record is ErrCorrupt.
func Decode(b []byte) (Record, error) {
	if len(b) < RecordSize {
		return Record{}, fmt.Errorf("%w: %d bytes, need %d", ErrCorrupt, len(b), RecordSize)
	}
	b = b[:RecordSize]
	if allZero(b) {
		return Record{}, ErrNoStamp
	}
	le := binary.LittleEndian
	if !bytes.Equal(b[:8], Magic[:]) {
		return Record{}, fmt.Errorf("%w: bad magic %q", ErrCorrupt, b[:8])
	}
	if got, want := le.Uint32(b[124:]), crc32.Checksum(b[:124], castagnoli); got != want {
		return Record{}, fmt.Errorf("%w: CRC %#08x, computed %#08x", ErrCorrupt, got, want)
	}
	if v := le.Uint32(b[8:]); v != Version {
		return Record{}, fmt.Errorf("%w: version %d (this code knows %d)", ErrCorrupt, v, Version)
	}
	if n := le.Uint32(b[12:]); n != RecordSize {
		return Record{}, fmt.Errorf("%w: record size %d", ErrCorrupt, n)
	}
	if le.Uint32(b[44:]) != 0 || !allZero(b[56:124]) {
		return Record{}, fmt.Errorf("%w: reserved bytes set", ErrCorrupt)
	}
	var r Record
	copy(r.Array[:], b[16:32])
	r.Generation = le.Uint64(b[32:])
	r.Node = le.Uint32(b[40:])
	r.Time = int64(le.Uint64(b[48:]))
	return r, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Device is the I/O the stamp needs from a member (raid.Device and
// intent.Device have it). It is the raw member, never one gated by the
// lease: the lease must read the stamp while I/O is stopped.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
}

// fuaWriter is used when the device has it (raid.Device does).
type fuaWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// Stamper reads and writes the generation stamp on an array's members.
// It implements fence.GenerationStamper.
type Stamper struct {
	// Array is the array UUID written into and required of every record.
	Array [16]byte
	// Node is this node's ID, written into the records it stamps.
	Node uint32
	// Members returns the members to stamp and read: every member the
	// array still uses (in sync or recovering). A member the array has
	// failed must be left out, or one dead disk blocks fencing.
	Members func() []Device
	// Now is the wall clock for Record.Time; nil means time.Now.
	Now func() time.Time
}

// MemberError is one member's stamp failure.
type MemberError struct {
	Member int
	Err    error
}

func (e *MemberError) Error() string { return fmt.Sprintf("member %d: %v", e.Member, e.Err) }
func (e *MemberError) Unwrap() error { return e.Err }

// ReadMember reads member d's stamp. A blank region reads as generation
// 0 with no error; a torn or corrupt one as ErrCorrupt; another array's
// as ErrForeign.
func (s *Stamper) ReadMember(d Device) (Record, error) {
	buf := alignedBlock()
	if _, err := d.ReadAt(buf, RegionOffset); err != nil {
		return Record{}, fmt.Errorf("read stamp region: %w", err)
	}
	r, err := Decode(buf)
	switch {
	case errors.Is(err, ErrNoStamp):
		return Record{Array: s.Array}, nil
	case err != nil:
		return Record{}, err
	case r.Array != s.Array:
		return Record{}, fmt.Errorf("%w: %x", ErrForeign, r.Array)
	}
	return r, nil
}

// Highest reads every member's stamp and returns the highest valid one.
// Any member that cannot be read, or holds a torn, corrupt or foreign
// record, is an error (joined *MemberError values, in member order),
// returned together with the highest stamp among the others: a node
// cannot know whether the unreadable member holds a newer generation, so
// the lease treats any error as "cannot read the stamp". The members are
// read in parallel: every renewal and every bitmap flush of the daemon
// waits for this read, which member after member cost the sum of the
// members' latencies.
func (s *Stamper) Highest() (Record, error) {
	var best Record
	best.Array = s.Array
	devs := s.Members()
	if len(devs) == 0 {
		return best, errors.New("stamp: no members")
	}
	recs := make([]Record, len(devs))
	memberErrs := make([]error, len(devs))
	var wg sync.WaitGroup
	for i, d := range devs {
		if d == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs[i], memberErrs[i] = s.ReadMember(d)
		}()
	}
	wg.Wait()
	var errs []error
	for i, d := range devs {
		if d == nil {
			continue
		}
		if err := memberErrs[i]; err != nil {
			errs = append(errs, &MemberError{Member: i, Err: err})
			continue
		}
		if recs[i].Generation > best.Generation {
			best = recs[i]
		}
	}
	return best, errors.Join(errs...)
}

// Stamp writes generation gen on every member (fence.GenerationStamper).
// A member already holding gen or a newer generation is left alone (the
// stamp never goes down). Each write preserves the rest of the 4 KiB
// region, is durable (FUA, or write then Sync) and is read back; the
// members are written in parallel, all with the same record. Stamp
// returns nil only when every member holds at least gen; otherwise the
// joined *MemberError values, so the fence fails and is retried (after
// the array has failed the member that cannot be written).
func (s *Stamper) Stamp(ctx context.Context, gen uint64) error {
	devs := s.Members()
	if len(devs) == 0 {
		return errors.New("stamp: no members")
	}
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// The members are stamped in parallel: the fence's wait starts when
	// the last one is durable, so a stamp that went member after member
	// (a read, a FUA write and a read back each) lengthened every fence
	// by all but one member's I/O.
	at := now()
	memberErrs := make([]error, len(devs))
	var wg sync.WaitGroup
	for i, d := range devs {
		if d == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.stampOne(d, gen, at); err != nil {
				memberErrs[i] = &MemberError{Member: i, Err: err}
			}
		}()
	}
	wg.Wait()
	var errs []error
	for _, err := range memberErrs {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("stamp generation %d: %w", gen, errors.Join(errs...))
	}
	return nil
}

func (s *Stamper) stampOne(d Device, gen uint64, now time.Time) error {
	buf := alignedBlock()
	if _, err := d.ReadAt(buf, RegionOffset); err != nil {
		return fmt.Errorf("read stamp region: %w", err)
	}
	old, err := Decode(buf)
	switch {
	case err == nil && old.Array != s.Array:
		return fmt.Errorf("%w: %x: refusing to overwrite", ErrForeign, old.Array)
	case err == nil && old.Generation >= gen:
		return nil // never lower the stamp
	}
	// ErrNoStamp and ErrCorrupt (a torn earlier stamp) are overwritten.
	rec := Record{Array: s.Array, Generation: gen, Node: s.Node, Time: now.UnixNano()}
	copy(buf, rec.Encode())
	if fw, ok := d.(fuaWriter); ok {
		if _, err := fw.WriteAtFUA(buf, RegionOffset); err != nil {
			return fmt.Errorf("write stamp: %w", err)
		}
	} else {
		if _, err := d.WriteAt(buf, RegionOffset); err != nil {
			return fmt.Errorf("write stamp: %w", err)
		}
		if err := d.Sync(); err != nil {
			return fmt.Errorf("sync stamp: %w", err)
		}
	}
	got, err := s.ReadMember(d)
	if err != nil {
		return fmt.Errorf("read back stamp: %w", err)
	}
	if got.Generation < gen {
		return fmt.Errorf("read back stamp: generation %d, wrote %d", got.Generation, gen)
	}
	return nil
}

// alignedBlock returns a zeroed RegionSize buffer aligned for O_DIRECT.
func alignedBlock() []byte {
	b := make([]byte, 2*RegionSize)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (RegionSize - 1)); r != 0 {
		skip = RegionSize - r
	}
	return b[skip : skip+RegionSize : skip+RegionSize]
}
