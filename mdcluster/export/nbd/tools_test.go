package nbd

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/internal/tooltest"
)

// These tests drive the server with independent NBD clients: libnbd's
// nbdinfo and nbdcopy (Debian package libnbd-bin) and fio's nbd engine
// (package fio). `make deps` installs both; without them the tests skip,
// except under CI (CI set), where a missing tool is a broken set-up and
// fails.

func nbdURI(sock, export string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}

func TestNbdinfo(t *testing.T) {
	nbdinfo := tooltest.Need(t, "nbdinfo", "libnbd-bin")
	s, sock := startServer(t, Config{Exports: []Export{
		{Name: "disk", Description: "the test disk", Backend: NewMemBackend(64 << 20)},
		{Name: "ro", Backend: NewMemBackend(1 << 20), ReadOnly: true},
	}})
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []struct {
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
			MinBlock    int    `json:"block_size_minimum"`
			PrefBlock   int    `json:"block_size_preferred"`
			MaxBlock    int    `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := tooltest.Run(t, 30*time.Second, nbdinfo, "--json", nbdURI(sock, "disk"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json output: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo saw %d exports:\n%s", len(info.Exports), out)
	}
	e := info.Exports[0]
	if !strings.Contains(info.Protocol, "newstyle-fixed") || e.Name != "disk" || e.Size != 64<<20 || e.Description != "the test disk" {
		t.Fatalf("nbdinfo: protocol %q export %+v\n%s", info.Protocol, e, out)
	}
	if e.ReadOnly || !e.Flush || !e.FUA || !e.Trim || !e.Zero || !e.FastZero || !e.MultiConn {
		t.Fatalf("nbdinfo flags: %+v\n%s", e, out)
	}
	if e.MinBlock != 1 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 {
		t.Fatalf("nbdinfo block sizes %d/%d/%d", e.MinBlock, e.PrefBlock, e.MaxBlock)
	}
	// The human-readable form and the exit-code queries.
	out = tooltest.Run(t, 30*time.Second, nbdinfo, nbdURI(sock, "ro"))
	for _, want := range []string{"export-size: 1048576", "is_read_only: true", "can_flush: true"} {
		if !strings.Contains(out, want) {
			t.Fatalf("nbdinfo output lacks %q:\n%s", want, out)
		}
	}
	if err := exec.Command(nbdinfo, "--is", "read-only", nbdURI(sock, "ro")).Run(); err != nil {
		t.Fatalf("nbdinfo --is read-only on the read-only export: %v", err)
	}
	if err := exec.Command(nbdinfo, "--is", "read-only", nbdURI(sock, "disk")).Run(); err == nil {
		t.Fatalf("nbdinfo --is read-only on the writable export says yes")
	}
	out = tooltest.Run(t, 30*time.Second, nbdinfo, "--list", nbdURI(sock, ""))
	if !strings.Contains(out, `export="disk"`) || !strings.Contains(out, `export="ro"`) {
		t.Fatalf("nbdinfo --list:\n%s", out)
	}
	if st := s.Stats(); st.HandshakeFailures != 0 || st.ProtocolErrors != 0 {
		t.Fatalf("server saw errors: %+v", st)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	nbdcopy := tooltest.Need(t, "nbdcopy", "libnbd-bin")
	const size = 8 << 20
	dir := t.TempDir()
	src, back := filepath.Join(dir, "src"), filepath.Join(dir, "back")
	data := make([]byte, size)
	rand.Read(data)
	// A zero stretch, which nbdcopy turns into zeroing requests.
	clear(data[1<<20 : 2<<20])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	disk, _ := openTemp(t, size)
	s, sock := startServer(t, Config{Exports: []Export{{Name: "disk", Backend: disk}}})
	uri := nbdURI(sock, "disk")
	tooltest.Run(t, 60*time.Second, nbdcopy, "--flush", src, uri)
	tooltest.Run(t, 60*time.Second, nbdcopy, uri, back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("copied back %d bytes that differ from the %d written", len(got), len(data))
	}
	st := s.Stats()
	if st.BytesWritten+uint64(size/8) < size || st.Flushes == 0 || st.ErrorReplies != 0 {
		t.Fatalf("server stats after nbdcopy: %+v", st)
	}
	// CAN_MULTI_CONN lets nbdcopy open several connections per copy.
	t.Logf("two nbdcopy runs used %d connections, %d zeroing requests", st.ConnectionsAccepted, st.WriteZeroes)
	out := tooltest.Run(t, 30*time.Second, tooltest.Need(t, "nbdinfo", "libnbd-bin"), uri)
	t.Logf("nbdinfo %s:\n%s", uri, out)
}

// fio runs fio with the nbd engine against uri and returns its JSON report.
func fio(t *testing.T, uri string, args ...string) map[string]any {
	t.Helper()
	fioPath := tooltest.Need(t, "fio", "fio")
	// fio saves its verify state in the working directory unless told
	// not to; the package directory is not the place for it.
	args = append([]string{"--output-format=json", "--ioengine=nbd", "--uri=" + uri, "--verify_state_save=0"}, args...)
	out := tooltest.Run(t, 90*time.Second, fioPath, args...)
	// fio may print notes before the JSON.
	if i := strings.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return rep
}

// fioJob returns the first job of a fio JSON report.
func fioJob(t *testing.T, rep map[string]any) map[string]any {
	t.Helper()
	jobs, _ := rep["jobs"].([]any)
	if len(jobs) == 0 {
		t.Fatalf("fio report without jobs: %v", rep)
	}
	return jobs[0].(map[string]any)
}

func fioNum(job map[string]any, dir, key string) float64 {
	d, _ := job[dir].(map[string]any)
	v, _ := d[key].(float64)
	return v
}

func TestFioRandomWriteVerify(t *testing.T) {
	tooltest.Need(t, "fio", "fio")
	const size = 32 << 20
	s, sock, _ := memServer(t, size, nil)
	rep := fio(t, nbdURI(sock, "mem"),
		"--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16m",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	job := fioJob(t, rep)
	if e, _ := job["error"].(float64); e != 0 {
		t.Fatalf("fio job error %v", e)
	}
	written, read := fioNum(job, "write", "io_bytes"), fioNum(job, "read", "io_bytes")
	if written != 16<<20 || read != 16<<20 {
		t.Fatalf("fio wrote %v and verified %v bytes, want 16 MiB each", written, read)
	}
	t.Logf("fio randwrite 4k qd32: %.0f write IOPS", fioNum(job, "write", "iops"))
	if st := s.Stats(); st.ErrorReplies != 0 || st.Writes < 4096 {
		t.Fatalf("server stats: %+v", st)
	}
}

func TestFioSequentialWriteVerify(t *testing.T) {
	tooltest.Need(t, "fio", "fio")
	disk, _ := openTemp(t, 64<<20)
	_, sock := startServer(t, Config{Exports: []Export{{Name: "disk", Backend: disk}}})
	rep := fio(t, nbdURI(sock, "disk"),
		"--name=seqwrite", "--rw=write", "--bs=1m", "--iodepth=4", "--size=32m",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	job := fioJob(t, rep)
	if e, _ := job["error"].(float64); e != 0 {
		t.Fatalf("fio job error %v", e)
	}
	if w, r := fioNum(job, "write", "io_bytes"), fioNum(job, "read", "io_bytes"); w != 32<<20 || r != 32<<20 {
		t.Fatalf("fio wrote %v and verified %v bytes, want 32 MiB each", w, r)
	}
	t.Logf("fio write 1m qd4: %.0f KiB/s", fioNum(job, "write", "bw"))
}
