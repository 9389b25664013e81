package array

import (
	"bytes"
	"errors"
	"fmt"
	"io"
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

// mdadmFields parses "Key : value" lines of mdadm -E/-X output (first
// occurrence of each key).
func mdadmFields(out string) map[string]string {
	f := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, " : ")
		if !ok {
			continue
		}
		k = strings.TrimSpace(k)
		if _, dup := f[k]; !dup {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

// TestRealMdadmReadsCreated creates arrays of many shapes on image files
// and has the real mdadm examine every member: mdadm -E on the image and
// mdadm -X on a read-only loop device must accept them, print the expected
// values, and print exactly what our examine code (mdadm-go) prints.
func TestRealMdadmReadsCreated(t *testing.T) {
	needMdadm(t)
	host, _ := os.Hostname()
	const mib = 1 << 20
	cases := []struct {
		name  string
		spec  CreateSpec
		sizes []int64 // member sizes; 0 = missing
		want  map[string]string
		wantX map[string]string
	}{
		{"raid1-internal", CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, Name: "r1", Homehost: host},
			[]int64{64 * mib, 80 * mib},
			map[string]string{"Raid Level": "raid1", "Raid Devices": "2", "Feature Map": "0x1", "Data Offset": "2048 sectors",
				"Array Size": "64512 KiB (63.00 MiB 66.06 MB)", "State": "active",
				"Internal Bitmap": "8 sectors from superblock", "Events": "0", "Name": host + ":r1  (local to host " + host + ")"},
			map[string]string{"Version": "4", "Chunksize": "64 MB", "Sync Size": "64512 (63.00 MiB 66.06 MB)", "Events": "0",
				"Bitmap": "1 bits (chunks), 1 dirty (100.0%)"}},
		{"raid1-clean-spare-nobitmap", CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapNone, AssumeClean: true, Name: "r1s", Homehost: "other"},
			[]int64{64 * mib, 64 * mib, 64 * mib},
			map[string]string{"Feature Map": "0x0", "State": "clean", "Bad Block Log": "512 entries available at offset 16 sectors", "Name": "other:r1s"},
			nil},
		{"raid1-degraded-writemostly", CreateSpec{Level: 1, RaidDevices: 3, Bitmap: BitmapInternal, BitmapChunk: 1 * mib, WriteBehind: 256, WriteMostly: []int{2}, FailFast: []int{0}, Name: "wm"},
			[]int64{64 * mib, 0, 64 * mib},
			map[string]string{"Raid Devices": "3", "Name": "wm"},
			map[string]string{"Write Mode": "Allow write behind, max 256", "Chunksize": "1 MB"}},
		{"raid1-clustered", CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapClustered, ClusterName: "anchor", Name: "c0", Homehost: "n1"},
			[]int64{512 * mib, 512 * mib},
			map[string]string{"Feature Map": "0x101", "Cluster Name": "anchor", "Name": "n1:c0"},
			map[string]string{"Version": "5", "Cluster nodes": "4", "Cluster name": "anchor", "Node Slot": "0", "Chunksize": "64 MB"}},
		{"raid1-clustered-8-nodes-1M-chunk", CreateSpec{Level: 1, RaidDevices: 3, Bitmap: BitmapClustered, Nodes: 8, BitmapChunk: mib, ClusterName: strings.Repeat("c", 63), Name: "c8"},
			[]int64{1024 * mib, 1024 * mib, 1100 * mib},
			map[string]string{"Feature Map": "0x101", "Data Offset": "4096 sectors"},
			map[string]string{"Cluster nodes": "8", "Chunksize": "1 MB"}},
		{"raid10-near2", CreateSpec{Level: 10, RaidDevices: 4, Bitmap: BitmapInternal, Name: "n2"},
			[]int64{64 * mib, 64 * mib, 64 * mib, 64 * mib, 64 * mib},
			// mdadm keeps twice the 512 KiB chunk as reshape headroom, so
			// the data starts at 2 MiB and 62 MiB of each member is used.
			map[string]string{"Raid Level": "raid10", "Layout": "near=2", "Chunk Size": "512K", "Data Offset": "4096 sectors",
				"Array Size": "126976 KiB (124.00 MiB 130.02 MB)", "Used Dev Size": ""},
			map[string]string{"Sync Size": "126976 (124.00 MiB 130.02 MB)"}},
		{"raid10-far2", CreateSpec{Level: 10, RaidDevices: 3, Layout: "f2", ChunkSize: 64 << 10, Name: "f2"},
			[]int64{64 * mib, 64 * mib, 64 * mib},
			map[string]string{"Layout": "far=2", "Chunk Size": "64K", "Feature Map": "0x0"}, nil},
		{"raid10-offset2", CreateSpec{Level: 10, RaidDevices: 2, Layout: "o2", ChunkSize: 128 << 10, Bitmap: BitmapInternal, Name: "o2"},
			[]int64{64 * mib, 64 * mib},
			map[string]string{"Layout": "offset=2", "Chunk Size": "128K"}, nil},
		{"raid10-near2-clustered", CreateSpec{Level: 10, RaidDevices: 2, Bitmap: BitmapClustered, Nodes: 3, ClusterName: "z", Name: "cn2"},
			[]int64{64 * mib, 64 * mib},
			map[string]string{"Layout": "near=2", "Cluster Name": "z"},
			map[string]string{"Cluster nodes": "3", "Sync Size": "63488 (62.00 MiB 65.01 MB)"}},
		{"raid1-10GiB", CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, Name: "big"},
			[]int64{10 << 30, 10 << 30},
			map[string]string{"Data Offset": "18432 sectors", "Bad Block Log": "512 entries available at offset 16 sectors"},
			map[string]string{"Chunksize": "64 MB", "Bitmap": "160 bits (chunks), 160 dirty (100.0%)"}},
		// More than 100 GiB per member: mdadm's default turns the bitmap on.
		{"raid1-300GiB-default-bitmap", CreateSpec{Level: 1, RaidDevices: 2, Name: "huge"},
			[]int64{300 << 30, 300 << 30},
			map[string]string{"Data Offset": "264192 sectors", "Internal Bitmap": "8 sectors from superblock"},
			map[string]string{"Chunksize": "64 MB"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var ms []Member
			var paths []string
			for i, sz := range tc.sizes {
				if sz == 0 {
					ms, paths = append(ms, nil), append(paths, "")
					continue
				}
				m, p := imageFile(t, dir, fmt.Sprintf("m%d.img", i), sz)
				ms, paths = append(ms, m), append(paths, p)
			}
			c, err := Create(tc.spec, ms)
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range paths {
				if p == "" {
					continue
				}
				out, errOut, x := realMdadm(t, "-E", p)
				if x != 0 || errOut != "" {
					t.Fatalf("mdadm -E %s: exit %d: %s", p, x, errOut)
				}
				if ours := examineOurs(t, p, host); ours != out {
					t.Errorf("member %d: mdadm-go -E differs from mdadm -E\nours:\n%s\nmdadm:\n%s", i, ours, out)
				}
				f := mdadmFields(out)
				if f["Array UUID"] != bitmap.FormatUUID(c.Info.UUID) || f["Device UUID"] != bitmap.FormatUUID(c.Devices[i].Super.DeviceUUID) {
					t.Errorf("member %d: UUIDs %q %q", i, f["Array UUID"], f["Device UUID"])
				}
				for k, v := range tc.want {
					if f[k] != v {
						t.Errorf("member %d: mdadm -E %s = %q, want %q", i, k, f[k], v)
					}
				}
				role := "spare"
				if i < tc.spec.RaidDevices {
					role = fmt.Sprintf("Active device %d", i)
				}
				if f["Device Role"] != role {
					t.Errorf("member %d: Device Role %q, want %q", i, f["Device Role"], role)
				}
				if c.Bitmap == nil {
					continue
				}
				loop := attachLoop(t, p, false)
				xo, xe, xx := realMdadm(t, "-X", loop)
				if xx != 0 {
					t.Fatalf("mdadm -X %s: exit %d: %s%s", loop, xx, xe, xo)
				}
				oo, oe, ox := examineBitmapOurs(t, p, loop)
				if oo != xo || oe != xe || ox != xx {
					t.Errorf("member %d: -X differs\nours (%d):\n%s%s\nmdadm (%d):\n%s%s", i, ox, oe, oo, xx, xe, xo)
				}
				fx := mdadmFields(xo)
				if fx["UUID"] != bitmap.FormatUUID(c.Info.UUID) {
					t.Errorf("member %d: bitmap UUID %q", i, fx["UUID"])
				}
				for k, v := range tc.wantX {
					if fx[k] != v {
						t.Errorf("member %d: mdadm -X %s = %q, want %q", i, k, fx[k], v)
					}
				}
				if c.Bitmap.Nodes > 0 && strings.Count(xo, "Node Slot") != int(c.Bitmap.Nodes) {
					t.Errorf("member %d: %d node slots printed, want %d", i, strings.Count(xo, "Node Slot"), c.Bitmap.Nodes)
				}
			}
		})
	}
}

// fillPattern fills b with a position-dependent pattern.
func fillPattern(b []byte, seed byte) {
	for i := 0; i < len(b) && i < 4096; i++ {
		b[i] = byte(i*7) ^ seed
	}
	for n := 4096; n < len(b); n *= 2 {
		copy(b[n:], b[:n])
	}
}

// patternMember is a large member that is never stored: it reads as a
// pattern and counts (and refuses) writes. It stands in for members too
// big to keep in memory in tests where nothing may be written.
type patternMember struct {
	name   string
	size   int64
	writes int
}

func (m *patternMember) ReadAt(p []byte, off int64) (int, error) {
	if off >= m.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > m.size-off {
		n = int(m.size - off)
	}
	for i := 0; i < n; i++ {
		p[i] = byte((off + int64(i)) * 7)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (m *patternMember) WriteAt(p []byte, off int64) (int, error) {
	m.writes++
	return 0, errors.New("pattern member: not writable")
}
func (m *patternMember) Size() (int64, error) { return m.size, nil }
func (m *patternMember) Sync() error          { return nil }
func (m *patternMember) Name() string         { return m.name }

// sizedErr is a member whose size cannot be read.
type sizedErr struct{ *memMember }

func (sizedErr) Size() (int64, error) { return 0, errors.New("device went away") }

// TestCreateRefusesBadSpecs: every invalid request is refused with a
// clear message (mdadm's words where it has them), wraps ErrRefused, and
// leaves every member byte as it was.
func TestCreateRefusesBadSpecs(t *testing.T) {
	const mib = 1 << 20
	ok := CreateSpec{Level: 1, RaidDevices: 2, Name: "x", Rand: &counterRand{}}
	with := func(f func(*CreateSpec)) CreateSpec { s := ok; f(&s); return s }
	cases := []struct {
		name  string
		spec  CreateSpec
		sizes []int64 // 0 = missing member
		want  string
	}{
		{"level 5", with(func(s *CreateSpec) { s.Level = 5 }), nil, "raid level 5 is not supported"},
		{"level 0", with(func(s *CreateSpec) { s.Level = 0 }), nil, "raid level 0 is not supported"},
		{"bitmap word", with(func(s *CreateSpec) { s.Bitmap = "external" }), nil, "bitmap must be 'internal', 'clustered' or 'none', not 'external'"},
		{"one node", with(func(s *CreateSpec) { s.Bitmap, s.Nodes, s.ClusterName = BitmapClustered, 1, "c" }), nil, "clustered array needs two nodes at least: 1"},
		{"nodes without clustered", with(func(s *CreateSpec) { s.Bitmap, s.Nodes = BitmapInternal, 4 }), nil, "--nodes argument only compatible with --bitmap=clustered"},
		{"no raid devices", with(func(s *CreateSpec) { s.RaidDevices = 0 }), nil, "invalid number of raid devices: 0"},
		{"one raid device", with(func(s *CreateSpec) { s.RaidDevices = 1 }), []int64{8 * mib}, "'1' is an unusual number of drives"},
		{"write-behind without bitmap", with(func(s *CreateSpec) { s.WriteBehind = 10 }), nil, "write-behind mode requires a bitmap."},
		{"write-behind too large", with(func(s *CreateSpec) { s.Bitmap, s.WriteBehind = BitmapInternal, 20000 }), nil, "Must be between 0 and 16383"},
		{"raid1 layout", with(func(s *CreateSpec) { s.Layout = "n2" }), nil, "layout not meaningful for raid1 arrays."},
		{"raid1 chunk", with(func(s *CreateSpec) { s.ChunkSize = 64 << 10 }), nil, "specifying chunk size is forbidden for this level"},
		{"raid10 layout word", with(func(s *CreateSpec) { s.Level, s.Layout = 10, "x2" }), nil, "layout for raid10 must be 'nNN', 'oNN' or 'fNN' where NN is a number, not x2"},
		{"raid10 zero copies", with(func(s *CreateSpec) { s.Level, s.Layout = 10, "n0" }), nil, "not n0"},
		{"raid10 201 copies", with(func(s *CreateSpec) { s.Level, s.Layout = 10, "f201" }), nil, "not f201"},
		{"raid10 far clustered", with(func(s *CreateSpec) { s.Level, s.Layout, s.Bitmap, s.ClusterName = 10, "f2", BitmapClustered, "c" }), nil, "only near layout is supported with clustered raid10"},
		{"raid10 too many copies", with(func(s *CreateSpec) { s.Level, s.Layout = 10, "n3" }), nil, "that layout requires at least 3 devices"},
		{"raid10 tiny chunk", with(func(s *CreateSpec) { s.Level, s.ChunkSize = 10, 2048 }), nil, "invalid chunk/rounding value"},
		{"raid10 chunk not power of 2", with(func(s *CreateSpec) { s.Level, s.ChunkSize = 10, 48<<10 }), nil, "not a power of 2"},
		{"too few members", ok, []int64{8 * mib}, "You haven't given enough devices (real or missing) to create this array"},
		{"missing spare", ok, []int64{8 * mib, 8 * mib, 0}, "member 2 is a spare and cannot be missing"},
		{"all missing", ok, []int64{0, 0}, "Subdevs can't be all missing"},
		{"write-mostly clustered", with(func(s *CreateSpec) { s.Bitmap, s.ClusterName, s.WriteMostly = BitmapClustered, "c", []int{1} }), nil, "Can not set m1 --write-mostly with a clustered bitmap"},
		{"write-mostly index", with(func(s *CreateSpec) { s.WriteMostly = []int{5} }), nil, "write-mostly: no member 5"},
		{"failfast missing member", with(func(s *CreateSpec) { s.FailFast = []int{1} }), []int64{8 * mib, 0}, "failfast: no member 1"},
		{"no name", with(func(s *CreateSpec) { s.Name = "" }), nil, "an array name is required"},
		{"long name", with(func(s *CreateSpec) { s.Name = strings.Repeat("n", 32) }), nil, "at most 31 bytes"},
		{"no cluster name", with(func(s *CreateSpec) { s.Bitmap = BitmapClustered }), nil, "needs the cluster name (--home-cluster)"},
		{"cluster name 65", with(func(s *CreateSpec) { s.Bitmap, s.ClusterName = BitmapClustered, strings.Repeat("c", 65) }), nil, "Cluster name too big."},
		{"cluster name 64", with(func(s *CreateSpec) { s.Bitmap, s.ClusterName = BitmapClustered, strings.Repeat("c", 64) }), nil, "at most 63 bytes"},
		{"cluster name without clustered", with(func(s *CreateSpec) { s.ClusterName = "c" }), nil, "only meaningful with --bitmap=clustered"},
		{"bitmap chunk without bitmap", with(func(s *CreateSpec) { s.BitmapChunk = 1 << 20 }), nil, "a bitmap chunk is given but the bitmap is \"default\""},
		{"bitmap chunk not power of 2", with(func(s *CreateSpec) { s.Bitmap, s.BitmapChunk = BitmapInternal, 3<<20 }), nil, "invalid bitmap chunksize"},
		{"bitmap chunk below 4K", with(func(s *CreateSpec) { s.Bitmap, s.BitmapChunk = BitmapInternal, 2048 }), nil, "Given bitmap chunk size not supported"},
		{"bitmap chunk too small for the member", with(func(s *CreateSpec) { s.Bitmap, s.BitmapChunk = BitmapInternal, 4096 }), []int64{1 << 30, 1 << 30}, "Given bitmap chunk size not supported: 4096 bytes, at least 65536 needed"},
		{"member too small", ok, []int64{8 * mib, 512 << 10}, "device m1 is too small (512K) for required metadata!"},
		{"nodes beyond room", with(func(s *CreateSpec) { s.Bitmap, s.ClusterName, s.Nodes = BitmapClustered, "c", 255 }), nil, "The max num of nodes can't exceed 254"},
		{"nodes beyond 64", with(func(s *CreateSpec) { s.Bitmap, s.ClusterName, s.Nodes = BitmapClustered, "c", 65 }), nil, "at most 64 bitmap slots"},
		{"raid10 missing both copies", with(func(s *CreateSpec) { s.Level, s.RaidDevices = 10, 4 }), []int64{0, 0, 8 * mib, 8 * mib}, "some chunk would have no copy"},
		{"random source fails", with(func(s *CreateSpec) { s.Rand = &fixedRand{make([]byte, 36)} }), nil, "device UUID for m1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sizes := tc.sizes
			if sizes == nil {
				sizes = []int64{8 * mib, 8 * mib}
			}
			var ms []Member
			var mems []*memMember
			var big []*patternMember
			var before [][]byte
			for i, sz := range sizes {
				name := fmt.Sprintf("m%d", i)
				switch {
				case sz == 0:
					ms = append(ms, nil)
				case sz > 64*mib:
					m := &patternMember{name: name, size: sz}
					ms, big = append(ms, m), append(big, m)
				default:
					m := newMem(name, sz)
					fillPattern(m.b, byte(i))
					ms, mems, before = append(ms, m), append(mems, m), append(before, m.snapshot())
				}
			}
			_, err := Create(tc.spec, ms)
			if err == nil {
				t.Fatalf("created; want error %q", tc.want)
			}
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q (refused: %v), want %q", err, errors.Is(err, ErrRefused), tc.want)
			}
			for i, m := range mems {
				if m.writes != 0 || !bytes.Equal(m.snapshot(), before[i]) {
					t.Errorf("%s was written (%d writes) although the request was refused", m.name, m.writes)
				}
			}
			for _, m := range big {
				if m.writes != 0 {
					t.Errorf("%s was written (%d writes) although the request was refused", m.name, m.writes)
				}
			}
		})
	}
	// A member whose size cannot be read, and a duplicate member.
	a := newMem("a", 8*mib)
	if _, err := Create(ok, []Member{a, sizedErr{newMem("b", 8*mib)}}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "cannot get the size of b: device went away") {
		t.Errorf("size error: %v", err)
	}
	if _, err := Create(ok, []Member{a, a}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "a is listed twice") {
		t.Errorf("duplicate: %v", err)
	}
	if a.writes != 0 {
		t.Errorf("a written")
	}
}

// TestCreateRefusesExistingArray: a member holding any md superblock is
// refused without Force, with the old array named; with Force, Create
// zeroes every old superblock (v0.90, v1.0, v1.1, v1.2), as mdadm does.
func TestCreateRefusesExistingArray(t *testing.T) {
	const size = 64 << 20
	spec := CreateSpec{Level: 1, RaidDevices: 2, Name: "old", Rand: &counterRand{}, Now: fixedNow(1_700_000_000)}
	a, b := newMem("a", size), newMem("b", size)
	if _, err := Create(spec, []Member{a, b}); err != nil {
		t.Fatal(err)
	}
	// Plant a v1.0, a v1.1 and a v0.90 superblock on b as well.
	old, _ := superblock.ReadAt(b, superblock.V12Offset)
	sectors := uint64(size / 512)
	for _, minor := range []int{0, 1} {
		s := clone(old)
		s.SuperOffset, _ = superblock.Offset(minor, sectors)
		s.DataOffset, s.DataSize = 0, 1000
		if minor == 1 {
			s.DataOffset = 2048
		}
		s.UpdateChecksum()
		blk, _ := encodeSuper(s)
		b.WriteAt(blk, int64(s.SuperOffset)*512)
	}
	v090 := int64(sectors&^127-128) * 512
	b.WriteAt([]byte{0xfc, 0x4e, 0x2b, 0xa9, 0, 0, 0, 0, 90, 0, 0, 0}, v090)

	before := b.snapshot()
	spec2 := spec
	spec2.Name, spec2.Rand = "new", &counterRand{n: 100}
	_, err := Create(spec2, []Member{newMem("c", size), b})
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "b appears to be part of a raid array: v1.2 superblock, level=raid1 devices=2") {
		t.Fatalf("want refusal naming the old array, got %v", err)
	}
	if !bytes.Equal(before, b.snapshot()) {
		t.Fatal("refused create changed b")
	}
	spec2.Force = true
	c, err := Create(spec2, []Member{newMem("c", size), b})
	if err != nil {
		t.Fatal(err)
	}
	after := b.snapshot()
	for _, off := range []int64{0, int64((sectors - 16) &^ 7 * 512), v090} {
		if !bytes.Equal(after[off:off+512], make([]byte, 512)) {
			t.Errorf("old superblock at byte %d not zeroed", off)
		}
	}
	sb, err := superblock.Probe(b, sectors)
	if err != nil || sb.SetUUID != c.Info.UUID || sb.Name() != "new" {
		t.Fatalf("after forced create: %v %+v", err, sb)
	}
}

// TestCreateWriteFailure: an I/O error while writing names the member and
// what was already written.
func TestCreateWriteFailure(t *testing.T) {
	a, b, c := newMem("a", 64<<20), newMem("b", 64<<20), newMem("c", 64<<20)
	b.failWriteAt = 4096 + 1
	_, err := Create(CreateSpec{Level: 1, RaidDevices: 3, Bitmap: BitmapInternal, Name: "w"}, []Member{a, b, c})
	var we *CreateWriteError
	if !errors.As(err, &we) || errors.Is(err, ErrRefused) {
		t.Fatalf("want *CreateWriteError, got %v", err)
	}
	if we.Failed != "b" || len(we.Written) != 1 || we.Written[0] != "a" || c.writes != 0 || a.syncs != 1 {
		t.Errorf("%+v; c writes %d, a syncs %d", we, c.writes, a.syncs)
	}
}

// TestDefaultDataOffset checks mdadm's data offset rule at the sizes where
// its branches change, against values computed by hand from mdadm 4.2's
// validate_geometry1 (and the familiar 18432 and 264192 sector offsets
// mdadm gives 10 GiB and 1 TiB members).
func TestDefaultDataOffset(t *testing.T) {
	cases := []struct {
		sectors, chunkKiB, want uint64
	}{
		{131072, 0, 2048},      // 64 MiB raid1
		{131072, 64, 2048},     // 64 MiB raid10, 64K chunk
		{131072, 512, 4096},    // 64 MiB raid10, 512K chunk: headroom stays at 2 chunks
		{2 << 20, 0, 4096},     // 1 GiB: headroom 1 MiB + 4K bitmap room
		{10 << 21, 0, 18432},   // 10 GiB
		{1 << 31, 0, 264192},   // 1 TiB: 128 MiB headroom, 128K bitmap room
		{400 << 21, 0, 264192}, // 400 GiB
		{48, 0, 2048},          // absurdly small: still 1 MiB
	}
	for _, c := range cases {
		if got := DefaultDataOffset(c.sectors, c.chunkKiB); got != c.want {
			t.Errorf("DefaultDataOffset(%d, %d) = %d, want %d", c.sectors, c.chunkKiB, got, c.want)
		}
	}
	for _, c := range []struct{ in, want uint64 }{{127, 0}, {128, 8}, {8<<21 + 8, 8}, {8<<21 + 9, 128}, {200<<21 + 127, 128}, {200<<21 + 128, 256}} {
		if got := chooseBMSpace(c.in); got != c.want {
			t.Errorf("chooseBMSpace(%d) = %d, want %d", c.in, got, c.want)
		}
	}
}

func TestParseRaid10Layout(t *testing.T) {
	for s, want := range map[string]uint32{"n2": 0x102, "n3": 0x103, "f2": 0x201, "o2": 0x10201, "n1": 0x101, "f200": 200<<8 + 1} {
		if got, err := ParseRaid10Layout(s); err != nil || got != want {
			t.Errorf("%s: %#x, %v; want %#x", s, got, err, want)
		}
	}
	for _, s := range []string{"", "n", "2", "x2", "n-1", "n+2", "n2x", "n 2", "n201", "N2"} {
		if _, err := ParseRaid10Layout(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

// FuzzParseRaid10Layout: the parser never panics and what it accepts
// round-trips through md's layout word.
func FuzzParseRaid10Layout(f *testing.F) {
	for _, s := range []string{"n2", "f3", "o2", "n201", "", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		w, err := ParseRaid10Layout(s)
		if err != nil {
			return
		}
		near, far := int(w&0xff), int(w>>8&0xff)
		if near*far < 1 || near*far > 200 || (w&0x10000 != 0) != (s[0] == 'o') {
			t.Fatalf("%q -> %#x", s, w)
		}
	})
}

// TestCreateOneMemberRaid1IsClean: a raid1 created with a single member
// (the others missing) has nothing to resync and is written clean, as md
// starts it; with two members, or a raid10 with one missing, it is not.
func TestCreateOneMemberRaid1IsClean(t *testing.T) {
	for _, c := range []struct {
		level, n int
		members  []Member
		clean    bool
	}{
		{1, 2, []Member{newMem("a", 64<<20), nil}, true},
		{1, 3, []Member{nil, newMem("a", 64<<20), nil}, true},
		{1, 3, []Member{newMem("a", 64<<20), newMem("b", 64<<20), nil}, false},
		{10, 4, []Member{newMem("a", 64<<20), nil, newMem("c", 64<<20), newMem("d", 64<<20)}, false},
	} {
		_, err := Create(CreateSpec{Level: c.level, RaidDevices: c.n, Bitmap: BitmapInternal, Name: "x",
			Rand: &counterRand{}, Now: fixedNow(1_800_000_000)}, c.members)
		if err != nil {
			t.Fatalf("level %d, %d devices: %v", c.level, c.n, err)
		}
		want := uint64(0)
		if c.clean {
			want = superblock.MaxSector
		}
		for _, m := range c.members {
			if m == nil {
				continue
			}
			sb, err := superblock.ReadAt(m, superblock.V12Offset)
			if err != nil {
				t.Fatal(err)
			}
			if sb.ResyncOffset != want {
				t.Errorf("level %d, %d of %d members: resync offset %#x, want %#x", c.level, countPresent(c.members, c.n), c.n, sb.ResyncOffset, want)
			}
		}
	}
}
