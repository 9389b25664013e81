//go:build linux

package raid

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
)

// The benchmarks compare the engine with writing the same bytes straight
// to the member files, in one run, alternating the two in rounds so that
// both see the same machine noise; they report each side's rate and the
// ratio (engine / direct). The member files live in the test's temporary
// directory on the work disk (ext4 here): O_DIRECT needs a real file
// system (tmpfs before Linux 6.6 refuses it, and memory would not measure
// a disk anyway). The files are filled once before timing, so neither
// side pays for block allocation.

const benchArray = 256 << 20 // bytes per member's data area

// benchArrayRig is a 2-mirror raid1 over two O_DIRECT files with a real
// write-intent bitmap (64 MiB chunks, mdadm's default) whose daemon runs
// every second, as md's does.
type benchArrayRig struct {
	e     *Engine
	devs  []*DirectFile
	in    *intent.Intent
	close func()
}

func newBenchRig(b *testing.B, withBitmap bool, tweak func(*Config)) *benchArrayRig {
	b.Helper()
	dir := b.TempDir()
	g, err := NewRAID1(2, benchArray/512)
	if err != nil {
		b.Fatal(err)
	}
	r := &benchArrayRig{}
	members := make([]Member, 2)
	const chunk = 64 << 20
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 4, SyncSize: uint64(g.Size() / 512), ChunkSize: chunk, DaemonSleep: 5}
	layout, err := bitmap.NewLayout(&sb, rigBitmapStart, bitmap.SlotAlign)
	if err != nil {
		b.Fatal(err)
	}
	fillBuf := alignedBuf(4 << 20)
	for i := range fillBuf {
		fillBuf[i] = byte(i * 7)
	}
	for i := range members {
		d := openDirect(b, newFile(b, dir, fmt.Sprintf("m%d", i), rigDataOff+g.DevSize()))
		for off := int64(0); off < d.Size(); off += int64(len(fillBuf)) {
			if _, err := d.WriteAt(fillBuf[:min(int64(len(fillBuf)), d.Size()-off)], off); err != nil {
				b.Fatal(err)
			}
		}
		if withBitmap {
			if err := bitmap.Format(d, sb, layout, false); err != nil {
				b.Fatal(err)
			}
		}
		if err := d.Sync(); err != nil {
			b.Fatal(err)
		}
		r.devs = append(r.devs, d)
		members[i] = Member{Device: d, DataOffset: rigDataOff}
	}
	cfg := Config{Geometry: g, Members: members, BitmapChunkSize: chunk, Logger: testLogger(b)}
	if tweak != nil {
		tweak(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	r.e = e
	stop := make(chan struct{})
	var wg sync.WaitGroup
	if withBitmap {
		slot, err := bitmap.ReadSlot(r.devs[0], layout, 0)
		if err != nil {
			b.Fatal(err)
		}
		r.in, err = intent.New(intent.Config{Layout: layout, Slot: slot, Mirrors: e.BitmapMirrors(), Owner: intent.Static(0)})
		if err != nil {
			b.Fatal(err)
		}
		e.SetIntent(r.in)
		clk := cfg.Clock
		if clk == nil {
			clk = e.clock
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					r.in.Tick(clk.Now())
				}
			}
		}()
	}
	r.close = func() {
		close(stop)
		wg.Wait()
		e.Close()
	}
	b.Cleanup(r.close)
	return r
}

// directWrite writes p to both members at data-area offset off, in
// parallel, as the baseline: what mirroring costs with no engine at all.
func (r *benchArrayRig) directWrite(p []byte, off int64) error {
	errc := make(chan error, 1)
	go func() {
		_, err := r.devs[1].WriteAt(p, rigDataOff+off)
		errc <- err
	}()
	_, err0 := r.devs[0].WriteAt(p, rigDataOff+off)
	if err1 := <-errc; err1 != nil {
		return err1
	}
	return err0
}

// report sets the custom metrics of an engine-versus-direct comparison.
func report(b *testing.B, bytes int64, engine, direct time.Duration) {
	em := float64(bytes) / engine.Seconds() / 1e6
	dm := float64(bytes) / direct.Seconds() / 1e6
	b.ReportMetric(em, "engine-MB/s")
	b.ReportMetric(dm, "direct-MB/s")
	b.ReportMetric(em/dm, "ratio")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkRAID1SeqWrite: 1 MiB sequential writes to a 2-mirror raid1 with
// the bitmap on, against writing the same bytes to both member files with
// O_DIRECT in parallel. Target: ratio ≥ 0.85.
func BenchmarkRAID1SeqWrite(b *testing.B) {
	r := newBenchRig(b, true, nil)
	const io = 1 << 20
	buf := alignedBuf(io)
	for i := range buf {
		buf[i] = byte(i)
	}
	engineWrite := func(p []byte, off int64) error { return r.e.WriteAt(p, off, 0) }
	var engine, direct time.Duration
	var off int64
	const round = 32
	b.ResetTimer()
	for done, k := 0, 0; done < b.N; k++ {
		n := min(round, b.N-done)
		start := off
		pass := func(write func(p []byte, off int64) error) time.Duration {
			off = start
			t0 := time.Now()
			for i := 0; i < n; i++ {
				if err := write(buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + io) % benchArray
			}
			return time.Since(t0)
		}
		// Alternate which side goes first, so neither always follows
		// the other's writes.
		if k%2 == 0 {
			engine += pass(engineWrite)
			direct += pass(r.directWrite)
		} else {
			direct += pass(r.directWrite)
			engine += pass(engineWrite)
		}
		done += n
	}
	b.StopTimer()
	report(b, int64(b.N)*io, engine, direct)
	s := r.in.Stats()
	b.ReportMetric(float64(s.Flushes), "bitmap-flushes")
}

// BenchmarkRAID1RandWrite4K: 4 KiB random writes, 32 in flight, to a
// 2-mirror raid1 with the bitmap on, against the same writes made straight
// to both member files (each write to both in parallel, 32 in flight).
// Target: ratio ≥ 0.7.
func BenchmarkRAID1RandWrite4K(b *testing.B) {
	r := newBenchRig(b, true, nil)
	const io, depth = 4096, 32
	run := func(ops int, seed uint64, write func(p []byte, off int64) error) time.Duration {
		var next atomic.Int64
		var wg sync.WaitGroup
		t0 := time.Now()
		for w := 0; w < depth; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				buf := alignedBuf(io)
				for next.Add(1) <= int64(ops) {
					off := rng.Int64N(benchArray/io) * io
					if err := write(buf, off); err != nil {
						b.Error(err)
						return
					}
				}
			}(w)
		}
		wg.Wait()
		return time.Since(t0)
	}
	engineWrite := func(p []byte, off int64) error { return r.e.WriteAt(p, off, 0) }
	var engine, direct time.Duration
	const round = 2048
	b.ResetTimer()
	for done, k := 0, uint64(0); done < b.N; k++ {
		n := min(round, b.N-done)
		if k%2 == 0 {
			engine += run(n, k, engineWrite)
			direct += run(n, k, r.directWrite)
		} else {
			direct += run(n, k, r.directWrite)
			engine += run(n, k, engineWrite)
		}
		done += n
	}
	b.StopTimer()
	report(b, int64(b.N)*io, engine, direct)
	b.ReportMetric(float64(b.N)/engine.Seconds(), "engine-IOPS")
	b.ReportMetric(float64(b.N)/direct.Seconds(), "direct-IOPS")
}

// BenchmarkResync: a full resync of the 2-mirror raid1 (256 MiB, speed
// limits lifted) against a raw copy of the same bytes from one member file
// to the other: 1 MiB O_DIRECT reads and writes, then fdatasync. Target:
// ratio ≥ 0.8.
func BenchmarkResync(b *testing.B) {
	r := newBenchRig(b, false, func(c *Config) { c.SpeedLimitMin, c.SpeedLimitMax = 1<<40, 1<<40 })
	buf := alignedBuf(1 << 20)
	rawCopy := func() error {
		for off := int64(0); off < benchArray; off += 1 << 20 {
			if _, err := r.devs[0].ReadAt(buf, rigDataOff+off); err != nil {
				return err
			}
			if _, err := r.devs[1].WriteAt(buf, rigDataOff+off); err != nil {
				return err
			}
		}
		return r.devs[1].Sync()
	}
	var engine, direct time.Duration
	b.ResetTimer()
	resync := func() error { return r.e.FullResync(context.Background()) }
	timed := func(f func() error) time.Duration {
		t0 := time.Now()
		if err := f(); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			engine += timed(resync)
			direct += timed(rawCopy)
		} else {
			direct += timed(rawCopy)
			engine += timed(resync)
		}
	}
	b.StopTimer()
	report(b, int64(b.N)*benchArray, engine, direct)
}

// BenchmarkRAID1WriteSplit: what splitting a 1 MiB write into pieces
// written at once costs the engine, the price the NBD server pays to
// overlap a large write's transfer with its device writes (streamed
// pieces, docs/export.md). Each operation writes 1 MiB to a 2-mirror
// raid1 with the bitmap on, whole or as k concurrent pieces; the ways
// take turns in rounds of 16 operations (this host's disk changes speed
// from one second to the next), and each k's time per MiB is reported
// against the whole write's ("split-k-vs-whole": above 1, splitting
// costs).
func BenchmarkRAID1WriteSplit(b *testing.B) {
	r := newBenchRig(b, true, nil)
	const io = 1 << 20
	buf := alignedBuf(io)
	for i := range buf {
		buf[i] = byte(i)
	}
	ks := []int{1, 2, 4, 16}
	spent := make([]time.Duration, len(ks))
	var off int64
	write := func(k int) {
		piece := io / k
		var wg sync.WaitGroup
		errs := make([]error, k)
		for j := range k {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[j] = r.e.WriteAt(buf[j*piece:(j+1)*piece], off+int64(j*piece), 0)
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		off = (off + io) % benchArray
	}
	const round = 16
	b.ResetTimer()
	for done, n := 0, 0; done < b.N; n++ {
		cnt := min(round, b.N-done)
		for x := range ks {
			i := (x + n) % len(ks) // rotate who goes first
			t0 := time.Now()
			for range cnt {
				write(ks[i])
			}
			spent[i] += time.Since(t0)
		}
		done += cnt
	}
	b.StopTimer()
	for i, k := range ks {
		ms := spent[i].Seconds() * 1e3 / float64(b.N)
		b.ReportMetric(ms, fmt.Sprintf("ms/MiB-split-%d", k))
		if k > 1 {
			b.ReportMetric(float64(spent[i])/float64(spent[0]), fmt.Sprintf("split-%d-vs-whole", k))
		}
	}
	b.ReportMetric(0, "ns/op")
}
