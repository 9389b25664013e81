//go:build linux

package raid

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// newFile creates a sparse file of size bytes in dir.
func newFile(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func openDirect(t testing.TB, path string) *DirectFile {
	t.Helper()
	d, err := OpenDirect(path)
	if err != nil {
		if strings.Contains(err.Error(), "does not support direct I/O") {
			t.Skipf("the test directory's file system has no O_DIRECT: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// TestDirectFile checks O_DIRECT I/O on a file in the test's directory
// (on the work disk: tmpfs would refuse O_DIRECT): size, block size,
// aligned I/O, unaligned I/O through bounce buffers, FUA and Sync.
func TestDirectFile(t *testing.T) {
	p := newFile(t, t.TempDir(), "m0", 1<<20)
	d := openDirect(t, p)
	if d.Size() != 1<<20 {
		t.Fatalf("size %d", d.Size())
	}
	if bs := d.BlockSize(); bs != 512 && bs != 4096 {
		t.Fatalf("block size %d", bs)
	}
	buf := alignedBuf(8192)
	for i := range buf {
		buf[i] = byte(i)
	}
	if _, err := d.WriteAt(buf, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAtFUA(buf[:4096], 65536); err != nil {
		t.Fatal(err)
	}
	// unaligned: odd offset, odd length, unaligned memory
	odd := make([]byte, 301)[1:]
	for i := range odd {
		odd[i] = 0xAB
	}
	if _, err := d.WriteAt(odd, 4096+77); err != nil {
		t.Fatal(err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), buf...)
	copy(want[77:], odd)
	got := make([]byte, 8193)[1:]
	if _, err := d.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read back differs at %d", firstDiff(got, want))
	}
	plain, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(plain[4096:4096+8192], want) || !bytes.Equal(plain[65536:65536+4096], buf[:4096]) {
		t.Fatal("the file does not hold what was written")
	}
	if _, err := d.ReadAt(make([]byte, 4096), 1<<20); err == nil {
		t.Fatal("read past the end succeeded")
	}
}

func TestDirectFileRefusesTmpfs(t *testing.T) {
	if _, err := os.Stat("/dev/shm"); err != nil {
		t.Skip("no /dev/shm")
	}
	f, err := os.CreateTemp("/dev/shm", "raid-direct-*")
	if err != nil {
		t.Skip(err)
	}
	defer os.Remove(f.Name())
	f.Truncate(1 << 20)
	f.Close()
	d, err := OpenDirect(f.Name())
	if err == nil {
		d.Close()
		t.Skip("this kernel's tmpfs accepts O_DIRECT")
	}
	if !strings.Contains(err.Error(), "direct I/O") {
		t.Fatalf("error does not say why: %v", err)
	}
}

// TestDirectLoopDevice opens a loop device (BLKGETSIZE64, BLKSSZGET) when
// the test runs as root with losetup; it skips otherwise.
func TestDirectLoopDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for losetup")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("no losetup")
	}
	p := newFile(t, t.TempDir(), "loop.img", 8<<20)
	out, err := exec.Command("losetup", "--find", "--show", "--sector-size", "4096", p).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	d := openDirect(t, dev)
	if d.Size() != 8<<20 || d.BlockSize() != 4096 {
		t.Fatalf("%s: size %d block size %d, want %d and 4096", dev, d.Size(), d.BlockSize(), 8<<20)
	}
	buf := alignedBuf(4096)
	copy(buf, "loop")
	if _, err := d.WriteAtFUA(buf, 8192); err != nil {
		t.Fatal(err)
	}
	got := alignedBuf(4096)
	if _, err := d.ReadAt(got, 8192); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v", err)
	}
}

// TestLayoutsOverFiles runs every raid10 layout (and raid1) end to end over
// O_DIRECT files: writes through the engine, reads back, then reads the
// member files with plain I/O and checks each block is where md's layout
// puts it. Then a member file is replaced by a blank one and rebuilt.
func TestLayoutsOverFiles(t *testing.T) {
	seed := seedFromEnv(t, "RAID_SEED")
	dir := t.TempDir()
	for _, name := range []string{"raid1-2", "raid10-n2-4", "raid10-n2-3", "raid10-f2-3", "raid10-o2-3", "raid10-f2-4"} {
		t.Run(name, func(t *testing.T) {
			g := testGeometries(t)[name]
			rng := rand.New(rand.NewPCG(seed, 11))
			size := rigDataOff + g.DevSize()
			members := make([]Member, g.Disks())
			paths := make([]string, g.Disks())
			for i := range members {
				paths[i] = newFile(t, dir, fmt.Sprintf("%s-%d", name, i), size)
				members[i] = Member{Device: openDirect(t, paths[i]), DataOffset: rigDataOff}
			}
			e, err := New(Config{Geometry: g, Members: members, Logger: testLogger(t), BitmapChunkSize: 64 << 10})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			model := make([]byte, g.Size())
			fillRandom(rng, model)
			w := e.WriterAt(false)
			for off := int64(0); off < g.Size(); off += 96 << 10 {
				if _, err := w.WriteAt(model[off:min(off+96<<10, g.Size())], off); err != nil {
					t.Fatal(err)
				}
			}
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, g.Size())
			if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatalf("read back: %v, equal %v (replay: RAID_SEED=%d)", err, bytes.Equal(got, model), seed)
			}
			checkFiles(t, g, paths, model)
			// Rebuild member 1 from scratch onto a new file.
			if err := e.FailMember(1, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := e.RemoveMember(1); err != nil {
				t.Fatal(err)
			}
			paths[1] = newFile(t, dir, name+"-spare", size)
			if err := e.AddMember(1, openDirect(t, paths[1]), rigDataOff); err != nil {
				t.Fatal(err)
			}
			if err := e.Recover(context.Background(), 1); err != nil {
				t.Fatal(err)
			}
			checkFiles(t, g, paths, model)
		})
	}
}

// checkFiles reads the member files without the engine and checks every
// copy of every block against model.
func checkFiles(t *testing.T, g Geometry, paths []string, model []byte) {
	t.Helper()
	files := make([][]byte, len(paths))
	for i, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files[i] = b[rigDataOff:]
	}
	bad := 0
	g.Extents(0, g.Size(), func(x Extent) bool {
		for _, l := range x.Copies {
			if !bytes.Equal(files[l.Member][l.Off:l.Off+x.Len], model[x.Off:x.Off+x.Len]) {
				t.Errorf("array bytes %d+%d: member %d at %d does not hold them", x.Off, x.Len, l.Member, l.Off)
				bad++
			}
		}
		return bad < 5
	})
}
