package daemon

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const ctlChildEnv = "MDCLUSTERD_TEST_CTL_CLIENT"

// TestCtlClientChild is not a test: it is the client the refusal test runs
// as another user. It calls status on the socket named by the environment
// and prints "ok" or the error.
func TestCtlClientChild(t *testing.T) {
	path := os.Getenv(ctlChildEnv)
	if path == "" {
		t.Skip("only runs as the child of TestControlRefusesNonRoot")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := ctl.Dial(ctx, path)
	if err != nil {
		fmt.Printf("dial: %v\n", err)
		os.Exit(0)
	}
	if _, err := c.Status(ctx); err != nil {
		var ce *ctl.Error
		if errors.As(err, &ce) {
			fmt.Printf("code=%s: %v\n", ce.Code, err)
		} else {
			fmt.Printf("error: %v\n", err)
		}
		os.Exit(0)
	}
	fmt.Println("ok")
	os.Exit(0)
}

// startTestControl serves a control socket in dir with a trivial handler.
func startTestControl(t *testing.T, dir string, cfg config.Control, logs *syncBuffer, allowUID uint32) (*controlServer, *Metrics) {
	t.Helper()
	cfg.Socket = filepath.Join(dir, "ctl.sock")
	ln, err := listenControl(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	m := newMetrics()
	s := newControlServer(ln, cfg, testLogger(logs), m, func(ctx context.Context, req ctl.Request) (any, error) {
		switch req.Command {
		case ctl.CmdStatus:
			return ctl.Status{State: "running"}, nil
		case "block":
			<-ctx.Done()
			return nil, ctx.Err()
		}
		return nil, ctl.Errorf(ctl.CodeUnknownCommand, "unknown command %q", req.Command)
	})
	s.allowUID = allowUID
	s.serve()
	t.Cleanup(func() { s.close(time.Second) })
	return s, m
}

func controlCfg() config.Control {
	return config.Control{MaxRequestBytes: 4096, MaxConnections: 2, IdleTimeout: 10 * time.Second, RefusedLogInterval: time.Hour}
}

// TestControlRefusesNonRoot runs a client as uid 65534 (nobody) against a
// socket it may connect to (mode 0666 here, to reach the SO_PEERCRED check
// rather than the file mode): the daemon refuses it with a clear error,
// logs and counts it; root is served.
func TestControlRefusesNonRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (to run a client as another user); the project's tests run as root")
	}
	dir, err := os.MkdirTemp("", "mdclusterd-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	s, m := startTestControl(t, dir, controlCfg(), &logs, 0)
	if err := os.Chmod(s.path, 0o666); err != nil {
		t.Fatal(err)
	}
	// The child is this test binary, copied where nobody can run it.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client.test")
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(asNobody bool) string {
		cmd := exec.Command(bin, "-test.run=^TestCtlClientChild$")
		cmd.Env = append(os.Environ(), ctlChildEnv+"="+s.path)
		cmd.Dir = dir
		if asNobody {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return strings.TrimSpace(string(out))
	}
	got := run(true)
	want := "code=permission_denied: mdclusterd: permission denied: uid 65534 may not use the control socket " + s.path + "; only root (uid 0) may"
	if got != want {
		t.Errorf("as nobody:\n got %q\nwant %q", got, want)
	}
	if got := run(false); got != "ok" {
		t.Errorf("as root: %q", got)
	}
	if n := testutil.ToFloat64(m.ctlRefused.WithLabelValues("not_root")); n != 1 {
		t.Errorf("refusals counted: %v", n)
	}
	if !strings.Contains(logs.String(), "connection from a non-root user refused") || !strings.Contains(logs.String(), "uid=65534") {
		t.Errorf("refusal not logged:\n%s", logs.String())
	}
}

// TestControlRefusalLogIsRateLimited: refusals are all counted and
// answered, but logged once per interval with the number left out.
func TestControlRefusalLogIsRateLimited(t *testing.T) {
	var logs syncBuffer
	s, m := startTestControl(t, t.TempDir(), controlCfg(), &logs, 4242) // root is "someone else" for this server
	for i := range 3 {
		c := dial(t, s.path)
		if _, err := c.Status(ctx10(t)); !errors.Is(err, &ctl.Error{Code: ctl.CodePermissionDenied}) {
			t.Fatalf("refusal %d: %v", i, err)
		}
	}
	if n := testutil.ToFloat64(m.ctlRefused.WithLabelValues("not_root")); n != 3 {
		t.Errorf("refusals counted: %v", n)
	}
	if n := testutil.ToFloat64(m.ctlLogSuppress); n != 2 {
		t.Errorf("log lines suppressed: %v", n)
	}
	if n := strings.Count(logs.String(), "non-root user refused"); n != 1 {
		t.Errorf("%d refusal lines logged, want 1:\n%s", n, logs.String())
	}
	ok, _ := s.refused.allow(time.Now().Add(2 * time.Hour))
	if !ok {
		t.Error("no log line allowed after the interval")
	}
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{interval: time.Minute}
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at         time.Duration
		ok         bool
		suppressed uint64
	}{{0, true, 0}, {time.Second, false, 0}, {59 * time.Second, false, 0}, {61 * time.Second, true, 2}, {62 * time.Second, false, 0}}
	for _, st := range steps {
		ok, n := l.allow(t0.Add(st.at))
		if ok != st.ok || n != st.suppressed {
			t.Errorf("at %v: %v %d, want %v %d", st.at, ok, n, st.ok, st.suppressed)
		}
	}
}

// rawRequest writes one frame and reads one response frame.
func rawRequest(t *testing.T, c net.Conn, body []byte) (ctl.Response, error) {
	t.Helper()
	if err := ctl.WriteFrame(c, body); err != nil {
		return ctl.Response{}, err
	}
	return readResponse(c)
}

func readResponse(c net.Conn) (ctl.Response, error) {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := ctl.ReadFrame(c, 1<<20)
	if err != nil {
		return ctl.Response{}, err
	}
	var r ctl.Response
	err = jsonUnmarshal(b, &r)
	return r, err
}

func TestControlBounds(t *testing.T) {
	var logs syncBuffer
	cfg := controlCfg()
	s, m := startTestControl(t, t.TempDir(), cfg, &logs, 0)

	// Too large: refused from the header, answered, closed.
	c, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(cfg.MaxRequestBytes+1))
	if _, err := c.Write(hdr[:]); err != nil {
		t.Fatal(err)
	}
	r, err := readResponse(c)
	if err != nil || r.Error == nil || r.Error.Code != ctl.CodeTooLarge ||
		!strings.Contains(r.Error.Message, "4097 bytes announced, limit 4096 (control.max_request_bytes)") {
		t.Fatalf("too large: %+v %v", r.Error, err)
	}
	if _, err := readResponse(c); !errors.Is(err, io.EOF) {
		t.Errorf("connection not closed after a too-large request: %v", err)
	}
	c.Close()

	// Malformed and wrong-version requests are answered on a connection
	// that stays usable.
	c2, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	r, err = rawRequest(t, c2, []byte(`{"version":1,"command":"status","bogus":true}`))
	if err != nil || r.Error == nil || r.Error.Code != ctl.CodeBadRequest || !strings.Contains(r.Error.Message, `unknown field "bogus"`) {
		t.Errorf("bad request: %+v %v", r.Error, err)
	}
	r, err = rawRequest(t, c2, []byte(`{"version":7,"id":3,"command":"status"}`))
	if err != nil || r.Error == nil || r.Error.Code != ctl.CodeUnsupportedVersion || r.ID != 3 || r.Version != ctl.Version ||
		r.Error.Message != "protocol version 7 is not supported; this mdclusterd speaks version 1" {
		t.Errorf("version: %+v %+v %v", r, r.Error, err)
	}
	// Pipelined: two requests written before reading, answered in order.
	if err := ctl.WriteFrame(c2, []byte(`{"version":1,"id":10,"command":"status"}`)); err != nil {
		t.Fatal(err)
	}
	if err := ctl.WriteFrame(c2, []byte(`{"version":1,"id":11,"command":"nope"}`)); err != nil {
		t.Fatal(err)
	}
	r1, err1 := readResponse(c2)
	r2, err2 := readResponse(c2)
	if err1 != nil || err2 != nil || r1.ID != 10 || !r1.OK || r2.ID != 11 || r2.Error == nil || r2.Error.Code != ctl.CodeUnknownCommand {
		t.Errorf("pipelined: %+v %v / %+v %v", r1, err1, r2, err2)
	}

	// The connection limit: c2 holds one slot, c3 the other, c4 is busy.
	c3 := dial(t, s.path)
	if _, err := c3.Status(ctx10(t)); err != nil {
		t.Fatal(err)
	}
	c4 := dial(t, s.path)
	if _, err := c4.Status(ctx10(t)); !errors.Is(err, &ctl.Error{Code: ctl.CodeBusy}) ||
		err.Error() != "mdclusterd: busy: 2 control connections are open (control.max_connections); try again" {
		t.Errorf("over the limit: %v", err)
	}
	if n := testutil.ToFloat64(m.ctlRefused.WithLabelValues("limit")); n != 1 {
		t.Errorf("limit refusals: %v", n)
	}
	if n := testutil.ToFloat64(m.ctlConns); n != 2 {
		t.Errorf("open connections: %v", n)
	}
	if n := testutil.ToFloat64(m.ctlErrors.WithLabelValues("too_large")); n != 1 {
		t.Errorf("too-large errors: %v", n)
	}
}

// TestControlIdleTimeout: a connection that sends nothing is closed after
// control.idle_timeout, freeing its slot.
func TestControlIdleTimeout(t *testing.T) {
	var logs syncBuffer
	cfg := controlCfg()
	cfg.IdleTimeout = 50 * time.Millisecond
	s, m := startTestControl(t, t.TempDir(), cfg, &logs, 0)
	c, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The read returns only when the server closes the connection; the
	// deadline merely guards against a hang.
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("idle connection: read %d, %v; want EOF from the server", n, err)
	}
	eventually(t, "the idle timeout counted", func() bool {
		return testutil.ToFloat64(m.ctlErrors.WithLabelValues("idle_timeout")) == 1 && testutil.ToFloat64(m.ctlConns) == 0
	})
}

// TestControlSocketDirChecks: a directory others can write to is refused,
// a missing one is created root-only, and a non-socket file at the path
// is never replaced.
func TestControlSocketDirChecks(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := listenControl(filepath.Join(open, "s.sock")); err == nil ||
		!strings.Contains(err.Error(), "has mode 0777: group or others can write to it and replace the socket") {
		t.Errorf("world-writable directory: %v", err)
	}
	fresh := filepath.Join(base, "new", "run")
	ln, err := listenControl(filepath.Join(fresh, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("created directory: %v %v", fi.Mode(), err)
	}
	file := filepath.Join(base, "plain")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := listenControl(file); err == nil || !strings.Contains(err.Error(), "exists and is not a socket; refusing to replace it") {
		t.Errorf("plain file: %v", err)
	}
	if b, _ := os.ReadFile(file); !bytes.Equal(b, []byte("keep me")) {
		t.Error("the plain file was changed")
	}
}
