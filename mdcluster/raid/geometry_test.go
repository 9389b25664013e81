package raid

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

const kib = 1024

// place is a copy in chunk units, for tables written by hand: member and
// device chunk row.
type place struct{ m, row int }

// TestRAID10TablesByHand checks Locate against layouts drawn by hand from
// md's description (md(4) and raid10.c's header): columns are members,
// rows are device chunks, letters are array chunks.
func TestRAID10TablesByHand(t *testing.T) {
	const chunkSectors = 128 // 64 KiB
	chunk := int64(chunkSectors * 512)
	cases := []struct {
		name   string
		disks  int
		layout uint32
		dev    uint64 // sectors per member
		// want[c] lists array chunk c's copies in md's order.
		want [][]place
	}{
		{
			// A A B B
			// C C D D
			name: "n2-4disks", disks: 4, layout: 0x102, dev: 2 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 0}}, {{2, 0}, {3, 0}}, {{0, 1}, {1, 1}}, {{2, 1}, {3, 1}}},
		},
		{
			// A A B
			// B C C
			// D D E
			// E F F
			name: "n2-3disks", disks: 3, layout: 0x102, dev: 4 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 0}}, {{2, 0}, {0, 1}}, {{1, 1}, {2, 1}}, {{0, 2}, {1, 2}}, {{2, 2}, {0, 3}}, {{1, 3}, {2, 3}}},
		},
		{
			// A A A
			// B B B
			name: "n3-3disks", disks: 3, layout: 0x103, dev: 2 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 0}, {2, 0}}, {{0, 1}, {1, 1}, {2, 1}}},
		},
		{
			// far=2 over 2 disks, 4 chunks each: the first half of each
			// device holds the array raid0-style, the second half again
			// with every chunk moved one device on.
			// A B
			// C D
			// B A
			// D C
			name: "f2-2disks", disks: 2, layout: 0x201, dev: 4 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 2}}, {{1, 0}, {0, 2}}, {{0, 1}, {1, 3}}, {{1, 1}, {0, 3}}},
		},
		{
			// far=2 over 3 disks, 5 chunks each: A = ⌊⌊5/2⌋·3/1⌋ = 6
			// array chunks; used = ⌈6·2/3⌉ = 4 chunks; stride = 2 chunks.
			// A B C
			// D E F
			// C A B
			// F D E
			// (the fifth row is unused)
			name: "f2-3disks", disks: 3, layout: 0x201, dev: 5 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 2}}, {{1, 0}, {2, 2}}, {{2, 0}, {0, 2}}, {{0, 1}, {1, 3}}, {{1, 1}, {2, 3}}, {{2, 1}, {0, 3}}},
		},
		{
			// offset=2 over 3 disks: each stripe is followed by itself
			// moved one device on.
			// A B C
			// C A B
			// D E F
			// F D E
			name: "o2-3disks", disks: 3, layout: 0x10201, dev: 4 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 1}}, {{1, 0}, {2, 1}}, {{2, 0}, {0, 1}}, {{0, 2}, {1, 3}}, {{1, 2}, {2, 3}}, {{2, 2}, {0, 3}}},
		},
		{
			// far=3 over 3 disks, 3 chunks each: stride 1 chunk.
			// A B C
			// C A B
			// B C A
			name: "f3-3disks", disks: 3, layout: 0x301, dev: 3 * chunkSectors,
			want: [][]place{{{0, 0}, {1, 1}, {2, 2}}, {{1, 0}, {2, 1}, {0, 2}}, {{2, 0}, {0, 1}, {1, 2}}},
		},
		{
			// near=2 far=2 over 4 disks, 4 chunks each: A = ⌊⌊4/2⌋·4/2⌋ = 4,
			// used = 4, stride = 2 chunks. Far copies move near=2 devices on.
			// A A B B
			// C C D D
			// B B A A
			// D D C C
			name: "n2f2-4disks", disks: 4, layout: 0x202, dev: 4 * chunkSectors,
			want: [][]place{
				{{0, 0}, {2, 2}, {1, 0}, {3, 2}},
				{{2, 0}, {0, 2}, {3, 0}, {1, 2}},
				{{0, 1}, {2, 3}, {1, 1}, {3, 3}},
				{{2, 1}, {0, 3}, {3, 1}, {1, 3}},
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g, err := NewRAID10(tc.disks, tc.layout, chunkSectors, tc.dev)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := g.Size(), int64(len(tc.want))*chunk; got != want {
				t.Fatalf("array size %d, want %d (%d chunks)", got, want, len(tc.want))
			}
			for c, want := range tc.want {
				for _, within := range []int64{0, 4 * kib, chunk - 512} {
					off := int64(c)*chunk + within
					locs, run := g.Locate(off, nil)
					if run != chunk-within {
						t.Errorf("chunk %d+%d: run %d, want %d", c, within, run, chunk-within)
					}
					if len(locs) != len(want) {
						t.Fatalf("chunk %d: %d copies, want %d", c, len(locs), len(want))
					}
					for i, p := range want {
						wl := Loc{Member: p.m, Off: int64(p.row)*chunk + within}
						if locs[i] != wl {
							t.Errorf("chunk %d+%d copy %d: %+v, want %+v (all %+v)", c, within, i, locs[i], wl, locs)
						}
					}
				}
			}
		})
	}
}

func TestRAID1Locate(t *testing.T) {
	g, err := NewRAID1(3, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if g.Size() != 1<<20 || g.DevSize() != 1<<20 || g.Copies() != 3 {
		t.Fatalf("size %d devsize %d copies %d", g.Size(), g.DevSize(), g.Copies())
	}
	locs, run := g.Locate(4096, nil)
	want := []Loc{{0, 4096}, {1, 4096}, {2, 4096}}
	if fmt.Sprint(locs) != fmt.Sprint(want) || run != 1<<20-4096 {
		t.Fatalf("Locate(4096) = %v run %d", locs, run)
	}
	n := 0
	g.Extents(100, 1<<30, func(e Extent) bool { n++; return e.Off == 100 && e.Len == 1<<20-100 })
	if n != 1 {
		t.Fatalf("raid1 range made %d extents, want 1", n)
	}
}

// TestRAID10Sizes checks array and used device sizes against md's rules
// worked by hand, including a real array's figures (the raid10 fixture
// made by mdadm: 4 members of 129024 sectors, near=2, 64K chunks, whose
// "Array Size" mdadm prints as 129024 KiB).
func TestRAID10Sizes(t *testing.T) {
	cases := []struct {
		disks                 int
		layout                uint32
		chunk                 uint32
		dev                   uint64
		size, devSize, stride int64 // sectors
	}{
		{4, 0x102, 128, 129024, 258048, 129024, 0},
		// 3 disks near=2, 11 chunks each: A = ⌊11·3/2⌋ = 16, used = ⌈32/3⌉ = 11.
		{3, 0x102, 128, 11*128 + 5, 16 * 128, 11 * 128, 0},
		// 3 disks far=2, 11 chunks: ⌊11/2⌋·3 = 15; used ⌈30/3⌉ = 10; stride 5.
		{3, 0x201, 128, 11 * 128, 15 * 128, 10 * 128, 5 * 128},
		// 4 disks far=3, 11 chunks: ⌊11/3⌋·4 = 12; used ⌈36/4⌉ = 9; stride 3.
		{4, 0x301, 128, 11 * 128, 12 * 128, 9 * 128, 3 * 128},
		// offset=2 over 3 disks, 11 chunks: 15 array chunks, used 10, stride 1 chunk.
		{3, 0x10201, 128, 11 * 128, 15 * 128, 10 * 128, 128},
		// 5 disks near=2 far=2, 10 chunks: ⌊⌊10/2⌋·5/2⌋ = 12; used ⌈48/5⌉ = 10; stride 5.
		{5, 0x202, 8, 10 * 8, 12 * 8, 10 * 8, 5 * 8},
	}
	for _, tc := range cases {
		g, err := NewRAID10(tc.disks, tc.layout, tc.chunk, tc.dev)
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if g.Size() != tc.size*512 || g.DevSize() != tc.devSize*512 || g.Stride() != tc.stride*512 {
			t.Errorf("%d disks layout %#x dev %d: size %d devsize %d stride %d sectors, want %d %d %d",
				tc.disks, tc.layout, tc.dev, g.Size()/512, g.DevSize()/512, g.Stride()/512, tc.size, tc.devSize, tc.stride)
		}
	}
}

func TestGeometryRefuses(t *testing.T) {
	for _, tc := range []struct {
		disks  int
		layout uint32
		chunk  uint32
	}{
		{2, 0x101, 128},   // one copy
		{2, 0x103, 128},   // three copies on two disks
		{4, 0x102, 100},   // chunk not a power of two
		{4, 0x102, 4},     // chunk below 4 KiB
		{4, 0x20102, 128}, // far sets
		{5, 0x10202, 128}, // offset with near copies not dividing the disks
		{1, 0x102, 128},
	} {
		if _, err := NewRAID10(tc.disks, tc.layout, tc.chunk, 1<<20); err == nil {
			t.Errorf("NewRAID10(%d, %#x, %d) accepted", tc.disks, tc.layout, tc.chunk)
		}
	}
	if _, err := NewRAID1(0, 100); err == nil {
		t.Error("raid1 with no disks accepted")
	}
	sb := &superblock.Superblock{Level: superblock.LevelRAID10, Layout: 0x201, ChunkSize: 128, RaidDisks: 3, Size: 11 * 128}
	g, err := FromSuperblock(sb)
	if err != nil || g.Level() != RAID10 || g.Far() != 2 || g.Layout() != 0x201 {
		t.Fatalf("FromSuperblock: %v %v", g, err)
	}
	if _, err := FromSuperblock(&superblock.Superblock{Level: 5, RaidDisks: 3, Size: 100}); err == nil {
		t.Error("raid5 accepted")
	}
}

// TestOffsetNearWrapCollides shows why NewRAID10 refuses offset layouts
// whose near copies do not divide the disks: md's wrap of a near copy to
// the next device row lands on the row that holds offset copies.
func TestOffsetNearWrapCollides(t *testing.T) {
	chunk := int64(4096)
	g := Geometry{level: RAID10, disks: 5, near: 2, far: 2, offset: true, chunk: chunk, devSize: 40 * chunk, stride: chunk, size: 50 * chunk}
	seen := map[Loc]int64{}
	for c := int64(0); c < 10; c++ {
		locs, _ := g.Locate(c*chunk, nil)
		for _, l := range locs {
			if prev, dup := seen[l]; dup {
				t.Logf("chunks %d and %d share %+v, as expected", prev, c, l)
				return
			}
			seen[l] = c
		}
	}
	t.Fatal("no collision found: the refusal in NewRAID10 may be unnecessary")
}

// geometryCases returns n random raid10 geometries (plus fixed corner
// cases) with small chunks, so the property tests can visit every chunk.
func geometryCases(rng *rand.Rand, n int) []Geometry {
	var out []Geometry
	add := func(disks int, layout uint32, chunk uint32, dev uint64) {
		g, err := NewRAID10(disks, layout, chunk, dev)
		if err == nil {
			out = append(out, g)
		}
	}
	for _, l := range []uint32{0x102, 0x103, 0x201, 0x301, 0x10201, 0x10301, 0x202} {
		for d := 2; d <= 6; d++ {
			add(d, l, 8, 8*37)
		}
	}
	for len(out) < n {
		disks := 2 + rng.IntN(7)
		near, far := 1+rng.IntN(3), 1+rng.IntN(3)
		l := uint32(near) | uint32(far)<<8
		if rng.IntN(3) == 0 {
			l |= LayoutOffsetBit
		}
		chunk := uint32(8) << rng.IntN(3)
		add(disks, l, chunk, uint64(chunk)*uint64(1+rng.IntN(40))+uint64(rng.IntN(int(chunk))))
	}
	return out
}

// TestGeometryProperties checks, for random raid10 shapes, chunk by chunk:
// every array chunk has exactly Copies() copies on distinct members, inside
// the used device area; no two copies of any chunks share a place; far and
// offset copies follow md's rules; Virt inverts Locate; Survives agrees
// with brute force. RAID_GEOMETRY_SEED replays a run.
func TestGeometryProperties(t *testing.T) {
	seed := seedFromEnv(t, "RAID_GEOMETRY_SEED")
	rng := rand.New(rand.NewPCG(seed, 0))
	for _, g := range geometryCases(rng, 200) {
		if !checkGeometry(t, g, rng) {
			t.Fatalf("geometry %v failed; replay with RAID_GEOMETRY_SEED=%d go test -run TestGeometryProperties ./mdcluster/raid/", g, seed)
		}
	}
}

func checkGeometry(t *testing.T, g Geometry, rng *rand.Rand) bool {
	t.Helper()
	ch := g.ChunkSize()
	chunks := g.Size() / ch
	if g.Size()%ch != 0 || chunks == 0 {
		t.Errorf("%v: size not a whole number of chunks", g)
		return false
	}
	used := map[Loc]int64{}
	for c := int64(0); c < chunks; c++ {
		within := rng.Int64N(ch/512) * 512
		locs, run := g.Locate(c*ch+within, nil)
		if run != ch-within {
			t.Errorf("%v chunk %d: run %d", g, c, run)
			return false
		}
		if len(locs) != g.Copies() {
			t.Errorf("%v chunk %d: %d copies", g, c, len(locs))
			return false
		}
		members := map[int]bool{}
		for i, l := range locs {
			if members[l.Member] {
				t.Errorf("%v chunk %d: two copies on member %d: %v", g, c, l.Member, locs)
				return false
			}
			members[l.Member] = true
			if l.Off < within || l.Off-within+ch > g.DevSize() || (l.Off-within)%ch != 0 {
				t.Errorf("%v chunk %d copy %d at %+v: outside the used area %d or not chunk aligned", g, c, i, l, g.DevSize())
				return false
			}
			key := Loc{Member: l.Member, Off: l.Off - within}
			if prev, dup := used[key]; dup {
				t.Errorf("%v: chunks %d and %d share member %d offset %d", g, prev, c, key.Member, key.Off)
				return false
			}
			used[key] = c
			// far rule: copy n*far+f is near copy n moved f*near devices
			// and f strides.
			n, f := i/g.Far(), i%g.Far()
			nearLoc := locs[n*g.Far()]
			if wantM := (nearLoc.Member + f*g.Near()) % g.Disks(); l.Member != wantM || l.Off != nearLoc.Off+int64(f)*g.Stride() {
				t.Errorf("%v chunk %d copy %d at %+v: far rule wants member %d offset %d", g, c, i, l, wantM, nearLoc.Off+int64(f)*g.Stride())
				return false
			}
			switch {
			case g.Far() > 1 && g.Offset():
				if g.Stride() != ch {
					t.Errorf("%v: offset stride %d", g, g.Stride())
					return false
				}
			case g.Far() > 1:
				// far copy f lies in section f of the device
				if l.Off/g.Stride() != int64(f) {
					t.Errorf("%v chunk %d copy %d at %+v: not in section %d (stride %d)", g, c, i, l, f, g.Stride())
					return false
				}
			}
			off, cp, vrun, ok := g.Virt(l.Member, l.Off)
			if !ok || off != c*ch+within || cp != i || vrun != ch-within {
				t.Errorf("%v: Virt(%d, %d) = %d copy %d run %d ok %v, want %d copy %d", g, l.Member, l.Off, off, cp, vrun, ok, c*ch+within, i)
				return false
			}
		}
	}
	// Every place Virt claims is one Locate gives.
	for m := 0; m < g.Disks(); m++ {
		for o := int64(0); o < g.DevSize(); o += ch {
			off, _, _, ok := g.Virt(m, o)
			if c, isUsed := used[Loc{m, o}]; ok != isUsed || (ok && off != c*ch) {
				t.Errorf("%v: Virt(%d, %d) = %d %v, Locate says used=%v chunk %d", g, m, o, off, ok, isUsed, c)
				return false
			}
		}
	}
	// Survives against brute force, for random sets of live members.
	for k := 0; k < 8; k++ {
		live := rng.Uint32()
		ok := func(m int) bool { return live&(1<<m) != 0 }
		want := true
		for c := int64(0); c < chunks && want; c++ {
			locs, _ := g.Locate(c*ch, nil)
			any := false
			for _, l := range locs {
				any = any || ok(l.Member)
			}
			want = any
		}
		if got := g.Survives(ok); got != want {
			t.Errorf("%v: Survives(live=%b) = %v, brute force %v", g, live, got, want)
			return false
		}
	}
	return true
}
