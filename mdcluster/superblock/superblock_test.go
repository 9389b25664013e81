package superblock_test

import (
	"bytes"
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/mdcluster/superblock/mdtest"
)

// TestFixturesExamine checks that every fixture written by real mdadm and
// md parses, has a correct checksum, and renders exactly as mdadm -E
// printed it.
func TestFixturesExamine(t *testing.T) {
	dir := t.TempDir()
	for _, name := range mdtest.Names(t) {
		t.Run(name, func(t *testing.T) {
			want, exit := mdtest.Expected(t, name, "E")
			if exit != 0 {
				t.Fatalf("fixture says mdadm -E failed (%d); test expects members", exit)
			}
			path := mdtest.Image(t, dir, name)
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			sectors := uint64(st.Size()) / 512
			sb, err := superblock.Probe(f, sectors)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			if err := sb.Validate(sectors); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if sb.MinorVersion() != 2 || sb.SuperOffset != superblock.V12Offset {
				t.Errorf("version 1.%d at sector %d, want 1.2 at 8", sb.MinorVersion(), sb.SuperOffset)
			}
			var out bytes.Buffer
			out.WriteString(name + ".img:\n")
			err = sb.Examine(&out, superblock.ExamineOptions{
				DevSectors: sectors,
				Bitmap:     superblock.LoadBitmapSuper(f, sb),
				Location:   time.UTC,
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := out.String(); got != want {
				t.Errorf("examine output differs from mdadm:\n%s", lineDiff(want, got))
			}
			// The raw bytes must survive decode and encode unchanged.
			raw := make([]byte, sb.Len())
			if _, err := f.ReadAt(raw, int64(sb.SuperOffset)*512); err != nil {
				t.Fatal(err)
			}
			enc, err := sb.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(enc, raw) {
				t.Errorf("re-encoded superblock differs from the device's bytes")
			}
		})
	}
}

// TestFixtureFacts pins a few facts the fixtures document, so a parser bug
// that happens to render the same text is still caught.
func TestFixtureFacts(t *testing.T) {
	dir := t.TempDir()
	load := func(name string) (*superblock.Superblock, *os.File) {
		f, err := os.Open(mdtest.Image(t, dir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		st, _ := f.Stat()
		sb, err := superblock.Parse(mustRead(t, f, 4096, 4096), uint64(st.Size()/512))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return sb, f
	}
	sb, f := load("raid1-clustered-0")
	if sb.FeatureMap != superblock.FeatureBitmapOffset|superblock.FeatureClustered {
		t.Errorf("clustered feature map %#x", sb.FeatureMap)
	}
	if sb.Clean() {
		t.Errorf("clustered array marked clean; md never does that")
	}
	bsb := superblock.LoadBitmapSuper(f, sb)
	if bsb == nil || bsb.Nodes != 4 || bsb.Version != bitmap.VersionClustered || bsb.Name() != "anchor" {
		t.Fatalf("clustered bitmap superblock %+v", bsb)
	}
	sb, _ = load("raid1-charlie-2-spare")
	if sb.Role() != 1 {
		t.Errorf("rebuilt spare role %d, want 1", sb.Role())
	}
	sb, _ = load("raid1-clustered-2-spare")
	if sb.Role() != superblock.RoleSpare {
		t.Errorf("spare role %#x, want %#x", sb.Role(), superblock.RoleSpare)
	}
	sb, _ = load("raid10-bravo-0")
	if sb.Level != superblock.LevelRAID10 || sb.Layout != 0x102 || sb.ChunkSize != 128 {
		t.Errorf("raid10 level %d layout %#x chunk %d", sb.Level, sb.Layout, sb.ChunkSize)
	}
}

func mustRead(t *testing.T, f *os.File, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// lineDiff shows the first differing lines of two texts.
func lineDiff(want, got string) string {
	w := strings.Split(want, "\n")
	g := strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			b.WriteString("line " + itoa(i+1) + ":\n  want " + quote(wl) + "\n  got  " + quote(gl) + "\n")
		}
	}
	return b.String()
}

func quote(s string) string { return strconv.Quote(s) }

func itoa(i int) string { return strconv.Itoa(i) }

// sample returns a valid v1.2 superblock like mdadm creates for a raid1
// member with an internal bitmap.
func sample() *superblock.Superblock {
	sb := &superblock.Superblock{
		Magic: superblock.Magic, MajorVersion: 1,
		FeatureMap: superblock.FeatureBitmapOffset,
		SetUUID:    [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
		CTime:      1700000000, Level: 1, Size: 129024, RaidDisks: 2,
		BitmapOffset: 8, DataOffset: 2048, DataSize: 129024, SuperOffset: 8,
		DeviceUUID: [16]byte{0xaa, 0xbb}, UTime: 1700000001, Events: 7,
		ResyncOffset: superblock.MaxSector, MaxDev: 128,
		BBLogShift: 9, BBLogSize: 8, BBLogOffset: 16,
	}
	_ = sb.SetNameString("host:sample")
	sb.DevRoles = make([]uint16, 128)
	for i := range sb.DevRoles {
		sb.DevRoles[i] = superblock.RoleSpare
	}
	sb.DevRoles[0], sb.DevRoles[1] = 0, 1
	sb.UpdateChecksum()
	return sb
}

func TestRoundTrip(t *testing.T) {
	for _, maxDev := range []uint32{0, 1, 2, 3, 127, 384, superblock.MaxDevs} {
		sb := sample()
		sb.MaxDev = maxDev
		sb.DevRoles = make([]uint16, maxDev)
		for i := range sb.DevRoles {
			sb.DevRoles[i] = uint16(i*7919) ^ 0x5a5a
		}
		sb.Pad3[5] = 9 // reserved bytes survive too
		sb.UpdateChecksum()
		b, err := sb.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if len(b) != 256+2*int(maxDev) {
			t.Fatalf("max_dev %d: %d bytes", maxDev, len(b))
		}
		got, err := superblock.Parse(b, 0)
		if err != nil {
			t.Fatalf("max_dev %d: %v", maxDev, err)
		}
		b2, _ := got.MarshalBinary()
		if !bytes.Equal(b, b2) {
			t.Fatalf("max_dev %d: round trip changed bytes", maxDev)
		}
	}
}

// TestChecksumOddLength covers the trailing 16-bit word the checksum adds
// when max_dev is odd, by checking against an independent computation.
func TestChecksumOddLength(t *testing.T) {
	sb := sample()
	sb.MaxDev = 3
	sb.DevRoles = []uint16{0, 1, 0xabcd}
	b, _ := sb.MarshalBinary()
	var sum uint64
	for i := 0; i+4 <= len(b); i += 4 {
		if i != 216 {
			sum += uint64(b[i]) | uint64(b[i+1])<<8 | uint64(b[i+2])<<16 | uint64(b[i+3])<<24
		}
	}
	sum += 0xabcd
	want := uint32(sum) + uint32(sum>>32)
	if got := sb.ComputeChecksum(); got != want {
		t.Fatalf("checksum %08x, want %08x", got, want)
	}
}

func TestWriteProbe(t *testing.T) {
	for minor := 0; minor <= 2; minor++ {
		dev := &memDev{b: make([]byte, 8<<20)}
		sectors := uint64(len(dev.b) / 512)
		sb := sample()
		off, err := superblock.Offset(minor, sectors)
		if err != nil {
			t.Fatal(err)
		}
		sb.SuperOffset = off
		switch minor {
		case 0:
			sb.DataOffset, sb.DataSize, sb.Size, sb.BitmapOffset = 0, off-64, off-64, -16
		case 1:
			sb.DataOffset, sb.DataSize, sb.Size = 2048, sectors-2048, sectors-2048
		case 2:
			sb.DataOffset, sb.DataSize, sb.Size = 2048, sectors-2048, sectors-2048
		}
		if err := sb.Write(dev); err != nil {
			t.Fatal(err)
		}
		got, err := superblock.Probe(dev, sectors)
		if err != nil {
			t.Fatalf("1.%d: %v", minor, err)
		}
		if got.MinorVersion() != minor || got.SuperOffset != off {
			t.Fatalf("1.%d: found 1.%d at %d", minor, got.MinorVersion(), got.SuperOffset)
		}
		if err := got.Validate(sectors); err != nil {
			t.Fatalf("1.%d: %v", minor, err)
		}
	}
}

// TestCorrupt feeds damaged or foreign superblocks and checks that each is
// refused with an error naming the problem.
func TestCorrupt(t *testing.T) {
	good := func() []byte { b, _ := sample().MarshalBinary(); return b }
	put32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	put64 := func(b []byte, off int, v uint64) { put32(b, off, uint32(v)); put32(b, off+4, uint32(v>>32)) }
	fix := func(b []byte) []byte { // recompute checksum
		sb, err := superblock.Decode(b)
		if err != nil {
			return b
		}
		sb.UpdateChecksum()
		out, _ := sb.MarshalBinary()
		return out
	}
	cases := []struct {
		name    string
		data    func() []byte
		devSec  uint64
		wantErr error
		wantMsg string
	}{
		{"empty", func() []byte { return nil }, 0, nil, "truncated"},
		{"zeros", func() []byte { return make([]byte, 4096) }, 0, superblock.ErrBadMagic, "expected a92b4efc"},
		{"foreign magic", func() []byte { b := good(); put32(b, 0, 0x6d746962); return b }, 0, superblock.ErrBadMagic, "found 6d746962"},
		{"bad checksum", func() []byte { b := good(); b[100] ^= 1; return b }, 0, superblock.ErrChecksum, "stored"},
		{"major version", func() []byte { b := good(); put32(b, 4, 2); return fix(b) }, 0, superblock.ErrCorrupt, "major version 2"},
		{"max_dev too large", func() []byte { b := good(); put32(b, 220, 5000); return b }, 0, superblock.ErrCorrupt, "max_dev 5000"},
		{"roles truncated", func() []byte { b := good(); return b[:300] }, 0, nil, "truncated"},
		{"unknown feature", func() []byte { b := good(); put32(b, 8, 1<<20|1); return fix(b) }, 0, superblock.ErrCorrupt, "unknown feature"},
		{"data overlaps sb", func() []byte { b := good(); put64(b, 128, 8); return fix(b) }, 0, superblock.ErrCorrupt, "overlaps"},
		{"data beyond device", func() []byte { return good() }, 4096, superblock.ErrCorrupt, "beyond device end"},
		{"size > data size", func() []byte { b := good(); put64(b, 80, 1<<40); return fix(b) }, 0, superblock.ErrCorrupt, "exceeds data size"},
		{"impossible size", func() []byte { b := good(); put64(b, 136, 1<<60); return fix(b) }, 0, superblock.ErrCorrupt, "8 EiB"},
		{"bitmap at sb", func() []byte { b := good(); put32(b, 96, 0); return fix(b) }, 0, superblock.ErrCorrupt, "bitmap at offset 0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := superblock.Parse(c.data(), c.devSec)
			if err == nil {
				t.Fatal("accepted")
			}
			if c.wantErr != nil && !errors.Is(err, c.wantErr) {
				t.Errorf("error %v is not %v", err, c.wantErr)
			}
			if !strings.Contains(err.Error(), c.wantMsg) {
				t.Errorf("error %q does not mention %q", err, c.wantMsg)
			}
		})
	}
}

func TestProbeNothing(t *testing.T) {
	dev := &memDev{b: make([]byte, 1<<20)}
	if _, err := superblock.Probe(dev, 2048); !errors.Is(err, superblock.ErrBadMagic) {
		t.Fatalf("empty device: %v", err)
	}
	if _, err := superblock.Probe(dev, 10); !errors.Is(err, superblock.ErrBadMagic) || !strings.Contains(err.Error(), "too small") {
		t.Fatalf("tiny device: %v", err)
	}
	// A v1.2 superblock copied to the wrong place is not accepted.
	sb := sample()
	b, _ := sb.MarshalBinary()
	copy(dev.b[0:], b)
	if _, err := superblock.Probe(dev, 2048); err == nil || !strings.Contains(err.Error(), "super_offset") {
		t.Fatalf("misplaced superblock: %v", err)
	}
}

func TestCTimeFormat(t *testing.T) {
	sb := sample()
	sb.CTime = uint64(time.Date(2026, 11, 1, 9, 7, 5, 0, time.UTC).Unix()) | 123456<<40 // microseconds above bit 40
	var out bytes.Buffer
	_ = sb.Examine(&out, superblock.ExamineOptions{DevSectors: 131072, Location: time.UTC})
	if !strings.Contains(out.String(), "  Creation Time : Sun Nov  1 09:07:05 2026\n") {
		t.Fatalf("ctime line wrong:\n%s", out.String())
	}
}

// TestExamineHugeRaidDisks is the input that stalled FuzzSuperblock: a
// corrupt raid_disks ("0000" = 0x30303030) or a huge negative delta_disks.
// Examine used to keep a 512 KiB table per call and format 65536 Array
// State characters one Fprintf at a time. The line still stops after 65536
// characters (docs/formats.md), but the cost must not depend on the claimed
// number of disks.
func TestExamineHugeRaidDisks(t *testing.T) {
	for _, c := range []struct {
		name        string
		raid, delta uint32
		first       string // Array State character of disk 0
	}{
		{"raid_disks", 0x30303030, 0, "A"},
		{"delta_disks", 2, 0x80000001, "A"}, // -2147483647: mdadm adds 2147483647 slots
		{"role thrice", 0x30303030, 0, "?"},
	} {
		t.Run(c.name, func(t *testing.T) {
			sb := sample()
			sb.RaidDisks = c.raid
			if c.delta != 0 {
				sb.FeatureMap |= superblock.FeatureReshapeActive
				sb.DeltaDisks = c.delta
			}
			if c.first == "?" {
				sb.DevRoles[5], sb.DevRoles[6] = 0, 0
			}
			sb.UpdateChecksum()
			examine := func() string {
				var out bytes.Buffer
				if err := sb.Examine(&out, superblock.ExamineOptions{Location: time.UTC}); err != nil {
					t.Fatal(err)
				}
				return out.String()
			}
			got := examine()
			// Disk 65535 is the last one shown; like mdadm, we count the
			// devices whose role equals it, and spares have role 0xffff.
			want := "   Array State : " + c.first + "A" + strings.Repeat(".", 1<<16-3) + "? ('A' == active, '.' == missing, 'R' == replacing)\n" +
				"WARNING Array state is inconsistent - each number should appear only once\n"
			if !strings.Contains(got, want) {
				i := strings.Index(got, "   Array State : ")
				t.Fatalf("Array State line wrong: %.120q...", got[max(i, 0):])
			}
			// Memory: the 64 KiB line and its buffers (about 220 KiB, more
			// under the race detector), nothing per disk or per role value;
			// the old role table alone took 512 KiB.
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			const runs = 10
			for range runs {
				examine()
			}
			runtime.ReadMemStats(&after)
			if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 512<<10 {
				t.Errorf("Examine allocates %d bytes per call, want less than 512 KiB", per)
			}
		})
	}
}

func TestHomeHost(t *testing.T) {
	sb := sample()
	var out bytes.Buffer
	_ = sb.Examine(&out, superblock.ExamineOptions{DevSectors: 131072, Location: time.UTC, HomeHost: "host"})
	if !strings.Contains(out.String(), "           Name : host:sample  (local to host host)\n") {
		t.Fatalf("homehost line wrong:\n%s", out.String())
	}
}

// memDev is an in-memory device for tests.
type memDev struct{ b []byte }

func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, errEOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, errEOF
	}
	return n, nil
}

func (m *memDev) WriteAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > int64(len(m.b)) {
		return 0, errors.New("write beyond end")
	}
	return copy(m.b[off:], p), nil
}

var errEOF = errors.New("EOF")

// FuzzSuperblock feeds arbitrary bytes as a superblock: decoding,
// validating and examining must never panic, and whatever decodes must
// encode back to the same bytes.
func FuzzSuperblock(f *testing.F) {
	// Seeds are small: a few roles, not the 128 of sample(). Go's
	// minimiser is quadratic in the input length and a worker fuzzes
	// nothing while it minimises, so big inputs stall the fuzzer.
	small := func(sb *superblock.Superblock) []byte {
		sb.MaxDev, sb.DevRoles = 4, sb.DevRoles[:4]
		sb.UpdateChecksum()
		b, _ := sb.MarshalBinary()
		return b
	}
	f.Add(small(sample()))
	sb := sample()
	sb.Level, sb.Layout, sb.ChunkSize, sb.RaidDisks = 10, 0x102, 128, 4
	sb.FeatureMap |= superblock.FeatureReshapeActive | superblock.FeatureRecoveryOffset | superblock.FeatureNewOffset
	sb.DeltaDisks = ^uint32(0)
	sb.DevFlags = 3
	f.Add(small(sb))
	f.Add(make([]byte, 256))
	f.Fuzz(func(t *testing.T, data []byte) {
		// 1 KiB is the header and 384 roles. Larger max_dev values reach
		// the same code; their limits (max_dev above MaxDevs, roles beyond
		// the input) depend on the header alone, which small inputs cover.
		// Truncate rather than return: an early return would be new
		// coverage of its own, and the first long input would be minimised
		// at length.
		if len(data) > 1024 {
			data = data[:1024]
		}
		if len(data) >= 4 {
			// Give the fuzzer the magic for free most of the time.
			data[0], data[1], data[2], data[3] = 0xfc, 0x4e, 0x2b, 0xa9
		}
		sb, err := superblock.Decode(data)
		if err != nil {
			return
		}
		_ = sb.Validate(uint64(len(data)))
		var out bytes.Buffer
		bsb := &bitmap.Superblock{Magic: bitmap.Magic, Version: 5, Nodes: 3, SyncSize: sb.Size, ChunkSize: 1 << 26}
		_ = sb.Examine(&out, superblock.ExamineOptions{DevSectors: uint64(len(data)), Bitmap: bsb, Location: time.UTC})
		_ = sb.Examine(&out, superblock.ExamineOptions{DevSectors: 0, Location: time.UTC})
		enc, err := sb.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded but cannot encode: %v", err)
		}
		if !bytes.Equal(enc, data[:len(enc)]) {
			t.Fatalf("encode(decode(x)) != x")
		}
	})
}
