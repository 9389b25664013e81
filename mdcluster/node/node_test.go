package node

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

var testKey = []byte("node package test cluster key!!!")

// testLogger logs to the test at warn level (debug with NODE_TEST_LOG=1).
func testLogger(t testing.TB) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("NODE_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	w := &tWriter{t: t}
	// Registered before the nodes' own cleanups, so it runs after them.
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// tWriter writes log lines to the test until the test's cleanup: memberlist
// does not wait for a probe in flight when it shuts down, and that probe may
// still log, which must not reach a finished test (testing panics, and the
// race detector objects).
type tWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *tWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

func TestConfigValidate(t *testing.T) {
	c := StorageLANConfig()
	err := c.validate()
	if err == nil {
		t.Fatal("an empty configuration was accepted")
	}
	for _, want := range []string{"ID is not set", "quorum", "cluster key", "DataDir", "Fencer", "DLMListenAddr"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	c.ID, c.Quorum, c.ClusterKey, c.DataDir, c.Fencer = 1, ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}, testKey, t.TempDir(), &fence.TestFencer{}
	c.DLMListenAddr = "0.0.0.0:7410"
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	c.Peers = map[NodeID]string{1: "10.0.0.1:7410"}
	if err := c.validate(); err == nil || !strings.Contains(err.Error(), "peer ID 1") {
		t.Fatalf("self as a peer: %v", err)
	}
	c.Peers = map[NodeID]string{2: "x"}
	if err := c.validate(); err == nil || !strings.Contains(err.Error(), `peer 2: DLM address "x"`) {
		t.Fatalf("a peer address without a port: %v", err)
	}
	c.Peers = nil
	for _, bad := range []string{"0.0.0.0:7410", "10.0.0.1", "10.0.0.1:0"} {
		c.DLMAdvertiseAddr = bad
		if err := c.validate(); err == nil || !strings.Contains(err.Error(), "DLMAdvertiseAddr") {
			t.Fatalf("DLMAdvertiseAddr %q: %v", bad, err)
		}
	}
	lan, fast := DefaultLANConfig(), StorageLANConfig()
	if lan.Profile == fast.Profile || fast.Tick >= lan.Tick {
		t.Fatalf("profiles do not differ: lan %+v fast %+v", lan, fast)
	}
}

func TestStorePersistsHardStateAndIdentity(t *testing.T) {
	dir := t.TempDir()
	lg := testLogger(t)
	s, err := OpenStore(dir, 2, lg)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.LoadHardState(); err != nil || ok {
		t.Fatalf("fresh store: ok %v err %v", ok, err)
	}
	hs := membership.HardState{Promised: 7, PromisedTo: 1,
		Installed: membership.Proposal{Gen: 7, Members: []NodeID{1, 2, 3}, Prev: membership.View{Gen: 3, Members: []NodeID{1, 2}}}}
	if err := s.SaveHardState(hs); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenStore(dir, 3, lg); err == nil || !strings.Contains(err.Error(), "belongs to node 2") {
		t.Fatalf("opening node 2's store as node 3: %v", err)
	}
	s, err = OpenStore(dir, 2, lg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, ok, err := s.LoadHardState()
	if err != nil || !ok {
		t.Fatalf("reopened store: ok %v err %v", ok, err)
	}
	if got.Promised != 7 || got.PromisedTo != 1 || !got.Installed.View().Equal(hs.Installed.View()) || !got.Installed.Prev.Equal(hs.Installed.Prev) {
		t.Fatalf("reloaded %+v, saved %+v", got, hs)
	}
}

// cluster is a set of in-process nodes on 127.0.0.1.
type cluster struct {
	t      *testing.T
	q      ddraid.Config
	fencer *fence.TestFencer
	dirs   map[NodeID]string
	addrs  map[NodeID]string
	nodes  map[NodeID]*Node
	log    *slog.Logger
	// gossipOnly nodes start without a DLM peer list: they learn every
	// address from gossip metadata.
	gossipOnly map[NodeID]bool

	mu     sync.Mutex
	events []Event
}

func newCluster(t *testing.T, ids ...NodeID) *cluster {
	return newClusterWith(t, false, ids...)
}

// newClusterWith starts the data nodes ids; with gossipOnly none of them
// is given a DLM peer list.
func newClusterWith(t *testing.T, gossipOnly bool, ids ...NodeID) *cluster {
	c := &cluster{t: t, q: ddraid.Config{DataNodes: ids, Quorum: len(ids)/2 + 1}, fencer: &fence.TestFencer{},
		dirs: map[NodeID]string{}, addrs: map[NodeID]string{}, nodes: map[NodeID]*Node{}, log: testLogger(t),
		gossipOnly: map[NodeID]bool{}}
	for _, id := range ids {
		c.gossipOnly[id] = gossipOnly
	}
	lns := map[NodeID]net.Listener{}
	for _, id := range ids {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[id], c.addrs[id], c.dirs[id] = ln, ln.Addr().String(), t.TempDir()
	}
	var seed string
	for _, id := range ids {
		c.start(id, lns[id], seed, 0)
		if seed == "" {
			seed = c.nodes[id].GossipAddr()
		}
	}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.Close()
		}
	})
	return c
}

// crash stops a node's agreement, gossip and DLM transport without
// releasing its locks or leaving: to the others it is a crashed process.
func (c *cluster) crash(id NodeID) {
	n := c.nodes[id]
	n.cancel()
	<-n.runDone
	n.det.Shutdown()
	n.dlm.Controller().Transport().Close()
}

func (c *cluster) start(id NodeID, ln net.Listener, seed string, gossipPort int) {
	cfg := StorageLANConfig()
	cfg.ID, cfg.Quorum, cfg.ClusterKey, cfg.DataDir, cfg.Fencer = id, c.q, testKey, c.dirs[id], c.fencer
	cfg.DLMListener, cfg.Logger, cfg.GossipPort = ln, c.log, gossipPort
	cfg.FenceTimeout = 5 * time.Second
	if !c.gossipOnly[id] {
		cfg.Peers = map[NodeID]string{}
		for o, a := range c.addrs {
			if o != id {
				cfg.Peers[o] = a
			}
		}
	}
	if seed != "" {
		cfg.Seeds = []string{seed}
	}
	cfg.OnEvent = func(e Event) {
		c.mu.Lock()
		c.events = append(c.events, e)
		c.mu.Unlock()
	}
	n, err := New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	c.nodes[id] = n
}

// waitView waits until every given node has installed and recovered a view
// of exactly members.
func (c *cluster) waitView(limit time.Duration, members []NodeID) uint64 {
	c.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		var gen uint64
		ok := true
		for _, id := range members {
			st := c.nodes[id].Status()
			if !slices.Equal(st.View.Members, members) || !st.Quorate || st.Stopped || st.Recovered != st.View.Gen || (gen != 0 && gen != st.View.Gen) {
				ok = false
				break
			}
			gen = st.View.Gen
		}
		if ok {
			return gen
		}
		if time.Now().After(deadline) {
			for _, id := range members {
				c.t.Logf("node %d: %+v", id, c.nodes[id].Status())
			}
			c.t.Fatalf("no recovered view %v after %v", members, limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestClusterFailover runs three in-process nodes: a lock held by a node
// that crashes is granted to a waiting survivor only after the crashed node
// was fenced and the survivors installed a view without it.
func TestClusterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newCluster(t, 1, 2, 3)
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	spaces := map[NodeID]*dlm.Lockspace{}
	for id, n := range c.nodes {
		ls, err := n.Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	blocked := make(chan struct{}, 1)
	if _, err := spaces[3].Acquire(ctx, dlm.LockRequest{Resource: "bitmap0003", Mode: dlm.EX,
		OnBlock: func(*dlm.Lock, dlm.Mode) {
			select {
			case blocked <- struct{}{}:
			default:
			}
		}}); err != nil {
		t.Fatal(err)
	}
	if _, err := spaces[1].Lock(ctx, "bitmap0003", dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("EX while node 3 holds EX: %v", err)
	}
	var crashed atomic.Bool
	granted := make(chan error, 1)
	go func() {
		_, err := spaces[1].Lock(ctx, "bitmap0003", dlm.EX, 0)
		if err == nil && !crashed.Load() {
			err = errors.New("granted while node 3 holds it")
		}
		granted <- err
	}()
	// Node 3's blocking callback says node 1's request waits behind it.
	select {
	case <-blocked:
	case <-ctx.Done():
		t.Fatal("node 1's request never blocked node 3's lock")
	}
	crashed.Store(true)
	c.crash(3)
	if err := <-granted; err != nil {
		t.Fatal(err)
	}
	calls := c.fencer.Calls()
	if len(calls) == 0 || calls[0].Node != 3 || calls[0].Generation <= gen {
		t.Fatalf("fence calls %+v, want node 3 for a view after %d", calls, gen)
	}
	st := c.nodes[1].Status()
	if slices.Contains(st.View.Members, 3) || st.View.Gen <= gen {
		t.Fatalf("node 1 granted in view %+v", st.View)
	}
}

// TestRestartRejoinsClean restarts a node on its data directory: it loads
// its persisted view, is readmitted as rejoined (its old locks recovered by
// the others) and installs with Reset.
func TestRestartRejoinsClean(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newCluster(t, 1, 2, 3)
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	ls, err := c.nodes[2].Open("md0", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []NodeID{1, 3} {
		if _, err := c.nodes[id].Open("md0", dlm.OpenOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := ls.Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	addr := c.nodes[2].DLMAddr().String()
	_, port, _ := net.SplitHostPort(c.nodes[2].GossipAddr())
	gossipPort, _ := strconv.Atoi(port)
	c.nodes[2].Close()
	// Restart at once, before the others notice: the node comes back with
	// its persisted view and must be readmitted clean, not fenced.
	var ln net.Listener
	eventually(t, 5*time.Second, func() bool {
		ln, err = net.Listen("tcp", addr)
		return err == nil
	}, "the old DLM address to be free again")
	c.start(2, ln, c.nodes[1].GossipAddr(), gossipPort)
	for _, id := range []NodeID{1, 2, 3} {
		if _, err := c.nodes[id].Open("md0", dlm.OpenOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	gen2 := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	if gen2 <= gen {
		t.Fatalf("view gen %d after restart, was %d", gen2, gen)
	}
	// The old incarnation's EX lock is gone: node 1 gets it.
	ls1, _ := c.nodes[1].Open("md0", dlm.OpenOptions{})
	if _, err := ls1.Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
}

// TestRestartOpensLockspaceLate: a restarted node is readmitted before it
// opens the lockspace again (as the daemon attaches an array only once the
// node is up). The others' recovery of the lockspace waits for it; once it
// opens the lockspace, that lockspace joins the view's recovery and every
// node reports the view recovered, the restarted node included (its
// lockspace counts only once it has recovered).
func TestRestartOpensLockspaceLate(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newCluster(t, 1, 2, 3)
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	spaces := map[NodeID]*dlm.Lockspace{}
	for _, id := range []NodeID{1, 2, 3} {
		ls, err := c.nodes[id].Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := spaces[1].Lock(ctx, "held-by-1", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := spaces[2].Lock(ctx, "held-by-2", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	addr := c.nodes[2].DLMAddr().String()
	_, port, _ := net.SplitHostPort(c.nodes[2].GossipAddr())
	gossipPort, _ := strconv.Atoi(port)
	c.nodes[2].Close()
	var ln net.Listener
	var err error
	eventually(t, 5*time.Second, func() bool {
		ln, err = net.Listen("tcp", addr)
		return err == nil
	}, "the old DLM address to be free again")
	c.start(2, ln, c.nodes[1].GossipAddr(), gossipPort)
	// Node 2 is readmitted and, with no lockspace, recovered at once; the
	// others wait for its part of md0's recovery.
	var gen2 uint64
	eventually(t, 20*time.Second, func() bool {
		st := c.nodes[2].Status()
		gen2 = st.View.Gen
		return gen2 > gen && len(st.View.Members) == 3 && st.Recovered == gen2 && !st.Stopped
	}, "node 2 to be readmitted")
	if st := c.nodes[1].Status(); st.View.Gen == gen2 && st.Recovered == gen2 {
		t.Fatalf("node 1 recovered view %d without node 2's part of md0: %+v", gen2, st)
	}
	ls2, err := c.nodes[2].Open("md0", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.waitView(20*time.Second, []NodeID{1, 2, 3}); got < gen2 {
		t.Fatalf("view %d after the late open, node 2 was readmitted in %d", got, gen2)
	}
	if _, err := ls2.Lock(ctx, "held-by-1", dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("node 2 does not see node 1's lock: %v", err)
	}
	// The old incarnation's lock is gone (released as it closed, or
	// purged); the new incarnation locks and conflicts.
	lk, err := spaces[3].Lock(ctx, "held-by-2", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls2.Lock(ctx, "held-by-2", dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("node 2 does not see node 3's lock: %v", err)
	}
	if err := lk.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := ls2.Lock(ctx, "held-by-2", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
}

// TestBriefQuorumLossResumesGranting: node 3's failure detector briefly
// reports it alone (injected into the node's detector callback; nodes 1 and
// 2 keep seeing everyone, so nobody is fenced). Node 3 loses quorum and
// stops its lock manager; when its detector sees the others again the
// view's members are unchanged, and yet node 3 must grant again: the
// agreement installs a new view with the same members, recovered by all
// three nodes together.
func TestBriefQuorumLossResumesGranting(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newCluster(t, 1, 2, 3)
	all := []NodeID{1, 2, 3}
	gen := c.waitView(20*time.Second, all)
	spaces := map[NodeID]*dlm.Lockspace{}
	for _, id := range all {
		ls, err := c.nodes[id].Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := spaces[3].Lock(ctx, "before", dlm.EX, 0); err != nil {
		t.Fatalf("node 3 before the quorum loss: %v", err)
	}

	n3 := c.nodes[3]
	n3.aliveChanged([]NodeID{3})
	eventually(t, 20*time.Second, func() bool {
		st := n3.Status()
		return !st.Quorate && st.Stopped
	}, "node 3 to lose quorum and stop")
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err := spaces[3].Lock(short, "during", dlm.EX, 0)
	cancelShort()
	if !errors.Is(err, dlm.ErrTimeout) {
		t.Fatalf("node 3 without quorum: lock request ended with %v, want it to wait (ErrTimeout)", err)
	}

	n3.aliveChanged(n3.det.Alive()) // the detector sees everyone again
	if _, err := spaces[3].Lock(ctx, "after", dlm.EX, 0); err != nil {
		for _, id := range all {
			t.Logf("node %d: %+v", id, c.nodes[id].Status())
		}
		t.Fatalf("node 3 after quorum came back: %v", err)
	}
	gen2 := c.waitView(20*time.Second, all)
	if gen2 <= gen {
		t.Fatalf("view gen %d after the quorum loss, was %d: node 3 resumed without a new view", gen2, gen)
	}
	if calls := c.fencer.Calls(); len(calls) != 0 {
		t.Fatalf("fence calls %+v; nobody failed", calls)
	}
	for _, id := range []NodeID{1, 2} {
		if _, err := spaces[id].Lock(ctx, "others", dlm.PR, 0); err != nil {
			t.Fatalf("node %d after the new view: %v", id, err)
		}
	}
}

// eventually polls cond until it holds, failing the test with msg if
// timeout passes first. The timeout is a generous guard against hangs, not
// a timing assertion: nothing in these tests sleeps and then asserts.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
