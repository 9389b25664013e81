package broadcast

// Regression tests for md-cluster's messaging bugs (reference §4), each
// named after the bug. Where an md-like implementation can be had by
// flipping one of the broadcaster's test mutations, the test runs the
// scenario both ways and checks that the md-like one fails: the test is
// then known to catch the bug, not only to pass.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// short bounds for scenarios whose md-like variant must run into them.
func shortBounds(mut mutation, on dlm.NodeID) func(*Config) {
	return func(cfg *Config) {
		cfg.LockTimeout = 700 * time.Millisecond
		cfg.ReceiveTimeout = 300 * time.Millisecond
		cfg.SendTimeout = 1500 * time.Millisecond
		if cfg.Self == on {
			cfg.mutation = mut
		}
	}
}

// mdLike runs scenario with and without the mutation: it must pass as
// built and fail with the md-like behaviour.
func mdLike(t *testing.T, mut mutation, on dlm.NodeID, scenario func(t *testing.T, c *tcluster) error) {
	t.Helper()
	t.Run("fixed", func(t *testing.T) {
		c := startCluster(t, 3, shortBounds(0, 0))
		c.joinAll()
		if err := scenario(t, c); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("md-like", func(t *testing.T) {
		c := startCluster(t, 3, shortBounds(mut, on))
		c.joinAll()
		if err := scenario(t, c); err == nil {
			t.Fatal("the md-like implementation passed: the test does not catch the bug")
		} else {
			t.Logf("md-like implementation fails as expected: %v", err)
		}
	})
}

// TestRegressionNewDiskTimeoutHang: md-cluster "fix hanging issue while a
// new disk adding" (2024). A receiver whose NEWDISK confirmation timed out
// skipped releasing its ack lock, and the sender waited for it forever.
// Here node 2's handler overruns its ReceiveTimeout: it must still answer
// (with ErrReceiveTimeout), node 3 acts, the sender returns promptly, and
// the next broadcast works.
func TestRegressionNewDiskTimeoutHang(t *testing.T) {
	mdLike(t, mutNoReplyOnError, 2, func(t *testing.T, c *tcluster) error {
		c.nodes[1].rec.set(func(ctx context.Context, _ dlm.NodeID, m Message) error {
			if m.Type != NewDisk {
				return nil
			}
			<-ctx.Done() // udev never confirms
			return fmt.Errorf("timeout on a new disk adding: %w", ctx.Err())
		})
		ctx := withGuard(t)
		res, err := c.nodes[0].b.Send(ctx, Message{Type: NewDisk, RaidSlot: 2})
		if err != nil {
			return err
		}
		if !slices.Equal(res.Acted, ids(3)) || !errors.Is(res.Failed[2], ErrReceiveTimeout) {
			return fmt.Errorf("result %+v", res)
		}
		res, err = c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
		if err != nil {
			return err
		}
		if !slices.Equal(res.Acted, ids(2, 3)) {
			return fmt.Errorf("next broadcast: %+v", res)
		}
		return nil
	})
}

// TestRegressionUnknownMessageHang: the same 2024 fix: "if another node
// receives an unknown msg (e.g. a new msg_type), the old code will hang".
// Here every receiver answers an unknown type as unknown at once.
func TestRegressionUnknownMessageHang(t *testing.T) {
	mdLike(t, mutNoReplyUnknown, 3, func(t *testing.T, c *tcluster) error {
		ctx := withGuard(t)
		res, err := c.nodes[0].b.Send(ctx, Message{Type: ResyncingStart + 1})
		if err != nil {
			return err
		}
		if len(res.Failed) != 2 || !errors.Is(res.Failed[2], ErrUnknownType) || !errors.Is(res.Failed[3], ErrUnknownType) {
			return fmt.Errorf("result %+v", res)
		}
		res, err = c.nodes[1].b.Send(ctx, Message{Type: ResyncingStart})
		if err != nil {
			return err
		}
		if !slices.Equal(res.Acted, ids(1, 3)) {
			return fmt.Errorf("next broadcast: %+v", res)
		}
		return nil
	})
}

// TestRegressionResyncJobDeadlock: md-cluster "fix deadlock when node is
// doing resync job" (2020, bsc#1163727). Node A sends (holding the token);
// on node B the resync thread waits for the token to send RESYNCING, and
// mdadm --remove waits behind it for B's local send lock; B's receive of
// A's message must still go through, or A never releases the token. Here
// nothing on the receive side waits for a local sender.
func TestRegressionResyncJobDeadlock(t *testing.T) {
	mdLike(t, mutRecvTakesSendLock, 2, func(t *testing.T, c *tcluster) error {
		ctx := withGuard(t)
		a, b := c.nodes[0], c.nodes[1]
		tx, err := a.b.Begin(ctx)
		if err != nil {
			return err
		}
		resync := make(chan error, 1)
		remove := make(chan error, 1)
		go func() {
			_, err := b.b.Send(ctx, Message{Type: Resyncing, Low: 0, High: 65536})
			resync <- err
		}()
		// Let the resync sender take B's send lock and wait for the token.
		eventually(t, "B's resync waiting for the token", func() bool { return len(b.b.sem) == 1 })
		go func() {
			_, err := b.b.Send(ctx, Message{Type: Remove, RaidSlot: 1})
			remove <- err
		}()
		res, err := tx.Send(ctx, Message{Type: MetadataUpdated})
		if err != nil {
			return fmt.Errorf("A's metadata update: %w", err)
		}
		if err := tx.End(ctx); err != nil {
			return err
		}
		if !slices.Equal(res.Acted, ids(2, 3)) {
			return fmt.Errorf("A's metadata update: %+v", res)
		}
		for _, ch := range []chan error{resync, remove} {
			if err := <-ch; err != nil {
				return fmt.Errorf("B's send after A's: %w", err)
			}
		}
		return nil
	})
}

// TestRegressionAddDiskToRecoveringArray: md-cluster "fix deadlock issue
// when add disk to an recoverying array" (2016, bsc#971137). Node A adds a
// disk: one transaction holding the token across NEWDISK and
// METADATA_UPDATED, while node B's recovery keeps trying to announce its
// resync window. B must act on both of A's messages while its own send
// waits, and its send goes through after A's transaction.
func TestRegressionAddDiskToRecoveringArray(t *testing.T) {
	mdLike(t, mutRecvTakesSendLock, 2, func(t *testing.T, c *tcluster) error {
		ctx := withGuard(t)
		a, b := c.nodes[0], c.nodes[1]
		tx, err := a.b.Begin(ctx)
		if err != nil {
			return err
		}
		window := make(chan Result, 1)
		werr := make(chan error, 1)
		go func() {
			res, err := b.b.Send(ctx, Message{Type: Resyncing, Low: 65536, High: 131072})
			window <- res
			werr <- err
		}()
		eventually(t, "B's window announcement waiting", func() bool { return len(b.b.sem) == 1 })
		var last uint64
		for _, m := range []Message{{Type: NewDisk, RaidSlot: 2}, {Type: MetadataUpdated, RaidSlot: 0}} {
			res, err := tx.Send(ctx, m)
			if err != nil {
				return fmt.Errorf("A's %s: %w", m.Type, err)
			}
			if !slices.Equal(res.Acted, ids(2, 3)) {
				return fmt.Errorf("A's %s: %+v", m.Type, res)
			}
			last = res.Seq
		}
		if err := tx.End(ctx); err != nil {
			return err
		}
		if err := <-werr; err != nil {
			return fmt.Errorf("B's window: %w", err)
		}
		if res := <-window; res.Seq != last+1 || !slices.Equal(res.Acted, ids(1, 3)) {
			return fmt.Errorf("B's window: %+v", res)
		}
		return nil
	})
}

// TestRegressionJoinDuringBroadcast: md-cluster "fix locking when node
// joins cluster during message broadcast" (2016): join takes the token so
// that it cannot run while a broadcast is in flight ("can't join cluster
// to avoid lock issue"). Here node 3 joins while node 1's broadcast waits
// for a slow node 2: Join returns only after that broadcast has been acted
// on everywhere, so the state node 3 loads afterwards includes it; node 3
// never acts on it, and acts on the next one.
func TestRegressionJoinDuringBroadcast(t *testing.T) {
	scenario := func(mut mutation) error {
		c := startCluster(t, 3, shortBounds(mut, 3))
		ctx := withGuard(t)
		for _, n := range c.nodes[:2] {
			if err := n.b.Join(ctx); err != nil {
				return err
			}
		}
		entered := make(chan struct{})
		release := make(chan struct{})
		c.nodes[1].rec.set(func(context.Context, dlm.NodeID, Message) error {
			close(entered)
			<-release
			return nil
		})
		sent := make(chan Result, 1)
		go func() {
			res, _ := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: 1})
			sent <- res
		}()
		<-entered
		joined := make(chan error, 1)
		go func() { joined <- c.nodes[2].b.Join(ctx) }()
		var early error
		select {
		case err := <-joined:
			early = fmt.Errorf("join returned (%v) while node 2 had not acted on the broadcast in flight", err)
		case <-time.After(200 * time.Millisecond):
		}
		c.nodes[1].rec.set(nil)
		close(release)
		res := <-sent
		if early != nil {
			return early
		}
		if err := <-joined; err != nil {
			return err
		}
		if got := c.nodes[2].b.Seen(); got != res.Seq {
			return fmt.Errorf("node 3 joined at %d, want %d", got, res.Seq)
		}
		res2, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: 2})
		if err != nil {
			return err
		}
		if !slices.Equal(res2.Acted, ids(2, 3)) {
			return fmt.Errorf("next broadcast: %+v", res2)
		}
		if d := c.nodes[2].rec.deliveries(); len(d) != 1 || d[0].Msg.RaidSlot != 2 {
			return fmt.Errorf("node 3 acted on %+v", d)
		}
		return nil
	}
	if err := scenario(0); err != nil {
		t.Fatal(err)
	}
	if err := scenario(mutJoinWithoutToken); err == nil {
		t.Fatal("a join without the token passed: the test does not catch the bug")
	}
}

// TestRegressionMessageBeforeArrayStarted: md-cluster "fix NULL pointer
// dereference in process_metadata_update" (2026): join() started the
// receive thread and joined before the array's own thread existed, so a
// METADATA_UPDATED arriving in between crashed the node. Here the receive
// loop runs from the start but a node is a receiver only once Join is
// called (when the array can act): a broadcast before that is reported
// NotJoined and never reaches the handler, which would crash.
func TestRegressionMessageBeforeArrayStarted(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx := withGuard(t)
	for _, n := range c.nodes[:2] {
		if err := n.b.Join(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var started atomic.Bool // the array's thread, set when node 3 starts its array
	c.nodes[2].rec.set(func(context.Context, dlm.NodeID, Message) error {
		if !started.Load() {
			panic("process_metadata_update: array thread is nil")
		}
		return nil
	})
	for range 3 {
		res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(res.Acted, ids(2)) || !slices.Equal(res.NotJoined, ids(3)) || len(res.Failed) != 0 {
			t.Fatalf("result %+v", res)
		}
	}
	started.Store(true)
	if err := c.nodes[2].b.Join(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 2, 3)
	if d := c.nodes[2].rec.deliveries(); len(d) != 1 {
		t.Fatalf("node 3 acted on %+v", d)
	}
}

// TestRegressionInterruptibleTokenWait: md-cluster "introduce
// dlm_lock_sync_interruptible to fix tasks hang" and "make resync lock
// also could be interruptted" (2016): stopping an array hung in an
// uninterruptible lock wait. Here a send waiting for the token (held by
// another node's transaction) ends as soon as its context does, leaves no
// lock held, and the node can then leave once the token is free.
func TestRegressionInterruptibleTokenWait(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	tx, err := c.nodes[0].b.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stop, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := c.nodes[1].b.Send(stop, Message{Type: Resyncing, Low: 1, High: 2})
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // waiting for the token by now
	t0 := time.Now()
	cancel()
	err = <-done
	if !errors.Is(err, context.Canceled) || time.Since(t0) > time.Second {
		t.Fatalf("cancelled send: %v after %v", err, time.Since(t0))
	}
	if _, err := tx.Send(ctx, Message{Type: MetadataUpdated}); err != nil {
		t.Fatalf("node 1's transaction after node 2 gave up: %v", err)
	}
	if err := tx.End(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.nodes[1].b.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(3)) || !slices.Equal(res.NotJoined, ids(2)) {
		t.Fatalf("after node 2 left: %+v", res)
	}
}
