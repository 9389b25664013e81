package lease

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// write is one write that reached a member device.
type write struct {
	node   string
	member int
	off    int64
	at     time.Time // when it reached the device (monotonic)
}

// recorder logs every write and flush that reaches the shared members,
// with the node that issued it.
type recorder struct {
	mu     sync.Mutex
	writes []write
}

type recDev struct {
	raid.Device
	rec    *recorder
	node   string
	member int
}

func (d recDev) log(off int64) {
	d.rec.mu.Lock()
	d.rec.writes = append(d.rec.writes, write{d.node, d.member, off, time.Now()})
	d.rec.mu.Unlock()
}
func (d recDev) WriteAt(p []byte, off int64) (int, error) {
	d.log(off)
	return d.Device.WriteAt(p, off)
}
func (d recDev) WriteAtFUA(p []byte, off int64) (int, error) {
	d.log(off)
	return d.Device.WriteAtFUA(p, off)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

const (
	fenceDataOff  = 1 << 20
	fenceBitmapAt = 8192
)

// testNode is one node's array stack over the shared members: engine,
// write-intent slot, lease guard and stamper.
type testNode struct {
	name   string
	e      *raid.Engine
	g      *Guard
	st     *Stamper
	failed atomic.Int64
	// hang, when set, makes the lease's stamp reads wait for it to be
	// closed (a read path that hangs while writes still go through).
	hang atomic.Pointer[chan struct{}]
}

func newTestNode(t *testing.T, name string, id uint32, slot int, shared []raid.Device, rec *recorder, layout bitmap.Layout, L, clockOffset time.Duration) *testNode {
	t.Helper()
	n := &testNode{name: name}
	n.st = &Stamper{Array: testUUID, Node: id, Members: func() []Device {
		out := make([]Device, len(shared))
		for i, d := range shared {
			out[i] = d // raw: the lease reads while the gate is shut
		}
		return out
	}}
	t0 := time.Now()
	var err error
	// Each node has its own monotonic clock with an arbitrary origin.
	read := func() (Record, error) {
		if h := n.hang.Load(); h != nil {
			<-*h
		}
		return n.st.Highest()
	}
	n.g, err = New(Config{Duration: L, StopWait: 20 * time.Millisecond, Read: read, Logger: quiet,
		Clock: func() time.Duration { return clockOffset + time.Since(t0) }})
	if err != nil {
		t.Fatal(err)
	}
	g, err := raid.NewRAID1(len(shared), 2048)
	if err != nil {
		t.Fatal(err)
	}
	members := make([]raid.Member, len(shared))
	for i, d := range shared {
		members[i] = raid.Member{Device: recDev{Device: d, rec: rec, node: name, member: i}, DataOffset: fenceDataOff}
	}
	n.e, err = raid.New(raid.Config{Geometry: g, Members: members, BitmapChunkSize: 64 << 10, RequireIntent: true,
		Gate: n.g, Logger: quiet, OnMemberFailed: func(int, error) { n.failed.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	sl, err := bitmap.ReadSlot(shared[0], layout, slot)
	if err != nil {
		t.Fatal(err)
	}
	in, err := intent.New(intent.Config{Layout: layout, Slot: sl, Mirrors: n.e.BitmapMirrors(),
		Owner: Owner{Ownership: intent.Static(slot), Guard: n.g}})
	if err != nil {
		t.Fatal(err)
	}
	n.e.SetIntent(in)
	t.Cleanup(func() { n.e.Close() })
	return n
}

// stampTimer records when the stamp was durable on every member.
type stampTimer struct {
	*Stamper
	done time.Time
}

func (s *stampTimer) Stamp(ctx context.Context, gen uint64) error {
	err := s.Stamper.Stamp(ctx, gen)
	s.done = time.Now()
	return err
}

// TestFenceCutOffNode: node A is cut off from the others by the network
// only: it never learns of the new view (it keeps view 1 and believes it
// is quorate) and keeps writing to the shared members as fast as it can.
// Node B, in view 2, fences A with the generation stamp and waits out
// the lease. A must stop writing within its lease of the stamp, B's fence
// must return only after that, and no write from A may reach a member
// after B's fence returned. Then B writes (recovering A's slot would go
// here), and A's writers keep failing.
//
// With hungReads, A's stamp reads hang from the moment of the partition
// (the worst case: it never sees the stamp), so only the lease running out
// stops it.
func TestFenceCutOffNode(t *testing.T) {
	for _, hung := range []bool{false, true} {
		t.Run(fmt.Sprintf("hungReads=%v", hung), func(t *testing.T) { testFenceCutOff(t, hung) })
	}
}

func testFenceCutOff(t *testing.T, hungReads bool) {
	const (
		L      = 300 * time.Millisecond
		margin = 150 * time.Millisecond
	)
	g, _ := raid.NewRAID1(2, 2048)
	sb := bitmap.Superblock{Magic: bitmap.Magic, Version: bitmap.VersionClustered, Nodes: 2, UUID: testUUID,
		SyncSize: uint64(g.Size() / 512), ChunkSize: 64 << 10, DaemonSleep: 5}
	layout, err := bitmap.NewLayout(&sb, fenceBitmapAt, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	var shared []raid.Device
	for i := 0; i < 2; i++ {
		d := raid.NewMemDevice(fmt.Sprintf("m%d", i), fenceDataOff+g.DevSize(), 512, false)
		if err := bitmap.Format(d, sb, layout, false); err != nil {
			t.Fatal(err)
		}
		shared = append(shared, d)
	}
	rec := &recorder{}
	a := newTestNode(t, "A", 1, 0, shared, rec, layout, L, time.Hour)
	b := newTestNode(t, "B", 2, 1, shared, rec, layout, L, -3*time.Minute)

	// View 1: both nodes, stamped on the members by whoever formed it.
	if err := a.st.Stamp(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	a.g.SetView(1, true)
	b.g.SetView(1, true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for _, n := range []*testNode{a, b} {
		wg.Add(1)
		go func() { defer wg.Done(); n.g.Run(ctx) }()
	}

	// A's writers run until the end of the test.
	var aOK, aStopped atomic.Int64
	var aOther atomic.Value
	stop := make(chan struct{})
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			buf := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int64N(g.Size()/4096) * 4096
				err := a.e.WriteAt(buf, off, 0)
				switch {
				case err == nil:
					aOK.Add(1)
				case errors.Is(err, raid.ErrIOStopped) && errors.Is(err, ErrStopped),
					errors.Is(err, intent.ErrClosed):
					aStopped.Add(1)
				default:
					// A bitmap flush refused by the lease surfaces as a
					// write-intent error; it must name the lease.
					if !errors.Is(err, ErrStopped) {
						aOther.Store(err)
					}
					aStopped.Add(1)
				}
			}
		}(uint64(w))
	}
	time.Sleep(2 * L) // A and B both write happily in view 1
	if aOK.Load() == 0 {
		t.Fatalf("A wrote nothing in view 1 (stopped %d)", aStopped.Load())
	}

	// The partition: B's view is generation 2 without A. A is not told.
	release := make(chan struct{})
	if hungReads {
		a.hang.Store(&release)
	}
	b.g.SetView(2, true)
	stamper := &stampTimer{Stamper: b.st}
	f := fence.StampFencer{Stamper: stamper, Wait: FenceWait(L, margin)}
	fenceStart := time.Now()
	res, err := f.Fence(ctx, fence.Request{Node: 1, Generation: 2, FailedAt: fenceStart})
	fenced := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	if res.Method != "generation-stamp" {
		t.Fatalf("result %+v", res)
	}
	if d := fenced.Sub(stamper.done); d < L+margin {
		t.Fatalf("fence returned %v after the stamp, want at least %v", d, L+margin)
	}
	// B, the survivor, carries on in view 2 (its slot, and A's after
	// recovery).
	if err := b.g.Renew(); err != nil {
		t.Fatalf("B's lease in view 2: %v", err)
	}
	for i := 0; i < 10; i++ {
		if err := b.e.WriteAt(make([]byte, 4096), int64(i)*4096, 0); err != nil {
			t.Fatalf("B writes after the fence: %v", err)
		}
	}
	time.Sleep(2 * L) // A's writers keep trying
	close(release)
	close(stop)
	cancel()
	wg.Wait()

	var lastA time.Time
	var aWrites, late int
	rec.mu.Lock()
	for _, w := range rec.writes {
		if w.node != "A" {
			continue
		}
		aWrites++
		if w.at.After(lastA) {
			lastA = w.at
		}
		if !w.at.Before(fenced) {
			late++
			t.Errorf("A wrote member %d at byte %d %v after B's fence returned", w.member, w.off, w.at.Sub(fenced))
		}
	}
	rec.mu.Unlock()
	t.Logf("A: %d device writes, %d requests ok, %d refused; last A write %v after the stamp was durable (lease %v, fence wait %v)",
		aWrites, aOK.Load(), aStopped.Load(), lastA.Sub(stamper.done), L, L+margin)
	if late > 0 {
		t.Fatalf("%d writes from the fenced node after the fence", late)
	}
	if d := lastA.Sub(stamper.done); d > L+margin/2 {
		t.Errorf("A's last write came %v after the stamp: not within its lease %v", d, L)
	}
	if aStopped.Load() == 0 {
		t.Error("A's writes never failed")
	}
	if err, _ := aOther.Load().(error); err != nil {
		t.Errorf("A's write failed for another reason: %v", err)
	}
	if err := a.g.Check(); !errors.Is(err, ErrFenced) {
		t.Errorf("A's lease: %v, want fenced", err)
	}
	if a.failed.Load() != 0 || b.failed.Load() != 0 {
		t.Errorf("members failed: A %d, B %d", a.failed.Load(), b.failed.Load())
	}
}
