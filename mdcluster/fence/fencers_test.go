package fence

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// guard returns a context that fails a stuck test instead of hanging it.
func guard(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestTestFencerSucceedsAndRecords(t *testing.T) {
	var f TestFencer
	req := Request{Node: 3, FailedAt: t0, Generation: 9}
	res, err := f.Fence(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if res.Node != 3 || !res.FencedAt.Equal(t0) || res.Method != "test" {
		t.Errorf("Result = %+v", res)
	}
	f.Now = func() time.Time { return t0.Add(time.Minute) }
	res, _ = f.Fence(context.Background(), Request{Node: 4, FailedAt: t0})
	if !res.FencedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("FencedAt = %v, want the injected clock", res.FencedAt)
	}
	calls := f.Calls()
	if len(calls) != 2 || calls[0] != req || calls[1].Node != 4 {
		t.Errorf("Calls = %+v", calls)
	}
}

func TestTestFencerFailNext(t *testing.T) {
	var f TestFencer
	boom := errors.New("boom")
	f.FailNext(2, boom)
	for i := range 2 {
		if _, err := f.Fence(context.Background(), Request{Node: 1}); !errors.Is(err, boom) {
			t.Fatalf("call %d: err = %v, want boom", i+1, err)
		}
	}
	if _, err := f.Fence(context.Background(), Request{Node: 1}); err != nil {
		t.Fatalf("third call: %v, want success", err)
	}
	f.FailNext(1, nil)
	if _, err := f.Fence(context.Background(), Request{Node: 1}); !errors.Is(err, ErrInjected) {
		t.Fatalf("err = %v, want ErrInjected", err)
	}
	f.FailNext(3, nil)
	f.FailNext(0, nil)
	if _, err := f.Fence(context.Background(), Request{Node: 1}); err != nil {
		t.Fatalf("after clearing: %v", err)
	}
}

func TestTestFencerHold(t *testing.T) {
	var f TestFencer
	f.Hold()
	ctx := guard(t)
	type out struct {
		res Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		r, err := f.Fence(ctx, Request{Node: 7, FailedAt: t0})
		done <- out{r, err}
	}()
	if err := f.WaitCalls(ctx, 1); err != nil {
		t.Fatal(err)
	}
	select {
	case o := <-done:
		t.Fatalf("held call returned before Release: %+v", o)
	default:
	}
	f.Release()
	o := <-done
	if o.err != nil || o.res.Node != 7 {
		t.Fatalf("released call = %+v, %v", o.res, o.err)
	}
	// After Release new calls do not block.
	if _, err := f.Fence(ctx, Request{Node: 8}); err != nil {
		t.Fatal(err)
	}
}

func TestTestFencerHeldCallHonoursCtx(t *testing.T) {
	var f TestFencer
	f.Hold()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := f.Fence(ctx, Request{Node: 1}); !errors.Is(err, context.Canceled) || !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout and context.Canceled", err)
	}
	if err := f.WaitCalls(ctx, 5); !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitCalls err = %v, want context.Canceled", err)
	}
}

func TestTestFencerConcurrent(t *testing.T) {
	var f TestFencer
	f.FailNext(10, nil)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for i := range 40 {
		wg.Go(func() {
			if _, err := f.Fence(context.Background(), Request{Node: ddraid.NodeID(1 + i%5)}); err != nil {
				mu.Lock()
				failed++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if failed != 10 || len(f.Calls()) != 40 {
		t.Fatalf("%d failed of %d calls, want 10 of 40", failed, len(f.Calls()))
	}
}

type fakeStamper struct {
	mu   sync.Mutex
	gens []uint64
	err  error
}

func (s *fakeStamper) Stamp(ctx context.Context, gen uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.gens = append(s.gens, gen)
	return nil
}

func TestStampFencer(t *testing.T) {
	st := &fakeStamper{}
	f := StampFencer{Stamper: st, Now: func() time.Time { return t0 }}
	res, err := f.Fence(context.Background(), Request{Node: 2, Generation: 42})
	if err != nil {
		t.Fatal(err)
	}
	if res.Node != 2 || res.Method != "generation-stamp" || !res.FencedAt.Equal(t0) || res.Verified {
		t.Errorf("Result = %+v", res)
	}
	if len(st.gens) != 1 || st.gens[0] != 42 {
		t.Errorf("stamped %v, want [42]", st.gens)
	}

	st.err = errors.New("device sdb: write failed")
	_, err = f.Fence(context.Background(), Request{Node: 2, Generation: 43})
	if !errors.Is(err, ErrFailed) || !errors.Is(err, st.err) || !strings.Contains(err.Error(), "43") {
		t.Errorf("err = %v, want ErrFailed wrapping the stamper's error", err)
	}

	st.err = nil
	if _, err := f.Fence(context.Background(), Request{Node: 2}); err == nil {
		t.Error("stamping generation 0 succeeded")
	}
	if _, err := (StampFencer{}).Fence(context.Background(), Request{Node: 2, Generation: 1}); err == nil {
		t.Error("StampFencer without a stamper succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := f.Fence(ctx, Request{Node: 2, Generation: 44}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: err = %v", err)
	}
	if len(st.gens) != 1 {
		t.Errorf("stamps after failures = %v, want only [42]", st.gens)
	}
}

func TestLevels(t *testing.T) {
	first, second := &TestFencer{}, &TestFencer{}
	first.FailNext(1, errors.New("ipmi unreachable"))
	l := Levels{first, second}
	res, err := l.Fence(context.Background(), Request{Node: 3, FailedAt: t0})
	if err != nil || res.Node != 3 {
		t.Fatalf("Fence = %+v, %v; want success from level 2", res, err)
	}
	if len(first.Calls()) != 1 || len(second.Calls()) != 1 {
		t.Errorf("calls: level1 %d, level2 %d; want 1, 1", len(first.Calls()), len(second.Calls()))
	}
	// When level 1 works, level 2 is not tried.
	if _, err := l.Fence(context.Background(), Request{Node: 3}); err != nil || len(second.Calls()) != 1 {
		t.Errorf("level 2 tried although level 1 succeeded (err %v)", err)
	}
	// All fail: both errors reported.
	first.FailNext(1, errors.New("ipmi unreachable"))
	second.FailNext(1, errors.New("stamp failed"))
	_, err = l.Fence(context.Background(), Request{Node: 3})
	if err == nil || !strings.Contains(err.Error(), "ipmi unreachable") || !strings.Contains(err.Error(), "stamp failed") {
		t.Errorf("err = %v, want both levels' errors", err)
	}
	if _, err := (Levels{}).Fence(context.Background(), Request{Node: 3}); !errors.Is(err, ErrFailed) {
		t.Errorf("empty Levels: err = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	n := len(first.Calls())
	if _, err := l.Fence(ctx, Request{Node: 3}); !errors.Is(err, context.Canceled) || len(first.Calls()) != n {
		t.Errorf("cancelled ctx: err = %v, calls %d → %d", err, n, len(first.Calls()))
	}
}

// TestStampFencerWaitsOutTheLease: the fence returns only after the
// stamp and then the whole wait; FencedAt is taken after the wait; a wait
// cut short is a failure, never a success.
func TestStampFencerWaitsOutTheLease(t *testing.T) {
	st := &fakeStamper{}
	var slept []time.Duration
	var stampedBeforeSleep bool
	now := t0
	f := StampFencer{Stamper: st, Wait: 7 * time.Second, Now: func() time.Time { return now },
		Sleep: func(ctx context.Context, d time.Duration) error {
			stampedBeforeSleep = len(st.gens) == 1
			slept = append(slept, d)
			now = now.Add(d)
			return ctx.Err()
		}}
	res, err := f.Fence(context.Background(), Request{Node: 3, Generation: 9})
	if err != nil {
		t.Fatal(err)
	}
	if !stampedBeforeSleep || len(slept) != 1 || slept[0] != 7*time.Second {
		t.Fatalf("stamped before sleep %v, slept %v", stampedBeforeSleep, slept)
	}
	if !res.FencedAt.Equal(t0.Add(7 * time.Second)) {
		t.Errorf("FencedAt %v, want after the wait", res.FencedAt)
	}
	f.Sleep = func(ctx context.Context, d time.Duration) error { return context.DeadlineExceeded }
	if _, err := f.Fence(context.Background(), Request{Node: 3, Generation: 10}); !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("wait cut short: err = %v, want ErrTimeout", err)
	}
}
