package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// daemonEnv makes the test binary run as mdclusterd (run with the given
// arguments) instead of running tests, with testArrays as its array layer.
const daemonEnv = "MDCLUSTERD_TEST_DAEMON"

func TestMain(m *testing.M) {
	if os.Getenv(daemonEnv) != "" {
		arrayLayer = &testArrays{}
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// testArrays stands in for the array layer in the process tests: like
// the real one will, it opens a lockspace through the node, takes a lock
// (EX on "node-<id>") through the daemon's metered locker, and releases
// it when the daemon quiesces before leaving.
type testArrays struct {
	daemon.NoArrays
	mu   sync.Mutex
	ls   *dlm.Lockspace
	lk   dlm.LockHandle
	stop context.CancelFunc
	done chan struct{}
}

func (a *testArrays) Start(_ context.Context, env daemon.ArrayEnv) error {
	ls, err := env.Node.Open("test", dlm.OpenOptions{LVBLen: 32})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.ls, a.stop, a.done = ls, cancel, make(chan struct{})
	// The lock is granted once the first view is recovered; Start must not
	// wait for that.
	go func() {
		defer close(a.done)
		lk, err := env.Locker(ls).Request(ctx, dlm.LockSpec{Resource: fmt.Sprintf("node-%d", env.Config.NodeID), Mode: dlm.EX})
		if err != nil {
			env.Logger.Info("test array layer: no lock", "err", err)
			return
		}
		a.mu.Lock()
		a.lk = lk
		a.mu.Unlock()
		env.Logger.Info("test array layer: lock granted", "resource", lk.Resource())
	}()
	return nil
}

func (a *testArrays) Quiesce(ctx context.Context) error {
	a.stop()
	<-a.done
	a.mu.Lock()
	lk := a.lk
	a.mu.Unlock()
	if lk != nil {
		if err := lk.Unlock(ctx, 0); err != nil {
			return err
		}
	}
	return a.ls.Release()
}

func (a *testArrays) Close() error {
	a.stop()
	<-a.done
	return nil
}

func freePort(t *testing.T, udpToo bool) int {
	t.Helper()
	for range 50 {
		tl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := tl.Addr().(*net.TCPAddr).Port
		if !udpToo {
			tl.Close()
			return port
		}
		ul, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		tl.Close()
		if err == nil {
			ul.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// cluster is the shared part of the test configurations.
type cluster struct {
	dir    string
	key    string
	agent  string
	gossip []int // per node, index id-1
}

func newCluster(t *testing.T, n int) *cluster {
	t.Helper()
	c := &cluster{dir: t.TempDir()}
	c.key = filepath.Join(c.dir, "cluster.key")
	if err := os.WriteFile(c.key, []byte(hex.EncodeToString(bytes.Repeat([]byte{0x5a}, 32))+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Any fence attempt fails and stays in the history: the test checks
	// there is none.
	c.agent = filepath.Join(c.dir, "fence_fail")
	if err := os.WriteFile(c.agent, []byte("#!/bin/sh\necho refusing >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for range n {
		c.gossip = append(c.gossip, freePort(t, true))
	}
	return c
}

func (c *cluster) socket(id int) string {
	return filepath.Join(c.dir, fmt.Sprintf("run%d", id), "mdclusterd.sock")
}
func (c *cluster) dataDir(id int) string {
	return filepath.Join(c.dir, fmt.Sprintf("data%d", id))
}

// config writes node id's configuration file: only seed addresses, no
// DLM peer list.
func (c *cluster) config(t *testing.T, id int, metricsPort int, extra string) string {
	t.Helper()
	var seeds []string
	for i, p := range c.gossip {
		if i+1 != id {
			seeds = append(seeds, fmt.Sprintf("%q", fmt.Sprintf("127.0.0.1:%d", p)))
		}
	}
	metrics := ""
	if metricsPort > 0 {
		metrics = fmt.Sprintf("[metrics]\nlisten = \"127.0.0.1:%d\"\n", metricsPort)
	}
	doc := fmt.Sprintf(`node_id = %d
profile = "storage-lan"
data_dir = %q
cluster_key_file = %q

[gossip]
bind_addr = "127.0.0.1"
port = %d
seeds = [%s]

[dlm]
listen_addr = "127.0.0.1:0"

[quorum]
data_nodes = [1, 2, 3]
m = 2

[fencing]
timeout = "5s"
[[fencing.level]]
[[fencing.level.agent]]
path = %q

[log]
level = "info"

[control]
socket = %q

[shutdown]
leave_timeout = "20s"
%s%s`, id, c.dataDir(id), c.key, c.gossip[id-1], strings.Join(seeds, ", "), c.agent, c.socket(id), metrics, extra)
	path := filepath.Join(c.dir, fmt.Sprintf("node%d.toml", id))
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// proc is one mdclusterd process.
type proc struct {
	id   int
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has been reaped
	err  error         // its exit, once done is closed
}

func startDaemon(t *testing.T, c *cluster, id int, cfgPath string) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{id: id, log: filepath.Join(c.dir, fmt.Sprintf("node%d.log", id)), done: make(chan struct{})}
	lf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(exe, "-c", cfgPath)
	p.cmd.Env = append(os.Environ(), daemonEnv+"=1")
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); lf.Close(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("node %d log (last 12000 bytes):\n%s", id, tail(b, 12000))
		}
	})
	return p
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// status asks node id's daemon, dialling anew each time (the daemon may
// not be listening yet).
func status(c *cluster, id int) (*ctl.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := ctl.Dial(ctx, c.socket(id))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	return cl.Status(ctx)
}

// eventually polls cond; the deadline only guards against a hang.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		ok, why := cond()
		if ok {
			return
		}
		last = why
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last: %s", what, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func members(s *ctl.Status) string { return fmt.Sprint(s.View.Members) }

func scrapeMetrics(port int) (string, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestThreeDaemons starts three mdclusterd processes from configuration
// files that name only seed addresses, waits until each reports a
// quorate three-member view, dumps their locks, then stops one with
// SIGTERM: it leaves gracefully and the other two show a two-member view,
// with no fencing anywhere.
func TestThreeDaemons(t *testing.T) {
	c := newCluster(t, 3)
	metricsPort := freePort(t, false)
	procs := map[int]*proc{}
	for id := 1; id <= 3; id++ {
		procs[id] = startDaemon(t, c, id, c.config(t, id, map[bool]int{true: metricsPort}[id == 1], ""))
	}
	for id := 1; id <= 3; id++ {
		eventually(t, fmt.Sprintf("node %d in a quorate, recovered 3-member view", id), func() (bool, string) {
			s, err := status(c, id)
			if err != nil {
				return false, err.Error()
			}
			ok := len(s.View.Members) == 3 && s.Quorum.Quorate && s.RecoveredGeneration == s.View.Generation && !s.LockManagerStopped &&
				s.Quorum.TotalVotes == 3 && s.Quorum.ExpectedVotes == 3 && s.Quorum.Quorum == 2
			return ok, fmt.Sprintf("view %d %s quorate=%v recovered=%d stopped=%v votes=%d", s.View.Generation, members(s),
				s.Quorum.Quorate, s.RecoveredGeneration, s.LockManagerStopped, s.Quorum.TotalVotes)
		})
	}
	// Every node's lock shows in its own dump, granted EX to it.
	for id := 1; id <= 3; id++ {
		eventually(t, fmt.Sprintf("node %d's lock in its dump", id), func() (bool, string) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			cl, err := ctl.Dial(ctx, c.socket(id))
			if err != nil {
				return false, err.Error()
			}
			defer cl.Close()
			l, err := cl.Locks(ctx, "test")
			if err != nil {
				return false, err.Error()
			}
			for _, r := range l.Lockspaces[0].Resources {
				if r.Name == fmt.Sprintf("node-%d", id) && len(r.Granted) == 1 && r.Granted[0].Node == uint32(id) && r.Granted[0].Mode == "EX" {
					var b strings.Builder
					_ = l.WriteText(&b)
					t.Logf("node %d lock dump:\n%s", id, b.String())
					return true, ""
				}
			}
			return false, fmt.Sprintf("%+v", l)
		})
	}
	before, err := status(c, 1)
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	_ = before.WriteText(&text)
	t.Logf("node 1 status:\n%s", text.String())
	body, err := scrapeMetrics(metricsPort)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"mdcluster_membership_members 3", "mdcluster_membership_alive 3", "mdcluster_membership_quorate 1",
		"mdcluster_quorum_data_nodes_present 3", `mdcluster_dlm_operations_total{op="request",result="ok"} 1`,
		"mdcluster_dlm_transport_connections_established_total"} {
		if !strings.Contains(body, want) {
			t.Errorf("node 1 metrics lack %q", want)
		}
	}

	// SIGTERM node 3: a graceful leave, exit status 0.
	if err := procs[3].cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-procs[3].done:
		if err := procs[3].err; err != nil {
			t.Fatalf("node 3 exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("node 3 did not exit after SIGTERM")
	}
	log3, _ := os.ReadFile(procs[3].log)
	if !bytes.Contains(log3, []byte("left the cluster gracefully")) {
		t.Errorf("node 3 did not log a graceful leave")
	}
	if _, err := os.Stat(c.socket(3)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("node 3 left its control socket: %v", err)
	}
	for id := 1; id <= 2; id++ {
		eventually(t, fmt.Sprintf("node %d in a quorate 2-member view", id), func() (bool, string) {
			s, err := status(c, id)
			if err != nil {
				return false, err.Error()
			}
			ok := members(s) == "[1 2]" && s.Quorum.Quorate && s.View.Generation > before.View.Generation &&
				s.RecoveredGeneration == s.View.Generation && !s.LockManagerStopped
			return ok, fmt.Sprintf("view %d %s quorate=%v", s.View.Generation, members(s), s.Quorum.Quorate)
		})
		s, err := status(c, id)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.Fencing) != 0 {
			t.Errorf("node %d fenced after a graceful leave: %+v", id, s.Fencing)
		}
		if s.Quorum.TotalVotes != 2 || s.Quorum.ExpectedVotes != 3 {
			t.Errorf("node %d votes %d of %d", id, s.Quorum.TotalVotes, s.Quorum.ExpectedVotes)
		}
	}
	eventually(t, "node 1's metrics at two members", func() (bool, string) {
		body, err := scrapeMetrics(metricsPort)
		if err != nil {
			return false, err.Error()
		}
		return strings.Contains(body, "mdcluster_membership_members 2") &&
			!strings.Contains(body, "mdcluster_fence_attempts_total"), "members gauge not 2 yet, or a fence attempt"
	})
}

// TestCheckConfig: --check-config exits 0 for a valid file and 1 with the
// exact file:line:field message for a bad one; neither creates anything,
// and neither does a start refused for a bad file.
func TestCheckConfig(t *testing.T) {
	c := newCluster(t, 3)
	good := c.config(t, 1, 0, "")
	var out, errOut bytes.Buffer
	if code := run([]string{"--check-config", "-c", good}, &out, &errOut); code != 0 {
		t.Fatalf("valid file: exit %d\n%s", code, errOut.String())
	}
	if want := "mdclusterd: " + good + ": configuration is valid (node 1, storage-lan, quorum 2 of 3 data nodes [1 2 3])\n"; out.String() != want {
		t.Errorf("stdout %q, want %q", out.String(), want)
	}
	bad := strings.Replace(mustRead(t, good), "m = 2", "m = 1", 1)
	badPath := filepath.Join(c.dir, "bad.toml")
	if err := os.WriteFile(badPath, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	line := 1 + strings.Count(bad[:strings.Index(bad, "m = 1")], "\n")
	for _, args := range [][]string{{"--check-config", "-c", badPath}, {"-config", badPath}} {
		out.Reset()
		errOut.Reset()
		if code := run(args, &out, &errOut); code != 1 {
			t.Errorf("%v: exit %d", args, code)
		}
		want := fmt.Sprintf("mdclusterd: %s:%d: quorum.m: 1 of 3 data nodes is not a majority (need at least 2)\n", badPath, line)
		if errOut.String() != want {
			t.Errorf("%v:\n got %q\nwant %q", args, errOut.String(), want)
		}
	}
	for _, p := range []string{filepath.Dir(c.socket(1)), c.dataDir(1)} {
		if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s was created: %v", p, err)
		}
	}
	if code := run([]string{"-c", good, "extra"}, &out, &errOut); code != 2 {
		t.Errorf("extra argument: exit %d", code)
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
