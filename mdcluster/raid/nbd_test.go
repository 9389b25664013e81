//go:build linux

package raid

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/internal/tooltest"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// These tests serve the engine over the NBD server (a unix socket) and
// drive it with independent clients: libnbd's nbdinfo and nbdcopy
// (Debian package libnbd-bin) and fio's nbd engine (package fio). `make
// deps` installs them; without them the tests skip, except under CI (CI
// set), where a missing tool is a broken set-up and fails. After each
// client run the array is quiesced and every copy of every block is read
// straight from the member files and compared: the mirrors must agree.

// runFio runs fio with the nbd engine against uri and returns its first
// job's report, failing the test on a job error.
func runFio(t testing.TB, uri string, args ...string) fioJob {
	t.Helper()
	fio := tooltest.Need(t, "fio", "fio")
	args = append([]string{"--output-format=json", "--ioengine=nbd", "--uri=" + uri, "--verify_state_save=0"}, args...)
	out := tooltest.Run(t, 120*time.Second, fio, args...)
	if i := strings.IndexByte(out, '{'); i > 0 { // fio may print notes first
		out = out[i:]
	}
	var rep struct {
		Jobs []fioJob `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || len(rep.Jobs) == 0 {
		t.Fatalf("fio output (%v):\n%s", err, out)
	}
	if rep.Jobs[0].Error != 0 {
		t.Fatalf("fio job error %d:\n%s", rep.Jobs[0].Error, out)
	}
	return rep.Jobs[0]
}

type fioJob struct {
	Error   int     `json:"error"`
	UsrCPU  float64 `json:"usr_cpu"` // percent of the job's run time
	SysCPU  float64 `json:"sys_cpu"`
	Runtime int64   `json:"job_runtime"` // ms
	Ctx     int64   `json:"ctx"`         // context switches
	Read    struct {
		IOBytes int64   `json:"io_bytes"`
		BW      float64 `json:"bw_bytes"`
		IOPS    float64 `json:"iops"`
	} `json:"read"`
	Write struct {
		IOBytes int64   `json:"io_bytes"`
		BW      float64 `json:"bw_bytes"`
		IOPS    float64 `json:"iops"`
		Runtime int64   `json:"runtime"` // ms
	} `json:"write"`
}

// fileArray is an engine over O_DIRECT member files with an internal
// write-intent bitmap (where mdadm puts one on v1.2: 8 KiB in, data at 1
// MiB), served by an NBD server on a unix socket.
type fileArray struct {
	geo   Geometry
	e     *Engine
	in    *intent.Intent
	paths []string
	srv   *nbd.Server
	sock  string
}

// newFileArray builds the array. bitmapChunk is the bitmap's bytes per bit;
// fill, if set, is written to every member file first (so a benchmark does
// not pay for block allocation). extra exports are served alongside.
func newFileArray(t testing.TB, g Geometry, bitmapChunk int64, fill bool, extra ...nbd.Export) *fileArray {
	t.Helper()
	a := &fileArray{geo: g}
	dir := t.TempDir()
	sb := bitmap.Superblock{
		Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 2,
		UUID: [16]byte{4, 5, 6}, SyncSize: uint64(g.Size() / 512),
		ChunkSize: uint32(bitmapChunk), DaemonSleep: 5,
	}
	layout, err := bitmap.NewLayout(&sb, rigBitmapStart, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	if err := layout.CheckFits(rigBitmapStart, rigDataOff); err != nil {
		t.Fatal(err)
	}
	size := rigDataOff + g.DevSize()
	members := make([]Member, g.Disks())
	devs := make([]*DirectFile, g.Disks())
	for i := range members {
		a.paths = append(a.paths, newFile(t, dir, fmt.Sprintf("m%d", i), size))
		d := openDirect(t, a.paths[i])
		if fill {
			buf := alignedBuf(4 << 20)
			for j := range buf {
				buf[j] = byte(j * 7)
			}
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := d.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := bitmap.Format(d, sb, layout, false); err != nil {
			t.Fatal(err)
		}
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
		devs[i] = d
		members[i] = Member{Device: d, DataOffset: rigDataOff}
	}
	a.e, err = New(Config{Geometry: g, Members: members, BitmapChunkSize: bitmapChunk, RequireIntent: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	slot, err := bitmap.ReadSlot(devs[0], layout, 0)
	if err != nil {
		t.Fatal(err)
	}
	a.in, err = intent.New(intent.Config{Layout: layout, Slot: slot, Mirrors: a.e.BitmapMirrors(), Owner: intent.Static(0)})
	if err != nil {
		t.Fatal(err)
	}
	a.e.SetIntent(a.in)
	// md's bitmap daemon, faster than md's 5 s so the bits clear during
	// a short test too.
	stop := make(chan struct{})
	ticked := make(chan struct{})
	go func() {
		defer close(ticked)
		tk := time.NewTicker(100 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				a.in.Tick(a.e.Clock().Now())
			}
		}
	}()

	a.srv, err = nbd.NewServer(nbd.Config{
		Exports: append([]nbd.Export{{Name: "md0", Description: g.String(), Backend: a.e}}, extra...),
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	a.sock = filepath.Join(dir, "nbd.sock")
	l, err := nbd.ListenUnix(a.sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- a.srv.Serve(l) }()
	t.Cleanup(func() {
		if err := a.srv.Close(); err != nil {
			t.Errorf("server Close: %v", err)
		}
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
		close(stop)
		<-ticked
		a.e.Close()
	})
	return a
}

func (a *fileArray) uri() string { return "nbd+unix:///md0?socket=" + a.sock }

// quiesce waits until the server has no connection left (each flushes the
// engine as it ends) and flushes the engine once more: nothing is then in
// flight and every member holds what was acknowledged.
func (a *fileArray) quiesce(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for a.srv.Stats().ConnectionsActive != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("connections still open: %+v", a.srv.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	if err := a.e.Flush(); err != nil {
		t.Fatal(err)
	}
}

// checkMirrors reads the member files without the engine and checks that
// every copy of every array block is identical across the members (the
// engine's geometry says where the copies are), and, with want set, that
// they hold want. It returns the array contents.
func (a *fileArray) checkMirrors(t testing.TB, want []byte) []byte {
	t.Helper()
	if failed := a.e.Degraded(); failed {
		t.Fatalf("array degraded: %+v", a.e.Members())
	}
	files := make([][]byte, len(a.paths))
	for i, p := range a.paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files[i] = b[rigDataOff:]
	}
	array := make([]byte, a.geo.Size())
	bad := 0
	a.geo.Extents(0, a.geo.Size(), func(x Extent) bool {
		first := x.Copies[0]
		ref := files[first.Member][first.Off : first.Off+x.Len]
		copy(array[x.Off:], ref)
		for _, l := range x.Copies[1:] {
			got := files[l.Member][l.Off : l.Off+x.Len]
			if !bytes.Equal(got, ref) {
				t.Errorf("array bytes %d+%d: member %d at %d differs from member %d at %d (first difference at +%d)",
					x.Off, x.Len, l.Member, l.Off, first.Member, first.Off, firstDiff(got, ref))
				bad++
			}
		}
		if want != nil && !bytes.Equal(ref, want[x.Off:x.Off+x.Len]) {
			t.Errorf("array bytes %d+%d: the copies do not hold what was written (first difference at +%d)", x.Off, x.Len, firstDiff(ref, want[x.Off:x.Off+x.Len]))
			bad++
		}
		return bad < 10
	})
	if bad > 0 {
		t.FailNow()
	}
	return array
}

// nbdGeometries are the arrays the client tests run on: raid1 with two
// mirrors and raid10 near, far and offset, each 8 MiB with 64 KiB chunks.
func nbdGeometries(t testing.TB) []struct {
	name string
	geo  Geometry
} {
	t.Helper()
	must := func(g Geometry, err error) Geometry {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if g.Size() != 8<<20 {
			t.Fatalf("%v: %d bytes, want 8 MiB", g, g.Size())
		}
		return g
	}
	const mib = 2048 // sectors
	return []struct {
		name string
		geo  Geometry
	}{
		{"raid1-2", must(NewRAID1(2, 8*mib))},
		{"raid10-n2-4", must(NewRAID10(4, 0x102, 128, 4*mib))},
		{"raid10-f2-4", must(NewRAID10(4, 0x201, 128, 4*mib))},
		{"raid10-f2-2", must(NewRAID10(2, 0x201, 128, 8*mib))},
		{"raid10-o2-4", must(NewRAID10(4, 0x10201, 128, 4*mib))},
	}
}

// TestNBDClients serves each array shape over NBD and runs nbdinfo,
// nbdcopy (in and out) and fio (4 KiB random writes at depth 32, 1 MiB
// sequential writes at depth 4 and at depth 1, all verified by fio)
// against it, checking after each run that every copy of every block
// agrees across the member files.
func TestNBDClients(t *testing.T) {
	nbdinfo := tooltest.Need(t, "nbdinfo", "libnbd-bin")
	nbdcopy := tooltest.Need(t, "nbdcopy", "libnbd-bin")
	tooltest.Need(t, "fio", "fio")
	for _, tc := range nbdGeometries(t) {
		t.Run(tc.name, func(t *testing.T) {
			a := newFileArray(t, tc.geo, 64<<10, false)
			size := a.geo.Size()
			uri := a.uri()

			// nbdinfo: size and flags as the engine advertises them.
			var info struct {
				Exports []struct {
					Name        string `json:"export-name"`
					Description string `json:"description"`
					Size        int64  `json:"export-size"`
					ReadOnly    bool   `json:"is_read_only"`
					Flush       bool   `json:"can_flush"`
					FUA         bool   `json:"can_fua"`
					Trim        bool   `json:"can_trim"`
					Zero        bool   `json:"can_zero"`
					FastZero    bool   `json:"can_fast_zero"`
					MultiConn   bool   `json:"can_multi_conn"`
					Cache       bool   `json:"can_cache"`
					MinBlock    int    `json:"block_size_minimum"`
					PrefBlock   int    `json:"block_size_preferred"`
					MaxBlock    int    `json:"block_size_maximum"`
				} `json:"exports"`
			}
			out := tooltest.Run(t, 30*time.Second, nbdinfo, "--json", uri)
			if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
				t.Fatalf("nbdinfo --json (%v):\n%s", err, out)
			}
			x := info.Exports[0]
			if x.Name != "md0" || x.Size != size || x.Description != tc.geo.String() {
				t.Fatalf("nbdinfo: %+v, want md0 of %d bytes described %q\n%s", x, size, tc.geo.String(), out)
			}
			if x.ReadOnly || !x.Flush || !x.FUA || !x.Trim || !x.Zero || !x.FastZero || !x.MultiConn || x.Cache {
				t.Fatalf("nbdinfo flags: %+v\n%s", x, out)
			}
			bs := a.e.BlockSize()
			if x.MinBlock != bs || x.PrefBlock != max(bs, Alignment) || x.MaxBlock != 32<<20 {
				t.Fatalf("nbdinfo block sizes %d/%d/%d, want %d/%d/%d", x.MinBlock, x.PrefBlock, x.MaxBlock, bs, max(bs, Alignment), 32<<20)
			}

			// nbdcopy: random data in, with a zero stretch (which
			// nbdcopy sends as zeroing requests), and out again.
			dir := t.TempDir()
			src, back := filepath.Join(dir, "src"), filepath.Join(dir, "back")
			data := make([]byte, size)
			rand.Read(data)
			clear(data[1<<20 : 2<<20])
			if err := os.WriteFile(src, data, 0o600); err != nil {
				t.Fatal(err)
			}
			tooltest.Run(t, 60*time.Second, nbdcopy, "--flush", src, uri)
			tooltest.Run(t, 60*time.Second, nbdcopy, uri, back)
			got, err := os.ReadFile(back)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("nbdcopy read back %d bytes that differ from the %d written (first difference at %d)", len(got), len(data), firstDiff(got, data))
			}
			a.quiesce(t)
			a.checkMirrors(t, data)

			// fio: 4 KiB random writes, 32 in flight, verified.
			j := runFio(t, uri, "--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=4m",
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
			if j.Write.IOBytes != 4<<20 || j.Read.IOBytes != 4<<20 {
				t.Fatalf("fio randwrite wrote %d and verified %d bytes, want 4 MiB each", j.Write.IOBytes, j.Read.IOBytes)
			}
			a.quiesce(t)
			a.checkMirrors(t, nil)

			// fio: 1 MiB sequential writes over the whole array, verified.
			j = runFio(t, uri, "--name=seqwrite", "--rw=write", "--bs=1m", "--iodepth=4", fmt.Sprintf("--size=%d", size),
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
			if j.Write.IOBytes != size || j.Read.IOBytes != size {
				t.Fatalf("fio seqwrite wrote %d and verified %d bytes, want %d each", j.Write.IOBytes, j.Read.IOBytes, size)
			}
			a.quiesce(t)
			a.checkMirrors(t, nil)

			// fio: 1 MiB sequential writes one at a time, verified:
			// each is alone in flight, so the server hands it to the
			// engine piece by piece as its data arrives.
			before := a.srv.Stats()
			j = runFio(t, uri, "--name=seqwrite1", "--rw=write", "--bs=1m", "--iodepth=1", fmt.Sprintf("--size=%d", size),
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=4242") // not the data of the run before
			if j.Write.IOBytes != size || j.Read.IOBytes != size {
				t.Fatalf("fio seqwrite qd1 wrote %d and verified %d bytes, want %d each", j.Write.IOBytes, j.Read.IOBytes, size)
			}
			if after := a.srv.Stats(); after.BytesWritten-before.BytesWritten != uint64(size) || after.StreamedWrites-before.StreamedWrites != uint64(size>>20) {
				t.Fatalf("fio at depth 1: server counted %d bytes written and %d writes streamed, want %d and %d",
					after.BytesWritten-before.BytesWritten, after.StreamedWrites-before.StreamedWrites, size, size>>20)
			}
			a.quiesce(t)
			arr := a.checkMirrors(t, nil)
			// The engine reads what the members hold.
			viaEngine := make([]byte, size)
			if _, err := a.e.ReadAt(viaEngine, 0); err != nil || !bytes.Equal(viaEngine, arr) {
				t.Fatalf("engine read: %v, equal to the member files: %v", err, bytes.Equal(viaEngine, arr))
			}
			st := a.srv.Stats()
			if st.ErrorReplies != 0 || st.ProtocolErrors != 0 || st.HandshakeFailures != 0 {
				t.Fatalf("server stats: %+v", st)
			}
			t.Logf("%s: %d connections, %d writes, %d reads, %d zeroing requests, %d flushes; bitmap %+v",
				tc.name, st.ConnectionsAccepted, st.Writes, st.Reads, st.WriteZeroes, st.Flushes, a.in.Stats())
		})
	}
}

// TestBenchNBDvsEngine compares fio through the NBD server (unix socket)
// with an in-process load generator of the same shape calling the engine:
// the same block size, offsets and number of writes in flight (fio's
// iodepth; in process, that many goroutines each with one write
// outstanding). Twelve rounds (NBD_RAID_BENCH_ROUNDS) alternate the two
// over the same array and files, in short phases so that both sides of a
// round see the same load from the rest of the machine: 64 MiB of 1 MiB
// sequential writes at queue depth 1 and 4, and 16 MiB of 4 KiB random
// writes at depth 32. The ratio of the totals and the median of the
// rounds' ratios are reported (the median resists a burst of other work
// that lands on one side of one round). The array is a 2-mirror raid1 of 256 MiB over
// O_DIRECT files (filled first, so neither side pays for block
// allocation) with the bitmap on (64 MiB chunks, mdadm's default). fio
// also writes to a memory export of the same server, which shows what NBD
// itself (socket, server, fio's engine) costs. Each phase logs the CPU it
// took in this process (the server, or the load generator) and in fio. It
// only runs with NBD_RAID_BENCH=1:
//
//	NBD_RAID_BENCH=1 go test -count=1 -run TestBenchNBDvsEngine -v ./mdcluster/raid/
//
// Targets: NBD / engine ≥ 0.7 for sequential, ≥ 0.5 for random writes.
// NBD_RAID_BENCH_SEQ_DEPTH lists the sequential depths (default "1,4");
// NBD_RAID_BENCH_RAND=0 leaves out the random writes;
// NBD_RAID_BENCH_FIO_ARGS adds fio options to every job;
// NBD_RAID_BENCH_ONLY=nbd (or engine) runs one side alone, so that
// -cpuprofile, -blockprofile and -mutexprofile show just the server (or
// just the engine).
func TestBenchNBDvsEngine(t *testing.T) {
	if os.Getenv("NBD_RAID_BENCH") == "" {
		t.Skip("a benchmark: set NBD_RAID_BENCH=1 to run it")
	}
	tooltest.Need(t, "fio", "fio")
	const arr = 256 << 20
	g, err := NewRAID1(2, arr/512)
	if err != nil {
		t.Fatal(err)
	}
	a := newFileArray(t, g, 64<<20, true, nbd.Export{Name: "mem", Backend: nbd.NewMemBackend(arr)})
	memURI := "nbd+unix:///mem?socket=" + a.sock
	only := os.Getenv("NBD_RAID_BENCH_ONLY")
	extra := strings.Fields(os.Getenv("NBD_RAID_BENCH_FIO_ARGS"))

	type load struct {
		name   string
		bs     int
		depth  int
		total  int64 // bytes per phase
		random bool
		args   []string
	}
	var loads []load
	depths := os.Getenv("NBD_RAID_BENCH_SEQ_DEPTH")
	if depths == "" {
		depths = "1,4"
	}
	for _, f := range strings.Split(depths, ",") {
		var d int
		if _, err := fmt.Sscan(f, &d); err != nil || d < 1 {
			t.Fatalf("NBD_RAID_BENCH_SEQ_DEPTH %q: want depths like 1,4", depths)
		}
		loads = append(loads, load{name: fmt.Sprintf("seq 1 MiB qd%d", d), bs: 1 << 20, depth: d, total: 64 << 20})
	}
	if os.Getenv("NBD_RAID_BENCH_RAND") != "0" {
		loads = append(loads, load{name: "rand 4 KiB qd32", bs: 4096, depth: 32, total: 16 << 20, random: true})
	}
	for i := range loads {
		l := &loads[i]
		rw := "write"
		if l.random {
			rw = "randwrite"
		}
		l.args = []string{"--name=" + strings.Fields(l.name)[0], "--rw=" + rw, fmt.Sprintf("--bs=%d", l.bs),
			fmt.Sprintf("--iodepth=%d", l.depth), fmt.Sprintf("--size=%d", arr), fmt.Sprintf("--io_size=%d", l.total)}
		if l.random {
			l.args = append(l.args, "--norandommap", "--randrepeat=0")
		}
		l.args = append(l.args, extra...)
		t.Logf("fio command: fio --output-format=json --ioengine=nbd --uri=%s --verify_state_save=0 %s", a.uri(), strings.Join(l.args, " "))
	}

	// The in-process side: depth goroutines, each with one write of the
	// same size at the same kind of offsets in flight.
	engineLoad := func(l load, seed uint64) float64 {
		var next atomic.Int64
		done := make(chan error, l.depth)
		t0 := time.Now()
		for w := 0; w < l.depth; w++ {
			go func(w int) {
				rng := mrand.New(mrand.NewPCG(seed, uint64(w)))
				buf := alignedBuf(l.bs)
				rand.Read(buf)
				for {
					i := next.Add(1) - 1
					if i >= l.total/int64(l.bs) {
						done <- nil
						return
					}
					off := i * int64(l.bs) % arr
					if l.random {
						off = rng.Int64N(arr/int64(l.bs)) * int64(l.bs)
					}
					if err := a.e.WriteAt(buf, off, 0); err != nil {
						done <- err
						return
					}
				}
			}(w)
		}
		for range l.depth {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		return float64(l.total) / time.Since(t0).Seconds()
	}

	// Each phase records its rate, the CPU time it cost and the context
	// switches it took: this process's (the server, or the in-process
	// load) and fio's. Context switches count the times a thread went to
	// sleep and had to be woken (each a wait for a CPU on a loaded
	// machine), so they say what CPU time and rates cannot on a noisy one.
	type phase struct {
		rate, self, fio float64 // bytes/s; CPU s
		selfCS, fioCS   float64 // context switches
	}
	usage := func() (cpu, cs float64) {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9, float64(ru.Nvcsw + ru.Nivcsw)
	}
	measure := func(fn func() (rate, fioCPU, fioCS float64)) phase {
		c0, s0 := usage()
		rate, fc, fcs := fn()
		c1, s1 := usage()
		return phase{rate: rate, self: c1 - c0, fio: fc, selfCS: s1 - s0, fioCS: fcs}
	}
	viaFio := func(uri string, l load) phase {
		return measure(func() (float64, float64, float64) {
			j := runFio(t, uri, l.args...)
			return j.Write.BW, (j.UsrCPU + j.SysCPU) / 100 * float64(j.Runtime) / 1000, float64(j.Ctx)
		})
	}
	// Per MiB written (a phase writes total bytes; its wall time includes
	// fio's start, which its rate leaves out): CPU ms and context
	// switches, this process + fio.
	cpu := func(p phase, total int64) string {
		mib := float64(total) / (1 << 20)
		return fmt.Sprintf("%.2f+%.2f ms, %.1f+%.1f cs", p.self*1e3/mib, p.fio*1e3/mib, p.selfCS/mib, p.fioCS/mib)
	}
	rounds := 12
	if s := os.Getenv("NBD_RAID_BENCH_ROUNDS"); s != "" {
		if _, err := fmt.Sscan(s, &rounds); err != nil || rounds < 1 {
			t.Fatalf("NBD_RAID_BENCH_ROUNDS %q: want a number of rounds", s)
		}
	}
	type sums struct {
		nbd, engine float64
		ratios      []float64
	}
	total := make([]sums, len(loads))
	for round := 0; round < rounds; round++ {
		for i, l := range loads {
			var nb, en, mem phase
			fioSide := func() {
				if only != "engine" {
					nb = viaFio(a.uri(), l)
				}
			}
			engSide := func() {
				if only != "nbd" {
					en = measure(func() (float64, float64, float64) { return engineLoad(l, uint64(round)), 0, 0 })
				}
			}
			if only == "" {
				mem = viaFio(memURI, l)
			}
			// Alternate which side goes first.
			if round%2 == 0 {
				fioSide()
				engSide()
			} else {
				engSide()
				fioSide()
			}
			a.quiesce(t)
			if only != "" {
				continue
			}
			total[i].nbd += nb.rate
			total[i].engine += en.rate
			total[i].ratios = append(total[i].ratios, nb.rate/en.rate)
			unit, div := "MB/s", 1e6
			if l.random {
				unit, div = "IOPS", float64(l.bs)
			}
			t.Logf("round %d, %s: nbd %.0f %s, engine %.0f %s, ratio %.2f (nbd to memory %.0f %s); per MiB here+fio: nbd %s, engine %s, memory %s",
				round, l.name, nb.rate/div, unit, en.rate/div, unit, nb.rate/en.rate, mem.rate/div, unit, cpu(nb, l.total), cpu(en, l.total), cpu(mem, l.total))
		}
	}
	if only != "" {
		return
	}
	for i, l := range loads {
		target := 0.7
		if l.random {
			target = 0.5
		}
		r := slices.Sorted(slices.Values(total[i].ratios))
		t.Logf("total, %s: NBD / engine %.2f over the %d rounds, median round %.2f, rounds %.2f–%.2f (target ≥ %.1f)",
			l.name, total[i].nbd/total[i].engine, rounds, r[len(r)/2], r[0], r[len(r)-1], target)
	}
	st := a.e.Stats()
	t.Logf("engine: %d writes, %d bounced through an aligned buffer, %d range-lock waits; server: %d writes, %d of them streamed",
		st.Writes, st.Bounced, st.RangeWaits, a.srv.Stats().Writes, a.srv.Stats().StreamedWrites)
	a.checkMirrors(t, nil)
}
