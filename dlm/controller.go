package dlm

import (
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/mdcluster/mdcluster/dlm/transport"
)

// Controller is the membership side of a Node: it stops the lockspaces for a
// membership change, installs agreed views and reports when each lockspace
// has recovered. It is kept apart from Node because only the membership
// layer (mdcluster/node, or a test standing in for it) may use it: code
// that merely takes locks has no business stopping the cluster. Obtain it
// with Node.Controller; it lives as long as its node.
//
// A membership layer typically creates the node with Config.Managed, sets
// OnRecovered, and then for every view change calls Stop on every member,
// agrees on the new view, fences the nodes that failed and calls Recover
// with the new view on every member.
type Controller struct {
	n *Node

	// The ordered recovery notifications (see OnRecovered): queued under
	// mu by the lockspaces as they recover, delivered by one goroutine.
	mu     sync.Mutex
	fn     func(lockspace string, gen uint64)
	queue  []recoveredNote
	bell   chan struct{}
	quit   chan struct{}
	closed bool
}

type recoveredNote struct {
	lockspace string
	gen       uint64
}

// Controller returns the node's controller (always the same one).
func (n *Node) Controller() *Controller { return &n.ctl }

func (c *Controller) init(n *Node) {
	c.n = n
	c.bell = make(chan struct{}, 1)
	c.quit = make(chan struct{})
}

// OnRecovered sets the function told each time a lockspace of this node
// finishes recovering into a generation (nil stops the reports). It is
// called on one goroutine of the controller, never concurrently, in the
// order the lockspaces recovered, and without any lock of the node held, so
// it may call the node and the controller. Recoveries that end before
// OnRecovered is set are not reported: set it before the first Recover.
// After Close no new call starts (Close does not wait for one in progress).
//
// A lockspace also reports a generation into which it recovered while
// another Stop was already pending (its RecoveryHandlers get no
// RecoverDone for it: they are in the next change already).
func (c *Controller) OnRecovered(f func(lockspace string, gen uint64)) {
	c.mu.Lock()
	c.fn = f
	c.mu.Unlock()
}

// noteRecovered queues a report for OnRecovered. Called with the
// lockspace's mu held, so reports leave in the order lockspaces recover.
func (c *Controller) noteRecovered(lockspace string, gen uint64) {
	c.mu.Lock()
	if c.fn == nil || c.closed {
		c.mu.Unlock()
		return
	}
	c.queue = append(c.queue, recoveredNote{lockspace, gen})
	c.mu.Unlock()
	select {
	case c.bell <- struct{}{}:
	default:
	}
}

// notifier delivers the queued reports in order until the node closes.
func (c *Controller) notifier() {
	var batch []recoveredNote
	for {
		select {
		case <-c.quit:
			return
		case <-c.bell:
		}
		for {
			c.mu.Lock()
			batch, c.queue = c.queue, batch[:0]
			f, closed := c.fn, c.closed
			c.mu.Unlock()
			if len(batch) == 0 || closed {
				break
			}
			for _, r := range batch {
				if f != nil {
					f(r.lockspace, r.gen)
				}
			}
			clear(batch)
		}
	}
}

// close stops the notifier; reports not yet delivered are dropped.
func (c *Controller) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.queue = nil
		close(c.quit)
	}
}

// Stop suspends every lockspace of the node for a membership change: lock
// calls wait (within their contexts) and lock traffic other than
// recovery's waits, until Recover has run to its end. The membership layer
// calls it on every member before it agrees on the new view. Each
// lockspace's RecoveryHandlers get RecoverPrepare with the generation the
// lockspace is stopping in (the view being left), once per view change: a
// second Stop before Recover reports nothing new, a Stop during a recovery
// starts the next change and reports RecoverPrepare again.
func (c *Controller) Stop() {
	n := c.n
	n.mu.Lock()
	n.halted = true
	spaces := slices.Collect(maps.Values(n.spaces))
	n.mu.Unlock()
	for _, sp := range spaces {
		sp.mu.Lock()
		sp.sp.Stop()
		if sp.resume == nil {
			sp.resume = make(chan struct{})
		}
		sp.prepare()
		sp.mu.Unlock()
	}
	n.log.Debug("lockspaces stopped for a membership change", "lockspaces", len(spaces))
}

// Recover installs the agreed view (gen, members) in every lockspace of the
// node and starts recovery. gen must be newer than the current generation;
// members must include this node. departed are the nodes that failed since
// the last view, already fenced: their locks are purged (and the LVBs they
// held in PW or EX invalidated). reset says this node comes back from an
// older generation: all its lock state is dropped and its locks end with
// ErrReleased. Calls resume as each lockspace finishes.
//
// Each lockspace's RecoveryHandlers get RecoverPrepare first if Stop was
// not called since the last view, then RecoverDeparted(gen, departed
// without this node, sorted) if any departed, then RecoverDone when that
// lockspace has recovered; OnRecovered hears of it too.
func (c *Controller) Recover(gen uint64, members []NodeID, departed []NodeID, reset bool) error {
	n := c.n
	ms := slices.Clone(members)
	slices.Sort(ms)
	ms = slices.Compact(ms)
	if !slices.Contains(ms, n.id) {
		return fmt.Errorf("recover node %d: %w: members %v lack this node", n.id, ErrInvalid, ms)
	}
	gone := slices.DeleteFunc(slices.Clone(departed), func(id NodeID) bool { return id == n.id })
	slices.Sort(gone)
	gone = slices.Compact(gone)
	n.mu.Lock()
	if gen <= n.gen {
		n.mu.Unlock()
		return fmt.Errorf("recover node %d: %w: generation %d is not newer than %d", n.id, ErrInvalid, gen, n.gen)
	}
	n.gen, n.members, n.halted, n.viewRecovered = gen, ms, false, true
	spaces := slices.Collect(maps.Values(n.spaces))
	n.mu.Unlock()
	// Every member becomes a transport peer, even one whose address is not
	// known yet: its messages queue until the address arrives (SetPeer).
	n.admitMembers(ms)
	n.log.Debug("recovering lockspaces", "generation", gen, "members", ms, "departed", gone, "reset", reset)
	var firstErr error
	for _, sp := range spaces {
		sp.mu.Lock()
		if sp.resume == nil {
			sp.resume = make(chan struct{})
		}
		if n.tr != nil {
			n.tr.SetGeneration(sp.id, gen)
		}
		sp.prepare()
		err := sp.sp.Recover(gen, ms, departed, reset)
		if err != nil {
			if firstErr == nil {
				firstErr = fmt.Errorf("recover lockspace %q: %w", sp.name, err)
			}
		} else {
			sp.recovering(gen, gone)
		}
		sp.flush()
		sp.mu.Unlock()
	}
	return firstErr
}

// Generation returns the generation of the node's current view: 0 for a
// managed node before its first Recover, else the last one installed.
func (c *Controller) Generation() uint64 {
	n := c.n
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.gen
}

// Members returns the members of the node's current view, sorted.
func (c *Controller) Members() []NodeID {
	n := c.n
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.members)
}

// Transport returns the node's transport (nil for a cluster of one), for
// statistics and diagnostics. Closing it cuts this node off from its peers
// as a network failure would.
func (c *Controller) Transport() *transport.Transport { return c.n.tr }

// --- per-lockspace recovery events ---

// recPhase is where a lockspace is in its RecoveryHandler sequence.
type recPhase uint8

const (
	recRunning    recPhase = iota // no view change under way
	recStopped                    // RecoverPrepare reported, Recover not yet called
	recRecovering                 // Recover called, RecoverDone not yet reported
)

// recoveryCallback marks an event on the dispatcher's queue that carries a
// recovery event rather than a lock's callback.
const recoveryCallback CallbackKind = 0xff

type recoveryKind uint8

const (
	recPrepare recoveryKind = iota
	recDeparted
	recDone
)

// recoveryEvent is one RecoveryHandler call, queued for the lockspace's
// dispatcher. nodes are the departed nodes or the members; both are the
// event's own copies.
type recoveryEvent struct {
	h     RecoveryHandler
	kind  recoveryKind
	gen   uint64
	nodes []NodeID
	self  NodeID
}

func (e *recoveryEvent) deliver() {
	switch e.kind {
	case recPrepare:
		e.h.RecoverPrepare(e.gen)
	case recDeparted:
		e.h.RecoverDeparted(e.gen, e.nodes)
	case recDone:
		e.h.RecoverDone(e.gen, e.nodes, e.self)
	}
}

// handleRecovery is an open handle's RecoveryHandler.
type handleRecovery struct {
	ls *Lockspace
	h  RecoveryHandler
}

// addHandler registers ls's handler; a handle opened during a view change
// first hears what the others heard of it. Called with mu held.
func (sp *space) addHandler(ls *Lockspace, h RecoveryHandler) {
	sp.handlers = append(sp.handlers, handleRecovery{ls, h})
	if sp.recPhase == recRunning {
		return
	}
	sp.enqueue(event{kind: recoveryCallback, rec: &recoveryEvent{h: h, kind: recPrepare, gen: sp.prepGen}})
	if sp.recPhase == recRecovering && len(sp.recDeparted) > 0 {
		sp.enqueue(event{kind: recoveryCallback, rec: &recoveryEvent{h: h, kind: recDeparted,
			gen: sp.sp.Generation(), nodes: slices.Clone(sp.recDeparted)}})
	}
}

// removeHandler drops ls's handler; events already queued for it are still
// delivered. Called with mu held.
func (sp *space) removeHandler(ls *Lockspace) {
	sp.handlers = slices.DeleteFunc(sp.handlers, func(r handleRecovery) bool { return r.ls == ls })
}

// emit queues one recovery event for every registered handler. Called with
// mu held, so the event takes its place among the locks' callbacks.
func (sp *space) emit(kind recoveryKind, gen uint64, nodes []NodeID) {
	for _, r := range sp.handlers {
		sp.enqueue(event{kind: recoveryCallback, rec: &recoveryEvent{h: r.h, kind: kind, gen: gen,
			nodes: slices.Clone(nodes), self: sp.node.id}})
	}
}

// prepare reports RecoverPrepare unless this view change already did:
// the lockspace was running, or was recovering when stopped again. Called
// with mu held, after the Space was stopped or before it recovers.
func (sp *space) prepare() {
	if sp.recPhase == recStopped {
		return
	}
	sp.recPhase, sp.prepGen, sp.recDeparted = recStopped, sp.sp.Generation(), nil
	sp.emit(recPrepare, sp.prepGen, nil)
}

// recovering notes that recovery into gen started, reporting the departed
// nodes. Called with mu held.
func (sp *space) recovering(gen uint64, departed []NodeID) {
	sp.recPhase, sp.recDeparted = recRecovering, departed
	if len(departed) > 0 {
		sp.emit(recDeparted, gen, departed)
	}
}

// recovered handles the Space's report that recovery into gen finished:
// waiting calls resume, the handlers get RecoverDone (unless another view
// change began meanwhile) and the controller's OnRecovered is told.
// Called with mu held, before the callbacks of the same step are applied,
// so RecoverDone comes before the completions of the locks recovery grants.
func (sp *space) recovered(gen uint64) {
	if sp.resume != nil {
		close(sp.resume)
		sp.resume = nil
	}
	sp.log.Debug("lockspace recovered", "generation", gen, "stopped_again", sp.sp.Stopped())
	if sp.recPhase == recRecovering && !sp.sp.Stopped() && gen == sp.sp.Generation() {
		sp.recPhase, sp.recDeparted = recRunning, nil
		sp.emit(recDone, gen, sp.sp.Members())
	}
	sp.node.ctl.noteRecovered(sp.name, gen)
}
