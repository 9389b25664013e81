package kernel

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// TestAttachRealKernel attaches a memory export to the running kernel's
// NBD client and checks the data path both ways, STATUS, a second attach
// on a busy device and the detach. It needs root and the nbd module; the
// host machines we build on have neither, so it skips there and runs in
// the VM cluster test (docs/vmtest.md), also from inside a network
// namespace, where older kernels have no nbd family.
func TestAttachRealKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) for the kernel NBD client")
	}
	if c, err := dial(); err != nil {
		t.Skipf("no kernel NBD client here: %v", err)
	} else {
		c.c.Close()
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d (the data pattern)", seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	const size = 8 << 20
	mem := nbd.NewMemBackend(size)
	srv, err := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "mem", Backend: mem}}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	at, err := Attach(srv, "mem", Options{Index: AnyIndex, BlockSize: 4096, Timeout: 10 * time.Second, BackendID: "kernel test"})
	if err != nil {
		t.Fatal(err)
	}
	defer at.Detach()
	t.Logf("attached as %s", at.Device)
	if ok, err := Connected(at.Index); err != nil || !ok {
		t.Fatalf("STATUS of %s: connected %v, %v", at.Device, ok, err)
	}
	name := strings.TrimPrefix(at.Device, "/dev/")
	if b, err := os.ReadFile("/sys/block/" + name + "/backend"); err != nil || strings.TrimSpace(string(b)) != "kernel test" {
		t.Errorf("/sys/block/%s/backend: %q, %v", name, b, err)
	}
	// The queue settings: whole requests up to DefaultMaxRequestKiB (or
	// the driver's maximum), no I/O scheduler.
	if at.QueueErr != nil {
		t.Errorf("queue settings: %v", at.QueueErr)
	}
	q := "/sys/block/" + name + "/queue/"
	maxKiB := DefaultMaxRequestKiB
	if b, err := os.ReadFile(q + "max_hw_sectors_kb"); err == nil {
		if hw, _ := strconv.Atoi(strings.TrimSpace(string(b))); hw > 0 && hw < maxKiB {
			maxKiB = hw
		}
	}
	if b, err := os.ReadFile(q + "max_sectors_kb"); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(maxKiB) {
		t.Errorf("%smax_sectors_kb: %q, %v; want %d", q, b, err, maxKiB)
	}
	if b, err := os.ReadFile(q + "scheduler"); err != nil || !strings.Contains(string(b), "[none]") {
		t.Errorf("%sscheduler: %q, %v; want none chosen", q, b, err)
	}

	// A second attach on the same device must be refused, not steal it.
	if at2, err := Attach(srv, "mem", Options{Index: at.Index}); err == nil {
		at2.Detach()
		t.Fatalf("a second attach on %s succeeded", at.Device)
	}

	f, err := os.OpenFile(at.Device, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Seek(0, 2); err != nil || st != size {
		t.Fatalf("%s: size %d (%v), want %d", at.Device, st, err, size)
	}
	buf := aligned(256 << 10)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	// Through the device into the backend.
	if _, err := f.WriteAt(buf, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := mem.Bytes()[1<<20 : 1<<20+len(buf)]; !bytes.Equal(got, buf) {
		t.Fatal("what was written through the kernel device is not in the backend")
	}
	// Into the backend, read through the device (O_DIRECT: no cache).
	want := make([]byte, len(buf))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	if err := mem.WriteAt(want, 5<<20, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(buf, 5<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, want) {
		t.Fatal("the kernel device reads something else than the backend holds")
	}
	f.Close()

	if err := at.Detach(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	if ok, err := Connected(at.Index); err != nil || ok {
		t.Errorf("after detach: connected %v, %v", ok, err)
	}
	if _, err := os.Stat("/sys/block/" + name + "/pid"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/sys/block/%s/pid still there after detach (%v)", name, err)
	}
	if err := at.Detach(); err != nil {
		t.Errorf("second detach: %v", err)
	}
}

// aligned returns a page-aligned buffer for O_DIRECT.
func aligned(n int) []byte {
	b := make([]byte, n+4096)
	off := int(4096-uintptr(unsafe.Pointer(&b[0]))%4096) % 4096
	return b[off : off+n]
}
