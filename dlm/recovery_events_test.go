package dlm_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// recorder is a RecoveryHandler that logs its events; tests log their
// locks' callbacks into the same log to check the interleaving.
type recorder struct {
	mu  sync.Mutex
	log []string
}

func (r *recorder) add(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, fmt.Sprintf(format, args...))
}

func (r *recorder) RecoverPrepare(gen uint64) { r.add("prepare %d", gen) }
func (r *recorder) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	r.add("departed %d %v", gen, nodes)
}
func (r *recorder) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	r.add("done %d %v %d", gen, members, self)
}

func (r *recorder) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.log)
}

// expect waits until the log holds as many entries as want, then checks it
// is exactly want.
func (r *recorder) expect(tb testing.TB, what string, want ...string) {
	tb.Helper()
	eventually(tb, what, func() bool { return len(r.events()) >= len(want) })
	if got := r.events(); !slices.Equal(got, want) {
		tb.Fatalf("%s:\n got  %q\n want %q", what, got, want)
	}
}

// barrier logs "barrier" through ls's callback goroutine: once it shows,
// everything queued for that goroutine before it has been delivered.
func barrier(tb testing.TB, ls *dlm.Lockspace, r *recorder) {
	tb.Helper()
	if _, err := ls.LockAsync(context.Background(), dlm.LockRequest{Resource: "barrier", Mode: dlm.NL},
		func(l *dlm.Lock, err error) {
			r.add("barrier")
			if err == nil {
				_ = l.UnlockAsync(context.Background(), 0, func(*dlm.Lock, error) {})
			}
		}); err != nil {
		tb.Fatal(err)
	}
}

// TestRecoveryEventsOrderedWithCallbacks: a lockspace's recovery events
// reach its handler in order with its locks' callbacks; RecoverDone comes
// before the completions that the end of recovery produces; a second Stop
// reports nothing new; departed nodes are sorted, without duplicates or
// this node.
func TestRecoveryEventsOrderedWithCallbacks(t *testing.T) {
	n := newNode(t)
	rec := &recorder{}
	ls, err := n.Open("events", dlm.OpenOptions{Recovery: rec})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Acquire(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX,
		OnBlock: func(_ *dlm.Lock, m dlm.Mode) { rec.add("blocking %v", m) }}); err != nil {
		t.Fatal(err)
	}
	w, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.PR}, func(_ *dlm.Lock, err error) {
		rec.add("waiter cancelled %v", errors.Is(err, dlm.ErrCancel))
	})
	if err != nil {
		t.Fatal(err)
	}
	ctl := n.Controller()
	ctl.Stop()
	ctl.Stop()
	// Cancelled while stopped: the cancel completes when recovery ends.
	if err := w.Cancel(); err != nil {
		t.Fatal(err)
	}
	rec.expect(t, "after Stop", "blocking PR", "prepare 1")
	if err := ctl.Recover(2, []dlm.NodeID{1}, []dlm.NodeID{3, 1, 2, 3}, false); err != nil {
		t.Fatal(err)
	}
	barrier(t, ls, rec)
	rec.expect(t, "after Recover", "blocking PR", "prepare 1", "departed 2 [2 3]", "done 2 [1] 1",
		"waiter cancelled true", "barrier")
}

// TestRecoveryEventsHandles: a handle opened while the lockspace is stopped
// starts with RecoverPrepare (a new lockspace of a managed node too, at
// generation 0); one opened while it runs hears only later changes; a
// released one hears nothing more; Recover without Stop still reports
// RecoverPrepare first; OnRecovered hears every recovery in order and may
// call the controller.
func TestRecoveryEventsHandles(t *testing.T) {
	n, err := dlm.NewNode(dlm.Config{Managed: true, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	closeOnCleanup(t, n)
	ctl := n.Controller()
	if g, ms := ctl.Generation(), ctl.Members(); g != 0 || !slices.Equal(ms, []dlm.NodeID{1}) {
		t.Fatalf("managed node starts at generation %d with %v", g, ms)
	}
	var mu sync.Mutex
	var reports []string
	ctl.OnRecovered(func(ls string, gen uint64) {
		mu.Lock()
		defer mu.Unlock()
		reports = append(reports, fmt.Sprintf("%s %d@%d", ls, gen, ctl.Generation()))
	})
	r1, r2, r3 := &recorder{}, &recorder{}, &recorder{}
	ls1, err := n.Open("a", dlm.OpenOptions{Recovery: r1})
	if err != nil {
		t.Fatal(err)
	}
	r1.expect(t, "opened on a managed node", "prepare 0")
	short, cancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel()
	if _, err := ls1.Lock(short, "r", dlm.EX, 0); !errors.Is(err, dlm.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("lock before the first view: %v", err)
	}
	if err := ctl.Recover(1, []dlm.NodeID{1}, nil, false); err != nil {
		t.Fatal(err)
	}
	r1.expect(t, "first view", "prepare 0", "done 1 [1] 1")
	if _, err := ls1.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	ls2, err := n.Open("a", dlm.OpenOptions{Recovery: r2})
	if err != nil {
		t.Fatal(err)
	}
	ctl.Stop()
	ls3, err := n.Open("a", dlm.OpenOptions{Recovery: r3})
	if err != nil {
		t.Fatal(err)
	}
	if err := ctl.Recover(2, []dlm.NodeID{1}, []dlm.NodeID{5}, false); err != nil {
		t.Fatal(err)
	}
	change := []string{"prepare 1", "departed 2 [5]", "done 2 [1] 1"}
	r1.expect(t, "handle open throughout", append([]string{"prepare 0", "done 1 [1] 1"}, change...)...)
	r2.expect(t, "handle opened while running", change...)
	r3.expect(t, "handle opened while stopped", change...)
	if err := ls2.Release(); err != nil {
		t.Fatal(err)
	}
	// Without Stop: RecoverPrepare first all the same.
	if err := ctl.Recover(3, []dlm.NodeID{1}, nil, false); err != nil {
		t.Fatal(err)
	}
	barrier(t, ls1, r1)
	barrier(t, ls3, r3)
	r1.expect(t, "recover without stop", append([]string{"prepare 0", "done 1 [1] 1"},
		append(change, "prepare 2", "done 3 [1] 1", "barrier")...)...)
	r3.expect(t, "recover without stop (third handle)", append(change, "prepare 2", "done 3 [1] 1", "barrier")...)
	if got := r2.events(); !slices.Equal(got, change) {
		t.Fatalf("released handle heard more: %q", got)
	}
	eventually(t, "three recovery reports", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(reports) >= 3
	})
	mu.Lock()
	got := slices.Clone(reports)
	mu.Unlock()
	if want := []string{"a 1@1", "a 2@2", "a 3@3"}; !slices.Equal(got, want) {
		t.Fatalf("OnRecovered: %q, want %q", got, want)
	}
}

// TestRecoveryEventsStopDuringRecovery: a Stop that comes before a
// recovery ends starts the next change: RecoverPrepare again, and
// RecoverDone only for the newer generation. A handle opened during a
// recovery hears RecoverPrepare and the departed nodes first.
func TestRecoveryEventsStopDuringRecovery(t *testing.T) {
	c := startCluster(t, 2, nil)
	r1, r2, late := &recorder{}, &recorder{}, &recorder{}
	ls1, err := c.nodes[0].Open("md0", dlm.OpenOptions{Recovery: r1})
	if err != nil {
		t.Fatal(err)
	}
	ls2, err := c.nodes[1].Open("md0", dlm.OpenOptions{Recovery: r2})
	if err != nil {
		t.Fatal(err)
	}
	ctl1, ctl2 := c.nodes[0].Controller(), c.nodes[1].Controller()
	ctl1.Stop()
	ctl2.Stop()
	// Node 2 stays in generation 1, so node 1's recovery into 2 cannot end.
	if err := ctl1.Recover(2, []dlm.NodeID{1, 2}, []dlm.NodeID{3}, false); err != nil {
		t.Fatal(err)
	}
	lateLS, err := c.nodes[0].Open("md0", dlm.OpenOptions{Recovery: late})
	if err != nil {
		t.Fatal(err)
	}
	r1.expect(t, "recovery under way", "prepare 1", "departed 2 [3]")
	late.expect(t, "handle opened during recovery", "prepare 1", "departed 2 [3]")
	ctl1.Stop()
	r1.expect(t, "stopped during recovery", "prepare 1", "departed 2 [3]", "prepare 2")
	for _, ctl := range []*dlm.Controller{ctl1, ctl2} {
		if err := ctl.Recover(3, []dlm.NodeID{1, 2}, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	barrier(t, ls1, r1)
	barrier(t, lateLS, late)
	barrier(t, ls2, r2)
	r1.expect(t, "node 1", "prepare 1", "departed 2 [3]", "prepare 2", "done 3 [1 2] 1", "barrier")
	late.expect(t, "node 1, late handle", "prepare 1", "departed 2 [3]", "prepare 2", "done 3 [1 2] 1", "barrier")
	r2.expect(t, "node 2", "prepare 1", "done 3 [1 2] 2", "barrier")
}

// TestClusterRecoveryEventsNodeRemoved: three nodes on TCP; node 3, which
// holds a lock node 1 waits for, is cut off and removed from the view. The
// survivors' handlers get RecoverPrepare, RecoverDeparted([3]) and
// RecoverDone with the new members, and node 1's waiter is granted only
// after RecoverDone.
func TestClusterRecoveryEventsNodeRemoved(t *testing.T) {
	c := startCluster(t, 3, nil)
	recs := []*recorder{{}, {}, {}}
	var ls []*dlm.Lockspace
	for i, n := range c.nodes {
		l, err := n.Open("md0", dlm.OpenOptions{Recovery: recs[i]})
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	ctx := withGuard(t)
	if _, err := ls[2].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := ls[0].LockAsync(ctx, dlm.LockRequest{Resource: "r", Mode: dlm.EX}, func(_ *dlm.Lock, err error) {
		recs[0].add("granted r: %v", err)
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node 1's request queued at the master", func() bool {
		r, _ := findResource(ls[2].Dump(), "r")
		return len(r.Waiting) == 1 && r.Waiting[0].Node == 1
	})
	var mu sync.Mutex
	var reports []string
	c.nodes[1].Controller().OnRecovered(func(name string, gen uint64) {
		mu.Lock()
		defer mu.Unlock()
		reports = append(reports, fmt.Sprintf("%s %d", name, gen))
	})
	// A crash as the others see it: the network goes first, so nothing
	// node 3 releases on Close reaches them.
	if err := c.nodes[2].Controller().Transport().Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[2].Close(); err != nil {
		t.Fatal(err)
	}
	survivors := []dlm.NodeID{1, 2}
	for _, n := range c.nodes[:2] {
		n.Controller().Stop()
	}
	for _, n := range c.nodes[:2] {
		if err := n.Controller().Recover(2, survivors, []dlm.NodeID{3}, false); err != nil {
			t.Fatal(err)
		}
	}
	recs[0].expect(t, "node 1", "prepare 1", "departed 2 [3]", "done 2 [1 2] 1", "granted r: <nil>")
	barrier(t, ls[1], recs[1])
	recs[1].expect(t, "node 2", "prepare 1", "departed 2 [3]", "done 2 [1 2] 2", "barrier")
	eventually(t, "OnRecovered on node 2", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(reports) > 0
	})
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(reports, []string{"md0 2"}) {
		t.Fatalf("OnRecovered: %q", reports)
	}
}

// TestClusterManagedFirstView: managed nodes start stopped at generation 0
// and take the first agreed view as generation 1.
func TestClusterManagedFirstView(t *testing.T) {
	c := startClusterWith(t, 2, nil, func(cfg *dlm.Config) { cfg.Managed = true })
	ls := c.open(t, "md0", 0)
	short, cancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel()
	if _, err := ls[0].Lock(short, "r", dlm.EX, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("lock before the first view: %v", err)
	}
	for _, n := range c.nodes {
		if g := n.Controller().Generation(); g != 0 {
			t.Fatalf("node %d starts at generation %d", n.ID(), g)
		}
		if err := n.Controller().Recover(1, []dlm.NodeID{1, 2}, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	ctx := withGuard(t)
	if _, err := ls[1].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := ls[0].Lock(ctx, "r", dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("node 1 does not see node 2's lock: %v", err)
	}
	if ms := c.nodes[0].Controller().Members(); !slices.Equal(ms, []dlm.NodeID{1, 2}) {
		t.Fatalf("members %v", ms)
	}
}
