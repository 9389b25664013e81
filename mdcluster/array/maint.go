package array

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// --- recovery events (the manager's part; see fanout) ---

// recoverPrepare: the lock manager stopped for a membership change. Reads
// go to the first in-sync member until it is done (md's
// SUSPEND_READ_BALANCING): a dead node's last writes may have reached one
// mirror only.
func (m *Manager) recoverPrepare(gen uint64) {
	m.mu.Lock()
	on := m.engineOn
	m.mu.Unlock()
	if on {
		m.cfg.Engine.SuspendReadBalancing(true)
	}
	m.log.Info("lock recovery began: read balancing suspended", "gen", gen)
}

// recoverDeparted remembers the nodes that died until RecoverDone.
func (m *Manager) recoverDeparted(gen uint64, nodes []dlm.NodeID) {
	m.mu.Lock()
	for _, n := range nodes {
		if !slices.Contains(m.departed, n) {
			m.departed = append(m.departed, n)
		}
	}
	m.mu.Unlock()
	m.log.Info("nodes departed", "gen", gen, "nodes", nodes)
}

// recoverDone: the lock manager recovered. Read balancing resumes; a dead
// node's resync window is dropped (the survivors take its sync over, from
// where it had got); and a post-departure check is queued: the dead node
// may have left a change half done (see maintDeparted).
func (m *Manager) recoverDone(gen uint64, members []dlm.NodeID, _ dlm.NodeID) {
	m.mu.Lock()
	own, running, rejoining := m.own, m.phase == PhaseRunning, m.rejoining
	m.mu.Unlock()
	if running && !rejoining && own != nil && own.Check() != nil {
		// This node's slot lock did not survive the recovery (the
		// ownership driver, an earlier handler, has just found it lost).
		// Hold new requests now, not only once the maintenance loop's
		// checkLocks starts the re-join: the engine still runs.
		m.holdIO()
	}
	m.mu.Lock()
	departed := m.departed
	m.departed = nil
	m.view = slices.Clone(members)
	on := m.engineOn
	clear := m.remote.Window.Active() && slices.Contains(departed, m.remote.From)
	if clear {
		m.remote.Window = Window{}
	}
	m.mu.Unlock()
	if on {
		if clear {
			_ = m.cfg.Engine.SetRemoteWindow(context.Background(), Window{})
		}
		m.cfg.Engine.SuspendReadBalancing(false)
	}
	m.log.Info("lock recovery done: read balancing resumed", "gen", gen, "members", members, "departed", departed, "dropped_remote_window", clear)
	if len(departed) > 0 {
		m.queue(maintTask{kind: taskDeparted, nodes: departed})
	}
	m.queue(maintTask{kind: taskCheckLocks})
	m.wake(m.kick)
}

// checkLocks re-joins the array if this node's locks did not survive the
// view change (the cluster excluded it, possibly on a false suspicion, and
// readmitted it clean: its lock manager purged everything it held). It no
// longer owns its bitmap slot, so it may not write, and no longer receives
// changes, so its member set may be behind. Running on would serve data the
// other nodes do not coordinate with, so its I/O stops at once and the
// array is assembled again here (see rejoin).
func (m *Manager) checkLocks() {
	m.mu.Lock()
	own, bus, ph := m.own, m.bus, m.phase
	m.mu.Unlock()
	if ph != PhaseRunning || own == nil || bus == nil {
		m.releaseUnlessRejoining()
		return
	}
	var why error
	if err := own.Check(); err != nil {
		why = err
	} else if p := bus.Phase(); p != broadcast.Joined {
		why = fmt.Errorf("the broadcast says this node is %s", p)
	}
	if why == nil {
		m.releaseUnlessRejoining()
		return
	}
	m.startRejoin(why)
}

// releaseUnlessRejoining drops a hold recoverDone took when no re-join
// follows (the array was stopped meanwhile); a re-join releases its own.
func (m *Manager) releaseUnlessRejoining() {
	m.mu.Lock()
	rejoining := m.rejoining
	m.mu.Unlock()
	if !rejoining {
		m.releaseIO()
	}
}

// startRejoin stops the engine at once (no write may go out without the
// slot lock) and starts rejoin in its own goroutine: rejoin stops the
// maintenance loop, which is the caller.
func (m *Manager) startRejoin(why error) {
	m.mu.Lock()
	if m.phase != PhaseRunning || m.rejoining || m.dead {
		rejoining := m.rejoining
		m.mu.Unlock()
		if !rejoining {
			m.releaseIO()
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.RejoinLimit)
	m.rejoining, m.rejoinCancel, m.engineOn = true, cancel, false
	m.rejoinWG.Add(1)
	m.mu.Unlock()
	m.holdIO()
	_ = m.cfg.Engine.Stop()
	m.log.Warn("this node's locks were lost (the cluster excluded it and readmitted it clean): array I/O stopped here; re-joining the array",
		"reason", why, "limit", m.cfg.RejoinLimit)
	go m.rejoin(ctx, cancel, why)
}

// ioHolder is an Engine that can hold new requests while the manager
// re-joins the array (RAIDEngine): they wait rather than fail.
type ioHolder interface {
	HoldIO()
	ReleaseIO()
}

// holdIO makes new requests wait (see RAIDEngine.HoldIO).
func (m *Manager) holdIO() {
	if h, ok := m.cfg.Engine.(ioHolder); ok {
		h.HoldIO()
	}
}

// releaseIO lets requests held by startRejoin go on.
func (m *Manager) releaseIO() {
	if h, ok := m.cfg.Engine.(ioHolder); ok {
		h.ReleaseIO()
	}
}

// rejoin assembles the array again after lost locks: it drops what is
// left of the old join (the slot lock, no-new-dev and the broadcast's
// locks are gone already, so nothing is released to the others), then
// runs Assemble until it succeeds or RejoinLimit passes. Assemble does
// everything a rejoining node needs: it re-reads the superblocks (changes
// the others made meanwhile, e.g. a member they failed, are applied before
// the engine starts), re-joins the broadcast and no-new-dev, and re-takes
// its own bitmap slot, probing it first: if a survivor recovered the slot
// meanwhile, its bits were merged and cleared, and this node starts clean;
// if not, the join recovers it itself. I/O resumes only when all of that
// is done: requests held meanwhile (HoldIO) go on then, or fail with
// ErrEngineStopped if the re-join gives up.
func (m *Manager) rejoin(ctx context.Context, cancel context.CancelFunc, why error) {
	defer m.rejoinWG.Done()
	defer cancel()
	defer m.releaseIO()
	start := time.Now()
	m.mu.Lock()
	m.phase = PhaseStopping
	m.mu.Unlock()
	if err := m.shutdownLost(ctx); err != nil {
		m.log.Info("re-join: leftovers of the old join not released cleanly (expected: its locks are gone)", "err", err)
	}
	backoff := m.cfg.ResyncRetry
	for attempt := 1; ; attempt++ {
		err := m.Assemble(ctx)
		if err == nil {
			m.mu.Lock()
			m.rejoining, m.rejoinCancel = false, nil
			m.rejoins++
			m.mu.Unlock()
			m.log.Warn("re-joined the array after this node's locks were lost: I/O resumed",
				"attempts", attempt, "took", time.Since(start).Round(time.Millisecond), "reason", why)
			return
		}
		if m.isDead() || errors.Is(err, errCrashed) {
			return
		}
		if ctx.Err() != nil {
			m.mu.Lock()
			m.rejoining, m.rejoinCancel = false, nil
			if m.phase == PhaseStopped {
				m.phase = PhaseFailed
				if errors.Is(ctx.Err(), context.DeadlineExceeded) {
					m.failReason = fmt.Sprintf("this node's locks were lost (%v) and re-joining the array did not succeed within %s: %v; stop and assemble the array again", why, m.cfg.RejoinLimit, err)
				} else {
					m.failReason = fmt.Sprintf("this node's locks were lost (%v) and re-joining the array was cancelled (stop): %v", why, err)
				}
			}
			reason := m.failReason
			m.mu.Unlock()
			m.log.Error("array stopped on this node: it could not re-join the array", "reason", reason)
			return
		}
		m.log.Warn("re-join: assembling again failed; retrying", "attempt", attempt, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// failLocal stops the engine and marks the array failed on this node.
func (m *Manager) failLocal(reason string) {
	m.mu.Lock()
	if m.phase != PhaseRunning {
		m.mu.Unlock()
		return
	}
	m.failReason, m.phase, m.engineOn = reason, PhaseFailed, false
	m.mu.Unlock()
	_ = m.cfg.Engine.Stop()
	m.log.Error("array stopped on this node: it cannot follow the cluster", "reason", reason)
}

// --- the maintenance loop ---

type taskKind int

const (
	// taskDeparted: nodes died (or a dead node's broadcast was finished):
	// resolve their half-done changes from the disk.
	taskDeparted taskKind = iota
	// taskFail: a member had an I/O error: fail it cluster-wide.
	taskFail
	// taskProbeSlot: a node left with work behind: probe its slot until
	// it is released, and recover it.
	taskProbeSlot
	// taskApply: a received change could not be applied: retry.
	taskApply
	// taskRetakeCR: no-new-dev could not be re-taken in CR.
	taskRetakeCR
	// taskCheckLocks: after a view change, check this node kept its locks.
	taskCheckLocks
)

type maintTask struct {
	kind  taskKind
	nodes []dlm.NodeID
	dev   uint32
	slot  int
	until time.Time
}

// queue adds a task for the maintenance loop.
func (m *Manager) queue(t maintTask) {
	m.mu.Lock()
	for _, q := range m.tasks {
		if q.kind == t.kind && q.dev == t.dev && q.slot == t.slot && slices.Equal(q.nodes, t.nodes) {
			m.mu.Unlock()
			m.wake(m.maint)
			return
		}
	}
	m.tasks = append(m.tasks, t)
	m.mu.Unlock()
	m.wake(m.maint)
}

// startLoops starts the sync and maintenance loops.
func (m *Manager) startLoops() {
	m.mu.Lock()
	ctx, cancel := context.WithCancel(m.ctx)
	m.loopCancel = cancel
	m.mu.Unlock()
	m.wg.Add(2)
	go m.syncLoop(ctx)
	go m.maintLoop(ctx)
}

// stopWorkers stops the loops and waits for them.
func (m *Manager) stopWorkers() {
	m.mu.Lock()
	cancel := m.loopCancel
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	m.wg.Wait()
}

// maintLoop carries out queued tasks, and retries what needs retrying.
func (m *Manager) maintLoop(ctx context.Context) {
	defer m.wg.Done()
	tick := time.NewTicker(m.cfg.ResyncRetry)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.maint:
		case <-tick.C:
		}
		m.mu.Lock()
		tasks := m.tasks
		m.tasks = nil
		retry := m.ownedRetry
		m.ownedRetry = false
		m.mu.Unlock()
		var again []maintTask
		for _, t := range tasks {
			if ctx.Err() != nil {
				return
			}
			if !m.runTask(ctx, t) {
				again = append(again, t)
			}
		}
		if retry {
			m.reprobe(ctx)
		}
		if len(again) > 0 {
			m.mu.Lock()
			m.tasks = append(again, m.tasks...)
			m.mu.Unlock()
		}
	}
}

// runTask carries out one task; false means try again later.
func (m *Manager) runTask(ctx context.Context, t maintTask) bool {
	switch t.kind {
	case taskDeparted:
		if err := m.afterDeparture(ctx, t.nodes); err != nil {
			if errors.Is(err, errCrashed) || ctx.Err() != nil {
				return true
			}
			m.log.Warn("post-departure check failed; retrying", "departed", t.nodes, "err", err)
			return false
		}
	case taskFail:
		err := m.Fail(ctx, t.dev)
		if err != nil && !errors.Is(err, ErrRefusedChange) && ctx.Err() == nil && !errors.Is(err, errCrashed) {
			m.log.Warn("failing a member after an I/O error; retrying", "dev", t.dev, "err", err)
			return false
		}
	case taskProbeSlot:
		return m.probeSlot(ctx, t.slot, t.until)
	case taskApply:
		return m.retryApply()
	case taskCheckLocks:
		m.checkLocks()
	case taskRetakeCR:
		m.retakeCR(ctx)
		m.mu.Lock()
		ok := !m.needCR
		m.mu.Unlock()
		return ok
	}
	return true
}

// reprobe asks the ownership driver to probe every slot again and retry
// owed slot resyncs.
func (m *Manager) reprobe(ctx context.Context) {
	m.mu.Lock()
	own := m.own
	m.mu.Unlock()
	if own == nil {
		return
	}
	if err := own.Reprobe(ctx); err != nil {
		m.log.Warn("bitmap slot reprobe", "err", err)
		m.mu.Lock()
		m.ownedRetry = true
		m.mu.Unlock()
	}
}

// probeSlot probes until slot s is idle (recovered if it was dirty) or the
// deadline passes.
func (m *Manager) probeSlot(ctx context.Context, s int, until time.Time) bool {
	m.mu.Lock()
	own := m.own
	m.mu.Unlock()
	if own == nil {
		return true
	}
	if err := own.Reprobe(ctx); err != nil {
		m.log.Warn("probing a departed node's slot", "slot", s, "err", err)
	}
	states := own.States()
	if s < len(states) && (states[s] == ownership.Idle || states[s] == ownership.Active) {
		m.log.Info("slot of the node that left is idle: its dirty chunks (if any) are recovered", "slot", s)
		m.wake(m.kick)
		return true
	}
	if time.Now().After(until) {
		m.log.Warn("slot of the node that left is still held; giving up probing (it is recovered when its owner dies or it is probed again)", "slot", s)
		return true
	}
	return false
}

// retryApply re-reads the members after a failed apply; a node that
// cannot follow the array for ApplyRetryLimit stops its engine.
func (m *Manager) retryApply() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.diverged.IsZero() || m.phase != PhaseRunning {
		return true
	}
	err := m.reloadLocked(0, "retry after a failed apply")
	if err == nil {
		m.log.Info("caught up with the array after a failed apply")
		return true
	}
	if time.Since(m.diverged) < m.cfg.ApplyRetryLimit {
		return false
	}
	reason := fmt.Sprintf("could not apply the array's configuration for %v (so as to serve nothing that differs from the other nodes): %v", m.cfg.ApplyRetryLimit, err)
	m.mu.Unlock()
	m.failLocal(reason)
	m.mu.Lock()
	return true
}

// afterDeparture resolves what departed nodes may have left half done,
// from the disk, under the token (so every survivor sees the same disk
// and at most one acts on each thing): a device they were adding
// (finished if it committed, wiped if not), superblocks written to some
// members but not others (rewritten), a superblock change nobody was told
// about (re-read; METADATA_UPDATED tells the others). Every survivor runs
// this; the first to get the token does the work, the others find nothing
// left.
func (m *Manager) afterDeparture(ctx context.Context, nodes []dlm.NodeID) error {
	t, err := m.begin(ctx, fmt.Sprintf("after nodes %v departed", nodes), false)
	if err != nil {
		if errors.Is(err, ErrNotRunning) {
			return nil
		}
		return err
	}
	defer t.end(ctx)
	changed := false
	m.mu.Lock()
	var cands []*candidate
	for u, c := range m.candidates {
		if slices.Contains(nodes, c.From) {
			cands = append(cands, c)
			delete(m.candidates, u)
		}
	}
	m.mu.Unlock()
	for _, c := range cands {
		e := JournalEntry{Kind: ChangeAdd, Array: m.uuid, Node: uint32(c.From), BaseEvents: c.BaseEvents, Dev: c.Dev, DeviceUUID: c.UUID}
		did, err := m.resolve(e)
		if err != nil {
			return err
		}
		changed = changed || did
		m.mu.Lock()
		m.needCR = true
		m.mu.Unlock()
	}
	did, err := m.reconcile(t)
	if err != nil {
		return err
	}
	changed = changed || did
	if changed {
		if _, err := t.announce(ctx, broadcast.MetadataUpdated, 0); err != nil {
			return err
		}
	}
	m.retakeCR(ctx)
	return nil
}

// resolve decides one change found half done (after a crash, or left by a
// departed node) from the disk and carries out the decision. It reports
// whether it wrote anything.
func (m *Manager) resolve(e JournalEntry) (bool, error) {
	m.mu.Lock()
	facts := DiskFacts{Shared: m.st.Shared}
	var dev Member
	if e.DeviceUUID != ([16]byte{}) {
		if f, ok := m.findDeviceLocked(e.DeviceUUID); ok {
			facts.Device, dev = f.Super, f.Member
			// Held open while it is wiped; closed after unless bound.
			m.pinned[f.Path]++
			defer m.unclaim(f.Path)
		}
	}
	m.mu.Unlock()
	d := DecideRecovery(e, facts)
	m.log.Info("unfinished change resolved from the disk", "change", e.Kind, "journal_state", e.State, "by_node", e.Node,
		"dev", e.Dev, "device_uuid", bitmap.FormatUUID(e.DeviceUUID), "outcome", d.Outcome, "reason", d.Reason)
	if !d.ZeroCandidate || dev == nil {
		return false, nil
	}
	if m.isDead() {
		return false, errCrashed
	}
	if err := zeroSuper(dev); err != nil {
		return false, fmt.Errorf("wipe the abandoned candidate superblock: %w", err)
	}
	return true, nil
}

// reconcile re-reads the members and, if their superblocks disagree (a
// change was written to some members only), rewrites them all from the
// freshest one with the events bumped. It reports whether it wrote.
func (m *Manager) reconcile(t *changeTxn) (bool, error) {
	m.mu.Lock()
	err := m.reloadLocked(0, t.what)
	st := m.st
	m.mu.Unlock()
	if err != nil {
		return false, err
	}
	behind, next, devs := planReconcile(st, m.cfg.Now())
	if len(behind) == 0 {
		return false, nil
	}
	m.log.Info("members' superblocks disagree (a change reached some of them only): rewriting them all from the freshest",
		"events", st.Events(), "behind", behind)
	if err := t.writeSupers(next, devs); err != nil {
		return false, err
	}
	if err := t.reload(next.Events); err != nil {
		return false, err
	}
	return true, nil
}

// recoverJournal finishes, at start-up, the changes this node's journal
// holds: this node crashed while making them. Each is decided from the
// disk (DecideRecovery) under the token; the members' superblocks are made
// to agree; METADATA_UPDATED makes every node re-read them.
func (m *Manager) recoverJournal(ctx context.Context) error {
	var pend []store.Entry
	if err := m.cfg.Store.View(func(tx store.Txn) (err error) {
		pend, err = m.jr.Pending(tx)
		return err
	}); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if len(pend) == 0 {
		return nil
	}
	m.log.Info("journal: changes left unfinished by a crash of this node; resolving them", "count", len(pend))
	t, err := m.begin(ctx, "journal recovery", true)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	for _, p := range pend {
		e, err := decodeEntry(p.Data)
		if err != nil {
			return fmt.Errorf("journal entry %d: %w", p.Seq, err)
		}
		if e.Array != m.uuid {
			continue
		}
		if _, err := m.resolve(e); err != nil {
			return err
		}
		if err := m.cfg.Store.Update(func(tx store.Txn) error { return m.jr.Done(tx, p.Seq) }); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
	}
	if _, err := m.reconcile(t); err != nil {
		return err
	}
	// Every node re-reads: whatever the crash left, they now agree with
	// the disk.
	if _, err := t.announce(ctx, broadcast.MetadataUpdated, 0); err != nil {
		return err
	}
	return nil
}

// --- ownership's Array ---

// slotResyncer is the ownership driver's Array: it resyncs the chunks of a
// recovered slot (a dead node's, or this node's own from an earlier crash)
// under the cluster's resync lock, announcing the windows.
type slotResyncer struct{ m *Manager }

// slotResyncAttempts bounds how many times a slot resync waits for the
// resync lock before it gives up; the chunks then stay dirty in this
// node's slot and are retried by the next reprobe.
const slotResyncAttempts = 12

// Resync implements ownership.Array.
func (r slotResyncer) Resync(ctx context.Context, chunks []uint64) error {
	m := r.m
	if len(chunks) == 0 {
		return nil
	}
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	var lk dlm.LockHandle
	var err error
	for i := 0; i < slotResyncAttempts; i++ {
		lk, err = m.lockResync(ctx)
		if err == nil || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("slot resync: %w", err)
	}
	defer m.unlockResync(lk)
	m.log.Info("resyncing the dirty chunks of a recovered bitmap slot", "chunks", len(chunks))
	return m.resyncChunks(ctx, chunks)
}

var _ ownership.Array = slotResyncer{}

var _ = superblock.MaxSector
