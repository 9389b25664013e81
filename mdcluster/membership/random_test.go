package membership_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
	. "github.com/mdcluster/mdcluster/mdcluster/membership"
)

// TestRandomized runs whole clusters under seeded chaos (delays, drops,
// duplicates, reordering, partitions, crashes and restarts, graceful leaves,
// failing fences, fences that power the victim off or leave it running cut
// off from storage, one node's detector briefly suspecting live peers) and
// checks the invariants after every Ready (see cluster.check), among them
// that a node fenced after its last install is readmitted only with Reset. After the
// chaos the network heals and every node that is down restarts; the cluster
// must then converge on one view of all nodes. Then, in three seeds of four,
// one node's detector suspects live peers for a moment once more. No node's
// lock
// manager may stay stopped (every Stop and every loss of quorum is followed
// by an Install), and the settled cluster must then stay quiet.
//
// MEMBERSHIP_SEED=n replays one seed with a trace; MEMBERSHIP_SEEDS=n runs
// n seeds (default 300).
func TestRandomized(t *testing.T) {
	if s := os.Getenv("MEMBERSHIP_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("MEMBERSHIP_SEED=%q: %v", s, err)
		}
		c, msg := runSeed(t, seed)
		t.Logf("views installed: %d, fence requests: %d, stale drops: %d", len(c.views), c.fenceCalls, staleDrops(c))
		if msg != "" {
			t.Fatalf("seed %d: %s\n%s\ntrace:\n%s", seed, msg, c.describe(), c.dumpTrace())
		}
		return
	}
	seeds := 300
	if testing.Short() {
		seeds = 60
	}
	if s := os.Getenv("MEMBERSHIP_SEEDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("MEMBERSHIP_SEEDS=%q: %v", s, err)
		}
		seeds = n
	}
	views, fences, installs := 0, 0, 0
	for seed := uint64(1); seed <= uint64(seeds); seed++ {
		c, msg := runSeed(t, seed)
		views += len(c.views)
		fences += c.fenceCalls
		installs += c.installsN
		if msg != "" {
			t.Fatalf("seed %d: %s\nreplay: MEMBERSHIP_SEED=%d go test -run 'TestRandomized$' ./mdcluster/membership/", seed, msg, seed)
		}
	}
	t.Logf("%d seeds: %d views agreed, %d installs, %d fence requests", seeds, views, installs, fences)
}

func staleDrops(c *cluster) uint64 {
	var n uint64
	for _, id := range c.ids {
		if nd := c.nodes[id]; nd.up {
			n += nd.a.Stats().Stale
		}
	}
	return n
}

// randomShape picks a quorum configuration: 3 to 5 data nodes with a
// majority quorum, or 4 with a tie-breaker, plus up to two non-data nodes.
func randomShape(c *cluster) (ddraid.Config, []NodeID) {
	var q ddraid.Config
	switch c.rng.IntN(4) {
	case 0:
		q = ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}
	case 1:
		q = ddraid.Config{DataNodes: []NodeID{1, 2, 3, 4, 5}, Quorum: 3}
	case 2:
		q = ddraid.Config{DataNodes: []NodeID{2, 3, 4, 5}, Quorum: 2, TieBreaker: 4}
	default:
		q = ddraid.Config{DataNodes: []NodeID{3, 5, 7}, Quorum: 2}
	}
	var extra []NodeID
	for i := range c.rng.IntN(3) {
		extra = append(extra, NodeID(1+i*5)) // 1 or 6; 1 is data in some shapes (then it is a no-op)
	}
	extra = Minus(Normalize(extra), Normalize(q.DataNodes))
	q.NonDataNodes = extra
	return q, extra
}

func runSeed(t testing.TB, seed uint64) (*cluster, string) {
	probe := newCluster(t, seed, ddraid.Config{DataNodes: []NodeID{1}, Quorum: 1}, nil, simNet{})
	q, extra := randomShape(probe)
	r := probe.rng
	net := simNet{
		MaxDelay:  1 + r.IntN(4),
		Drop:      []float64{0, 0.02, 0.1}[r.IntN(3)],
		Dup:       []float64{0, 0.05}[r.IntN(2)],
		FDLag:     r.IntN(4),
		FenceFail: []float64{0, 0.2, 0.5}[r.IntN(3)],
		FenceLag:  1 + r.IntN(3),
		// Drawn last, so the other parameters of each seed stay as they were.
		StorageFence: []float64{0, 0.5, 1}[r.IntN(3)],
	}
	c := newCluster(t, seed, q, extra, net)
	c.rng = r
	// The start-up wait (StartupFenceAfter, ticks; PrepareTimeout is 12)
	// on half the seeds, from a stream of its own so that each seed's
	// shape, network and chaos stay what they were.
	wr := rand.New(rand.NewPCG(seed, seed^0x5eed5a17f00d))
	if wait := []int{0, 0, 12, 36}[wr.IntN(4)]; wait > 0 {
		c.mkCfg = func(cfg Config) Config { cfg.StartupFenceAfter = wait; return cfg }
	}
	for _, id := range c.ids {
		c.start(id)
	}
	const chaos = 800
	for range chaos {
		if c.failed != "" {
			return c, c.failed
		}
		c.chaosAction()
		c.step()
	}
	if c.failed != "" {
		return c, c.failed
	}
	// Heal: no more loss or failing fences, everyone back.
	c.tracef("--- healing ---")
	c.net.Drop, c.net.FenceFail = 0, 0
	c.heal()
	for _, id := range c.ids {
		if n := c.nodes[id]; n.up && Leaving(n.a) {
			// A leave that cannot complete (its quorum would break) is
			// abandoned by restarting the daemon.
			c.crash(id)
		}
		if !c.nodes[id].up {
			c.start(id)
		}
	}
	if !c.runUntil(4000, c.converged) {
		if c.failed != "" {
			return c, c.failed
		}
		return c, fmt.Sprintf("no convergence after healing:\n%s", c.describe())
	}
	// One last false suspicion on a settled cluster: a node loses quorum,
	// or starts (and maybe abandons) a change, while nobody failed.
	if r.IntN(4) != 0 {
		var keep []NodeID
		for _, o := range c.ids {
			if r.IntN(2) == 0 {
				keep = append(keep, o)
			}
		}
		ticks := 1 + r.IntN(20)
		c.flap(c.ids[r.IntN(len(c.ids))], keep, 0, ticks)
		c.run(ticks + 1)
	}
	// No member may be left with its lock manager stopped: every Stop or
	// loss of quorum is followed by an Install once the cluster is stable
	// (the lock manager resumes only through recovery of a new view, which
	// needs every member). And once nobody is stopped, nothing more happens.
	// (A restart not yet readmitted with Rejoined still costs a view.)
	resumed := func() bool {
		for _, id := range c.ids {
			if n := c.nodes[id]; n.up && Restarted(n.a) {
				return false
			}
		}
		return len(c.stoppedNodes()) == 0 && c.converged() && c.detectorsSettled()
	}
	if !c.runUntil(2000, resumed) {
		if c.failed != "" {
			return c, c.failed
		}
		return c, fmt.Sprintf("lock manager still stopped on %v after healing:\n%s", c.stoppedNodes(), c.describe())
	}
	installs := c.installsN
	c.run(300)
	if c.failed == "" && (c.installsN != installs || !resumed()) {
		return c, fmt.Sprintf("a settled cluster kept changing: %d more installs, stopped %v:\n%s",
			c.installsN-installs, c.stoppedNodes(), c.describe())
	}
	return c, c.failed
}

func (c *cluster) chaosAction() {
	r := c.rng
	var up, down []NodeID
	for _, id := range c.ids {
		if c.nodes[id].up {
			up = append(up, id)
		} else {
			down = append(down, id)
		}
	}
	switch p := r.Float64(); {
	case p < 0.008 && len(up) > 0:
		c.crash(up[r.IntN(len(up))])
	case p < 0.025 && len(down) > 0:
		c.start(down[r.IntN(len(down))])
	case p < 0.033:
		g := map[NodeID]int{}
		for _, id := range c.ids {
			g[id] = r.IntN(2)
		}
		c.partition(g)
	case p < 0.043:
		c.heal()
	case p < 0.046 && len(up) > 0:
		id := up[r.IntN(len(up))]
		c.tracef("%s leaves", id)
		c.nodes[id].a.Leave()
		c.process(c.nodes[id])
	case p < 0.054 && len(up) > 0:
		// One node's detector falsely suspects some peers for a moment
		// (often enough to lose quorum, or to start and then abandon a
		// change).
		id := up[r.IntN(len(up))]
		var keep []NodeID
		for _, o := range c.ids {
			if r.IntN(2) == 0 {
				keep = append(keep, o)
			}
		}
		c.flap(id, keep, r.IntN(3), 1+r.IntN(20))
	}
}
