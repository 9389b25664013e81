package ownership_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/dlm"
)

// fakeLocker is a dlm.Locker that grants every request at once, except
// NOQUEUE requests for the resources in busy (held elsewhere). It shows
// what the driver asks of the lock interface, without a DLM.
type fakeLocker struct {
	busy    map[string]bool
	granted []*fakeLock
}

func (f *fakeLocker) LVBLen() int { return ownership.LVBSize }

func (f *fakeLocker) Request(_ context.Context, spec dlm.LockSpec) (dlm.LockHandle, error) {
	if spec.Flags&dlm.NoQueue != 0 && f.busy[spec.Resource] {
		return nil, dlm.ErrAgain
	}
	l := &fakeLock{res: spec.Resource, mode: spec.Mode, lvb: make([]byte, ownership.LVBSize)}
	f.granted = append(f.granted, l)
	return l, nil
}

type fakeLock struct {
	res  string
	mode dlm.Mode
	lvb  []byte
}

func (l *fakeLock) Resource() string             { return l.res }
func (l *fakeLock) Mode() dlm.Mode               { return l.mode }
func (l *fakeLock) StatusFlags() dlm.StatusFlags { return 0 }
func (l *fakeLock) LVB() []byte                  { return slices.Clone(l.lvb) }
func (l *fakeLock) SetLVB(b []byte) error        { copy(l.lvb, b); return nil }
func (l *fakeLock) Convert(_ context.Context, m dlm.Mode, _ dlm.Flags) error {
	l.mode = m
	return nil
}
func (l *fakeLock) Unlock(context.Context, dlm.Flags) error { l.mode = dlm.ModeIV; return nil }

type recordArray struct{ chunks []uint64 }

func (a *recordArray) Resync(_ context.Context, chunks []uint64) error {
	a.chunks = append(a.chunks, chunks...)
	return nil
}

// TestRecoveryEventsDriveDeparted: the lockspace's recovery events drive
// slot recovery. Nodes departing in two view changes before one
// RecoverDone are recovered together when it comes, once; RecoverPrepare
// alone starts nothing; and a RecoverDone after which this node's own lock
// is gone (it rejoined clean) makes its slot lost, so the write-intent
// engine stops writing it.
func TestRecoveryEventsDriveDeparted(t *testing.T) {
	sb := testSuper()
	l, err := bitmap.NewLayout(&sb, bmStart, bitmap.SlotAlign)
	if err != nil {
		t.Fatal(err)
	}
	var disks []*intent.MemDisk
	var mirrors []intent.Device
	for range 2 {
		d := intent.NewMemDisk("m", diskSize, nil)
		if err := bitmap.Format(d, sb, l, false); err != nil {
			t.Fatal(err)
		}
		dead, _ := bitmap.NewSlot(sb)
		dead.Set(3)
		if err := bitmap.WriteSlot(d, l, 1, dead); err != nil {
			t.Fatal(err)
		}
		_ = d.Sync()
		disks = append(disks, d)
		mirrors = append(mirrors, d)
	}
	lk := &fakeLocker{busy: map[string]bool{ownership.LockName(1): true, ownership.LockName(2): true}}
	arr := &recordArray{}
	type outcome struct {
		gen      uint64
		departed []dlm.NodeID
		err      error
	}
	var got []outcome
	drv, err := ownership.New(ownership.Config{Lockspace: lk, Node: 1, Layout: l, Mirrors: mirrors, Array: arr,
		Logger: quiet(),
		Go:     func(f func()) { f() }, // at once, for the test: a real lockspace needs it off its callback goroutine
		OnRecovered: func(gen uint64, departed []dlm.NodeID, err error) {
			got = append(got, outcome{gen, departed, err})
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := drv.Join(ctx); err != nil {
		t.Fatal(err)
	}
	if st := drv.States(); st[1] != ownership.Watching || st[2] != ownership.Watching {
		t.Fatalf("after join: %v", st)
	}

	drv.RecoverPrepare(5)
	drv.RecoverDeparted(6, []dlm.NodeID{2})
	drv.RecoverPrepare(6) // a second change begins before the first is done
	drv.RecoverDeparted(7, []dlm.NodeID{3})
	if len(got) != 0 {
		t.Fatalf("recovery started before RecoverDone: %+v", got)
	}
	lk.busy = nil // the departed nodes' locks are purged
	drv.RecoverDone(7, []dlm.NodeID{1}, 1)
	if len(got) != 1 || got[0].gen != 7 || !slices.Equal(got[0].departed, []dlm.NodeID{2, 3}) || got[0].err != nil {
		t.Fatalf("recoveries: %+v, want one for gen 7 of nodes [2 3]", got)
	}
	if !slices.Equal(arr.chunks, []uint64{3}) {
		t.Fatalf("resynced %v, want [3]", arr.chunks)
	}
	for i, d := range disks {
		s, err := bitmap.ReadSlot(d, l, 1)
		if err != nil || len(s.DirtyChunks()) != 0 {
			t.Fatalf("mirror %d: dead slot after recovery: %v %v", i, s.DirtyChunks(), err)
		}
	}
	drv.RecoverDone(8, []dlm.NodeID{1}, 1) // nothing departed: nothing to do
	if len(got) != 1 {
		t.Fatalf("a RecoverDone without departures started a recovery: %+v", got)
	}

	// The own lock is the first one granted. A clean rejoin releases it
	// in recovery, without the driver asking.
	own := lk.granted[0]
	if own.res != ownership.LockName(0) || own.mode != dlm.PW {
		t.Fatalf("first lock %q in %v", own.res, own.mode)
	}
	if err := drv.Check(); err != nil {
		t.Fatal(err)
	}
	drv.RecoverPrepare(8)
	own.mode = dlm.ModeIV
	drv.RecoverDone(9, []dlm.NodeID{1}, 1)
	if st := drv.States()[0]; st != ownership.Lost {
		t.Fatalf("own slot after its lock was lost: %s", st)
	}
	if err := drv.Check(); !errors.Is(err, ownership.ErrNotOwner) {
		t.Fatalf("check after the own lock was lost: %v", err)
	}
}
