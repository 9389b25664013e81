package sim

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// The lock model: what each owner believes it holds, learnt only from its
// own calls and completion callbacks, and what the cluster's LVBs must read.

// Lock is one owner's lock as the owner believes it.
type Lock struct {
	ID      int
	Node    NodeID
	p       *dlm.Proc
	Res     string
	Gr, Rq  dlm.Mode
	op      string
	flags   dlm.Flags
	Pending bool
	lvb     []byte
	// done counts completions, for exactly-once.
	done int
}

// ghost is a lock of a crashed node that its master may still hold: nothing
// conflicting may be granted until the node is confirmed fenced.
type ghost struct {
	node NodeID
	res  string
	mode dlm.Mode
	lock int
}

// resv is what the model knows of a resource's LVB: the last value a PW/EX
// holder wrote, and whether a PW/EX holder died since (the next grantee
// must then be told VALNOTVALID unless someone wrote since).
type resv struct {
	val     []byte
	invalid bool
}

type model struct {
	s      *Sim
	locks  map[*dlm.Proc]*Lock
	res    map[string]*resv
	ghosts []ghost
	names  int
	// fenced records confirmed fences: (node, gen).
	fenced map[[2]uint64]bool
	// views is the first install of each generation (agreement checks).
	views map[uint64]membership.Install
	// selfFenced: (node, gen) where a coordinator completed a view naming
	// itself as failed.
	selfFenced map[[2]uint64]bool
}

func newModel(s *Sim) *model {
	m := &model{s: s, locks: map[*dlm.Proc]*Lock{}, res: map[string]*resv{}, fenced: map[[2]uint64]bool{},
		views: map[uint64]membership.Install{}, selfFenced: map[[2]uint64]bool{}}
	for i := range s.cfg.Resources {
		m.res[fmt.Sprintf("r%d", i)] = &resv{val: make([]byte, s.cfg.LVBLen)}
	}
	return m
}

// counts reports whether a node's beliefs count cluster-wide: it runs and
// is not fenced.
func (m *model) counts(n *Node) bool { return n.Up && !n.fenced }

// Locks returns the model's locks sorted by ID.
func (s *Sim) Locks() []*Lock { return s.m.live(0) }

// live returns the locks (of node id, or all when id is 0) sorted by ID.
func (m *model) live(id NodeID) []*Lock {
	var out []*Lock
	for _, l := range m.locks {
		if id == 0 || l.Node == id {
			out = append(out, l)
		}
	}
	slices.SortFunc(out, func(a, b *Lock) int { return a.ID - b.ID })
	return out
}

// held is the mode an owner may count on: a pending PR<->CW conversion
// counts as CR, a pending CONVDEADLK conversion as NL (it may have been
// demoted already), as docs/dlm.md says.
func held(l *Lock) dlm.Mode {
	if l.Gr == dlm.ModeIV {
		return dlm.ModeIV
	}
	if l.Pending && l.op == "convert" {
		if l.flags&dlm.ConvDeadlk != 0 {
			return dlm.NL
		}
		if middle(l.Gr, l.Rq) {
			return dlm.CR
		}
	}
	return l.Gr
}

// --- fault hooks ---

func (m *model) crashed(n *Node) {
	m.s.own.crashed(n)
	m.s.bc.crashed(n)
	for _, l := range m.live(n.ID) {
		if m.counts(n) {
			if l.Gr >= dlm.PW {
				m.res[l.Res].invalid = true // it may have written half a value
			}
			if h := held(l); h != dlm.ModeIV {
				m.ghosts = append(m.ghosts, ghost{node: n.ID, res: l.Res, mode: h, lock: l.ID})
			}
		}
		delete(m.locks, l.p)
	}
}

func (m *model) fencedAlive(n *Node) {
	m.s.own.fenced(n)
	m.s.bc.fenced(n)
	for _, l := range m.live(n.ID) {
		if l.Gr >= dlm.PW {
			m.res[l.Res].invalid = true
		}
	}
}

func (m *model) unfenced(n *Node) {
	if ls := m.live(n.ID); len(ls) > 0 {
		m.s.fail("node %s rejoined with a reset but lock %d (%s) survived it", n.ID, ls[0].ID, ls[0].Res)
	}
}

func (m *model) fenceConfirmed(victim NodeID, gen uint64) {
	m.fenced[[2]uint64{uint64(victim), gen}] = true
	m.dropGhosts(victim)
}

func (m *model) dropGhosts(id NodeID) {
	m.ghosts = slices.DeleteFunc(m.ghosts, func(g ghost) bool { return g.node == id })
}

func (m *model) installed(n *Node, in membership.Install) {
	m.s.own.installing(n, in)
	m.s.bc.installing(n, in)
	for _, r := range in.Rejoined {
		m.dropGhosts(r) // it restarted: its old process is gone, and the view says so
	}
	// A restarted node that installs a view (with a reset) proves its old
	// process gone, even when the view does not list it as rejoined (an
	// adopted view proposed before it restarted; docs/membership.md).
	m.dropGhosts(n.ID)
}

// --- callbacks ---

func (m *model) callback(n *Node, cb dlm.Callback) {
	if h, ok := cb.Tag.(*simLock); ok {
		h.on.callback(h, cb)
		return
	}
	l, ok := cb.Tag.(*Lock)
	if !ok {
		m.s.fail("node %s: callback without a lock tag: %+v", n.ID, cb)
		return
	}
	if cb.Kind == dlm.Blocking {
		if l.Gr == dlm.ModeIV && !l.Pending {
			m.s.fail("blocking callback to lock %d (node %s) that holds nothing", l.ID, n.ID)
		}
		return
	}
	m.completion(n, l, cb)
}

func (m *model) completion(n *Node, l *Lock, cb dlm.Callback) {
	s := m.s
	s.tracef("lock %d node %s %s %s -> %v %v %v", l.ID, l.Node, l.Res, l.op, cb.Status, cb.Mode, cb.Flags)
	if _, ok := m.locks[l.p]; !ok {
		s.fail("completion %v for lock %d (node %s) that no longer exists", cb.Status, l.ID, l.Node)
		return
	}
	if !l.Pending && cb.Status != dlm.StatusReleased {
		s.fail("completion %v for lock %d (node %s) with nothing pending: a second completion", cb.Status, l.ID, l.Node)
		return
	}
	l.Pending = false
	l.done++
	r := m.res[l.Res]
	switch cb.Status {
	case dlm.StatusOK:
		prev := l.Gr
		if cb.Flags&dlm.Demoted != 0 {
			prev = dlm.NL
		}
		if l.op == "lock" || l.op == "convert" {
			if cb.Mode != l.Rq && !(cb.Flags&dlm.AltMode != 0 && (cb.Mode == dlm.PR || cb.Mode == dlm.CW)) {
				s.fail("lock %d granted %v, asked %v", l.ID, cb.Mode, l.Rq)
			}
			grant := l.op == "lock" || !down(l.Gr, l.Rq)
			if grant {
				s.stats.Grants++
				if !n.Ag.Quorate() {
					s.fail("node %s granted lock %d (%s %v) while its agreement says it is not quorate", n.ID, l.ID, l.Res, cb.Mode)
				}
			}
		}
		l.Gr = cb.Mode
		if l.flags&dlm.ValBlk != 0 && lvbOp(prev, cb.Mode) == opRead && cb.Mode >= dlm.PW &&
			cb.Flags&dlm.ValNotValid == 0 && m.counts(n) {
			if r.invalid {
				s.fail("lock %d (node %s, %v on %s) read a value a dead PW/EX holder may have left half written, without VALNOTVALID",
					l.ID, n.ID, cb.Mode, l.Res)
			} else if !bytes.Equal(r.val, l.lvb) {
				s.fail("lock %d (node %s, %v on %s) read LVB %q, last written %q", l.ID, n.ID, cb.Mode, l.Res, trim(l.lvb), trim(r.val))
			}
		}
	case dlm.StatusAgain, dlm.StatusDeadlock, dlm.StatusCancel, dlm.StatusTimeout:
		if cb.Flags&dlm.Demoted != 0 && l.Gr != dlm.ModeIV {
			l.Gr = dlm.NL
		}
		// A PR<->CW conversion caught by a view change may end in either
		// mode: the new master chose the one the other holders allowed.
		if cb.Mode != l.Gr && !(l.op == "convert" && middle(l.Gr, l.Rq) && cb.Mode == l.Rq) &&
			!(l.op == "convert" && l.flags&dlm.ConvDeadlk != 0 && cb.Mode == dlm.NL) {
			s.fail("failed %s of lock %d left mode %v, held %v", l.op, l.ID, cb.Mode, l.Gr)
		}
		l.Gr = cb.Mode
		if l.Gr == dlm.ModeIV {
			delete(m.locks, l.p)
		}
	case dlm.StatusUnlock:
		delete(m.locks, l.p)
	case dlm.StatusReleased:
		if !n.resetting {
			s.fail("lock %d on node %s released, but the node is not rejoining clean", l.ID, n.ID)
		}
		delete(m.locks, l.p)
	default:
		s.fail("lock %d (node %s): unexpected status %v", l.ID, n.ID, cb.Status)
	}
}

func trim(b []byte) []byte { return bytes.TrimRight(b, "\x00") }

// --- random operations ---

func (m *model) randomOp() {
	s := m.s
	if s.bc.randomOp() || s.own.randomOp() {
		return
	}
	var up []*Node
	for _, id := range s.ids {
		if n := s.nodes[id]; n.Up {
			up = append(up, n)
		}
	}
	if len(up) == 0 {
		return
	}
	n := up[s.intn(len(up))]
	live := m.live(n.ID)
	s.stats.Ops++
	switch k := s.intn(100); {
	case k < 35 || len(live) == 0:
		if len(live) < s.cfg.MaxLocks {
			m.newLock(n, fmt.Sprintf("r%d", s.intn(s.cfg.Resources)), dlm.Mode(s.intn(6)), m.randomLockFlags())
		}
	case k < 60:
		m.randomConvert(live[s.intn(len(live))])
	case k < 85:
		m.randomUnlock(live[s.intn(len(live))])
	default:
		m.cancel(live[s.intn(len(live))])
	}
}

func (m *model) randomLockFlags() dlm.Flags {
	var f dlm.Flags
	for _, c := range []struct {
		f dlm.Flags
		p int
	}{{dlm.NoQueue, 20}, {dlm.ValBlk, 70}, {dlm.HeadQue, 8}, {dlm.NoOrder, 8}, {dlm.AltPR, 6}, {dlm.NoQueueBast, 10}} {
		if m.s.intn(100) < c.p {
			f |= c.f
		}
	}
	return f
}

// NewLock asks for a new lock on node id; it returns nil when the node
// refused the request (stopped).
func (s *Sim) NewLock(id NodeID, res string, mode dlm.Mode, flags dlm.Flags) *Lock {
	l := s.m.newLock(s.nodes[id], res, mode, flags)
	s.Check()
	return l
}

func (m *model) newLock(n *Node, res string, mode dlm.Mode, f dlm.Flags) *Lock {
	s := m.s
	if mode == dlm.NL && f&dlm.NoQueue == 0 && s.intn(3) == 0 {
		f |= dlm.Expedite
	}
	l := &Lock{ID: m.names, Node: n.ID, p: new(dlm.Proc), Res: res, Gr: dlm.ModeIV, Rq: mode, op: "lock",
		flags: f, Pending: true, lvb: make([]byte, s.cfg.LVBLen)}
	m.names++
	if m.res[res] == nil {
		m.res[res] = &resv{val: make([]byte, s.cfg.LVBLen)}
	}
	m.locks[l.p] = l
	s.tracef("lock %d node %s %s %v %v", l.ID, n.ID, res, mode, f)
	n.ownerSeq++
	err := n.Sp.Lock(l.p, dlm.Request{Resource: res, Mode: mode, Flags: f, LVB: l.lvb,
		Owner: dlm.OwnerID(1 + n.ownerSeq%2), Blocking: true, Tag: l})
	if err != nil {
		delete(m.locks, l.p)
		if errors.Is(err, dlm.ErrStopped) && n.Sp.Stopped() {
			return nil
		}
		s.fail("node %s refused lock %d: %v", n.ID, l.ID, err)
		return nil
	}
	s.pump(n)
	return l
}

func (m *model) randomConvert(l *Lock) {
	s := m.s
	rq := dlm.Mode(s.intn(6))
	var f dlm.Flags
	for _, c := range []struct {
		f dlm.Flags
		p int
	}{{dlm.NoQueue, 15}, {dlm.ValBlk, 70}, {dlm.IVValBlk, 5}, {dlm.ConvDeadlk, 8}, {dlm.NoDlckWt, 8}, {dlm.HeadQue, 8}} {
		if s.intn(100) < c.p {
			f |= c.f
		}
	}
	if f&dlm.NoQueue != 0 {
		f &^= dlm.ConvDeadlk
	}
	if !l.Pending && l.Gr != dlm.ModeIV && quecvt(l.Gr, rq) && s.intn(5) == 0 {
		f |= dlm.QueCvt
	}
	m.convert(l, rq, f)
}

// Convert converts a lock (see dlm.Space.Convert).
func (s *Sim) Convert(l *Lock, mode dlm.Mode, flags dlm.Flags) {
	s.m.convert(l, mode, flags)
	s.Check()
}

func (m *model) convert(l *Lock, rq dlm.Mode, f dlm.Flags) {
	s := m.s
	n := s.nodes[l.Node]
	stopped := n.Sp.Stopped() // the call will be refused: leave the buffer alone
	if !stopped && !l.Pending && l.Gr != dlm.ModeIV && lvbOp(l.Gr, rq) == opWrite && f&dlm.ValBlk != 0 {
		copy(l.lvb, fmt.Sprintf("c%d.%s.s%d", l.ID, l.Node, s.step)) // only a writer changes its buffer
	}
	s.tracef("convert lock %d node %s %v->%v %v", l.ID, l.Node, l.Gr, rq, f)
	err := n.Sp.Convert(l.p, rq, f, nil)
	if errors.Is(err, dlm.ErrStopped) && n.Sp.Stopped() {
		return
	}
	if l.Pending || l.Gr == dlm.ModeIV {
		if err == nil {
			s.fail("convert of pending lock %d accepted", l.ID)
		}
		return
	}
	if err != nil {
		s.fail("convert lock %d %v->%v %v: %v", l.ID, l.Gr, rq, f, err)
		return
	}
	if lvbOp(l.Gr, rq) == opWrite {
		m.recordWrite(l, f)
	}
	l.Rq, l.op, l.flags, l.Pending = rq, "convert", f|dlm.Convert, true
	s.pump(n)
}

// recordWrite notes the LVB effect of a release from PW/EX. The master
// applies it before any later grant, so the model applies it at once. A
// write that is lost (its writer died before it arrived) leaves the writer's
// PW/EX lock at the master, whose death invalidates the value.
func (m *model) recordWrite(l *Lock, f dlm.Flags) {
	if !m.counts(m.s.nodes[l.Node]) {
		return // a fenced node's writes do not reach the cluster
	}
	r := m.res[l.Res]
	switch {
	case f&dlm.IVValBlk != 0:
		r.invalid = true
	case f&dlm.ValBlk != 0:
		copy(r.val, l.lvb)
		r.invalid = false
	}
}

func (m *model) randomUnlock(l *Lock) {
	s := m.s
	var f dlm.Flags
	if s.intn(2) == 0 {
		f |= dlm.ValBlk
	}
	if s.intn(12) == 0 {
		f |= dlm.IVValBlk
	}
	if l.Pending && s.intn(2) == 0 {
		// Where a force-unlock racing a grant in flight lands in the
		// master's order is not visible to the model: it writes no LVB.
		f = f&^dlm.ValBlk | dlm.ForceUnlock
	}
	m.unlock(l, f)
}

// Unlock releases a lock (see dlm.Space.Unlock).
func (s *Sim) Unlock(l *Lock, flags dlm.Flags) {
	s.m.unlock(l, flags)
	s.Check()
}

func (m *model) unlock(l *Lock, f dlm.Flags) {
	s := m.s
	n := s.nodes[l.Node]
	if !l.Pending && l.Gr >= dlm.PW && f&dlm.ValBlk != 0 && !n.Sp.Stopped() {
		copy(l.lvb, fmt.Sprintf("u%d.%s.s%d", l.ID, l.Node, s.step))
	}
	s.tracef("unlock lock %d node %s %v", l.ID, l.Node, f)
	err := n.Sp.Unlock(l.p, f, nil)
	if errors.Is(err, dlm.ErrStopped) && n.Sp.Stopped() {
		return
	}
	if l.Pending && f&dlm.ForceUnlock == 0 {
		if err == nil {
			s.fail("unlock of pending lock %d accepted", l.ID)
		}
		return
	}
	if err != nil {
		s.fail("unlock lock %d: %v", l.ID, err)
		return
	}
	if !l.Pending && l.Gr >= dlm.PW {
		m.recordWrite(l, f)
	}
	l.op, l.Pending = "unlock", true
	s.pump(n)
	if _, ok := m.locks[l.p]; ok && n.Up {
		s.fail("unlock of lock %d did not complete at once", l.ID)
	}
}

// Cancel cancels a lock's pending request or conversion.
func (s *Sim) Cancel(l *Lock) {
	s.m.cancel(l)
	s.Check()
}

func (m *model) cancel(l *Lock) {
	s := m.s
	n := s.nodes[l.Node]
	s.tracef("cancel lock %d node %s", l.ID, l.Node)
	if err := n.Sp.Cancel(l.p, dlm.StatusCancel); err != nil {
		s.fail("cancel lock %d: %v", l.ID, err)
		return
	}
	s.pump(n)
}

// --- checks on the lock model ---

// checkHeld: what the owners of counting nodes believe they hold on res,
// and the locks crashed nodes may still hold until they are fenced, are
// pairwise compatible.
func (m *model) checkHeld(res string, byRes map[string][]*Lock) {
	hs := byRes[res]
	for i, a := range hs {
		for _, b := range hs[i+1:] {
			if !compatible(held(a), held(b)) {
				m.s.fail("%s: lock %d (node %s) holds %v while lock %d (node %s) holds %v", res,
					a.ID, a.Node, held(a), b.ID, b.Node, held(b))
				return
			}
		}
		for _, g := range m.ghosts {
			if g.res == res && !compatible(held(a), g.mode) {
				m.s.fail("%s: lock %d (node %s) holds %v while crashed node %s, not yet fenced, may still hold %v (its lock %d)",
					res, a.ID, a.Node, held(a), g.node, g.mode, g.lock)
				return
			}
		}
	}
}

func (m *model) checkLocks() {
	byRes := map[string][]*Lock{}
	for _, l := range m.live(0) {
		if h := held(l); h != dlm.ModeIV && h != dlm.NL && m.counts(m.s.nodes[l.Node]) {
			byRes[l.Res] = append(byRes[l.Res], l)
		}
	}
	for _, res := range slices.Sorted(maps.Keys(byRes)) {
		m.checkHeld(res, byRes)
	}
}

// Finish ends a run: after Settle, every pending request must complete once
// cancelled, and everything must release.
func (s *Sim) Finish() {
	s.Settle(3000)
	if s.failed != "" {
		return
	}
	s.own.finish()
	if s.failed != "" {
		return
	}
	s.bc.finish()
	if s.failed != "" {
		return
	}
	s.tracef("--- cancelling what is pending ---")
	for _, l := range s.m.live(0) {
		if l.Pending {
			s.m.cancel(l)
		}
	}
	s.QuiesceDLM(100000)
	for _, l := range s.m.live(0) {
		if l.Pending && s.failed == "" {
			s.fail("lock %d (node %s, %s %s %v) still pending after cancel on a healed, quiet cluster:\n%s",
				l.ID, l.Node, l.Res, l.op, l.Rq, s.Describe())
		}
	}
	s.tracef("--- releasing everything ---")
	for _, l := range s.m.live(0) {
		s.m.unlock(l, 0)
	}
	s.QuiesceDLM(100000)
	if n := len(s.m.locks); n != 0 && s.failed == "" {
		s.fail("%d locks left after releasing everything", n)
	}
	for _, id := range s.ids {
		if n := s.nodes[id]; n.Up && s.failed == "" {
			for _, ri := range n.Sp.Dump() {
				if len(ri.Granted)+len(ri.Converting)+len(ri.Waiting) > 0 {
					s.fail("node %s still lists locks on %s after everything was released: %+v", id, ri.Name, ri)
				}
			}
		}
	}
}

// --- our own tables (not the package's): compatibility, LVB transfers ---

var compat = [6][6]bool{
	//        NL    CR     CW     PR     PW     EX
	/*NL*/ {true, true, true, true, true, true},
	/*CR*/ {true, true, true, true, true, false},
	/*CW*/ {true, true, true, false, false, false},
	/*PR*/ {true, true, false, true, false, false},
	/*PW*/ {true, true, false, false, false, false},
	/*EX*/ {true, false, false, false, false, false},
}

func compatible(a, b dlm.Mode) bool {
	if a == dlm.ModeIV || b == dlm.ModeIV {
		return true
	}
	return compat[a][b]
}

const (
	opNone = iota
	opRead
	opWrite
)

// lvbOp is Linux's dlm_lvb_operations table: from granted mode (IV for a new
// request) to requested mode.
func lvbOp(gr, rq dlm.Mode) int {
	switch {
	case gr == dlm.ModeIV || gr == dlm.NL:
		return opRead
	case gr == dlm.EX || (gr == dlm.PW && rq != dlm.EX):
		return opWrite
	case rq >= gr && !(gr == dlm.PR && rq == dlm.CW):
		return opRead
	}
	return opNone
}

func middle(gr, rq dlm.Mode) bool {
	return (gr == dlm.PR && rq == dlm.CW) || (gr == dlm.CW && rq == dlm.PR)
}

func down(gr, rq dlm.Mode) bool { return !middle(gr, rq) && rq < gr }

// quecvt: QUECVT is for up-conversions only (PR->CW counts as one).
func quecvt(gr, rq dlm.Mode) bool {
	return rq > gr || (gr == dlm.PR && rq == dlm.CW)
}
