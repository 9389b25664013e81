package intent_test

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
)

const (
	benchArray   = 64 << 30 // 64 GiB array (sparse files): 1024 chunks of 64 MiB
	benchDataOff = 1 << 20
	benchIO      = 4096
)

// benchArrayRig is a file-backed two-mirror array; the bitmap (mdadm's
// default 64 MiB chunk, internal, at 8 KiB) is kept only when withBitmap.
type benchArrayRig struct {
	mirrors []*intent.FileDevice
	in      *intent.Intent
	buf     []byte
	offs    []int64
	next    int
	start   time.Time
	direct  bool
}

// benchLayout is the benchmarks' bitmap: a benchArray-sized array with
// mdadm's default chunk size and daemon sleep.
func benchLayout(b *testing.B) (bitmap.Superblock, bitmap.Layout) {
	b.Helper()
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionLE, SyncSize: benchArray / 512,
		ChunkSize: bitmap.DefaultChunkSize, DaemonSleep: bitmap.DefaultDaemonSleep}
	l, err := bitmap.NewLayout(&sb, 8192, bitmap.SlotAlign)
	if err != nil {
		b.Fatal(err)
	}
	return sb, l
}

func newBenchArray(b *testing.B, withBitmap bool) *benchArrayRig {
	b.Helper()
	dir := b.TempDir()
	r := &benchArrayRig{start: time.Now(), direct: true}
	sb, l := benchLayout(b)
	var devs []intent.Device
	for i := 0; i < 2; i++ {
		path := filepath.Join(dir, []string{"m0", "m1"}[i])
		opt := intent.FileOptions{Direct: true, Create: true, Size: benchDataOff + benchArray}
		d, err := intent.OpenFile(path, opt)
		if err == nil {
			// Probe that this filesystem takes O_DIRECT writes.
			if _, werr := d.WriteAt(make([]byte, benchIO), benchDataOff); werr != nil {
				d.Close()
				err = werr
			}
		}
		if err != nil {
			opt.Direct, r.direct = false, false
			if d, err = intent.OpenFile(path, opt); err != nil {
				b.Fatal(err)
			}
		}
		b.Cleanup(func() { d.Close() })
		if err := bitmap.Format(d, sb, l, false); err != nil {
			b.Fatal(err)
		}
		if err := d.Sync(); err != nil {
			b.Fatal(err)
		}
		r.mirrors = append(r.mirrors, d)
		devs = append(devs, d)
	}
	if withBitmap {
		slot, err := bitmap.NewSlot(sb)
		if err != nil {
			b.Fatal(err)
		}
		r.in, err = intent.New(intent.Config{Layout: l, Slot: slot, Mirrors: devs, Owner: intent.Static(0)})
		if err != nil {
			b.Fatal(err)
		}
	}
	r.buf = make([]byte, benchIO+intent.PageSize)
	r.buf = r.buf[:benchIO] // FileDevice bounces unaligned buffers itself
	rng := rand.New(rand.NewPCG(1, 2))
	r.offs = make([]int64, 1<<16)
	for i := range r.offs {
		r.offs[i] = rng.Int64N(benchArray/benchIO) * benchIO
	}
	return r
}

// write does one mirrored 4 KiB random write.
func (r *benchArrayRig) write(b *testing.B) {
	off := r.offs[r.next%len(r.offs)]
	r.next++
	if r.in != nil {
		if err := r.in.StartWrite(off, benchIO); err != nil {
			b.Fatal(err)
		}
	}
	for _, m := range r.mirrors {
		if _, err := m.WriteAt(r.buf, benchDataOff+off); err != nil {
			b.Fatal(err)
		}
	}
	if r.in != nil {
		now := time.Since(r.start) // the harness owns the clock; the core is given it
		r.in.EndWrite(off, benchIO, now)
		if r.next%1024 == 0 {
			if _, err := r.in.Tick(now); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// warm touches every chunk once, the state of an array that has been
// taking random writes for a while (md keeps bits of chunks written within
// the last daemon_sleep seconds).
func (r *benchArrayRig) warm(b *testing.B) {
	for c := int64(0); c < benchArray/bitmap.DefaultChunkSize; c++ {
		off := c * bitmap.DefaultChunkSize
		if err := r.in.StartWrite(off, benchIO); err != nil {
			b.Fatal(err)
		}
		r.in.EndWrite(off, benchIO, time.Since(r.start))
	}
}

// BenchmarkWriteIntentOverhead measures 4 KiB random writes to a
// file-backed two-mirror array with and without write intent, in one run.
// "ratio" interleaves the two (one write each per iteration) and reports
// with/without as the metric "bitmap/raw"; "bitmap-cold" starts from a
// clean bitmap so every first write to a chunk pays a bitmap flush.
func BenchmarkWriteIntentOverhead(b *testing.B) {
	b.Run("raw", func(b *testing.B) {
		r := newBenchArray(b, false)
		b.SetBytes(benchIO)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			r.write(b)
		}
	})
	b.Run("bitmap", func(b *testing.B) {
		r := newBenchArray(b, true)
		r.warm(b)
		f0 := r.in.Stats().Flushes
		b.SetBytes(benchIO)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			r.write(b)
		}
		b.ReportMetric(float64(r.in.Stats().Flushes-f0)/float64(b.N), "flushes/op")
	})
	b.Run("bitmap-cold", func(b *testing.B) {
		r := newBenchArray(b, true)
		b.SetBytes(benchIO)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			r.write(b)
		}
		b.ReportMetric(float64(r.in.Stats().Flushes)/float64(b.N), "flushes/op")
	})
	b.Run("ratio", func(b *testing.B) {
		raw := newBenchArray(b, false)
		bm := newBenchArray(b, true)
		bm.warm(b)
		var tRaw, tBm time.Duration
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			t0 := time.Now()
			raw.write(b)
			t1 := time.Now()
			bm.write(b)
			t2 := time.Now()
			tRaw += t1.Sub(t0)
			tBm += t2.Sub(t1)
		}
		if tRaw > 0 {
			b.ReportMetric(float64(tBm)/float64(tRaw), "bitmap/raw")
		}
		if !raw.direct {
			b.Log("O_DIRECT not supported here; using buffered writes")
		}
	})
}

// newFlushRig is three file-backed mirrors (O_DIRECT where the file
// system takes it) and an Intent over them with the given Parallel.
func newFlushRig(b *testing.B, parallel func(int, func(int))) *intent.Intent {
	b.Helper()
	dir := b.TempDir()
	sb, l := benchLayout(b)
	var devs []intent.Device
	for i := 0; i < 3; i++ {
		path := filepath.Join(dir, fmt.Sprintf("m%d", i))
		opt := intent.FileOptions{Direct: true, Create: true, Size: benchDataOff}
		d, err := intent.OpenFile(path, opt)
		if err == nil {
			if err = bitmap.Format(d, sb, l, false); err != nil {
				d.Close()
			}
		}
		if err != nil {
			opt.Direct = false
			if d, err = intent.OpenFile(path, opt); err != nil {
				b.Fatal(err)
			}
			if err := bitmap.Format(d, sb, l, false); err != nil {
				b.Fatal(err)
			}
		}
		b.Cleanup(func() { d.Close() })
		if err := d.Sync(); err != nil {
			b.Fatal(err)
		}
		devs = append(devs, d)
	}
	slot, err := bitmap.NewSlot(sb)
	if err != nil {
		b.Fatal(err)
	}
	in, err := intent.New(intent.Config{Layout: l, Slot: slot, Mirrors: devs, Owner: intent.Static(0), Parallel: parallel})
	if err != nil {
		b.Fatal(err)
	}
	return in
}

// BenchmarkParallelMirrorFlush measures a bit set and cleared on three
// file-backed mirrors (StartWrite's flush: a page write and fdatasync per
// mirror; Tick's preflush and flush), with the mirrors one after the other
// (the default) and in parallel (intent.ParallelGo, the daemon's), the
// two interleaved in one loop; "parallel/serial" is the ratio of their
// times.
func BenchmarkParallelMirrorFlush(b *testing.B) {
	serial, par := newFlushRig(b, nil), newFlushRig(b, intent.ParallelGo)
	cycle := func(in *intent.Intent, i int) {
		now := time.Duration(i) * time.Hour
		if err := in.StartWrite(0, benchIO); err != nil {
			b.Fatal(err)
		}
		in.EndWrite(0, benchIO, now)
		if n, err := in.Tick(now + time.Minute); err != nil || n != 1 {
			b.Fatalf("tick cleared %d (err %v), want 1", n, err)
		}
	}
	var tSerial, tPar time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		cycle(serial, i)
		t1 := time.Now()
		cycle(par, i)
		tSerial += t1.Sub(t0)
		tPar += time.Since(t1)
	}
	if tSerial > 0 {
		b.ReportMetric(float64(tPar)/float64(tSerial), "parallel/serial")
		b.ReportMetric(float64(tSerial.Microseconds())/float64(b.N), "serial-us/op")
		b.ReportMetric(float64(tPar.Microseconds())/float64(b.N), "parallel-us/op")
	}
}
