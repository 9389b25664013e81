package raid

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func (r *rig) mustRead(off, n int64) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := r.e.ReadAt(b, off); err != nil {
		r.t.Fatalf("read %d+%d: %v", off, n, err)
	}
	return b
}

// TestWriteErrorFailsMember: a write error on one mirror fails that member
// (reported once), the write still succeeds on the other, its chunk stays
// dirty, and no I/O goes to the member afterwards.
func TestWriteErrorFailsMember(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true, bitmap: true})
	r.fault[1].Inject(Fault{Ops: OpWrite, Off: rigDataOff, Len: g.Size()})
	if err := r.e.WriteAt(fill(3, 8192), 0, 0); err != nil {
		t.Fatalf("write with one mirror failing: %v", err)
	}
	if f := r.failures(); len(f) != 1 || f[0] != 1 {
		t.Fatalf("failures %v, want [1]", f)
	}
	if st := r.e.Members()[1].State; st != Failed {
		t.Fatalf("member 1 is %s", st)
	}
	before := r.mem[1].Stats()
	for i := 0; i < 10; i++ {
		if err := r.e.WriteAt(fill(4, 4096), int64(i)*4096, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(r.mustRead(int64(i)*4096, 4096), fill(4, 4096)) {
			t.Fatal("degraded array reads back wrong data")
		}
	}
	if err := r.e.Flush(); err != nil {
		t.Fatal(err)
	}
	if after := r.mem[1].Stats(); after.Reads != before.Reads || after.Writes != before.Writes || after.Syncs != before.Syncs {
		t.Fatalf("I/O reached the failed member: before %+v after %+v", before, after)
	}
	if _, err := r.in.Tick(time.Hour); err != nil {
		t.Fatal(err)
	}
	if !r.in.Dirty(0) {
		t.Fatal("the chunk of a degraded write was cleared from the bitmap")
	}
	if s := r.e.Stats(); s.MemberFailures != 1 || s.DegradedWrites != 11 {
		t.Fatalf("stats %+v", s)
	}
	if len(r.failures()) != 1 {
		t.Fatalf("failure reported more than once: %v", r.failures())
	}
}

// TestWriteWaitsForFailureRecord: a write that failed a member is not
// acknowledged before OnMemberFailed has returned (the failure is then on
// record cluster-wide).
func TestWriteWaitsForFailureRecord(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	release := make(chan struct{})
	entered := make(chan int, 1)
	r := newRig(t, g, rigOpts{faults: true, tweak: func(c *Config) {
		c.OnMemberFailed = func(m int, err error) {
			entered <- m
			<-release
		}
	}})
	r.fault[0].Inject(Fault{Ops: OpWrite})
	done := make(chan error, 1)
	go func() { done <- r.e.WriteAt(fill(1, 4096), 0, 0) }()
	if m := <-entered; m != 0 {
		t.Fatalf("callback for member %d", m)
	}
	select {
	case err := <-done:
		t.Fatalf("write acknowledged before the failure was recorded: %v", err)
	default:
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestReadErrorRepaired: a read error on one copy is served from another
// and the bad copy is rewritten (the disk remaps the sector), counted, and
// the member stays in sync.
func TestReadErrorRepaired(t *testing.T) {
	for _, name := range []string{"raid1-2", "raid10-f2-3"} {
		t.Run(name, func(t *testing.T) {
			g := testGeometries(t)[name]
			r := newRig(t, g, rigOpts{faults: true})
			if err := r.e.WriteAt(fill(9, 64<<10), 0, 0); err != nil {
				t.Fatal(err)
			}
			locs, _ := g.Locate(8192, nil)
			first := locs[0]
			r.fault[first.Member].Inject(Fault{Ops: OpRead, Off: rigDataOff + first.Off, Len: 512, HealOnWrite: true})
			r.e.SuspendReadBalancing(true) // reads go to the first copy, the bad one
			if !bytes.Equal(r.mustRead(0, 64<<10), fill(9, 64<<10)) {
				t.Fatal("wrong data after a read error")
			}
			if s := r.e.Stats(); s.ReadErrorsCorrected != 1 || s.ReadRetries == 0 {
				t.Fatalf("stats %+v", s)
			}
			if r.fault[first.Member].Rules() != 0 {
				t.Fatal("the bad block was not rewritten")
			}
			if m := r.e.Members()[first.Member]; m.State != InSync || m.CorrectedReads != 1 {
				t.Fatalf("member after repair: %+v", m)
			}
			if len(r.failures()) != 0 {
				t.Fatalf("failures %v", r.failures())
			}
			r.checkCopies(nil)
		})
	}
}

// TestReadErrorRewriteFails: when the rewrite of the bad copy fails too,
// the member is failed; the read still returns good data.
func TestReadErrorRewriteFails(t *testing.T) {
	g := testGeometries(t)["raid10-n2-4"]
	r := newRig(t, g, rigOpts{faults: true})
	if err := r.e.WriteAt(fill(6, 32<<10), 0, 0); err != nil {
		t.Fatal(err)
	}
	r.e.SuspendReadBalancing(true)
	r.fault[0].Inject(Fault{Ops: OpRead | OpWrite, Off: rigDataOff, Len: 4096})
	if !bytes.Equal(r.mustRead(0, 32<<10), fill(6, 32<<10)) {
		t.Fatal("wrong data")
	}
	if f := r.failures(); len(f) != 1 || f[0] != 0 {
		t.Fatalf("failures %v, want [0]", f)
	}
	if !bytes.Equal(r.mustRead(0, 32<<10), fill(6, 32<<10)) {
		t.Fatal("wrong data after the member failed")
	}
}

// TestTooManyCorrectedReads: md fails a member after
// max_corrected_read_errors repairs.
func TestTooManyCorrectedReads(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true, tweak: func(c *Config) { c.MaxCorrectedReadErrors = 2 }})
	r.e.SuspendReadBalancing(true)
	for i := 0; i < 3; i++ {
		r.fault[0].Inject(Fault{Ops: OpRead, Off: rigDataOff + int64(i)*4096, Len: 512, HealOnWrite: true})
		r.mustRead(int64(i)*4096, 4096)
	}
	if f := r.failures(); len(f) != 1 || f[0] != 0 {
		t.Fatalf("failures %v after 3 corrected reads (limit 2)", f)
	}
}

// TestNoCopyLeft: when every copy of a block fails to read, the read fails
// with ErrNoCopy and says so; other blocks still read.
func TestNoCopyLeft(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true})
	for m := 0; m < 2; m++ {
		r.fault[m].Inject(Fault{Ops: OpRead, Off: rigDataOff + 4096, Len: 512})
	}
	_, err := r.e.ReadAt(make([]byte, 8192), 0)
	if !errors.Is(err, ErrNoCopy) || !strings.Contains(err.Error(), "every copy failed") {
		t.Fatalf("read with every copy bad: %v", err)
	}
	if s := r.e.Stats(); s.ReadErrorsUnrecoverable == 0 {
		t.Fatalf("stats %+v", s)
	}
	r.mustRead(8192, 4096)
}

// TestLastCopyNotFailed: with one mirror already gone, a write error on
// the last one fails the write (ErrNoCopy) but not the member, which
// still serves reads, like md.
func TestLastCopyNotFailed(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true})
	if err := r.e.WriteAt(fill(2, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := r.e.FailMember(1, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.e.FailMember(0, nil); err == nil {
		t.Fatal("the last in-sync member was failed on request")
	}
	r.fault[0].Inject(Fault{Ops: OpWrite, Count: 1})
	err := r.e.WriteAt(fill(3, 4096), 8192, 0)
	if !errors.Is(err, ErrNoCopy) {
		t.Fatalf("write to the last copy failing: %v", err)
	}
	if st := r.e.Members()[0].State; st != InSync {
		t.Fatalf("last member is %s", st)
	}
	if s := r.e.Stats(); s.FailuresRefused != 1 {
		t.Fatalf("stats %+v", s)
	}
	if !bytes.Equal(r.mustRead(0, 4096), fill(2, 4096)) {
		t.Fatal("the last member stopped serving reads")
	}
}

// TestRAID10PartialLoss: raid10 n2 over 4 disks survives losing one member
// of each pair, but not both members of a pair.
func TestRAID10PartialLoss(t *testing.T) {
	g := testGeometries(t)["raid10-n2-4"]
	r := newRig(t, g, rigOpts{faults: true})
	model := fill(5, int(g.Size()))
	if err := r.e.WriteAt(model, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := r.e.FailMember(0, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.e.FailMember(3, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.e.FailMember(1, nil); err == nil {
		t.Fatal("failing the second member of a pair was accepted")
	}
	if !bytes.Equal(r.mustRead(0, g.Size()), model) {
		t.Fatal("degraded raid10 reads back wrong")
	}
}

// TestFlushErrorFailsMember: a member whose flush fails is failed; the
// flush succeeds on the others.
func TestFlushErrorFailsMember(t *testing.T) {
	g := testGeometries(t)["raid1-3"]
	r := newRig(t, g, rigOpts{faults: true})
	r.fault[2].Inject(Fault{Ops: OpSync})
	if err := r.e.Flush(); err != nil {
		t.Fatal(err)
	}
	if f := r.failures(); len(f) != 1 || f[0] != 2 {
		t.Fatalf("failures %v", f)
	}
}

// TestBitmapWriteErrorFailsMember: an error writing the bitmap to one
// member fails that member; the data write goes on.
func TestBitmapWriteErrorFailsMember(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true, bitmap: true})
	r.fault[1].Inject(Fault{Ops: OpWrite, Off: rigBitmapStart, Len: rigDataOff - rigBitmapStart})
	if err := r.e.WriteAt(fill(1, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	if f := r.failures(); len(f) != 1 || f[0] != 1 {
		t.Fatalf("failures %v", f)
	}
	if !bytes.Equal(r.mustRead(0, 4096), fill(1, 4096)) {
		t.Fatal("wrong data")
	}
}

// TestRecoveryTargetFails: a spare that fails during its rebuild stops the
// recovery with an error and is failed; the array keeps working.
func TestRecoveryTargetFails(t *testing.T) {
	g := testGeometries(t)["raid1-2"]
	r := newRig(t, g, rigOpts{faults: true, states: []MemberState{InSync, Recovering}, tweak: func(c *Config) { c.ResyncIOSize = 64 << 10 }})
	r.fault[1].Inject(Fault{Ops: OpWrite, Skip: 5})
	err := r.e.Recover(context.Background(), 1)
	if err == nil || !strings.Contains(err.Error(), "member 1") {
		t.Fatalf("recovery onto a failing spare: %v", err)
	}
	if st := r.e.Members()[1].State; st != Failed {
		t.Fatalf("spare is %s", st)
	}
	if err := r.e.WriteAt(fill(1, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
}

// TestResyncSourceReadError: a resync whose source copy fails to read
// takes the next copy and rewrites the bad one.
func TestResyncSourceReadError(t *testing.T) {
	g := testGeometries(t)["raid1-3"]
	r := newRig(t, g, rigOpts{faults: true})
	if err := r.e.WriteAt(fill(8, 64<<10), 0, 0); err != nil {
		t.Fatal(err)
	}
	r.fault[0].Inject(Fault{Ops: OpRead, Off: rigDataOff, Len: 512, HealOnWrite: true})
	if err := r.e.Resync(context.Background(), []uint64{0}); err != nil {
		t.Fatal(err)
	}
	if r.fault[0].Rules() != 0 {
		t.Fatal("the unreadable source block was not rewritten")
	}
	r.checkCopies(nil)
	if len(r.failures()) != 0 {
		t.Fatalf("failures %v", r.failures())
	}
}
