package fence

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// GenerationStamper writes the cluster's current view generation onto the
// shared member devices. Every node checks the on-disk generation against its
// own (before it writes, and whenever a write fails), and a node that finds a
// newer generation than its view stops all I/O. Stamping therefore fences
// every node outside the current view at once, without any power or fabric
// control: the storage itself turns the stale writer away.
//
// Implementations must:
//   - return nil only once gen is durable on every member device the array
//     can still reach (a device that missed the stamp would still accept the
//     stale writer);
//   - never lower the on-disk generation: stamping a generation older than
//     the one on disk succeeds without writing, because the newer one fences
//     at least as much;
//   - be safe to call repeatedly and concurrently with the same generation;
//   - return an error when ctx is done before the stamp is durable.
//
// This package only defines the hook; mdcluster/lease implements it on the
// member devices (lease.Stamper) together with the I/O lease every node
// keeps by re-reading the stamp.
type GenerationStamper interface {
	Stamp(ctx context.Context, gen uint64) error
}

// StampFencer fences by stamping the request's generation (the view that
// excludes the victim) onto the member devices. It is the storage-level
// fence: it works when the victim's power or switch port cannot be reached,
// and it is typically the last of several Levels.
type StampFencer struct {
	// Stamper writes the generation.
	Stamper GenerationStamper
	// Now stamps Result.FencedAt; nil means time.Now.
	Now func() time.Time
	// Wait is how long to wait after the stamp is durable before the
	// fence counts as done: the I/O lease plus its margin
	// (lease.FenceWait). A victim that still runs stops writing when its
	// lease runs out, so only then may its slot be recovered. Zero means
	// no wait (only for stampers whose readers stop at once).
	Wait time.Duration
	// Sleep waits d or until ctx is done (then returning its error); nil
	// means a real timer. The simulator injects its own.
	Sleep func(ctx context.Context, d time.Duration) error
}

// Fence implements Fencer: stamp, then wait out Wait. Result.Verified is
// false: the stamper confirms the write, and the wait bounds when the
// victim must have stopped, but nothing checks that it did.
func (s StampFencer) Fence(ctx context.Context, req Request) (Result, error) {
	if s.Stamper == nil {
		return Result{}, errors.New("fence: generation stamp: no stamper configured")
	}
	if req.Generation == 0 {
		return Result{}, fmt.Errorf("fence: generation stamp: node %s: request has no view generation", req.Node)
	}
	if err := ctx.Err(); err != nil {
		return Result{}, fmt.Errorf("fence: generation stamp: node %s: %w", req.Node, err)
	}
	if err := s.Stamper.Stamp(ctx, req.Generation); err != nil {
		return Result{}, fmt.Errorf("fence: generation stamp %d for node %s: %w: %w", req.Generation, req.Node, ErrFailed, err)
	}
	if s.Wait > 0 {
		sleep := s.Sleep
		if sleep == nil {
			sleep = sleepTimer
		}
		if err := sleep(ctx, s.Wait); err != nil {
			return Result{}, fmt.Errorf("fence: generation stamp %d for node %s: waiting %v for its lease to run out: %w: %w", req.Generation, req.Node, s.Wait, ErrTimeout, err)
		}
	}
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	return Result{Node: req.Node, Method: "generation-stamp", FencedAt: now()}, nil
}
