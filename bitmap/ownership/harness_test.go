package ownership_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
)

const (
	chunkSize = 64 << 10
	nChunks   = 16
	dataOff   = 64 << 10
	diskSize  = dataOff + nChunks*chunkSize
	bmStart   = 8192
	nNodes    = 3
	guard     = 60 * time.Second // generous: no timing is asserted
)

var testKey = []byte("ownership-test-cluster-key-0123456789")

// ioOp describes one device operation a host is about to perform.
type ioOp struct {
	host   int
	write  bool // false: sync
	read   bool
	mirror int
	off    int64
	n      int
}

// host is one machine's view of the shared disks: its own volatile write
// cache in front of each shared disk (writes reach the shared disk at Sync),
// and a crash hook consulted before each operation. A crash drops the cache
// (a seeded subset of it reaches the disks, as a power cut may leave some
// issued writes done) and fails every later operation.
type host struct {
	id   int
	mu   sync.Mutex
	ops  int
	hook func(op ioOp, n int) bool // return true to crash before op number n
	dead bool
	rng  *rand.Rand
	devs []*hostDev
	at   ioOp // the operation the crash happened before
	// onCrash runs right after a hook-triggered crash (outside mu).
	onCrash func()
	// opDelay, when set, makes every I/O operation last that long, and
	// inflight/maxInflight count the operations running at once (the
	// rig with parallel mirror I/O).
	opDelay     time.Duration
	inflight    atomic.Int32
	maxInflight atomic.Int32
}

// io runs one operation's body, counting overlapping ones.
func (h *host) io(f func()) {
	if h.opDelay == 0 {
		f()
		return
	}
	n := h.inflight.Add(1)
	for {
		m := h.maxInflight.Load()
		if n <= m || h.maxInflight.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(h.opDelay)
	f()
	h.inflight.Add(-1)
}

type hostDev struct {
	h       *host
	mirror  int
	disk    *intent.MemDisk
	pending []pendingWrite
}

type pendingWrite struct {
	off  int64
	data []byte
}

func (h *host) step(op ioOp) error {
	h.mu.Lock()
	if h.dead {
		h.mu.Unlock()
		return intent.ErrCrashed
	}
	if h.hook != nil && h.hook(op, h.ops) {
		h.crashLocked(op)
		onCrash := h.onCrash
		h.mu.Unlock()
		if onCrash != nil {
			onCrash() // the machine is gone: its software stops at once
		}
		return intent.ErrCrashed
	}
	h.ops++
	h.mu.Unlock()
	return nil
}

// crashLocked kills the host: each cached write survives with probability
// one half (seeded), the rest is lost.
func (h *host) crashLocked(op ioOp) {
	h.dead, h.at = true, op
	for _, d := range h.devs {
		for _, w := range d.pending {
			if h.rng.IntN(2) == 0 {
				_, _ = d.disk.WriteAt(w.data, w.off)
			}
		}
		d.pending = nil
		_ = d.disk.Sync()
	}
}

func (h *host) crash() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.dead {
		h.crashLocked(ioOp{host: h.id})
	}
}

func (h *host) crashed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dead
}

func (d *hostDev) ReadAt(p []byte, off int64) (int, error) {
	if err := d.h.step(ioOp{host: d.h.id, read: true, mirror: d.mirror, off: off, n: len(p)}); err != nil {
		return 0, err
	}
	var n int
	var err error
	d.h.io(func() {
		d.h.mu.Lock()
		defer d.h.mu.Unlock()
		n, err = d.disk.ReadAt(p, off)
		for _, w := range d.pending {
			lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.data)))
			if lo < hi {
				copy(p[lo-off:hi-off], w.data[lo-w.off:hi-w.off])
			}
		}
	})
	return n, err
}

func (d *hostDev) WriteAt(p []byte, off int64) (int, error) {
	if err := d.h.step(ioOp{host: d.h.id, write: true, mirror: d.mirror, off: off, n: len(p)}); err != nil {
		return 0, err
	}
	d.h.io(func() {
		d.h.mu.Lock()
		defer d.h.mu.Unlock()
		d.pending = append(d.pending, pendingWrite{off: off, data: slices.Clone(p)})
	})
	return len(p), nil
}

func (d *hostDev) Sync() error {
	if err := d.h.step(ioOp{host: d.h.id, mirror: d.mirror}); err != nil {
		return err
	}
	var err error
	d.h.io(func() {
		d.h.mu.Lock()
		defer d.h.mu.Unlock()
		for _, w := range d.pending {
			if _, err = d.disk.WriteAt(w.data, w.off); err != nil {
				return
			}
		}
		d.pending = nil
		err = d.disk.Sync()
	})
	return err
}

// array is the test RAID1: writes go through the node's write intent to
// both mirrors; Resync copies mirror 0 to mirror 1. A lock per chunk,
// shared by all nodes (in-process), stands in for md's resync barrier.
type array struct {
	mu       sync.Mutex
	barrier  *[nChunks]sync.Mutex
	h        *host
	resynced [][]uint64
}

func (a *array) Resync(ctx context.Context, chunks []uint64) error {
	a.mu.Lock()
	a.resynced = append(a.resynced, slices.Clone(chunks))
	a.mu.Unlock()
	buf := make([]byte, chunkSize)
	for _, c := range chunks {
		a.barrier[c].Lock()
		off := int64(dataOff + c*chunkSize)
		_, err := a.h.devs[0].ReadAt(buf, off)
		if err == nil {
			_, err = a.h.devs[1].WriteAt(buf, off)
		}
		a.barrier[c].Unlock()
		if err != nil {
			return fmt.Errorf("resync chunk %d: %w", c, err)
		}
	}
	return a.h.devs[1].Sync()
}

func (a *array) allResynced() []uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []uint64
	for _, r := range a.resynced {
		out = append(out, r...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// node is one cluster member: its DLM node, host and ownership driver.
type node struct {
	id   dlm.NodeID
	dlm  *dlm.Node
	ls   *dlm.Lockspace
	h    *host
	arr  *array
	drv  *ownership.Driver
	gone bool
	// recovered receives the outcome of each slot recovery that recovery
	// events started (Config.OnRecovered).
	recovered chan error
}

// rig is three nodes over loopback TCP sharing two mirrors.
type rig struct {
	t      testing.TB
	disks  []*intent.MemDisk
	layout bitmap.Layout
	nodes  []*node
	gen    uint64
	seq    byte
	// written: chunks written since the last clean point (by anyone).
	written map[uint64]bool
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return quiet()
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

func testSuper() bitmap.Superblock {
	sb := bitmap.Superblock{
		Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: nNodes,
		UUID: [16]byte{7, 7, 7}, SyncSize: nChunks * chunkSize / 512,
		ChunkSize: chunkSize, DaemonSleep: 5,
	}
	_ = sb.SetName("owners")
	return sb
}

func ctxFor(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	t.Cleanup(cancel)
	return ctx
}

// newRig formats two shared mirrors and starts three DLM nodes; seed drives
// which cached writes survive a crash. It does not join the drivers.
func newRig(t testing.TB, seed uint64) *rig {
	t.Helper()
	return newRigWith(t, seed, nil, 0)
}

// newRigWith is newRig with the drivers' Config.Parallel set to parallel
// and every I/O operation lasting opDelay.
func newRigWith(t testing.TB, seed uint64, parallel func(int, func(int)), opDelay time.Duration) *rig {
	t.Helper()
	r := &rig{t: t, gen: 1, written: map[uint64]bool{}}
	sb := testSuper()
	l, err := bitmap.NewLayout(&sb, bmStart, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.CheckFits(bmStart, dataOff); err != nil {
		t.Fatal(err)
	}
	r.layout = l
	for i := 0; i < 2; i++ {
		d := intent.NewMemDisk(fmt.Sprintf("m%d", i), diskSize, nil)
		if err := bitmap.Format(d, sb, l, false); err != nil {
			t.Fatal(err)
		}
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
		r.disks = append(r.disks, d)
	}
	addrs := map[dlm.NodeID]string{}
	lns := map[dlm.NodeID]net.Listener{}
	for i := 1; i <= nNodes; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[dlm.NodeID(i)], addrs[dlm.NodeID(i)] = ln, ln.Addr().String()
	}
	barrier := new([nChunks]sync.Mutex)
	lg := testLogger(t)
	for i := 1; i <= nNodes; i++ {
		id := dlm.NodeID(i)
		peers := map[dlm.NodeID]string{}
		for p, a := range addrs {
			if p != id {
				peers[p] = a
			}
		}
		dn, err := dlm.NewNode(dlm.Config{ID: id, Peers: peers, Listener: lns[id], ClusterKey: testKey, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = dn.Close() })
		ls, err := dn.Open("7f000000-0000-0000-0000-0000000000aa", dlm.OpenOptions{LVBLen: ownership.LVBSize})
		if err != nil {
			t.Fatal(err)
		}
		h := &host{id: i, rng: rand.New(rand.NewPCG(seed, uint64(i))), opDelay: opDelay}
		var mirrors []intent.Device
		for m, d := range r.disks {
			hd := &hostDev{h: h, mirror: m, disk: d}
			h.devs = append(h.devs, hd)
			mirrors = append(mirrors, hd)
		}
		arr := &array{h: h, barrier: barrier}
		recovered := make(chan error, 8)
		drv, err := ownership.New(ownership.Config{
			Lockspace: ls, Node: id, Layout: l, Mirrors: mirrors, Array: arr, Parallel: parallel,
			Logger:      lg.With("test_node", i),
			OnRecovered: func(_ uint64, _ []dlm.NodeID, err error) { recovered <- err },
		})
		if err != nil {
			t.Fatal(err)
		}
		h.onCrash = drv.Close
		r.nodes = append(r.nodes, &node{id: id, dlm: dn, ls: ls, h: h, arr: arr, drv: drv, recovered: recovered})
	}
	return r
}

// joinAll joins every node's driver, one after the other.
func (r *rig) joinAll(ctx context.Context) {
	r.t.Helper()
	for _, n := range r.nodes {
		if err := n.drv.Join(ctx); err != nil {
			r.t.Fatalf("node %d join: %v", n.id, err)
		}
	}
}

func (r *rig) node(id int) *node { return r.nodes[id-1] }

// write does a mirrored 4 KiB write at data offset off from node n: intent
// first, then mirror 0, then mirror 1 (the point between the two is "during
// the data write"), then completion.
func (r *rig) write(n *node, off int64, now time.Duration) error {
	in := n.drv.Intent()
	c := uint64(off / chunkSize)
	r.written[c] = true
	if err := in.StartWrite(off, 4096); err != nil {
		return err
	}
	r.seq++
	buf := bytes.Repeat([]byte{r.seq}, 4096)
	n.arr.barrier[c].Lock()
	defer n.arr.barrier[c].Unlock()
	for _, d := range n.h.devs {
		if _, err := d.WriteAt(buf, dataOff+off); err != nil {
			return err
		}
	}
	in.EndWrite(off, 4096, now)
	return nil
}

// kill crashes node id's host (if its crash hook did not already), closes
// its DLM node and driver, and runs a view change on the survivors: Stop,
// (fence: a no-op, the victim is closed), Recover without the victim. It
// does not tell the ownership drivers; see departed.
func (r *rig) kill(id int) {
	r.t.Helper()
	n := r.node(id)
	n.h.crash()
	n.drv.Close()
	n.dlm.Close()
	n.gone = true
	var alive []dlm.NodeID
	for _, o := range r.nodes {
		if !o.gone {
			alive = append(alive, o.id)
		}
	}
	for _, o := range r.nodes {
		if !o.gone {
			o.dlm.Controller().Stop()
		}
	}
	r.gen++
	for _, o := range r.nodes {
		if !o.gone {
			if err := o.dlm.Controller().Recover(r.gen, alive, []dlm.NodeID{n.id}, false); err != nil {
				r.t.Fatalf("node %d recover gen %d: %v", o.id, r.gen, err)
			}
		}
	}
}

// deliver hands node n's driver the recovery events of the view change
// that removed the departed nodes (generation r.gen), as the lockspace
// delivers them to its RecoveryHandler: RecoverPrepare with the generation
// left, RecoverDeparted, RecoverDone. It waits for the slot recovery the
// events start and returns its outcome.
func (r *rig) deliver(ctx context.Context, n *node, departed ...dlm.NodeID) error {
	var members []dlm.NodeID
	for _, o := range r.alive() {
		members = append(members, o.id)
	}
	n.drv.RecoverPrepare(r.gen - 1)
	n.drv.RecoverDeparted(r.gen, departed)
	n.drv.RecoverDone(r.gen, members, n.id)
	select {
	case err := <-n.recovered:
		return err
	case <-ctx.Done():
		return fmt.Errorf("node %d: no slot recovery outcome: %w", n.id, ctx.Err())
	}
}

// alive returns the nodes not killed.
func (r *rig) alive() []*node {
	var out []*node
	for _, n := range r.nodes {
		if !n.gone {
			out = append(out, n)
		}
	}
	return out
}

// durable returns the shared disks' durable images.
func (r *rig) durable() [][]byte {
	var out [][]byte
	for _, d := range r.disks {
		out = append(out, d.Durable())
	}
	return out
}

// slotBits returns slot s's bits on each mirror.
func (r *rig) slotBits(imgs [][]byte, s int) []*bitmap.Slot {
	r.t.Helper()
	var out []*bitmap.Slot
	for i, img := range imgs {
		sl, err := bitmap.ReadSlot(bytes.NewReader(img), r.layout, s)
		if err != nil {
			r.t.Fatalf("mirror %d slot %d unreadable: %v", i, s, err)
		}
		out = append(out, sl)
	}
	return out
}

// dirtyUnion returns the chunks slot s marks on any mirror.
func (r *rig) dirtyUnion(imgs [][]byte, slots ...int) []uint64 {
	var out []uint64
	for _, s := range slots {
		for _, sl := range r.slotBits(imgs, s) {
			out = append(out, sl.DirtyChunks()...)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// checkInvariant: every chunk written since the last clean point is
// identical on both mirrors or marked dirty in some slot on every mirror.
func (r *rig) checkInvariant(imgs [][]byte, when string) {
	r.t.Helper()
	var slots [][]*bitmap.Slot
	for s := 0; s < r.layout.Slots; s++ {
		slots = append(slots, r.slotBits(imgs, s))
	}
	for c := range r.written {
		lo := dataOff + int64(c)*chunkSize
		if bytes.Equal(imgs[0][lo:lo+chunkSize], imgs[1][lo:lo+chunkSize]) {
			continue
		}
		marked := false
		for s := range slots {
			if slots[s][0].Test(c) && slots[s][1].Test(c) {
				marked = true
			}
		}
		if !marked {
			r.t.Fatalf("%s: chunk %d differs between mirrors and no slot marks it on every mirror", when, c)
		}
	}
}

// checkConsistent: every chunk written is identical on both mirrors.
func (r *rig) checkConsistent(imgs [][]byte, when string) {
	r.t.Helper()
	for c := range r.written {
		lo := dataOff + int64(c)*chunkSize
		if !bytes.Equal(imgs[0][lo:lo+chunkSize], imgs[1][lo:lo+chunkSize]) {
			r.t.Fatalf("%s: chunk %d still differs between mirrors", when, c)
		}
	}
}

// checkSlotClean: slot s has no bit set on any mirror.
func (r *rig) checkSlotClean(imgs [][]byte, s int, when string) {
	r.t.Helper()
	for i, sl := range r.slotBits(imgs, s) {
		if d := sl.DirtyChunks(); len(d) != 0 {
			r.t.Fatalf("%s: slot %d on mirror %d still marks %v", when, s, i, d)
		}
	}
}

// checkIdle: a NOQUEUE PW probe of slot s from a live node is granted
// (nobody holds it), and is released again.
func (r *rig) checkIdle(ctx context.Context, s int, when string) {
	r.t.Helper()
	// A remote unlock completes on its node at once and reaches the master
	// a moment later (deferred), so a NOQUEUE request right after it may
	// still be refused: retry, asking for blocking callbacks so a holder
	// that already let go sends its release at once. Only the guard bounds
	// this; no timing is asserted.
	n := r.alive()[0]
	for {
		lk, err := n.ls.Lock(ctx, ownership.LockName(s), dlm.PW, dlm.NoQueue|dlm.NoQueueBast)
		if err == nil {
			if err := lk.Unlock(ctx, 0); err != nil {
				r.t.Fatal(err)
			}
			return
		}
		if !errors.Is(err, dlm.ErrAgain) || ctx.Err() != nil {
			r.t.Fatalf("%s: slot %d lock not free: %v", when, s, err)
		}
		time.Sleep(time.Millisecond)
	}
}
