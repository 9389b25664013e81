package raid

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// switchGate is an IOGate a test opens and closes.
type switchGate struct {
	stopped atomic.Bool
	checks  atomic.Int64
}

var errTestStopped = errors.New("test gate closed")

func (g *switchGate) Wait() error { return g.Check() }
func (g *switchGate) Check() error {
	g.checks.Add(1)
	if g.stopped.Load() {
		return errTestStopped
	}
	return nil
}

// TestGateStopsIOWithoutFailingMembers: a closed gate refuses writes,
// reads and flushes with ErrIOStopped (and the gate's reason), never
// fails a member, and I/O resumes when it opens again.
func TestGateStopsIOWithoutFailingMembers(t *testing.T) {
	g := &switchGate{}
	r := newRig(t, mustRAID1(t, 2), rigOpts{bitmap: true, tweak: func(c *Config) { c.Gate = g }})
	buf := make([]byte, 4096)
	if err := r.e.WriteAt(buf, 0, 0); err != nil {
		t.Fatal(err)
	}
	if g.checks.Load() == 0 {
		t.Fatal("gate never consulted")
	}
	g.stopped.Store(true)
	if err := r.e.WriteAt(buf, 8192, 0); !errors.Is(err, ErrIOStopped) || !errors.Is(err, errTestStopped) {
		t.Fatalf("write with gate closed: %v", err)
	}
	if _, err := r.e.ReadAt(buf, 0); !errors.Is(err, ErrIOStopped) {
		t.Fatalf("read with gate closed: %v", err)
	}
	if err := r.e.Flush(); !errors.Is(err, ErrIOStopped) {
		t.Fatalf("flush with gate closed: %v", err)
	}
	if f := r.failures(); len(f) != 0 {
		t.Fatalf("members failed by a closed gate: %v", f)
	}
	for _, m := range r.e.Members() {
		if m.State != InSync {
			t.Fatalf("member %+v not in sync", m)
		}
	}
	g.stopped.Store(false)
	if err := r.e.WriteAt(buf, 8192, 0); err != nil {
		t.Fatal(err)
	}
}

// TestGateRefusesInFlight: a write admitted while the gate was open is
// refused at the device once it closes (the device-level Check), and the
// member stays in sync.
func TestGateRefusesInFlight(t *testing.T) {
	g := &switchGate{}
	r := newRig(t, mustRAID1(t, 2), rigOpts{tweak: func(c *Config) { c.Gate = g }})
	var admitted atomic.Bool
	r.e.cfg.Gate = gateFunc{wait: func() error { admitted.Store(true); g.stopped.Store(true); return nil }, check: g.Check}
	err := r.e.WriteAt(make([]byte, 4096), 0, 0)
	if !admitted.Load() || !errors.Is(err, ErrIOStopped) {
		t.Fatalf("in-flight write after the gate closed: %v", err)
	}
	if f := r.failures(); len(f) != 0 {
		t.Fatalf("members failed: %v", f)
	}
}

// TestGateInFlightWaitsOutAStop: a write admitted while the gate was open
// meets it closed at the device, and the gate reopens within its wait (a
// survivor between its fencer's stamp and its own install of the new
// view): the write waits and succeeds, and no device operation ran while
// the gate was closed. (Found by the three-VM power-cut test: survivors'
// writers got EIO.)
func TestGateInFlightWaitsOutAStop(t *testing.T) {
	var open atomic.Bool
	open.Store(true)
	var closedChecks, waits atomic.Int32
	var admitted atomic.Bool
	r := newRig(t, mustRAID1(t, 2), rigOpts{})
	r.e.cfg.Gate = gateFunc{
		wait: func() error {
			if !admitted.Load() {
				// Admission: the gate closes right after it.
				admitted.Store(true)
				open.Store(false)
				return nil
			}
			waits.Add(1)
			time.Sleep(50 * time.Millisecond)
			open.Store(true)
			return nil
		},
		check: func() error {
			if !open.Load() {
				closedChecks.Add(1)
				return errors.New("closed")
			}
			return nil
		},
	}
	if err := r.e.WriteAt(bytes.Repeat([]byte{7}, 4096), 0, 0); err != nil {
		t.Fatalf("in-flight write across a stop that passed within the wait: %v", err)
	}
	if closedChecks.Load() == 0 || waits.Load() == 0 {
		t.Fatalf("the gate was never met closed (%d checks) or never waited for (%d waits)", closedChecks.Load(), waits.Load())
	}
	if f := r.failures(); len(f) != 0 {
		t.Fatalf("members failed: %v", f)
	}
}

type gateFunc struct{ wait, check func() error }

func (g gateFunc) Wait() error  { return g.wait() }
func (g gateFunc) Check() error { return g.check() }

func mustRAID1(t *testing.T, disks int) Geometry {
	t.Helper()
	g, err := NewRAID1(disks, 2048) // 1 MiB
	if err != nil {
		t.Fatal(err)
	}
	return g
}
