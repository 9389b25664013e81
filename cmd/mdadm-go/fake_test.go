package main

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// fakeDaemon is an in-process control socket speaking the ctl protocol.
// It records every request and answers from handle (a canned result, or
// a *ctl.Error).
type fakeDaemon struct {
	path   string
	ln     net.Listener
	mu     sync.Mutex
	reqs   []ctl.Request
	handle func(req ctl.Request) (any, error)
}

func newFakeDaemon(t *testing.T, handle func(ctl.Request) (any, error)) *fakeDaemon {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeDaemon{path: path, ln: ln, handle: handle}
	go f.serve()
	t.Cleanup(func() { ln.Close() })
	return f
}

func (f *fakeDaemon) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		go f.conn(c)
	}
}

func (f *fakeDaemon) conn(c net.Conn) {
	defer c.Close()
	for {
		body, err := ctl.ReadFrame(c, ctl.DefaultMaxRequest)
		if err != nil {
			return
		}
		req, err := ctl.DecodeRequest(body)
		resp := ctl.Response{Version: ctl.Version, ID: req.ID}
		if err != nil {
			resp.Error = ctl.Errorf(ctl.CodeBadRequest, "%v", err)
		} else {
			f.mu.Lock()
			f.reqs = append(f.reqs, req)
			f.mu.Unlock()
			res, herr := f.handle(req)
			var ce *ctl.Error
			switch {
			case errors.As(herr, &ce):
				resp.Error = ce
			case herr != nil:
				resp.Error = ctl.Errorf(ctl.CodeInternal, "%v", herr)
			default:
				resp.OK = true
				if res != nil {
					resp.Result, _ = json.Marshal(res)
				}
			}
		}
		out, _ := json.Marshal(resp)
		if ctl.WriteFrame(c, out) != nil {
			return
		}
	}
}

// requests returns the recorded requests.
func (f *fakeDaemon) requests() []ctl.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]ctl.Request(nil), f.reqs...)
}

// runWith runs the CLI against f (through $MDCLUSTER_SOCKET).
func runWith(f *fakeDaemon, args ...string) (stdout, stderr string, exit int) {
	var o, e stringsBuilder
	exit = run(args, &env{stdout: &o, stderr: &e, prog: "mdadm-go", hostname: "host1",
		location: utc, getenv: func(k string) string {
			if k == SocketEnv {
				return f.path
			}
			return ""
		}, poll: pollForTests, stat: fakeStat, claim: fakeClaim})
	return o.String(), e.String(), exit
}

// fakeStat stands for stat(2) in the tests, whose device names do not
// exist here: a path with "nonexistent" in it does not exist, any other
// is a plain file.
func fakeStat(p string) (os.FileInfo, error) {
	if strings.Contains(p, "nonexistent") {
		return nil, &os.PathError{Op: "stat", Path: p, Err: syscall.ENOENT}
	}
	return fakeInfo(p), nil
}

// fakeClaim stands for Create's exclusive open: "nonexistent" paths do
// not exist, "busy" ones are held by someone else.
func fakeClaim(p string) error {
	switch {
	case strings.Contains(p, "nonexistent"):
		return &os.PathError{Op: "open", Path: p, Err: syscall.ENOENT}
	case strings.Contains(p, "busy"):
		return &os.PathError{Op: "open", Path: p, Err: syscall.EBUSY}
	}
	return nil
}

type fakeInfo string

func (f fakeInfo) Name() string       { return string(f) }
func (f fakeInfo) Size() int64        { return 0 }
func (f fakeInfo) Mode() os.FileMode  { return 0o600 }
func (f fakeInfo) ModTime() time.Time { return time.Time{} }
func (f fakeInfo) IsDir() bool        { return false }
func (f fakeInfo) Sys() any           { return nil }

// stringsBuilder is a strings.Builder safe for the --wait goroutine.
type stringsBuilder struct {
	mu sync.Mutex
	b  []byte
}

func (s *stringsBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	return len(p), nil
}

func (s *stringsBuilder) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.b)
}

var _ io.Writer = (*stringsBuilder)(nil)
