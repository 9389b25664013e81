package broadcast

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// framesSent sums the lock manager frames every node of c has sent.
func (c *tcluster) framesSent() (n uint64) {
	for _, nd := range c.nodes {
		n += nd.dn.Controller().Transport().Stats().FramesSent
	}
	return n
}

// TestClusterMailboxFrames: warm broadcasts among three nodes go through
// the mailboxes, two lock-manager frames per receiver (the envelope with
// the sender's conversion; the reply with the blocking callback for the
// next listener), where the ack locks need four (the ask, the read of the
// message lock and its grant, the reply). A fast path that silently fell
// back to the ack locks would send about twice as many. Every receiver
// acts on every broadcast, in order, either way.
func TestClusterMailboxFrames(t *testing.T) {
	for _, tc := range []struct {
		noBox    bool
		min, max float64 // frames per broadcast
	}{
		{false, 3.5, 5},
		{true, 7.5, 9.5},
	} {
		t.Run(fmt.Sprintf("NoMailbox=%v", tc.noBox), func(t *testing.T) {
			c := startCluster(t, 3, func(cfg *Config) { cfg.NoMailbox = tc.noBox })
			c.joinAll()
			ctx := withGuard(t)
			send := func() Result {
				res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: 1})
				if err != nil {
					t.Fatal(err)
				}
				expectActed(t, res, 2, 3)
				return res
			}
			var seqs []uint64
			for range 20 { // mailboxes taken, masters and token cached
				seqs = append(seqs, send().Seq)
			}
			const n = 200
			f0 := c.framesSent()
			for range n {
				seqs = append(seqs, send().Seq)
			}
			per := float64(c.framesSent()-f0) / n
			t.Logf("%.2f frames per broadcast; stats %+v", per, c.nodes[0].b.Stats())
			if per < tc.min || per > tc.max {
				t.Fatalf("%.2f frames per broadcast, want %.1f..%.1f", per, tc.min, tc.max)
			}
			for _, nd := range c.nodes[1:] {
				eventually(t, "the last answers", func() bool { return len(nd.rec.seqs()) == len(seqs) })
				if got := nd.rec.seqs(); !slices.Equal(got, seqs) {
					t.Fatalf("node %d acted on %v, want %v", nd.id, got, seqs)
				}
			}
		})
	}
}

// TestClusterMailboxEarlyDownConversion: with the lock manager's deferral
// delay at a nanosecond, the sender's EX -> NL on a mailbox is usually
// sent on its own, before the conversion back to EX: the receiver's
// listener is granted, it answers, and its next listener is granted at once
// with its own reply (nobody is queued yet). The receiver must keep that
// listener, untouched, until the sender's conversion blocks behind it; the
// sender then reads the reply. Senders take turns, so the mailboxes also
// change hands with the token. Every broadcast must reach every node, in
// order, exactly once.
func TestClusterMailboxEarlyDownConversion(t *testing.T) {
	c := startClusterDLM(t, 3, nil, func(cfg *dlm.Config) { cfg.DeferDelay = time.Nanosecond })
	c.joinAll()
	ctx := withGuard(t)
	var seqs []uint64
	for i := range 90 {
		from := c.nodes[i/10%3]
		res, err := from.b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: uint32(i)})
		if err != nil {
			t.Fatal(err)
		}
		var want []dlm.NodeID
		for _, nd := range c.nodes {
			if nd != from {
				want = append(want, nd.id)
			}
		}
		expectActed(t, res, want...)
		seqs = append(seqs, res.Seq)
	}
	var held, fallbacks uint64
	for _, nd := range c.nodes {
		st := nd.b.Stats()
		held += st.Held
		fallbacks += st.Fallbacks
	}
	t.Logf("%d listeners held, %d fallbacks to the ack locks", held, fallbacks)
	if held == 0 {
		t.Fatal("no listener was granted ahead of its sender's conversion: the test did not test that")
	}
	for _, nd := range c.nodes {
		var mine []uint64
		for i, s := range seqs {
			if c.nodes[i/10%3] != nd {
				mine = append(mine, s)
			}
		}
		if got := nd.rec.seqs(); !slices.Equal(got, mine) {
			t.Fatalf("node %d acted on %v, want %v", nd.id, got, mine)
		}
		if s := nd.b.Stats(); s.Gaps != 0 {
			t.Fatalf("node %d stats %+v", nd.id, s)
		}
	}
}

// TestClusterMailboxMasteredElsewhere: node 1 looks node 2's mailbox up
// before node 2 joins (and keeps a lock on it), so node 1, not node 2,
// masters it: node 2's listeners are remote and its releases are held back
// by the lock manager until its next message to node 1 or the deferral
// timer. Slower, but every broadcast, from node 1 (which then masters the
// mailbox it writes into) and from node 3, still reaches node 2 through its
// mailbox, once, in order.
func TestClusterMailboxMasteredElsewhere(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx := withGuard(t)
	if err := c.nodes[0].b.Join(ctx); err != nil {
		t.Fatal(err)
	}
	squat, err := c.nodes[0].ls.Acquire(ctx, dlm.LockRequest{Resource: MailboxLock(2), Mode: dlm.NL})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = squat.Unlock(ctx, 0) }()
	for _, nd := range c.nodes[1:] {
		if err := nd.b.Join(ctx); err != nil {
			t.Fatal(err)
		}
	}
	master := dlm.NodeID(0)
	for _, ri := range c.nodes[1].ls.Dump() {
		if ri.Name == MailboxLock(2) {
			master = ri.Master
		}
	}
	if master != 1 {
		t.Fatalf("node 2's mailbox is mastered by node %d, want node 1 (the test's premise)", master)
	}
	var seqs []uint64
	for i := range 30 {
		from := c.nodes[0]
		if i%2 == 1 {
			from = c.nodes[2]
		}
		res, err := from.b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: uint32(i)})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(res.Acted, 2) || len(res.Failed)+len(res.Unanswered)+len(res.Departed) != 0 {
			t.Fatalf("broadcast %d: %+v", i, res)
		}
		seqs = append(seqs, res.Seq)
	}
	if got := c.nodes[1].rec.seqs(); !slices.Equal(got, seqs) {
		t.Fatalf("node 2 acted on %v, want %v", got, seqs)
	}
	var fallbacks uint64
	for _, nd := range c.nodes {
		fallbacks += nd.b.Stats().Fallbacks
	}
	if fallbacks > 2 {
		t.Fatalf("%d fallbacks to the ack locks: the mailbox path was not used", fallbacks)
	}
}

// Each receiver keeps the broadcast it took from its mailbox in its copy
// lock (what lets it survive its sender's and the message lock master's
// deaths): after every broadcast that went through the mailboxes, another
// node reading a receiver's copy lock finds that broadcast there. (The
// first broadcasts after the joins may find a listener not queued yet and
// go through the ack locks, which write no copy: those are skipped.)
func TestClusterMailboxCopyLock(t *testing.T) {
	c := startCluster(t, 3, nil)
	c.joinAll()
	ctx := withGuard(t)
	checked := 0
	for i := range 10 {
		fb := c.nodes[0].b.Stats().Fallbacks
		res, err := c.nodes[0].b.Send(ctx, Message{Type: MetadataUpdated, RaidSlot: uint32(i)})
		if err != nil {
			t.Fatal(err)
		}
		if c.nodes[0].b.Stats().Fallbacks != fb {
			continue
		}
		checked++
		for _, r := range []int{1, 2} {
			reader := c.nodes[3-r] // the other receiver
			h, err := reader.ls.Acquire(ctx, dlm.LockRequest{Resource: CopyLock(c.nodes[r].id), Mode: dlm.CR, Flags: dlm.ValBlk})
			if err != nil {
				t.Fatal(err)
			}
			e, err := DecodeEnvelope(h.LVB())
			if err != nil || e.Seq != res.Seq || e.Msg.RaidSlot != uint32(i) {
				t.Fatalf("broadcast %d: copy lock of node %d holds %+v (%v), want sequence %d", i, c.nodes[r].id, e, err, res.Seq)
			}
			if err := h.Unlock(ctx, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	if checked < 5 {
		t.Fatalf("only %d of 10 broadcasts went through the mailboxes", checked)
	}
}
