package sim

import (
	"slices"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// Check verifies the invariants that hold between steps (the others are
// checked where they happen: completions, deliveries, Readys).
func (s *Sim) Check() {
	if s.failed != "" {
		return
	}
	s.m.checkLocks()
	s.checkMasters()
	s.own.check()
	s.bc.check()
}

// checkMasters: every lock a recovered master lists belongs to a member of
// its current view, and at most one node of a generation masters a
// resource.
func (s *Sim) checkMasters() {
	type owner struct {
		node NodeID
		gen  uint64
		ri   dlm.ResourceInfo
	}
	seen := map[string]owner{}
	for _, id := range s.ids {
		n := s.nodes[id]
		if !s.m.counts(n) || n.Sp.Stopped() {
			continue
		}
		gen := n.Sp.Generation()
		if v := n.Ag.View(); v.Gen != gen {
			continue // the lockspace is a view behind (it has not run this view's recovery yet)
		}
		members := n.Sp.Members()
		for _, ri := range n.Sp.Dump() {
			if NodeID(ri.Master) != id {
				continue
			}
			if o, ok := seen[ri.Name]; ok && o.gen == gen && o.node != id {
				s.fail("%s mastered by nodes %s and %s in gen %d (%+v and %+v)", ri.Name, o.node, id, gen, o.ri, ri)
				return
			}
			seen[ri.Name] = owner{id, gen, ri}
			for _, q := range [][]dlm.LockInfo{ri.Granted, ri.Converting, ri.Waiting} {
				for _, li := range q {
					if !slices.Contains(members, li.Node) {
						s.fail("node %s (gen %d, members %v) masters %s with a lock of node %d, which is not a member",
							id, gen, members, ri.Name, li.Node)
						return
					}
				}
			}
		}
	}
}

// checkReady verifies an Agreement Ready against the agreement invariants
// (the membership package's own simulator checks the same): one view per
// generation, one chain, monotonic installs, no skipped view without a
// reset, quorum, fence before install.
func (s *Sim) checkReady(n *Node, rd membership.Ready) {
	believedQuorate := s.q.Quorate(n.alive)
	for _, g := range rd.SelfFenceGens() {
		s.selfFence(n, g)
	}
	last := n.lastGen
	for _, in := range rd.Install {
		switch {
		case in.View.Gen <= last:
			s.fail("node %s installed gen %d after gen %d: installs not monotonic", n.ID, in.View.Gen, last)
		case !in.View.Contains(n.ID):
			s.fail("node %s installed gen %d without being a member", n.ID, in.View.Gen)
		case !believedQuorate:
			s.fail("node %s installed gen %d while its alive set %v is not quorate", n.ID, in.View.Gen, n.alive)
		case !s.q.Quorate(in.View.Members):
			s.fail("node %s installed gen %d %v, which is not quorate", n.ID, in.View.Gen, in.View.Members)
		case slices.Contains(in.Rejoined, n.ID) && !in.Reset:
			s.fail("node %s is listed as rejoined in gen %d but keeps its old state", n.ID, in.View.Gen)
		}
		fresh := last == 0 && !in.Prev.Contains(n.ID)
		if !in.Reset && in.Prev.Gen != last && !fresh {
			s.fail("node %s installed gen %d (prev %d) without reset, but its last view is %d: skipped a view",
				n.ID, in.View.Gen, in.Prev.Gen, last)
		}
		if prev, ok := s.m.views[in.View.Gen]; ok {
			if !prev.View.Equal(in.View) || !prev.Prev.Equal(in.Prev) {
				s.fail("gen %d: node %s installed %v (prev %d %v), another node %v (prev %d %v)",
					in.View.Gen, n.ID, in.View.Members, in.Prev.Gen, in.Prev.Members, prev.View.Members, prev.Prev.Gen, prev.Prev.Members)
			}
		} else {
			for g, v := range s.m.views {
				if g > in.Prev.Gen && g < in.View.Gen {
					s.fail("gen %d succeeds gen %d, but gen %d was installed in between", in.View.Gen, in.Prev.Gen, g)
				}
				if in.View.Gen > v.Prev.Gen && in.View.Gen < g {
					s.fail("gen %d installed between gen %d and its predecessor %d", in.View.Gen, g, v.Prev.Gen)
				}
			}
			if p, ok := s.m.views[in.Prev.Gen]; ok && in.Prev.Gen != 0 && !p.View.Equal(in.Prev) {
				s.fail("gen %d names prev %v, but gen %d was installed as %v", in.View.Gen, in.Prev, in.Prev.Gen, p.View)
			}
			s.m.views[in.View.Gen] = in
			s.stats.ViewsAgreed++
		}
		for _, d := range in.Departed {
			if s.m.fenced[[2]uint64{uint64(d), in.View.Gen}] {
				continue
			}
			// The one exception: a coordinator completing an adopted view
			// that names itself as failed stops its own I/O instead.
			if s.m.selfFenced[[2]uint64{uint64(d), in.View.Gen}] {
				s.m.dropGhosts(d) // a new incarnation stopped itself: the old one is dead
				continue
			}
			s.fail("node %s installed gen %d removing failed node %s, which was not fenced for it", n.ID, in.View.Gen, d)
		}
		last = in.View.Gen
	}
	if sa := rd.StopAfterInstall; sa != nil && (len(rd.Install) == 0 || (sa.Change == nil && !sa.NotQuorate) ||
		(sa.Change != nil && (rd.Stop == nil || !rd.Stop.Equal(*sa.Change)))) {
		s.fail("node %s: %v does not fit its Ready (installs %d, stop %v)", n.ID, sa, len(rd.Install), rd.Stop)
	}
	for _, f := range rd.Fence {
		if !believedQuorate {
			s.fail("node %s asked to fence %s while its alive set %v is not quorate", n.ID, f.Node, n.alive)
		}
		if f.Node == n.ID {
			s.fail("node %s asked to fence itself", n.ID)
		}
	}
	if rd.Quorate != nil && *rd.Quorate && !believedQuorate {
		s.fail("node %s reported quorate with alive set %v", n.ID, n.alive)
	}
}

// selfFence notes that node n stopped itself as a failed member of view gen:
// it must be stopped now (Quorate=false comes in the same Ready, before the
// COMMIT leaves), and its lock state counts for nothing any more.
func (s *Sim) selfFence(n *Node, gen uint64) {
	s.tracef("%s stops itself as a failed member of gen %d", n.ID, gen)
	s.m.selfFenced[[2]uint64{uint64(n.ID), gen}] = true
	if !n.fenced {
		n.fenced = true
		s.m.fencedAlive(n)
	}
}
