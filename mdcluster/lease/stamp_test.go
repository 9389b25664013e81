package lease

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

var testUUID = [16]byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

func TestRecordRoundTrip(t *testing.T) {
	r := Record{Array: testUUID, Generation: 1<<40 + 7, Node: 3, Time: -5}
	b := r.Encode()
	if len(b) != RecordSize {
		t.Fatalf("encoded %d bytes", len(b))
	}
	got, err := Decode(b)
	if err != nil || got != r {
		t.Fatalf("Decode = %+v, %v; want %+v", got, err, r)
	}
	if _, err := Decode(make([]byte, RegionSize)); !errors.Is(err, ErrNoStamp) {
		t.Fatalf("blank: %v", err)
	}
	if _, err := Decode(b[:RecordSize-1]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("short: %v", err)
	}
}

// TestRecordCorruptionDetected: every single-bit flip, and every torn
// mix of a new record with an older or blank one (a prefix written, the
// rest old), is ErrCorrupt or exactly one of the two whole records.
func TestRecordCorruptionDetected(t *testing.T) {
	old := Record{Array: testUUID, Generation: 4, Node: 1}.Encode()
	nw := Record{Array: testUUID, Generation: 5, Node: 2, Time: 99}.Encode()
	for i := range nw {
		for bit := 0; bit < 8; bit++ {
			b := bytes.Clone(nw)
			b[i] ^= 1 << bit
			if r, err := Decode(b); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("flip byte %d bit %d: %+v, %v", i, bit, r, err)
			}
		}
	}
	for cut := 1; cut < RecordSize; cut++ {
		for _, base := range [][]byte{old, make([]byte, RecordSize)} {
			b := bytes.Clone(base)
			copy(b[:cut], nw[:cut])
			r, err := Decode(b)
			if err == nil && (bytes.Equal(r.Encode(), old) || bytes.Equal(r.Encode(), nw)) {
				continue // identical to one whole record: the tear hit equal bytes
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("torn at %d: %+v, %v", cut, r, err)
			}
		}
	}
	// A foreign magic (e.g. md's own superblock magic) is corrupt too.
	b := bytes.Clone(nw)
	copy(b, []byte{0xfc, 0x4e, 0x2b, 0xa9})
	if _, err := Decode(b); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("md magic: %v", err)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(Record{Array: testUUID, Generation: 3, Node: 2, Time: 1}.Encode())
	f.Add(make([]byte, RecordSize))
	f.Add([]byte("MDCFENCE"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNoStamp) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if !bytes.Equal(r.Encode(), b[:RecordSize]) {
			t.Fatalf("valid record %+v does not re-encode to its input", r)
		}
	})
}

func newMembers(t *testing.T, n int) ([]*raid.FaultDevice, func() []Device) {
	t.Helper()
	var fds []*raid.FaultDevice
	for i := 0; i < n; i++ {
		fds = append(fds, raid.NewFaultDevice(raid.NewMemDevice("m", 1<<20, 512, true)))
	}
	return fds, func() []Device {
		out := make([]Device, len(fds))
		for i, d := range fds {
			out[i] = d
		}
		return out
	}
}

func TestStamperStampAndHighest(t *testing.T) {
	fds, members := newMembers(t, 3)
	// Something else in the region (say an old boot sector) is preserved.
	junk := bytes.Repeat([]byte{0xaa}, RegionSize-RecordSize)
	if _, err := fds[1].WriteAt(append(make([]byte, RecordSize), junk...), 0); err != nil {
		t.Fatal(err)
	}
	s := &Stamper{Array: testUUID, Node: 1, Members: members, Now: func() time.Time { return time.Unix(100, 0) }}
	r, err := s.Highest()
	if err != nil || r.Generation != 0 {
		t.Fatalf("blank members: %+v, %v", r, err)
	}
	if err := s.Stamp(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Highest(); err != nil || r.Generation != 5 || r.Node != 1 || r.Time != time.Unix(100, 0).UnixNano() {
		t.Fatalf("after stamp 5: %+v, %v", r, err)
	}
	got := make([]byte, RegionSize)
	fds[1].ReadAt(got, 0)
	if !bytes.Equal(got[RecordSize:], junk) {
		t.Fatal("stamping changed the rest of the region")
	}
	// Never lowered.
	s2 := &Stamper{Array: testUUID, Node: 2, Members: members}
	if err := s2.Stamp(context.Background(), 3); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Highest(); r.Generation != 5 || r.Node != 1 {
		t.Fatalf("stamp 3 over 5: %+v", r)
	}
	// The highest member wins even if others are behind (a member that
	// was stamped alone, say).
	if _, err := fds[2].WriteAt(Record{Array: testUUID, Generation: 8, Node: 4}.Encode(), 0); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Highest(); r.Generation != 8 || r.Node != 4 {
		t.Fatalf("highest: %+v", r)
	}
}

func TestStamperCorruptForeignUnreadable(t *testing.T) {
	fds, members := newMembers(t, 2)
	s := &Stamper{Array: testUUID, Node: 1, Members: members}
	if err := s.Stamp(context.Background(), 2); err != nil {
		t.Fatal(err)
	}
	// Torn record on member 1: reported, with the member, and the other
	// member's stamp still returned.
	b := Record{Array: testUUID, Generation: 3}.Encode()
	b[40] ^= 0xff
	fds[1].WriteAt(b, 0)
	r, err := s.Highest()
	var me *MemberError
	if !errors.Is(err, ErrCorrupt) || !errors.As(err, &me) || me.Member != 1 || r.Generation != 2 {
		t.Fatalf("torn member: %+v, %v", r, err)
	}
	// Stamping repairs it.
	if err := s.Stamp(context.Background(), 3); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Highest(); err != nil || r.Generation != 3 {
		t.Fatalf("after repair: %+v, %v", r, err)
	}
	// Another array's stamp is refused, never obeyed nor overwritten.
	other := testUUID
	other[0] ^= 1
	fds[0].WriteAt(Record{Array: other, Generation: 99}.Encode(), 0)
	if _, err := s.Highest(); !errors.Is(err, ErrForeign) {
		t.Fatalf("foreign: %v", err)
	}
	if err := s.Stamp(context.Background(), 4); !errors.Is(err, ErrForeign) {
		t.Fatalf("stamp over foreign: %v", err)
	}
	fds[0].WriteAt(Record{Array: testUUID, Generation: 4}.Encode(), 0)
	// An unreadable member: Highest reports it; Stamp fails (the fence
	// must not succeed while a member the array uses lacks the stamp).
	fds[1].Inject(raid.Fault{Ops: raid.OpRead, Off: 0, Len: RegionSize})
	r, err = s.Highest()
	if !errors.As(err, &me) || me.Member != 1 || !errors.Is(err, raid.ErrInjected) || r.Generation != 4 {
		t.Fatalf("unreadable member: %+v, %v", r, err)
	}
	if err := s.Stamp(context.Background(), 5); !errors.Is(err, raid.ErrInjected) {
		t.Fatalf("stamp with unreadable member: %v", err)
	}
	fds[1].Clear()
	fds[1].Inject(raid.Fault{Ops: raid.OpWrite, Off: 0, Len: RegionSize})
	if err := s.Stamp(context.Background(), 6); !errors.Is(err, raid.ErrInjected) {
		t.Fatalf("stamp with unwritable member: %v", err)
	}
	// Once the array leaves the member out, stamping succeeds.
	s.Members = func() []Device { return []Device{fds[0], nil} }
	if err := s.Stamp(context.Background(), 6); err != nil {
		t.Fatal(err)
	}
}

// barrierDevice holds its first read until every member of the group has
// started one (or a second passed): a stamp that went member after member
// would never get past the first.
type barrierDevice struct {
	Device
	started *sync.WaitGroup
	all     chan struct{}
	once    sync.Once
	waited  *atomic.Int32
}

func (d *barrierDevice) ReadAt(p []byte, off int64) (int, error) {
	d.once.Do(func() {
		d.started.Done()
		select {
		case <-d.all:
			d.waited.Add(1)
		case <-time.After(time.Second):
		}
	})
	return d.Device.ReadAt(p, off)
}

// TestStampMembersInParallel: the fence's wait runs from the last member
// made durable, so Stamp writes the members in parallel; each member must
// still end up stamped.
func TestStampMembersInParallel(t *testing.T) {
	const n = 4
	_, members := newMembers(t, n)
	var started sync.WaitGroup
	started.Add(n)
	all := make(chan struct{})
	go func() { started.Wait(); close(all) }()
	var waited atomic.Int32
	devs := members()
	wrapped := make([]Device, n)
	for i, d := range devs {
		wrapped[i] = &barrierDevice{Device: d, started: &started, all: all, waited: &waited}
	}
	s := &Stamper{Array: testUUID, Node: 1, Members: func() []Device { return wrapped }}
	if err := s.Stamp(context.Background(), 9); err != nil {
		t.Fatal(err)
	}
	if w := waited.Load(); w != n {
		t.Fatalf("%d of %d members were being stamped at the same time, want all", w, n)
	}
	for i, d := range devs {
		if r, err := s.ReadMember(d); err != nil || r.Generation != 9 {
			t.Fatalf("member %d after the stamp: %+v, %v", i, r, err)
		}
	}
}

// TestHighestReadsMembersInParallel: every renewal and every bitmap flush
// waits for Highest, so it reads the members at the same time, and still
// returns the highest stamp.
func TestHighestReadsMembersInParallel(t *testing.T) {
	const n = 4
	_, members := newMembers(t, n)
	devs := members()
	s := &Stamper{Array: testUUID, Node: 1, Members: members}
	if err := s.Stamp(context.Background(), 7); err != nil {
		t.Fatal(err)
	}
	var started sync.WaitGroup
	started.Add(n)
	all := make(chan struct{})
	go func() { started.Wait(); close(all) }()
	var waited atomic.Int32
	wrapped := make([]Device, n)
	for i, d := range devs {
		wrapped[i] = &barrierDevice{Device: d, started: &started, all: all, waited: &waited}
	}
	s.Members = func() []Device { return wrapped }
	r, err := s.Highest()
	if err != nil || r.Generation != 7 {
		t.Fatalf("Highest: %+v, %v; want generation 7", r, err)
	}
	if w := waited.Load(); w != n {
		t.Fatalf("%d of %d members were being read at the same time, want all", w, n)
	}
}
