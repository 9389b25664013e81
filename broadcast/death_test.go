package broadcast

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/dlm"
)

// senderDiesMidBroadcast starts three nodes, all joined, and has node 1
// publish a broadcast, get node 2's answer, and die before it asks node 3
// (its Parallel asks the receivers one at a time and hangs after the
// first). deafNode3 keeps recovery events from node 3's broadcaster. It
// returns the cluster and the sequence number of the half-delivered
// broadcast, after node 1 was removed from the view.
func senderDiesMidBroadcast(t *testing.T, deafNode3 bool) (*tcluster, uint64) {
	t.Helper()
	var armed atomic.Bool
	published := make(chan struct{})
	hang := make(chan struct{})
	c := startCluster(t, 3, func(cfg *Config) {
		if cfg.Self != 1 {
			return
		}
		cfg.Parallel = func(n int, task func(int)) {
			if !armed.Load() {
				Sequential(n, task)
				return
			}
			task(0) // node 2
			close(published)
			<-hang // node 1 is dead before it asks node 3
		}
	})
	t.Cleanup(func() { close(hang) })
	c.joinAll()
	if deafNode3 {
		c.nodes[2].deaf()
	}
	armed.Store(true)
	go func() { _, _ = c.nodes[0].b.Send(context.Background(), Message{Type: MetadataUpdated, RaidSlot: 5}) }()
	<-published
	d2 := c.nodes[1].rec.deliveries()
	if len(d2) != 1 || d2[0].From != 1 {
		t.Fatalf("node 2 before the crash: %+v", d2)
	}
	if d3 := c.nodes[2].rec.deliveries(); len(d3) != 0 {
		t.Fatalf("node 3 was notified: %+v", d3)
	}
	c.kill(0)
	return c, d2[0].Seq
}

// TestClusterSenderKilledMidBroadcastCatchUp: node 1 dies after node 2
// acted on its broadcast and before node 3 was asked. Nobody hangs: node
// 3 catches up by itself when recovery ends (the message lock still holds
// the broadcast and its sender departed), acting on it exactly once; the
// next broadcast finds both survivors in step and node 2 does not act
// twice.
func TestClusterSenderKilledMidBroadcastCatchUp(t *testing.T) {
	c, seq := senderDiesMidBroadcast(t, false)
	eventually(t, "node 3 catching up", func() bool { return len(c.nodes[2].rec.deliveries()) == 1 })
	if d := c.nodes[2].rec.deliveries()[0]; d.Seq != seq || d.From != 1 || d.Msg.RaidSlot != 5 {
		t.Fatalf("node 3 caught up on %+v, want broadcast %d from node 1", d, seq)
	}
	res, err := c.nodes[1].b.Send(withGuard(t), Message{Type: MetadataUpdated, RaidSlot: 6})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 3)
	if d := c.nodes[2].rec.seqs(); !slices.Equal(d, []uint64{seq, res.Seq}) {
		t.Fatalf("node 3 acted on %v", d)
	}
	if d := c.nodes[1].rec.seqs(); !slices.Equal(d, []uint64{seq}) {
		t.Fatalf("node 2 acted on %v", d)
	}
}

// TestClusterSenderKilledMidBroadcastFinish: the same crash, but node 3
// hears of no recovery (its Locker delivers no events). The next sender,
// node 2, finds that the token's holder died with it and finishes the
// broadcast before its own: node 3 acts on node 1's broadcast and then on
// node 2's, in that order; node 2 does not act twice; node 1 is reported
// departed by the finishing round.
func TestClusterSenderKilledMidBroadcastFinish(t *testing.T) {
	c, seq := senderDiesMidBroadcast(t, true)
	res, err := c.nodes[1].b.Send(withGuard(t), Message{Type: MetadataUpdated, RaidSlot: 6})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 3)
	if res.Seq != seq+1 {
		t.Fatalf("node 2's broadcast is %d after %d", res.Seq, seq)
	}
	d3 := c.nodes[2].rec.deliveries()
	if len(d3) != 2 || d3[0].Seq != seq || d3[0].From != 1 || d3[0].Msg.RaidSlot != 5 || d3[1].Seq != res.Seq || d3[1].From != 2 {
		t.Fatalf("node 3 acted on %+v", d3)
	}
	if d := c.nodes[1].rec.seqs(); !slices.Equal(d, []uint64{seq}) {
		t.Fatalf("node 2 acted on %v", d)
	}
	if s := c.nodes[1].b.Stats(); s.Finishes != 1 {
		t.Fatalf("node 2 stats %+v", s)
	}
	// The finishing round found node 1 gone and took it off the token's
	// joined list; later broadcasts do not ask it (node 3 has no view).
	res, err = c.nodes[2].b.Send(withGuard(t), Message{Type: MetadataUpdated, RaidSlot: 7})
	if err != nil {
		t.Fatal(err)
	}
	expectActed(t, res, 2)
	if len(res.NotJoined) != 0 {
		// Node 3's view is still the one it started with (1, 2, 3): node 1
		// is asked and found not joined; that is all.
		if !slices.Equal(res.NotJoined, []dlm.NodeID{1}) {
			t.Fatalf("result %+v", res)
		}
	}
}
