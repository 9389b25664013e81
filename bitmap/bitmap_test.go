package bitmap_test

import (
	"bytes"
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/mdcluster/superblock/mdtest"
)

// TestFixturesExamine reproduces mdadm -X for every fixture through the
// library (the CLI tests do it end to end, with exit codes).
func TestFixturesExamine(t *testing.T) {
	dir := t.TempDir()
	for _, name := range mdtest.Names(t) {
		t.Run(name, func(t *testing.T) {
			want, wantExit := mdtest.Expected(t, name, "X")
			f, err := os.Open(mdtest.Image(t, dir, name))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			sb, err := superblock.Probe(f, uint64(st.Size()/512))
			if err != nil {
				t.Fatal(err)
			}
			var out, errOut bytes.Buffer
			exit := 1
			if bsb := superblock.LoadBitmapSuper(f, sb); bsb == nil {
				errOut.WriteString("mdadm: " + name + ".img doesn't have bitmap\n")
			} else {
				exit = bitmap.Examine(&out, &errOut, "mdadm", bitmap.ExamineSource{
					Name: name + ".img", Dev: f,
					Locate: bitmap.Internal(sb.BitmapStart(), bitmap.MdadmStride(bsb)),
				})
			}
			if got := errOut.String() + out.String(); got != want || exit != wantExit {
				t.Errorf("exit %d (want %d), output:\n%s\nwant:\n%s", exit, wantExit, got, want)
			}
		})
	}
}

// TestFixtureSlots reads the clustered fixture's slots with the layout
// code: four slots of 4 KiB from byte 8192, all clean, slot sizes as the
// ceiling-division formula gives.
func TestFixtureSlots(t *testing.T) {
	f, err := os.Open(mdtest.Image(t, t.TempDir(), "raid1-clustered-0"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, bitmap.SuperblockSize)
	if _, err := f.ReadAt(buf, 8192); err != nil {
		t.Fatal(err)
	}
	sb, err := bitmap.ParseSuperblock(buf)
	if err != nil {
		t.Fatal(err)
	}
	l, err := bitmap.NewLayout(sb, 8192, bitmap.AlignFor(8))
	if err != nil {
		t.Fatal(err)
	}
	if l.Slots != 4 || l.SlotSize != 4096 || l.Bits != 8 {
		t.Fatalf("layout %+v, want 4 slots of 4096 bytes with 8 bits", l)
	}
	if err := l.CheckFits(8192, 2048*512); err != nil {
		t.Fatal(err)
	}
	events := []uint64{21, 21, 0, 0}
	for i := 0; i < 4; i++ {
		s, err := bitmap.ReadSlot(f, l, i)
		if err != nil {
			t.Fatalf("slot %d: %v", i, err)
		}
		if s.Super.Events != events[i] || s.Dirty() != 0 || s.Super.Name() != "anchor" {
			t.Errorf("slot %d: events %d dirty %d name %q", i, s.Super.Events, s.Dirty(), s.Super.Name())
		}
	}
}

func TestChunkBits(t *testing.T) {
	cases := []struct {
		sectors uint64
		chunk   uint32
		want    uint64
	}{
		{129024, 4 << 20, 16},                  // alpha: 63 MiB / 4 MiB rounds up
		{258048, 64 << 20, 2},                  // bravo (raid10: sync size is the array size)
		{1046528, 64 << 20, 8},                 // clustered
		{4294967296, 64 << 20, 32768},          // 2 TiB
		{1, 512, 1}, {0, 512, 0}, {3, 1024, 2}, // ceiling, not floor
		{^uint64(0), 512, ^uint64(0)}, // overflow is reported as huge
	}
	for _, c := range cases {
		if got := bitmap.ChunkBits(c.sectors, c.chunk); got != c.want {
			t.Errorf("ChunkBits(%d, %d) = %d, want %d", c.sectors, c.chunk, got, c.want)
		}
	}
	sb := bitmap.Superblock{SyncSize: 4294967296, ChunkSize: 64 << 20}
	if got := sb.SlotBytes(4096); got != 8192 { // 4096 + 256 bytes -> two pages
		t.Errorf("2 TiB slot = %d bytes, want 8192", got)
	}
	if got := sb.SlotBytes(512); got != 4608 {
		t.Errorf("2 TiB slot with 512 alignment = %d, want 4608", got)
	}
}

func validSuper() bitmap.Superblock {
	sb := bitmap.Superblock{
		Magic: bitmap.Magic, Version: bitmap.VersionClustered, UUID: [16]byte{1, 2, 3},
		Events: 10, EventsCleared: 9, SyncSize: 1 << 21, ChunkSize: 1 << 20,
		DaemonSleep: 5, Nodes: 4,
	}
	_ = sb.SetName("anchor")
	return sb
}

func TestRoundTrip(t *testing.T) {
	sb := validSuper()
	sb.State = bitmap.StateStale
	sb.WriteBehind = 256
	sb.SectorsReserved = 77
	b, _ := sb.MarshalBinary()
	if len(b) != 256 {
		t.Fatalf("%d bytes", len(b))
	}
	got, err := bitmap.ParseSuperblock(b)
	if err != nil {
		t.Fatal(err)
	}
	if *got != sb {
		t.Fatalf("round trip: %+v != %+v", *got, sb)
	}
	// Whole bitmap: format, set bits in one slot, write, read back.
	l, err := bitmap.NewLayout(&sb, 8192, 4096)
	if err != nil {
		t.Fatal(err)
	}
	dev := &memDev{b: make([]byte, l.End())}
	if err := bitmap.Format(dev, sb, l, true); err != nil {
		t.Fatal(err)
	}
	s0, _ := bitmap.ReadSlot(dev, l, 0)
	if s0.Dirty() != l.Bits {
		t.Fatalf("new slot 0: %d dirty of %d (mdadm makes it all dirty)", s0.Dirty(), l.Bits)
	}
	s2, _ := bitmap.ReadSlot(dev, l, 2)
	if s2.Dirty() != 0 {
		t.Fatalf("new slot 2: %d dirty", s2.Dirty())
	}
	for _, c := range []uint64{0, 7, 8, 500, 1022, l.Bits - 1} {
		s2.Set(c)
	}
	s2.Super.Events = 99
	if err := bitmap.WriteSlot(dev, l, 2, s2); err != nil {
		t.Fatal(err)
	}
	back, err := bitmap.ReadSlot(dev, l, 2)
	if err != nil {
		t.Fatal(err)
	}
	if back.Super.Events != 99 || !bytes.Equal(back.BitBytes(), s2.BitBytes()) {
		t.Fatal("slot 2 did not round trip")
	}
	if got := back.DirtyChunks(); len(got) != 6 || got[5] != l.Bits-1 {
		t.Fatalf("dirty chunks %v", got)
	}
	s1, _ := bitmap.ReadSlot(dev, l, 1)
	if s1.Dirty() != 0 {
		t.Fatal("writing slot 2 touched slot 1")
	}
}

func TestCorrupt(t *testing.T) {
	mod := func(f func(*bitmap.Superblock)) []byte {
		sb := validSuper()
		f(&sb)
		b, _ := sb.MarshalBinary()
		return b
	}
	cases := []struct {
		name string
		b    []byte
		is   error
		msg  string
	}{
		{"short", make([]byte, 100), nil, "need 256 bytes"},
		{"zeros", make([]byte, 256), bitmap.ErrBadMagic, "bad bitmap magic"},
		{"md superblock magic", mod(func(s *bitmap.Superblock) { s.Magic = 0xa92b4efc }), bitmap.ErrBadMagic, "0xa92b4efc"},
		{"version 2", mod(func(s *bitmap.Superblock) { s.Version = 2 }), bitmap.ErrCorrupt, "unknown version 2"},
		{"version 6", mod(func(s *bitmap.Superblock) { s.Version = 6 }), bitmap.ErrCorrupt, "unknown version 6"},
		{"chunk 0", mod(func(s *bitmap.Superblock) { s.ChunkSize = 0 }), bitmap.ErrCorrupt, "chunk size 0"},
		{"chunk not pow2", mod(func(s *bitmap.Superblock) { s.ChunkSize = 3 << 20 }), bitmap.ErrCorrupt, "power of two"},
		{"write behind", mod(func(s *bitmap.Superblock) { s.WriteBehind = 20000 }), bitmap.ErrCorrupt, "write_behind"},
		{"nodes in v4", mod(func(s *bitmap.Superblock) { s.Version = 4 }), bitmap.ErrCorrupt, "node slots in a version 4"},
		{"too many nodes", mod(func(s *bitmap.Superblock) { s.Nodes = 1000 }), bitmap.ErrCorrupt, "1000 node slots"},
		{"impossible size", mod(func(s *bitmap.Superblock) { s.SyncSize = 1 << 60; s.ChunkSize = 512 }), bitmap.ErrCorrupt, "chunks"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := bitmap.ParseSuperblock(c.b)
			if err == nil {
				t.Fatal("accepted")
			}
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("%v is not %v", err, c.is)
			}
			if !strings.Contains(err.Error(), c.msg) {
				t.Errorf("%q does not mention %q", err, c.msg)
			}
		})
	}
}

// TestSlotsDoNotFit: a node count whose slots would run into the data.
func TestSlotsDoNotFit(t *testing.T) {
	sb := validSuper()
	sb.Nodes = 32
	sb.SyncSize = 1 << 34 // 8 TiB at 1 MiB chunks: 8 MiB bits... per slot 1 MiB+
	l, err := bitmap.NewLayout(&sb, 8192, 4096)
	if err != nil {
		t.Fatal(err)
	}
	err = l.CheckFits(8192, 2048*512)
	if !errors.Is(err, bitmap.ErrNoRoom) || !strings.Contains(err.Error(), "32 slot(s)") {
		t.Fatalf("CheckFits: %v", err)
	}
	if err := l.CheckFits(16384, 1<<40); !errors.Is(err, bitmap.ErrNoRoom) {
		t.Fatalf("bitmap before floor: %v", err)
	}
}

func TestTruncatedSlot(t *testing.T) {
	sb := validSuper()
	l, _ := bitmap.NewLayout(&sb, 0, 4096)
	dev := &memDev{b: make([]byte, l.End())}
	_ = bitmap.Format(dev, sb, l, false)
	short := &memDev{b: dev.b[:l.SlotOffset(3)+300]}
	_, err := bitmap.ReadSlot(short, l, 3)
	if err == nil || !strings.Contains(err.Error(), "slot 3") {
		t.Fatalf("truncated slot: %v", err)
	}
	if _, err := bitmap.ReadSlot(dev, l, 4); err == nil {
		t.Fatal("slot 4 of 4 accepted")
	}
}

// TestExamineManySlotsShortDevice: a superblock naming MaxNodes slots on a
// device that ends after it. Every slot read fails and is reported; the
// read buffer is shared, not 8 KiB per slot (which made each FuzzBitmap run
// allocate about 1 MiB and the fuzzer crawl).
func TestExamineManySlotsShortDevice(t *testing.T) {
	sb := validSuper()
	sb.Nodes = bitmap.MaxNodes
	b, _ := sb.MarshalBinary()
	dev := &memDev{b: b[:bitmap.SuperblockSize]}
	examine := func(locate func(int, int64) (int64, error)) (string, string) {
		var out, errOut bytes.Buffer
		if st := bitmap.Examine(&out, &errOut, "mdadm", bitmap.ExamineSource{Name: "f", Dev: dev, Locate: locate}); st != 0 {
			t.Fatalf("exit status %d", st)
		}
		return out.String(), errOut.String()
	}
	for _, c := range []struct {
		name   string
		locate func(int, int64) (int64, error)
		failed int // slot reads that fail
	}{
		{"external", bitmap.ExternalFile(), bitmap.MaxNodes}, // slot 0 continues after the superblock
		{"internal", bitmap.Internal(0, bitmap.SlotAlign), bitmap.MaxNodes - 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			out, errOut := examine(c.locate)
			if want := "   Unable to read bitmap on node: 63\n"; !strings.HasSuffix(out, want) {
				t.Errorf("output does not end with %q:\n%s", want, out)
			}
			if n := strings.Count(errOut, "failed to read superblock of bitmap file: short read"); n != c.failed {
				t.Errorf("%d short-read diagnostics, want %d:\n%s", n, c.failed, errOut)
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			const runs = 10
			for range runs {
				examine(c.locate)
			}
			runtime.ReadMemStats(&after)
			// About 60 KiB (twice that under the race detector); it was
			// 580 KiB with a buffer per slot.
			if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 256<<10 {
				t.Errorf("Examine allocates %d bytes per call, want less than 256 KiB", per)
			}
		})
	}
}

// TestHugeBitmapShortDevice: a superblock whose sync size and chunk size
// promise the most bits Validate accepts (2^31, a 256 MiB bitmap) on a
// device or buffer that ends right after it. Reading the slot must fail
// saying how much was there, without first allocating what the header
// promises (that made every FuzzBitmap run allocate a gigabyte).
func TestHugeBitmapShortDevice(t *testing.T) {
	sb := validSuper()
	sb.ChunkSize = bitmap.MinChunkSize
	sb.SyncSize = bitmap.MaxBits // sectors of 512 bytes, one chunk each
	if err := sb.Validate(); err != nil {
		t.Fatal(err)
	}
	b, _ := sb.MarshalBinary()
	img := append(b, make([]byte, 1000)...)
	dev := bytes.NewReader(img)
	l, err := bitmap.NewLayout(&sb, 0, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	allocs := func(f func()) uint64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc
	}
	var rerr, derr error
	n := allocs(func() {
		_, rerr = bitmap.ReadSlot(dev, l, 0)
		_, derr = bitmap.DecodeSlot(img)
	})
	if want := "bitmap slot 0 at byte 0: read 1256 of 268435712 bytes: unexpected EOF"; rerr == nil || rerr.Error() != want {
		t.Errorf("ReadSlot: %v, want %q", rerr, want)
	}
	if want := "bitmap slot: truncated: 2147483648 chunk bits need 268435712 bytes, have 1256"; derr == nil || derr.Error() != want {
		t.Errorf("DecodeSlot: %v, want %q", derr, want)
	}
	if n > 1<<20 {
		t.Errorf("reading a 1256-byte slot allocated %d bytes", n)
	}
}

// TestReadSlotLarge reads a slot bigger than ReadSlot's first read, so the
// buffer has to grow while the data keeps coming.
func TestReadSlotLarge(t *testing.T) {
	sb := validSuper()
	sb.ChunkSize = bitmap.MinChunkSize
	sb.SyncSize = 200 << 13 // 200 KiB of bits
	b, _ := sb.MarshalBinary()
	bits := make([]byte, 200<<10)
	for i := range bits {
		bits[i] = byte(i*7 + i>>8)
	}
	l, err := bitmap.NewLayout(&sb, 0, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	s, err := bitmap.ReadSlot(bytes.NewReader(append(b, bits...)), l, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.BitBytes(), bits) {
		t.Fatal("bits differ")
	}
}

func TestHumanSize(t *testing.T) {
	cases := map[int64]string{
		0:             "",
		5000*1024 - 1: "",
		66060288:      " (63.00 MiB 66.06 MB)",
		535822336:     " (511.00 MiB 535.82 MB)",
		2 << 30:       " (2.00 GiB 2.15 GB)",
		2 << 40:       " (2.00 TiB 2.20 TB)",
		-5:            "",
	}
	for in, want := range cases {
		if got := bitmap.HumanSize(in); got != want {
			t.Errorf("HumanSize(%d) = %q, want %q", in, got, want)
		}
	}
	if got := bitmap.HumanChunk(64 << 20); got != "64 MB" {
		t.Errorf("HumanChunk = %q", got)
	}
	if got := bitmap.HumanChunk(3000); got != "2 KB" {
		t.Errorf("HumanChunk(3000) = %q", got)
	}
}

type memDev struct{ b []byte }

func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, errors.New("EOF")
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, errors.New("EOF")
	}
	return n, nil
}

func (m *memDev) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, errors.New("beyond end")
	}
	return copy(m.b[off:], p), nil
}

// FuzzBitmap feeds arbitrary bytes as a bitmap area (superblock of slot 0
// and whatever follows): parsing, layout, slot reads and the -X report must
// never panic, and a superblock that parses must encode back to its bytes.
func FuzzBitmap(f *testing.F) {
	// Inputs stay small: go's minimiser is quadratic in the input length
	// and a worker fuzzes nothing while it minimises, so inputs of a few
	// KiB stall the fuzzer for a minute at a time. Slots are therefore
	// packed 8-byte aligned rather than mdadm's 512 or 4096 (the code does
	// not care), so two slots with 8 chunk bits each take 528 bytes. Reads
	// that span several 8 KiB chunks are covered by the fixtures.
	const align, stride, maxLen = 8, bitmap.SuperblockSize + 8, 640
	sb := validSuper()
	sb.Nodes, sb.SyncSize = 2, 8<<11 // 8 chunks of 1 MiB
	l, _ := bitmap.NewLayout(&sb, 0, align)
	if l.SlotSize != stride {
		f.Fatalf("slot size %d, want %d", l.SlotSize, stride)
	}
	dev := &memDev{b: make([]byte, l.End())}
	_ = bitmap.Format(dev, sb, l, true)
	f.Add(dev.b)
	v4 := validSuper()
	v4.Version, v4.Nodes = 4, 0
	b, _ := v4.MarshalBinary()
	f.Add(b)
	f.Add([]byte("bitm"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxLen {
			// Truncate rather than return: an early return would be new
			// coverage of its own, and the first long input would be
			// minimised at length.
			data = data[:maxLen]
		}
		if len(data) >= 4 && data[0]&1 == 0 {
			copy(data, []byte{0x62, 0x69, 0x74, 0x6d}) // the magic, most of the time
		}
		dev := &memDev{b: data}
		var out, errOut bytes.Buffer
		bitmap.Examine(&out, &errOut, "mdadm", bitmap.ExamineSource{Name: "f", Dev: dev, Locate: bitmap.ExternalFile()})
		bitmap.Examine(&out, &errOut, "mdadm", bitmap.ExamineSource{Name: "f", Dev: dev, Locate: bitmap.Internal(0, stride)})
		sb, err := bitmap.ParseSuperblock(data)
		if err != nil {
			return
		}
		enc, _ := sb.MarshalBinary()
		if !bytes.Equal(enc[:136], data[:136]) {
			t.Fatal("encode(decode(x)) != x")
		}
		l, err := bitmap.NewLayout(sb, 0, align)
		if err != nil {
			return
		}
		for i := 0; i < l.Slots && i < 4; i++ {
			if s, err := bitmap.ReadSlot(dev, l, i); err == nil {
				_ = s.Dirty()
			}
		}
	})
}
