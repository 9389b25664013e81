package broadcast

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestClusterEveryTypeActedBeforeSendReturns: three real nodes; each md
// message type sent from node 1 has been acted on by nodes 2 and 3 when
// Send returns (the handlers record into a shared log that Send's caller
// reads right after the call), with the payload intact and the sender's
// slot filled in.
func TestClusterEveryTypeActedBeforeSendReturns(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	var mu sync.Mutex
	acted := map[dlm.NodeID][]Message{}
	for _, n := range c.nodes[1:] {
		n.rec.set(func(_ context.Context, _ dlm.NodeID, m Message) error {
			mu.Lock()
			defer mu.Unlock()
			acted[n.id] = append(acted[n.id], m)
			return nil
		})
	}
	for ty := MetadataUpdated; ty <= ResyncingStart; ty++ {
		m := Message{Type: ty, Slot: 77, Low: uint64(ty) * 10, High: uint64(ty)*10 + 5, RaidSlot: uint32(ty) + 1}
		m.UUID[0], m.UUID[15] = byte(ty), 0xee
		res, err := c.nodes[0].b.Send(ctx, m)
		if err != nil {
			t.Fatalf("send %s: %v", ty, err)
		}
		expectActed(t, res, 2, 3)
		m.Slot = 0 // node 1's slot, filled in by Send
		mu.Lock()
		for _, id := range ids(2, 3) {
			got := acted[id]
			if len(got) != int(ty)+1 || got[ty] != m {
				mu.Unlock()
				t.Fatalf("after sending %s node %d has acted on %v", ty, id, got)
			}
		}
		mu.Unlock()
	}
	for _, n := range c.nodes[1:] {
		for i, d := range n.rec.deliveries() {
			if d.From != 1 || d.Seq != uint64(i+1) {
				t.Fatalf("node %d delivery %d: %+v", n.id, i, d)
			}
		}
	}
	if d := c.nodes[0].rec.deliveries(); len(d) != 0 {
		t.Fatalf("the sender acted on its own messages: %v", d)
	}
	if s := c.nodes[0].b.Stats(); s.Sends != 9 || s.SendErrors != 0 || s.LastSend == 0 {
		t.Fatalf("sender stats %+v", s)
	}
	// The reply counter moves just after the reply grants the sender.
	eventually(t, "node 2's replies counted", func() bool { return c.nodes[1].b.Stats().Replies == 9 })
	if s := c.nodes[1].b.Stats(); s.Receives != 9 {
		t.Fatalf("receiver stats %+v", s)
	}
}

// TestClusterReceiverError: node 2's handler fails; the sender sees that
// node's error text, node 3 acted, and the next broadcast works.
func TestClusterReceiverError(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	c.nodes[1].rec.set(func(context.Context, dlm.NodeID, Message) error {
		return errors.New("device 8:16 not found")
	})
	res, err := c.nodes[0].b.Send(ctx, Message{Type: NewDisk, RaidSlot: 2})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(3)) || len(res.Failed) != 1 {
		t.Fatalf("result %+v", res)
	}
	ferr := res.Failed[2]
	var re *RemoteError
	if !errors.As(ferr, &re) || !errors.Is(ferr, ErrReceiverFailed) || re.Text != "device 8:16 not found" || re.Seq != res.Seq {
		t.Fatalf("node 2's error: %v", ferr)
	}
	if res.Err() == nil {
		t.Fatal("Result.Err is nil with a failed receiver")
	}
	c.nodes[1].rec.set(nil)
	res, err = c.nodes[2].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 1, 2)
}

// TestClusterUnknownType: a type this version does not know is answered as
// unknown by every receiver, without calling their handlers, and nobody
// hangs; a handler may also report a known type as unknown to it.
func TestClusterUnknownType(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	res, err := c.nodes[0].b.Send(ctx, Message{Type: 42})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Acted) != 0 || len(res.Failed) != 2 {
		t.Fatalf("result %+v", res)
	}
	for id, e := range res.Failed {
		if !errors.Is(e, ErrUnknownType) {
			t.Fatalf("node %d: %v", id, e)
		}
	}
	for _, n := range c.nodes {
		if d := n.rec.deliveries(); len(d) != 0 {
			t.Fatalf("node %d's handler saw an unknown type: %v", n.id, d)
		}
	}
	c.nodes[2].rec.set(func(context.Context, dlm.NodeID, Message) error {
		return fmt.Errorf("not in this build: %w", ErrUnknownType)
	})
	res, err = c.nodes[1].b.Send(ctx, Message{Type: BitmapResize, High: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(1)) || !errors.Is(res.Failed[3], ErrUnknownType) {
		t.Fatalf("result %+v", res)
	}
}

// TestClusterReceiverNeverAnswers: node 3's handler blocks until its
// context ends. The sender's wait is bounded by its SendTimeout and names
// node 3; the token is not left held; the next broadcast goes through at
// once for node 1 (a stuck receiver holds up only itself); once node 3's
// ReceiveTimeout has passed it answers late and then acts on that next
// broadcast, in order, and the one after reaches everyone. Through the
// ack locks (NoMailbox), node 2's request stays queued on node 3's ack lock
// and node 3 answers it late; through the mailboxes, node 2 gave up before
// it could write into node 3's mailbox (node 3 still held it), so node 3
// never sees that broadcast and counts a gap when the next one comes.
func TestClusterReceiverNeverAnswers(t *testing.T) {
	for _, noBox := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoMailbox=%v", noBox), func(t *testing.T) { testReceiverNeverAnswers(t, noBox) })
	}
}

func testReceiverNeverAnswers(t *testing.T, noBox bool) {
	c := startCluster(t, 3, func(cfg *Config) {
		cfg.ReceiveTimeout = 1500 * time.Millisecond
		cfg.SendTimeout = 500 * time.Millisecond
		cfg.LockTimeout = 3 * time.Second
		cfg.NoMailbox = noBox
	})
	c.joinAll()
	ctx := withGuard(t)
	entered := make(chan struct{}, 1)
	var stuck atomic.Bool
	stuck.Store(true)
	c.nodes[2].rec.set(func(ctx context.Context, _ dlm.NodeID, _ Message) error {
		if !stuck.Load() {
			return nil
		}
		entered <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	})
	start := time.Now()
	res, err := c.nodes[0].b.Send(ctx, Message{Type: Remove, RaidSlot: 1})
	took := time.Since(start)
	if !errors.Is(err, ErrNoAnswer) || !slices.Equal(res.Unanswered, ids(3)) || !slices.Equal(res.Acted, ids(2)) {
		t.Fatalf("send: %v, result %+v", err, res)
	}
	if took > 3*time.Second {
		t.Fatalf("the sender waited %v with a 500ms send timeout", took)
	}
	<-entered
	stuck.Store(false)
	if s := fmt.Sprint(err); !containsAll(s, "[3]", "no answer") {
		t.Fatalf("error does not name the node: %v", err)
	}
	// The token is free and node 3 holds up nobody else: node 2's
	// broadcast reaches node 1 at once (node 3 is still in its handler).
	res2, err := c.nodes[1].b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: 2})
	if !errors.Is(err, ErrNoAnswer) || !slices.Equal(res2.Acted, ids(1)) || !slices.Equal(res2.Unanswered, ids(3)) {
		t.Fatalf("second send: %v, result %+v", err, res2)
	}
	// Node 3 gives up after its ReceiveTimeout, answers late, then acts on
	// node 2's broadcast (the latest) and answers that too.
	late, gaps := []uint64{res.Seq, res2.Seq}, uint64(0)
	if !noBox {
		late, gaps = []uint64{res.Seq}, 1
	}
	eventually(t, "node 3's late answers", func() bool { return c.nodes[2].b.Stats().Replies == uint64(len(late)) })
	if d := c.nodes[2].rec.seqs(); !slices.Equal(d, late) {
		t.Fatalf("node 3 acted on %v, want %v", d, late)
	}
	if s := c.nodes[2].b.Stats(); s.HandlerErrors != 1 || s.Gaps != 0 {
		t.Fatalf("node 3 stats %+v", s)
	}
	res, err = c.nodes[1].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 1, 3)
	if s := c.nodes[2].b.Stats(); s.Gaps != gaps {
		t.Fatalf("node 3 counted %d gaps, want %d", s.Gaps, gaps)
	}
}

// TestClusterReceiversStayArmed: the invariant that makes a broadcast
// reach every joined node: whenever a broadcast has been answered, every
// receiver holds at least one of its ack locks in EX (it armed the other
// one before answering), so the next broadcast, from any sender, finds it
// armed. Senders take turns, so a sender's release of the lock it asked
// never rides on its own next request.
func TestClusterReceiversStayArmed(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	for i := range 60 {
		s := c.nodes[i%3]
		res, err := s.b.Send(ctx, Message{Type: MetadataUpdated, Low: uint64(i)})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Acted) != 2 {
			t.Fatalf("broadcast %d from node %d: %+v", i, s.id, res)
		}
		for _, r := range c.nodes {
			if r == s {
				continue
			}
			armed := 0
			for _, ri := range r.ls.Dump() {
				if ri.Name != AckLock(r.id, 0) && ri.Name != AckLock(r.id, 1) {
					continue
				}
				for _, l := range ri.Granted {
					if l.Node == r.id && l.Granted == dlm.EX {
						armed++
					}
				}
			}
			if armed == 0 {
				t.Fatalf("after broadcast %d node %d holds neither ack lock in EX", i, r.id)
			}
		}
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// TestClusterMessageBeforeJoin: a broadcast sent while node 3 has not
// joined (its array not started, its receive loop already running) is not
// delivered there and is reported NotJoined; after Join, node 3 gets the
// next one and never the earlier one.
func TestClusterMessageBeforeJoin(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx := withGuard(t)
	for _, n := range c.nodes[:2] {
		if err := n.b.Join(ctx); err != nil {
			t.Fatal(err)
		}
	}
	c.nodes[2].rec.set(func(context.Context, dlm.NodeID, Message) error {
		panic("delivered to an array that is not started")
	})
	res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(2)) || !slices.Equal(res.NotJoined, ids(3)) {
		t.Fatalf("result %+v", res)
	}
	first := res.Seq
	c.nodes[2].rec.set(nil)
	if err := c.nodes[2].b.Join(ctx); err != nil {
		t.Fatal(err)
	}
	if got := c.nodes[2].b.Seen(); got != first {
		t.Fatalf("node 3 joined at sequence %d, want %d", got, first)
	}
	res, err = c.nodes[1].b.Send(ctx, Message{Type: Resyncing, Low: 0, High: 65536})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 1, 3)
	if d := c.nodes[2].rec.deliveries(); len(d) != 1 || d[0].Seq != res.Seq {
		t.Fatalf("node 3's deliveries: %+v", d)
	}
}

// TestClusterSendWhileReceiving: node 2's handler itself sends (acting on
// the message needs a follow-up). Send with the handler's context fails at
// once with ErrInHandler instead of deadlocking on the token the first
// sender holds until node 2 answers; the follow-up sent after the handler
// returns (from another goroutine) is delivered after the first broadcast
// everywhere.
func TestClusterSendWhileReceiving(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	followUp := make(chan error, 1)
	inHandler := make(chan error, 1)
	c.nodes[1].rec.set(func(hctx context.Context, _ dlm.NodeID, m Message) error {
		if m.Type != NewDisk {
			return nil
		}
		_, err := c.nodes[1].b.Send(hctx, Message{Type: MetadataUpdated})
		inHandler <- err
		go func() {
			_, err := c.nodes[1].b.Send(context.Background(), Message{Type: MetadataUpdated, RaidSlot: 9})
			followUp <- err
		}()
		return nil
	})
	res, err := c.nodes[0].b.Send(ctx, Message{Type: NewDisk})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 2, 3)
	if err := <-inHandler; !errors.Is(err, ErrInHandler) {
		t.Fatalf("send from the handler: %v", err)
	}
	if err := <-followUp; err != nil {
		t.Fatalf("follow-up: %v", err)
	}
	for _, id := range ids(1, 3) {
		d := c.nodes[id-1].rec.deliveries()
		last := d[len(d)-1]
		if last.From != 2 || last.Msg.RaidSlot != 9 || last.Seq <= res.Seq {
			t.Fatalf("node %d: %+v", id, d)
		}
	}
}

// TestClusterConcurrentSenders: all three nodes send at once, several
// goroutines each. Every message is delivered exactly once to each other
// node, and every receiver sees them in the same total order (increasing
// sequence numbers, the order the senders' Results report).
func TestClusterConcurrentSenders(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	const perGoroutine, goroutinesPerNode = 8, 2
	var mu sync.Mutex
	sentSeq := map[[2]uint64]uint64{} // (node, counter) -> seq
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		for g := range goroutinesPerNode {
			wg.Go(func() {
				for i := range perGoroutine {
					key := [2]uint64{uint64(n.id), uint64(g*perGoroutine + i)}
					res, err := n.b.Send(ctx, Message{Type: MetadataUpdated, Low: key[0], High: key[1]})
					if err != nil {
						t.Error(err)
						return
					}
					if len(res.Acted) != 2 {
						t.Errorf("node %d: %+v", n.id, res)
					}
					mu.Lock()
					sentSeq[key] = res.Seq
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	total := 3 * goroutinesPerNode * perGoroutine
	if len(sentSeq) != total {
		t.Fatalf("%d sends recorded", len(sentSeq))
	}
	// The global order: every sequence number once.
	var all []uint64
	for _, s := range sentSeq {
		all = append(all, s)
	}
	slices.Sort(all)
	if len(slices.Compact(slices.Clone(all))) != total {
		t.Fatalf("sequence numbers repeat: %v", all)
	}
	for _, n := range c.nodes {
		var got []uint64
		for _, d := range n.rec.deliveries() {
			key := [2]uint64{d.Msg.Low, d.Msg.High}
			s, ok := sentSeq[key]
			if !ok || s != d.Seq || d.From != dlm.NodeID(d.Msg.Low) || d.From == n.id {
				t.Fatalf("node %d got %+v (sent as %d)", n.id, d, s)
			}
			got = append(got, d.Seq)
		}
		var want []uint64
		for k, s := range sentSeq {
			if dlm.NodeID(k[0]) != n.id {
				want = append(want, s)
			}
		}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("node %d received in order %v, want %v", n.id, got, want)
		}
	}
}

// TestClusterMemberKilledMidBroadcast: node 3 is notified and acting when
// it crashes; the membership layer removes it (the dlm purges its locks
// after the view change), and the sender returns with node 3 reported
// departed and node 2's answer.
func TestClusterMemberKilledMidBroadcast(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	entered := make(chan struct{})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	c.nodes[2].rec.set(func(ctx context.Context, _ dlm.NodeID, _ Message) error {
		close(entered)
		<-release // hung until the test ends: the node is dead to the others
		return nil
	})
	type out struct {
		res Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
		done <- out{res, err}
	}()
	<-entered
	c.kill(2)
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	if !slices.Equal(o.res.Acted, ids(2)) || !slices.Equal(o.res.Departed, ids(3)) {
		t.Fatalf("result %+v", o.res)
	}
	// The survivors go on; node 3 is no longer asked once it is known gone.
	res, err := c.nodes[1].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(1)) || len(res.Failed) != 0 || len(res.Unanswered) != 0 {
		t.Fatalf("after the departure: %+v", res)
	}
}

// TestClusterTransaction: a transaction holds the token across several
// broadcasts; another node's send waits until End and then goes through.
func TestClusterTransaction(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	tx, err := c.nodes[0].b.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res1, err := tx.Send(ctx, Message{Type: NewDisk, RaidSlot: 3})
	if err != nil {
		t.Fatal(err)
	}
	other := make(chan Result, 1)
	go func() {
		res, err := c.nodes[1].b.Send(ctx, Message{Type: Resyncing, Low: 1, High: 2})
		if err != nil {
			t.Error(err)
		}
		other <- res
	}()
	res2, err := tx.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res2.Seq != res1.Seq+1 {
		t.Fatalf("the transaction's broadcasts are %d and %d: another came between", res1.Seq, res2.Seq)
	}
	select {
	case r := <-other:
		t.Fatalf("node 2 sent inside node 1's transaction: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
	if err := tx.End(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Send(ctx, Message{}); !errors.Is(err, ErrTxnDone) {
		t.Fatalf("send after End: %v", err)
	}
	r := <-other
	expectActed(t, r, 1, 3)
	if r.Seq != res2.Seq+1 {
		t.Fatalf("node 2's broadcast is %d, after %d", r.Seq, res2.Seq)
	}
}

// TestClusterLeave: a node that left is reported NotJoined and gets
// nothing; it can join again and receives from then on.
func TestClusterLeave(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	if err := c.nodes[2].b.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.nodes[2].b.Send(ctx, Message{}); !errors.Is(err, ErrNotJoined) {
		t.Fatalf("send after leave: %v", err)
	}
	res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Acted, ids(2)) || !slices.Equal(res.NotJoined, ids(3)) {
		t.Fatalf("result %+v", res)
	}
	if err := c.nodes[2].b.Join(ctx); err != nil {
		t.Fatal(err)
	}
	res, err = c.nodes[1].b.Send(ctx, Message{Type: MetadataUpdated})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 1, 3)
	if d := c.nodes[2].rec.deliveries(); len(d) != 1 || d[0].Seq != res.Seq {
		t.Fatalf("node 3 saw %+v", d)
	}
}
