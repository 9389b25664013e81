package array

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/node"
	"golang.org/x/sys/unix"
)

// openTracker counts, per node and device name, the handles a manager
// opened through Config.Open and has not closed yet.
type openTracker struct {
	mu   sync.Mutex
	open map[node.NodeID]map[string]int
}

// trackedMember is a FileMember whose Close the tracker sees.
type trackedMember struct {
	*FileMember
	once sync.Once
	done func()
}

func (m *trackedMember) Close() error {
	m.once.Do(m.done)
	return m.FileMember.Close()
}

// wrap makes node id's Open hook count its handles.
func (tr *openTracker) wrap(id node.NodeID) func(*Config) {
	return func(cfg *Config) {
		inner := cfg.Open
		cfg.Open = func(p string) (Member, error) {
			d, err := inner(p)
			if err != nil {
				return nil, err
			}
			name := filepath.Base(p)
			tr.mu.Lock()
			tr.open[id][name]++
			tr.mu.Unlock()
			return &trackedMember{FileMember: d.(*FileMember), done: func() {
				tr.mu.Lock()
				tr.open[id][name]--
				tr.mu.Unlock()
			}}, nil
		}
	}
}

func (tr *openTracker) count(id node.NodeID, name string) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.open[id][name]
}

// waitOpen waits until every node holds exactly want handles of name.
func (c *tcluster) waitOpen(tr *openTracker, name string, want int) {
	c.t.Helper()
	eventually(c.t, guard, func() bool {
		for _, id := range c.ids {
			if tr.count(id, name) != want {
				return false
			}
		}
		return true
	}, fmt.Sprintf("every node to hold %d open handle(s) of %s", want, name))
}

// devOf returns the device number node id binds at the image name.
func (c *tcluster) devOf(id node.NodeID, name string) uint32 {
	c.t.Helper()
	for _, s := range c.nodes[id].m.Members() {
		if filepath.Base(s.Path) == name {
			return s.Dev
		}
	}
	c.t.Fatalf("node %d binds no member at %s: %v", id, name, c.nodes[id].m.Members())
	return 0
}

// TestClusterRemovedDeviceReleased: once a member is removed cluster-wide
// (a failed member, or a spare), every node closes it (for a block device
// that ends its O_EXCL claim), and the reloads that follow do not open it
// again although its superblock still names the array; re-adding it, or
// adding it again after its superblock was zeroed, opens it again on
// every node.
func TestClusterRemovedDeviceReleased(t *testing.T) {
	c := newTCluster(t, 3)
	tr := &openTracker{open: map[node.NodeID]map[string]int{}}
	for _, id := range c.ids {
		tr.open[id] = map[string]int{}
		c.manager(id, tr.wrap(id))
	}
	c.createAndAssemble(true, 2, "a.img", "b.img", "c.img")
	ctx := c.ctx()
	c.agree("")
	for _, name := range []string{"a.img", "b.img", "c.img"} {
		c.waitOpen(tr, name, 1)
	}
	c.writeSome(1, 1, 0, 2<<20)

	// A failed member stays bound (faulty) until it is removed.
	b := c.devOf(1, "b.img")
	if err := c.nodes[1].m.Fail(ctx, b); err != nil {
		t.Fatal(err)
	}
	c.waitSynced() // the spare c.img takes b's slot
	c.agree("")
	c.waitOpen(tr, "b.img", 1)
	if err := c.nodes[2].m.Remove(ctx, b); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.waitOpen(tr, "b.img", 0)

	// More changes (every node re-reads the members) leave it closed.
	c.writeSome(2, 2, 1<<20)
	if err := c.nodes[3].m.Fail(ctx, c.devOf(3, "c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	if err := c.nodes[3].m.Remove(ctx, c.devOf(3, "c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.waitOpen(tr, "c.img", 0)
	for _, id := range c.ids {
		if n := tr.count(id, "b.img"); n != 0 {
			t.Fatalf("node %d opened the removed b.img again (%d handles)", id, n)
		}
	}

	// Re-add: every node opens it again and it recovers.
	if _, err := c.nodes[3].m.ReAdd(ctx, c.image("b.img")); err != nil {
		t.Fatal(err)
	}
	c.waitOpen(tr, "b.img", 1)
	c.waitSynced()
	c.agree("")
	c.sameData("a.img", "b.img")

	// c.img (removed) is zeroed, as mdadm --zero-superblock would, and
	// added again as a new disk: a spare on every node.
	z, err := OpenFile(c.image("c.img"), true)
	if err != nil {
		t.Fatal(err)
	}
	if err := zeroSuper(z); err != nil {
		t.Fatal(err)
	}
	z.Close()
	if _, err := c.nodes[1].m.AddSpare(ctx, c.image("c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.waitOpen(tr, "c.img", 1)
	for _, id := range c.ids {
		if n := countState(c.nodes[id].m.Members(), MemberSpare); n != 1 {
			t.Fatalf("node %d: %v, want c.img a spare", id, c.nodes[id].m.Members())
		}
	}
	// A spare removed: its superblock is marked removed; closed everywhere.
	if err := c.nodes[2].m.Remove(ctx, c.devOf(2, "c.img")); err != nil {
		t.Fatal(err)
	}
	c.agree("")
	c.waitOpen(tr, "c.img", 0)
	c.waitOpen(tr, "a.img", 1)
	c.waitOpen(tr, "b.img", 1)
}

// exclFree reports whether path can be opened with O_EXCL now (no one
// claims it), closing it again at once.
func exclFree(t *testing.T, path string) bool {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err == nil {
		unix.Close(fd)
		return true
	}
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("open %s O_EXCL: %v", path, err)
	}
	return false
}

// TestRemovedBlockDeviceUnclaimed is TestClusterRemovedDeviceReleased's
// claim on real block devices (loop devices, one node: O_EXCL is
// system-wide): a member holds its O_EXCL claim while bound (faulty
// included), loses it once removed, so that another exclusive opener
// (mdadm --zero-superblock, mkfs) gets the device, and re-add and add
// claim it again.
func TestRemovedBlockDeviceUnclaimed(t *testing.T) {
	c := newTCluster(t, 1)
	la, lb := attachLoop(t, c.image("a.img"), true), attachLoop(t, c.image("b.img"), true)
	m := c.manager(1, func(cfg *Config) { cfg.Devices = []string{la, lb} })
	ctx := c.ctx()
	if _, err := m.Create(ctx, spec(true, 2), []string{la, lb}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Stop(ctx); err != nil {
			t.Error(err)
		}
	}()
	if exclFree(t, la) || exclFree(t, lb) {
		t.Fatal("a member of the running array is not claimed")
	}
	dev := c.devOf(1, filepath.Base(lb))
	failRemove := func() {
		t.Helper()
		if err := m.Fail(ctx, dev); err != nil {
			t.Fatal(err)
		}
		if exclFree(t, lb) {
			t.Fatal("a faulty member (not removed yet) is not claimed")
		}
		if err := m.Remove(ctx, dev); err != nil {
			t.Fatal(err)
		}
		if !exclFree(t, lb) {
			t.Fatal("the removed member is still claimed")
		}
	}
	failRemove()
	c.writeSome(1, 3, 0, 1<<20)
	if _, err := m.ReAdd(ctx, lb); err != nil {
		t.Fatal(err)
	}
	if exclFree(t, lb) {
		t.Fatal("the re-added member is not claimed")
	}
	c.waitSynced()
	failRemove()
	// Zeroed by an exclusive opener, then added as a new disk.
	z, err := OpenFile(lb, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := zeroSuper(z); err != nil {
		t.Fatal(err)
	}
	z.Close()
	if _, err := m.AddSpare(ctx, lb); err != nil {
		t.Fatal(err)
	}
	if exclFree(t, lb) {
		t.Fatal("the added disk is not claimed")
	}
	c.waitSynced()
	if n := countState(m.Members(), MemberInSync); n != 2 {
		t.Fatalf("members %v, want both in sync", m.Members())
	}
}

// TestCreateRefusedReleasesDevices: a refused Create does not leave the
// devices it was given open (claimed) on the stopped manager.
func TestCreateRefusedReleasesDevices(t *testing.T) {
	c := newTCluster(t, 1)
	tr := &openTracker{open: map[node.NodeID]map[string]int{1: {}}}
	m := c.manager(1, tr.wrap(1))
	sp := spec(true, 2)
	sp.Level = 5
	if _, err := m.Create(c.ctx(), sp, []string{c.image("a.img"), c.image("b.img")}); err == nil {
		t.Fatal("create of a raid5 succeeded, want refused")
	}
	for _, name := range []string{"a.img", "b.img"} {
		if n := tr.count(1, name); n != 0 {
			t.Fatalf("%s: %d handles still open after the refused create", name, n)
		}
	}
	// The devices are usable: the right create succeeds.
	if _, err := m.Create(c.ctx(), spec(true, 2), []string{c.image("a.img"), c.image("b.img")}); err != nil {
		t.Fatal(err)
	}
	if tr.count(1, "a.img") != 1 || tr.count(1, "b.img") != 1 {
		t.Fatalf("after create: a.img %d, b.img %d handles, want 1 each", tr.count(1, "a.img"), tr.count(1, "b.img"))
	}
	if err := m.Stop(c.ctx()); err != nil {
		t.Fatal(err)
	}
	if tr.count(1, "a.img") != 0 || tr.count(1, "b.img") != 0 {
		t.Fatal("devices still open after Stop")
	}
}
