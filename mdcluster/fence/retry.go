package fence

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// Backoff is the delay schedule between fence attempts: Initial after the
// first failure, doubling after each further failure, capped at Max. There is
// no jitter: only one node (the plan's actor) fences, so there is no herd to
// spread out, and a fixed schedule replays exactly in the simulator.
type Backoff struct {
	// Initial is the delay after the first failure; zero means 1s.
	Initial time.Duration
	// Max caps the delay; zero means 30s.
	Max time.Duration
}

// Delay returns the wait after the given number of consecutive failures
// (failures ≥ 1; smaller values are treated as 1).
func (b Backoff) Delay(failures int) time.Duration {
	initial, maxDelay := b.Initial, b.Max
	if initial <= 0 {
		initial = time.Second
	}
	if maxDelay <= 0 {
		maxDelay = 30 * time.Second
	}
	d := initial
	for i := 1; i < failures && d < maxDelay; i++ {
		d *= 2
	}
	return min(d, maxDelay)
}

// Retrier is a Fencer that retries another Fencer until it succeeds, ctx is
// done, or MaxAttempts is reached. A failed fence is never given up on
// silently: each failure is logged with the attempt number and the next
// delay, because an operator may have to step in (fix the device, or
// acknowledge the fence by hand) while recovery waits.
type Retrier struct {
	// Fencer does each attempt.
	Fencer Fencer
	// Backoff spaces the attempts.
	Backoff Backoff
	// MaxAttempts bounds the attempts; zero means retry until ctx is done.
	MaxAttempts int
	// Sleep waits between attempts and returns ctx's error if ctx ends first.
	// Nil means a real timer; tests and the simulator inject their clock.
	Sleep func(ctx context.Context, d time.Duration) error
	// Logger receives one record per failure and one per success; nil
	// discards them.
	Logger *slog.Logger
}

// Fence implements Fencer.
func (r Retrier) Fence(ctx context.Context, req Request) (Result, error) {
	log := r.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sleep := r.Sleep
	if sleep == nil {
		sleep = sleepTimer
	}
	for attempt := 1; ; attempt++ {
		res, err := r.Fencer.Fence(ctx, req)
		if err == nil {
			log.Info("node fenced", "node", req.Node, "method", res.Method, "attempt", attempt,
				"verified", res.Verified, "generation", req.Generation)
			return res, nil
		}
		if r.MaxAttempts > 0 && attempt >= r.MaxAttempts {
			log.Error("fencing failed, giving up", "node", req.Node, "attempt", attempt, "err", err)
			return Result{}, fmt.Errorf("fence: node %s: giving up after %d attempts: %w", req.Node, attempt, err)
		}
		delay := r.Backoff.Delay(attempt)
		log.Warn("fencing failed, will retry", "node", req.Node, "attempt", attempt, "retry_in", delay, "err", err)
		if serr := sleep(ctx, delay); serr != nil {
			return Result{}, fmt.Errorf("fence: node %s: stopped after %d attempts (%w): %w", req.Node, attempt, serr, err)
		}
	}
}

func sleepTimer(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
