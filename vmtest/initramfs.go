package vmtest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"
)

// Initramfs collects the files of an initramfs and writes them as an
// uncompressed newc cpio archive, the format the kernel unpacks into its
// root file system. Parent directories are added on their own.
type Initramfs struct {
	entries map[string]cpioEntry
}

type cpioEntry struct {
	mode         uint32 // file type and permission bits, as in st_mode
	data         []byte // file contents or symlink target
	major, minor uint32 // device number, for device nodes
}

// File type bits of st_mode.
const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

// NewInitramfs returns an empty initramfs holding /dev/console, which the
// kernel opens for init's standard streams before anything is mounted.
func NewInitramfs() *Initramfs {
	r := &Initramfs{entries: map[string]cpioEntry{}}
	r.entries["dev/console"] = cpioEntry{mode: modeCharDev | 0o600, major: 5, minor: 1}
	return r
}

func clean(p string) string { return strings.TrimPrefix(path.Clean("/"+p), "/") }

// AddFile adds a regular file with the given permission bits.
func (r *Initramfs) AddFile(name string, data []byte, perm os.FileMode) {
	r.entries[clean(name)] = cpioEntry{mode: modeFile | uint32(perm.Perm()), data: data}
}

// AddSymlink adds a symbolic link name -> target.
func (r *Initramfs) AddSymlink(name, target string) {
	r.entries[clean(name)] = cpioEntry{mode: modeSymlink | 0o777, data: []byte(target)}
}

// AddHostFile copies a host file (following symlinks) to name.
func (r *Initramfs) AddHostFile(name, src string, perm os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	r.AddFile(name, b, perm)
	return nil
}

// AddBinary copies a host executable to name together with the shared
// libraries and dynamic loader ldd lists for it, each at the path ldd
// prints, so that the binary runs unchanged in the guest. A static binary
// brings nothing else.
func (r *Initramfs) AddBinary(name, src string) error {
	if err := r.AddHostFile(name, src, 0o755); err != nil {
		return err
	}
	libs, err := sharedLibraries(src)
	if err != nil {
		return err
	}
	for _, lib := range libs {
		if err := r.AddHostFile(lib, lib, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// sharedLibraries runs ldd on bin and returns the absolute paths it names.
func sharedLibraries(bin string) ([]string, error) {
	var out, stderr bytes.Buffer
	cmd := exec.Command("ldd", bin)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	text := out.String() + stderr.String()
	if strings.Contains(text, "not a dynamic executable") || strings.Contains(text, "statically linked") {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w\n%s", bin, err, text)
	}
	var libs []string
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("ldd %s: library %s not found", bin, f[0])
		}
	}
	return libs, nil
}

// WriteTo writes the archive: directories first (parents before
// children), then everything else, then the trailer.
func (r *Initramfs) WriteTo(w io.Writer) (int64, error) {
	dirs := map[string]bool{}
	for name := range r.entries {
		for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var names []string
	for d := range dirs {
		if _, ok := r.entries[d]; !ok {
			names = append(names, d)
		}
	}
	sort.Strings(names)
	var rest []string
	for name := range r.entries {
		rest = append(rest, name)
	}
	sort.Strings(rest)
	cw := &cpioWriter{w: w}
	for _, d := range names {
		cw.entry(d, cpioEntry{mode: modeDir | 0o755})
	}
	for _, name := range rest {
		cw.entry(name, r.entries[name])
	}
	cw.entry("TRAILER!!!", cpioEntry{})
	return cw.n, cw.err
}

// cpioWriter writes newc ("070701") records.
type cpioWriter struct {
	w   io.Writer
	n   int64
	ino uint32
	err error
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if rem := c.n % 4; rem != 0 {
		c.write(make([]byte, 4-rem))
	}
}

func (c *cpioWriter) entry(name string, e cpioEntry) {
	c.ino++
	nlink := 1
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.major, e.minor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write(append([]byte(name), 0))
	c.pad()
	c.write(e.data)
	c.pad()
}
