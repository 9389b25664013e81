// Package membership agrees on cluster views on top of a failure detector.
//
// A failure detector (memberlist's SWIM gossip in the daemon, a seeded model
// in tests) only says which nodes look alive; nodes may disagree about it, and
// it cannot tell a crash from a clean leave. The DLM needs more: every member
// must see the same numbered views in the same order, every member must have
// stopped its lockspaces before any member starts recovery for a new view, a
// failed node must be fenced before anyone recovers its locks, and a minority
// must never move on (see docs/membership.md).
//
// Agreement is the state machine that provides this. It is pure: no I/O, no
// goroutines, no clock and no global state. The driver feeds it the failure
// detector's belief (SetAlive), peer messages (Step), timer ticks (Tick) and
// the results of the work it asked for (FenceResult, RecoveryDone), and
// collects what to do next with Ready, in the style of etcd's raft. The same
// code runs in the daemon and in the seeded simulator in the tests.
package membership

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/mdcluster/mdcluster/ddraid"
)

// SelfFenceLog starts the warning an Agreement logs (in Ready.Log) for each
// view it completes as a failed member of that view: instead of fencing
// itself it stops its own I/O. The view's "view chosen" line lists nobody
// to fence then, so this line is the record of who stood in for that fence,
// for operators and for checkers of the fence-before-install rule alike.
const SelfFenceLog = "this node is a failed member of the view being completed"

// SelfFenceGens returns the generations of the views rd's node completed
// as a failed member of them (the SelfFenceLog lines in rd.Log).
func (rd Ready) SelfFenceGens() []uint64 {
	var gens []uint64
	for _, e := range rd.Log {
		if !strings.HasPrefix(e.Msg, SelfFenceLog) {
			continue
		}
		for _, at := range e.Attrs {
			if at.Key == "gen" {
				gens = append(gens, at.Value.Uint64())
			}
		}
	}
	return gens
}

// NodeID identifies a node; it is the ddraid (and DLM) node ID, so quorum
// rules and fencing plans can be applied to views directly.
type NodeID = ddraid.NodeID

// View is one agreed cluster membership: a generation number and the member
// list. Every node that installs generation Gen installs the same Members.
type View struct {
	// Gen is the generation. Generations of the views a node installs
	// strictly increase, but need not be consecutive (a failed attempt uses
	// up a number).
	Gen uint64
	// Members is sorted and free of duplicates.
	Members []NodeID
}

// Contains reports whether id is a member.
func (v View) Contains(id NodeID) bool {
	_, ok := slices.BinarySearch(v.Members, id)
	return ok
}

// Equal reports whether both views have the same generation and members.
func (v View) Equal(o View) bool {
	return v.Gen == o.Gen && slices.Equal(v.Members, o.Members)
}

// Proposal is a view together with how it follows its predecessor. It is the
// value the nodes agree on: agreeing on Prev as well as on the members is what
// puts the views into one chain that every member walks in the same order.
type Proposal struct {
	// Gen and Members are the new view.
	Gen     uint64
	Members []NodeID
	// Prev is the view this one succeeds. Members of Prev that stay members
	// have installed Prev before they install this view.
	Prev View
	// Left are members of Prev that left gracefully (announced, after
	// stopping I/O and releasing their locks). They are not fenced.
	Left []NodeID
	// Rejoined are members of both Prev and this view whose daemon restarted
	// in between: their lock state is gone, so the other members recover it
	// as if they had failed, but they rejoined clean and are not fenced.
	Rejoined []NodeID
}

// View returns the proposal's view.
func (p Proposal) View() View { return View{Gen: p.Gen, Members: p.Members} }

// Departed returns the members of Prev that failed: not in the new view and
// not among the graceful leavers. Each of them must be fenced before the view
// is installed anywhere.
func (p Proposal) Departed() []NodeID {
	var out []NodeID
	for _, id := range p.Prev.Members {
		if !contains(p.Members, id) && !contains(p.Left, id) {
			out = append(out, id)
		}
	}
	return out
}

// Joined returns the members that were not members of Prev.
func (p Proposal) Joined() []NodeID {
	var out []NodeID
	for _, id := range p.Members {
		if !contains(p.Prev.Members, id) {
			out = append(out, id)
		}
	}
	return out
}

func (p Proposal) equal(o Proposal) bool {
	return p.Gen == o.Gen && slices.Equal(p.Members, o.Members) && p.Prev.Equal(o.Prev) &&
		slices.Equal(p.Left, o.Left) && slices.Equal(p.Rejoined, o.Rejoined)
}

// Accepted is a proposal a node accepted under a ballot, with the base it
// was proposed on (the full record of Prev), so that a later coordinator that
// adopts the proposal can also bring lagging members up to its predecessor.
type Accepted struct {
	Ballot uint64
	Value  Proposal
	Base   Proposal
}

// HardState is what a node must keep across restarts for the agreement to
// stay safe: the ballot it promised (and to whom), the proposal it accepted,
// and the last view it installed. The driver persists it (Marshal) whenever
// Ready.State is set, before it sends Ready.Messages, and passes it back in
// Config.State when the daemon restarts. Losing it could let a node accept
// two different proposals for one ballot.
type HardState struct {
	// Promised is the highest ballot this node answered; it accepts nothing
	// lower. Installing a view raises it to the ballot that view was chosen
	// under.
	Promised uint64
	// PromisedTo is the coordinator Promised was given to: two coordinators
	// that happen to pick the same ballot must not both get this node's vote.
	PromisedTo NodeID
	// Accepted is the last proposal accepted, nil if none.
	Accepted *Accepted
	// Installed is the last installed view with its derivation; Gen 0 means
	// none yet.
	Installed Proposal
}

// Outgoing is one message to send to a peer. Delivery may fail, be delayed,
// duplicated or reordered; the protocol retransmits what matters.
type Outgoing struct {
	To      NodeID
	Payload []byte
}

// FenceRequest asks the driver to fence a failed node on behalf of view Gen
// (fence.Request.Generation). The driver reports the outcome with
// FenceResult; until every request of a change succeeded, nothing is
// installed.
type FenceRequest struct {
	Node NodeID
	Gen  uint64
}

// Install tells the driver that this node is now a member of View and must
// run DLM recovery for it, then call RecoveryDone(View.Gen).
type Install struct {
	View View
	// Prev is the view this one succeeds in the agreed chain.
	Prev View
	// Departed failed and have been fenced: purge their locks and recover
	// their bitmap slots.
	Departed []NodeID
	// Left left gracefully: they released everything, nothing to recover.
	Left []NodeID
	// Joined are new members.
	Joined []NodeID
	// Rejoined restarted since Prev: recover their old state like Departed,
	// then treat them as joined.
	Rejoined []NodeID
	// Reset: this node's last installed view is not Prev (it was cut off, or
	// restarted), so it must drop all old lock state and rejoin its
	// lockspaces from scratch. Partitions never merge old state.
	Reset bool
}

// Event is one line of the decision log: why the machine did what it did.
// The driver logs it with slog (Attrs are plain data).
type Event struct {
	Level slog.Level
	Msg   string
	Attrs []slog.Attr
}

// Ready is everything the driver must do after a call into the Agreement, in
// this order: persist State; act on Quorate=false and Stop (stop granting,
// I/O and lock traffic), because the messages may promise that this node has
// stopped; send Messages; then Install, then StopAfterInstall; then Fence,
// Quorate=true and Exited; and log Log. Ready clears it.
//
// After the driver has carried it out, its lock manager is stopped exactly
// when Agreement.LockManagerStopped says so: the machine keeps that record
// in the order it decided things, and StopAfterInstall carries that order
// where the driver's fixed order differs from it.
type Ready struct {
	// State, when non-nil, must be persisted before Messages are sent.
	State *HardState
	// Messages to send to peers.
	Messages []Outgoing
	// Stop: a change towards this view began (View.Gen is the ballot of
	// the attempt): suspend the lockspaces now and stop lock traffic.
	// The lock manager resumes only through a later Install. In the same
	// Ready, the Installs resume it unless StopAfterInstall is set (the
	// stop came after them). If the change is abandoned, the machine
	// still brings every member that stays quorate to a new view, so none
	// is left stopped.
	Stop *View
	// Install lists the views to install, in order (usually one; two when
	// this node catches up on a view it missed).
	Install []Install
	// StopAfterInstall, set only with Install, means the lock manager must
	// be stopped again right after the Installs (a stop during recovery
	// outlasts it): after the last Install this node stopped for a newer
	// change, or it is not quorate once the Ready is carried out. The
	// machine counts the lock manager as stopped from then on, and asks
	// for a new view to resume through if nothing else brings one.
	StopAfterInstall *StopAfterInstall
	// Fence lists nodes this node (the coordinator) must fence now.
	Fence []FenceRequest
	// Quorate is set when the local quorum status changed. A node is
	// quorate when enough members of its installed view are alive and
	// that view is current as far as it knows: not while it restarted and
	// awaits readmission, nor once a peer's message shows the cluster at
	// a newer view (docs/membership.md, "A view the cluster has left").
	// False means stop granting locks and stop array I/O now. True resumes nothing:
	// once quorum is back, the machine asks for a new view (even with the
	// same members) and the Install resumes the lock manager.
	Quorate *bool
	// Exited is set once, when this node's graceful leave completed: it is
	// out of the view and may shut down.
	Exited bool
	// Log explains the decisions taken.
	Log []Event
}

// StopAfterInstall says why a Ready's Installs leave the lock manager
// stopped. One or both hold.
type StopAfterInstall struct {
	// Change is the change this node stopped for after the last Install
	// (it is Ready.Stop: the ballot and the intended members), nil if the
	// stop is for quorum alone.
	Change *View
	// NotQuorate: quorum was missing after the last Install (this node is
	// not quorate in the view it installed, or lost quorum after it).
	NotQuorate bool
}

// String describes the reasons, for logs and failure reports.
func (s StopAfterInstall) String() string {
	var why []string
	if s.Change != nil {
		why = append(why, fmt.Sprintf("change towards ballot %d %v", s.Change.Gen, s.Change.Members))
	}
	if s.NotQuorate {
		why = append(why, "no quorum")
	}
	return "stop after install: " + strings.Join(why, ", ")
}

// Empty reports whether there is nothing to do.
func (r Ready) Empty() bool {
	return r.State == nil && len(r.Messages) == 0 && r.Stop == nil && len(r.Install) == 0 &&
		r.StopAfterInstall == nil && len(r.Fence) == 0 && r.Quorate == nil && !r.Exited && len(r.Log) == 0
}

// Stats counts what the machine dropped, for metrics and tests.
type Stats struct {
	// Stale counts messages dropped because they belonged to an older
	// generation or ballot than this node's.
	Stale uint64
	// Malformed counts payloads Step refused.
	Malformed uint64
}

func contains(sorted []NodeID, id NodeID) bool {
	_, ok := slices.BinarySearch(sorted, id)
	return ok
}

// normalize returns ids sorted without duplicates and without NoNode.
func normalize(ids []NodeID) []NodeID {
	out := slices.Clone(ids)
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) > 0 && out[0] == ddraid.NoNode {
		out = out[1:]
	}
	return out
}

func intersect(a, b []NodeID) []NodeID {
	var out []NodeID
	for _, id := range a {
		if contains(b, id) {
			out = append(out, id)
		}
	}
	return out
}

func minus(a, b []NodeID) []NodeID {
	var out []NodeID
	for _, id := range a {
		if !contains(b, id) {
			out = append(out, id)
		}
	}
	return out
}
