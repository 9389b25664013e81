package fence

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// Departure describes a node that was in the old view and is not in the new
// one.
type Departure struct {
	// Node is the departed node.
	Node ddraid.NodeID
	// FailedAt is when the failure was observed. Required unless Clean.
	FailedAt time.Time
	// Clean means the node left on purpose after stopping I/O and releasing
	// its locks; it holds nothing and is not fenced. Anything else (a crash, a
	// timeout, a partition) is a failure and must be fenced.
	Clean bool
}

// ViewChange is an agreed transition from one view to the next, as every
// member of the new view sees it.
type ViewChange struct {
	// Generation is the generation of the new view.
	Generation uint64
	// Old and New are the members (data and non-data nodes) of the previous
	// and the new view.
	Old, New []ddraid.NodeID
	// Departed has one entry for every node of Old that is not in New.
	Departed []Departure
}

// Plan is what PlanFencing decided for a view change. Every member computes
// the same Plan from the same agreed ViewChange, so exactly one node fences
// without any further coordination.
type Plan struct {
	// Quorum is the new view's quorum status, for logs.
	Quorum ddraid.Status
	// Actor is the node that runs the fencers: the lowest node ID in the new
	// view. It is NoNode when nobody may fence (the new view is not quorate)
	// or nobody needs fencing.
	Actor ddraid.NodeID
	// Requests has one request per failed departure, sorted by node ID. It is
	// filled in even when the view is not quorate, so that logs show who is
	// waiting to be fenced.
	Requests []Request
}

// Quorate reports whether the new view may fence (and, once every request
// is confirmed, recover).
func (p Plan) Quorate() bool { return p.Quorum.Quorate }

// ShouldFence reports whether self is the node that must fence now.
func (p Plan) ShouldFence(self ddraid.NodeID) bool {
	return p.Actor != ddraid.NoNode && p.Actor == self
}

// PlanFencing decides who fences whom after a view change:
//
//   - only a quorate new view fences. A minority must not fence the majority
//     (that is how split brain kills the healthy side); it stops and waits;
//   - the actor is the lowest node ID in the new view, data node or not;
//   - every departure that is not Clean is fenced, with its failure time, on
//     behalf of the new view's generation.
//
// It returns an error when the change is inconsistent: invalid config, a
// departed node that is still in the new view or was not in the old one, a
// node of Old missing from both New and Departed, a failure without a time.
func PlanFencing(cfg ddraid.Config, vc ViewChange) (Plan, error) {
	if err := cfg.Validate(); err != nil {
		return Plan{}, fmt.Errorf("fence: planning generation %d: %w", vc.Generation, err)
	}
	old := toSet(vc.Old)
	cur := toSet(vc.New)
	var errs []error
	seen := make(map[ddraid.NodeID]bool, len(vc.Departed))
	var reqs []Request
	for _, d := range vc.Departed {
		switch {
		case seen[d.Node]:
			errs = append(errs, fmt.Errorf("node %s departed twice", d.Node))
		case !old[d.Node]:
			errs = append(errs, fmt.Errorf("node %s departed but was not in the old view", d.Node))
		case cur[d.Node]:
			errs = append(errs, fmt.Errorf("node %s departed but is in the new view", d.Node))
		case !d.Clean && d.FailedAt.IsZero():
			errs = append(errs, fmt.Errorf("node %s failed without a failure time", d.Node))
		case !d.Clean:
			reqs = append(reqs, Request{Node: d.Node, FailedAt: d.FailedAt, Generation: vc.Generation})
		}
		seen[d.Node] = true
	}
	for _, id := range sortedSet(old) {
		if !cur[id] && !seen[id] {
			errs = append(errs, fmt.Errorf("node %s left the view without a departure record", id))
		}
	}
	if len(errs) > 0 {
		return Plan{}, fmt.Errorf("fence: inconsistent view change to generation %d: %w", vc.Generation, errors.Join(errs...))
	}
	slices.SortFunc(reqs, func(a, b Request) int { return cmp.Compare(a.Node, b.Node) })
	p := Plan{Quorum: cfg.Evaluate(vc.New), Requests: reqs}
	if p.Quorum.Quorate && len(reqs) > 0 {
		if members := sortedSet(cur); len(members) > 0 {
			p.Actor = members[0]
		}
	}
	return p, nil
}

// Ledger records fence confirmations so that recovery can ask whether every
// failed node has been fenced since it failed. A confirmation from before a
// failure (an earlier fence of the same node, which has since rejoined) does
// not count for it.
//
// The zero value is an empty ledger. A Ledger is plain data: it is not safe
// for concurrent use, and the driver that owns it replicates or persists it
// as it needs.
type Ledger struct {
	last map[ddraid.NodeID]Result
}

// Record adds a confirmation. Only the latest confirmation per node is kept;
// an older one arriving late (a slow retry) never replaces a newer one. An
// operator's manual acknowledgement is recorded the same way, with Method
// "manual".
func (l *Ledger) Record(r Result) {
	if l.last == nil {
		l.last = make(map[ddraid.NodeID]Result)
	}
	if prev, ok := l.last[r.Node]; ok && prev.FencedAt.After(r.FencedAt) {
		return
	}
	l.last[r.Node] = r
}

// Last returns the latest confirmation for node.
func (l *Ledger) Last(node ddraid.NodeID) (Result, bool) {
	r, ok := l.last[node]
	return r, ok
}

// FencedSince reports whether node has a confirmation at or after t.
func (l *Ledger) FencedSince(node ddraid.NodeID, t time.Time) bool {
	r, ok := l.last[node]
	return ok && !r.FencedAt.Before(t)
}

// Pending returns the failed departures (sorted by node ID) that are not yet
// confirmed fenced at or after their failure time. Clean departures are
// never pending. Recovery of the new view may start only when it is empty.
func (l *Ledger) Pending(departed []Departure) []ddraid.NodeID {
	var out []ddraid.NodeID
	for _, d := range departed {
		if !d.Clean && !l.FencedSince(d.Node, d.FailedAt) {
			out = append(out, d.Node)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Complete reports whether every failed departure has been confirmed fenced
// since it failed.
func (l *Ledger) Complete(departed []Departure) bool { return len(l.Pending(departed)) == 0 }

func toSet(ids []ddraid.NodeID) map[ddraid.NodeID]bool {
	s := make(map[ddraid.NodeID]bool, len(ids))
	for _, id := range ids {
		s[id] = true
	}
	return s
}

func sortedSet(s map[ddraid.NodeID]bool) []ddraid.NodeID {
	out := make([]ddraid.NodeID, 0, len(s))
	for id := range s {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}
