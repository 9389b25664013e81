package array

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/mdcluster/superblock/mdtest"
)

// Byte ranges of fields that Linux md rewrites after mdadm has created an
// array (run, resync, stop), relative to the structure they belong to.
const (
	sbUTime, sbEvents, sbResync, sbCsum = 192, 200, 208, 216
	bmEvents, bmEventsCleared           = 24, 32
)

// kernelMask lists what md changed in a fixture after mdadm created it,
// so that the comparison can ignore exactly that and nothing else.
type kernelMask struct {
	resync bool  // resync_offset rewritten (array stopped clean after a resync)
	slots  []int // bitmap slots a node (the kernel) has used since creation
}

// maskHeader zeroes, in a member header image, the fields md rewrites: the
// superblock's utime, events and checksum (and resync offset if asked), and
// for each used bitmap slot its events, events_cleared and the chunk bits
// (only the bits that describe chunks; the padding bits after them are
// compared).
func maskHeader(b []byte, sb *superblock.Superblock, l *bitmap.Layout, km kernelMask) {
	off := int(sb.SuperOffset) * superblock.SectorSize
	clear(b[off+sbUTime : off+sbEvents+8])
	clear(b[off+sbCsum : off+sbCsum+4])
	if km.resync {
		clear(b[off+sbResync : off+sbResync+8])
	}
	if l == nil {
		return
	}
	for _, s := range km.slots {
		so := int(l.SlotOffset(s))
		clear(b[so+bmEvents : so+bmEventsCleared+8])
		bitsAt := so + bitmap.SuperblockSize
		for i := uint64(0); i < l.Bits; i++ {
			b[bitsAt+int(i/8)] &^= 1 << (i % 8)
		}
	}
}

// diffBytes describes the first differences between two header images.
func diffBytes(got, want []byte, sbOff int) string {
	var b strings.Builder
	n := 0
	for i := range got {
		if got[i] == want[i] {
			continue
		}
		where := ""
		if i >= sbOff && i < sbOff+superblock.FixedSize {
			where = fmt.Sprintf(" (superblock +%d)", i-sbOff)
		} else if i >= sbOff+superblock.FixedSize && i < sbOff+4096 {
			where = fmt.Sprintf(" (role table entry %d)", (i-sbOff-superblock.FixedSize)/2)
		}
		fmt.Fprintf(&b, "  byte %#x%s: ours %#02x, mdadm %#02x\n", i, where, got[i], want[i])
		if n++; n == 12 {
			b.WriteString("  ...\n")
			break
		}
	}
	return b.String()
}

// fixtureSuper reads the superblock of a restored fixture image.
func fixtureSuper(t *testing.T, path string) *superblock.Superblock {
	t.Helper()
	m, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	sb, err := superblock.ReadAt(m, superblock.V12Offset)
	if err != nil {
		t.Fatal(err)
	}
	return sb
}

// fixtureCreate creates, on fresh images of the fixtures' sizes, the array
// the fixture members were created as, feeding the fixture's UUIDs and
// creation time in as the "random" and "clock" inputs. It returns our
// image paths and the fixture image paths.
func fixtureCreate(t *testing.T, spec CreateSpec, fixtures []string) (*Created, []string, []string) {
	t.Helper()
	dir := t.TempDir()
	var ours, theirs []string
	var rnd []byte
	var ms []Member
	for i, name := range fixtures {
		fpath := mdtest.Image(t, dir, name)
		theirs = append(theirs, fpath)
		fsb := fixtureSuper(t, fpath)
		if i == 0 {
			spec.UUID = fsb.SetUUID
			spec.Now = fixedNow(int64(fsb.CTime))
		}
		rnd = append(rnd, fsb.DeviceUUID[:]...)
		st, err := os.Stat(fpath)
		if err != nil {
			t.Fatal(err)
		}
		m, path := imageFile(t, dir, fmt.Sprintf("ours-%d.img", i), st.Size())
		ours = append(ours, path)
		ms = append(ms, m)
	}
	spec.Rand = &fixedRand{rnd}
	c, err := Create(spec, ms)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return c, ours, theirs
}

// compareWithFixture compares our member image with the fixture's over
// everything before the data (superblock, role table, bitmap slots with
// their padding, bad-block log area, and the unused space), with only the
// fields md rewrites masked.
func compareWithFixture(t *testing.T, ours, theirs string, km kernelMask) {
	t.Helper()
	osb, tsb := fixtureSuper(t, ours), fixtureSuper(t, theirs)
	if osb.DataOffset != tsb.DataOffset {
		t.Fatalf("data offset: ours %d, mdadm %d", osb.DataOffset, tsb.DataOffset)
	}
	n := int(tsb.DataOffset) * superblock.SectorSize
	om, _ := OpenFile(ours, false)
	tm, _ := OpenFile(theirs, false)
	defer om.Close()
	defer tm.Close()
	got, want := readHeader(t, om, n), readHeader(t, tm, n)
	var l *bitmap.Layout
	if bsb := superblock.LoadBitmapSuper(om, osb); bsb != nil {
		lay, err := bitmap.NewLayout(bsb, osb.BitmapStart(), bitmap.AlignFor(osb.BitmapOffset))
		if err != nil {
			t.Fatal(err)
		}
		l = &lay
	}
	maskHeader(got, osb, l, km)
	maskHeader(want, tsb, l, km)
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from %s (mdadm 4.2 + Linux) in the first %d bytes:\n%s", filepath.Base(ours), filepath.Base(theirs), n, diffBytes(got, want, superblock.V12Offset*superblock.SectorSize))
	}
}

// TestCreateMatchesMdadmFixtures creates the fixture arrays again and
// compares every metadata byte with what real mdadm 4.2 wrote (and Linux
// 6.1 updated): only the fields md rewrites when it runs and stops an array
// are masked.
func TestCreateMatchesMdadmFixtures(t *testing.T) {
	cases := []struct {
		name     string
		fixtures []string
		spec     CreateSpec
		mask     kernelMask
	}{
		{"alpha", []string{"raid1-alpha-0", "raid1-alpha-1"},
			CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, BitmapChunk: 4 << 20, AssumeClean: true, Name: "alpha", Homehost: "(none)"},
			kernelMask{slots: []int{0}}},
		{"bravo", []string{"raid10-bravo-0", "raid10-bravo-1", "raid10-bravo-2", "raid10-bravo-3"},
			CreateSpec{Level: 10, RaidDevices: 4, Layout: "n2", ChunkSize: 64 << 10, Bitmap: BitmapInternal, AssumeClean: true, Name: "bravo", Homehost: "(none)"},
			kernelMask{slots: []int{0}}},
		// md-cluster never marks a clustered array clean, so the resync
		// offset is what mdadm wrote (0). Nodes n1 and n2 used slots 0
		// and 1; slots 2 and 3 are exactly as mdadm created them.
		{"clustered", []string{"raid1-clustered-0", "raid1-clustered-1"},
			CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapClustered, Nodes: 4, ClusterName: "anchor", Name: "anchor0", Homehost: "n1"},
			kernelMask{slots: []int{0, 1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, ours, theirs := fixtureCreate(t, tc.spec, tc.fixtures)
			for i := range ours {
				compareWithFixture(t, ours[i], theirs[i], tc.mask)
			}
		})
	}
}

// TestCreateFreshValues checks what mdadm writes before md touches the
// array, which the fixtures cannot show because md has run them: events 0,
// bitmap events 0, slot 0 all dirty (bits and padding), the resync offset
// by AssumeClean.
func TestCreateFreshValues(t *testing.T) {
	for _, clean := range []bool{false, true} {
		ms := []Member{newMem("a", 64<<20), newMem("b", 64<<20)}
		c, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, Name: "x", AssumeClean: clean,
			Rand: &counterRand{}, Now: fixedNow(1_800_000_000)}, ms)
		if err != nil {
			t.Fatal(err)
		}
		for i, m := range ms {
			sb, err := superblock.ReadAt(m, superblock.V12Offset)
			if err != nil {
				t.Fatal(err)
			}
			if err := sb.Validate(131072); err != nil {
				t.Fatal(err)
			}
			want := uint64(0)
			if clean {
				want = superblock.MaxSector
			}
			if sb.Events != 0 || sb.ResyncOffset != want || sb.CTime != 1_800_000_000 || sb.UTime != sb.CTime || sb.DevNumber != uint32(i) {
				t.Errorf("clean=%v member %d: events %d resync %#x ctime %d utime %d dev %d", clean, i, sb.Events, sb.ResyncOffset, sb.CTime, sb.UTime, sb.DevNumber)
			}
			slot, err := bitmap.ReadSlot(m, c.BitmapLayout, 0)
			if err != nil {
				t.Fatal(err)
			}
			if slot.Super.Events != 0 || slot.Super.EventsCleared != 0 || slot.Dirty() != slot.Len() {
				t.Errorf("bitmap: events %d/%d, %d of %d dirty", slot.Super.Events, slot.Super.EventsCleared, slot.Dirty(), slot.Len())
			}
			pad := make([]byte, c.BitmapLayout.SlotSize-bitmap.SuperblockSize)
			m.ReadAt(pad, c.BitmapLayout.SlotOffset(0)+bitmap.SuperblockSize)
			if !bytes.Equal(pad, bytes.Repeat([]byte{0xff}, len(pad))) {
				t.Errorf("slot 0 after its superblock is not all 0xff")
			}
		}
		if c.Info.Clean != clean || c.Info.Events != 0 {
			t.Errorf("info %+v", c.Info)
		}
	}
}

