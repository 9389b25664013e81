// Package apply carries out the view agreement's decisions on one node: it
// takes each membership.Ready and calls, in the order docs/membership.md
// prescribes, the effects a driver implements (persist, stop the lock
// manager, send, recover the lock manager, request a fence, report quorum,
// report an exit, log).
//
// There is one Applier for the daemon's runtime (gossip.Runner with
// mdcluster/node) and for the deterministic simulator (internal/sim), so the
// ordering rules and the rules for turning an Install into a lock-manager
// recovery exist once and run under the simulator's seeds:
//
//   - the stop is applied again after the installs of a Ready that says so
//     (Ready.StopAfterInstall: the Agreement stopped for a newer change
//     after the install, or the node is not quorate after it; a stop
//     during recovery outlasts it). The Agreement decides it and keeps the
//     same record (Agreement.LockManagerStopped), so the two always agree
//     on whether the lock manager is stopped;
//   - the lock manager recovers into the view's own generation: one number
//     counts views in the agreement and in the lock manager;
//   - the nodes to purge are the departed, the leavers and the rejoined,
//     without this node, sorted and without duplicates;
//   - a reset asked of a lock manager that never recovered into any view in
//     this process is carried out as a plain recovery (it holds nothing a
//     reset would drop);
//   - the Agreement hears RecoveryDone only when every lockspace has
//     recovered into the pending view.
//
// The Applier does no I/O, starts no goroutines and reads no clock: it only
// calls its Effects. Fencing stays the driver's business (the runtime runs
// it on a goroutine, the simulator schedules it as an event); the Applier
// only asks for it.
package apply

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// NodeID is the cluster node ID (membership, ddraid and DLM use the same).
type NodeID = membership.NodeID

// Effects is what a driver does on the Applier's word. Each call must be
// carried out (or at least started, for a recovery) before it returns: the
// order of the calls is the safety argument (state durable before a
// message promises it; the lock manager stopped before a PREPARED says it
// is; fenced before recovered).
type Effects interface {
	// Persist makes the agreement's hard state durable. It is called before
	// any Send of the same Ready. An error stops the Ready there: nothing is
	// sent, and the driver must stop following the agreement (a node that
	// forgot a promise could vote twice).
	Persist(membership.HardState) error
	// StopLockManager suspends every lockspace now: lock requests wait and
	// nothing is granted until a later RecoverLockManager. Stop says why.
	StopLockManager(Stop)
	// Send hands one agreement message to the network (fire and forget; the
	// protocol retransmits what matters).
	Send(membership.Outgoing)
	// RecoverLockManager installs a view in the lock manager and starts its
	// recovery. Recovery finishes later; the driver reports each lockspace
	// with Applier.LockspaceRecovered. An error means recovery did not start.
	RecoverLockManager(Recovery) error
	// RequestFence asks for a failed node to be fenced for a view. The
	// driver reports the outcome to Agreement.FenceResult, later.
	RequestFence(membership.FenceRequest)
	// QuorumChanged reports the node's new quorum status. false comes
	// right after the stop it causes (so a report of the loss finds the
	// lock manager stopped); true resumes nothing (only a recovery does).
	QuorumChanged(quorate bool)
	// RecoveryDone reports that every lockspace has recovered into view
	// gen; the driver passes it to Agreement.RecoveryDone. It may be called
	// from Apply or from LockspaceRecovered (so, in the runtime, from the
	// lock manager's goroutine).
	RecoveryDone(gen uint64)
	// Exited reports that this node's graceful leave completed.
	Exited()
	// Log records one line of the decision log: the Agreement's, then the
	// Applier's own (why a reset was not carried out, why a stop was
	// applied again).
	Log(membership.Event)
}

// Stop says why the lock manager is stopped. More than one reason may hold
// at once; the driver stops once either way.
type Stop struct {
	// NotQuorate: the node has no quorum: it just lost it
	// (Ready.Quorate=false), or it is still without it after the installs
	// of the same Ready.
	NotQuorate bool
	// Change is the proposal a view change began for (Ready.Stop: its Gen
	// is the attempt's ballot, its Members the intended members); nil when
	// the stop is for quorum alone.
	Change *membership.View
	// AfterInstall: this stop re-applies, after the installs of the same
	// Ready, a stop those installs would otherwise have undone.
	AfterInstall bool
}

// Recovery is one view to install in the lock manager, worked out from a
// membership.Install.
type Recovery struct {
	// Install is the agreement's decision, for logs and bookkeeping.
	Install membership.Install
	// Gen is the generation to recover into. It is the view's generation,
	// unchanged: the lock manager under membership control starts at
	// generation 0, so the first view (generation 1) is newer than it.
	Gen uint64
	// Members are the view's members, sorted.
	Members []NodeID
	// Purge lists the nodes whose locks the old view knew and which are to
	// be recovered as gone: the departed (failed and fenced), the leavers
	// (they released everything) and the rejoined (they restarted and lost
	// their lock state); never this node (Reset covers this node's own
	// restart); sorted, without duplicates.
	Purge []NodeID
	// Reset: drop all lock state of earlier views and rejoin the lockspaces
	// from scratch. It is Install.Reset unless ResetSuppressed.
	Reset bool
	// ResetSuppressed: the agreement asked for a reset, but this process's
	// lock manager has never recovered into any view, so it holds no lock
	// state a reset would drop, and a plain recovery is the same.
	ResetSuppressed bool
}

// Config configures an Applier.
type Config struct {
	// Self is this node's ID (never purged from its own lock manager).
	Self NodeID
	// Effects carry the decisions out.
	Effects Effects
}

// Applier applies one node's agreement decisions. Build one per process
// run of the node, with the lock manager it drives: what it remembers (has
// the lock manager ever recovered into a view, which view's recovery is
// pending, which lockspaces exist and how far each has recovered) belongs
// to that lock manager and is lost with it.
//
// Apply must be called from one goroutine at a time (the one that owns the
// Agreement). LockspaceOpened and LockspaceRecovered may be called from
// others: a small mutex guards the Applier's state, and it is never held
// while an Effect runs, so effects may take their own locks freely.
type Applier struct {
	self NodeID
	eff  Effects

	mu sync.Mutex
	// everRecovered: RecoverLockManager succeeded at least once. Before
	// that the lock manager holds no lock state of any view.
	everRecovered bool
	// pending is the view whose recovery RecoveryDone has not reported
	// yet, 0 if none.
	pending uint64
	// recovered maps each lockspace known to the Applier to the newest
	// generation it has recovered into (0: not yet).
	recovered map[string]uint64
}

// New returns an Applier for a lock manager that has never recovered into a
// view and has no lockspace yet.
func New(cfg Config) (*Applier, error) {
	if cfg.Effects == nil {
		return nil, errors.New("apply: Config.Effects is not set")
	}
	if cfg.Self == 0 {
		return nil, errors.New("apply: Config.Self is not set")
	}
	return &Applier{self: cfg.Self, eff: cfg.Effects, recovered: map[string]uint64{}}, nil
}

// Apply carries out one Ready, in this order:
//
//  1. log the Agreement's decision log (Ready.Log);
//  2. persist State; on an error, return it and do nothing else;
//  3. on Quorate=false or Stop, stop the lock manager (the messages may
//     promise that it is stopped); then report Quorate=false;
//  4. send Messages;
//  5. recover the lock manager into each installed view, in order;
//  6. on StopAfterInstall, stop again: the recovery would otherwise resume
//     what the Agreement counts as stopped;
//  7. report RecoveryDone if the installed view needs no more recovery
//     (no lockspace, or every one already there);
//  8. request the fences;
//  9. on Quorate=true, report it;
//  10. on Exited, report it.
//
// A RecoverLockManager error is logged and the rest of the Ready is still
// carried out; that view is not reported recovered.
func (a *Applier) Apply(rd membership.Ready) error {
	for _, e := range rd.Log {
		a.eff.Log(e)
	}
	if rd.State != nil {
		if err := a.eff.Persist(*rd.State); err != nil {
			return fmt.Errorf("apply: node %s: persisting membership state: %w", a.self, err)
		}
	}
	lost := rd.Quorate != nil && !*rd.Quorate
	if lost || rd.Stop != nil {
		a.eff.StopLockManager(Stop{NotQuorate: lost, Change: cloneView(rd.Stop)})
	}
	if lost {
		a.eff.QuorumChanged(false)
	}
	for _, m := range rd.Messages {
		a.eff.Send(m)
	}
	for _, in := range rd.Install {
		a.install(in)
	}
	if k := len(rd.Install); k > 0 {
		if sa := rd.StopAfterInstall; sa != nil {
			last := rd.Install[k-1].View.Gen
			st := Stop{NotQuorate: sa.NotQuorate, Change: cloneView(sa.Change), AfterInstall: true}
			var why string
			switch {
			case sa.Change != nil && sa.NotQuorate:
				why = "after the install, a change towards a newer view began, and this node has no quorum"
			case sa.Change != nil:
				why = "after the install, a change towards a newer view began in the same decision"
			default:
				why = "this node has no quorum after the install"
			}
			attrs := []slog.Attr{slog.Uint64("installed_gen", last), slog.String("why", why), slog.Bool("quorate", !sa.NotQuorate)}
			if sa.Change != nil {
				attrs = append(attrs, slog.Uint64("ballot", sa.Change.Gen), slog.Any("intended_members", sa.Change.Members))
			}
			a.log(slog.LevelInfo, "lock manager stopped again right after the install: its recovery must not resume it; it resumes through a later view", attrs...)
			a.eff.StopLockManager(st)
		}
		a.checkDone()
	}
	for _, fr := range rd.Fence {
		a.eff.RequestFence(fr)
	}
	if rd.Quorate != nil && *rd.Quorate {
		a.eff.QuorumChanged(true)
	}
	if rd.Exited {
		a.eff.Exited()
	}
	return nil
}

// install turns one Install into a lock-manager recovery.
func (a *Applier) install(in membership.Install) {
	rc := Recovery{
		Install: in,
		Gen:     in.View.Gen,
		Members: slices.Sorted(slices.Values(in.View.Members)),
		Purge:   Purge(in, a.self),
		Reset:   in.Reset,
	}
	a.mu.Lock()
	fresh := !a.everRecovered
	// Pending before the call: in the runtime a lockspace may report its
	// recovery (on another goroutine) before RecoverLockManager returns.
	a.pending = rc.Gen
	a.mu.Unlock()
	if rc.Reset && fresh {
		// A reset drops the lock state of an older view. This lock manager
		// was created by this process and has never held a view: it has no
		// such state (a stopped lockspace takes no requests), so a plain
		// recovery is the same. (This first worked around a dlm bug, since
		// fixed, where a reset lost the new generation's early recovery
		// messages.)
		rc.Reset, rc.ResetSuppressed = false, true
		a.log(slog.LevelInfo, "reset requested, but this lock manager holds no state from an earlier view (fresh start): recovering without reset",
			slog.Uint64("gen", rc.Gen))
	}
	if err := a.eff.RecoverLockManager(rc); err != nil {
		a.mu.Lock()
		if a.pending == rc.Gen {
			a.pending = 0
		}
		a.mu.Unlock()
		a.log(slog.LevelError, "lock recovery could not start; this view will not be reported recovered",
			slog.Uint64("gen", rc.Gen), slog.String("err", err.Error()))
		return
	}
	a.mu.Lock()
	a.everRecovered = true
	a.mu.Unlock()
}

// Purge returns the nodes an Install asks this node (self) to purge from its
// lock manager: Departed ∪ Left ∪ Rejoined, without self, sorted and without
// duplicates. Departed nodes failed and were fenced; leavers released their
// locks already; rejoined nodes restarted and lost theirs: the old view's
// record of their locks goes the same way for all three. This node may be
// among the rejoined (it restarted); Reset covers that, and a node never
// purges itself.
func Purge(in membership.Install, self NodeID) []NodeID {
	out := slices.DeleteFunc(slices.Concat(in.Departed, in.Left, in.Rejoined), func(id NodeID) bool { return id == self })
	slices.Sort(out)
	return slices.Compact(out)
}

// LockspaceOpened tells the Applier that the lock manager has a lockspace
// named name, which has already recovered into generation gen (0 if it has
// yet to recover: it was created stopped, and the next recovery takes it
// along). From now on RecoveryDone waits for it too. A name already known is
// left as it is: a second handle to a lockspace does not say anything about
// its recovery. It never calls an Effect (a new lockspace can only delay a
// pending RecoveryDone, never complete it), so the caller may hold its own
// locks.
func (a *Applier) LockspaceOpened(name string, gen uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.recovered[name]; !ok {
		a.recovered[name] = gen
	}
}

// LockspaceRecovered records that lockspace name finished recovering into
// generation gen, and calls Effects.RecoveryDone when that completes the
// pending view. Reports may arrive late or out of order: each lockspace
// keeps the newest generation it reported.
func (a *Applier) LockspaceRecovered(name string, gen uint64) {
	a.mu.Lock()
	if gen > a.recovered[name] {
		a.recovered[name] = gen
	}
	a.mu.Unlock()
	a.checkDone()
}

// checkDone reports RecoveryDone once every known lockspace has recovered
// into the pending view. The mutex makes the report happen once.
func (a *Applier) checkDone() {
	a.mu.Lock()
	gen := a.pending
	if gen == 0 {
		a.mu.Unlock()
		return
	}
	for _, g := range a.recovered {
		if g < gen {
			a.mu.Unlock()
			return
		}
	}
	a.pending = 0
	a.mu.Unlock()
	a.eff.RecoveryDone(gen)
}

// Lockspaces returns how many lockspaces the Applier waits for in a
// recovery.
func (a *Applier) Lockspaces() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.recovered)
}

// EverRecovered reports whether the lock manager has recovered into a view
// (RecoverLockManager succeeded once); until then a requested reset is
// carried out as a plain recovery.
func (a *Applier) EverRecovered() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.everRecovered
}

func (a *Applier) log(level slog.Level, msg string, attrs ...slog.Attr) {
	a.eff.Log(membership.Event{Level: level, Msg: msg, Attrs: attrs})
}

func cloneView(v *membership.View) *membership.View {
	if v == nil {
		return nil
	}
	return &membership.View{Gen: v.Gen, Members: slices.Clone(v.Members)}
}
