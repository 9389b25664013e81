package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
)

// buildFencer turns the configured levels into a fence.Levels: a level of
// agents becomes allOf (every agent must succeed, Pacemaker's rule for the
// devices of one level), the stamp level a fence.StampFencer over the
// array layer's stamper that returns only once the victim's I/O lease has
// run out (wait: the lease plus its margin).
func buildFencer(levels []config.FenceLevel, stamper fence.GenerationStamper, wait time.Duration) fence.Levels {
	out := make(fence.Levels, 0, len(levels))
	for _, lv := range levels {
		if lv.Stamp {
			out = append(out, fence.StampFencer{Stamper: stamper, Wait: wait})
			continue
		}
		var all allOf
		for _, a := range lv.Agents {
			all = append(all, &fence.Agent{Path: a.Path, Options: a.Options, NodeOptions: a.NodeOptions,
				Timeout: a.Timeout, Verify: a.Verify})
		}
		out = append(out, all)
	}
	return out
}

// allOf fences with every fencer in turn and succeeds only if all do: one
// power supply switched off is not a node switched off. It stops at the
// first failure (the level has failed; the next level is tried).
type allOf []fence.Fencer

// Fence implements fence.Fencer.
func (a allOf) Fence(ctx context.Context, req fence.Request) (fence.Result, error) {
	if len(a) == 1 {
		return a[0].Fence(ctx, req)
	}
	var methods []string
	res := fence.Result{Node: req.Node, Verified: true}
	for i, f := range a {
		r, err := f.Fence(ctx, req)
		if err != nil {
			return fence.Result{}, fmt.Errorf("device %d of %d: %w", i+1, len(a), err)
		}
		methods = append(methods, r.Method)
		res.Verified = res.Verified && r.Verified
		res.FencedAt = r.FencedAt
	}
	res.Method = strings.Join(methods, " + ")
	return res, nil
}

// fenceHistoryLen bounds the fencing history kept for `status`.
const fenceHistoryLen = 64

// recordingFencer times every fence attempt the node runs, counts it in
// the metrics and keeps the last fenceHistoryLen attempts for `status`.
type recordingFencer struct {
	f fence.Fencer
	m *Metrics

	mu      sync.Mutex
	history []ctl.FenceRecord
	dropped uint64
}

// Fence implements fence.Fencer.
func (r *recordingFencer) Fence(ctx context.Context, req fence.Request) (fence.Result, error) {
	start := time.Now()
	res, err := r.f.Fence(ctx, req)
	took := time.Since(start)
	rec := ctl.FenceRecord{Victim: uint32(req.Node), Generation: req.Generation, Started: start, Seconds: took.Seconds(),
		OK: err == nil, Method: res.Method}
	if err != nil {
		rec.Error = err.Error()
		if errors.Is(err, context.DeadlineExceeded) {
			rec.Error = "timed out: " + rec.Error
		}
	}
	r.m.fenceAttempt(req.Node, took, err == nil)
	r.mu.Lock()
	if len(r.history) == fenceHistoryLen {
		copy(r.history, r.history[1:])
		r.history = r.history[:fenceHistoryLen-1]
		r.dropped++
	}
	r.history = append(r.history, rec)
	r.mu.Unlock()
	return res, err
}

// History returns the attempts kept, oldest first, and how many older
// ones were dropped.
func (r *recordingFencer) History() ([]ctl.FenceRecord, uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]ctl.FenceRecord(nil), r.history...), r.dropped
}
