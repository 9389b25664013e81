package vm3pattern

import (
	"strings"
	"testing"
)

// write fills the region's sectors as writes 0..k-1 leave them.
func write(r Region, disk map[uint64][]byte, k uint64) {
	n := r.Blocks()
	for i := uint64(0); i < k; i++ {
		blk, pass := i%n, i/n
		for s := uint64(0); s < r.Block; s += Sector {
			off := r.Start + blk*r.Block + s
			b := make([]byte, Sector)
			Fill(b, Stamp{Node: r.Node, Epoch: r.Epoch, Offset: off, Pass: pass})
			disk[off] = b
		}
	}
}

func check(r Region, disk map[uint64][]byte, acked uint64) error {
	for off := r.Start; off < r.Start+r.Len; off += Sector {
		b := disk[off]
		if b == nil {
			b = make([]byte, Sector)
		}
		if err := r.Check(b, off, acked); err != nil {
			return err
		}
	}
	return nil
}

// TestRegionCheck: what the writer leaves passes with what it
// acknowledged (and with the write in flight landed or not); a lost
// acknowledged write, a stale pass, a torn or misplaced sector do not.
func TestRegionCheck(t *testing.T) {
	r := Region{Node: 2, Epoch: 3, Start: 1 << 20, Len: 64 << 10, Block: 16 << 10} // 4 blocks
	disk := map[uint64][]byte{}
	write(r, disk, 10) // 2.5 passes
	for _, acked := range []uint64{9, 10} {
		if err := check(r, disk, acked); err != nil {
			t.Fatalf("acked %d, 10 written: %v", acked, err)
		}
	}
	if err := check(r, map[uint64][]byte{}, 0); err != nil {
		t.Fatalf("nothing written, nothing acknowledged: %v", err)
	}
	for _, tc := range []struct {
		name  string
		mod   func(d map[uint64][]byte)
		acked uint64
		want  string
	}{
		{"acknowledged but never written", func(d map[uint64][]byte) { clear(d) }, 1, "zeroes"},
		{"one more acknowledged than written", func(map[uint64][]byte) {}, 11, "pass 1, but pass 2"},
		{"torn sector", func(d map[uint64][]byte) { d[r.Start+Sector][100] ^= 1 }, 10, "torn"},
		{"another offset's sector", func(d map[uint64][]byte) { d[r.Start] = d[r.Start+Sector] }, 10, "holds node 2's sector for offset"},
		{"an older epoch under an acknowledged write", func(d map[uint64][]byte) {
			Fill(d[r.Start], Stamp{Node: 2, Epoch: 2, Offset: r.Start, Pass: 7})
		}, 10, "epoch 2"},
	} {
		d := map[uint64][]byte{}
		write(r, d, 10)
		tc.mod(d)
		err := check(r, d, tc.acked)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
}
