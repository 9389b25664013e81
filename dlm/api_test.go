package dlm_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/dlm/transport"
)

// TestFailedRequestReturnsNilLock: a request that fails leaves no handle
// behind, whichever way it fails.
func TestFailedRequestReturnsNilLock(t *testing.T) {
	ls := open(t, newNode(t), 0)
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	lk, err := ls.Lock(bg(), "r", dlm.PR, dlm.NoQueue)
	if !errors.Is(err, dlm.ErrAgain) || lk != nil {
		t.Fatalf("NoQueue refused: lock %v, err %v; want nil and ErrAgain", lk, err)
	}
	lk, err = ls.Acquire(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.PR, Flags: dlm.NoQueue})
	if !errors.Is(err, dlm.ErrAgain) || lk != nil {
		t.Fatalf("Acquire refused: lock %v, err %v", lk, err)
	}
	ctx, cancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel()
	lk, err = ls.Lock(ctx, "r", dlm.EX, 0)
	if !errors.Is(err, dlm.ErrTimeout) || lk != nil {
		t.Fatalf("timed out: lock %v, err %v", lk, err)
	}
	lk, err = ls.Lock(bg(), "r", dlm.Mode(42), 0)
	if !errors.Is(err, dlm.ErrInvalid) || lk != nil {
		t.Fatalf("bad mode: lock %v, err %v", lk, err)
	}
	lk, err = ls.LockAsync(bg(), dlm.LockRequest{Resource: "", Mode: dlm.EX}, func(*dlm.Lock, error) {
		t.Error("completion of a request refused outright")
	})
	if !errors.Is(err, dlm.ErrInvalid) || lk != nil {
		t.Fatalf("async refused: lock %v, err %v", lk, err)
	}
}

// TestContextErrorsMatchBoth: a request ended by its context fails with an
// error that is both the DLM status and the context's error, for
// synchronous and asynchronous requests and conversions, local and remote;
// a plain Cancel is not a context error.
func TestContextErrorsMatchBoth(t *testing.T) {
	ls := open(t, newNode(t), 0)
	holder, err := ls.Lock(bg(), "r", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	both := func(what string, err, st, cerr error) {
		t.Helper()
		if !errors.Is(err, st) || !errors.Is(err, cerr) {
			t.Fatalf("%s: %v; want it to match %v and %v", what, err, st, cerr)
		}
	}
	dl, cancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer cancel()
	_, err = ls.Lock(dl, "r", dlm.EX, 0)
	both("deadline", err, dlm.ErrTimeout, context.DeadlineExceeded)

	cctx, ccancel := context.WithCancel(bg())
	time.AfterFunc(5*time.Millisecond, ccancel)
	_, err = ls.Lock(cctx, "r", dlm.EX, 0)
	both("cancelled", err, dlm.ErrCancel, context.Canceled)

	_, err = ls.Lock(cctx, "r", dlm.EX, 0) // ended before the call
	both("already cancelled", err, dlm.ErrCancel, context.Canceled)

	adl, acancel := context.WithTimeout(bg(), 5*time.Millisecond)
	defer acancel()
	errc := make(chan error, 1)
	if _, err := ls.LockAsync(adl, dlm.LockRequest{Resource: "r", Mode: dlm.PR}, func(_ *dlm.Lock, err error) { errc <- err }); err != nil {
		t.Fatal(err)
	}
	both("async deadline", <-errc, dlm.ErrTimeout, context.DeadlineExceeded)

	nl, err := ls.Lock(bg(), "r", dlm.NL, 0)
	if err != nil {
		t.Fatal(err)
	}
	cdl, ccancel2 := context.WithTimeout(bg(), 5*time.Millisecond)
	defer ccancel2()
	both("convert deadline", nl.Convert(cdl, dlm.EX, 0), dlm.ErrTimeout, context.DeadlineExceeded)

	// Cancel without a context is ErrCancel only.
	w, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX}, func(_ *dlm.Lock, err error) { errc <- err })
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Cancel(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, dlm.ErrCancel) || errors.Is(err, context.Canceled) {
		t.Fatalf("plain cancel: %v", err)
	}
	// A context that ends after the grant changes nothing.
	if err := holder.Unlock(bg(), 0); err != nil {
		t.Fatal(err)
	}
	late, lcancel := context.WithCancel(bg())
	g, err := ls.Lock(late, "r", dlm.PR, 0)
	if err != nil {
		t.Fatal(err)
	}
	lcancel()
	if g.Mode() != dlm.PR {
		t.Fatalf("lock after its context ended: %v", g.Mode())
	}

	// Remote: the master's cancel reply still carries the context error.
	c := startCluster(t, 2, nil)
	cls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	if _, err := cls[1].Lock(ctx, "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	rdl, rcancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer rcancel()
	_, err = cls[0].Lock(rdl, "r", dlm.EX, 0)
	both("remote deadline", err, dlm.ErrTimeout, context.DeadlineExceeded)
}

// findResource returns the named resource of a dump.
func findResource(d []dlm.ResourceInfo, name string) (dlm.ResourceInfo, bool) {
	for _, r := range d {
		if r.Name == name {
			return r, true
		}
	}
	return dlm.ResourceInfo{}, false
}

// TestLockIDMatchesDump: Lock.ID is the ID the dumps show, for locks
// mastered here (granted and waiting) and at a remote master.
func TestLockIDMatchesDump(t *testing.T) {
	ls := open(t, newNode(t), 0)
	a, err := ls.Lock(bg(), "r", dlm.EX, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.PR}, func(*dlm.Lock, error) {})
	if err != nil {
		t.Fatal(err)
	}
	if a.ID() == 0 || a.ID() == b.ID() {
		t.Fatalf("IDs %v and %v", a.ID(), b.ID())
	}
	r, _ := findResource(ls.Dump(), "r")
	if len(r.Granted) != 1 || r.Granted[0].ID != a.ID() || len(r.Waiting) != 1 || r.Waiting[0].ID != b.ID() {
		t.Fatalf("dump %+v; want granted %v, waiting %v", r, a.ID(), b.ID())
	}

	c := startCluster(t, 2, nil)
	cls := c.open(t, "md0", 0)
	ctx := withGuard(t)
	if _, err := cls[1].Lock(ctx, "r", dlm.NL, 0); err != nil { // node 2 masters r
		t.Fatal(err)
	}
	l1, err := cls[0].Lock(ctx, "r", dlm.PR, 0)
	if err != nil {
		t.Fatal(err)
	}
	own, _ := findResource(cls[0].Dump(), "r")
	if own.Master != 2 || len(own.Granted) != 1 || own.Granted[0].ID != l1.ID() {
		t.Fatalf("requester's dump %+v; want its lock %v", own, l1.ID())
	}
	at, _ := findResource(cls[1].Dump(), "r")
	found := false
	for _, li := range at.Granted {
		if li.Node == 1 {
			found = li.ID == l1.ID()
		}
	}
	if !found {
		t.Fatalf("master's dump %+v; want node 1's lock as %v", at, l1.ID())
	}
}

// TestRequestLVB: an LVB given with the request follows Linux's rules: with
// ValBlk the grant reads the resource's value over it; without, it stays
// and a ValBlk unlock or down-conversion from PW/EX writes it. Locally and
// through a remote master.
func TestRequestLVB(t *testing.T) {
	val := bytes.Repeat([]byte{0xab}, 32)
	check := func(t *testing.T, writer, reader *dlm.Lockspace) {
		ctx := withGuard(t)
		if _, err := writer.Acquire(ctx, dlm.LockRequest{Resource: "v", Mode: dlm.EX, LVB: val[:8]}); !errors.Is(err, dlm.ErrInvalid) {
			t.Fatalf("short LVB: %v", err)
		}
		buf := bytes.Clone(val)
		w, err := writer.Acquire(ctx, dlm.LockRequest{Resource: "v", Mode: dlm.EX, LVB: buf})
		if err != nil {
			t.Fatal(err)
		}
		buf[0] = 0 // the lock keeps its own copy
		if !bytes.Equal(w.LVB(), val) {
			t.Fatalf("LVB after a grant without ValBlk: %x", w.LVB())
		}
		if err := w.Convert(ctx, dlm.NL, dlm.ValBlk); err != nil { // writes it
			t.Fatal(err)
		}
		r, err := reader.Acquire(ctx, dlm.LockRequest{Resource: "v", Mode: dlm.PW, Flags: dlm.ValBlk,
			LVB: make([]byte, 32)})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(r.LVB(), val) || r.StatusFlags()&dlm.ValNotValid != 0 {
			t.Fatalf("reader: %x flags %v", r.LVB(), r.StatusFlags())
		}
		if err := r.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
		// With ValBlk, the value given is replaced by the resource's.
		x, err := writer.Acquire(ctx, dlm.LockRequest{Resource: "v", Mode: dlm.EX, Flags: dlm.ValBlk,
			LVB: bytes.Repeat([]byte{1}, 32)})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x.LVB(), val) {
			t.Fatalf("ValBlk grant kept the caller's bytes: %x", x.LVB())
		}
		if err := x.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("local", func(t *testing.T) {
		ls := open(t, newNode(t), 32)
		check(t, ls, ls)
	})
	t.Run("remote", func(t *testing.T) {
		c := startCluster(t, 2, nil)
		ls := c.open(t, "md0", 32)
		if _, err := ls[1].Lock(withGuard(t), "v", dlm.NL, 0); err != nil { // node 2 masters v
			t.Fatal(err)
		}
		check(t, ls[0], ls[1])
	})
}

// TestDumpShowsIdleResources: a resource with no locks that its master
// keeps cached shows in the dump, marked idle, with its LVB.
func TestDumpShowsIdleResources(t *testing.T) {
	ls := open(t, newNode(t), 8)
	lk, err := ls.Lock(bg(), "cached", dlm.EX, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.SetLVB([]byte("8 bytes!")); err != nil {
		t.Fatal(err)
	}
	if err := lk.Unlock(bg(), dlm.ValBlk); err != nil {
		t.Fatal(err)
	}
	r, ok := findResource(ls.Dump(), "cached")
	if !ok || !r.Idle || r.Master != 1 || len(r.Granted)+len(r.Converting)+len(r.Waiting) != 0 ||
		string(r.LVB) != "8 bytes!" || r.LVBSeq != 1 {
		t.Fatalf("idle resource: found %v, %+v", ok, r)
	}
	if _, err := ls.Lock(bg(), "cached", dlm.NL, 0); err != nil {
		t.Fatal(err)
	}
	if r, _ := findResource(ls.Dump(), "cached"); r.Idle {
		t.Fatalf("resource with a lock marked idle: %+v", r)
	}
}

// TestDefaultConfigIsFilledIn: DefaultConfig spells out the defaults and
// starts a working cluster of one.
func TestDefaultConfigIsFilledIn(t *testing.T) {
	cfg := dlm.DefaultConfig()
	if cfg.ID != 1 || cfg.TickInterval != dlm.DefaultTickInterval || cfg.DeferDelay != dlm.DefaultDeferDelay ||
		!reflect.DeepEqual(cfg.Transport, transport.DefaultConfig()) || cfg.Managed || len(cfg.Peers) != 0 {
		t.Fatalf("DefaultConfig: %+v", cfg)
	}
	if dlm.DefaultTickInterval <= 0 || dlm.DefaultDeferDelay <= 0 {
		t.Fatal("zero defaults")
	}
	cfg.Logger = quietLogger()
	n, err := dlm.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if n.ID() != 1 || n.Controller().Generation() != 1 {
		t.Fatalf("node %d at generation %d", n.ID(), n.Controller().Generation())
	}
	ls, err := n.Open("x", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := n.Open("x", dlm.OpenOptions{}); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("open after close: %v", err)
	}
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); !errors.Is(err, dlm.ErrReleased) {
		t.Fatalf("lock after close: %v", err)
	}
}

// TestZeroHandlesDoNotPanic: methods on a zero or nil Lock or Lockspace
// return ErrInvalid or zero values.
func TestZeroHandlesDoNotPanic(t *testing.T) {
	for name, lk := range map[string]*dlm.Lock{"zero": {}, "nil": nil} {
		for op, err := range map[string]error{
			"convert":       lk.Convert(bg(), dlm.EX, 0),
			"convert async": lk.ConvertAsync(bg(), dlm.EX, 0, func(*dlm.Lock, error) {}),
			"unlock":        lk.Unlock(bg(), 0),
			"unlock async":  lk.UnlockAsync(bg(), 0, func(*dlm.Lock, error) {}),
			"cancel unlock": lk.Unlock(bg(), dlm.Cancel),
			"cancel":        lk.Cancel(),
			"set LVB":       lk.SetLVB(make([]byte, 32)),
		} {
			if !errors.Is(err, dlm.ErrInvalid) || !strings.Contains(err.Error(), "not from a Lockspace") {
				t.Errorf("%s lock: %s: %v", name, op, err)
			}
		}
		if lk.ID() != 0 || lk.Resource() != "" || lk.Mode() != dlm.ModeIV || lk.StatusFlags() != 0 ||
			lk.LVB() != nil || lk.LVBSeq() != 0 {
			t.Errorf("%s lock: accessors %v %q %v %v %v %v", name, lk.ID(), lk.Resource(), lk.Mode(),
				lk.StatusFlags(), lk.LVB(), lk.LVBSeq())
		}
	}
	for name, ls := range map[string]*dlm.Lockspace{"zero": {}, "nil": nil} {
		if l, err := ls.Lock(bg(), "r", dlm.EX, 0); !errors.Is(err, dlm.ErrInvalid) || l != nil {
			t.Errorf("%s lockspace: lock: %v %v", name, l, err)
		}
		if l, err := ls.LockAsync(bg(), dlm.LockRequest{Resource: "r", Mode: dlm.EX}, func(*dlm.Lock, error) {}); !errors.Is(err, dlm.ErrInvalid) || l != nil {
			t.Errorf("%s lockspace: lock async: %v %v", name, l, err)
		}
		if err := ls.Release(); !errors.Is(err, dlm.ErrInvalid) {
			t.Errorf("%s lockspace: release: %v", name, err)
		}
		if ls.Name() != "" || ls.LVBLen() != 0 || ls.Dump() != nil {
			t.Errorf("%s lockspace: accessors", name)
		}
	}
}

// captureLog collects log records at level and above.
type captureLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *captureLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *captureLog) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// TestRoutineEventsAreNotInfo: opening, stopping, recovering and releasing
// a lockspace are routine; they log below Info.
func TestRoutineEventsAreNotInfo(t *testing.T) {
	var out captureLog
	n, err := dlm.NewNode(dlm.Config{Logger: slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		t.Fatal(err)
	}
	closeOnCleanup(t, n)
	ls, err := n.Open("quiet", dlm.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ls.Lock(bg(), "r", dlm.EX, 0); err != nil {
		t.Fatal(err)
	}
	n.Controller().Stop()
	if err := n.Controller().Recover(2, []dlm.NodeID{1}, nil, false); err != nil {
		t.Fatal(err)
	}
	if err := ls.Release(); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); s != "" {
		t.Fatalf("routine events logged at Info or above:\n%s", s)
	}
}
