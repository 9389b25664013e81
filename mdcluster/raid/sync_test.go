package raid

import (
	"bytes"
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

// scribble writes random garbage straight onto member m's copy of array
// bytes [off, off+n), behind the engine's back, so the copies differ the
// way a crash between two mirror writes leaves them.
func (r *rig) scribble(rng *rand.Rand, m int, off, n int64) {
	r.geo.Extents(off, n, func(x Extent) bool {
		for _, l := range x.Copies {
			if l.Member == m {
				b := make([]byte, x.Len)
				fillRandom(rng, b)
				if _, err := r.mem[m].WriteAt(b, rigDataOff+l.Off); err != nil {
					r.t.Fatal(err)
				}
			}
		}
		return true
	})
}

func (r *rig) written() []uint64 {
	var out []uint64
	for _, m := range r.mem {
		out = append(out, m.Stats().BytesWritten)
	}
	return out
}

// TestResyncExactness makes copies differ in many chunks, resyncs a
// random subset of them and checks: exactly the listed chunks' non-first
// copies were written (byte counts per member), they now equal the first
// copy, and every unlisted chunk still differs as it did.
func TestResyncExactness(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	for name, g := range testGeometries(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 3))
			const cs = 16 << 10
			r := newRig(t, g, rigOpts{bitmap: true, bitmapChunk: cs})
			nchunks := g.Size() / cs
			// every chunk gets garbage on some non-first copy
			for c := int64(0); c < nchunks; c++ {
				locs, _ := g.Locate(c*cs, nil)
				m := locs[1+rng.IntN(len(locs)-1)].Member
				r.scribble(rng, m, c*cs, cs)
			}
			var list []uint64
			for c := int64(0); c < nchunks; c++ {
				if rng.IntN(3) == 0 {
					list = append(list, uint64(c))
				}
			}
			// expected bytes written per member: every copy but the first
			want := make([]uint64, g.Disks())
			for _, c := range list {
				g.Extents(int64(c)*cs, cs, func(x Extent) bool {
					for _, l := range x.Copies[1:] {
						want[l.Member] += uint64(x.Len)
					}
					return true
				})
			}
			before := r.written()
			if err := r.e.Resync(context.Background(), slices.Clone(list)); err != nil {
				t.Fatal(err)
			}
			after := r.written()
			for m := range want {
				if got := after[m] - before[m]; got != want[m] {
					t.Errorf("member %d: resync wrote %d bytes, want exactly %d (replay: RAID_SEED=%d)", m, got, want[m], seed)
				}
			}
			for c := int64(0); c < nchunks; c++ {
				listed := slices.Contains(list, uint64(c))
				same := true
				g.Extents(c*cs, cs, func(x Extent) bool {
					first := r.copyOf(x.Copies[0].Member, x.Copies[0], x.Len)
					for _, l := range x.Copies[1:] {
						if !bytes.Equal(first, r.copyOf(l.Member, l, x.Len)) {
							same = false
						}
					}
					return true
				})
				if listed != same {
					t.Errorf("chunk %d (listed %v): copies identical = %v (replay: RAID_SEED=%d)", c, listed, same, seed)
				}
			}
			if p := r.e.Progress(); p.Running || p.Err != nil || p.Done != int64(len(list))*cs || p.Op != "resync" {
				t.Errorf("progress after resync: %+v", p)
			}
		})
	}
}

// TestResyncBarrier runs writers during a resync of every chunk and
// requires every copy to end identical: the resync window holds writes out
// of the copy's way. Without the barrier (a deliberate bug) a write lands
// between the copy's read and its write and the copies differ.
func TestResyncBarrier(t *testing.T) {
	g := testGeometries(t)["raid1-3"]
	run := func(mut mutation) bool {
		r := newRig(t, g, rigOpts{tweak: func(c *Config) { c.ResyncIOSize = 16 << 10; c.SpeedLimitMin = 1 << 30 }})
		r.e.mut = mut
		r.shuffleIO(uint64(mut) + 1)
		const cs = 64 << 10
		var chunks []uint64
		for c := uint64(0); c < uint64(g.Size()/cs); c++ {
			chunks = append(chunks, c)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for w := 0; w < 3; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(w), 9))
				for i := 0; ctx.Err() == nil; i++ {
					b := bytes.Repeat([]byte{byte(i)}, 4096)
					if err := r.e.WriteAt(b, rng.Int64N(g.Size()/4096)*4096, 0); err != nil {
						t.Error(err)
						return
					}
				}
			}(w)
		}
		err := r.e.Resync(context.Background(), chunks)
		cancel()
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		q := &quietTB{TB: t}
		r.t = q
		return r.checkCopies(nil)
	}
	if !run(0) {
		t.Fatal("copies differ after a resync with concurrent writes")
	}
	diverged := false
	for i := 0; i < 5 && !diverged; i++ {
		diverged = !run(mutNoBarrier)
	}
	if !diverged {
		t.Fatal("without the resync barrier the copies never diverged: the test cannot tell")
	}
}

// TestFullResyncNewArray: a new array whose members differ reads the first
// copy everywhere until resynced, and ends with every copy equal to it.
func TestFullResyncNewArray(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	rng := rand.New(rand.NewPCG(seed, 4))
	g := testGeometries(t)["raid10-o2-3"]
	var windows [][2]int64
	r := newRig(t, g, rigOpts{bitmap: true, tweak: func(c *Config) {
		c.ClusterWindow = 512 << 10
		c.ResyncIOSize = 64 << 10
		c.SpeedLimitMin = 1 << 30
		c.OnSyncWindow = func(ctx context.Context, lo, hi int64) error {
			windows = append(windows, [2]int64{lo, hi})
			return nil
		}
	}})
	for m := 0; m < 3; m++ {
		r.scribble(rng, m, 0, g.Size())
	}
	first := make([]byte, g.Size())
	g.Extents(0, g.Size(), func(x Extent) bool {
		copy(first[x.Off:], r.copyOf(x.Copies[0].Member, x.Copies[0], x.Len))
		return true
	})
	r.e.MarkNeedSync(0, g.Size())
	got := make([]byte, g.Size())
	for i := 0; i < 3; i++ {
		if _, err := r.e.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, first) {
			t.Fatal("before the resync a read did not come from the first copy")
		}
	}
	if err := r.e.FullResync(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.checkCopies(first)
	want := [][2]int64{{0, 512 << 10}, {512 << 10, 1 << 20}, {1 << 20, 1536 << 10}, {1536 << 10, 2 << 20}, {2 << 20, 2560 << 10}, {2560 << 10, 3 << 20}, {0, 0}}
	if !slices.Equal(windows, want) {
		t.Errorf("announced windows %v, want %v", windows, want)
	}
}

// TestRecoverSpare fails a member of every layout, adds a blank spare in
// its place and rebuilds it while writers run; then every copy, the
// spare's included, must match the model.
func TestRecoverSpare(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	for name, g := range testGeometries(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 5))
			r := newRig(t, g, rigOpts{bitmap: true, tweak: func(c *Config) { c.ResyncIOSize = 64 << 10; c.SpeedLimitMin = 1 << 30 }})
			model := make([]byte, g.Size())
			fillRandom(rng, model)
			if err := r.e.WriteAt(model, 0, 0); err != nil {
				t.Fatal(err)
			}
			victim := rng.IntN(g.Disks())
			if err := r.e.FailMember(victim, nil); err != nil {
				t.Fatal(err)
			}
			old, err := r.e.RemoveMember(victim)
			if err != nil || old == nil {
				t.Fatalf("remove: %v %v", old, err)
			}
			spare := NewMemDevice("spare", r.mem[victim].Size(), 512, false)
			r.mem[victim] = spare
			if err := r.e.AddMember(victim, spare, rigDataOff); err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				wrng := rand.New(rand.NewPCG(seed, 6))
				buf := make([]byte, 8192)
				for ctx.Err() == nil {
					off := wrng.Int64N(g.Size()/512-16) * 512
					mu.Lock()
					fillRandom(wrng, buf)
					err := r.e.WriteAt(buf, off, 0)
					copy(model[off:], buf)
					mu.Unlock()
					if err != nil {
						t.Error(err)
						return
					}
					got := make([]byte, 4096)
					mu.Lock()
					_, err = r.e.ReadAt(got, off)
					ok := bytes.Equal(got, model[off:off+4096])
					mu.Unlock()
					if err != nil || !ok {
						t.Errorf("read during recovery: %v, matches %v (replay: RAID_SEED=%d)", err, ok, seed)
						return
					}
				}
			}()
			err = r.e.Recover(context.Background(), victim)
			cancel()
			wg.Wait()
			if err != nil {
				t.Fatal(err)
			}
			if st := r.e.Members()[victim].State; st != InSync {
				t.Fatalf("spare is %s after recovery", st)
			}
			r.checkCopies(model)
			if p := r.e.Progress(); p.Op != "recovery" || p.Member != victim || p.Done != g.Size() {
				t.Errorf("progress %+v", p)
			}
		})
	}
}

// TestCatchUpReAdd: a member leaves, writes land while the array is
// degraded (their chunks stay dirty, even through the bitmap's clearing),
// the member comes back with its old contents and is caught up from
// exactly those chunks; afterwards the bits can clear.
func TestCatchUpReAdd(t *testing.T) {
	for _, name := range []string{"raid1-2", "raid10-n2-4", "raid10-f2-3"} {
		t.Run(name, func(t *testing.T) {
			g := testGeometries(t)[name]
			const cs = 64 << 10
			r := newRig(t, g, rigOpts{bitmap: true, bitmapChunk: cs})
			model := make([]byte, g.Size())
			rng := rand.New(rand.NewPCG(7, 7))
			fillRandom(rng, model)
			if err := r.e.WriteAt(model, 0, 0); err != nil {
				t.Fatal(err)
			}
			if n, err := r.in.Tick(time.Hour); err != nil || n == 0 {
				t.Fatalf("tick cleared %d bits: %v", n, err)
			}
			const away = 1
			if err := r.e.FailMember(away, nil); err != nil {
				t.Fatal(err)
			}
			dev, err := r.e.RemoveMember(away)
			if err != nil {
				t.Fatal(err)
			}
			// Writes that have a copy on the missing member are degraded;
			// their chunks must stay dirty.
			dirty := map[uint64]bool{}
			degraded := uint64(0)
			for i := 0; i < 12; i++ {
				off := rng.Int64N(g.Size()/4096) * 4096
				b := bytes.Repeat([]byte{byte(i + 1)}, 4096)
				if err := r.e.WriteAt(b, off, 0); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
				locs, _ := g.Locate(off, nil)
				if slices.ContainsFunc(locs, func(l Loc) bool { return l.Member == away }) {
					dirty[uint64(off/cs)] = true
					degraded++
				}
			}
			if got := r.e.Stats().DegradedWrites; got != degraded || degraded == 0 {
				t.Fatalf("degraded writes %d, want %d (and some)", got, degraded)
			}
			if _, err := r.in.Tick(2 * time.Hour); err != nil {
				t.Fatal(err)
			}
			for c := range dirty {
				if !r.in.Dirty(c) {
					t.Fatalf("chunk %d written while degraded was cleared from the bitmap", c)
				}
			}
			// The member comes back with what it had.
			if err := r.e.AddMember(away, dev, rigDataOff); err != nil {
				t.Fatal(err)
			}
			want := uint64(0)
			for c := range dirty {
				g.Extents(int64(c)*cs, cs, func(x Extent) bool {
					for _, l := range x.Copies {
						if l.Member == away {
							want += uint64(x.Len)
						}
					}
					return true
				})
			}
			before := r.written()
			if err := r.e.CatchUp(context.Background(), away, nil); err != nil {
				t.Fatal(err)
			}
			if got := r.written()[away] - before[away]; got != want {
				t.Errorf("catch-up wrote %d bytes to the member, want %d (its copies of the %d dirty chunks)", got, want, len(dirty))
			}
			r.checkCopies(model)
			if _, err := r.in.Tick(3 * time.Hour); err != nil {
				t.Fatal(err)
			}
			for c := range dirty {
				if r.in.Dirty(c) {
					t.Errorf("chunk %d still dirty after the catch-up and the bitmap's clearing", c)
				}
			}
		})
	}
}

// TestThrottle measures resync speed in simulated time: with the array
// idle it is held at speed_limit_max, with other I/O at speed_limit_min
// (the fake clock moves only when the resync sleeps, so the figures are
// exact). Progress reports the speed and an ETA on the way.
func TestThrottle(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	const win = 64 << 10
	for _, tc := range []struct {
		name     string
		busy     bool
		min, max int64
	}{
		{"idle", false, 100, 1000},
		{"busy", true, 100, 1000},
		{"busy-min-above-max", true, 3000, 1000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeClock{}
			r := newRig(t, g, rigOpts{tweak: func(c *Config) {
				c.Clock = clk
				c.ResyncIOSize = win
				c.SpeedLimitMin, c.SpeedLimitMax = tc.min, tc.max
			}})
			var seen []Progress
			clk.onSleep = func(time.Duration) {
				if tc.busy {
					if _, err := r.e.ReadAt(make([]byte, 512), 0); err != nil {
						t.Error(err)
					}
				}
				seen = append(seen, r.e.Progress())
			}
			if err := r.e.FullResync(context.Background()); err != nil {
				t.Fatal(err)
			}
			idle := max(tc.min, tc.max)
			limit := idle
			if tc.busy {
				limit = tc.min
			}
			// Every window but the last makes its successor wait. The
			// first is paced at the idle limit either way: nothing else
			// ran since the resync began.
			want := float64(win)/float64(idle*1024) + float64(g.Size()-2*win)/float64(limit*1024)
			if got := clk.slept.Seconds(); math.Abs(got-want) > 1e-6 {
				t.Fatalf("resync of %d bytes slept %.6fs, want %.6fs (%d KiB/s)", g.Size(), got, want, limit)
			}
			mid := seen[len(seen)/2]
			if !mid.Running || mid.Done <= 0 || mid.Done >= mid.Total {
				t.Fatalf("progress midway: %+v", mid)
			}
			if rel := mid.Speed / float64(limit*1024); rel < 0.9 || rel > 1.1 {
				t.Errorf("progress speed %.0f B/s, limit %d KiB/s", mid.Speed, limit)
			}
			left := time.Duration(float64(mid.Total-mid.Done) / float64(limit*1024) * float64(time.Second))
			if d := mid.ETA - left; d < -time.Second || d > time.Second {
				t.Errorf("ETA %v, about %v left", mid.ETA, left)
			}
		})
	}
}

// TestResyncCancel: cancelling the context stops a resync between
// windows; it reports the cancellation and a later resync works.
func TestResyncCancel(t *testing.T) {
	g := testGeometries(t)["raid10-n2-4"]
	clk := &fakeClock{}
	r := newRig(t, g, rigOpts{tweak: func(c *Config) { c.Clock = clk; c.ResyncIOSize = 64 << 10; c.SpeedLimitMax = 1000 }})
	ctx, cancel := context.WithCancel(context.Background())
	sleeps := 0
	clk.onSleep = func(time.Duration) {
		if sleeps++; sleeps == 5 {
			cancel()
		}
	}
	err := r.e.FullResync(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled resync returned %v", err)
	}
	p := r.e.Progress()
	if p.Running || !errors.Is(p.Err, context.Canceled) || p.Done == 0 || p.Done >= p.Total {
		t.Fatalf("progress after cancel: %+v", p)
	}
	clk.onSleep = nil
	if err := r.e.FullResync(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestCatchUpNothingDirty: a member re-added when nothing was written
// while it was away is in sync at once, with no copying.
func TestCatchUpNothingDirty(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{bitmap: true})
	if err := r.e.FailMember(1, nil); err != nil {
		t.Fatal(err)
	}
	dev, err := r.e.RemoveMember(1)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.e.AddMember(1, dev, rigDataOff); err != nil {
		t.Fatal(err)
	}
	before := r.written()
	if err := r.e.CatchUp(context.Background(), 1, nil); err != nil {
		t.Fatal(err)
	}
	if r.written()[1] != before[1] || r.e.Degraded() {
		t.Fatalf("catch-up with nothing dirty wrote %d bytes; degraded %v", r.written()[1]-before[1], r.e.Degraded())
	}
}
