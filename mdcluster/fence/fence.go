// Package fence cuts failed nodes off from the shared storage before anyone
// recovers their locks.
//
// A node that has dropped out of the agreed view may still be alive and still
// be writing to the member devices (it may just be partitioned or paused).
// Its locks, and with them its write-intent bitmap slot, must not be granted
// to anyone until it is confirmed fenced, otherwise two writers touch the same
// chunks. This package provides:
//
//   - Fencer, the one-method interface every fencing method implements, and
//     Levels to try several methods in order;
//   - Agent, an adapter for the ClusterLabs fence_* agents (power and fabric
//     fencing through the agents' stdin protocol);
//   - StampFencer and the GenerationStamper hook, storage-level fencing by
//     writing the current view generation onto the member devices;
//   - TestFencer, a programmable fencer for tests and the simulator;
//   - the pure policy: PlanFencing (who fences whom, and only when quorate)
//     and Ledger (has every failed node been fenced since it failed?);
//   - Retrier, which retries a failing fencer with backoff and logs each
//     failure.
//
// Everything except Agent, Retrier's default sleep and TestFencer's blocking
// is pure: no I/O, no goroutines, no clock. Times are passed in.
package fence

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// Request asks for one node to be fenced.
type Request struct {
	// Node is the victim.
	Node ddraid.NodeID
	// Name is the victim's name as fence devices know it (the agents'
	// nodename). Empty means the decimal node ID.
	Name string
	// FailedAt is when the victim was seen to fail. A fence only counts for
	// this failure if it is confirmed at or after this time (see Ledger).
	FailedAt time.Time
	// Generation is the generation of the agreed view that excludes the
	// victim, i.e. the view on whose behalf the fence is done. Storage
	// fencing stamps it onto the member devices.
	Generation uint64
}

// NodeName returns Name, or the decimal node ID when Name is empty.
func (r Request) NodeName() string {
	if r.Name != "" {
		return r.Name
	}
	return r.Node.String()
}

// Result confirms a successful fence.
type Result struct {
	// Node is the node that was fenced.
	Node ddraid.NodeID
	// Method names the fencer that did it (e.g. "agent fence_ipmilan",
	// "generation-stamp", "manual"), for logs and the ledger.
	Method string
	// FencedAt is when the fence was confirmed, taken after the method
	// succeeded. It must come from the same clock as Request.FailedAt.
	FencedAt time.Time
	// Verified is set when the method checked the node's state after acting
	// (the agents' "verifiable operation", action=status reporting off).
	Verified bool
}

// Fencer is one way of fencing a node: power, fabric, storage generation, an
// operator's acknowledgement, or a combination of them.
//
// Fence returns only when the node is fenced (nil error) or the attempt has
// failed. A Fencer must never report success it did not achieve: a timeout,
// a cancelled ctx or an unreachable device is an error. Fence may be called
// concurrently for different nodes and must be safe to repeat for the same
// node (retries, and several views failing the same node).
type Fencer interface {
	Fence(ctx context.Context, req Request) (Result, error)
}

// Errors wrapped by the fencers in this package; test with errors.Is.
var (
	// ErrTimeout: the method did not finish within its time limit. Timeout is
	// a failure, never a success.
	ErrTimeout = errors.New("fence timed out")
	// ErrFailed: the method ran and reported failure.
	ErrFailed = errors.New("fence failed")
	// ErrNotVerified: the method acted, but checking afterwards did not show
	// the node off.
	ErrNotVerified = errors.New("fence not verified")
)

// Levels tries its fencers in order and returns the first success, like
// fencing levels in dlm_controld and Pacemaker: e.g. power first, then the
// storage generation stamp. If every level fails the error joins all of their
// errors. A cancelled ctx stops before the next level.
type Levels []Fencer

// Fence implements Fencer.
func (l Levels) Fence(ctx context.Context, req Request) (Result, error) {
	if len(l) == 0 {
		return Result{}, fmt.Errorf("fence: node %s: no fencing levels configured: %w", req.Node, ErrFailed)
	}
	var errs []error
	for i, f := range l {
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("level %d not tried: %w", i+1, err))
			break
		}
		res, err := f.Fence(ctx, req)
		if err == nil {
			return res, nil
		}
		errs = append(errs, fmt.Errorf("level %d: %w", i+1, err))
	}
	return Result{}, fmt.Errorf("fence: node %s: every level failed: %w", req.Node, errors.Join(errs...))
}
