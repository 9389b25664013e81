//go:build linux && (amd64 || arm64)

package raid

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestAIOWriteAll submits batches of writes to three O_DIRECT files from
// several goroutines at once (each request has its own context, so one
// request must never see another's completions) and checks every write's
// own result and the bytes on disk after each batch: a write reported
// done before it was, or a result given to the wrong write, shows up as a
// wrong result or old data. Each batch also carries a write to a
// read-only descriptor (refused at submission: EBADF) and one at an
// unaligned offset (EINVAL), whose errors must come back on those writes
// alone.
//
// It runs twice: through the pool, whose contexts wait for their
// completions on an eventfd in the runtime's poller, and on contexts that
// reap by blocking in io_getevents (the fallback where the eventfd cannot
// be polled).
func TestAIOWriteAll(t *testing.T) {
	t.Run("pool", func(t *testing.T) {
		c := getAIOCtx()
		if c == nil {
			t.Skip("native AIO not available")
		}
		polled := c.done != nil
		putAIOCtx(c)
		if !polled {
			t.Fatal("the pool's context has no pollable eventfd: its writes would block a thread each")
		}
		testAIOWriteAll(t, func(ws []aioWrite) bool { return aioWriteAll(ws, nil) })
	})
	t.Run("blocking", func(t *testing.T) {
		testAIOWriteAll(t, func(ws []aioWrite) bool {
			c, e := newAIOCtx(false)
			if e != 0 {
				return false
			}
			defer unix.Syscall(unix.SYS_IO_DESTROY, c.id, 0, 0)
			c.writeAll(ws, nil)
			return true
		})
	})
}

func testAIOWriteAll(t *testing.T, writeAll func([]aioWrite) bool) {
	dir := t.TempDir()
	const files, per, size = 3, 4, 8 << 20
	var fds []int
	for i := range files {
		fds = append(fds, openDirect(t, newFile(t, dir, fmt.Sprintf("f%d", i), size)).fd)
	}
	ro, err := unix.Open(dir+"/f0", unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ro)

	const workers, rounds, bs = 4, 40, 16 << 10
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := alignedBuf(bs)
			for r := range rounds {
				var ws []aioWrite
				for f := range files {
					for k := range per {
						p := alignedBuf(bs)
						for i := range p {
							p[i] = byte(w*31 + r*7 + f*3 + k + i)
						}
						// Worker w owns its own blocks of every file.
						off := int64((k*workers+w)*bs) + int64(r%8)*int64(per*workers*bs)
						ws = append(ws, aioWrite{fd: fds[f], p: p, off: off})
					}
				}
				ws = append(ws, aioWrite{fd: ro, p: alignedBuf(bs), off: 0},
					aioWrite{fd: fds[1], p: alignedBuf(bs), off: 1})
				if !writeAll(ws) {
					errc <- errors.New("native AIO not available")
					return
				}
				for i, x := range ws {
					switch i {
					case len(ws) - 2:
						if x.res != -int64(unix.EBADF) {
							errc <- fmt.Errorf("write to a read-only descriptor: result %d, want -EBADF", x.res)
							return
						}
						continue
					case len(ws) - 1:
						if x.res != -int64(unix.EINVAL) {
							errc <- fmt.Errorf("unaligned O_DIRECT write: result %d, want -EINVAL", x.res)
							return
						}
						continue
					}
					if x.res != int64(len(x.p)) {
						errc <- fmt.Errorf("worker %d round %d write %d: result %d, want %d", w, r, i, x.res, len(x.p))
						return
					}
					if _, err := unix.Pread(x.fd, got, x.off); err != nil {
						errc <- err
						return
					}
					if !bytes.Equal(got, x.p) {
						errc <- fmt.Errorf("worker %d round %d write %d: the file does not hold the data when the batch returned", w, r, i)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if strings.Contains(err.Error(), "not available") {
			t.Skip(err)
		}
		t.Fatal(err)
	}
}

// newDirectRAID1 builds a raid1 engine without a bitmap over O_DIRECT
// members: files in the test's directory, or the given paths.
func newDirectRAID1(t *testing.T, size int64, paths ...string) (*Engine, []*DirectFile) {
	t.Helper()
	g, err := NewRAID1(len(paths), uint64(size/512))
	if err != nil {
		t.Fatal(err)
	}
	var devs []*DirectFile
	var ms []Member
	for _, p := range paths {
		d := openDirect(t, p)
		devs = append(devs, d)
		ms = append(ms, Member{Device: d})
	}
	e, err := New(Config{Geometry: g, Members: ms, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e, devs
}

// aioFailCase writes through a raid1 of two O_DIRECT files whose second
// member's descriptor has been replaced (dup2) by a read-only one, so the
// kernel refuses that mirror's write. It returns the second member's state
// and the write's error, after checking the first member got the data.
func aioFailCase(t *testing.T, mut mutation) (MemberState, error) {
	dir := t.TempDir()
	const size = 4 << 20
	e, devs := newDirectRAID1(t, size, newFile(t, dir, "a", size), newFile(t, dir, "b", size))
	e.mut = mut
	p := alignedBuf(64 << 10)
	for i := range p {
		p[i] = byte(i*5 + 1)
	}
	if err := e.WriteAt(p, 0, 0); err != nil {
		t.Fatal(err)
	}
	if s := e.Stats(); s.AIOWrites != 2 {
		t.Fatalf("a write to two O_DIRECT mirrors made %d AIO member writes, want 2", s.AIOWrites)
	}
	ro, err := unix.Open(devs[1].Path(), unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup2(ro, devs[1].fd); err != nil {
		t.Fatal(err)
	}
	unix.Close(ro)
	werr := e.WriteAt(p, 1<<20, 0)
	got := alignedBuf(len(p))
	if _, err := devs[0].ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("the healthy mirror does not hold the write (read error %v)", err)
	}
	return e.Members()[1].State, werr
}

// TestAIOMirrorErrorFailsMember: one mirror's AIO write fails, so that
// member is failed and the write succeeds degraded (as with blocking
// writes); with the error dropped (mutAIOLoseError) the member would
// stay in sync holding stale data, which this test must notice.
func TestAIOMirrorErrorFailsMember(t *testing.T) {
	st, err := aioFailCase(t, 0)
	if err != nil {
		t.Fatalf("write with one mirror failing: %v, want success (degraded)", err)
	}
	if st != Failed {
		t.Fatalf("member whose write failed is %v, want failed", st)
	}
	if st, _ := aioFailCase(t, mutAIOLoseError); st == Failed {
		t.Fatal("with the AIO error dropped the member was still failed: the test cannot tell")
	}
}

// TestAIOCompletionErrorFailsMember makes the kernel fail a mirror's
// write at completion (not at submission): the second member is a loop
// device shrunk under the engine, so writes past its new end complete
// with ENOSPC (or short, then ENOSPC). Needs root and losetup.
func TestAIOCompletionErrorFailsMember(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("needs losetup")
	}
	dir := t.TempDir()
	const size = 8 << 20
	back := newFile(t, dir, "back", size)
	out, err := exec.Command("losetup", "--find", "--show", back).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	e, _ := newDirectRAID1(t, size, newFile(t, dir, "a", size), loop)
	p := alignedBuf(1 << 20)
	for i := range p {
		p[i] = byte(i*3 + 7)
	}
	if err := e.WriteAt(p, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(back, size/2); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("losetup", "-c", loop).CombinedOutput(); err != nil {
		t.Skipf("losetup -c: %v: %s", err, out)
	}
	// Straddles the new end: a short write, finished by pwrite, which
	// fails.
	if err := e.WriteAt(p, size/2-512<<10, 0); err != nil {
		t.Fatalf("write with one mirror failing: %v, want success (degraded)", err)
	}
	m := e.Members()
	if m[1].State != Failed || m[1].Errors == 0 {
		t.Fatalf("loop member after a failed write: %v with %d errors, want failed", m[1].State, m[1].Errors)
	}
	if s := e.Stats(); s.DegradedWrites != 1 || s.MemberFailures != 1 || s.AIOFallbacks != 1 {
		t.Fatalf("stats %+v: want 1 degraded write, 1 member failure and 1 short AIO write finished by pwrite", s)
	}
}

// TestAIOConcurrentWrites runs many writers through a raid1 of two
// O_DIRECT files, each owning its own blocks, and then compares both
// files with the model: a completion given to the wrong request, or
// returned before its data was written, would leave a mirror behind (and
// a lost completion would hang, which the deadline reports).
func TestAIOConcurrentWrites(t *testing.T) {
	seed := seedFromEnv(t, "RAID_AIO_SEED")
	dir := t.TempDir()
	const size, bs, workers, writes = 8 << 20, 4096, 16, 150
	e, devs := newDirectRAID1(t, size, newFile(t, dir, "a", size), newFile(t, dir, "b", size))
	model := make([]byte, size)
	var mu sync.Mutex
	done := make(chan error, workers)
	for w := range workers {
		go func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			for range writes {
				// Worker w owns the blocks whose index is w modulo workers;
				// a write covers 1 to 8 of its blocks' spans.
				n := 1 + rng.IntN(8)
				blk := (rng.IntN(size/bs/workers-8))*workers + w
				p := alignedBuf(bs)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				for k := range n {
					off := int64(blk+k*workers) * bs
					if err := e.WriteAt(p, off, 0); err != nil {
						done <- fmt.Errorf("write at %d: %w", off, err)
						return
					}
					mu.Lock()
					copy(model[off:], p)
					mu.Unlock()
				}
			}
			done <- nil
		}()
	}
	deadline := time.After(2 * time.Minute)
	for range workers {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%v (replay: RAID_AIO_SEED=%d)", err, seed)
			}
		case <-deadline:
			t.Fatalf("writers still blocked after 2 minutes: a completion was lost (replay: RAID_AIO_SEED=%d)", seed)
		}
	}
	s := e.Stats()
	if s.AIOWrites != 2*s.Writes || s.AIOFallbacks != 0 {
		t.Fatalf("%d writes made %d AIO member writes (%d fallbacks), want %d and 0", s.Writes, s.AIOWrites, s.AIOFallbacks, 2*s.Writes)
	}
	got := alignedBuf(size)
	for i, d := range devs {
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("member %d differs from the model at %d (replay: RAID_AIO_SEED=%d)", i, firstDiff(got, model), seed)
		}
	}
}

// TestAIORefusedFallsBack: a mirror whose descriptor AIO refuses with
// EINVAL (an eventfd swapped in with dup2: it has no write_iter) has that
// write redone with pwrite, which fails (ESPIPE) and so fails the member;
// the device uses pwrite from then on, and the other mirror keeps using
// AIO.
func TestAIORefusedFallsBack(t *testing.T) {
	dir := t.TempDir()
	const size = 4 << 20
	e, devs := newDirectRAID1(t, size, newFile(t, dir, "a", size), newFile(t, dir, "b", size))
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Skipf("eventfd: %v", err)
	}
	if err := unix.Dup2(efd, devs[1].fd); err != nil {
		t.Fatal(err)
	}
	unix.Close(efd)
	p := alignedBuf(64 << 10)
	if err := e.WriteAt(p, 0, 0); err != nil {
		t.Fatalf("write with one mirror refusing AIO and failing pwrite: %v, want success (degraded)", err)
	}
	s := e.Stats()
	if s.AIOFallbacks != 1 || s.AIOWrites != 1 {
		t.Fatalf("%d AIO writes, %d fallbacks; want 1 and 1", s.AIOWrites, s.AIOFallbacks)
	}
	if _, ok := devs[1].aioFD(); ok {
		t.Fatal("the device AIO refused still offers AIO")
	}
	m := e.Members()
	if m[1].State != Failed || m[1].Errors == 0 {
		t.Fatalf("member whose fallback write failed: %v with %d errors, want failed", m[1].State, m[1].Errors)
	}
	if _, ok := devs[0].aioFD(); !ok {
		t.Fatal("the healthy mirror lost AIO")
	}
}

// TestAIOWaitHoldsNoThread: requests waiting for their member writes must
// not hold an OS thread each, blocked in io_getevents. A child process
// starts 64 writers, each with a context of its own and a 64 KiB O_DIRECT
// write in flight most of the time, while a sampler reads every thread's
// current system call (/proc/self/task/*/syscall) and reports the most
// threads it saw in io_getevents at once. With the poller waits only the
// final, non-blocking reap is ever there; the same child with contexts
// that block in io_getevents is run as the control and must show more, or
// the test would prove nothing.
func TestAIOWaitHoldsNoThread(t *testing.T) {
	const childEnv = "RAID_AIO_THREADS_CHILD"
	if mode := os.Getenv(childEnv); mode != "" {
		aioThreadsChild(t, mode == "poll")
		return
	}
	if testing.Short() {
		t.Skip("starts child processes")
	}
	inGetevents := func(mode string) int {
		cmd := exec.Command(os.Args[0], "-test.run=^TestAIOWaitHoldsNoThread$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), childEnv+"="+mode, "TMPDIR="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child (%s): %v\n%s", mode, err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			var n int
			if _, err := fmt.Sscanf(strings.TrimSpace(l), "in io_getevents: %d", &n); err == nil {
				return n
			}
			if strings.Contains(l, "SKIP") {
				t.Skipf("child (%s): %s", mode, out)
			}
		}
		t.Fatalf("child (%s) reported no count:\n%s", mode, out)
		return 0
	}
	polled, blocking := inGetevents("poll"), inGetevents("block")
	t.Logf("most threads seen in io_getevents at once, 64 writers: %d waiting in the poller, %d with blocking reaps", polled, blocking)
	if polled > 2 {
		t.Errorf("%d threads at once in io_getevents with the poller waits, want at most 2 (the non-blocking reaps): waiting writers hold threads", polled)
	}
	if blocking <= 2 {
		t.Errorf("the blocking control had at most %d threads in io_getevents at once: the test cannot tell the two apart", blocking)
	}
}

// aioThreadsChild is TestAIOWaitHoldsNoThread's child: 64 writers each
// make 200 writes of 64 KiB while a sampler counts the threads in
// io_getevents; it prints "in io_getevents: N", the most at once.
func aioThreadsChild(t *testing.T, poll bool) {
	dir := t.TempDir()
	const writers, writes, bs = 64, 200, 64 << 10
	path := filepath.Join(dir, "f")
	// Written in full first: no write allocates blocks.
	if err := os.WriteFile(path, make([]byte, writers*bs), 0o600); err != nil {
		t.Fatal(err)
	}
	fd := openDirect(t, path).fd
	stop := make(chan struct{})
	most := make(chan int)
	go func() {
		m := 0
		for {
			select {
			case <-stop:
				most <- m
				return
			default:
			}
			m = max(m, threadsInSyscall(unix.SYS_IO_GETEVENTS))
			time.Sleep(200 * time.Microsecond)
		}
	}()
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, e := newAIOCtx(poll)
			if e != 0 {
				errc <- fmt.Errorf("io_setup: %v", e)
				return
			}
			defer unix.Syscall(unix.SYS_IO_DESTROY, c.id, 0, 0)
			if poll && c.done == nil {
				errc <- errors.New("no pollable eventfd")
				return
			}
			p := alignedBuf(bs)
			for range writes {
				ws := []aioWrite{{fd: fd, p: p, off: int64(w * bs)}}
				c.writeAll(ws, nil)
				if ws[0].res != bs {
					errc <- fmt.Errorf("write: result %d", ws[0].res)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	m := <-most
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	fmt.Printf("in io_getevents: %d\n", m)
}

// threadsInSyscall counts this process's threads whose current system
// call is nr.
func threadsInSyscall(nr int) int {
	tasks, _ := os.ReadDir("/proc/self/task")
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if err != nil {
			continue
		}
		var got int
		if _, err := fmt.Sscan(string(b), &got); err == nil && got == nr {
			n++
		}
	}
	return n
}

// observedFile is a DirectFile the engine still submits AIO to (it embeds
// one) that records what AIOObserver is told, and what the file holds
// under each write when AIOSubmit is called.
type observedFile struct {
	*DirectFile
	name string
	mu   *sync.Mutex
	log  *[]string
}

func (o *observedFile) AIOSubmit(p []byte, off int64) {
	old := alignedBuf(len(p))
	if _, err := o.DirectFile.ReadAt(old, off); err != nil {
		panic(err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	*o.log = append(*o.log, fmt.Sprintf("submit %s %d+%d unchanged=%t", o.name, off, len(p), !bytes.Equal(old, p)))
}

func (o *observedFile) AIOInFlight(p []byte, off int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	*o.log = append(*o.log, fmt.Sprintf("inflight %s %d+%d", o.name, off, len(p)))
}

// TestAIOObserver: a device embedding a DirectFile still gets the
// engine's AIO writes, and AIOObserver hears of every one: AIOSubmit for
// each member's write before the batch starts (the file still holds the
// old data), then AIOInFlight for each.
func TestAIOObserver(t *testing.T) {
	if !aioAvailable {
		t.Skip("no native AIO in this build")
	}
	dir := t.TempDir()
	const size = 4 << 20
	g, err := NewRAID1(2, (size-8192)/512)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var log []string
	var ms []Member
	for _, n := range []string{"a", "b"} {
		ms = append(ms, Member{Device: &observedFile{DirectFile: openDirect(t, newFile(t, dir, n, size)), name: n, mu: &mu, log: &log},
			DataOffset: 8192})
	}
	e, err := New(Config{Geometry: g, Members: ms, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	p := alignedBuf(16 << 10)
	for i := range p {
		p[i] = byte(i*7 + 3)
	}
	if err := e.WriteAt(p, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if s := e.Stats(); s.AIOWrites == 0 {
		t.Skipf("the write made no AIO member writes (AIO unavailable here: %d fallbacks)", s.AIOFallbacks)
	}
	want := []string{
		"submit a 1056768+16384 unchanged=true", "submit b 1056768+16384 unchanged=true",
		"inflight a 1056768+16384", "inflight b 1056768+16384",
	}
	if !slices.Equal(log, want) {
		t.Fatalf("observer heard\n%s\nwant\n%s", strings.Join(log, "\n"), strings.Join(want, "\n"))
	}
}
