package fence

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestBackoffDelay(t *testing.T) {
	b := Backoff{Initial: 100 * time.Millisecond, Max: time.Second}
	want := []time.Duration{100, 100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		if got := b.Delay(i); got != w*time.Millisecond {
			t.Errorf("Delay(%d) = %v, want %v", i, got, w*time.Millisecond)
		}
	}
	var zero Backoff
	if zero.Delay(1) != time.Second || zero.Delay(100) != 30*time.Second {
		t.Errorf("zero Backoff: Delay(1) = %v, Delay(100) = %v; want 1s, 30s", zero.Delay(1), zero.Delay(100))
	}
}

// fakeSleep records the requested delays and returns at once, or returns
// ctx's error.
type fakeSleep struct{ delays []time.Duration }

func (s *fakeSleep) sleep(ctx context.Context, d time.Duration) error {
	s.delays = append(s.delays, d)
	return ctx.Err()
}

func TestRetrierRetriesWithBackoffAndLogs(t *testing.T) {
	f := &TestFencer{}
	f.FailNext(3, errors.New("device busy"))
	var logs bytes.Buffer
	sl := &fakeSleep{}
	r := Retrier{
		Fencer:  f,
		Backoff: Backoff{Initial: time.Second, Max: 3 * time.Second},
		Sleep:   sl.sleep,
		Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
	}
	res, err := r.Fence(context.Background(), Request{Node: 6, FailedAt: t0, Generation: 3})
	if err != nil {
		t.Fatalf("Fence: %v", err)
	}
	if res.Node != 6 || len(f.Calls()) != 4 {
		t.Errorf("result %+v after %d calls, want node 6 after 4", res, len(f.Calls()))
	}
	if want := []time.Duration{time.Second, 2 * time.Second, 3 * time.Second}; !reflect.DeepEqual(sl.delays, want) {
		t.Errorf("delays %v, want %v", sl.delays, want)
	}
	out := logs.String()
	if n := strings.Count(out, "fencing failed, will retry"); n != 3 {
		t.Errorf("%d failure records, want 3:\n%s", n, out)
	}
	for _, s := range []string{"node=6", "attempt=3", "device busy", "retry_in=3s", "node fenced"} {
		if !strings.Contains(out, s) {
			t.Errorf("logs do not contain %q:\n%s", s, out)
		}
	}
}

func TestRetrierGivesUpAfterMaxAttempts(t *testing.T) {
	f := &TestFencer{}
	f.FailNext(10, errors.New("no route to BMC"))
	sl := &fakeSleep{}
	r := Retrier{Fencer: f, MaxAttempts: 3, Sleep: sl.sleep}
	_, err := r.Fence(context.Background(), Request{Node: 2})
	if err == nil || !strings.Contains(err.Error(), "no route to BMC") || !strings.Contains(err.Error(), "3 attempts") {
		t.Fatalf("err = %v, want the last failure after 3 attempts", err)
	}
	if len(f.Calls()) != 3 || len(sl.delays) != 2 {
		t.Errorf("%d calls, %d sleeps; want 3 and 2", len(f.Calls()), len(sl.delays))
	}
}

func TestRetrierStopsWhenCtxDone(t *testing.T) {
	f := &TestFencer{}
	f.FailNext(10, nil)
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	r := Retrier{Fencer: f, Sleep: func(ctx context.Context, d time.Duration) error {
		calls++
		if calls == 2 {
			cancel()
		}
		return ctx.Err()
	}}
	_, err := r.Fence(ctx, Request{Node: 2})
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrInjected) {
		t.Fatalf("err = %v, want context.Canceled and the last failure", err)
	}
	if len(f.Calls()) != 2 {
		t.Errorf("%d attempts, want 2", len(f.Calls()))
	}
}

func TestRetrierRealSleep(t *testing.T) {
	f := &TestFencer{}
	f.FailNext(1, nil)
	r := Retrier{Fencer: f, Backoff: Backoff{Initial: time.Millisecond}}
	if _, err := r.Fence(guard(t), Request{Node: 2}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sleepTimer(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("sleepTimer on a cancelled ctx = %v", err)
	}
}
