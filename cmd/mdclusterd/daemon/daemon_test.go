package daemon

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// TestSingleNodeDaemon starts a one-node cluster and uses every command
// and the metrics endpoint, then leaves through the control socket.
func TestSingleNodeDaemon(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	var logs syncBuffer
	var notified []string
	var nmu = make(chan struct{}, 1)
	nmu <- struct{}{}
	notify := func(states ...string) (bool, error) {
		<-nmu
		notified = append(notified, states...)
		nmu <- struct{}{}
		return true, nil
	}
	d, err := Start(context.Background(), Options{Config: cfg, Logger: testLogger(&logs), Notify: notify})
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	sigs := make(chan os.Signal, 1)
	go func() { runDone <- d.Run(sigs) }()
	defer func() {
		select {
		case sigs <- syscall.SIGTERM:
		default:
		}
	}()
	if fi, err := os.Stat(cfg.Control.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v %v", fi, err)
	}
	<-nmu
	if len(notified) == 0 || notified[0] != "READY=1" {
		t.Errorf("systemd was told %q before anything else, want READY=1", notified)
	}
	nmu <- struct{}{}

	c := dial(t, cfg.Control.Socket)
	var st *ctl.Status
	eventually(t, "a quorate, recovered one-member view", func() bool {
		var err error
		st, err = c.Status(ctx10(t))
		if err != nil {
			t.Fatal(err)
		}
		return st.Quorum.Quorate && len(st.View.Members) == 1 && st.RecoveredGeneration == st.View.Generation &&
			st.View.Generation > 0 && !st.LockManagerStopped
	})
	if st.Node.ID != 1 || st.State != "running" || st.Quorum.ExpectedVotes != 1 || st.Quorum.TotalVotes != 1 ||
		st.Quorum.Quorum != 1 || len(st.Members) != 1 || !st.Members[0].Self || len(st.Fencing) != 0 {
		t.Errorf("status %+v", st)
	}

	// A lock taken through the daemon's metered locker shows in the dump
	// and in the DLM metrics.
	ls, err := d.Node().Open("md0", dlm.OpenOptions{LVBLen: 64})
	if err != nil {
		t.Fatal(err)
	}
	lk, err := d.Metrics().Locker(ls).Request(ctx10(t), dlm.LockSpec{Resource: "bitmap0001", Mode: dlm.PW, Flags: dlm.ValBlk})
	if err != nil {
		t.Fatal(err)
	}
	locks, err := c.Locks(ctx10(t), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(locks.Lockspaces) != 1 || locks.Lockspaces[0].Name != "md0" || len(locks.Lockspaces[0].Resources) != 1 {
		t.Fatalf("locks %+v", locks)
	}
	r := locks.Lockspaces[0].Resources[0]
	if r.Name != "bitmap0001" || r.Master != 1 || len(r.Granted) != 1 || r.Granted[0].Mode != "PW" || r.Granted[0].Node != 1 {
		t.Errorf("resource %+v", r)
	}
	if _, err := c.Locks(ctx10(t), "md9"); !errors.Is(err, &ctl.Error{Code: ctl.CodeFailed}) ||
		!strings.Contains(err.Error(), `no lockspace "md9" on node 1 (open: md0)`) {
		t.Errorf("unknown lockspace: %v", err)
	}
	if err := c.Array(ctx10(t), ctl.CmdArrayCreate, map[string]any{"level": 1}, nil); !errors.Is(err, &ctl.Error{Code: ctl.CodeNotImplemented}) ||
		err.Error() != "mdclusterd: array.create: not implemented yet: the array manager is not built into this mdclusterd" {
		t.Errorf("array.create: %v", err)
	}
	if err := c.Call(ctx10(t), "frobnicate", nil, nil); !errors.Is(err, &ctl.Error{Code: ctl.CodeUnknownCommand}) {
		t.Errorf("unknown command: %v", err)
	}
	if err := c.Call(ctx10(t), ctl.CmdStatus, map[string]int{"verbose": 1}, nil); !errors.Is(err, &ctl.Error{Code: ctl.CodeBadRequest}) {
		t.Errorf("status with args: %v", err)
	}

	body := scrape(t, d.MetricsAddr())
	for _, want := range []string{
		"mdcluster_membership_members 1", "mdcluster_membership_alive 1", "mdcluster_membership_quorate 1",
		"mdcluster_membership_lock_manager_stopped 0", "mdcluster_quorum_data_nodes 1", "mdcluster_quorum_needed 1",
		"mdcluster_dlm_lockspaces 1", `mdcluster_dlm_operations_total{op="request",result="ok"} 1`,
		`mdcluster_control_requests_total{command="status",result="ok"}`,
		`mdcluster_control_requests_total{command="array.create",result="not_implemented"} 1`,
		`mdcluster_control_requests_total{command="unknown",result="unknown_command"} 1`,
		"mdcluster_control_connections 1", "mdcluster_membership_view_installs_total",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if err := lk.Unlock(ctx10(t), 0); err != nil {
		t.Fatal(err)
	}
	if err := ls.Release(); err != nil {
		t.Fatal(err)
	}

	res, err := c.Leave(ctx10(t))
	if err != nil {
		t.Fatalf("leave: %v\n%s", err, logs.String())
	}
	if res.Seconds <= 0 {
		t.Errorf("leave took %v s", res.Seconds)
	}
	if err := <-runDone; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := os.Stat(cfg.Control.Socket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	<-nmu
	if !strings.Contains(strings.Join(notified, "\n"), "STOPPING=1") {
		t.Errorf("systemd was not told STOPPING=1: %q", notified)
	}
	nmu <- struct{}{}
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestStartFailureLeavesNothing: when a later step of the start fails,
// the earlier ones are undone: no socket, no data directory, no listener.
func TestStartFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg.Metrics.Listen = busy.Addr().String()
	var logs syncBuffer
	_, err = Start(context.Background(), Options{Config: cfg, Logger: testLogger(&logs)})
	if err == nil || !strings.Contains(err.Error(), "metrics: listening on "+busy.Addr().String()) {
		t.Fatalf("start: %v", err)
	}
	if _, err := os.Stat(cfg.Control.Socket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	if _, err := os.Stat(cfg.DataDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("data directory created: %v", err)
	}
	// The same configuration starts once the port is free: nothing of the
	// failed start is in the way.
	cfg.Metrics.Listen = "127.0.0.1:0"
	d, err := Start(context.Background(), Options{Config: cfg, Logger: testLogger(&logs)})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// TestSecondDaemonRefused: a second daemon on the same control socket
// fails to start and leaves the first one's socket alone; a stale socket
// (nobody listening) is taken over.
func TestSecondDaemonRefused(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	var logs syncBuffer
	d, err := Start(context.Background(), Options{Config: cfg, Logger: testLogger(&logs)})
	if err != nil {
		t.Fatal(err)
	}
	cfg2 := testConfig(t, t.TempDir())
	cfg2.Control.Socket = cfg.Control.Socket
	if _, err := Start(context.Background(), Options{Config: cfg2, Logger: testLogger(&logs)}); err == nil ||
		!strings.Contains(err.Error(), "answers: another mdclusterd is running") {
		t.Fatalf("second daemon: %v", err)
	}
	c := dial(t, cfg.Control.Socket)
	if _, err := c.Status(ctx10(t)); err != nil {
		t.Fatalf("the first daemon's socket broke: %v", err)
	}
	d.Close()

	// A stale socket file: bound, never closed by its owner.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.Control.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	d, err = Start(context.Background(), Options{Config: cfg2, Logger: testLogger(&logs)})
	if err != nil {
		t.Fatalf("stale socket not taken over: %v", err)
	}
	d.Close()
}

// stuckArrays never finishes quiescing on its own, like an array layer
// waiting for I/O that does not complete.
type stuckArrays struct {
	NoArrays
	quiescing chan struct{}
}

func (a *stuckArrays) Quiesce(ctx context.Context) error {
	close(a.quiescing)
	<-ctx.Done()
	return ctx.Err()
}

// TestSecondSignalStopsAtOnce: SIGTERM starts the graceful stop; while it
// waits (here on the array layer), SIGINT stops the daemon at once, well
// before shutdown.leave_timeout, and Run says the stop was not graceful.
func TestSecondSignalStopsAtOnce(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.Shutdown.LeaveTimeout = time.Hour
	arrays := &stuckArrays{quiescing: make(chan struct{})}
	var logs syncBuffer
	d, err := Start(context.Background(), Options{Config: cfg, Logger: testLogger(&logs), Arrays: arrays})
	if err != nil {
		t.Fatal(err)
	}
	sigs := make(chan os.Signal, 2)
	runDone := make(chan error, 1)
	go func() { runDone <- d.Run(sigs) }()
	sigs <- syscall.SIGTERM
	<-arrays.quiescing
	if st := d.Status(); st.State != "leaving" {
		t.Errorf("state %q while leaving", st.State)
	}
	sigs <- syscall.SIGINT
	select {
	case err := <-runDone:
		if err == nil || !strings.Contains(err.Error(), "the array layer did not quiesce") {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the second signal did not stop the daemon")
	}
	if !strings.Contains(logs.String(), "second signal: stopping at once") {
		t.Errorf("no log line for the second signal")
	}
	if _, err := os.Stat(cfg.Control.Socket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
}
