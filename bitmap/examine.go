package bitmap

import (
	"bytes"
	"fmt"
	"io"
	"math/bits"
)

// ExamineSource tells Examine where to find a bitmap. mdadm -X reads a
// regular file as an external bitmap file (from offset 0, slots read one
// after the other) and a block device as a member device with an internal
// bitmap; Locate captures that difference.
type ExamineSource struct {
	// Name is printed as "Filename".
	Name string
	// Dev is read with ReadAt; reads past the end return io.EOF as usual.
	Dev io.ReaderAt
	// Locate returns the byte offset at which slot i's superblock is read.
	// cursor is where the previous read stopped (0 at first), which is
	// what an external bitmap file uses. A non-nil error means the slot
	// cannot be found ("Unable to open bitmap file on node").
	Locate func(slot int, cursor int64) (int64, error)
}

// ExternalFile returns a Locate function for an external bitmap file or a
// device without md superblock: the first read starts at offset 0 and every
// later slot continues where the previous read stopped (mdadm does not
// seek between slots of a bitmap file).
func ExternalFile() func(int, int64) (int64, error) {
	return func(_ int, cursor int64) (int64, error) { return cursor, nil }
}

// Internal returns a Locate function for an internal bitmap whose slot 0
// starts at byte start, with slots strideBytes apart.
func Internal(start, strideBytes int64) func(int, int64) (int64, error) {
	return func(slot int, _ int64) (int64, error) { return start + int64(slot)*strideBytes, nil }
}

// MdadmStride returns the slot stride mdadm -X uses for the internal bitmap
// whose slot 0 superblock is sb: the slot size with 4 KiB alignment,
// computed with mdadm's integer widths (a 64-bit bit count, a 32-bit byte
// count, whole sectors). For any valid superblock it equals
// sb.SlotBytes(4096); it differs only for absurd sizes, where mdadm's
// arithmetic wraps.
func MdadmStride(sb *Superblock) int64 {
	var nbits uint64
	if sb.ChunkSize != 0 {
		nbits = (sb.SyncSize*512 + uint64(sb.ChunkSize) - 1) / uint64(sb.ChunkSize)
	}
	n := (nbits+7)>>3 + SuperblockSize
	n = (n + 4095) &^ 4095
	return int64(uint32(n)>>9) << 9
}

// shortRead explains a failed superblock read. mdadm prints whatever errno
// happens to hold at that point; we say what went wrong.
const shortRead = "short read (a bitmap superblock needs 256 bytes)"

// ioChunk is the size of mdadm's bitmap reads.
const ioChunk = 8192

// slotInfo is what one pass of mdadm's bitmap reader learns.
type slotInfo struct {
	sb          Superblock
	total       uint64 // chunk bits found
	dirty       uint64
	short       bool // fewer bits in the file than the superblock promises
	next        int64
	readFailure bool
}

// readSlotInfo reads a bitmap superblock at off and counts the dirty bits
// after it the way mdadm does: 8 KiB reads until the promised number of
// bits has been seen or the device ends. buf is the ioChunk-byte read
// buffer, shared by all slots of one Examine so that memory stays at one
// buffer however many slots a (possibly corrupt) superblock names.
func readSlotInfo(r io.ReaderAt, off int64, buf []byte) slotInfo {
	n, _ := r.ReadAt(buf, off)
	info := slotInfo{next: off + int64(n)}
	if n < SuperblockSize {
		info.readFailure = true
		return info
	}
	_ = info.sb.UnmarshalBinary(buf)
	if info.sb.SyncSize == 0 || info.sb.ChunkSize == 0 {
		return info
	}
	// mdadm's bit count, with its unsigned 64-bit wrap-around.
	total := (info.sb.SyncSize*512 + uint64(info.sb.ChunkSize) - 1) / uint64(info.sb.ChunkSize)
	var read, dirty uint64
	skip := SuperblockSize
	for read < total {
		if n == 0 {
			n, _ = r.ReadAt(buf, info.next)
			info.next += int64(n)
			skip = 0
			if n <= 0 {
				break
			}
		}
		rem := total - read
		if avail := uint64(n-skip) * 8; rem > avail {
			rem = avail
		}
		dirty += countBits(buf[skip:], rem)
		read += rem
		n = 0
	}
	if read < total {
		info.short = true
		total = read
	}
	info.total, info.dirty = total, dirty
	return info
}

// countBits counts the set bits among the first n bits of b (LSB first).
func countBits(b []byte, n uint64) uint64 {
	var c uint64
	whole := n / 8
	for _, x := range b[:whole] {
		c += uint64(bits.OnesCount8(x))
	}
	if r := n % 8; r != 0 {
		c += uint64(bits.OnesCount8(b[whole] & (byte(1<<r) - 1)))
	}
	return c
}

// stateName maps the superblock state the way mdadm -X labels it.
func stateName(s uint32) string {
	switch s {
	case 0:
		return "OK"
	case 2:
		return "Out of date"
	}
	return "Unknown"
}

// HumanChunk formats a chunk size the way mdadm -X does ("64 MB", "4 KB":
// binary multiples with decimal-looking suffixes, truncated).
func HumanChunk(b uint32) string {
	suffix := []string{"B", "KB", "MB", "GB", "TB"}
	i := 0
	for b>>10 != 0 {
		b >>= 10
		i++
	}
	return fmt.Sprintf("%d %s", b, suffix[i])
}

// HumanSize formats a byte count the way mdadm's human_size does: empty
// below 5000 KiB, else " (x.xx MiB y.yy MB)" switching to GiB/GB at 2 GiB
// and TiB/TB at 2 TiB, both rounded to hundredths. The input is signed and
// the arithmetic wraps exactly like mdadm's 64-bit C arithmetic.
func HumanSize(bytes int64) string {
	switch {
	case bytes < 5000*1024:
		return ""
	case bytes < 2<<30:
		cMiB := (bytes*200/(1<<20) + 1) / 2
		cMB := (bytes/(1000000/200) + 1) / 2
		return fmt.Sprintf(" (%d.%02d MiB %d.%02d MB)", cMiB/100, cMiB%100, cMB/100, cMB%100)
	case bytes < 2<<40:
		cGiB := (bytes*200/(1<<30) + 1) / 2
		cGB := (bytes/(1000000000/200) + 1) / 2
		return fmt.Sprintf(" (%d.%02d GiB %d.%02d GB)", cGiB/100, cGiB%100, cGB/100, cGB%100)
	default:
		cTiB := (bytes*200/(1<<40) + 1) / 2
		cTB := (bytes/(1000000000000/200) + 1) / 2
		return fmt.Sprintf(" (%d.%02d TiB %d.%02d TB)", cTiB/100, cTiB%100, cTB/100, cTB%100)
	}
}

// formatUUID prints 16 bytes as four colon-separated groups of 8 hex
// digits, in storage order (how mdadm shows v1 UUIDs on little-endian hosts).
func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x:%x:%x:%x", u[0:4], u[4:8], u[8:12], u[12:16])
}

// FormatUUID is formatUUID for other packages printing md UUIDs.
func FormatUUID(u [16]byte) string { return formatUUID(u) }

// Examine prints what `mdadm --examine-bitmap` (-X) prints for src: the
// report on out, mdadm's diagnostics on errOut, each diagnostic prefixed by
// prog and ": ". It returns mdadm's exit status for the device: 0 when the
// bitmap superblock has a known version, 1 otherwise.
//
// Like mdadm it is a display tool: it reports damaged superblocks instead of
// refusing them, and for clustered bitmaps prints every node slot. Unlike
// mdadm it refuses to walk more than MaxNodes slots of a corrupt superblock.
func Examine(out, errOut io.Writer, prog string, src ExamineSource) int {
	perr := func(format string, a ...any) {
		fmt.Fprintf(errOut, "%s: "+format, append([]any{prog}, a...)...)
	}
	off, err := src.Locate(0, 0)
	if err != nil {
		perr("%s doesn't have bitmap\n", src.Name)
		return 1
	}
	buf := make([]byte, ioChunk)
	info := readSlotInfo(src.Dev, off, buf)
	if info.readFailure {
		perr("failed to read superblock of bitmap file: %s\n", shortRead)
		return 1
	}
	if info.short {
		perr("WARNING: bitmap file is not large enough for array size %d!\n\n", info.sb.SyncSize)
	}
	sb := &info.sb
	var w bytes.Buffer
	defer func() { _, _ = out.Write(w.Bytes()) }()
	if sb.Magic != Magic {
		perr("This is an md array.  To view a bitmap you need to examine\n")
		perr("a member device, not the array.\n")
		perr("Reporting bitmap that would be used if this array were used\n")
		perr("as a member of some other array\n")
	}
	fmt.Fprintf(&w, "        Filename : %s\n", src.Name)
	fmt.Fprintf(&w, "           Magic : %08x\n", sb.Magic)
	if sb.Magic != Magic {
		perr("invalid bitmap magic 0x%x, the bitmap file appears\n", sb.Magic)
		perr("to be corrupted or missing.\n")
	}
	fmt.Fprintf(&w, "         Version : %d\n", int32(sb.Version))
	if sb.Version < VersionHostEndian || sb.Version > VersionClustered {
		perr("unknown bitmap version %d, either the bitmap file\n", int32(sb.Version))
		perr("is corrupted or you need to upgrade your tools\n")
		return 1
	}
	fmt.Fprintf(&w, "            UUID : %s\n", formatUUID(sb.UUID))
	if sb.Nodes == 0 {
		fmt.Fprintf(&w, "          Events : %d\n", sb.Events)
		fmt.Fprintf(&w, "  Events Cleared : %d\n", sb.EventsCleared)
		fmt.Fprintf(&w, "           State : %s\n", stateName(sb.State))
	}
	fmt.Fprintf(&w, "       Chunksize : %s\n", HumanChunk(sb.ChunkSize))
	fmt.Fprintf(&w, "          Daemon : %ds flush period\n", int32(sb.DaemonSleep))
	if sb.WriteBehind != 0 {
		fmt.Fprintf(&w, "      Write Mode : Allow write behind, max %d\n", int32(sb.WriteBehind))
	} else {
		fmt.Fprintf(&w, "      Write Mode : Normal\n")
	}
	fmt.Fprintf(&w, "       Sync Size : %d%s\n", sb.SyncSize/2, HumanSize(int64(sb.SyncSize*512)))
	if sb.Nodes == 0 {
		writeBitmapLine(&w, info)
		return 0
	}
	fmt.Fprintf(&w, "   Cluster nodes : %d\n", int32(sb.Nodes))
	fmt.Fprintf(&w, "    Cluster name : %-64s\n", sb.Name())
	if int32(sb.Nodes) < 0 {
		return 0 // mdadm's signed loop runs zero times
	}
	if sb.Nodes > MaxNodes {
		perr("%s: bitmap claims %d node slots, at most %d are possible; not reading them\n", src.Name, sb.Nodes, MaxNodes)
		return 1
	}
	cursor := info.next
	for i := 0; i < int(sb.Nodes); i++ {
		off, err := src.Locate(i, cursor)
		if err != nil {
			fmt.Fprintf(&w, "   Unable to open bitmap file on node: %d\n", i)
			continue
		}
		si := readSlotInfo(src.Dev, off, buf)
		cursor = si.next
		if si.readFailure {
			perr("failed to read superblock of bitmap file: %s\n", shortRead)
			fmt.Fprintf(&w, "   Unable to read bitmap on node: %d\n", i)
			continue
		}
		if si.short {
			perr("WARNING: bitmap file is not large enough for array size %d!\n\n", si.sb.SyncSize)
		}
		if si.sb.Magic != Magic {
			perr("invalid bitmap magic 0x%x, the bitmap file appears to be corrupted\n", si.sb.Magic)
		}
		fmt.Fprintf(&w, "       Node Slot : %d\n", i)
		fmt.Fprintf(&w, "          Events : %d\n", si.sb.Events)
		fmt.Fprintf(&w, "  Events Cleared : %d\n", si.sb.EventsCleared)
		fmt.Fprintf(&w, "           State : %s\n", stateName(si.sb.State))
		writeBitmapLine(&w, si)
	}
	return 0
}

func writeBitmapLine(w io.Writer, info slotInfo) {
	d := info.total
	if d == 0 {
		d = 1
	}
	fmt.Fprintf(w, "          Bitmap : %d bits (chunks), %d dirty (%2.1f%%)\n",
		info.total, info.dirty, 100.0*float64(info.dirty)/float64(d))
}
