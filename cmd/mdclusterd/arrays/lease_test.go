package arrays

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/lease"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// leaseLayer is a layer with no node: its view comes from SetView.
func leaseLayer(t *testing.T, id uint32, d time.Duration) *Layer {
	l := New()
	cfg := &config.Config{RAID: config.RAID{SpeedLimitMin: 1000, SpeedLimitMax: 200000},
		Lease: config.Lease{Enabled: true, Duration: d, Margin: d / 2}}
	l.env = daemon.ArrayEnv{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	l.log, l.testNodeID = l.env.Logger, id
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, a := range l.arrays {
			if a.leaseStop != nil {
				a.leaseStop()
			}
			a.eng.Stop()
		}
	})
	return l
}

// runRAID1 starts array u's engine in l over the member files, as the
// manager would after an assemble, and registers it as running.
func runRAID1(t *testing.T, l *Layer, u [16]byte, paths []string) *arr {
	t.Helper()
	return runRAID1As(t, l, u, u, paths)
}

// memberImages makes two zeroed 5 MiB member files.
func memberImages(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	var paths []string
	for _, n := range []string{"a.img", "b.img"} {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, make([]byte, 5<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

// startRAID1 builds l's engine for array built and starts it over the
// member files, without registering the array in l.
func startRAID1(t *testing.T, l *Layer, built [16]byte, paths []string) *arr {
	t.Helper()
	a, err := l.newEngine(built)
	if err != nil {
		t.Fatal(err)
	}
	var ems []array.EngineMember
	for i, p := range paths {
		m, err := array.OpenFile(p, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ems = append(ems, array.EngineMember{Dev: uint32(i), Slot: i, State: array.MemberInSync, Member: m, DataOffset: 2048})
	}
	if err := a.eng.Start(context.Background(), array.EngineSetup{Level: superblock.LevelRAID1, RaidDisks: len(paths),
		DevSectors: 8192, Members: ems}); err != nil {
		t.Fatal(err)
	}
	return a
}

// runRAID1As is runRAID1 for an engine built for array built (the zero
// UUID: an array being created here) that runs as array u.
func runRAID1As(t *testing.T, l *Layer, built, u [16]byte, paths []string) *arr {
	t.Helper()
	a := startRAID1(t, l, built, paths)
	if built != u {
		a.setUUID(u)
	}
	l.mu.Lock()
	l.arrays[u] = a
	a.running = true
	l.mu.Unlock()
	l.startLease(a)
	return a
}

// TestLeaseStopsArrayIO: the layer's lease gates its array's engine. A
// node that loses quorum stops its array I/O at once (and resumes with
// quorum); when another node's stamp fence writes a newer generation,
// every node still in the older view stops at its next periodic stamp read
// with the lease's reason (no member is failed), and each resumes at once
// when it installs a view at least that new.
func TestLeaseStopsArrayIO(t *testing.T) {
	paths := memberImages(t)
	u := [16]byte{1, 2, 3}
	const d = 600 * time.Millisecond
	la, lb := leaseLayer(t, 1, d), leaseLayer(t, 2, d)
	la.SetView(3, true)
	lb.SetView(3, true)
	a := runRAID1(t, la, u, paths)
	b := runRAID1(t, lb, u, paths)
	data := bytes.Repeat([]byte{0xab}, 4096)
	for name, x := range map[string]*arr{"A": a, "B": b} {
		if err := x.eng.WriteAt(data, 0, 0); err != nil {
			t.Fatalf("node %s with a lease: %v", name, err)
		}
	}

	la.SetView(3, false)
	err := a.eng.WriteAt(data, 4096, 0)
	if !errors.Is(err, raid.ErrIOStopped) || !errors.Is(err, lease.ErrNoQuorum) {
		t.Fatalf("write without quorum: %v, want the lease's no-quorum stop", err)
	}
	la.SetView(3, true)
	if err := a.eng.WriteAt(data, 4096, 0); err != nil {
		t.Fatalf("write with quorum back: %v", err)
	}

	// Node B fences A for view 4 (before view 4 is installed anywhere).
	if err := lb.Stamp(context.Background(), 4); err != nil {
		t.Fatal(err)
	}
	stopped := func(x *arr, name string) error {
		deadline := time.Now().Add(10 * d)
		for {
			err := x.eng.WriteAt(data, 8192, 0)
			if err != nil {
				return err
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %s still writes %v after the stamp of a newer generation", name, 10*d)
			}
			time.Sleep(d / 10)
		}
	}
	err = stopped(a, "A")
	if !errors.Is(err, raid.ErrIOStopped) || !errors.Is(err, lease.ErrFenced) {
		t.Fatalf("node A's write after the fence: %v, want the lease's fenced stop", err)
	}
	// B, in view 3 too until it installs view 4, stops as well; with
	// view 4 it resumes at once (SetView re-reads), A does not.
	if err := stopped(b, "B"); !errors.Is(err, lease.ErrFenced) {
		t.Fatalf("node B before installing view 4: %v", err)
	}
	lb.SetView(4, true)
	resumed := func(x *arr, name string) {
		deadline := time.Now().Add(d / 2)
		for x.eng.WriteAt(data, 8192, 0) != nil {
			if time.Now().After(deadline) {
				t.Fatalf("node %s did not resume within half a lease of installing the new view", name)
			}
			time.Sleep(d / 20)
		}
	}
	resumed(b, "B")
	if err := a.eng.WriteAt(data, 8192, 0); !errors.Is(err, lease.ErrFenced) {
		t.Fatalf("node A (view 3) after B installed view 4: %v", err)
	}
	for _, x := range []*arr{a, b} {
		if len(x.eng.Devices()) != 2 {
			t.Fatalf("a refused I/O failed a member: %d devices in use", len(x.eng.Devices()))
		}
	}
	// A joins view 4 (readmitted): it writes again.
	la.SetView(4, true)
	resumed(a, "A")
}

// TestLeaseOfCreatedArray: the node that created an array built its
// engine and lease guard before the array had a UUID; after another
// node's stamp fence (which writes the array's UUID with the generation)
// and the new view, its I/O must resume like everyone else's, not stop
// for good on "the stamp of another array" (found by the three-VM test).
func TestLeaseOfCreatedArray(t *testing.T) {
	paths := memberImages(t)
	u := [16]byte{7, 8, 9}
	const d = 600 * time.Millisecond
	la, lb := leaseLayer(t, 1, d), leaseLayer(t, 2, d)
	la.SetView(3, true)
	lb.SetView(3, true)
	a := runRAID1As(t, la, [16]byte{}, u, paths)
	runRAID1(t, lb, u, paths)
	data := bytes.Repeat([]byte{0xcd}, 4096)
	if err := a.eng.WriteAt(data, 0, 0); err != nil {
		t.Fatalf("creator's write before any fence: %v", err)
	}
	if err := lb.Stamp(context.Background(), 4); err != nil {
		t.Fatal(err)
	}
	la.SetView(4, true)
	// Past two leases every write depends on stamp reads made after the
	// fence.
	time.Sleep(2 * d)
	deadline := time.Now().Add(d)
	for {
		err := a.eng.WriteAt(data, 4096, 0)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the creator's array I/O did not resume in view 4 after the stamp fence: %v", err)
		}
		time.Sleep(d / 10)
	}
}

// TestStampArrayNotRunningHere: the stamp fence also stamps an array this
// node only knows from its devices (its manager has no members): the
// members whose superblock carries the array's UUID get the generation,
// a device of another array does not.
func TestStampArrayNotRunningHere(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string) array.Member {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, make([]byte, 8<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := array.OpenFile(p, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	a, b, other := mk("a.img"), mk("b.img"), mk("z.img")
	u := [16]byte{9, 9, 9}
	if _, err := array.Create(array.CreateSpec{Level: 1, RaidDevices: 2, UUID: u, AssumeClean: true, Name: "md0"}, []array.Member{a, b}); err != nil {
		t.Fatal(err)
	}
	if _, err := array.Create(array.CreateSpec{Level: 1, RaidDevices: 1, UUID: [16]byte{7}, AssumeClean: true, Name: "md1", Force: true}, []array.Member{other}); err != nil {
		t.Fatal(err)
	}
	l := leaseLayer(t, 2, time.Second)
	l.env.Config.Devices.Search = []string{filepath.Join(dir, "*.img")}
	x, err := l.newEngine(u)
	if err != nil {
		t.Fatal(err)
	}
	l.arrays[u] = x
	if err := l.Stamp(context.Background(), 7); err != nil {
		t.Fatal(err)
	}
	st := lease.Stamper{Array: u}
	for name, m := range map[string]array.Member{"a.img": a, "b.img": b} {
		rec, err := st.ReadMember(m)
		if err != nil || rec.Generation != 7 || rec.Node != 2 {
			t.Fatalf("%s: stamp %+v, %v; want generation 7 by node 2", name, rec, err)
		}
	}
	if rec, err := (&lease.Stamper{Array: [16]byte{7}}).ReadMember(other); err != nil || rec.Generation != 0 {
		t.Fatalf("another array's member was stamped: %+v, %v", rec, err)
	}
}

// fakeWatchdog counts pings.
type fakeWatchdog struct {
	mu     sync.Mutex
	pings  int
	closed bool
}

func (w *fakeWatchdog) Ping() error  { w.mu.Lock(); w.pings++; w.mu.Unlock(); return nil }
func (w *fakeWatchdog) Close() error { w.mu.Lock(); w.closed = true; w.mu.Unlock(); return nil }
func (w *fakeWatchdog) count() int   { w.mu.Lock(); defer w.mu.Unlock(); return w.pings }

// TestWatchdogFedOnlyWhileReadsComplete: the watchdog is not pinged while
// a running array's guard has no stamp read completed within its lease
// (reads hang), is pinged once reads complete, stops being pinged when
// they hang again for a lease, and is disarmed when the layer stops.
func TestWatchdogFedOnlyWhileReadsComplete(t *testing.T) {
	l := leaseLayer(t, 1, time.Second)
	const L = 300 * time.Millisecond
	g, err := lease.New(lease.Config{Duration: L, Read: func() (lease.Record, error) { return lease.Record{}, nil },
		Logger: l.log})
	if err != nil {
		t.Fatal(err)
	}
	l.arrays[[16]byte{1}] = &arr{guard: g, running: true, eng: array.NewRAIDEngine(array.RAIDEngineConfig{})}
	wd := &fakeWatchdog{}
	l.wg.Add(1)
	go l.feedWatchdog(wd, 20*time.Millisecond)
	time.Sleep(150 * time.Millisecond)
	if n := wd.count(); n != 0 {
		t.Fatalf("%d pings before any stamp read completed", n)
	}
	g.Renew()
	time.Sleep(100 * time.Millisecond)
	if wd.count() == 0 {
		t.Fatal("no ping while the stamp reads complete")
	}
	time.Sleep(L + 50*time.Millisecond) // no read for a lease: as if reads hang
	n := wd.count()
	time.Sleep(150 * time.Millisecond)
	if wd.count() != n {
		t.Fatal("pinged although no stamp read completed within the lease")
	}
	close(l.stop)
	l.wg.Wait()
	wd.mu.Lock()
	defer wd.mu.Unlock()
	if !wd.closed {
		t.Fatal("watchdog not disarmed when the layer stopped")
	}
}

// TestLeaseOwnerRefusesOnlyWhenFenced: before each bitmap flush the stamp
// is re-read; the flush is refused when the stamp shows the node fenced,
// not when it merely lost quorum (the data gate stops I/O then, and a
// refused flush would stop the write intent for good).
func TestLeaseOwnerRefusesOnlyWhenFenced(t *testing.T) {
	var gen atomic.Uint64
	reads := 0
	var readsMu sync.Mutex
	g, err := lease.New(lease.Config{Duration: time.Minute, StopWait: 300 * time.Millisecond, Read: func() (lease.Record, error) {
		readsMu.Lock()
		reads++
		readsMu.Unlock()
		return lease.Record{Generation: gen.Load()}, nil
	}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	o := leaseOwner{Ownership: intent.Static(1), guard: g}
	g.SetView(3, true)
	if err := o.Check(); err != nil || reads != 1 {
		t.Fatalf("lease holds: %v, %d reads", err, reads)
	}
	g.SetView(3, false)
	if err := o.Check(); err != nil {
		t.Fatalf("without quorum the flush was refused: %v", err)
	}
	g.SetView(3, true)
	gen.Store(4)
	start := time.Now()
	if err := o.Check(); !errors.Is(err, lease.ErrFenced) || reads != 4 {
		t.Fatalf("fenced: %v after %d reads, want ErrFenced after a fresh read and one more after the wait", err, reads)
	}
	if w := time.Since(start); w < 300*time.Millisecond {
		t.Fatalf("fenced after %v: the flush must wait StopWait for a newer view first", w)
	}
	// A survivor: the fencer stamped generation 5 before this node
	// installed view 5; the flush waits for the install and goes on
	// (found by the three-VM power-cut test: a survivor's write intent
	// stopped for good).
	g.SetView(4, true)
	if err := o.Check(); err != nil {
		t.Fatalf("view 4, stamp 4: %v", err)
	}
	gen.Store(5)
	go func() {
		time.Sleep(100 * time.Millisecond)
		g.SetView(5, true)
	}()
	if err := o.Check(); err != nil {
		t.Fatalf("a survivor installing view 5 after the stamp: the flush was refused: %v", err)
	}
}

// TestLeaseViewBeforeRegistration: a view (quorum) that arrives after an
// array's guard was built but before the array is registered in the layer
// reaches the guard when it is registered. Before, the guard kept the view
// it was built with (not quorate) and the array's I/O stayed stopped for
// good on a quorate node (about one daemon start in ten).
func TestLeaseViewBeforeRegistration(t *testing.T) {
	l := leaseLayer(t, 1, time.Minute)
	u := [16]byte{7}
	// The guard starts with the layer's view: none, not quorate.
	a := startRAID1(t, l, u, memberImages(t))
	l.SetView(3, true) // the node becomes quorate meanwhile
	l.register(u, a)
	if err := a.guard.Renew(); err != nil {
		t.Fatalf("guard of an array registered after the node became quorate: %v", err)
	}
}
