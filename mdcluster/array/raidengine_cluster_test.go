package array

import (
	"bytes"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// TestClusterRAID10 runs the manager over the RAID engine with a clustered
// raid10 (near 2, the only layout mdadm allows clustered) on four members:
// created without --assume-clean (one node resyncs the array), written
// from every node, one member failed and removed, a new disk added: it
// becomes a spare everywhere, one node activates and rebuilds it. Then the
// members of each mirror pair must hold identical data areas, and every
// node must read back what was written.
func TestClusterRAID10(t *testing.T) {
	c := newTCluster(t, 3)
	c.tweakSpec = func(s *CreateSpec) { s.Level, s.Layout, s.ChunkSize = 10, "n2", 64<<10 }
	c.fill("a.img", 1)
	c.fill("b.img", 2)
	c.createAndAssemble(false, 4, "a.img", "b.img", "c.img", "d.img")
	c.waitSynced()
	size := c.nodes[1].eng.Size()
	if want := int64(2 * (imgSize - 1<<20)); size < want*9/10 || size > want {
		t.Fatalf("raid10 n2 over four %d-byte members: %d bytes", imgSize, size)
	}
	// The resync made a's and b's data areas (one pair) identical.
	c.sameData("a.img", "b.img")
	c.sameData("c.img", "d.img")
	model := make([]byte, size)
	if _, err := c.nodes[2].eng.ReadAt(model, 0); err != nil {
		t.Fatal(err)
	}
	put := func(id int, seed byte, off int64) {
		p := pattern(seed, 64<<10)
		if err := c.nodes[node.NodeID(id)].eng.WriteAt(p, off, 0); err != nil {
			t.Fatalf("node %d: write at %d: %v", id, off, err)
		}
		copy(model[off:], p)
	}
	put(1, 10, 0)
	put(2, 20, 3<<20)
	put(3, 30, size-64<<10)
	ctx := c.ctx()
	if err := c.nodes[1].m.Fail(ctx, 0); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	put(2, 40, 64<<10) // degraded: slot 0's pair has one copy
	if err := c.nodes[1].m.Remove(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.nodes[3].m.AddSpare(ctx, c.image("e.img")); err != nil {
		t.Fatal(err)
	}
	c.waitSynced()
	c.agree("")
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberInSync); n != 4 {
			t.Fatalf("node %d: %v, want four in sync", id, c.nodes[id].m.Members())
		}
	}
	c.sameData("e.img", "b.img")
	c.sameData("c.img", "d.img")
	for _, id := range c.ids {
		got := make([]byte, size)
		if _, err := c.nodes[id].eng.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("node %d does not read back what was written", id)
		}
	}
}

// TestClusterMemberIOErrorFailsClusterWide: a write error the RAID engine
// of node 1 finds on member b.img goes through node 1's manager as a
// cluster-wide fail: every node's member list and engine end with b.img
// faulty, the write that hit the error succeeds (on a.img) and returns
// only after node 1 applied the fail, and b.img gets no more writes.
func TestClusterMemberIOErrorFailsClusterWide(t *testing.T) {
	c := newTCluster(t, 3)
	var mu sync.Mutex
	var fd *raid.FaultDevice
	c.nodes[1].openDevice = func(m EngineMember) (raid.Device, error) {
		fm := m.Member.(*FileMember)
		d, err := raid.OpenDirect(fm.path)
		if err != nil {
			return nil, err
		}
		if filepath.Base(fm.path) != "b.img" {
			return d, nil
		}
		f := raid.NewFaultDevice(d)
		mu.Lock()
		fd = f
		mu.Unlock()
		return f, nil
	}
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.writeSome(1, 1, 0)
	mu.Lock()
	fd.Inject(raid.Fault{Ops: raid.OpWrite})
	mu.Unlock()
	c.writeSome(1, 2, 1<<20)
	var faulty uint32 = 1 << 31
	for _, s := range c.nodes[1].m.Members() {
		if s.State == MemberFaulty {
			faulty = s.Dev
		}
	}
	if faulty == 1<<31 {
		t.Fatalf("the write returned before node 1 recorded the failure: %v", c.nodes[1].m.Members())
	}
	c.agree("")
	for _, id := range c.ids {
		if ms := c.nodes[id].m.Members(); countState(ms, MemberFaulty) != 1 || countState(ms, MemberInSync) != 1 {
			t.Fatalf("node %d: %v, want b.img faulty", id, ms)
		}
	}
	// Later writes from every node reach a.img only; the data is there.
	c.writeSome(2, 3, 2<<20)
	c.writeSome(3, 4, 3<<20)
	a := c.dataOf("a.img")
	for i, w := range []struct {
		seed byte
		off  int64
	}{{2, 1 << 20}, {3, 2 << 20}, {4, 3 << 20}} {
		if !bytes.Equal(a[w.off:w.off+64<<10], pattern(w.seed, 64<<10)) {
			t.Fatalf("write %d not on a.img", i)
		}
	}
}

// refusingOwner wraps a bitmap ownership like the daemon's lease.Owner:
// every check is counted and may be refused.
type refusingOwner struct {
	intent.Ownership
	checks *atomic.Int64
	refuse *atomic.Bool
}

func (o refusingOwner) Check() error {
	o.checks.Add(1)
	if o.refuse.Load() {
		return errors.New("test: lease does not hold")
	}
	return o.Ownership.Check()
}

// TestClusterBitmapOwnerWrapped: Config.WrapBitmapOwner is what the write
// intent checks before each bitmap flush (the daemon puts its lease
// there): node 2's writes check it, and once it refuses, node 2's writes
// to clean chunks fail while node 1's go on.
func TestClusterBitmapOwnerWrapped(t *testing.T) {
	c := newTCluster(t, 3)
	var checks atomic.Int64
	var refuse atomic.Bool
	for _, id := range c.ids {
		if id == 2 {
			c.manager(id, func(cfg *Config) {
				cfg.WrapBitmapOwner = func(o intent.Ownership) intent.Ownership {
					return refusingOwner{Ownership: o, checks: &checks, refuse: &refuse}
				}
			})
		} else {
			c.manager(id, nil)
		}
	}
	c.createAndAssemble(true, 2, "a.img", "b.img")
	c.writeSome(2, 1, 0)
	if checks.Load() == 0 {
		t.Fatal("node 2's bitmap flush did not check the wrapped ownership")
	}
	refuse.Store(true)
	if err := c.nodes[2].eng.WriteAt(pattern(2, 4096), 5<<20, 0); err == nil {
		t.Fatal("node 2 wrote to a clean chunk although its bitmap owner refuses")
	}
	c.writeSome(1, 3, 5<<20)
}
