package node

import (
	"fmt"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/membership/apply"
)

// The hooks below are the node's part of apply.Effects (the gossip Runner
// sends, fences and logs the agreement's decision log). The apply.Applier
// decides their order and what an Install means for the DLM (generation,
// purge set, reset); here they are carried out on the DLM and explained in
// the node's log.

// quorumLine explains the quorum status of the current view with the nodes
// the failure detector last reported alive to the agreement.
func (n *Node) quorumLine() (present, need, total int, alive []NodeID) {
	v := n.run.View()
	n.mu.Lock()
	al := n.lastAlive // what the agreement was last told
	n.mu.Unlock()
	var in []NodeID
	for _, id := range v.Members {
		if slices.Contains(al, id) {
			in = append(in, id)
		}
	}
	st := n.cfg.Quorum.Evaluate(in)
	return st.Present, st.Need, st.DataNodes, in
}

// quorateChanged logs a change of quorum. On a loss stopLockManager has
// already run (the applier's order); a return resumes nothing.
func (n *Node) quorateChanged(q bool) {
	present, need, total, in := n.quorumLine()
	v := n.run.View()
	switch {
	case !q && n.cfg.Quorum.Quorate(in):
		// Enough of the view's members are alive, but the agreement
		// says this view is not one this node may act in: it restarted
		// and awaits readmission, the cluster moved to a newer view
		// (without it, or it missed the commit), or it is leaving. The
		// arithmetic alone would read as quorate.
		n.log.Warn(fmt.Sprintf("not quorate: %d of %d data nodes of view %d are alive, but this node is rejoining after a restart, the cluster has moved on from that view, or this node is leaving; lock requests wait and array I/O stops until a view that includes this node is installed",
			present, total, v.Gen), "gen", v.Gen, "view", v.Members, "alive_in_view", in)
	case !q:
		n.log.Warn(fmt.Sprintf("lost quorum: %d of %d data nodes alive (need %d of %d data nodes); lock requests wait and array I/O stops until a quorate view is installed",
			present, total, need, total), "gen", v.Gen, "view", v.Members, "alive_in_view", in,
			"quorum", n.cfg.Quorum.Describe(in))
	default:
		n.mu.Lock()
		stopped := n.dlmStopped
		n.mu.Unlock()
		n.log.Info(fmt.Sprintf("quorate: %d of %d data nodes alive (need %d of %d data nodes)", present, total, need, total),
			"gen", v.Gen, "view", v.Members, "alive_in_view", in, "lock_manager_stopped", stopped)
		if stopped {
			n.log.Info("quorum is back, but the lock manager stays stopped until a new view is installed and recovered; the agreement asks for one if nothing else changes",
				"gen", v.Gen)
		}
	}
	n.emit(Event{Kind: EventQuorum, Gen: v.Gen, Quorate: q, Nodes: in})
}

func (n *Node) stopDLM() {
	n.mu.Lock()
	n.dlmStopped = true
	n.mu.Unlock()
	n.ctl.Stop()
}

// stopLockManager stops the DLM for the reasons st gives and says so.
func (n *Node) stopLockManager(st apply.Stop) {
	n.stopDLM()
	cur := n.run.View().Gen
	switch {
	case st.Change != nil:
		n.log.Info("view change began: lock manager stopped until the new view is installed and recovered",
			"ballot", st.Change.Gen, "intended_members", st.Change.Members, "current_view", cur,
			"not_quorate", st.NotQuorate, "after_install", st.AfterInstall)
		n.emit(Event{Kind: EventStop, Gen: st.Change.Gen, Nodes: slices.Clone(st.Change.Members)})
	case st.AfterInstall:
		n.log.Warn("lock manager stopped again after installing a view this node is not quorate in; it resumes with the next quorate view",
			"current_view", cur)
	default:
		n.log.Info("lock manager stopped: no quorum", "current_view", cur)
	}
}

// recoverView runs DLM recovery for an agreed view (on the agreement's
// goroutine; recovery itself proceeds in the DLM and reports through
// onRecovered). n.mu is held across the DLM's Recover so that Open sees
// either the old view (and registers a lockspace that still has to
// recover) or the new one.
func (n *Node) recoverView(rc apply.Recovery) error {
	in := rc.Install
	n.log.Info("installing agreed view: starting lock recovery",
		"gen", rc.Gen, "members", rc.Members, "prev_gen", in.Prev.Gen, "prev_members", in.Prev.Members,
		"departed_fenced", in.Departed, "left", in.Left, "joined", in.Joined, "rejoined", in.Rejoined,
		"purge", rc.Purge, "reset", rc.Reset, "reset_requested", in.Reset)
	n.mu.Lock()
	n.recoverFrom[rc.Gen] = time.Now()
	err := n.ctl.Recover(rc.Gen, dlmIDs(rc.Members), dlmIDs(rc.Purge), rc.Reset)
	if err == nil {
		n.dlmStopped = false
	}
	n.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("node %s: view %d: %w", n.cfg.ID, rc.Gen, err)
	}
	n.emit(Event{Kind: EventInstall, Gen: rc.Gen, Nodes: slices.Clone(rc.Members), Err: err})
	return err
}

// onRecovered is the DLM's report that one lockspace reached a generation
// (on a DLM goroutine).
func (n *Node) onRecovered(name string, gen uint64) { n.run.LockspaceRecovered(name, gen) }

// recoveryDone notes that every lockspace has recovered into view gen; the
// Runner tells the agreement right after.
func (n *Node) recoveryDone(gen uint64) {
	n.mu.Lock()
	n.doneGen = max(n.doneGen, gen)
	started, ok := n.recoverFrom[gen]
	for g := range n.recoverFrom {
		if g <= gen {
			delete(n.recoverFrom, g)
		}
	}
	stopped := n.dlmStopped
	n.mu.Unlock()
	var took time.Duration
	if ok {
		took = time.Since(started).Round(time.Microsecond)
	}
	if stopped {
		n.log.Info("lock recovery done, but the lock manager stays stopped (a newer view change began, or no quorum) until the next view",
			"gen", gen, "lockspaces", n.run.Lockspaces(), "took", took)
	} else {
		n.log.Info("lock recovery done: locks are granted again", "gen", gen, "lockspaces", n.run.Lockspaces(), "took", took)
	}
	n.emit(Event{Kind: EventRecovered, Gen: gen})
}
