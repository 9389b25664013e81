package raid

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// Resync makes the given bitmap chunks (in BitmapChunkSize units of array
// bytes) identical on every copy, copying from the first in-sync copy,
// and durable before it returns. It is bitmap/ownership's Array: slot
// recovery calls it with a dead node's dirty chunks, and Join with the
// chunks this node's own crash left dirty.
//
// Until a chunk is copied, reads of it go to the first in-sync copy. Each
// window of ResyncIOSize bytes is copied under the range lock, which is
// the resync barrier: writes to that window wait for the copy, and the
// copy for writes already in flight there. Writes elsewhere in the chunk
// go on; whatever they write reaches every copy, so the chunk still ends
// identical. The copy is throttled by the speed limits and reported by
// Progress. If some copy could not be written (a member missing or
// failed), the chunks are kept dirty in the bitmap for a later recovery.
func (e *Engine) Resync(ctx context.Context, chunks []uint64) error {
	spans, err := e.chunkSpans(chunks)
	if err != nil {
		return fmt.Errorf("raid: resync: %w", err)
	}
	if len(spans) == 0 {
		return nil
	}
	for _, s := range spans {
		e.needSync.add(s.lo, s.hi)
	}
	degraded, err := e.runSync(ctx, "resync", -1, spans, false)
	if err != nil {
		return fmt.Errorf("raid: resync of %d chunks: %w", len(chunks), err)
	}
	e.chunksDone(chunks, degraded)
	return nil
}

// FullResync resyncs the whole array from the first in-sync copy, as md
// does for a new array not created with --assume-clean. Reads go to the
// first in-sync copy beyond the resync point. Its windows are announced
// through OnSyncWindow.
func (e *Engine) FullResync(ctx context.Context) error {
	e.needSync.add(0, e.size)
	degraded, err := e.runSync(ctx, "resync", -1, []span{{0, e.size}}, true)
	if err != nil {
		return fmt.Errorf("raid: full resync: %w", err)
	}
	if cs := e.cfg.BitmapChunkSize; cs > 0 && !degraded {
		// The bits mdadm sets on a new array (and any left by a crash)
		// can now be cleared.
		if rd, ok := e.writeIntent().(resyncDoner); ok {
			n := uint64((e.size + cs - 1) / cs)
			all := make([]uint64, n)
			for i := range all {
				all[i] = uint64(i)
			}
			rd.ResyncDone(all)
		}
	}
	return nil
}

// Recover rebuilds member, which must be Recovering (AddMember): every
// copy it holds is copied from the first in-sync copy of that block, in
// array order. Reads may use it below the recovered point as it advances.
// On success it is in sync; if then every member is, the chunks kept
// dirty by degraded writes are released. Its windows are announced
// through OnSyncWindow.
func (e *Engine) Recover(ctx context.Context, member int) error {
	if err := e.checkRecovering(member); err != nil {
		return fmt.Errorf("raid: recovery: %w", err)
	}
	if _, err := e.runSync(ctx, "recovery", member, []span{{0, e.size}}, true); err != nil {
		return fmt.Errorf("raid: recovery of member %d: %w", member, err)
	}
	return e.nowInSync(member)
}

// CatchUp brings a re-added member up to date from the chunks written
// while it was away: chunks is the union of every node's bitmap (md-
// cluster's re-add gathers all slots), to which the engine adds the
// chunks its own degraded writes kept dirty. Only the member's copies of
// those chunks are written. The member must be Recovering (AddMember);
// it is not read until the catch-up completes, then it is in sync.
func (e *Engine) CatchUp(ctx context.Context, member int, chunks []uint64) error {
	if err := e.checkRecovering(member); err != nil {
		return fmt.Errorf("raid: catch-up: %w", err)
	}
	all := append(slices.Clone(chunks), e.pinnedChunks()...)
	spans, err := e.chunkSpans(all)
	if err != nil {
		return fmt.Errorf("raid: catch-up of member %d: %w", member, err)
	}
	if _, err := e.runSync(ctx, "catch-up", member, spans, true); err != nil {
		return fmt.Errorf("raid: catch-up of member %d: %w", member, err)
	}
	return e.nowInSync(member)
}

func (e *Engine) checkRecovering(member int) error {
	if member < 0 || member >= len(e.members) {
		return fmt.Errorf("no member %d", member)
	}
	if s := e.members[member].st(); s != Recovering {
		return fmt.Errorf("member %d is %s, not recovering", member, s)
	}
	return nil
}

// nowInSync marks a rebuilt member in sync and, when the whole array is,
// releases the degraded chunks.
func (e *Engine) nowInSync(member int) error {
	m := e.members[member]
	e.mu.Lock()
	if m.st() != Recovering {
		e.mu.Unlock()
		return fmt.Errorf("raid: member %d became %s while being rebuilt", member, m.st())
	}
	m.state.Store(int32(InSync))
	e.mu.Unlock()
	e.log.Info("member in sync", "member", member)
	if !e.Degraded() {
		e.unpinAll()
	}
	return nil
}

// chunksDone records the outcome of a resync of chunks: level everywhere
// (the bitmap may clear them) or not (they stay dirty).
func (e *Engine) chunksDone(chunks []uint64, degraded bool) {
	wi := e.writeIntent()
	if wi == nil {
		return
	}
	if degraded {
		cs := e.cfg.BitmapChunkSize
		for _, c := range chunks {
			e.pin(wi, int64(c)*cs, int64(c+1)*cs)
		}
		return
	}
	if rd, ok := wi.(resyncDoner); ok {
		rd.ResyncDone(chunks)
	}
}

// chunkSpans turns bitmap chunk numbers into sorted, merged array ranges.
func (e *Engine) chunkSpans(chunks []uint64) ([]span, error) {
	cs := e.cfg.BitmapChunkSize
	if cs == 0 {
		return nil, errors.New("no bitmap chunk size configured")
	}
	cc := slices.Clone(chunks)
	slices.Sort(cc)
	cc = slices.Compact(cc)
	var out []span
	for _, c := range cc {
		lo := int64(c) * cs
		if c > uint64(e.size/cs) || lo >= e.size {
			return nil, fmt.Errorf("chunk %d is beyond the array (%d bytes, %d-byte chunks)", c, e.size, cs)
		}
		hi := min(lo+cs, e.size)
		if k := len(out); k > 0 && out[k-1].hi == lo {
			out[k-1].hi = hi
			continue
		}
		out = append(out, span{lo, hi})
	}
	return out, nil
}

// runSync copies the spans window by window: to every other copy
// (target -1) or to member target's copies only. One runs at a time (md
// has one sync thread per array). It returns whether some copy could not
// be written.
func (e *Engine) runSync(ctx context.Context, op string, target int, spans []span, announce bool) (degraded bool, err error) {
	return e.runSyncOpts(ctx, syncOpts{op: op, target: target, spans: spans, announce: announce, track: op == "recovery"})
}

// syncOpts says what runSyncOpts copies and how.
type syncOpts struct {
	op       string
	target   int
	spans    []span
	announce bool // through OnSyncWindow
	track    bool // advance the target's recovered point window by window
	before   func(ctx context.Context, off int64) error
}

// runSyncOpts is runSync with every option.
func (e *Engine) runSyncOpts(ctx context.Context, o syncOpts) (degraded bool, err error) {
	op, target, spans, announce := o.op, o.target, o.spans, o.announce
	if len(spans) == 0 {
		return false, ctx.Err()
	}
	select {
	case e.syncSem <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-e.syncSem }()
	if e.closed.Load() {
		return false, ErrClosed
	}
	ctx, cancel := context.WithCancel(ctx)
	e.mu.Lock()
	e.syncStop = cancel
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.syncStop = nil
		e.mu.Unlock()
		cancel()
	}()

	var total int64
	for _, s := range spans {
		total += s.hi - s.lo
	}
	e.progress.begin(op, target, total, e.clock.Now())
	e.throttle.reset(e.userIO.Load())
	e.log.Info("sync started", "op", op, "member", target, "bytes", total)
	defer func() {
		e.progress.end(err, e.clock.Now())
		if err != nil {
			e.log.Error("sync stopped", "op", op, "member", target, "err", err)
		} else {
			e.log.Info("sync done", "op", op, "member", target, "bytes", total, "degraded", degraded)
		}
	}()

	rsz := int64(e.cfg.ResyncIOSize)
	buf := e.pool.get(int(rsz))
	defer e.pool.put(buf)
	touched := make([]bool, len(e.members))
	end := spans[len(spans)-1].hi
	var announced int64 = -1
	if announce && e.cfg.OnSyncWindow != nil {
		defer func() {
			if werr := e.cfg.OnSyncWindow(context.WithoutCancel(ctx), 0, 0); werr != nil && err == nil {
				err = fmt.Errorf("withdrawing the sync window: %w", werr)
			}
		}()
	}
	for _, s := range spans {
		for pos := s.lo; pos < s.hi; {
			wend := min(s.hi, pos-pos%rsz+rsz)
			if announce && e.cfg.OnSyncWindow != nil && wend > announced {
				announced = min(pos+max(e.cfg.ClusterWindow, rsz), end)
				if err := e.cfg.OnSyncWindow(ctx, pos, announced); err != nil {
					return degraded, fmt.Errorf("announcing the sync window at %d: %w", pos, err)
				}
			}
			if o.before != nil {
				if err := o.before(ctx, pos); err != nil {
					return degraded, err
				}
			}
			if err := e.throttle.wait(ctx); err != nil {
				return degraded, err
			}
			start := e.clock.Now()
			copied, deg, err := e.copyWindow(ctx, buf[:wend-pos], pos, target, touched)
			if err != nil {
				return degraded, err
			}
			degraded = degraded || deg
			e.throttle.done(copied, start, e.userIO.Load())
			if target < 0 {
				e.needSync.remove(pos, wend)
			} else if o.track {
				e.members[target].recovered.Store(wend)
			}
			e.progress.add(wend-pos, copied, e.clock.Now())
			e.st.resyncBytes.Add(uint64(copied))
			pos = wend
		}
	}
	// Durable before returning: flush every member written.
	var fails []<-chan struct{}
	for i, t := range touched {
		if !t || !e.members[i].writable() {
			continue
		}
		ref := e.members[i].dev.Load()
		if ref == nil {
			continue
		}
		if serr := ref.dev.Sync(); serr != nil {
			e.members[i].errors.Add(1)
			serr = fmt.Errorf("member %d: flushing after %s: %w", i, op, serr)
			degraded = true
			if ch := e.failMember(i, serr); ch != nil {
				fails = append(fails, ch)
			} else {
				err = errors.Join(err, serr)
			}
			if i == target {
				err = errors.Join(err, serr)
			}
		}
	}
	waitFailures(fails)
	return degraded, err
}

// copyWindow copies array bytes [off, off+len(buf)) (within one resync
// window) under the range lock: each extent is read from its first
// readable copy (never the target), then written to the copies being
// synced. A copy whose read fails is skipped as a source and rewritten as
// a target. It returns the bytes read and whether some copy could not be
// written.
func (e *Engine) copyWindow(ctx context.Context, buf []byte, off int64, target int, touched []bool) (copied int64, degraded bool, err error) {
	n := int64(len(buf))
	e.ioMu.RLock()
	defer e.ioMu.RUnlock()
	if e.closed.Load() {
		return 0, false, ErrClosed
	}
	if target >= 0 && !e.members[target].writable() {
		return 0, false, fmt.Errorf("member %d is %s", target, e.members[target].st())
	}
	lo, hi := off, off+n
	if e.mut&mutNoBarrier != 0 {
		lo, hi = 0, 0
	}
	lk, err := e.locks.lockCtx(ctx, lo, hi)
	if err != nil {
		return 0, false, err
	}
	defer e.locks.unlock(lk)

	pl := getPlan()
	defer putPlan(pl)
	e.extents(pl, off, n)
	var bad []int // members whose reads failed in this window
	isTarget := func(l Loc, src int) bool {
		return l.Member != src && e.members[l.Member].writable() && (target < 0 || l.Member == target)
	}
	for attempt := 0; ; attempt++ {
		pl.groups = pl.groups[:0]
		copied = 0
		for k := range pl.exts {
			x := &pl.exts[k]
			locs := pl.locs[x.lo:x.hi]
			x.src = -1
			for i, l := range locs {
				if l.Member != target && !slices.Contains(bad, l.Member) && e.members[l.Member].readable(x.off, x.n) {
					x.src = i
					break
				}
			}
			need := false
			for _, l := range locs {
				src := -1
				if x.src >= 0 {
					src = locs[x.src].Member
				}
				if isTarget(l, src) {
					need = true
				}
			}
			if !need {
				x.src = -1
				continue
			}
			if x.src < 0 {
				return 0, degraded, fmt.Errorf("array bytes %d+%d: no readable copy to copy from: %w", x.off, x.n, ErrNoCopy)
			}
			l := locs[x.src]
			pl.add(l.Member, ioOp{dev: l.Off, bo: x.off - off, n: x.n})
			copied += x.n
		}
		pl.run(func(g *opGroup) {
			m := e.members[g.m]
			for _, op := range g.ops {
				if err := e.devRead(m, buf[op.bo:op.bo+op.n], op.dev); err != nil {
					g.err = err
					return
				}
			}
		})
		failed := false
		for i := range pl.groups {
			if g := &pl.groups[i]; g.err != nil {
				e.log.Warn("sync read failed; using another copy and rewriting this one", "member", g.m, "err", g.err)
				bad = append(bad, g.m)
				failed = true
			}
		}
		if !failed {
			break
		}
		if attempt >= e.geo.Copies() {
			return 0, degraded, fmt.Errorf("array bytes %d+%d: reads keep failing", off, n)
		}
	}

	pl.groups = pl.groups[:0]
	for _, x := range pl.exts {
		if x.src < 0 {
			continue
		}
		locs := pl.locs[x.lo:x.hi]
		src := locs[x.src].Member
		for _, l := range locs {
			if isTarget(l, src) {
				pl.add(l.Member, ioOp{dev: l.Off, bo: x.off - off, n: x.n})
			} else if target < 0 && l.Member != src && !e.members[l.Member].writable() {
				degraded = true
			}
		}
	}
	pl.run(func(g *opGroup) {
		m := e.members[g.m]
		for _, op := range g.ops {
			if err := e.devWrite(m, buf[op.bo:op.bo+op.n], op.dev, false); err != nil {
				g.err = err
				return
			}
		}
	})
	var fails []<-chan struct{}
	for i := range pl.groups {
		g := &pl.groups[i]
		touched[g.m] = true
		if g.err == nil {
			continue
		}
		degraded = true
		if ch := e.failMember(g.m, g.err); ch != nil {
			fails = append(fails, ch)
		}
		if g.m == target || e.members[g.m].st() != Failed {
			err = errors.Join(err, g.err)
		}
	}
	waitFailures(fails)
	return copied, degraded, err
}

// Progress returns the state of the running (or last) resync, recovery or
// catch-up: done and total bytes, speed and ETA.
func (e *Engine) Progress() Progress { return e.progress.get(e.clock.Now()) }

// SetSpeedLimits changes md's speed_limit_min and speed_limit_max (KiB/s)
// for this array, taking effect at the next resync I/O. Zero keeps a
// limit as it is.
func (e *Engine) SetSpeedLimits(min, max int64) {
	omin, omax := e.throttle.limits()
	if min == 0 {
		min = omin
	}
	if max == 0 {
		max = omax
	}
	e.throttle.setLimits(min, max)
}

// SpeedLimits returns the current speed limits in KiB/s.
func (e *Engine) SpeedLimits() (min, max int64) { return e.throttle.limits() }

// AddMember puts dev in the missing role member, as Recovering: writes go
// to it from now on, reads do not until Recover (a spare: rebuild
// everything) or CatchUp (a re-added member: rebuild the dirty chunks)
// has made it in sync.
func (e *Engine) AddMember(member int, dev Device, dataOffset int64) error {
	if member < 0 || member >= len(e.members) {
		return fmt.Errorf("raid: add member %d: no such role", member)
	}
	if err := e.checkDevice(member, dev, dataOffset); err != nil {
		return fmt.Errorf("raid: add member: %w", err)
	}
	if bs := dev.BlockSize(); bs > e.bs {
		return fmt.Errorf("raid: add member %d: %d-byte blocks, the array uses %d", member, bs, e.bs)
	}
	m := e.members[member]
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := m.st(); s != Missing {
		return fmt.Errorf("raid: add member %d: role is %s", member, s)
	}
	m.recovered.Store(0)
	m.corrected.Store(0)
	m.dev.Store(&devRef{dev: dev, dataOff: dataOffset})
	m.state.Store(int32(Recovering))
	e.log.Info("member added, to be rebuilt", "member", member)
	return nil
}

// FailMember fails member on the operator's request (mdadm --fail): it is
// used no more, and OnMemberFailed is called as for an I/O error. It
// returns once OnMemberFailed has returned and the requests that were
// running have finished, so no write reaches the member after it (md gives
// a faulty member no more I/O). It must therefore not be called from
// inside the engine's I/O (OnMemberFailed, Gate). It is refused for a
// member holding the last in-sync copy of some data.
func (e *Engine) FailMember(member int, reason error) error {
	if member < 0 || member >= len(e.members) {
		return fmt.Errorf("raid: fail member %d: no such role", member)
	}
	if reason == nil {
		reason = errors.New("failed by request")
	}
	ch := e.fail(member, reason, false)
	if ch == nil {
		return fmt.Errorf("raid: fail member %d: it is %s, or holds the last in-sync copy of some data", member, e.members[member].st())
	}
	<-ch
	// Drain the requests that chose their targets before the failure.
	e.ioMu.Lock()
	e.ioMu.Unlock() //nolint:staticcheck // an empty critical section is the drain
	return nil
}

// RemoveMember empties a failed or recovering role and returns its device
// for the caller to close, once no request still uses it. An in-sync
// member must be failed first.
func (e *Engine) RemoveMember(member int) (Device, error) {
	if member < 0 || member >= len(e.members) {
		return nil, fmt.Errorf("raid: remove member %d: no such role", member)
	}
	m := e.members[member]
	e.mu.Lock()
	switch m.st() {
	case InSync:
		e.mu.Unlock()
		return nil, fmt.Errorf("raid: remove member %d: in sync; fail it first", member)
	case Missing:
		e.mu.Unlock()
		return nil, nil
	case Recovering:
		m.state.Store(int32(Failed)) // stop new I/O; not a failure to report
	}
	e.mu.Unlock()
	// Drain requests that may still be using the device.
	e.ioMu.Lock()
	e.mu.Lock()
	ref := m.dev.Swap(nil)
	m.state.Store(int32(Missing))
	e.mu.Unlock()
	e.ioMu.Unlock()
	e.log.Info("member removed", "member", member)
	if ref == nil {
		return nil, nil
	}
	return ref.dev, nil
}
