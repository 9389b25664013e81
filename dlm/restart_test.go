package dlm_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestClusterRestartedMemberRecovers reproduces, deterministically, the
// race behind a hang of a restarted node's recovery: node 3 restarts (new
// process, new incarnation, new address) and the view that readmits it is
// installed on the survivors before their transport reaches the new
// process. Their recovery messages for node 3 (names, locks-done) are then
// queued on the stream of the dead incarnation; when the connection comes
// up they must reach the new one, or node 3 waits for them forever while
// the survivors, who got node 3's messages, finish.
func TestClusterRestartedMemberRecovers(t *testing.T) {
	c := startClusterWith(t, 3, nil, func(cfg *dlm.Config) { cfg.Managed = true })
	ls := c.open(t, "md0", 0)
	recovered := make(chan uint64, 16)
	c.nodes[2].Controller().OnRecovered(func(_ string, gen uint64) { recovered <- gen })
	all := []dlm.NodeID{1, 2, 3}
	for _, n := range c.nodes {
		if err := n.Controller().Recover(1, all, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	ctx := withGuard(t)
	if _, err := ls[2].Lock(ctx, "r", dlm.EX, 0); err != nil { // node 3 holds r
		t.Fatal(err)
	}
	waitRecovered(t, recovered, 1)

	// Node 3 dies; its survivors stop for the view change and keep
	// dialling its old address, where nothing listens any more.
	c.nodes[2].Close()
	for _, n := range c.nodes[:2] {
		n.Controller().Stop()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n3, err := dlm.NewNode(dlm.Config{ID: 3, Managed: true, Listener: ln, ClusterKey: testKey, Logger: quietLogger(),
		Peers: map[dlm.NodeID]string{1: c.addrs[1], 2: c.addrs[2]}})
	if err != nil {
		t.Fatal(err)
	}
	closeOnCleanup(t, n3)
	recovered3 := make(chan uint64, 16)
	n3.Controller().OnRecovered(func(_ string, gen uint64) { recovered3 <- gen })
	ls3, err := n3.Open("md0", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// View 2 readmits node 3 (its old incarnation's locks purged); the
	// survivors recover into it while they still know only the old
	// address, so what they send node 3 waits in its old stream.
	for _, n := range c.nodes[:2] {
		if err := n.Controller().Recover(2, all, []dlm.NodeID{3}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := n3.Controller().Recover(2, all, nil, true); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.nodes[:2] {
		if err := n.SetPeer(3, ln.Addr().String()); err != nil {
			t.Fatal(err)
		}
	}
	waitRecovered(t, recovered3, 2)
	// The old incarnation's lock is gone, and node 3 locks again.
	if _, err := ls[0].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := ls3.Lock(ctx, "s", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*dlm.Node{c.nodes[0], c.nodes[1], n3} {
		if st := n.Controller().Transport().Stats(); st.KeptOnRestart > 0 {
			t.Logf("node %d kept %d frames of view 2 for node 3's new incarnation (dropped %d of view 1)",
				n.ID(), st.KeptOnRestart, st.Dropped.PeerRestarted)
		}
	}
}

// waitRecovered waits for an OnRecovered report of generation gen.
func waitRecovered(t *testing.T, ch <-chan uint64, gen uint64) {
	t.Helper()
	deadline := time.After(guard)
	for {
		select {
		case g := <-ch:
			if g == gen {
				return
			}
		case <-deadline:
			t.Fatalf("no recovery into generation %d reported within %v", gen, guard)
		}
	}
}

// TestClusterLateOpenAfterRestart: node 3 restarts and is readmitted to
// the view before it opens the lockspace again (as the daemon does, which
// opens an array's lockspace only when it assembles the array). The
// survivors recover the lockspace into the new view with node 3 as a
// member and send it their part of recovery; node 3, opening the lockspace
// only then, must take part in that recovery (it used to drop their
// messages as "outside recovery", and the survivors' recovery never
// ended). Afterwards the survivors' locks stand, node 3 sees them, and it
// locks and is granted like any member.
func TestClusterLateOpenAfterRestart(t *testing.T) {
	c := startClusterWith(t, 3, nil, func(cfg *dlm.Config) { cfg.Managed = true })
	ls := c.open(t, "md0", 0)
	recovered := []chan uint64{make(chan uint64, 16), make(chan uint64, 16)}
	for i, n := range c.nodes[:2] {
		ch := recovered[i]
		n.Controller().OnRecovered(func(_ string, gen uint64) { ch <- gen })
	}
	all := []dlm.NodeID{1, 2, 3}
	for _, n := range c.nodes {
		if err := n.Controller().Recover(1, all, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	ctx := withGuard(t)
	// Locks on many resources, so that some have node 3 as their directory
	// node or master in both views.
	var held []*dlm.Lock
	for i := range 24 {
		lk, err := ls[i%3].Lock(ctx, fmt.Sprintf("r%02d", i), dlm.EX, 0)
		if err != nil {
			t.Fatal(err)
		}
		if i%3 != 2 {
			held = append(held, lk)
		}
	}
	for _, ch := range recovered {
		waitRecovered(t, ch, 1)
	}

	c.nodes[2].Close()
	for _, n := range c.nodes[:2] {
		n.Controller().Stop()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n3, err := dlm.NewNode(dlm.Config{ID: 3, Managed: true, Listener: ln, ClusterKey: testKey, Logger: quietLogger(),
		Peers: map[dlm.NodeID]string{1: c.addrs[1], 2: c.addrs[2]}})
	if err != nil {
		t.Fatal(err)
	}
	closeOnCleanup(t, n3)
	recovered3 := make(chan uint64, 16)
	n3.Controller().OnRecovered(func(_ string, gen uint64) { recovered3 <- gen })
	// View 2 readmits node 3; its lock manager recovers into it with no
	// lockspace open.
	for _, n := range c.nodes[:2] {
		if err := n.SetPeer(3, ln.Addr().String()); err != nil {
			t.Fatal(err)
		}
		if err := n.Controller().Recover(2, all, []dlm.NodeID{3}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := n3.Controller().Recover(2, all, nil, true); err != nil {
		t.Fatal(err)
	}
	// The survivors cannot finish without node 3's part: wait until their
	// messages for it have arrived and are held for the unopened lockspace.
	eventually(t, "the survivors' recovery messages held on node 3", func() bool {
		return n3.Stats().EarlyHeld >= 2 // at least the names from each survivor
	})
	select {
	case g := <-recovered[0]:
		t.Fatalf("node 1 recovered into generation %d before node 3 opened the lockspace", g)
	default:
	}

	rec3 := &recorder{}
	ls3, err := n3.Open("md0", dlm.OpenOptions{Recovery: rec3})
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range recovered {
		waitRecoveredWithin(t, ch, 2, 10*time.Second)
	}
	waitRecoveredWithin(t, recovered3, 2, 10*time.Second)
	// The late handle sees a whole sequence or nothing: the lockspace was
	// in no view before (as a managed node's first view), then recovers
	// into generation 2, maybe before Open returns.
	barrier(t, ls3, rec3)
	eventually(t, "node 3's barrier", func() bool { return slices.Contains(rec3.events(), "barrier") })
	if got := rec3.events(); !slices.Equal(got, []string{"barrier"}) &&
		!slices.Equal(got, []string{"prepare 0", "done 2 [1 2 3] 3", "barrier"}) {
		t.Fatalf("node 3's recovery events %q", got)
	} else {
		t.Logf("node 3's recovery events %q", got)
	}
	if st := n3.Stats(); st.EarlyHeld != 0 {
		t.Fatalf("node 3 still holds %d early messages", st.EarlyHeld)
	}
	// The survivors' locks survived; the old incarnation's are gone.
	for i := range 24 {
		name := fmt.Sprintf("r%02d", i)
		lk, err := ls3.Lock(ctx, name, dlm.EX, dlm.NoQueue)
		if i%3 == 2 {
			if err != nil {
				t.Fatalf("node 3 locking %s, held by its old incarnation: %v", name, err)
			}
			if err := lk.Unlock(ctx, 0); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if !errors.Is(err, dlm.ErrAgain) {
			t.Fatalf("node 3 locking %s, held by node %d: got %v, want ErrAgain", name, i%3+1, err)
		}
	}
	for _, lk := range held {
		if err := lk.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
	exclusiveBothWays(t, ls[0], ls3, "late")
	exclusiveBothWays(t, ls3, ls[1], "late2")
}

// waitRecoveredWithin waits up to d for an OnRecovered report of
// generation gen.
func waitRecoveredWithin(t *testing.T, ch <-chan uint64, gen uint64, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case g := <-ch:
			if g == gen {
				return
			}
		case <-deadline:
			t.Fatalf("no recovery into generation %d reported within %v", gen, d)
		}
	}
}

// TestClusterLateOpenWhileStopped: node 3 opens the lockspace after it
// recovered into view 1 but while it is stopped again for the next change.
// The lockspace still does its part of view 1's recovery, so that the
// others' ends, but grants nothing until view 2 is recovered.
func TestClusterLateOpenWhileStopped(t *testing.T) {
	c := startClusterWith(t, 3, nil, func(cfg *dlm.Config) { cfg.Managed = true })
	var ls []*dlm.Lockspace
	for _, n := range c.nodes[:2] {
		l, err := n.Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	recovered := make(chan uint64, 16)
	c.nodes[0].Controller().OnRecovered(func(_ string, gen uint64) { recovered <- gen })
	all := []dlm.NodeID{1, 2, 3}
	for _, n := range c.nodes {
		if err := n.Controller().Recover(1, all, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	c.nodes[2].Controller().Stop()
	ls3, err := c.nodes[2].Open("md0", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitRecoveredWithin(t, recovered, 1, 10*time.Second)
	ctx := withGuard(t)
	if _, err := ls[0].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := ls3.Lock(short, "s", dlm.EX, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("node 3 locking while stopped: %v, want a deadline", err)
	}
	for _, n := range c.nodes {
		n.Controller().Stop()
	}
	for _, n := range c.nodes {
		if err := n.Controller().Recover(2, all, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ls3.Lock(ctx, "r", dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
		t.Fatalf("node 3 does not see node 1's lock: %v", err)
	}
	exclusiveBothWays(t, ls[1], ls3, "stopped")
}
