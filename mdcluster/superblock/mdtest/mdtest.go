// Package mdtest gives tests access to the md member fixtures kept in
// mdcluster/superblock/testdata/md: member devices written by real mdadm
// and Linux md, with the text mdadm -E and -X printed for them. It is a
// test helper package (like net/http/httptest) and must only be imported
// from tests.
package mdtest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// Dir returns the fixture directory, found relative to this source file
// so that tests of any package can use it.
func Dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "md")
}

// Names returns the fixture names (file names without .img.gz), sorted.
func Names(t testing.TB) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(Dir(), "*.img.gz"))
	if err != nil || len(m) == 0 {
		t.Fatalf("no md fixtures in %s (err %v)", Dir(), err)
	}
	var names []string
	for _, p := range m {
		names = append(names, strings.TrimSuffix(filepath.Base(p), ".img.gz"))
	}
	sort.Strings(names)
	return names
}

// Expected returns what mdadm printed for fixture name in mode "E" or "X"
// (stdout and stderr together, as captured) and its exit status.
func Expected(t testing.TB, name, mode string) (text string, exit int) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(Dir(), name+"."+mode+".txt"))
	if err != nil {
		t.Fatalf("fixture %s.%s.txt: %v", name, mode, err)
	}
	s := string(b)
	i := strings.LastIndex(s, "exit=")
	if i < 0 {
		t.Fatalf("fixture %s.%s.txt: no exit= line", name, mode)
	}
	exit, err = strconv.Atoi(strings.TrimSpace(s[i+len("exit="):]))
	if err != nil {
		t.Fatalf("fixture %s.%s.txt: bad exit line: %v", name, mode, err)
	}
	return s[:i], exit
}

// HeaderBytes is how much of each fixture Image restores: everything md
// metadata occupies (superblock, bad block log, all bitmap slots) lies in
// the first 2 MiB of these members, before data_offset.
const HeaderBytes = 4 << 20

// Image restores fixture name into dir as NAME.img and returns its path.
// The file has the original device size (which mdadm -E uses), the first
// HeaderBytes as recorded and zeros after that, so that tests do not spend
// seconds inflating gigabytes of array data they never read (the race
// detector makes that slow). Use ImageFull for the data too.
func Image(t testing.TB, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name+".img")
	if err := decompress(filepath.Join(Dir(), name+".img.gz"), path, HeaderBytes); err != nil {
		t.Fatalf("fixture %s: %v", name, err)
	}
	return path
}

// ImageFull is Image with every byte restored.
func ImageFull(t testing.TB, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name+".img")
	if err := decompress(filepath.Join(Dir(), name+".img.gz"), path, -1); err != nil {
		t.Fatalf("fixture %s: %v", name, err)
	}
	return path
}

// gzipSize returns the uncompressed size recorded in a gzip trailer (ISIZE,
// the size modulo 4 GiB; the fixtures are smaller than that).
func gzipSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var b [4]byte
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if _, err := f.ReadAt(b[:], st.Size()-4); err != nil {
		return 0, fmt.Errorf("%s: gzip trailer: %w", path, err)
	}
	return int64(b[0]) | int64(b[1])<<8 | int64(b[2])<<16 | int64(b[3])<<24, nil
}

// decompress writes the gzip file src to dst, skipping runs of zeros so the
// result stays sparse, stopping after limit bytes (limit < 0: no limit)
// and giving the file its full uncompressed size.
func decompress(src, dst string, limit int64) error {
	size, err := gzipSize(src)
	if err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	zr, err := gzip.NewReader(bufio.NewReaderSize(in, 1<<16))
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	buf := make([]byte, 1<<16)
	zero := make([]byte, len(buf))
	var off int64
	for {
		n, err := io.ReadFull(zr, buf)
		if n > 0 && !bytes.Equal(buf[:n], zero[:n]) {
			if _, werr := out.WriteAt(buf[:n], off); werr != nil {
				return werr
			}
		}
		off += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF || (limit >= 0 && off >= limit) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: %w", src, err)
		}
	}
	if limit < 0 && off != size {
		return fmt.Errorf("%s: inflated %d bytes, trailer says %d", src, off, size)
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	return out.Close()
}
