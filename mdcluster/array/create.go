// Package array is the on-disk side of mdcluster's array manager: it
// creates md arrays on member devices exactly as mdadm --create lays them
// out (v1.2 superblock, internal or clustered write-intent bitmap), reads
// members back to decide which of them make up the array (what mdadm
// --assemble and the kernel decide), and updates superblocks the way md does
// when a member fails, is removed, added or re-added.
//
// Everything here works on Members: devices that can be read and written
// at offsets. Nothing talks to the kernel's md driver; the arrays written
// here are the ones Linux md and mdadm read, and the tests check that with
// real mdadm and against images written by real mdadm and Linux.
//
// Every operation checks its whole input before it writes anything: a
// refused request leaves every member untouched.
package array

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// cryptoRand is where UUIDs come from unless a test injects its own.
var cryptoRand io.Reader = rand.Reader

// BitmapMode is the value of mdadm's --bitmap option.
type BitmapMode string

// Bitmap modes.
const (
	// BitmapDefault is mdadm's behaviour without --bitmap: an internal
	// bitmap when each member contributes more than 100 GiB, none
	// otherwise.
	BitmapDefault BitmapMode = ""
	// BitmapNone: no write-intent bitmap; after a crash md resyncs the
	// whole array.
	BitmapNone BitmapMode = "none"
	// BitmapInternal: a version 4 bitmap between the superblock and the
	// data, for one node.
	BitmapInternal BitmapMode = "internal"
	// BitmapClustered: a version 5 bitmap with one slot per cluster node
	// (md-cluster).
	BitmapClustered BitmapMode = "clustered"
)

// mdadm's defaults and md's limits used by Create.
const (
	// DefaultChunkSize is mdadm's raid10 chunk when none is given.
	DefaultChunkSize = 512 << 10
	// DefaultNodes is mdadm's node count for --bitmap=clustered.
	DefaultNodes = bitmap.DefaultNodes
	// MaxNodes is the most node slots Create writes: md-cluster recovers
	// slots through a 64-bit map, and the bitmap package refuses more.
	MaxNodes = bitmap.MaxNodes
	// MaxClusterName is the longest cluster name that survives in the
	// 64-byte, NUL-terminated field.
	MaxClusterName = bitmap.ClusterNameLen - 1
	// MaxName is the longest array name (set_name is 32 bytes, and mdadm
	// keeps a NUL).
	MaxName = superblock.MaxName

	// bitmapOffset is where mdadm puts an internal bitmap on v1.2
	// metadata: 8 sectors (4 KiB) after the superblock.
	bitmapOffset = 8
	// bblogSectors is the size of the bad-block log mdadm reserves.
	bblogSectors = 8
	// autoBitmapKiB is mdadm's threshold for an automatic bitmap: more
	// than 100 GiB used per member.
	autoBitmapKiB = 100 * 1024 * 1024
)

// CreateSpec is what mdadm --create is told: the options that matter for
// the on-disk result. The zero value of a field is mdadm's default, except
// for Level, RaidDevices and Name, which must be given, and Homehost and
// ClusterName, which mdadm finds itself (the host name, corosync's cluster
// name) and callers here pass in.
type CreateSpec struct {
	// Level is 1 (raid1) or 10 (raid10); mdcluster supports no other.
	Level int
	// RaidDevices is --raid-devices: the first RaidDevices members fill
	// the raid slots in order (nil members are "missing"), the rest are
	// spares.
	RaidDevices int
	// Layout is --layout for raid10: "nN" (near), "fN" (far) or "oN"
	// (offset) copies; "" is mdadm's default n2. Must be empty for raid1.
	Layout string
	// ChunkSize is --chunk in bytes (raid10 only): a power of two of at
	// least 4 KiB; 0 is mdadm's 512 KiB.
	ChunkSize int64
	// Bitmap is --bitmap.
	Bitmap BitmapMode
	// BitmapChunk is --bitmap-chunk in bytes: a power of two, at least
	// 4 KiB; 0 lets mdadm's rule choose (64 MiB, more for huge arrays).
	BitmapChunk int64
	// Nodes is --nodes, the number of bitmap slots of a clustered bitmap
	// (0 means mdadm's 4).
	Nodes int
	// ClusterName is --home-cluster, required for a clustered bitmap: the
	// DLM cluster name md-cluster checks when a node joins.
	ClusterName string
	// WriteBehind is --write-behind: writes to write-mostly members that
	// may lag (0..16383); needs a bitmap.
	WriteBehind int
	// Name is --name. mdadm stores it as "HOMEHOST:NAME" when Homehost is
	// set, the name has no ':' and both fit; otherwise as given.
	Name string
	// Homehost is --homehost. "" (or "<none>") means none. mdadm's
	// default is the machine's host name; callers that want that pass it.
	Homehost string
	// UUID is --uuid; the zero UUID means a random one.
	UUID [16]byte
	// AssumeClean is --assume-clean: the array is marked clean and md
	// does not resync it when it first starts.
	AssumeClean bool
	// Force is --force plus answering yes to mdadm's "Continue creating
	// array?": it allows overwriting members that hold md superblocks and
	// a raid1 with a single device.
	Force bool
	// WriteMostly and FailFast list member indexes created with
	// --write-mostly and --failfast.
	WriteMostly []int
	FailFast    []int
	// Rand is where the array and device UUIDs come from (crypto/rand
	// when nil): the array UUID first (unless UUID is set), then one
	// device UUID per present member, in member order.
	Rand io.Reader
	// Now gives the creation time (time.Now when nil).
	Now func() time.Time
}

// Info describes an array: what its superblocks (and bitmap) say.
type Info struct {
	UUID [16]byte
	// Name is the stored name, "host:name" or "name".
	Name   string
	Level  int32
	Layout uint32
	// ChunkSectors is the raid10 chunk in 512-byte sectors (0 for raid1).
	ChunkSectors uint32
	RaidDisks    int
	// DevSectors is the size every member contributes (sectors).
	DevSectors uint64
	// ArraySectors is the size of the array device (sectors).
	ArraySectors uint64
	// DataOffset is where data starts on the member the Info was read
	// from (sectors; mdadm gives every member the same).
	DataOffset uint64
	Events     uint64
	// Clean is true when no resync is pending (resync_offset = MaxSector).
	Clean   bool
	Created time.Time
	Updated time.Time
	// Bitmap is BitmapNone, BitmapInternal or BitmapClustered.
	Bitmap BitmapMode
	// BitmapChunk is the bytes covered by one bitmap bit (0 if unknown).
	BitmapChunk uint32
	// Nodes is the number of slots of a clustered bitmap.
	Nodes       int
	ClusterName string
}

// infoFrom describes the array from one member's superblock and, when it
// could be read, its bitmap superblock.
func infoFrom(sb *superblock.Superblock, bsb *bitmap.Superblock) Info {
	inf := Info{
		UUID: sb.SetUUID, Name: sb.Name(), Level: sb.Level, Layout: sb.Layout,
		ChunkSectors: sb.ChunkSize, RaidDisks: int(sb.RaidDisks), DevSectors: sb.Size,
		DataOffset: sb.DataOffset, Events: sb.Events, Clean: sb.Clean(),
		Created: timeFrom(sb.CTime), Updated: timeFrom(sb.UTime), Bitmap: BitmapNone,
	}
	inf.ArraySectors = arraySectors(sb.Level, sb.Layout, sb.ChunkSize, sb.RaidDisks, sb.Size)
	if sb.HasBitmap() {
		inf.Bitmap = BitmapInternal
		if sb.FeatureMap&superblock.FeatureClustered != 0 {
			inf.Bitmap = BitmapClustered
		}
	}
	if bsb != nil {
		inf.BitmapChunk, inf.Nodes, inf.ClusterName = bsb.ChunkSize, int(bsb.Nodes), bsb.Name()
		if bsb.Nodes > 0 {
			inf.Bitmap = BitmapClustered
		}
	}
	return inf
}

// arraySectors is md's array size for a member size of size sectors:
// raid1 exports one member's worth; raid10 (md's raid10_size) counts whole
// chunks, divides by the far copies, multiplies by the members and divides
// by the near copies.
func arraySectors(level int32, layout, chunk, raidDisks uint32, size uint64) uint64 {
	switch level {
	case superblock.LevelRAID1:
		return size
	case superblock.LevelRAID10:
		near, far := uint64(layout&0xff), uint64(layout>>8&0xff)
		if chunk == 0 || chunk&(chunk-1) != 0 || near == 0 || far == 0 {
			return 0
		}
		shift := uint(bits.TrailingZeros32(chunk))
		c := size >> shift / far
		hi, lo := bits.Mul64(c, uint64(raidDisks))
		if hi != 0 {
			return 0
		}
		return lo / near << shift
	}
	return 0
}

// Created is what Create wrote.
type Created struct {
	Info Info
	// Shared is the superblock content every member carries; its
	// per-device fields (see Compose) are those of no particular member.
	Shared *superblock.Superblock
	// Devices has one entry per member, in order; Super is nil for
	// missing members.
	Devices []Device
	// Bitmap is the bitmap superblock written to every slot (nil without
	// a bitmap), and BitmapLayout where its slots are.
	Bitmap       *bitmap.Superblock
	BitmapLayout bitmap.Layout
	// Warnings are the oddities mdadm warns about but accepts, such as a
	// member much larger than the array uses.
	Warnings []string
}

// ErrRefused is wrapped by every error Create returns before it has
// written anything: the request was invalid, a member was unsuitable or
// could not be read. The members are unchanged.
var ErrRefused = errors.New("create refused")

// refuse returns an ErrRefused error with the given message.
func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
}

// CreateWriteError is returned when writing a member failed. Members in
// Written were completely written, Failed may be partly written, and the
// members after it were not touched. As with mdadm, the array is not
// usable; run Create again (with Force) once the problem is fixed.
type CreateWriteError struct {
	Written []string
	Failed  string
	Err     error
}

// Error names the member that failed.
func (e *CreateWriteError) Error() string {
	return fmt.Sprintf("create: writing %s failed after %d member(s) were written: %v", e.Failed, len(e.Written), e.Err)
}

// Unwrap returns the I/O error.
func (e *CreateWriteError) Unwrap() error { return e.Err }

// Create writes a new array's md v1.2 superblock and write-intent bitmap
// to every member, byte for byte what mdadm 4.2 writes for the same
// options (see docs/array.md for what was compared and how):
//
//   - the data offset is mdadm's default for the first member's size
//     (about 0.1% headroom, at most 128 MiB, rounded up to 1 MiB), and the
//     used size is the smallest member's space after it, rounded as mdadm
//     rounds (64 KiB for raid1, the chunk for raid10);
//   - events are 0, create and update times are the creation second, the
//     resync offset is MaxSector with AssumeClean and 0 otherwise;
//   - the bitmap starts 4 KiB after the superblock; slot 0 is all dirty
//     and the other slots of a clustered bitmap are clean, as mdadm writes
//     them (md ignores the dirty bits of an array that is clean);
//   - the bad-block log follows the bitmap, except on clustered arrays.
//
// It refuses, before writing anything, what mdadm refuses (in mdadm's
// words where it has them) and what Linux md would refuse to run. A member
// that already holds an md superblock is refused unless spec.Force is set;
// with Force, old superblocks are zeroed as mdadm does. Unlike mdadm,
// Create does not talk to the kernel: the array is created, not started.
func Create(spec CreateSpec, members []Member) (*Created, error) {
	p, err := planCreate(spec, members)
	if err != nil {
		return nil, err
	}
	var written []string
	for i, d := range p.devices {
		if d.Member == nil {
			continue
		}
		if err := p.writeMember(i); err != nil {
			return nil, &CreateWriteError{Written: written, Failed: d.Member.Name(), Err: err}
		}
		written = append(written, d.Member.Name())
	}
	c := &Created{Info: infoFrom(p.shared, p.bitmap), Shared: p.shared, Devices: p.devices, Warnings: p.warnings}
	if p.bitmap != nil {
		c.Bitmap, c.BitmapLayout = p.bitmap, p.layout
	}
	return c, nil
}

// plan is everything Create will write, computed and checked up front.
type plan struct {
	shared   *superblock.Superblock
	devices  []Device
	blocks   [][]byte  // encoded superblock per member
	old      [][]oldSB // old superblocks to zero per member
	bitmap   *bitmap.Superblock
	layout   bitmap.Layout
	warnings []string
}

// oldSB is an md superblock found on a member before Create writes it.
type oldSB struct {
	offset int64 // bytes
	size   int   // bytes to zero
	desc   string
}

// ParseRaid10Layout is superblock.ParseRaid10Layout: mdadm's raid10 layout
// syntax (nN, fN, oN) as md's layout word.
func ParseRaid10Layout(s string) (uint32, error) { return superblock.ParseRaid10Layout(s) }

// chooseBMSpace is the room mdadm sets aside for a bitmap on a device of
// devSectors sectors when it has not sized one yet: 4 KiB, 64 KiB above
// 8 GiB, 128 KiB above 200 GiB (always whole 4 KiB blocks).
func chooseBMSpace(devSectors uint64) uint64 {
	switch {
	case devSectors < 64*2:
		return 0
	case devSectors-64*2 >= 200*1024*1024*2:
		return 128 * 2
	case devSectors-4*2 > 8*1024*1024*2:
		return 64 * 2
	}
	return 4 * 2
}

// DefaultDataOffset is mdadm's data offset (sectors) for v1.2 metadata on
// a device of devSectors sectors: 12 KiB of metadata, the bitmap room of
// chooseBMSpace, and headroom for reshapes of about 0.1% of the device
// (128 MiB halved until 1024 times it fits, but for raid10 not below twice
// the chunk), rounded up to 1 MiB. chunkKiB is the raid10 chunk in KiB, 0
// for raid1.
func DefaultDataOffset(devSectors, chunkKiB uint64) uint64 {
	headroom := uint64(128 * 1024 * 2)
	for headroom<<10 > devSectors && (chunkKiB == 0 || headroom/2 >= chunkKiB*2*2) {
		headroom >>= 1
	}
	return roundUp(12*2+chooseBMSpace(devSectors)+headroom, 2*1024)
}

func roundUp(v, to uint64) uint64 { return (v + to - 1) / to * to }

// bitmapChunk picks the bitmap chunk as mdadm does when creating: the
// room is chooseBMSpace of the used member size (at most 128 KiB when the
// chunk is not given); the smallest chunk is the first power of two from
// 4 KiB whose bits fit the room; without a request the chunk is that or
// 64 MiB, whichever is larger.
func bitmapChunk(usedSectors, syncSectors uint64, requested int64) (uint32, error) {
	room := chooseBMSpace(usedSectors)
	if requested == 0 && room > 128*2 {
		room = 128 * 2
	}
	if room <= 1 {
		return 0, fmt.Errorf("no room for a bitmap on members using %d sectors", usedSectors)
	}
	if syncSectors > 1<<54 {
		return 0, fmt.Errorf("a bitmap cannot cover %d sectors (md's limit is 8 EiB)", syncSectors)
	}
	maxBits := (room*512 - bitmap.SuperblockSize) * 8
	minChunk := uint64(4096)
	nbits := syncSectors*512/minChunk + 1
	for nbits > maxBits {
		minChunk *= 2
		nbits = (nbits + 1) / 2
	}
	chunk := uint64(requested)
	if requested == 0 {
		chunk = max(minChunk, bitmap.DefaultChunkSize)
	} else if chunk < minChunk {
		return 0, fmt.Errorf("Given bitmap chunk size not supported: %d bytes, at least %d needed for %d sectors", requested, minChunk, syncSectors)
	}
	if chunk > 1<<31 {
		return 0, fmt.Errorf("bitmap chunk %d bytes does not fit md's 32-bit field", chunk)
	}
	return uint32(chunk), nil
}

// planCreate checks spec and members and computes every byte Create will
// write. It reads the members (size, existing superblocks) and the random
// source, and writes nothing.
func planCreate(spec CreateSpec, members []Member) (*plan, error) {
	level := int32(spec.Level)
	if level != superblock.LevelRAID1 && level != superblock.LevelRAID10 {
		return nil, refuse("raid level %d is not supported: mdcluster creates raid1 and raid10 arrays", spec.Level)
	}
	mode := spec.Bitmap
	switch mode {
	case BitmapDefault, BitmapNone, BitmapInternal, BitmapClustered:
	default:
		return nil, refuse("bitmap must be 'internal', 'clustered' or 'none', not '%s'", mode)
	}
	nodes := spec.Nodes
	if mode == BitmapClustered {
		if nodes == 0 {
			nodes = DefaultNodes
		}
		if nodes < 2 {
			return nil, refuse("clustered array needs two nodes at least: %d", nodes)
		}
	} else if nodes != 0 {
		return nil, refuse("--nodes argument only compatible with --bitmap=clustered")
	}
	if spec.RaidDevices <= 0 {
		return nil, refuse("invalid number of raid devices: %d", spec.RaidDevices)
	}
	if spec.RaidDevices == 1 && !spec.Force {
		return nil, refuse("'1' is an unusual number of drives for an array, so it is probably a mistake.  If you really mean it you will need to specify --force before setting the number of drives.")
	}
	if spec.WriteBehind < 0 || spec.WriteBehind > bitmap.MaxWriteBehind {
		return nil, refuse("Invalid value for maximum outstanding write-behind writes: %d. Must be between 0 and %d.", spec.WriteBehind, bitmap.MaxWriteBehind)
	}
	if spec.WriteBehind > 0 && mode != BitmapInternal && mode != BitmapClustered {
		return nil, refuse("write-behind mode requires a bitmap.")
	}

	// Layout and chunk.
	var layout, chunkKiB uint32
	switch level {
	case superblock.LevelRAID1:
		if spec.Layout != "" {
			return nil, refuse("layout not meaningful for raid1 arrays.")
		}
		if spec.ChunkSize != 0 {
			return nil, refuse("specifying chunk size is forbidden for this level")
		}
	case superblock.LevelRAID10:
		ls := spec.Layout
		if ls == "" {
			ls = "n2"
		}
		l, err := ParseRaid10Layout(ls)
		if err != nil {
			return nil, refuse("%v", err)
		}
		layout = l
		if mode == BitmapClustered && layout&0x1ff00 != 0x100 {
			return nil, refuse("only near layout is supported with clustered raid10")
		}
		if copies := int(layout&0xff) * int(layout>>8&0xff); copies > spec.RaidDevices {
			return nil, refuse("that layout requires at least %d devices", copies)
		}
		chunk := spec.ChunkSize
		if chunk == 0 {
			chunk = DefaultChunkSize
		}
		if chunk < 4096 || chunk%1024 != 0 || chunk > 1<<30 {
			return nil, refuse("invalid chunk/rounding value: %d bytes (at least 4 KiB, a whole number of KiB)", chunk)
		}
		if chunk&(chunk-1) != 0 {
			return nil, refuse("chunk size %d bytes is not a power of 2: md's raid10 refuses it", chunk)
		}
		chunkKiB = uint32(chunk >> 10)
	}

	// Member list.
	if len(members) < spec.RaidDevices {
		return nil, refuse("You haven't given enough devices (real or missing) to create this array: %d given, %d raid devices", len(members), spec.RaidDevices)
	}
	if len(members) > superblock.MaxDevs {
		return nil, refuse("Too many devices: 1.x metadata only supports %d", superblock.MaxDevs)
	}
	present := 0
	names := map[string]int{}
	for i, m := range members {
		if m == nil {
			if i >= spec.RaidDevices {
				return nil, refuse("member %d is a spare and cannot be missing", i)
			}
			continue
		}
		if i < spec.RaidDevices {
			present++
		}
		n := m.Name()
		if j, dup := names[n]; dup {
			return nil, refuse("%s is listed twice (members %d and %d)", n, j, i)
		}
		names[n] = i
	}
	if present == 0 {
		return nil, refuse("Subdevs can't be all missing")
	}
	flags := make([]uint8, len(members))
	for _, idx := range spec.WriteMostly {
		if idx < 0 || idx >= len(members) || members[idx] == nil {
			return nil, refuse("write-mostly: no member %d", idx)
		}
		if mode == BitmapClustered {
			return nil, refuse("Can not set %s --write-mostly with a clustered bitmap", members[idx].Name())
		}
		flags[idx] |= superblock.DevFlagWriteMostly
	}
	for _, idx := range spec.FailFast {
		if idx < 0 || idx >= len(members) || members[idx] == nil {
			return nil, refuse("failfast: no member %d", idx)
		}
		flags[idx] |= superblock.DevFlagFailFast
	}

	// Names.
	if spec.Name == "" {
		return nil, refuse("an array name is required (mdadm derives one from the md device name)")
	}
	if len(spec.Name) > MaxName || strings.IndexByte(spec.Name, 0) >= 0 {
		return nil, refuse("array name %q: at most %d bytes without NUL (mdadm would silently truncate it)", spec.Name, MaxName)
	}
	homehost := spec.Homehost
	if strings.EqualFold(homehost, "<none>") {
		homehost = ""
	}
	setName := spec.Name
	if homehost != "" && !strings.Contains(spec.Name, ":") && len(homehost)+1+len(spec.Name) < 32 {
		setName = homehost + ":" + spec.Name
	}
	if mode == BitmapClustered {
		switch {
		case spec.ClusterName == "":
			return nil, refuse("a clustered bitmap needs the cluster name (--home-cluster): md-cluster joins only the cluster of that name")
		case len(spec.ClusterName) > bitmap.ClusterNameLen:
			return nil, refuse("Cluster name too big.")
		case len(spec.ClusterName) > MaxClusterName:
			return nil, refuse("cluster name %q: at most %d bytes (mdadm would cut it to fit the NUL-terminated field, and the cluster would not match)", spec.ClusterName, MaxClusterName)
		case strings.IndexByte(spec.ClusterName, 0) >= 0:
			return nil, refuse("cluster name %q contains a NUL byte", spec.ClusterName)
		}
	} else if spec.ClusterName != "" {
		return nil, refuse("a cluster name (--home-cluster) is only meaningful with --bitmap=clustered")
	}
	if spec.BitmapChunk != 0 {
		if mode != BitmapInternal && mode != BitmapClustered {
			return nil, refuse("a bitmap chunk is given but the bitmap is %q: ask for --bitmap=internal or clustered", bitmapModeName(mode))
		}
		if spec.BitmapChunk < 512 || spec.BitmapChunk&(spec.BitmapChunk-1) != 0 {
			return nil, refuse("invalid bitmap chunksize: %d (a power of two of at least 512 bytes)", spec.BitmapChunk)
		}
	}

	// Sizes and existing metadata.
	sectors := make([]uint64, len(members))
	old := make([][]oldSB, len(members))
	for i, m := range members {
		if m == nil {
			continue
		}
		s, err := memberSectors(m)
		if err != nil {
			return nil, refuse("cannot get the size of %s: %v", m.Name(), err)
		}
		sectors[i] = s
		found, err := findOldSuperblocks(m, s)
		if err != nil {
			return nil, refuse("%v", err)
		}
		if len(found) > 0 && !spec.Force {
			return nil, refuse("%s appears to be part of a raid array: %s; not overwriting it without Force", m.Name(), found[0].desc)
		}
		old[i] = found
	}
	first := -1
	for i, m := range members {
		if m != nil {
			first = i
			break
		}
	}
	dataOffset := DefaultDataOffset(sectors[first], uint64(chunkKiB))
	var minKiB, maxKiB uint64
	var maxName string
	for i, m := range members {
		if m == nil {
			continue
		}
		if sectors[i] < 24 || sectors[i] < dataOffset {
			return nil, refuse("device %s is too small (%dK) for required metadata!", m.Name(), sectors[i]>>1)
		}
		free := (sectors[i] - dataOffset) / 2
		if chunkKiB != 0 {
			free &^= uint64(chunkKiB) - 1
		}
		if free == 0 {
			return nil, refuse("no free space left on %s", m.Name())
		}
		if minKiB == 0 || free < minKiB {
			minKiB = free
		}
		if free > maxKiB {
			maxKiB, maxName = free, m.Name()
		}
	}
	sizeKiB := minKiB
	if level == superblock.LevelRAID1 {
		sizeKiB &^= 63 // room to reshape to a striped level later
	}
	if sizeKiB == 0 {
		return nil, refuse("members too small: less than 64 KiB left after the %d-sector data offset", dataOffset)
	}
	var warnings []string
	if (maxKiB-sizeKiB)*100 > maxKiB {
		warnings = append(warnings, fmt.Sprintf("largest drive (%s) exceeds size (%dK) by more than 1%%", maxName, sizeKiB))
	}
	if level == superblock.LevelRAID10 && !Enough(level, layout, spec.RaidDevices, func(s int) bool { return members[s] != nil }) {
		return nil, refuse("not enough devices to start a raid10 %s array: some chunk would have no copy", superblock.R10Layout(layout))
	}
	if mode == BitmapDefault {
		mode = BitmapNone
		if sizeKiB > autoBitmapKiB {
			mode = BitmapInternal
		}
	}
	usedSectors := sizeKiB * 2

	// The bitmap.
	var bsb *bitmap.Superblock
	var bl bitmap.Layout
	if mode == BitmapInternal || mode == BitmapClustered {
		sync := usedSectors
		if level == superblock.LevelRAID10 {
			copies := uint64(layout&0xff) * uint64(layout>>8&0xff)
			hi, lo := bits.Mul64(sizeKiB, uint64(spec.RaidDevices))
			if hi != 0 {
				return nil, refuse("array too large: %d KiB per member times %d members", sizeKiB, spec.RaidDevices)
			}
			sync = lo / copies * 2
		}
		chunk, err := bitmapChunk(usedSectors, sync, spec.BitmapChunk)
		if err != nil {
			return nil, refuse("%v", err)
		}
		bsb = &bitmap.Superblock{
			Magic: bitmap.Magic, Version: bitmap.VersionLE, SyncSize: sync, ChunkSize: chunk,
			DaemonSleep: bitmap.DefaultDaemonSleep, WriteBehind: uint32(spec.WriteBehind),
		}
		if mode == BitmapClustered {
			bsb.Version = bitmap.VersionClustered
			// mdadm's check: every node's slot between the superblock
			// and the data, leaving 4 KiB for the superblock.
			per := bsb.SlotBytes(bitmap.SlotAlign)
			total := int64(dataOffset-superblock.V12Offset)*superblock.SectorSize - 4096
			if per > uint64(total) || per*uint64(nodes) > uint64(total) {
				return nil, refuse("The max num of nodes can't exceed %d", uint64(total)/per)
			}
			if nodes > MaxNodes {
				return nil, refuse("%d nodes: mdcluster supports at most %d bitmap slots", nodes, MaxNodes)
			}
			bsb.Nodes = uint32(nodes)
			if err := bsb.SetName(spec.ClusterName); err != nil {
				return nil, refuse("%v", err)
			}
		}
	}

	// UUIDs and time.
	rnd := spec.Rand
	if rnd == nil {
		rnd = cryptoRand
	}
	now := time.Now
	if spec.Now != nil {
		now = spec.Now
	}
	uuid := spec.UUID
	if uuid == ([16]byte{}) {
		if _, err := io.ReadFull(rnd, uuid[:]); err != nil {
			return nil, refuse("array UUID: %v", err)
		}
	}
	devUUIDs := make([][16]byte, len(members))
	for i, m := range members {
		if m == nil {
			continue
		}
		if _, err := io.ReadFull(rnd, devUUIDs[i][:]); err != nil {
			return nil, refuse("device UUID for %s: %v", m.Name(), err)
		}
	}
	if bsb != nil {
		bsb.UUID = uuid
		start := int64(superblock.V12Offset+bitmapOffset) * superblock.SectorSize
		l, err := bitmap.NewLayout(bsb, start, bitmap.SlotAlign)
		if err != nil {
			return nil, refuse("%v", err)
		}
		if err := l.CheckFits(start, int64(dataOffset)*superblock.SectorSize); err != nil {
			return nil, refuse("%v", err)
		}
		bl = l
	}

	// The superblocks.
	spares := len(members) - spec.RaidDevices
	roleBytes := roundUp(uint64(superblock.FixedSize+2*(spec.RaidDevices+spares)), 512)
	maxDev := uint32((roleBytes - superblock.FixedSize) / 2)
	if maxDev > superblock.MaxDevs {
		maxDev = superblock.MaxDevs
	}
	ctime := mdTime(now())
	shared := &superblock.Superblock{
		Magic: superblock.Magic, MajorVersion: superblock.MajorVersion,
		SetUUID: uuid, CTime: ctime, UTime: ctime,
		Level: level, Layout: layout, Size: usedSectors, ChunkSize: chunkKiB * 2,
		RaidDisks: uint32(spec.RaidDevices), DataOffset: dataOffset, SuperOffset: superblock.V12Offset,
		MaxDev: maxDev, DevRoles: make([]uint16, maxDev),
	}
	if err := shared.SetNameString(setName); err != nil {
		return nil, refuse("%v", err)
	}
	if spec.AssumeClean {
		shared.ResyncOffset = superblock.MaxSector
	}
	if level == superblock.LevelRAID1 && countPresent(members, spec.RaidDevices) == 1 {
		// A raid1 with a single member has nothing to resync: md
		// starts it clean (raid1_run), so --detail says "clean,
		// degraded" at once and adding a member later recovers it
		// without a resync after that.
		shared.ResyncOffset = superblock.MaxSector
	}
	if bsb != nil {
		shared.FeatureMap |= superblock.FeatureBitmapOffset
		shared.BitmapOffset = bitmapOffset
		if bsb.Nodes > 0 {
			shared.FeatureMap |= superblock.FeatureClustered
		}
	}
	for i := range shared.DevRoles {
		shared.DevRoles[i] = superblock.RoleSpare
	}
	for i, m := range members {
		if m != nil && i < spec.RaidDevices {
			shared.DevRoles[i] = uint16(i)
		}
	}
	// The bad-block log: after the space the bitmap (or mdadm's bitmap
	// room) takes, if the data offset leaves room; never on clustered
	// arrays.
	var bbSize uint16
	var bbOffset int32
	if bsb == nil || bsb.Nodes == 0 {
		bmSpace := chooseBMSpace(usedSectors)
		if bsb != nil {
			bmSpace = uint64(bl.SlotSize) / superblock.SectorSize
		}
		switch {
		case dataOffset >= superblock.V12Offset+bitmapOffset+bmSpace+bblogSectors:
			bbSize, bbOffset = bblogSectors, int32(bitmapOffset+bmSpace)
		case dataOffset >= superblock.V12Offset+16:
			bbSize, bbOffset = bblogSectors, int32(dataOffset-bblogSectors-superblock.V12Offset)
		}
	}
	p := &plan{shared: shared, devices: make([]Device, len(members)), blocks: make([][]byte, len(members)),
		old: old, bitmap: bsb, layout: bl, warnings: warnings}
	for i, m := range members {
		p.devices[i].Member = m
		if m == nil {
			continue
		}
		dev := clone(shared)
		dev.DevNumber = uint32(i)
		dev.DeviceUUID = devUUIDs[i]
		dev.DataSize = sectors[i] - dataOffset
		dev.DevFlags = flags[i]
		dev.BBLogSize, dev.BBLogOffset = bbSize, bbOffset
		dev.UpdateChecksum()
		if err := dev.Validate(sectors[i]); err != nil {
			return nil, refuse("internal error: superblock for %s: %v", m.Name(), err)
		}
		b, err := encodeSuper(dev)
		if err != nil {
			return nil, refuse("superblock for %s: %v", m.Name(), err)
		}
		p.devices[i].Super, p.blocks[i] = dev, b
	}
	return p, nil
}

func bitmapModeName(m BitmapMode) string {
	if m == BitmapDefault {
		return "default"
	}
	return string(m)
}

// findOldSuperblocks looks for md superblocks of any version at every
// place md puts one: v1.0 near the end, v1.1 at the start, v1.2 at 4 KiB,
// and v0.90 64 KiB from the end (rounded down to 64 KiB). These are what
// mdadm --create warns about and zeroes (its Kill).
func findOldSuperblocks(m Member, sectors uint64) ([]oldSB, error) {
	var found []oldSB
	if sectors < 24 {
		return nil, nil
	}
	for _, minor := range []int{2, 1, 0} {
		off, _ := superblock.Offset(minor, sectors)
		// The identity checks mdadm and md make: magic, major version
		// 1, and super_offset naming this very place. A superblock that
		// passes them counts even if it is otherwise damaged.
		head := make([]byte, superblock.FixedSize)
		n, err := m.ReadAt(head, int64(off)*superblock.SectorSize)
		if n < len(head) {
			if err == nil || errors.Is(err, io.EOF) {
				continue
			}
			return nil, fmt.Errorf("%s: read sector %d: %w", m.Name(), off, err)
		}
		le := binary.LittleEndian
		if le.Uint32(head[0:]) != superblock.Magic || le.Uint32(head[4:]) != superblock.MajorVersion || le.Uint64(head[144:]) != off {
			continue
		}
		desc := fmt.Sprintf("v1.%d superblock", minor)
		if sb, err := superblock.ReadAt(m, off); err == nil {
			desc += fmt.Sprintf(", level=%s devices=%d ctime=%s uuid=%s", superblock.LevelName(sb.Level), sb.RaidDisks,
				timeFrom(sb.CTime).UTC().Format(time.ANSIC), bitmap.FormatUUID(sb.SetUUID))
		} else {
			desc += fmt.Sprintf(" (damaged: %v)", err)
		}
		found = append(found, oldSB{offset: int64(off) * superblock.SectorSize, size: 512, desc: desc})
	}
	// v0.90: MD_RESERVED_SECTORS (64 KiB) reserved at the end.
	if sectors >= 256 {
		off := int64(sectors&^127-128) * superblock.SectorSize
		buf := make([]byte, 12)
		if n, err := m.ReadAt(buf, off); n == len(buf) {
			le := func(i int) uint32 {
				return uint32(buf[i]) | uint32(buf[i+1])<<8 | uint32(buf[i+2])<<16 | uint32(buf[i+3])<<24
			}
			if le(0) == superblock.Magic && le(4) == 0 && le(8) == 90 {
				found = append(found, oldSB{offset: off, size: 4096, desc: "v0.90 superblock"})
			}
		} else if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: read v0.90 superblock area: %w", m.Name(), err)
		}
	}
	return found, nil
}

// writeMember writes member i: old superblocks zeroed, then the bitmap,
// then the superblock (so that a superblock never points at a bitmap that
// is not there yet), then a sync.
func (p *plan) writeMember(i int) error {
	m := p.devices[i].Member
	for _, o := range p.old[i] {
		if _, err := m.WriteAt(make([]byte, o.size), o.offset); err != nil {
			return fmt.Errorf("zero old superblock at byte %d: %w", o.offset, err)
		}
	}
	if p.bitmap != nil {
		if err := bitmap.Format(m, *p.bitmap, p.layout, true); err != nil {
			return fmt.Errorf("bitmap: %w", err)
		}
	}
	sb := p.devices[i].Super
	if _, err := m.WriteAt(p.blocks[i], int64(sb.SuperOffset)*superblock.SectorSize); err != nil {
		return fmt.Errorf("superblock: %w", err)
	}
	if err := m.Sync(); err != nil {
		return err
	}
	return nil
}

// countPresent counts the members given for the first n slots ("missing" is
// nil).
func countPresent[M comparable](members []M, n int) int {
	var zero M
	c := 0
	for i, m := range members {
		if i < n && m != zero {
			c++
		}
	}
	return c
}
