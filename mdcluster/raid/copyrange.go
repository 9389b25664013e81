package raid

import (
	"context"
	"fmt"
)

// CopyRequest is one piece of a resync, recovery or catch-up whose course
// a caller drives itself: the array manager copies window by window under
// the cluster's resync lock, announces each window to the other nodes
// first, and records the outcome in the superblocks. Resync, FullResync,
// Recover and CatchUp run a whole operation and change member states;
// CopyRange copies and changes no state, so the caller decides.
type CopyRequest struct {
	// Op names the operation for Progress and logs ("resync",
	// "recovery", "catch-up").
	Op string
	// Target is the member whose copies are written; -1 writes every
	// writable copy other than the one read (a resync).
	Target int
	// Lo and Hi bound the array bytes to copy.
	Lo, Hi int64
	// Chunks, if set, restricts the copy to these bitmap chunks (in
	// Config.BitmapChunkSize units) inside [Lo, Hi).
	Chunks []uint64
	// BeforeWindow, if set, is called before each window of
	// ResyncIOSize bytes is copied, with the window's first array byte;
	// an error stops the copy with it.
	BeforeWindow func(ctx context.Context, off int64) error
}

// CopyRange copies r's range window by window like the other sync
// operations (from the first readable copy, under the resync barrier,
// throttled, counted in Progress, flushed on every member written before
// it returns), announcing nothing and changing no member state. For a
// Recovering target it advances the member's recovered point (the reads
// it may serve) when the copy starts at or below that point and covers
// the whole range. A resync leaves the range out of the "needs sync" set.
func (e *Engine) CopyRange(ctx context.Context, r CopyRequest) error {
	if r.Lo < 0 || r.Hi > e.size || r.Lo > r.Hi {
		return fmt.Errorf("raid: %s of array bytes [%d,%d): outside the array's %d bytes", r.Op, r.Lo, r.Hi, e.size)
	}
	if r.Lo%int64(e.bs) != 0 || r.Hi%int64(e.bs) != 0 {
		return fmt.Errorf("raid: %s of array bytes [%d,%d): not whole %d-byte blocks", r.Op, r.Lo, r.Hi, e.bs)
	}
	if r.Target >= len(e.members) {
		return fmt.Errorf("raid: %s: no member %d", r.Op, r.Target)
	}
	spans := []span{{r.Lo, r.Hi}}
	if len(r.Chunks) > 0 {
		cs, err := e.chunkSpans(r.Chunks)
		if err != nil {
			return fmt.Errorf("raid: %s: %w", r.Op, err)
		}
		spans = spans[:0]
		for _, s := range cs {
			if lo, hi := max(s.lo, r.Lo), min(s.hi, r.Hi); lo < hi {
				spans = append(spans, span{lo, hi})
			}
		}
	}
	if len(spans) == 0 || spans[0].lo >= spans[0].hi {
		return nil
	}
	whole := len(r.Chunks) == 0
	var m *member
	if r.Target >= 0 {
		m = e.members[r.Target]
		if s := m.st(); s != Recovering && s != InSync {
			return fmt.Errorf("raid: %s: member %d is %s", r.Op, r.Target, s)
		}
	}
	if _, err := e.runSyncOpts(ctx, syncOpts{op: r.Op, target: r.Target, spans: spans, before: r.BeforeWindow}); err != nil {
		return fmt.Errorf("raid: %s of array bytes [%d,%d): %w", r.Op, r.Lo, r.Hi, err)
	}
	if m != nil && whole && m.st() == Recovering {
		for {
			cur := m.recovered.Load()
			if r.Lo > cur || r.Hi <= cur || m.recovered.CompareAndSwap(cur, r.Hi) {
				break
			}
		}
	}
	return nil
}

// SetInSync marks a Recovering member in sync: its caller (the array
// manager) rebuilt it with CopyRange and recorded that in the
// superblocks. When then every member is in sync, the chunks kept dirty
// by degraded writes are released.
func (e *Engine) SetInSync(member int) error {
	if err := e.checkRecovering(member); err != nil {
		return fmt.Errorf("raid: set in sync: %w", err)
	}
	return e.nowInSync(member)
}

// SetRecovered sets how far (array bytes) a Recovering member is known to
// be rebuilt, so reads below it may use the member: the caller knows it
// from the superblock's recovery offset after a restart.
func (e *Engine) SetRecovered(member int, off int64) error {
	if err := e.checkRecovering(member); err != nil {
		return fmt.Errorf("raid: set recovered: %w", err)
	}
	e.members[member].recovered.Store(min(max(off, 0), e.size))
	return nil
}
