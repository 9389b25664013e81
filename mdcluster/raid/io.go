package raid

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
)

// extent is a piece of a request that maps contiguously onto each copy;
// its copies are plan.locs[lo:hi].
type extent struct {
	off, n int64
	lo, hi int
	src    int // copyRange: index into locs of the source copy, -1 none
}

// ioOp is one device operation: member m's copy at data-area offset dev,
// for bytes [bo, bo+n) of the request's buffer.
type ioOp struct {
	dev, bo, n int64
}

// opGroup is everything one request does on one member, run in order by
// one goroutine; members run in parallel.
type opGroup struct {
	m   int
	ops []ioOp
	err error
	// failed lists the reads that failed (a read error does not stop the
	// member's other reads; each failed one is retried on its own).
	failed []int
}

// plan is a request's extents and device operations, recycled through a
// pool so the common paths do not allocate.
type plan struct {
	exts   []extent
	locs   []Loc
	groups []opGroup
}

var planPool = sync.Pool{New: func() any { return new(plan) }}

func getPlan() *plan { return planPool.Get().(*plan) }

func putPlan(p *plan) {
	p.exts, p.locs, p.groups = p.exts[:0], p.locs[:0], p.groups[:0]
	planPool.Put(p)
}

// extents fills p.exts with the extents of array bytes [off, off+n).
func (e *Engine) extents(p *plan, off, n int64) {
	p.exts, p.locs, p.groups = p.exts[:0], p.locs[:0], p.groups[:0]
	end := off + n
	for off < end {
		lo := len(p.locs)
		var run int64
		p.locs, run = e.geo.Locate(off, p.locs)
		run = min(run, end-off)
		p.exts = append(p.exts, extent{off: off, n: run, lo: lo, hi: len(p.locs), src: -1})
		off += run
	}
}

// add appends an operation to member m's group, merging it into the
// previous one when both the device range and the buffer range continue
// it (raid10 chunks that lie back to back on a member become one I/O).
func (p *plan) add(m int, op ioOp) {
	var g *opGroup
	for i := range p.groups {
		if p.groups[i].m == m {
			g = &p.groups[i]
			break
		}
	}
	if g == nil {
		if len(p.groups) < cap(p.groups) {
			p.groups = p.groups[:len(p.groups)+1]
			g = &p.groups[len(p.groups)-1]
			g.m, g.ops, g.err, g.failed = m, g.ops[:0], nil, g.failed[:0]
		} else {
			p.groups = append(p.groups, opGroup{m: m})
			g = &p.groups[len(p.groups)-1]
		}
	}
	if k := len(g.ops); k > 0 {
		last := &g.ops[k-1]
		if last.dev+last.n == op.dev && last.bo+last.n == op.bo {
			last.n += op.n
			return
		}
	}
	g.ops = append(g.ops, op)
}

// group returns member m's group, or nil.
func (p *plan) group(m int) *opGroup {
	for i := range p.groups {
		if p.groups[i].m == m {
			return &p.groups[i]
		}
	}
	return nil
}

// run runs fn on every group, in parallel (the first on the calling
// goroutine).
func (p *plan) run(fn func(g *opGroup)) {
	gs := p.groups
	if len(gs) == 1 {
		fn(&gs[0])
		return
	}
	var wg sync.WaitGroup
	for i := 1; i < len(gs); i++ {
		wg.Add(1)
		go func(g *opGroup) {
			defer wg.Done()
			fn(g)
		}(&gs[i])
	}
	if len(gs) > 0 {
		fn(&gs[0])
	}
	wg.Wait()
}

// devRead reads member m's copy at data-area offset dev into b.
func (e *Engine) devRead(m *member, b []byte, dev int64) error {
	ref := m.dev.Load()
	if ref == nil {
		return fmt.Errorf("member %d: no device", m.idx)
	}
	if err := e.gateCheck(); err != nil {
		return fmt.Errorf("member %d: %w", m.idx, err)
	}
	m.pending.Add(1)
	_, err := ref.dev.ReadAt(b, ref.dataOff+dev)
	m.pending.Add(-1)
	if err != nil {
		m.errors.Add(1)
		return fmt.Errorf("member %d: %w", m.idx, err)
	}
	m.reads.Add(1)
	m.bytesRead.Add(uint64(len(b)))
	return nil
}

// devWrite writes b to member m's copy at data-area offset dev.
func (e *Engine) devWrite(m *member, b []byte, dev int64, fua bool) error {
	ref := m.dev.Load()
	if ref == nil {
		return fmt.Errorf("member %d: no device", m.idx)
	}
	if err := e.gateCheck(); err != nil {
		return fmt.Errorf("member %d: %w", m.idx, err)
	}
	m.pending.Add(1)
	var err error
	if fua {
		_, err = ref.dev.WriteAtFUA(b, ref.dataOff+dev)
	} else {
		_, err = ref.dev.WriteAt(b, ref.dataOff+dev)
	}
	m.pending.Add(-1)
	if err != nil {
		m.errors.Add(1)
		return fmt.Errorf("member %d: %w", m.idx, err)
	}
	m.writes.Add(1)
	m.bytesWritten.Add(uint64(len(b)))
	return nil
}

// asyncWriter is a Device whose writes the engine may submit with native
// AIO (DirectFile on Linux): all the member writes of a request are then
// issued from the calling thread at once and reaped together, instead of
// one blocking write per member on a goroutine each.
type asyncWriter interface {
	// aioFD returns the descriptor to submit to; ok false means writes
	// must go through WriteAt for now.
	aioFD() (fd int, ok bool)
	// aioRefused records that AIO refused a write with EINVAL: every later
	// write goes through WriteAt.
	aioRefused()
}

// writeGroupsAIO does what writeCopies' goroutines do, with every member's
// operations submitted in one native AIO batch from this thread. It
// returns false, having done nothing, when some member's device cannot
// take AIO or no AIO context is free; the caller then uses devWrite. Each
// write's own result decides its member's fate as devWrite's would: an
// error fails the group (and so the member, in writeCopies); a write AIO
// refused (EINVAL, EAGAIN, EOPNOTSUPP) or cut short is finished with the
// device's WriteAt.
func (e *Engine) writeGroupsAIO(pl *plan, buf []byte) bool {
	var arr [aioMaxBatch]aioWrite
	var own [aioMaxBatch]int // group of each write
	var refs [aioMaxBatch]*devRef
	n := 0
	for i := range pl.groups {
		g := &pl.groups[i]
		ref := e.members[g.m].dev.Load()
		if ref == nil {
			return false
		}
		aw, ok := ref.dev.(asyncWriter)
		if !ok {
			return false
		}
		fd, ok := aw.aioFD()
		if !ok || n+len(g.ops) > len(arr) {
			return false
		}
		refs[i] = ref
		for _, op := range g.ops {
			arr[n] = aioWrite{fd: fd, p: buf[op.bo : op.bo+op.n], off: ref.dataOff + op.dev}
			own[n] = i
			n++
		}
	}
	// The gate is asked once per member before anything is submitted; a
	// member it stops gets no write, as with devWrite.
	stopped := false
	for i := range pl.groups {
		if err := e.gateCheck(); err != nil {
			pl.groups[i].err = fmt.Errorf("member %d: %w", pl.groups[i].m, err)
			stopped = true
		}
	}
	ws := arr[:n]
	if stopped {
		k := 0
		for j := range ws {
			if pl.groups[own[j]].err == nil {
				ws[k], own[k] = ws[j], own[j]
				k++
			}
		}
		ws = ws[:k]
	}
	for j := range ws {
		e.members[pl.groups[own[j]].m].pending.Add(1)
	}
	var hook func(submitted bool)
	for j := range ws {
		if _, ok := refs[own[j]].dev.(AIOObserver); ok {
			hook = newAIONotice(ws, own[:len(ws)], refs[:]).notify
			break
		}
	}
	if len(ws) > 0 && !aioWriteAll(ws, hook) {
		for j := range ws {
			e.members[pl.groups[own[j]].m].pending.Add(-1)
		}
		for i := range pl.groups {
			pl.groups[i].err = nil
		}
		return false
	}
	for j := range ws {
		w := &ws[j]
		g := &pl.groups[own[j]]
		m := e.members[g.m]
		err := e.aioResult(refs[own[j]], w)
		m.pending.Add(-1)
		if err != nil && e.mut&mutAIOLoseError == 0 {
			m.errors.Add(1)
			if g.err == nil {
				g.err = fmt.Errorf("member %d: %w", g.m, err)
			}
			continue
		}
		m.writes.Add(1)
		m.bytesWritten.Add(uint64(len(w.p)))
		e.st.aioWrites.Add(1)
	}
	return true
}

// aioNotice tells the members' devices that implement AIOObserver about
// their writes of a batch. It is built only when some device observes, so
// the usual path allocates nothing for it.
type aioNotice struct {
	ws  []aioWrite
	obs []AIOObserver // of each write; nil where its device does not observe
}

func newAIONotice(ws []aioWrite, own []int, refs []*devRef) *aioNotice {
	n := &aioNotice{ws: ws, obs: make([]AIOObserver, len(ws))}
	for j := range ws {
		n.obs[j], _ = refs[own[j]].dev.(AIOObserver)
	}
	return n
}

// notify is aioWriteAll's hook: before submission, or once in flight.
func (n *aioNotice) notify(submitted bool) {
	for j, o := range n.obs {
		switch {
		case o == nil:
		case submitted:
			o.AIOInFlight(n.ws[j].p, n.ws[j].off)
		default:
			o.AIOSubmit(n.ws[j].p, n.ws[j].off)
		}
	}
}

// aioResult turns an AIO write's result into devWrite's error, finishing
// the write with WriteAt where AIO refused it or wrote only part of it.
func (e *Engine) aioResult(ref *devRef, w *aioWrite) error {
	switch {
	case w.res == int64(len(w.p)):
		return nil
	case w.res >= 0:
		// Short (a signal, or the end of a block device): write the rest
		// the usual way, which also says why it stopped.
		e.st.aioFallbacks.Add(1)
		_, err := ref.dev.WriteAt(w.p[w.res:], w.off+w.res)
		return err
	}
	switch errno := syscall.Errno(-w.res); errno {
	case syscall.EINVAL, syscall.EOPNOTSUPP:
		ref.dev.(asyncWriter).aioRefused()
		fallthrough
	case syscall.EAGAIN:
		e.st.aioFallbacks.Add(1)
		_, err := ref.dev.WriteAt(w.p, w.off)
		return err
	default:
		return fmt.Errorf("write %s at %d+%d: %w", devName(ref.dev), w.off, len(w.p), errno)
	}
}

// devName names a device in an error: its path where it has one.
func devName(d Device) string {
	if p, ok := d.(interface{ Path() string }); ok {
		return p.Path()
	}
	return fmt.Sprintf("%T", d)
}

// blockRange returns the block-aligned range covering [off, off+n).
func (e *Engine) blockRange(off, n int64) (lo, hi int64) {
	m := int64(e.bs - 1)
	return off &^ m, (off + n + m) &^ m
}

func (e *Engine) checkRange(what string, off, n int64) error {
	if off < 0 || n < 0 || off+n > e.size {
		return fmt.Errorf("raid: %s of %d bytes at %d: outside the array (%d bytes)", what, n, off, e.size)
	}
	return nil
}

// ---------------------------------------------------------------- writes

// write is the write path: range lock (outside any remote resync window),
// write intent, data to every working copy in parallel, EndWrite, then the
// acknowledgement (the return).
func (e *Engine) write(p []byte, off int64, fua bool) error {
	n := int64(len(p))
	if n == 0 {
		return nil
	}
	lo, hi := e.blockRange(off, n)
	var lk *rangeEntry
	for {
		if err := e.admit(); err != nil {
			return err
		}
		var waited bool
		if e.mut&mutNoRangeLock != 0 {
			lk, _ = e.locks.enqueue(0, 0) // an empty range conflicts with nothing
		} else {
			lk, waited = e.locks.lock(lo, hi)
		}
		if waited {
			e.st.rangeWaits.Add(1)
		}
		in, changed := e.inWindow(lo, hi)
		if !in {
			break
		}
		// Another node is resyncing this range: md-cluster holds writes
		// until the window moves on. Wait holding nothing.
		e.locks.unlock(lk)
		e.release()
		e.st.windowWaits.Add(1)
		<-changed
	}
	defer e.release()
	defer e.locks.unlock(lk)
	e.userIO.Add(1)

	wi := e.writeIntent()
	if wi == nil && e.cfg.RequireIntent {
		return fmt.Errorf("raid: write of %d bytes at %d: no write-intent bitmap yet", n, off)
	}
	if wi != nil && e.mut&mutIntentAfterData == 0 {
		if err := wi.StartWrite(lo, hi-lo); err != nil {
			return fmt.Errorf("raid: write of %d bytes at %d: write intent: %w", n, off, err)
		}
	}
	degraded, fails, err := e.writePieces(p, off, lo, hi, fua)
	if wi != nil && e.mut&mutIntentAfterData != 0 {
		_ = wi.StartWrite(lo, hi-lo)
	}
	if wi != nil {
		if degraded || err != nil {
			// Some copy missed this write: the chunks must stay dirty
			// until a resync or recovery brings every copy level.
			e.pin(wi, lo, hi)
		}
		wi.EndWrite(lo, hi-lo, e.clock.Now())
	}
	// md holds a write that failed a member until the failure is
	// recorded; otherwise a crash could bring the stale member back as
	// in sync.
	waitFailures(fails)
	if degraded {
		e.st.degradedWrites.Add(1)
	}
	if err != nil {
		return err
	}
	e.st.writes.Add(1)
	e.st.bytesWritten.Add(uint64(n))
	if fua {
		e.st.fuaWrites.Add(1)
	}
	return nil
}

// writePieces writes the block-aligned range [lo, hi) covering p's
// [off, off+len(p)) in pieces of at most MaxIOSize. Pieces of an aligned
// caller buffer go to the members as they are; others are copied into a
// pool buffer, reading the partial blocks at either end first.
func (e *Engine) writePieces(p []byte, off, lo, hi int64, fua bool) (degraded bool, fails []<-chan struct{}, err error) {
	n := int64(len(p))
	max := int64(e.cfg.MaxIOSize)
	bs := int64(e.bs)
	for pos := lo; pos < hi; {
		pl := min(max, hi-pos)
		rel := pos - off
		var buf []byte
		pooled := false
		if rel >= 0 && rel+pl <= n && isAligned(p[rel:]) {
			buf = p[rel : rel+pl]
		} else {
			buf, pooled = e.pool.get(int(pl)), true
			e.st.bounced.Add(1)
			if pos < off {
				if err := e.readCopies(buf[:bs], pos, false); err != nil {
					e.pool.put(buf)
					return degraded, fails, fmt.Errorf("raid: write at %d: read-modify-write of the block at %d: %w", off, pos, err)
				}
			}
			if tail := pos + pl - bs; pos+pl > off+n && !(tail == pos && pos < off) {
				if err := e.readCopies(buf[tail-pos:], tail, false); err != nil {
					e.pool.put(buf)
					return degraded, fails, fmt.Errorf("raid: write at %d: read-modify-write of the block at %d: %w", off, tail, err)
				}
			}
			s, t := max64(pos, off), min(pos+pl, off+n)
			copy(buf[s-pos:t-pos], p[s-off:t-off])
		}
		d, f, werr := e.writeCopies(buf, pos, fua)
		if pooled {
			e.pool.put(buf)
		}
		degraded = degraded || d
		fails = append(fails, f...)
		if werr != nil {
			return degraded, fails, werr
		}
		pos += pl
	}
	return degraded, fails, nil
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// writeCopies writes buf, array bytes [off, off+len(buf)), to every
// writable copy, one goroutine per member. degraded says some copy did not
// get it (member missing, failed, or failing now). fails are the failure
// callbacks to wait for. It fails unless every copy was written or its
// member is now failed, and every block reached a readable copy.
func (e *Engine) writeCopies(buf []byte, off int64, fua bool) (degraded bool, fails []<-chan struct{}, err error) {
	pl := getPlan()
	defer putPlan(pl)
	e.extents(pl, off, int64(len(buf)))
	for _, x := range pl.exts {
		for _, l := range pl.locs[x.lo:x.hi] {
			if !e.members[l.Member].writable() {
				degraded = true
				continue
			}
			pl.add(l.Member, ioOp{dev: l.Off, bo: x.off - off, n: x.n})
		}
	}
	if fua || !e.writeGroupsAIO(pl, buf) {
		pl.run(func(g *opGroup) {
			m := e.members[g.m]
			for _, op := range g.ops {
				if err := e.devWrite(m, buf[op.bo:op.bo+op.n], op.dev, fua); err != nil {
					g.err = err
					return
				}
			}
		})
	}
	var errs []error
	for i := range pl.groups {
		g := &pl.groups[i]
		if g.err == nil {
			continue
		}
		degraded = true
		if ch := e.failMember(g.m, g.err); ch != nil {
			fails = append(fails, ch)
		} else if e.members[g.m].st() != Failed {
			// Not failed (it holds the last copy of something): this
			// copy is now stale and nothing else will hide it.
			errs = append(errs, g.err)
		}
	}
	for _, x := range pl.exts {
		ok := false
		for _, l := range pl.locs[x.lo:x.hi] {
			if g := pl.group(l.Member); g != nil && g.err == nil && e.members[l.Member].readable(x.off, x.n) {
				ok = true
				break
			}
		}
		if !ok {
			var cause []error
			for _, l := range pl.locs[x.lo:x.hi] {
				if g := pl.group(l.Member); g != nil && g.err != nil {
					cause = append(cause, g.err)
				}
			}
			return degraded, fails, fmt.Errorf("raid: write of array bytes %d+%d: no working copy left: %w", x.off, x.n, errors.Join(append(cause, ErrNoCopy)...))
		}
	}
	if len(errs) > 0 {
		return degraded, fails, fmt.Errorf("raid: write of array bytes %d+%d: %w", off, len(buf), errors.Join(errs...))
	}
	return degraded, fails, nil
}

// ErrNoCopy is wrapped by the error of an I/O that found no usable copy
// of some block: every copy's member is failed, missing or not yet
// rebuilt, or every copy failed. The array cannot serve that data.
var ErrNoCopy = errors.New("no usable copy left")

// pin keeps the bitmap chunks of [lo, hi) dirty: one write is held open
// on each (their bits are durable already, set by the write being
// pinned), so the bitmap never clears them, until unpinAll after every
// copy is level again. md keeps the bits of degraded writes the same way,
// which is what lets a re-added member catch up from the bitmap.
func (e *Engine) pin(wi WriteIntent, lo, hi int64) {
	cs := e.cfg.BitmapChunkSize
	if cs == 0 {
		return
	}
	e.pinMu.Lock()
	defer e.pinMu.Unlock()
	for c := lo / cs; c*cs < hi; c++ {
		if _, ok := e.pinned[uint64(c)]; ok {
			continue
		}
		if err := wi.StartWrite(c*cs, min(cs, e.size-c*cs)); err != nil {
			e.log.Error("cannot keep a degraded chunk dirty in the bitmap", "chunk", c, "err", err)
			continue
		}
		e.pinned[uint64(c)] = struct{}{}
	}
}

// pinnedChunks returns the pinned chunks.
func (e *Engine) pinnedChunks() []uint64 {
	e.pinMu.Lock()
	defer e.pinMu.Unlock()
	out := make([]uint64, 0, len(e.pinned))
	for c := range e.pinned {
		out = append(out, c)
	}
	return out
}

// unpinAll releases every pinned chunk (every copy is level): their bits
// become clearable, and are marked resynced.
func (e *Engine) unpinAll() {
	wi := e.writeIntent()
	e.pinMu.Lock()
	chunks := make([]uint64, 0, len(e.pinned))
	for c := range e.pinned {
		chunks = append(chunks, c)
	}
	clear(e.pinned)
	e.pinMu.Unlock()
	if wi == nil || len(chunks) == 0 {
		return
	}
	cs := e.cfg.BitmapChunkSize
	now := e.clock.Now()
	for _, c := range chunks {
		o := int64(c) * cs
		wi.EndWrite(o, min(cs, e.size-o), now)
	}
	if rd, ok := wi.(resyncDoner); ok {
		rd.ResyncDone(chunks)
	}
}

// ----------------------------------------------------------------- reads

// forcePrimary reports whether reads of [off, off+n) must go to the first
// in-sync copy: inside a resync window (ours or another node's), in a
// range not yet resynced, or while read balancing is suspended.
func (e *Engine) forcePrimary(off, n int64) bool {
	if e.suspendRB.Load() || e.needSync.overlaps(off, off+n) {
		return true
	}
	if w := e.remoteWin.Load(); w != nil && w.lo < off+n && off < w.hi {
		return true
	}
	return false
}

// read is the read path for the block-aligned cover of [off, off+len(p)).
func (e *Engine) read(p []byte, off int64) error {
	n := int64(len(p))
	if n == 0 {
		return nil
	}
	if err := e.admit(); err != nil {
		return err
	}
	defer e.release()
	e.userIO.Add(1)
	lo, hi := e.blockRange(off, n)
	max := int64(e.cfg.MaxIOSize)
	for pos := lo; pos < hi; {
		pl := min(max, hi-pos)
		rel := pos - off
		if rel >= 0 && rel+pl <= n && isAligned(p[rel:]) {
			if err := e.readCopies(p[rel:rel+pl], pos, true); err != nil {
				return err
			}
		} else {
			buf := e.pool.get(int(pl))
			e.st.bounced.Add(1)
			if err := e.readCopies(buf, pos, true); err != nil {
				e.pool.put(buf)
				return err
			}
			s, t := max64(pos, off), min(pos+pl, off+n)
			copy(p[s-off:t-off], buf[s-pos:t-pos])
			e.pool.put(buf)
		}
		pos += pl
	}
	e.st.reads.Add(1)
	e.st.bytesRead.Add(uint64(n))
	return nil
}

// readCopies fills buf with array bytes [off, off+len(buf)): each extent
// from one readable copy (balanced: the member with the fewest operations
// pending, ties taken in turn; or the first readable copy where
// forcePrimary says so), one goroutine per member. A failed read is
// retried on the other copies; with repair set, the copies that failed
// are then rewritten from the good data (md's fix_read_error). Callers
// holding a range lock pass repair false: repair takes the lock itself.
func (e *Engine) readCopies(buf []byte, off int64, repair bool) error {
	pl := getPlan()
	defer putPlan(pl)
	n := int64(len(buf))
	e.extents(pl, off, n)
	force := e.forcePrimary(off, n)
	turn := int(e.rr.Add(1) & 0x3fffffff) // never negative
	for _, x := range pl.exts {
		locs := pl.locs[x.lo:x.hi]
		best, bestPending := -1, int64(0)
		for k := range locs {
			// Balanced reads look at the copies starting from a rotating
			// one, so equal loads alternate.
			i := k
			if !force {
				i = (k + turn) % len(locs)
			}
			m := e.members[locs[i].Member]
			if !m.readable(x.off, x.n) {
				continue
			}
			if force {
				best = i
				break
			}
			if p := m.pending.Load(); best < 0 || p < bestPending {
				best, bestPending = i, p
			}
		}
		if best < 0 {
			e.st.unrecoverable.Add(1)
			return fmt.Errorf("raid: read of array bytes %d+%d: %w (every copy's member is failed, missing or not yet recovered)", x.off, x.n, ErrNoCopy)
		}
		l := locs[best]
		pl.add(l.Member, ioOp{dev: l.Off, bo: x.off - off, n: x.n})
	}
	pl.run(func(g *opGroup) {
		m := e.members[g.m]
		for k, op := range g.ops {
			if err := e.devRead(m, buf[op.bo:op.bo+op.n], op.dev); err != nil {
				if g.err == nil {
					g.err = err
				}
				g.failed = append(g.failed, k)
			}
		}
	})
	for i := range pl.groups {
		// A read the gate refused is not a read error: retrying it on the
		// other copies (and repairing) would only be refused again.
		if g := &pl.groups[i]; errors.Is(g.err, ErrIOStopped) {
			return fmt.Errorf("raid: read of array bytes %d+%d: %w", off, n, g.err)
		}
	}
	for i := range pl.groups {
		g := &pl.groups[i]
		for _, k := range g.failed {
			op := g.ops[k]
			e.st.readRetries.Add(1)
			if err := e.readRetry(buf[op.bo:op.bo+op.n], off+op.bo, g.m, repair); err != nil {
				return err
			}
		}
	}
	return nil
}

// retryUnit is the piece size in which a failed read is retried and
// repaired, so one bad sector costs one small rewrite, not a whole request.
const retryUnit = 4096

// readRetry reads array bytes [off, off+len(p)), whose read from member
// bad failed, piece by piece, as md's fix_read_error does: first from bad
// again (the error may lie in another piece), then from the other copies
// in md's copy order. With repair, each piece some copies failed to read
// is rewritten on them from the copy that worked.
func (e *Engine) readRetry(p []byte, off int64, bad int, repair bool) error {
	pl := getPlan()
	defer putPlan(pl)
	e.extents(pl, off, int64(len(p)))
	for _, x := range pl.exts {
		locs := pl.locs[x.lo:x.hi]
		unit := min(int64(retryUnit), x.n)
		unit -= unit % int64(e.bs)
		for u := x.off; u < x.off+x.n; u += unit {
			un := min(unit, x.off+x.n-u)
			b := p[u-off : u-off+un]
			var failed []int
			var errs []error
			good := -1
			// bad first, then the others in order
			order := make([]int, 0, len(locs))
			for i, l := range locs {
				if l.Member == bad {
					order = append([]int{i}, order...)
				} else {
					order = append(order, i)
				}
			}
			for _, i := range order {
				l := locs[i]
				m := e.members[l.Member]
				if !m.readable(x.off, x.n) {
					continue
				}
				if err := e.devRead(m, b, l.Off+(u-x.off)); err != nil {
					failed = append(failed, i)
					errs = append(errs, err)
					continue
				}
				good = i
				break
			}
			if good < 0 {
				e.st.unrecoverable.Add(1)
				return fmt.Errorf("raid: read of array bytes %d+%d: every copy failed: %w", u, un, errors.Join(append(errs, ErrNoCopy)...))
			}
			if !repair {
				continue
			}
			for _, i := range failed {
				e.repair(u, un, shift(locs[i], u-x.off), shift(locs[good], u-x.off), errs)
			}
		}
	}
	return nil
}

func shift(l Loc, d int64) Loc { return Loc{Member: l.Member, Off: l.Off + d} }

// repair rewrites bad, a copy of array bytes [off, off+n) whose read
// failed, from the copy good, under the range lock (so no write can slip
// in between reading the good copy and rewriting the bad one), and reads
// it back. If the rewrite or the read-back fails, or the member has had
// too many repairs, the member is failed, as md does.
func (e *Engine) repair(off, n int64, bad, good Loc, cause []error) {
	m := e.members[bad.Member]
	if !m.writable() {
		return
	}
	lk, _ := e.locks.lock(off, off+n)
	defer e.locks.unlock(lk)
	data := e.pool.get(int(n))
	defer e.pool.put(data)
	if err := e.devRead(e.members[good.Member], data, good.Off); err != nil {
		return // the good copy went bad meanwhile; the next read deals with it
	}
	fail := func(err error) {
		if ch := e.failMember(bad.Member, err); ch != nil {
			<-ch
		}
	}
	if err := e.devWrite(m, data, bad.Off, false); err != nil {
		fail(fmt.Errorf("rewriting a block that failed to read (%w): %w", errors.Join(cause...), err))
		return
	}
	check := e.pool.get(int(n))
	defer e.pool.put(check)
	if err := e.devRead(m, check, bad.Off); err != nil {
		fail(fmt.Errorf("reading back a rewritten block: %w", err))
		return
	}
	if !bytes.Equal(check, data) {
		fail(fmt.Errorf("a rewritten block at %d reads back different", bad.Off))
		return
	}
	e.st.corrected.Add(1)
	if c := m.corrected.Add(1); c > int64(e.cfg.MaxCorrectedReadErrors) {
		fail(fmt.Errorf("%d read errors corrected, more than the %d allowed: %w", c, e.cfg.MaxCorrectedReadErrors, errors.Join(cause...)))
		return
	}
	e.log.Warn("read error corrected by rewriting from another copy", "member", bad.Member, "array_off", off, "len", n)
}

// ReadAt reads len(p) bytes at off (io.ReaderAt): a read reaching past the
// end of the array returns the bytes before it and io.EOF.
func (e *Engine) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("raid: read at negative offset %d", off)
	}
	if off >= e.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), e.size-off)
	if err := e.read(p[:n], off); err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// ---------------------------------------------------------------- flush

// Flush makes every write that has returned durable: every writable
// member's cache is flushed, in parallel. A member whose flush fails is
// failed; Flush fails if no member was flushed or one that must stay
// (the last copy of something) could not be.
func (e *Engine) Flush() error {
	if err := e.admit(); err != nil {
		return err
	}
	defer e.release()
	pl := getPlan()
	defer putPlan(pl)
	for i, m := range e.members {
		if m.writable() {
			pl.add(i, ioOp{})
		}
	}
	pl.run(func(g *opGroup) {
		m := e.members[g.m]
		ref := m.dev.Load()
		if ref == nil {
			g.err = fmt.Errorf("member %d: no device", g.m)
			return
		}
		if err := e.gateCheck(); err != nil {
			g.err = fmt.Errorf("member %d: %w", g.m, err)
			return
		}
		m.pending.Add(1)
		if err := ref.dev.Sync(); err != nil {
			m.errors.Add(1)
			g.err = fmt.Errorf("member %d: %w", g.m, err)
		}
		m.pending.Add(-1)
	})
	var fails []<-chan struct{}
	var errs []error
	synced := 0
	for i := range pl.groups {
		g := &pl.groups[i]
		if g.err == nil {
			synced++
			continue
		}
		if ch := e.failMember(g.m, g.err); ch != nil {
			fails = append(fails, ch)
		} else if e.members[g.m].st() != Failed {
			errs = append(errs, g.err)
		}
	}
	waitFailures(fails)
	e.st.flushes.Add(1)
	if synced == 0 {
		errs = append(errs, ErrNoCopy)
	}
	if len(errs) > 0 {
		return fmt.Errorf("raid: flush: %w", errors.Join(errs...))
	}
	return nil
}
