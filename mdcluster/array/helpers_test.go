package array

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// memMember is an in-memory Member for tests.
type memMember struct {
	name string
	mu   sync.Mutex
	b    []byte
	// failWriteAt makes writes at or after this byte offset fail (0: never).
	failWriteAt int64
	writes      int
	syncs       int
}

func newMem(name string, size int64) *memMember { return &memMember{name: name, b: make([]byte, size)} }

func (m *memMember) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memMember) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failWriteAt > 0 && off+int64(len(p)) > m.failWriteAt {
		return 0, fmt.Errorf("%s: injected write error at byte %d", m.name, off)
	}
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, fmt.Errorf("%s: write beyond end", m.name)
	}
	m.writes++
	return copy(m.b[off:], p), nil
}

func (m *memMember) Size() (int64, error) { return int64(len(m.b)), nil }
func (m *memMember) Sync() error          { m.mu.Lock(); m.syncs++; m.mu.Unlock(); return nil }
func (m *memMember) Name() string         { return m.name }

func (m *memMember) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.b...)
}

// imageFile creates a sparse image file of size bytes and opens it.
func imageFile(t *testing.T, dir, name string, size int64) (*FileMember, string) {
	t.Helper()
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	m, err := OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, path
}

// fixedRand hands out the given bytes and then fails.
type fixedRand struct{ b []byte }

func (r *fixedRand) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// counterRand produces deterministic, distinct bytes.
type counterRand struct{ n byte }

func (r *counterRand) Read(p []byte) (int, error) {
	for i := range p {
		r.n++
		p[i] = r.n
	}
	return len(p), nil
}

func fixedNow(sec int64) func() time.Time { return func() time.Time { return time.Unix(sec, 0) } }

// members converts file members to the interface slice.
func asMembers[T Member](ms ...T) []Member {
	out := make([]Member, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}

// needMdadm returns the path of real mdadm or skips.
func needMdadm(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("mdadm")
	if err != nil {
		t.Skip("mdadm not installed (apt-get install mdadm, or `make deps`): skipping interop with real mdadm")
	}
	return p
}

// realMdadm runs mdadm with TZ=UTC and returns stdout, stderr and exit status.
func realMdadm(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(needMdadm(t), args...)
	cmd.Env = append(os.Environ(), "TZ=UTC")
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("mdadm %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

// attachLoop attaches path to a loop device (read-only unless rw) and
// detaches it when the test ends; it skips when that is impossible.
func attachLoop(t *testing.T, path string, rw bool) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("not root: cannot attach loop devices")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not installed")
	}
	args := []string{"-f", "--show"}
	if !rw {
		args = append(args, "-r")
	}
	out, err := exec.Command("losetup", append(args, path)...).CombinedOutput()
	if err != nil {
		t.Skipf("losetup failed (no loop devices here?): %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// examineOurs renders mdadm -E for a member image with our code, the way
// cmd/mdadm-go does it.
func examineOurs(t *testing.T, path, homehost string) string {
	t.Helper()
	m, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	sectors, _ := memberSectors(m)
	sb, err := superblock.Probe(m, sectors)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s:\n", path)
	err = sb.Examine(&b, superblock.ExamineOptions{
		DevSectors: sectors, Bitmap: superblock.LoadBitmapSuper(m, sb), Location: time.UTC, HomeHost: homehost,
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// examineBitmapOurs renders mdadm -X for a member with our code.
func examineBitmapOurs(t *testing.T, path, name string) (string, string, int) {
	t.Helper()
	m, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	sectors, _ := memberSectors(m)
	sb, err := superblock.Probe(m, sectors)
	if err != nil {
		t.Fatal(err)
	}
	bsb := superblock.LoadBitmapSuper(m, sb)
	if bsb == nil {
		return "", "mdadm: " + name + " doesn't have bitmap\n", 1
	}
	var o, e bytes.Buffer
	x := bitmap.Examine(&o, &e, "mdadm", bitmap.ExamineSource{Name: name, Dev: m,
		Locate: bitmap.Internal(sb.BitmapStart(), bitmap.MdadmStride(bsb))})
	return o.String(), e.String(), x
}

// readHeader returns the first n bytes of a member.
func readHeader(t *testing.T, m io.ReaderAt, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := m.ReadAt(b, 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return b
}
