package superblock

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
)

// LoadBitmapSuper reads the bitmap superblock that s points at (slot 0 of
// a clustered bitmap) and returns it when it belongs to this array: right
// magic and the array's UUID. It returns nil when s has no internal bitmap
// or the bitmap does not match; mdadm then behaves as if there were no
// bitmap at all, and so does Examine.
func LoadBitmapSuper(r io.ReaderAt, s *Superblock) *bitmap.Superblock {
	if !s.HasBitmap() {
		return nil
	}
	buf := make([]byte, 512)
	if n, _ := r.ReadAt(buf, s.BitmapStart()); n != len(buf) {
		return nil
	}
	var b bitmap.Superblock
	if err := b.UnmarshalBinary(buf); err != nil || b.Magic != bitmap.Magic || b.UUID != s.SetUUID {
		return nil
	}
	return &b
}

// ExamineOptions carries what Examine needs besides the superblock.
type ExamineOptions struct {
	// DevSectors is the size of the device in 512-byte sectors.
	DevSectors uint64
	// Bitmap is the slot-0 bitmap superblock as returned by
	// LoadBitmapSuper (nil if none or not matching).
	Bitmap *bitmap.Superblock
	// Location is the time zone for times (mdadm uses local time).
	Location *time.Location
	// HomeHost is mdadm's homehost (by default the machine's host name);
	// a name "HOMEHOST:..." is shown as local to it. Empty: no homehost.
	HomeHost string
}

// Examine writes the body of `mdadm --examine` for one v1 superblock (the
// lines after "DEVICE:"), byte for byte as mdadm 4.2 prints them.
func (s *Superblock) Examine(w io.Writer, opt ExamineOptions) error {
	var b bytes.Buffer
	s.examine(&b, opt)
	_, err := w.Write(b.Bytes())
	return err
}

// ctimeString formats md's 40-bit seconds the way C's ctime() does,
// truncated to 24 characters as mdadm prints it ("%.24s").
func ctimeString(t uint64, loc *time.Location) string {
	if loc == nil {
		loc = time.Local
	}
	tm := time.Unix(int64(t&0xFFFFFFFFFF), 0).In(loc)
	s := fmt.Sprintf("%.3s %.3s%3d %02d:%02d:%02d %d",
		tm.Weekday().String(), tm.Month().String(), tm.Day(),
		tm.Hour(), tm.Minute(), tm.Second(), tm.Year())
	if len(s) > 24 {
		s = s[:24]
	}
	return s
}

// levelNames maps md levels to the names mdadm prints.
var levelNames = map[int32]string{
	LevelLinear: "linear", 0: "raid0", 1: "raid1", 4: "raid4", 5: "raid5",
	LevelMultipath: "multipath", 6: "raid6", 10: "raid10", LevelFaulty: "faulty", -100: "container",
}

// LevelName returns mdadm's name for level, or "-unknown-".
func LevelName(level int32) string {
	if n, ok := levelNames[level]; ok {
		return n
	}
	return "-unknown-"
}

var r5Layouts = map[uint32]string{0: "left-asymmetric", 1: "right-asymmetric", 2: "left-symmetric", 3: "right-symmetric", 4: "parity-first", 5: "parity-last"}
var r6Layouts = map[uint32]string{0: "left-asymmetric", 1: "right-asymmetric", 2: "left-symmetric", 3: "right-symmetric", 4: "parity-first", 5: "parity-last",
	8: "ddf-zero-restart", 9: "ddf-N-restart", 10: "ddf-N-continue",
	16: "left-asymmetric-6", 17: "right-asymmetric-6", 18: "left-symmetric-6", 19: "right-symmetric-6", 20: "parity-first-6"}
var r0Layouts = map[uint32]string{1: "original", 2: "alternate", 0: "dangerous"}

func mapName(m map[uint32]string, v uint32) string {
	if n, ok := m[v]; ok {
		return n
	}
	return "-unknown-"
}

// R10Layout renders a raid10 layout word as mdadm does: " near=2",
// " far=2", " near=2, offset=2", or "NO REDUNDANCY" for a single copy.
func R10Layout(layout uint32) string {
	near := int(layout & 255)
	far := int((layout >> 8) & 255)
	var b strings.Builder
	sep := ""
	if near != 1 {
		fmt.Fprintf(&b, "%s near=%d", sep, near)
		sep = ","
	}
	if far != 1 {
		kind := "far"
		if layout&0x10000 != 0 {
			kind = "offset"
		}
		fmt.Fprintf(&b, "%s %s=%d", sep, kind, far)
	}
	if near*far == 1 {
		b.WriteString("NO REDUNDANCY")
	}
	return b.String()
}

func hexUUID(u [16]byte) string { return bitmap.FormatUUID(u) }

// space computes mdadm's "Unused Space" figures (before, after) in
// sectors, with mdadm's own rules and unsigned arithmetic, including its
// habit of measuring the bitmap end relative to the superblock.
func (s *Superblock) space(bsb *bitmap.Superblock, hasBitmap bool, devSectors uint64) (before, after uint64) {
	var bitmapOff uint64
	var pplOff, pplSize uint64
	if hasBitmap {
		bitmapOff = uint64(int64(s.BitmapOffset))
	} else if s.FeatureMap&(FeaturePPL|FeatureMultiplePPLs) != 0 {
		o, sz := s.PPL()
		pplOff, pplSize = uint64(uint16(o)), uint64(sz)
	}
	dataSize := s.Size
	if s.Level <= 0 {
		dataSize = s.DataSize
	}
	if s.DataOffset < s.SuperOffset {
		before = s.DataOffset
		end := s.SuperOffset
		if s.BBLogOffset != 0 && s.BBLogSize != 0 {
			bb := s.SuperOffset + uint64(int64(s.BBLogOffset))
			if bb < end {
				end = bb
			}
		}
		if e := s.SuperOffset + bitmapOff + pplOff; e < end {
			end = e
		}
		if s.DataOffset+dataSize < end {
			after = end - dataSize - s.DataOffset
		}
	} else {
		earliest := s.SuperOffset + (32+4)*2
		if int64(bitmapOff) > 0 {
			var size uint64
			if bsb != nil {
				size = uint64(uint32(bitmap.MdadmStride(bsb))) / 512
			}
			if e := bitmapOff + size; e > earliest {
				earliest = e
			}
		} else if pplOff > 0 {
			if e := pplOff + pplSize; e > earliest {
				earliest = e
			}
		}
		if s.BBLogOffset != 0 && s.BBLogSize != 0 {
			e := s.SuperOffset + uint64(int64(s.BBLogOffset)) + uint64(s.BBLogSize)
			if e > earliest {
				earliest = e
			}
		}
		if earliest < s.DataOffset {
			before = s.DataOffset - earliest
		}
		after = devSectors - dataSize - s.DataOffset
	}
	if before == 0 && after == 0 {
		after = 1 // mdadm's marker for "no room either side"; suppresses the line
	}
	role := uint16(RoleFaulty)
	if s.DevNumber < s.MaxDev && s.DevNumber < MaxDevs && int(s.DevNumber) < len(s.DevRoles) {
		role = s.DevRoles[s.DevNumber]
	}
	if role == RoleJournal {
		after = (devSectors - s.DataOffset) % 8
	}
	return before, after
}

func (s *Superblock) examine(w *bytes.Buffer, opt ExamineOptions) {
	// mdadm drops the bitmap feature when the bitmap superblock does not
	// match the array, and prints (and checksums) the result.
	sb := *s
	bsb := opt.Bitmap
	if bsb == nil {
		sb.FeatureMap &^= FeatureBitmapOffset
	}
	hasBitmap := sb.FeatureMap&FeatureBitmapOffset != 0
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }

	p("          Magic : %08x\n", sb.Magic)
	p("        Version : 1.%d\n", sb.MinorVersion())
	p("    Feature Map : 0x%x\n", sb.FeatureMap)
	p("     Array UUID : %s\n", hexUUID(sb.SetUUID))
	p("           Name : %s", sb.Name())
	if l := len(opt.HomeHost); l > 0 && l < 32 && sb.SetName[l] == ':' && string(sb.SetName[:l]) == opt.HomeHost {
		p("  (local to host %s)", opt.HomeHost)
	}
	p("\n")
	if bsb != nil && bsb.Nodes > 0 && hasBitmap {
		p("   Cluster Name : %-64s\n", bsb.Name())
	}
	p("  Creation Time : %s\n", ctimeString(sb.CTime, opt.Location))
	p("     Raid Level : %s\n", LevelName(sb.Level))
	p("   Raid Devices : %d\n", int32(sb.RaidDisks))
	p("\n")
	p(" Avail Dev Size : %d sectors%s\n", sb.DataSize, bitmap.HumanSize(int64(sb.DataSize<<9)))
	if sb.Level > 0 {
		ddsks, denom := int64(0), int64(1)
		switch sb.Level {
		case 1:
			ddsks = 1
		case 4, 5:
			ddsks = int64(int32(sb.RaidDisks) - 1)
		case 6:
			ddsks = int64(int32(sb.RaidDisks) - 2)
		case 10:
			ddsks = int64(int32(sb.RaidDisks))
			denom = int64(sb.Layout&255) * int64((sb.Layout>>8)&255)
		}
		// int arithmetic as in mdadm: (size<<9) * ddsks / denom. A zero
		// denominator would crash mdadm; we leave the line out instead.
		if ddsks != 0 && denom != 0 {
			asize := (int64(sb.Size) << 9) * int64(int32(ddsks)) / int64(int32(denom))
			p("     Array Size : %d KiB%s\n", uint64(asize>>10), bitmap.HumanSize(asize))
		}
		if sb.Size != sb.DataSize {
			p("  Used Dev Size : %d sectors%s\n", sb.Size, bitmap.HumanSize(int64(sb.Size<<9)))
		}
	}
	if sb.DataOffset != 0 {
		p("    Data Offset : %d sectors\n", sb.DataOffset)
	}
	if sb.NewOffset != 0 && sb.FeatureMap&FeatureNewOffset != 0 {
		p("     New Offset : %d sectors\n", sb.DataOffset+uint64(int64(sb.NewOffset)))
	}
	p("   Super Offset : %d sectors\n", sb.SuperOffset)
	if sb.FeatureMap&FeatureRecoveryOffset != 0 {
		p("Recovery Offset : %d sectors\n", sb.RecoveryOffset)
	}
	before, after := sb.space(bsb, hasBitmap, opt.DevSectors)
	if after != 1 && sb.FeatureMap&FeatureNewOffset == 0 {
		p("   Unused Space : before=%d sectors, after=%d sectors\n", before, after)
	}
	if sb.ResyncOffset+1 != 0 {
		p("          State : active\n")
	} else {
		p("          State : clean\n")
	}
	p("    Device UUID : %s\n", hexUUID(sb.DeviceUUID))
	p("\n")
	if hasBitmap {
		p("Internal Bitmap : %d sectors from superblock\n", sb.BitmapOffset)
	} else if sb.FeatureMap&(FeaturePPL|FeatureMultiplePPLs) != 0 {
		o, sz := sb.PPL()
		p("            PPL : %d sectors at offset %d sectors from superblock\n", sz, uint16(o))
	}
	deltaExtra := uint32(0)
	if sb.FeatureMap&FeatureReshapeActive != 0 {
		p("  Reshape pos'n : %d%s\n", sb.ReshapePos/2, bitmap.HumanSize(int64(sb.ReshapePos<<9)))
		if sb.DeltaDisks != 0 {
			p("  Delta Devices : %d", int32(sb.DeltaDisks))
			p(" (%d->%d)\n", int32(sb.RaidDisks-sb.DeltaDisks), int32(sb.RaidDisks))
			if int32(sb.DeltaDisks) < 0 {
				deltaExtra = -sb.DeltaDisks
			}
		}
		if sb.NewLevel != uint32(sb.Level) {
			p("      New Level : %s\n", LevelName(int32(sb.NewLevel)))
		}
		if sb.NewLayout != sb.Layout {
			switch sb.Level {
			case 5:
				p("     New Layout : %s\n", mapName(r5Layouts, sb.NewLayout))
			case 6:
				p("     New Layout : %s\n", mapName(r6Layouts, sb.NewLayout))
			case 10:
				p("     New Layout :%s\n", R10Layout(sb.NewLayout))
			}
		}
		if sb.NewChunk != sb.ChunkSize {
			p("  New Chunksize : %dK\n", int32(sb.NewChunk/2))
		}
		p("\n")
	}
	if sb.DevFlags != 0 {
		p("          Flags :")
		if sb.DevFlags&DevFlagWriteMostly != 0 {
			p(" write-mostly")
		}
		if sb.DevFlags&DevFlagFailFast != 0 {
			p(" failfast")
		}
		p("\n")
	}
	p("    Update Time : %s\n", ctimeString(sb.UTime, opt.Location))
	if sb.BBLogSize != 0 && sb.BBLogOffset != 0 {
		p("  Bad Block Log : %d entries available at offset %d sectors", int32(sb.BBLogSize)*512/8, sb.BBLogOffset)
		if sb.FeatureMap&FeatureBadBlocks != 0 {
			p(" - bad blocks present.")
		}
		p("\n")
	}
	if want := sb.ComputeChecksum(); want == sb.Checksum {
		p("       Checksum : %x - correct\n", sb.Checksum)
	} else {
		p("       Checksum : %x - expected %x\n", sb.Checksum, want)
	}
	p("         Events : %d\n", sb.Events)
	p("\n")
	switch {
	case sb.Level == 0 && sb.FeatureMap&FeatureRAID0Layout != 0:
		p("         Layout : %s\n", mapName(r0Layouts, sb.Layout))
	case sb.Level == 5:
		p("         Layout : %s\n", mapName(r5Layouts, sb.Layout))
	case sb.Level == 6:
		p("         Layout : %s\n", mapName(r6Layouts, sb.Layout))
	case sb.Level == 10:
		p("         Layout :%s\n", R10Layout(sb.Layout))
	}
	switch sb.Level {
	case 0, 4, 5, 6, 10:
		p("     Chunk Size : %dK\n", int32(sb.ChunkSize/2))
	case -1:
		p("       Rounding : %dK\n", int32(sb.ChunkSize/2))
	}
	p("\n")
	p("   Device Role : ")
	role := sb.Role()
	switch {
	case role >= RoleFaulty:
		p("spare\n")
	case role == RoleJournal:
		p("Journal\n")
	case sb.FeatureMap&FeatureReplacement != 0:
		p("Replacement device %d\n", role)
	default:
		p("Active device %d\n", role)
	}
	p("   Array State : ")
	// One character per raid disk, from the count of roles equal to its
	// index (mdadm's 32-bit unsigned sum, wrap-around included).
	slots := sb.RaidDisks + deltaExtra
	inconsistent := arrayState(w, sb.DevRoles, slots, sb.Level > 0)
	p(" ('A' == active, '.' == missing, 'R' == replacing)\n")
	for _, r := range sb.DevRoles {
		if r <= RoleMax && uint32(r) > slots {
			inconsistent = true
		}
	}
	if inconsistent {
		p("WARNING Array state is inconsistent - each number should appear only once\n")
		for d, r := range sb.DevRoles {
			if r >= RoleFaulty {
				p(" %d:-", d)
			} else {
				p(" %d:%d", d, r)
			}
		}
		p("\n")
	}
}

// maxArrayState is the most characters an Array State line shows. Roles
// are 16-bit, so past 65536 disks (only in corrupt superblocks) every
// character would be "."; we stop there rather than print billions of them
// as mdadm would.
const maxArrayState = 1 << 16

// arrayState writes mdadm's Array State characters for disks 0..slots-1
// (at most maxArrayState of them): "A" for a role held by one device, "R"
// for two (replacement, redundant levels only), "." for none and "?" for
// anything else, which makes the state inconsistent.
//
// The work is bounded by the number of roles (at most MaxDevs), not by
// slots: a corrupt raid_disks costs a run of dots, not a per-disk loop or
// a table with an entry per possible role.
func arrayState(w *bytes.Buffer, roles []uint16, slots uint32, redundant bool) (inconsistent bool) {
	n := min(uint64(slots), maxArrayState)
	used := make([]uint16, 0, len(roles))
	for _, r := range roles {
		if uint64(r) < n {
			used = append(used, r)
		}
	}
	slices.Sort(used)
	w.Grow(int(n))
	next := uint64(0) // first disk not yet written
	for i := 0; i < len(used); {
		j := i + 1
		for j < len(used) && used[j] == used[i] {
			j++
		}
		d := uint64(used[i])
		writeDots(w, d-next)
		switch cnt := j - i; {
		case cnt == 2 && redundant:
			w.WriteByte('R')
		case cnt == 1:
			w.WriteByte('A')
		default:
			w.WriteByte('?')
			inconsistent = true
		}
		next, i = d+1, j
	}
	writeDots(w, n-next)
	return inconsistent
}

const dots = "................................................................"

func writeDots(w *bytes.Buffer, n uint64) {
	for ; n > uint64(len(dots)); n -= uint64(len(dots)) {
		w.WriteString(dots)
	}
	w.WriteString(dots[:n])
}
