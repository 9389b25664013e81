package broadcast

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

var testKey = []byte("mdcluster-broadcast-test-key-0123456789")

// guard bounds every wait of a test that is not itself about a bound.
const guard = 20 * time.Second

func testLogger() *slog.Logger {
	if os.Getenv("BROADCAST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// forward is a RecoveryHandler that passes events to the broadcaster set
// later: the lockspace handle takes its handler when it is opened, before
// the broadcaster (which needs the handle) exists.
type forward struct {
	mu sync.Mutex
	h  dlm.RecoveryHandler
}

func (f *forward) get() dlm.RecoveryHandler {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.h
}

func (f *forward) RecoverPrepare(gen uint64) {
	if h := f.get(); h != nil {
		h.RecoverPrepare(gen)
	}
}

func (f *forward) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	if h := f.get(); h != nil {
		h.RecoverDeparted(gen, nodes)
	}
}

func (f *forward) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	if h := f.get(); h != nil {
		h.RecoverDone(gen, members, self)
	}
}

// delivery is one message a test receiver was handed.
type delivery struct {
	From dlm.NodeID
	Seq  uint64
	Msg  Message
}

// recorder is a test Receiver: it records every delivery, then runs the
// test's handler (nil: succeed).
type recorder struct {
	mu     sync.Mutex
	got    []delivery
	handle func(ctx context.Context, from dlm.NodeID, m Message) error
}

func (r *recorder) Receive(ctx context.Context, from dlm.NodeID, m Message) error {
	seq, _ := SequenceOf(ctx)
	r.mu.Lock()
	r.got = append(r.got, delivery{From: from, Seq: seq, Msg: m})
	h := r.handle
	r.mu.Unlock()
	if h != nil {
		return h(ctx, from, m)
	}
	return nil
}

func (r *recorder) set(h func(ctx context.Context, from dlm.NodeID, m Message) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handle = h
}

func (r *recorder) deliveries() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

func (r *recorder) seqs() []uint64 {
	var out []uint64
	for _, d := range r.deliveries() {
		out = append(out, d.Seq)
	}
	return out
}

// tnode is one node of a test cluster: a dlm node, the array's lockspace,
// its broadcaster and its receive loop.
type tnode struct {
	id     dlm.NodeID
	dn     *dlm.Node
	ls     *dlm.Lockspace
	b      *Broadcaster
	fw     *forward
	rec    *recorder
	stop   context.CancelFunc
	runEnd chan struct{}
}

// tcluster is n nodes on loopback TCP, every one a member of the dlm
// cluster with the array's lockspace open and its receive loop running;
// none has joined the array yet.
type tcluster struct {
	t     testing.TB
	nodes []*tnode
	gen   uint64
}

// startCluster starts n nodes; tweak adjusts each broadcaster's config.
func startCluster(tb testing.TB, n int, tweak func(*Config)) *tcluster {
	tb.Helper()
	return startClusterDLM(tb, n, tweak, nil)
}

// startClusterDLM is startCluster with dlmTweak adjusting each lock
// manager node's config too.
func startClusterDLM(tb testing.TB, n int, tweak func(*Config), dlmTweak func(*dlm.Config)) *tcluster {
	tb.Helper()
	addrs := map[dlm.NodeID]string{}
	lns := map[dlm.NodeID]net.Listener{}
	for i := 1; i <= n; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		lns[dlm.NodeID(i)] = ln
		addrs[dlm.NodeID(i)] = ln.Addr().String()
	}
	c := &tcluster{t: tb, gen: 1}
	lg := testLogger()
	for i := 1; i <= n; i++ {
		id := dlm.NodeID(i)
		peers := map[dlm.NodeID]string{}
		for p, a := range addrs {
			if p != id {
				peers[p] = a
			}
		}
		dcfg := dlm.Config{ID: id, Peers: peers, Listener: lns[id], ClusterKey: testKey, Logger: lg}
		if dlmTweak != nil {
			dlmTweak(&dcfg)
		}
		dn, err := dlm.NewNode(dcfg)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = dn.Close() })
		fw := &forward{}
		ls, err := dn.Open("md0", dlm.OpenOptions{LVBLen: LVBSize, Recovery: fw})
		if err != nil {
			tb.Fatal(err)
		}
		rec := &recorder{}
		var members []dlm.NodeID
		for m := 1; m <= n; m++ {
			members = append(members, dlm.NodeID(m))
		}
		cfg := Config{Locker: ls, Self: id, Receiver: rec, Members: members, LockTimeout: 5 * time.Second,
			ReceiveTimeout: 5 * time.Second, SendTimeout: 15 * time.Second, Logger: lg.With("test_node", id)}
		if tweak != nil {
			tweak(&cfg)
		}
		b, err := New(cfg)
		if err != nil {
			tb.Fatal(err)
		}
		fw.mu.Lock()
		fw.h = b
		fw.mu.Unlock()
		tn := &tnode{id: id, dn: dn, ls: ls, b: b, fw: fw, rec: rec}
		tn.startRun()
		tb.Cleanup(tn.stopRun)
		c.nodes = append(c.nodes, tn)
	}
	return c
}

// deaf stops the node's recovery events reaching its broadcaster (a
// Locker that does not deliver them).
func (n *tnode) deaf() {
	n.fw.mu.Lock()
	n.fw.h = nil
	n.fw.mu.Unlock()
}

func (n *tnode) startRun() {
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	n.runEnd = make(chan struct{})
	go func() {
		defer close(n.runEnd)
		_ = n.b.Run(ctx)
	}()
}

func (n *tnode) stopRun() {
	n.stop()
	<-n.runEnd
}

// joinAll joins every node, one after the other.
func (c *tcluster) joinAll() {
	c.t.Helper()
	for _, n := range c.nodes {
		if err := n.b.Join(withGuard(c.t)); err != nil {
			c.t.Fatal(err)
		}
	}
}

// kill crashes node i (0-based) as the others see it: its network goes
// first, so nothing it releases reaches them; then the survivors recover
// without it.
func (c *tcluster) kill(i int) {
	c.t.Helper()
	n := c.nodes[i]
	if err := n.dn.Controller().Transport().Close(); err != nil {
		c.t.Fatal(err)
	}
	n.stop()
	_ = n.dn.Close()
	var survivors []dlm.NodeID
	for j, o := range c.nodes {
		if j != i && o.dn != nil {
			survivors = append(survivors, o.id)
		}
	}
	for j, o := range c.nodes {
		if j != i {
			o.dn.Controller().Stop()
		}
	}
	c.gen++
	for j, o := range c.nodes {
		if j != i {
			if err := o.dn.Controller().Recover(c.gen, survivors, []dlm.NodeID{n.id}, false); err != nil {
				c.t.Fatal(err)
			}
		}
	}
}

func withGuard(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	tb.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds, failing the test if it does not
// within guard.
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

// ids lists node IDs for comparisons.
func ids(ns ...dlm.NodeID) []dlm.NodeID { return ns }

// expectActed checks a Result in which exactly the listed nodes acted.
func expectActed(tb testing.TB, res Result, acted ...dlm.NodeID) {
	tb.Helper()
	if !slices.Equal(res.Acted, acted) || len(res.Failed) != 0 || len(res.Unanswered) != 0 || len(res.Departed) != 0 {
		tb.Fatalf("result %+v, want acted %v and nothing else", res, acted)
	}
}
