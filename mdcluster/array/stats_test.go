package array

import (
	"testing"
)

// TestClusterStatsForMetrics: the counters the daemon exports at scrape
// time move with the array. Before assembly there is no broadcast; a fail
// on node 1 is a broadcast it sends (counted with its latency) and node 2
// acts on; node 1's engine counts its writes and is degraded after the
// fail, node 2's engine is degraded too once it applied the fail.
func TestClusterStatsForMetrics(t *testing.T) {
	c := newTCluster(t, 2)
	for _, id := range c.ids {
		c.manager(id, nil)
	}
	if _, ok := c.nodes[1].m.BroadcastStats(); ok {
		t.Fatal("broadcast stats before assembly")
	}
	if s := c.nodes[1].eng.Stats(); s.Running || s.Stats.Writes != 0 {
		t.Fatalf("engine stats before assembly: %+v", s)
	}
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.writeSome(1, 7, 0, 1<<20)
	es := c.nodes[1].eng.Stats()
	if !es.Running || es.Degraded || es.Stats.Writes < 2 || es.Stats.BytesWritten < 2*4096 {
		t.Fatalf("node 1's engine after two writes: %+v", es)
	}
	before, ok := c.nodes[1].m.BroadcastStats()
	if !ok {
		t.Fatal("no broadcast stats on a running array")
	}
	recvBefore, _ := c.nodes[2].m.BroadcastStats()
	if err := c.nodes[1].m.Fail(c.ctx(), 1); err != nil {
		t.Fatal(err)
	}
	after, _ := c.nodes[1].m.BroadcastStats()
	if after.Sends <= before.Sends || after.SendOK <= before.SendOK || after.SendTime <= before.SendTime {
		t.Fatalf("node 1's broadcast after a fail: sends %d->%d, ok %d->%d, time %v->%v", before.Sends, after.Sends,
			before.SendOK, after.SendOK, before.SendTime, after.SendTime)
	}
	if after.AvgSend <= 0 || after.AvgSend > after.SendTime {
		t.Fatalf("average send %v outside (0, total %v]", after.AvgSend, after.SendTime)
	}
	eventually(t, guard, func() bool {
		r, _ := c.nodes[2].m.BroadcastStats()
		return r.Receives > recvBefore.Receives && c.nodes[2].eng.Stats().Degraded
	}, "node 2 to receive the fail and run degraded")
	if !c.nodes[1].eng.Stats().Degraded {
		t.Fatal("node 1 not degraded after failing a member")
	}
}
