package node

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
)

// The tests in this file run a real cluster: every node is its own OS
// process (this test binary, re-executed with NODE_TEST_CHILD set), on
// 127.0.0.1, with the fast storage-LAN profile. A node is killed with
// SIGKILL, so nothing of it survives: no leave, no unlock, no FIN before
// the kernel closes its sockets.
//
// The child speaks a line protocol: it prints "dlm <addr>", reads
// "peers id=addr,... pids id=pid,...", starts its Node, prints
// "gossip <addr>", then runs commands read from stdin until stdin closes.
// Membership events are printed as "event <kind> <gen> <nodes> <quorate>
// <unix ns> <err>" at the moment they happen.

const (
	childEnv    = "NODE_TEST_CHILD"
	childDirEnv = "NODE_TEST_CHILD_DIR"
)

// TestNodeChild is not a test: it is one node of the process tests.
func TestNodeChild(t *testing.T) {
	id := os.Getenv(childEnv)
	if id == "" {
		t.Skip("only runs as a child of the process tests")
	}
	n, err := strconv.ParseUint(id, 10, 32)
	if err != nil {
		fmt.Println("error: bad node ID", id)
		os.Exit(1)
	}
	if err := runChild(NodeID(n), os.Getenv(childDirEnv)); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// out serialises the child's stdout lines.
type out struct {
	mu sync.Mutex
	w  io.Writer
}

func (o *out) printf(format string, a ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, format+"\n", a...)
}

// pidFencer is the children's fencer: it confirms a fence only once the
// victim's process is gone (a signal 0 probe fails with ESRCH). The parent
// kills and reaps the victim; in production a ClusterLabs agent powers the
// node off and confirms it.
type pidFencer struct{ pids map[NodeID]int }

func (f pidFencer) Fence(ctx context.Context, req fence.Request) (fence.Result, error) {
	pid, ok := f.pids[req.Node]
	if !ok {
		return fence.Result{}, fmt.Errorf("pid fencer: no process known for node %s: %w", req.Node, fence.ErrFailed)
	}
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return fence.Result{Node: req.Node, Method: "pid-gone", FencedAt: time.Now(), Verified: true}, nil
		}
		select {
		case <-ctx.Done():
			return fence.Result{}, fmt.Errorf("pid fencer: process %d of node %s still exists: %w (%w)", pid, req.Node, fence.ErrTimeout, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func parseMap(s string) (map[NodeID]string, error) {
	m := map[NodeID]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		id, err := strconv.ParseUint(k, 10, 32)
		if !ok || err != nil {
			return nil, fmt.Errorf("bad entry %q", kv)
		}
		m[NodeID(id)] = v
	}
	return m, nil
}

func idList(ids []NodeID) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = id.String()
	}
	return strings.Join(s, ",")
}

func runChild(id NodeID, dir string) error {
	o := &out{w: os.Stdout}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	o.printf("dlm %s", ln.Addr())
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() {
		return errors.New("stdin closed before the peer list")
	}
	f := strings.Fields(in.Text())
	if len(f) != 4 || f[0] != "peers" || f[2] != "pids" {
		return fmt.Errorf("bad peer line %q", in.Text())
	}
	addrs, err := parseMap(f[1])
	if err != nil {
		return err
	}
	pidStr, err := parseMap(f[3])
	if err != nil {
		return err
	}
	pids := map[NodeID]int{}
	for k, v := range pidStr {
		pids[k], _ = strconv.Atoi(v)
	}
	all := slices.Sorted(func(yield func(NodeID) bool) {
		for k := range addrs {
			if !yield(k) {
				return
			}
		}
	})
	cfg := StorageLANConfig()
	cfg.ID, cfg.ClusterKey, cfg.DataDir, cfg.DLMListener = id, testKey, dir, ln
	cfg.Quorum = ddraid.Config{DataNodes: all, Quorum: len(all)/2 + 1}
	cfg.Fencer = pidFencer{pids}
	cfg.FenceTimeout = 5 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg.Peers = map[NodeID]string{}
	for k, v := range addrs {
		if k != id {
			cfg.Peers[k] = v
		}
	}
	cfg.OnEvent = func(e Event) {
		es := "-"
		if e.Err != nil {
			es = strconv.Quote(e.Err.Error())
		}
		o.printf("event %s %d %s %v %d %s", e.Kind, e.Gen, idList(e.Nodes), e.Quorate, e.Time.UnixNano(), es)
	}
	n, err := New(cfg)
	if err != nil {
		return err
	}
	defer n.Close()
	ls, err := n.Open("md0", dlm.OpenOptions{})
	if err != nil {
		return err
	}
	o.printf("gossip %s", n.GossipAddr())

	held := map[string]*dlm.Lock{}
	var hmu sync.Mutex
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "join":
			if err := n.Join(f[1:]); err != nil {
				o.printf("error: %v", err)
			}
		case "waitview":
			want := f[1]
			deadline := time.Now().Add(20 * time.Second)
			for {
				st := n.Status()
				if idList(st.View.Members) == want && st.Quorate && st.Recovered == st.View.Gen {
					o.printf("view %d", st.View.Gen)
					break
				}
				if time.Now().After(deadline) {
					o.printf("error: no view %s: %+v", want, st)
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
		case "lock": // lock <res> <NL|EX>: hold it
			mode := dlm.EX
			if f[2] == "NL" {
				mode = dlm.NL
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			lk, err := ls.Lock(ctx, f[1], mode, 0)
			cancel()
			if err != nil {
				o.printf("error: lock %s: %v", f[1], err)
				continue
			}
			hmu.Lock()
			held[f[1]] = lk
			hmu.Unlock()
			o.printf("locked %s", f[1])
		case "wait": // wait <res>...: request EX, report the grant, hold briefly, unlock
			for _, res := range f[1:] {
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					lk, err := ls.Lock(ctx, res, dlm.EX, 0)
					if err != nil {
						o.printf("error: wait %s: %v", res, err)
						return
					}
					o.printf("granted %s %d %d", res, time.Now().UnixNano(), n.DLM().Controller().Generation())
					time.Sleep(10 * time.Millisecond)
					if err := lk.Unlock(ctx, 0); err != nil {
						o.printf("error: unlock %s: %v", res, err)
					}
				}()
			}
			o.printf("waiting")
		case "noqueue": // noqueue <res>: an EX request under NOQUEUE, reported as "noqueue <res> again|granted"
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			lk, err := ls.Lock(ctx, f[1], dlm.EX, dlm.NoQueue)
			cancel()
			switch {
			case errors.Is(err, dlm.ErrAgain):
				o.printf("noqueue %s again", f[1])
			case err != nil:
				o.printf("error: noqueue %s: %v", f[1], err)
			default:
				o.printf("noqueue %s granted", f[1])
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				if err := lk.Unlock(ctx, 0); err != nil {
					o.printf("error: unlock %s: %v", f[1], err)
				}
				cancel()
			}
		case "try": // try <res> <timeout>: a request that must not be granted
			d, _ := time.ParseDuration(f[2])
			ctx, cancel := context.WithTimeout(context.Background(), d)
			start := time.Now()
			_, err := ls.Lock(ctx, f[1], dlm.EX, 0)
			cancel()
			res := "granted"
			if errors.Is(err, dlm.ErrTimeout) {
				res = "timeout"
			} else if err != nil {
				res = strconv.Quote(err.Error())
			}
			o.printf("try %s %s %d", f[1], res, time.Since(start).Milliseconds())
		case "mode":
			hmu.Lock()
			lk := held[f[1]]
			hmu.Unlock()
			if lk == nil {
				o.printf("mode %s none", f[1])
			} else {
				o.printf("mode %s %v", f[1], lk.Mode())
			}
		default:
			o.printf("error: unknown command %q", f[0])
		}
	}
	return nil
}

// ---- parent side ----

type childEvent struct {
	kind    string
	gen     uint64
	nodes   []NodeID
	quorate bool
	at      time.Time
	err     string
}

type child struct {
	t      *testing.T
	id     NodeID
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *syncBuffer

	mu     sync.Mutex
	events []childEvent
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (c *child) send(format string, a ...any) {
	c.t.Helper()
	if _, err := fmt.Fprintf(c.stdin, format+"\n", a...); err != nil {
		c.t.Fatalf("node %d: writing to the child: %v", c.id, err)
	}
}

// expectNext returns the next line (other than events), whatever it is;
// an "error:" line or the guard ends the test.
func (c *child) expectNext(limit time.Duration) string {
	c.t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			c.t.Fatalf("node %d exited", c.id)
		}
		if strings.HasPrefix(l, "error:") {
			c.t.Fatalf("node %d: %s", c.id, l)
		}
		return l
	case <-time.After(limit):
		c.t.Fatalf("node %d: no line within %v", c.id, limit)
	}
	return ""
}

// expect returns the next line (other than events) starting with prefix;
// an "error:" line or the guard ends the test.
func (c *child) expect(prefix string, limit time.Duration) string {
	c.t.Helper()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				c.t.Fatalf("node %d exited while waiting for %q", c.id, prefix)
			}
			if strings.HasPrefix(l, "error:") {
				c.t.Fatalf("node %d: %s", c.id, l)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
			c.t.Logf("node %d: unexpected line %q while waiting for %q", c.id, l, prefix)
		case <-timer.C:
			c.t.Fatalf("node %d: no %q within %v", c.id, prefix, limit)
		}
	}
}

func (c *child) eventsSince(t0 time.Time, kind string) []childEvent {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []childEvent
	for _, e := range c.events {
		if e.kind == kind && !e.at.Before(t0) {
			out = append(out, e)
		}
	}
	return out
}

func parseEvent(f []string) (childEvent, error) {
	if len(f) != 7 {
		return childEvent{}, fmt.Errorf("event with %d fields", len(f))
	}
	e := childEvent{kind: f[1], quorate: f[4] == "true", err: f[6]}
	e.gen, _ = strconv.ParseUint(f[2], 10, 64)
	if f[3] != "" {
		for _, s := range strings.Split(f[3], ",") {
			if s == "" {
				continue
			}
			id, err := strconv.ParseUint(s, 10, 32)
			if err != nil {
				return e, err
			}
			e.nodes = append(e.nodes, NodeID(id))
		}
	}
	ns, err := strconv.ParseInt(f[5], 10, 64)
	if err != nil {
		return e, err
	}
	e.at = time.Unix(0, ns)
	return e, nil
}

// startProcessCluster starts n nodes as child processes, forms the view
// of all of them and returns the children by node ID.
func startProcessCluster(t *testing.T, n int) map[NodeID]*child {
	t.Helper()
	kids := map[NodeID]*child{}
	var ids []NodeID
	for i := 1; i <= n; i++ {
		id := NodeID(i)
		ids = append(ids, id)
		cmd := exec.Command(os.Args[0], "-test.run=^TestNodeChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), childEnv+"="+id.String(), childDirEnv+"="+t.TempDir())
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		c := &child{t: t, id: id, cmd: cmd, stdin: stdin, lines: make(chan string, 1024), stderr: &syncBuffer{}}
		cmd.Stderr = c.stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				l := sc.Text()
				if f := strings.Split(l, " "); f[0] == "event" {
					e, err := parseEvent(f)
					if err != nil {
						c.lines <- fmt.Sprintf("error: bad event line %q: %v", l, err)
						continue
					}
					c.mu.Lock()
					c.events = append(c.events, e)
					c.mu.Unlock()
					continue
				}
				c.lines <- l
			}
			close(c.lines)
		}()
		kids[id] = c
		t.Cleanup(func() {
			stdin.Close()
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
			if t.Failed() || os.Getenv("NODE_TEST_LOG") != "" {
				t.Logf("---- node %d log ----\n%s", id, c.stderr.String())
			}
		})
	}
	var peers, pids []string
	for _, id := range ids {
		addr := strings.TrimPrefix(kids[id].expect("dlm ", 20*time.Second), "dlm ")
		peers = append(peers, id.String()+"="+addr)
		pids = append(pids, fmt.Sprintf("%s=%d", id, kids[id].cmd.Process.Pid))
	}
	gossipAddr := map[NodeID]string{}
	for _, id := range ids {
		kids[id].send("peers %s pids %s", strings.Join(peers, ","), strings.Join(pids, ","))
	}
	for _, id := range ids {
		gossipAddr[id] = strings.TrimPrefix(kids[id].expect("gossip ", 20*time.Second), "gossip ")
	}
	for _, id := range ids[1:] {
		kids[id].send("join %s", gossipAddr[ids[0]])
	}
	var gen string
	for _, id := range ids {
		kids[id].send("waitview %s", idList(ids))
	}
	for _, id := range ids {
		g := strings.TrimPrefix(kids[id].expect("view ", 25*time.Second), "view ")
		if gen != "" && g != gen {
			t.Fatalf("node %d formed view %s, another node %s", id, g, gen)
		}
		gen = g
	}
	return kids
}

// kill sends SIGKILL and reaps the process (so that it is really gone:
// a zombie would still answer the fencer's probe).
func (c *child) kill() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	_ = c.cmd.Wait()
}

// TestKillNodeHoldingLocks is the failover test: the victim holds EX locks
// on three resources, one mastered on each node; the two survivors wait for
// them; the victim is killed with SIGKILL. The survivors must detect the
// death, agree on a view without the victim, fence it (the fencer confirms
// once its process is gone), recover the lock state and grant every
// waiting request. The time from the kill to the first grant is reported,
// split into detection and recovery. Only a generous guard is asserted.
// Two cases: the victim is an ordinary member (node 3), or the coordinator
// of the view changes (node 1, the lowest ID), so that a new coordinator
// must take over.
func TestKillNodeHoldingLocks(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three node processes")
	}
	for _, victim := range []NodeID{3, 1} {
		t.Run(fmt.Sprintf("victim=%d", victim), func(t *testing.T) { killNodeHoldingLocks(t, victim) })
	}
}

func killNodeHoldingLocks(t *testing.T, victimID NodeID) {
	kids := startProcessCluster(t, 3)
	victim := kids[victimID]
	var survivors []NodeID
	for _, id := range []NodeID{1, 2, 3} {
		if id != victimID {
			survivors = append(survivors, id)
		}
	}
	// First users become masters: "m<id>" is mastered on node id (the NL
	// locks of the survivors keep theirs there).
	var resources []string
	for _, id := range []NodeID{1, 2, 3} {
		r := "m" + id.String()
		resources = append(resources, r)
		if id != victimID {
			kids[id].send("lock %s NL", r)
			kids[id].expect("locked "+r, 10*time.Second)
		}
	}
	for _, r := range resources {
		victim.send("lock %s EX", r)
		victim.expect("locked "+r, 10*time.Second)
	}
	// While the victim holds them, the survivors are refused (a request
	// that would wait is refused under NOQUEUE, deterministically), and
	// their real requests queue.
	for _, id := range survivors {
		for _, r := range resources {
			kids[id].send("noqueue %s", r)
			if l := kids[id].expectNext(10 * time.Second); l != "noqueue "+r+" again" {
				t.Fatalf("node %d while node %d holds %s: %q, want it refused", id, victimID, r, l)
			}
		}
		kids[id].send("wait %s", strings.Join(resources, " "))
		if l := kids[id].expectNext(10 * time.Second); l != "waiting" {
			t.Fatalf("node %d: %q, want \"waiting\"", id, l)
		}
	}

	t0 := time.Now()
	victim.kill()

	// Every waiting request (3 resources × 2 survivors) must be granted.
	var first time.Time
	var firstRes string
	var firstBy NodeID
	for _, id := range survivors {
		for range resources {
			f := strings.Fields(kids[id].expect("granted ", 20*time.Second))
			ns, _ := strconv.ParseInt(f[2], 10, 64)
			at := time.Unix(0, ns)
			if at.Before(t0) {
				t.Fatalf("node %d was granted %s at %v, before node %d was killed", id, f[1], at, victimID)
			}
			if first.IsZero() || at.Before(first) {
				first, firstRes, firstBy = at, f[1], id
			}
		}
	}

	// Detection: the first survivor whose failure detector dropped the
	// victim.
	var dead, stop, fenced, installed time.Time
	var fenceOK bool
	for _, id := range survivors {
		for _, e := range kids[id].eventsSince(t0, "alive") {
			if !slices.Contains(e.nodes, victimID) && (dead.IsZero() || e.at.Before(dead)) {
				dead = e.at
			}
		}
		for _, e := range kids[id].eventsSince(t0, "stop") {
			if stop.IsZero() || e.at.Before(stop) {
				stop = e.at
			}
		}
		for _, e := range kids[id].eventsSince(t0, "fence") {
			if slices.Equal(e.nodes, []NodeID{victimID}) && e.err == "-" {
				fenceOK, fenced = true, e.at
			}
		}
		for _, e := range kids[id].eventsSince(t0, "install") {
			if !slices.Contains(e.nodes, victimID) && (installed.IsZero() || e.at.Before(installed)) {
				installed = e.at
			}
		}
	}
	if dead.IsZero() || stop.IsZero() || installed.IsZero() {
		t.Fatalf("missing events: dead %v, view change %v, install %v", dead, stop, installed)
	}
	if !fenceOK {
		t.Fatalf("node %d's locks were granted but no survivor reports having fenced it", victimID)
	}
	if first.Before(fenced) {
		t.Fatalf("a lock was granted at %v, before node %d was confirmed fenced at %v", first, victimID, fenced)
	}
	ms := func(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d.Microseconds())/1000) }
	t.Logf("kill node %d → declared dead %s (detection); → view change started %s; → fenced %s; → view installed %s; → first grant (%s on node %d) %s (recovery after detection %s); total %s",
		victimID, ms(dead.Sub(t0)), ms(stop.Sub(t0)), ms(fenced.Sub(t0)), ms(installed.Sub(t0)), firstRes, firstBy, ms(first.Sub(t0)),
		ms(first.Sub(dead)), ms(first.Sub(t0)))
}

// TestQuorumLossStopsGranting kills two of three data nodes (m = 2): the
// survivor must announce that it lost quorum, stop granting (a new request
// times out) and leave the lock it holds as it is.
func TestQuorumLossStopsGranting(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three node processes")
	}
	kids := startProcessCluster(t, 3)
	s := kids[3]
	s.send("lock held EX")
	s.expect("locked held", 10*time.Second)

	t0 := time.Now()
	kids[1].kill()
	kids[2].kill()

	var lost time.Time
	eventually(t, 20*time.Second, func() bool {
		for _, e := range s.eventsSince(t0, "quorum") {
			if !e.quorate {
				lost = e.at
			}
		}
		return !lost.IsZero()
	}, "node 3 to report losing quorum")
	s.send("try fresh 1s")
	if l := s.expect("try fresh", 10*time.Second); !strings.Contains(l, " timeout ") {
		t.Fatalf("a lock request without quorum: %q, want a timeout", l)
	}
	s.send("mode held")
	if l := s.expect("mode held", 10*time.Second); l != "mode held EX" {
		t.Fatalf("the lock held before quorum was lost: %q, want EX", l)
	}
	if log := s.stderr.String(); !strings.Contains(log, "lost quorum: 1 of 3 data nodes alive (need 2 of 3 data nodes)") {
		t.Fatalf("node 3 did not log the loss of quorum; its log:\n%s", log)
	}
	t.Logf("kill of nodes 1 and 2 → node 3 lost quorum and stopped granting: %.0f ms", float64(lost.Sub(t0).Microseconds())/1000)
}
