package nbd

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func tempFile(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func openTemp(t *testing.T, size int64) (*FileBackend, string) {
	t.Helper()
	p := tempFile(t, size)
	b, err := OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, p
}

// allocatedBytes is how much of the file has blocks behind it.
func allocatedBytes(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestFileBackendReadWrite(t *testing.T) {
	const size = 1 << 20
	b, p := openTemp(t, size)
	if b.Size() != size {
		t.Fatalf("size %d", b.Size())
	}
	data := pattern(8192, 5)
	if err := b.WriteAt(data, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(data[:512], size-512, FUA); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if n, err := b.ReadAt(got, 4096); err != nil || n != 8192 || !bytes.Equal(got, data) {
		t.Fatalf("read back: %d %v", n, err)
	}
	// A read ending exactly at the end is complete, not an error.
	if n, err := b.ReadAt(got[:512], size-512); err != nil || n != 512 || !bytes.Equal(got[:512], data[:512]) {
		t.Fatalf("read at the end: %d %v", n, err)
	}
	onDisk, _ := os.ReadFile(p)
	if !bytes.Equal(onDisk[4096:4096+8192], data) {
		t.Fatalf("file content differs")
	}
	if err := b.WriteAt(data, size-100, 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the end: %v, want ENOSPC", err)
	}
	if st, _ := os.Stat(p); st.Size() != size {
		t.Fatalf("file grew to %d", st.Size())
	}
	c := b.Capabilities()
	if !c.Flush || !c.Trim || !c.WriteZeroes || !c.FastZero || !c.MultiConn || c.ReadOnly {
		t.Fatalf("capabilities %+v", c)
	}
}

func TestFileBackendTrimAndZeroes(t *testing.T) {
	const size = 4 << 20
	for _, fallback := range []bool{false, true} {
		b, p := openTemp(t, size)
		if fallback {
			// As on a file system without hole punching or zero ranges.
			b.noPunch.Store(true)
			b.noZeroRange.Store(true)
		}
		fill := bytes.Repeat([]byte{0xaa}, size)
		if err := b.WriteAt(fill, 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := b.Flush(); err != nil {
			t.Fatal(err)
		}
		full := allocatedBytes(t, p)

		if err := b.Trim(0, 1<<20, FUA); err != nil {
			t.Fatalf("fallback=%v: trim: %v", fallback, err)
		}
		if err := b.WriteZeroes(1<<20, 1<<20, 0); err != nil {
			t.Fatalf("fallback=%v: zeroes: %v", fallback, err)
		}
		if err := b.WriteZeroes(2<<20, 1<<20, NoHole); err != nil {
			t.Fatalf("fallback=%v: zeroes, no hole: %v", fallback, err)
		}
		err := b.WriteZeroes(3<<20, 4096, FastZero)
		if fallback {
			if !errors.Is(err, ErrNotFast) {
				t.Fatalf("fast zero without fallocate: %v, want ErrNotFast", err)
			}
		} else if err != nil {
			t.Fatalf("fast zero: %v", err)
		}
		got := make([]byte, size)
		if _, err := b.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		copy(want[3<<20:], fill[3<<20:])
		if !fallback {
			clear(want[3<<20 : 3<<20+4096])
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("fallback=%v: content after trim/zero wrong", fallback)
		}
		b.Flush()
		// Hole punching (trim, zeroes without NoHole) frees blocks; the
		// fallback and NoHole keep them.
		after := allocatedBytes(t, p)
		if fallback && after < full {
			t.Fatalf("fallback freed blocks: %d -> %d", full, after)
		}
		if !fallback && canPunch(t) && after > full-(2<<20) {
			t.Fatalf("trim and zeroes without NoHole freed no blocks: %d -> %d", full, after)
		}
	}
}

// canPunch reports whether the temporary directory's file system punches
// holes, so the test can insist the backend uses it.
func canPunch(t *testing.T) bool {
	f, err := os.Create(filepath.Join(t.TempDir(), "probe"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Write(make([]byte, 8192))
	return punchHole(f, 0, 4096) == nil
}

func TestFileBackendReadOnly(t *testing.T) {
	p := tempFile(t, 4096)
	b, err := OpenFile(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !b.Capabilities().ReadOnly {
		t.Fatalf("read-only backend does not say so")
	}
	for _, err := range []error{b.WriteAt([]byte{1}, 0, 0), b.Trim(0, 1, 0), b.WriteZeroes(0, 1, 0)} {
		if !errors.Is(err, ErrReadOnly) || errnoOf(err) != errnoPerm {
			t.Fatalf("write to read-only backend: %v", err)
		}
	}
	if _, err := OpenFile(filepath.Join(t.TempDir(), "missing"), false); err == nil {
		t.Fatalf("opened a missing file")
	}
}

// TestFileBackendOverNBD serves a file and checks FUA, flush, trim and
// zeroes end to end.
func TestFileBackendOverNBD(t *testing.T) {
	b, p := openTemp(t, 1<<20)
	_, sock := startServer(t, Config{Exports: []Export{{Name: "f", Backend: b}}})
	c := dialGo(t, sock, "f")
	if errno := c.writeAt([]byte("durable"), 100, cmdFlagFUA); errno != 0 {
		t.Fatal(errno)
	}
	if r := c.do(cmdWriteZeroes, cmdFlagNoHole, 0, 4096, nil); r.errno != 0 {
		t.Fatal(r.errno)
	}
	if errno := c.writeAt([]byte("kept"), 200, 0); errno != 0 {
		t.Fatal(errno)
	}
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatal(r.errno)
	}
	onDisk, _ := os.ReadFile(p)
	if string(onDisk[200:204]) != "kept" || !bytes.Equal(onDisk[100:107], make([]byte, 7)) {
		t.Fatalf("file content %q %q", onDisk[100:107], onDisk[200:204])
	}
}

func TestMemBackend(t *testing.T) {
	m := NewMemBackend(3 << 20)
	// A write spanning several lock stripes.
	data := pattern(2<<20+10, 7)
	if err := m.WriteAt(data, 1<<20-20, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := m.ReadAt(got, 1<<20-20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if n, err := m.ReadAt(make([]byte, 10), 3<<20-4); n != 4 || err != io.EOF {
		t.Fatalf("read over the end: %d %v", n, err)
	}
	if err := m.WriteAt(make([]byte, 10), 3<<20-4, 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write over the end: %v", err)
	}
	if err := m.Trim(3<<20, 1, 0); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("trim over the end: %v", err)
	}
	if err := m.WriteZeroes(1<<20, 1<<20, NoHole|FastZero); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.Bytes()[1<<20:2<<20], make([]byte, 1<<20)) {
		t.Fatalf("not zeroed")
	}
	// Every region locked at once (a request larger than all stripes).
	if err := m.WriteZeroes(0, 3<<20, 0); err != nil {
		t.Fatal(err)
	}
}

func TestReadWriterAt(t *testing.T) {
	m := NewMemBackend(1000)
	rw := NewReadWriterAt(m)
	if n, err := rw.WriteAt([]byte("hello"), 995); n != 5 || err != nil {
		t.Fatalf("write at the end: %d %v", n, err)
	}
	if n, err := rw.WriteAt([]byte("hello"), 996); n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the end: %d %v", n, err)
	}
	if string(m.Bytes()[995:]) != "hello" {
		t.Fatalf("partial write happened: %q", m.Bytes()[995:])
	}
	buf := make([]byte, 10)
	if n, err := rw.ReadAt(buf, 995); n != 5 || err != io.EOF || string(buf[:5]) != "hello" {
		t.Fatalf("read over the end: %d %v %q", n, err, buf[:n])
	}
	if n, err := rw.ReadAt(buf, 1000); n != 0 || err != io.EOF {
		t.Fatalf("read at the end: %d %v", n, err)
	}
	if _, err := rw.ReadAt(buf, -1); err == nil {
		t.Fatalf("negative offset accepted")
	}
	// The standard library on top.
	all, err := io.ReadAll(io.NewSectionReader(rw, 0, m.Size()))
	if err != nil || len(all) != 1000 || string(all[995:]) != "hello" {
		t.Fatalf("SectionReader: %d bytes, %v", len(all), err)
	}
	rec := &flagRecorder{Backend: m}
	(&ReadWriterAt{Backend: rec, Flags: FUA}).WriteAt([]byte{1}, 0)
	if rec.last() != FUA {
		t.Fatalf("flags not passed: %b", rec.last())
	}
}

func TestBufPool(t *testing.T) {
	for _, n := range []int{1, 4095, 4096, 4097, 1 << 20, 32 << 20} {
		b := getBuf(n)
		if len(b) != n || cap(b)&(cap(b)-1) != 0 || cap(b) < 4096 {
			t.Fatalf("getBuf(%d): len %d cap %d", n, len(b), cap(b))
		}
		if a := uintptr(unsafe.Pointer(&b[0])) % bufAlign; a != 0 {
			t.Fatalf("getBuf(%d): buffer at %d past a %d-byte boundary", n, a, bufAlign)
		}
		putBuf(b)
	}
	if getBuf(0) != nil {
		t.Fatalf("getBuf(0) allocated")
	}
	putBuf(make([]byte, 5000)) // not from the pool: ignored
}

func TestFileBackendReadPastEnd(t *testing.T) {
	b, _ := openTemp(t, 1000)
	buf := make([]byte, 100)
	if n, err := b.ReadAt(buf, 950); n != 50 || err != io.EOF {
		t.Fatalf("read past the end: %d %v, want 50 and io.EOF itself", n, err)
	}
}
