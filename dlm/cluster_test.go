package dlm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/dlm/transport"
)

var testKey = []byte("mdcluster-test-cluster-key-0123456789")

// cluster starts n nodes on loopback TCP, all members of one cluster.
type cluster struct {
	nodes []*dlm.Node
	addrs map[dlm.NodeID]string
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func startCluster(tb testing.TB, n int, logger *slog.Logger) *cluster {
	tb.Helper()
	return startClusterWith(tb, n, logger, nil)
}

// startClusterWith is startCluster with each node's configuration passed
// through tweak (when not nil) before the node starts.
func startClusterWith(tb testing.TB, n int, logger *slog.Logger, tweak func(*dlm.Config)) *cluster {
	tb.Helper()
	c := &cluster{addrs: map[dlm.NodeID]string{}}
	lns := map[dlm.NodeID]net.Listener{}
	for i := 1; i <= n; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		lns[dlm.NodeID(i)] = ln
		c.addrs[dlm.NodeID(i)] = ln.Addr().String()
	}
	for i := 1; i <= n; i++ {
		id := dlm.NodeID(i)
		peers := map[dlm.NodeID]string{}
		for p, a := range c.addrs {
			if p != id {
				peers[p] = a
			}
		}
		if logger == nil {
			logger = quietLogger()
		}
		cfg := dlm.Config{ID: id, Peers: peers, Listener: lns[id], ClusterKey: testKey, Logger: logger}
		if tweak != nil {
			tweak(&cfg)
		}
		node, err := dlm.NewNode(cfg)
		if err != nil {
			tb.Fatal(err)
		}
		c.nodes = append(c.nodes, node)
		closeOnCleanup(tb, node)
	}
	return c
}

// open opens the lockspace on every node, returning one handle per node.
func (c *cluster) open(tb testing.TB, name string, lvb int) []*dlm.Lockspace {
	tb.Helper()
	var out []*dlm.Lockspace
	for _, n := range c.nodes {
		ls, err := n.Open(name, dlm.OpenOptions{LVBLen: lvb})
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, ls)
	}
	return out
}

// eventually polls cond until it holds, failing the test (naming what was
// awaited) if it does not within guard. Tests wait with it instead of
// sleeping for a fixed time and hoping.
func eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(guard)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// never checks that cond stays false for d, polling it meanwhile: how a
// test asserts that something does not happen (it cannot wait for an
// absence to show, only watch for a while).
func never(tb testing.TB, what string, d time.Duration, cond func() bool) {
	tb.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if cond() {
			tb.Fatalf("%s", what)
		}
	}
}

func withGuard(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	tb.Cleanup(cancel)
	return ctx
}

// masterOf returns the node mastering resource according to node n's dump.
func masterOf(ls *dlm.Lockspace, resource string) dlm.NodeID {
	for _, r := range ls.Dump() {
		if r.Name == resource {
			return r.Master
		}
	}
	return 0
}

func TestClusterLockAcrossNodes(t *testing.T) {
	c := startCluster(t, 3, nil)
	ls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	// Node 2 takes the lock first: it becomes the master.
	a, err := ls[1].Lock(ctx, "res", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	if m := masterOf(ls[1], "res"); m != 2 {
		t.Fatalf("master is %d, want 2 (the first to look it up)", m)
	}
	// Node 1 is refused under NOQUEUE, then waits.
	if _, err := ls[0].Lock(ctx, "res", dlm.PR, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("remote NOQUEUE: %v", err)
	}
	got := make(chan *dlm.Lock, 1)
	go func() {
		l, err := ls[0].Lock(ctx, "res", dlm.PR, 0)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	// The waiter shows on the master's queue, owned by node 1.
	eventually(t, "the waiter queued at the master", func() bool {
		r, _ := findResource(ls[1].Dump(), "res")
		return len(r.Waiting) == 1 && r.Waiting[0].Node == 1 && r.Waiting[0].Requested == dlm.PR
	})
	if err := a.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
	b := <-got
	if b.Mode() != dlm.PR || masterOf(ls[0], "res") != 2 {
		t.Fatalf("remote grant: mode %v master %d", b.Mode(), masterOf(ls[0], "res"))
	}
	// Node 3 converts up and down through the remote master too.
	c3, err := ls[2].Lock(ctx, "res", dlm.CR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := c3.Convert(ctx, dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if err := c3.Convert(ctx, dlm.NL, 0); err != nil {
		t.Fatal(err)
	}
	if err := c3.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := c3.Unlock(ctx, 0); !errors.Is(err, dlm.ErrNotFound) {
		t.Fatalf("double unlock of a remote lock: %v", err)
	}
}

func TestClusterBlockingCallbacks(t *testing.T) {
	c := startCluster(t, 3, nil)
	ls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	blocked := make(chan dlm.Mode, 4)
	holder, err := ls[2].Acquire(ctx, dlm.LockRequest{Resource: "token", Mode: dlm.EX,
		OnBlock: func(l *dlm.Lock, m dlm.Mode) {
			blocked <- m
			_ = l.Unlock(context.Background(), 0)
		}})
	if err != nil {
		t.Fatal(err)
	}
	// Requests from the other two nodes: the holder on node 3 is told and
	// gives way; both are served.
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := ls[i].Lock(ctx, "token", dlm.PR, 0)
			if err != nil {
				t.Error(err)
				return
			}
			if l.Mode() != dlm.PR {
				t.Errorf("node %d: mode %v", i+1, l.Mode())
			}
		}()
	}
	wg.Wait()
	if m := <-blocked; m != dlm.PR {
		t.Fatalf("blocking callback for %v", m)
	}
	if holder.Mode() != dlm.ModeIV {
		t.Fatalf("holder still %v", holder.Mode())
	}
}

func TestClusterLVBRoundTrip(t *testing.T) {
	c := startCluster(t, 3, nil)
	ls := c.open(t, "md0", 64)
	ctx := withGuard(t)
	// The master is node 3; writers and readers are on nodes 1 and 2.
	pin, err := ls[2].Lock(ctx, "lvb", dlm.NL, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unlock(ctx, 0)
	w, err := ls[0].Lock(ctx, "lvb", dlm.EX, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 20 {
		val := bytes.Repeat([]byte{byte(round + 1)}, 64)
		if err := w.SetLVB(val); err != nil {
			t.Fatal(err)
		}
		if err := w.Convert(ctx, dlm.NL, dlm.ValBlk); err != nil {
			t.Fatal(err)
		}
		r, err := ls[1].Lock(ctx, "lvb", dlm.PW, dlm.ValBlk)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(r.LVB(), val) || r.LVBSeq() != uint32(2*round+1) {
			t.Fatalf("round %d: read %v seq %d", round, r.LVB()[:4], r.LVBSeq())
		}
		// The reader writes back with its unlock; the writer reads it on
		// its up-conversion.
		back := bytes.Repeat([]byte{byte(100 + round)}, 64)
		_ = r.SetLVB(back)
		if err := r.Unlock(ctx, dlm.ValBlk); err != nil {
			t.Fatal(err)
		}
		if err := w.Convert(ctx, dlm.EX, dlm.ValBlk); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(w.LVB(), back) {
			t.Fatalf("round %d: writer read back %v", round, w.LVB()[:4])
		}
	}
	// Invalidation travels too.
	if err := w.Unlock(ctx, dlm.IVValBlk); err != nil {
		t.Fatal(err)
	}
	r, err := ls[1].Lock(ctx, "lvb", dlm.EX, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if r.StatusFlags()&dlm.ValNotValid == 0 {
		t.Fatalf("remote grant after invalidation: flags %v", r.StatusFlags())
	}
}

func TestClusterDeadlineCancelsRemoteRequest(t *testing.T) {
	c := startCluster(t, 2, nil)
	ls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	if _, err := ls[1].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := ls[0].Lock(short, "r", dlm.EX, 0); !errors.Is(err, dlm.ErrTimeout) {
		t.Fatalf("remote request past its deadline: %v", err)
	}
	// Nothing is left queued at the master.
	for _, r := range ls[1].Dump() {
		if r.Name == "r" && len(r.Waiting) != 0 {
			t.Fatalf("cancelled request still queued: %+v", r)
		}
	}
}

// TestClusterRandomized runs random operations from several goroutines on
// every node of a 3-5 node cluster over TCP. A shared table of what each
// owner believes it holds must stay pairwise compatible, every operation must
// complete exactly once, and everything must be released at the end. Timing
// makes runs differ; the seed fixes the operations each worker picks.
func TestClusterRandomized(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DLM_CLUSTER_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (DLM_CLUSTER_SEED=%d go test -run TestClusterRandomized ./dlm/)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	nn := 3 + rng.IntN(3)
	c := startCluster(t, nn, nil)
	ls := c.open(t, "stress", 16)
	ctx := withGuard(t)

	type holding struct {
		mode dlm.Mode
	}
	var mu sync.Mutex
	held := map[string]map[*holding]bool{}
	check := func(res string, h *holding) {
		for o := range held[res] {
			if o != h && !refCompatible(o.mode, h.mode) {
				t.Errorf("%s: %v held together with %v", res, h.mode, o.mode)
			}
		}
	}
	set := func(res string, h *holding, m dlm.Mode) {
		mu.Lock()
		defer mu.Unlock()
		if held[res] == nil {
			held[res] = map[*holding]bool{}
		}
		if m == dlm.ModeIV {
			delete(held[res], h)
			return
		}
		h.mode = m
		held[res][h] = true
		check(res, h)
	}

	const workersPerNode, ops = 3, 150
	var wg sync.WaitGroup
	for ni := range nn {
		for w := range workersPerNode {
			wg.Add(1)
			wseed := seed + uint64(ni*100+w)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(wseed, 2))
				for range ops {
					res := fmt.Sprintf("r%d", r.IntN(4))
					mode := dlm.Mode(r.IntN(6))
					var f dlm.Flags
					if r.IntN(4) == 0 {
						f |= dlm.NoQueue
					}
					lk, err := ls[ni].Lock(ctx, res, mode, f)
					if errors.Is(err, dlm.ErrAgain) {
						continue
					}
					if err != nil {
						t.Errorf("lock: %v", err)
						return
					}
					h := &holding{}
					set(res, h, lk.Mode())
					// A few conversions: up ones are recorded when granted,
					// down ones before they are asked for.
					for range r.IntN(3) {
						to := dlm.Mode(r.IntN(6))
						cur := lk.Mode()
						down := to < cur && !((cur == dlm.PR && to == dlm.CW) || (cur == dlm.CW && to == dlm.PR))
						if down {
							set(res, h, to)
						} else if cur == dlm.PR && to == dlm.CW || cur == dlm.CW && to == dlm.PR {
							set(res, h, dlm.CR) // only what both share is held meanwhile
						}
						err := lk.Convert(ctx, to, dlm.NoQueue*dlm.Flags(r.IntN(2)))
						switch {
						case err == nil:
							set(res, h, lk.Mode())
						case errors.Is(err, dlm.ErrAgain), errors.Is(err, dlm.ErrDeadlock):
							set(res, h, lk.Mode())
						default:
							t.Errorf("convert: %v", err)
							return
						}
					}
					set(res, h, dlm.ModeIV)
					if err := lk.Unlock(ctx, 0); err != nil {
						t.Errorf("unlock: %v", err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	// Everything released: EX is granted on every resource to every node in
	// turn (waiting, since another node's unlock is asynchronous).
	for i := range 4 {
		res := fmt.Sprintf("r%d", i)
		for ni := range nn {
			l, err := ls[ni].Lock(ctx, res, dlm.EX, 0)
			if err != nil {
				t.Fatalf("after the run, EX on %s from node %d: %v", res, ni+1, err)
			}
			if err := l.Unlock(ctx, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestClusterDropsStaleGenerationAndBadKey talks to a node through a raw
// transport posing as a peer.
func TestClusterDropsStaleGenerationAndBadKey(t *testing.T) {
	lnA, _ := net.Listen("tcp", "127.0.0.1:0")
	lnB, _ := net.Listen("tcp", "127.0.0.1:0")
	var logs bytes.Buffer
	var logMu sync.Mutex
	logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &logMu}, nil))
	node, err := dlm.NewNode(dlm.Config{ID: 1, Peers: map[dlm.NodeID]string{2: lnB.Addr().String()},
		Listener: lnA, ClusterKey: testKey, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("md0", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	replies := make(chan []byte, 8)
	peer := func(key []byte, ln net.Listener) *transport.Transport {
		cfg := transport.DefaultConfig()
		cfg.NodeID, cfg.Listener, cfg.ClusterKey, cfg.Logger = 2, ln, key, quietLogger()
		cfg.Peers = map[transport.NodeID]string{1: lnA.Addr().String()}
		cfg.Handler = func(_ transport.NodeID, _ transport.LockspaceID, _ uint64, p []byte) { replies <- bytes.Clone(p) }
		tr, err := transport.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	lsID := transport.LockspaceID(fnv32("md0"))
	// A valid lookup message: type 1, name length, name.
	lookup := append([]byte{1, 3}, "abc"...)

	// Wrong key: refused; nothing it sends is applied.
	bad := peer([]byte("a-different-cluster-key-0000000000"), lnB)
	_ = bad.Send(1, lsID, 1, lookup)
	eventually(t, "the wrong key refused", func() bool { return node.Controller().Transport().Stats().AuthFailures > 0 })
	select {
	case <-replies:
		t.Fatal("a peer with the wrong key got an answer")
	default:
	}
	bad.Close()

	lnB2, _ := net.Listen("tcp", "127.0.0.1:0")
	_ = lnB2.Close()
	good := peer(testKey, nil2(t, lnB.Addr().String()))
	defer good.Close()
	// Stale generation (0 < 1): dropped, counted.
	_ = good.Send(1, lsID, 0, lookup)
	// Current generation: answered with a lookup reply naming node 2.
	_ = good.Send(1, lsID, 1, lookup)
	select {
	case r := <-replies:
		if r[0] != 2 {
			t.Fatalf("reply type %d, want lookup-reply", r[0])
		}
	case <-time.After(guard):
		t.Fatal("no reply to a current-generation lookup")
	}
	stale := func() uint64 { return node.Controller().Transport().Stats().Dropped.StaleGeneration }
	eventually(t, "the stale-generation message counted", func() bool { return stale() >= 1 })
	if n := stale(); n != 1 {
		t.Fatalf("stale generation drops: %d", n)
	}
	never(t, "the stale-generation message was answered", 50*time.Millisecond, func() bool { return len(replies) > 0 })
	// A malformed message from an authenticated peer is logged and dropped.
	_ = good.Send(1, lsID, 1, []byte{99})
	eventually(t, "the malformed message logged", func() bool {
		logMu.Lock()
		defer logMu.Unlock()
		return strings.Contains(logs.String(), "malformed lock message")
	})
	if len(ls.Dump()) != 0 {
		t.Fatalf("lockspace changed: %+v", ls.Dump())
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// nil2 re-listens on addr (the first fake peer's listener was closed with it).
func nil2(t *testing.T, addr string) net.Listener {
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("re-listen on %s: %v", addr, err)
	return nil
}

func fnv32(s string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(s); i++ {
		h ^= uint32(s[i])
		h *= 16777619
	}
	return h
}

// refCompatible: the compatibility matrix as the conflicting pairs, written
// independently of the package's table.
func refCompatible(a, b dlm.Mode) bool {
	conflicts := map[[2]dlm.Mode]bool{
		{dlm.CR, dlm.EX}: true, {dlm.CW, dlm.PR}: true, {dlm.CW, dlm.PW}: true, {dlm.CW, dlm.EX}: true,
		{dlm.PR, dlm.PW}: true, {dlm.PR, dlm.EX}: true, {dlm.PW, dlm.PW}: true, {dlm.PW, dlm.EX}: true, {dlm.EX, dlm.EX}: true,
	}
	return !conflicts[[2]dlm.Mode{a, b}] && !conflicts[[2]dlm.Mode{b, a}]
}

// TestDeferredUnlockReleasedOnDemand: a node holds back its unlocks (here for
// an hour) to send them with its next message, but a node waiting for the
// lock must not wait for that: the master's blocking callback makes the
// holder's node send what it holds back at once.
func TestDeferredUnlockReleasedOnDemand(t *testing.T) {
	c := &cluster{addrs: map[dlm.NodeID]string{}}
	lns := map[dlm.NodeID]net.Listener{}
	for i := dlm.NodeID(1); i <= 3; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i], c.addrs[i] = ln, ln.Addr().String()
	}
	for i := dlm.NodeID(1); i <= 3; i++ {
		peers := map[dlm.NodeID]string{}
		for p, a := range c.addrs {
			if p != i {
				peers[p] = a
			}
		}
		cfg := dlm.Config{ID: i, Peers: peers, Listener: lns[i], ClusterKey: testKey, Logger: quietLogger()}
		// Nothing else may carry held-back frames: no timers, no acks.
		cfg.DeferDelay = time.Hour
		cfg.Transport.AckDelay, cfg.Transport.AckEvery = time.Hour, 1<<30
		n, err := dlm.NewNode(cfg)
		if err != nil {
			t.Fatal(err)
		}
		closeOnCleanup(t, n)
		c.nodes = append(c.nodes, n)
	}
	ls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	pin, err := ls[2].Lock(ctx, "r", dlm.NL, 0) // node 3 masters r
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unlock(ctx, 0)
	for round := range 20 {
		holder, err := ls[0].Lock(ctx, "r", dlm.EX, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := holder.Unlock(ctx, 0); err != nil { // held back at node 1
			t.Fatal(err)
		}
		l, err := ls[1].Lock(ctx, "r", dlm.EX, 0)
		if err != nil {
			t.Fatalf("round %d: waiter: %v", round, err)
		}
		if err := l.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
}

// heldBy reports whether node's lock in mode is granted on resource
// according to the master's dump (ls is the master's handle).
func heldBy(ls *dlm.Lockspace, resource string, node dlm.NodeID, mode dlm.Mode) bool {
	for _, r := range ls.Dump() {
		if r.Name != resource {
			continue
		}
		for _, l := range r.Granted {
			if l.Node == node && l.Granted == mode {
				return true
			}
		}
	}
	return false
}

// TestDeferredUnlockRidesWithNextRequest: an unlock nobody waits for is
// held back and leaves in the same frame as the next message to the same
// node; without one, the deferral timer sends it.
func TestDeferredUnlockRidesWithNextRequest(t *testing.T) {
	for _, delay := range []time.Duration{time.Hour, 2 * time.Millisecond} {
		t.Run(delay.String(), func(t *testing.T) {
			c := startClusterWith(t, 2, nil, func(cfg *dlm.Config) { cfg.DeferDelay = delay })
			ls := c.open(t, "md0", 0)
			ctx := withGuard(t)
			if _, err := ls[1].Lock(ctx, "r", dlm.NL, 0); err != nil { // node 2 masters r
				t.Fatal(err)
			}
			l, err := ls[0].Lock(ctx, "r", dlm.EX, 0)
			if err != nil {
				t.Fatal(err)
			}
			before := c.nodes[0].Controller().Transport().Stats().FramesSent
			if err := l.Unlock(ctx, 0); err != nil {
				t.Fatal(err)
			}
			if delay == time.Hour {
				never(t, "the unlock was sent on its own", 20*time.Millisecond, func() bool {
					return c.nodes[0].Controller().Transport().Stats().FramesSent != before
				})
				if !heldBy(ls[1], "r", 1, dlm.EX) {
					t.Fatal("the master saw the unlock that was held back")
				}
				l2, err := ls[0].Lock(ctx, "r", dlm.PR, 0)
				if err != nil {
					t.Fatal(err)
				}
				if sent := c.nodes[0].Controller().Transport().Stats().FramesSent - before; sent != 1 {
					t.Fatalf("unlock and request took %d frames, want 1", sent)
				}
				if heldBy(ls[1], "r", 1, dlm.EX) || !heldBy(ls[1], "r", 1, dlm.PR) {
					t.Fatalf("master's view after the carried unlock: %+v", ls[1].Dump())
				}
				l2.Unlock(ctx, 0)
				return
			}
			eventually(t, "the deferral timer to send the unlock", func() bool { return !heldBy(ls[1], "r", 1, dlm.EX) })
		})
	}
}
