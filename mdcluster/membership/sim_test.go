package membership_test

import (
	"cmp"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
	. "github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/membership/apply"
)

// This file is an in-memory cluster for the tests: a seeded network with
// per-pair delay, drops, duplicates and reordering, partitions, a failure
// detector that reflects reachability after a lag, crashes and restarts
// (a restart is a new Agreement built from the persisted hard state), a
// fencer that powers its victim off, and a checker that verifies the
// protocol's invariants after every Ready. The fencer powers its victim off,
// or, with storage fencing, leaves it running cut off from the array: its
// lock state no longer counts and it must come back through a view that
// resets it.
//
// Every node's Ready is carried out by the real apply.Applier, the code the
// daemon's gossip.Runner and the cluster simulator (internal/sim) run; this
// file only implements its effects (a simulated disk, network, fencer and
// lock manager without lockspaces). So the three drivers share one
// convention for what an Install means and when a stop outlasts it.

var traceLines = 80

func init() {
	if s := os.Getenv("MEMBERSHIP_TRACE_LINES"); s != "" {
		fmt.Sscan(s, &traceLines)
	}
}

// traceLog adds the machines' decision logs to the failure trace.
var traceLog = os.Getenv("MEMBERSHIP_TRACE") != ""

type simNode struct {
	id        NodeID
	a         *Agreement
	ap        *apply.Applier // one per incarnation, like the lock manager it drives
	up        bool
	inc       int // incarnation, bumped at every restart
	persisted HardState
	lastGen   uint64 // last installed generation, across restarts (persisted)
	alive     []NodeID
	quorate   bool
	exited    bool
	stopped   uint64
	installs  []Install
	// dlmStopped models the driver's lock manager: stopped at start and by
	// the Applier's StopLockManager (Quorate=false, Stop, and again after
	// an Install on Ready.StopAfterInstall), resumed by its
	// RecoverLockManager. After every Ready it must equal the Agreement's
	// own record (LockManagerStopped).
	dlmStopped bool
	// stoppedAt is the simulated time dlmStopped last became true.
	stoppedAt int64
	// fencedFor is the newest generation this node was fenced for after
	// its last install (0: none since). Like a storage fence, it survives
	// restarts. The next view it installs after that generation must
	// reset it: its old lock state must never merge with the cluster's.
	fencedFor uint64
	// runInstalls counts the views this incarnation installed.
	runInstalls int
	// heardGen is the newest installed generation a peer's message to this
	// incarnation carried (every message carries its sender's).
	heardGen uint64
	// mute models a node alive to the failure detector that never answers
	// agreement messages: it receives nothing and sends nothing.
	mute bool
	// selfFenced is this incarnation's SelfFenced as last seen.
	selfFenced uint64
}

type simEvent struct {
	at   int64
	seq  int64
	kind int // evMsg, evFD, evFence
	from NodeID
	to   NodeID
	inc  int // recipient incarnation the event is for (evFence)
	data []byte
	gen  uint64
	ok   bool
	// belief, for evFD, is a false suspicion: the alive set the node's
	// detector reports instead of the truth (nil: the truth).
	belief []NodeID
}

const (
	evMsg = iota
	evFD
	evFence
)

type simNet struct {
	MaxDelay  int     // messages take 1..MaxDelay ticks
	Drop      float64 // probability a message is lost
	Dup       float64 // probability a message is delivered twice
	FDLag     int     // failure detector catches up 0..FDLag ticks after a change
	FenceFail float64 // probability a fence attempt fails
	FenceLag  int     // fences take 1..FenceLag ticks
	// StorageFence is the probability that a successful fence leaves its
	// victim running (storage fencing) instead of powering it off.
	StorageFence float64
}

type cluster struct {
	t      testing.TB
	rng    *rand.Rand
	q      ddraid.Config
	ids    []NodeID
	nodes  map[NodeID]*simNode
	now    int64
	seq    int64
	events []simEvent
	group  map[NodeID]int // partition group; same group = connected
	net    simNet
	mkCfg  func(Config) Config

	// checker state
	views      map[uint64]Install // first install of each generation
	fenced     map[[2]uint64]bool // (node, gen) fenced ok
	fenceCalls int
	installsN  int
	failed     string
	trace      []string
	// manualFence, when set, leaves fence requests pending in fenceQueue
	// instead of answering them.
	manualFence bool
	fenceQueue  []FenceRequest
}

func newCluster(t testing.TB, seed uint64, q ddraid.Config, extra []NodeID, net simNet) *cluster {
	c := &cluster{
		t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), q: q,
		nodes: map[NodeID]*simNode{}, group: map[NodeID]int{}, net: net,
		views: map[uint64]Install{}, fenced: map[[2]uint64]bool{},
	}
	c.ids = Normalize(append(slices.Clone(q.DataNodes), extra...))
	for _, id := range c.ids {
		c.nodes[id] = &simNode{id: id}
	}
	return c
}

func (c *cluster) config(id NodeID, st HardState) Config {
	cfg := Config{Self: id, Quorum: c.q, State: st, PrepareTimeout: 12}
	if c.mkCfg != nil {
		cfg = c.mkCfg(cfg)
	}
	return cfg
}

// start brings a node up (first boot or restart from its persisted state).
func (c *cluster) start(id NodeID) {
	n := c.nodes[id]
	a, err := New(c.config(id, n.persisted))
	if err != nil {
		c.t.Fatalf("New(%s): %v", id, err)
	}
	n.a, n.up, n.exited, n.quorate, n.stopped = a, true, false, false, 0
	n.runInstalls, n.heardGen, n.selfFenced = 0, 0, 0
	n.dlmStopped, n.stoppedAt = true, c.now // the driver starts its lock manager stopped
	n.inc++
	ap, err := apply.New(apply.Config{Self: id, Effects: nodeEffects{c: c, n: n, inc: n.inc}})
	if err != nil {
		c.t.Fatalf("apply.New(%s): %v", id, err)
	}
	n.ap = ap
	n.alive = []NodeID{id}
	c.tracef("start %s (gen %d)", id, n.persisted.Installed.Gen)
	c.process(n)
	c.fdChanged()
}

func (c *cluster) crash(id NodeID) {
	n := c.nodes[id]
	if !n.up {
		return
	}
	n.up = false
	n.a, n.ap = nil, nil
	c.tracef("crash %s", id)
	c.fdChanged()
}

func (c *cluster) tracef(format string, args ...any) {
	c.trace = append(c.trace, fmt.Sprintf("t=%d ", c.now)+fmt.Sprintf(format, args...))
	if len(c.trace) > 4000 {
		c.trace = c.trace[len(c.trace)-3000:]
	}
}

func (c *cluster) push(e simEvent) {
	c.seq++
	e.seq = c.seq
	c.events = append(c.events, e)
}

func (c *cluster) connected(a, b NodeID) bool { return c.group[a] == c.group[b] }

// truth is what a perfect failure detector would tell node id.
func (c *cluster) truth(id NodeID) []NodeID {
	var out []NodeID
	for _, o := range c.ids {
		if c.nodes[o].up && c.connected(id, o) {
			out = append(out, o)
		}
	}
	return out
}

func (c *cluster) fdChanged() {
	for _, id := range c.ids {
		if c.nodes[id].up {
			lag := 0
			if c.net.FDLag > 0 {
				lag = c.rng.IntN(c.net.FDLag + 1)
			}
			c.push(simEvent{at: c.now + int64(lag), kind: evFD, to: id})
		}
	}
}

// believe makes node id's failure detector believe alive until the next
// detector event for it (a lagging or flapping detector on that node only).
func (c *cluster) believe(id NodeID, alive ...NodeID) {
	n := c.nodes[id]
	n.alive = Normalize(alive)
	c.tracef("%s's detector believes %v", id, n.alive)
	n.a.SetAlive(n.alive)
	c.process(n)
}

// flap makes node id's failure detector falsely suspect the nodes outside
// keep for a while: at a later tick it believes only keep (of those it can
// reach), and its detector corrects itself after ticks more.
func (c *cluster) flap(id NodeID, keep []NodeID, after, ticks int) {
	c.tracef("%s's detector will suspect all but %v for %d ticks", id, keep, ticks)
	c.push(simEvent{at: c.now + int64(after), kind: evFD, to: id, belief: Normalize(append(slices.Clone(keep), id))})
	c.push(simEvent{at: c.now + int64(after+ticks), kind: evFD, to: id})
}

func (c *cluster) partition(groups map[NodeID]int) {
	c.group = groups
	c.tracef("partition %v", groups)
	c.fdChanged()
}

func (c *cluster) heal() { c.partition(map[NodeID]int{}) }

// process drains a node's Ready, checks it and carries it out through the
// node's Applier. Once a Ready is carried out, the lock manager must be
// stopped exactly when the Agreement counted it as stopped when it handed
// the Ready out: a lock manager stopped behind its back would never be
// resumed (only a stopped member asks for the view that resumes it).
func (c *cluster) process(n *simNode) {
	for range 100 {
		if !n.up {
			return
		}
		rd := n.a.Ready()
		if rd.Empty() {
			return
		}
		selfFenced := uint64(0) // a self-fence decided in this Ready
		if g := SelfFenced(n.a); g != 0 {
			c.fenced[[2]uint64{uint64(n.id), g}] = true // it stopped itself (see onAccepted)
			if n.lastGen < g {
				n.fencedFor = max(n.fencedFor, g) // and must rejoin clean, like a fenced node
			}
			if g != n.selfFenced {
				selfFenced, n.selfFenced = g, g
			}
		}
		c.check(n, rd)
		want, inc := n.a.LockManagerStopped(), n.inc
		if err := n.ap.Apply(rd); err != nil {
			c.fail(fmt.Sprintf("node %s: %v", n.id, err))
			return
		}
		if n.up && n.inc == inc {
			c.checkQuorateNotStale(n)
		}
		if n.up && n.inc == inc && selfFenced != 0 && (n.quorate || n.a.Quorate() || !n.dlmStopped) {
			// It stands in for its own fence, so it must be stopped by the
			// time the COMMIT of that view has gone out.
			c.fail(fmt.Sprintf("node %s stood in for its own fence for gen %d, but it is still running (quorate %v/%v, lock manager stopped %v)",
				n.id, selfFenced, n.quorate, n.a.Quorate(), n.dlmStopped))
			return
		}
		if n.up && n.inc == inc && n.dlmStopped != want {
			c.fail(fmt.Sprintf("node %s: its agreement counts its lock manager as stopped=%v, but the applier left it stopped=%v (installs %d, stop %v, %v)",
				n.id, want, n.dlmStopped, len(rd.Install), rd.Stop, rd.StopAfterInstall))
			c.tracef("FAIL: %s", c.failed)
			return
		}
	}
	c.fail(fmt.Sprintf("node %s: Ready never empties", n.id))
}

// nodeEffects are one node incarnation's apply.Effects. Once the incarnation
// is gone they do nothing.
type nodeEffects struct {
	c   *cluster
	n   *simNode
	inc int
}

func (e nodeEffects) live() bool { return e.n.up && e.n.inc == e.inc }

func (e nodeEffects) Persist(hs HardState) error {
	if e.live() {
		e.n.persisted = hs // Ready hands out its own copy
	}
	return nil
}

func (e nodeEffects) StopLockManager(st apply.Stop) {
	if !e.live() {
		return
	}
	if st.Change != nil {
		e.n.stopped = st.Change.Gen
	}
	if !e.n.dlmStopped {
		e.n.dlmStopped, e.n.stoppedAt = true, e.c.now
	}
}

func (e nodeEffects) Send(m Outgoing) {
	if e.live() {
		e.c.sendMsg(e.n.id, m)
	}
}

func (e nodeEffects) RecoverLockManager(rc apply.Recovery) error {
	if !e.live() {
		return fmt.Errorf("node %s is down", e.n.id)
	}
	e.n.installs = append(e.n.installs, rc.Install)
	e.n.runInstalls++
	e.n.lastGen = rc.Gen
	e.n.dlmStopped = false
	return nil
}

func (e nodeEffects) RequestFence(f FenceRequest) {
	if !e.live() {
		return
	}
	c, n := e.c, e.n
	c.fenceCalls++
	if c.manualFence {
		c.fenceQueue = append(c.fenceQueue, f)
		return
	}
	lag := 1
	if c.net.FenceLag > 1 {
		lag += c.rng.IntN(c.net.FenceLag)
	}
	ok := c.rng.Float64() >= c.net.FenceFail
	c.push(simEvent{at: c.now + int64(lag), kind: evFence, from: f.Node, to: n.id, inc: n.inc, gen: f.Gen, ok: ok})
}

func (e nodeEffects) QuorumChanged(q bool) {
	if e.live() {
		e.n.quorate = q
	}
}

// RecoveryDone: this lock manager has no lockspaces, so its recovery is
// done at once; the Agreement hears it as the daemon's would.
func (e nodeEffects) RecoveryDone(gen uint64) {
	if e.live() {
		e.n.a.RecoveryDone(gen)
	}
}

func (e nodeEffects) Exited() {
	if e.live() {
		e.n.exited = true
		e.c.tracef("%s exited", e.n.id)
		e.c.crash(e.n.id) // the daemon shuts down after a graceful leave
	}
}

func (e nodeEffects) Log(ev Event) {
	if traceLog && ev.Level >= slog.LevelInfo {
		e.c.tracef("%s: %s %v", e.n.id, ev.Msg, ev.Attrs)
	}
}

func (c *cluster) sendMsg(from NodeID, m Outgoing) {
	if c.nodes[from].mute {
		return
	}
	copies := 1
	if c.rng.Float64() < c.net.Dup {
		copies = 2
	}
	for range copies {
		if c.rng.Float64() < c.net.Drop {
			continue
		}
		d := 1
		if c.net.MaxDelay > 1 {
			d += c.rng.IntN(c.net.MaxDelay)
		}
		c.push(simEvent{at: c.now + int64(d), kind: evMsg, from: from, to: m.To, data: m.Payload})
	}
}

// deliverDue runs every event due now, in time order (ties in send order).
func (c *cluster) deliverDue() {
	for {
		i := -1
		for j, e := range c.events {
			if e.at <= c.now && (i < 0 || cmp.Or(cmp.Compare(e.at, c.events[i].at), cmp.Compare(e.seq, c.events[i].seq)) < 0) {
				i = j
			}
		}
		if i < 0 {
			return
		}
		e := c.events[i]
		c.events = slices.Delete(c.events, i, i+1)
		c.deliver(e)
		if c.failed != "" {
			return
		}
	}
}

func (c *cluster) deliver(e simEvent) {
	n := c.nodes[e.to]
	if !n.up {
		return
	}
	switch e.kind {
	case evMsg:
		// Partitions cut messages at delivery time too.
		if !c.connected(e.from, e.to) || n.mute {
			return
		}
		if g, err := MessageGen(e.data); err == nil {
			n.heardGen = max(n.heardGen, g)
		}
		if err := n.a.Step(e.from, e.data); err != nil {
			c.fail(fmt.Sprintf("node %s: Step from %s: %v", e.to, e.from, err))
			return
		}
	case evFD:
		n.alive = c.truth(e.to)
		if e.belief != nil {
			n.alive = Intersect(n.alive, e.belief)
		}
		n.a.SetAlive(n.alive)
	case evFence:
		if e.inc != n.inc {
			return // the requester restarted; its fence request died with it
		}
		if e.ok {
			// No draw without storage fencing: seeds without it replay as before.
			powerOff := c.net.StorageFence == 0 || c.rng.Float64() >= c.net.StorageFence
			c.fenceDone(e.from, e.gen, powerOff)
		} else {
			c.tracef("%s: fence of %s failed", e.to, e.from)
		}
		n.a.FenceResult(e.from, e.ok)
	}
	c.process(n)
}

// fenceDone records a successful fence of victim for view gen. powerOff
// crashes a running victim; otherwise (storage fencing) it runs on, cut off
// from the array until a view resets it.
func (c *cluster) fenceDone(victim NodeID, gen uint64, powerOff bool) {
	v := c.nodes[victim]
	c.fenced[[2]uint64{uint64(victim), gen}] = true
	if v.lastGen < gen {
		v.fencedFor = max(v.fencedFor, gen)
	}
	if powerOff {
		c.tracef("fenced %s for gen %d (powered off)", victim, gen)
		if v.up {
			c.crash(victim)
		}
		return
	}
	c.tracef("fenced %s for gen %d (storage: it runs on)", victim, gen)
}

// step advances the simulation by one tick.
func (c *cluster) step() {
	c.now++
	c.deliverDue()
	for _, id := range c.ids {
		if n := c.nodes[id]; n.up && c.failed == "" {
			n.a.Tick()
			c.process(n)
		}
	}
}

func (c *cluster) run(ticks int) {
	for range ticks {
		if c.failed != "" {
			return
		}
		c.step()
	}
}

// runUntil steps until cond holds (true) or the budget runs out (false).
func (c *cluster) runUntil(ticks int, cond func() bool) bool {
	for range ticks {
		if c.failed != "" {
			return false
		}
		if cond() {
			return true
		}
		c.step()
	}
	return cond()
}

func (c *cluster) fail(msg string) {
	if c.failed == "" {
		c.failed = msg
	}
}

// check verifies a node's Ready against the invariants.
func (c *cluster) check(n *simNode, rd Ready) {
	believedQuorate := c.q.Quorate(n.alive)
	for _, in := range rd.Install {
		c.installsN++
		c.tracef("%s installs gen %d %v prev %d departed %v left %v joined %v rejoined %v reset %v",
			n.id, in.View.Gen, in.View.Members, in.Prev.Gen, in.Departed, in.Left, in.Joined, in.Rejoined, in.Reset)
		if in.View.Gen <= n.lastGen {
			c.fail(fmt.Sprintf("node %s installed gen %d after gen %d: installs not monotonic", n.id, in.View.Gen, n.lastGen))
		}
		if !in.View.Contains(n.id) {
			c.fail(fmt.Sprintf("node %s installed gen %d without being a member", n.id, in.View.Gen))
		}
		if !believedQuorate {
			c.fail(fmt.Sprintf("node %s installed gen %d while its alive set %v is not quorate", n.id, in.View.Gen, n.alive))
		}
		if !c.q.Quorate(in.View.Members) {
			c.fail(fmt.Sprintf("node %s installed gen %d %v, which is not quorate", n.id, in.View.Gen, in.View.Members))
		}
		fresh := n.lastGen == 0 && !in.Prev.Contains(n.id) // a brand-new node has no state to reset
		if !in.Reset && in.Prev.Gen != n.lastGen && !fresh {
			c.fail(fmt.Sprintf("node %s installed gen %d (prev %d) without reset, but its last view is %d: skipped a view",
				n.id, in.View.Gen, in.Prev.Gen, n.lastGen))
		}
		if in.View.Gen > 0 && slices.Contains(in.Rejoined, n.id) && !in.Reset {
			c.fail(fmt.Sprintf("node %s is listed as rejoined in gen %d (others drop its old state) but keeps its own", n.id, in.View.Gen))
		}
		if g := n.fencedFor; g != 0 && in.View.Gen > g {
			// Fenced after its last install: the first view after the
			// fencing one must readmit it clean.
			if !in.Reset {
				c.fail(fmt.Sprintf("node %s was fenced for gen %d after its last install (gen %d), and installed gen %d (prev %d) without reset",
					n.id, g, n.lastGen, in.View.Gen, in.Prev.Gen))
			}
			n.fencedFor = 0
		}
		if prev, ok := c.views[in.View.Gen]; ok {
			if !prev.View.Equal(in.View) || !prev.Prev.Equal(in.Prev) {
				c.fail(fmt.Sprintf("gen %d: node %s installed %v (prev %d %v), another node %v (prev %d %v): disagreement",
					in.View.Gen, n.id, in.View.Members, in.Prev.Gen, in.Prev.Members, prev.View.Members, prev.Prev.Gen, prev.Prev.Members))
			}
		} else {
			// The views form one chain: nothing installed between this
			// view's predecessor and itself, and this view does not fall
			// between another view and its predecessor.
			for g, v := range c.views {
				if g > in.Prev.Gen && g < in.View.Gen {
					c.fail(fmt.Sprintf("gen %d succeeds gen %d, but gen %d was installed in between", in.View.Gen, in.Prev.Gen, g))
				}
				if in.View.Gen > v.Prev.Gen && in.View.Gen < g {
					c.fail(fmt.Sprintf("gen %d installed between gen %d and its predecessor %d", in.View.Gen, g, v.Prev.Gen))
				}
			}
			if in.Prev.Gen != 0 {
				if p, ok := c.views[in.Prev.Gen]; ok && !p.View.Equal(in.Prev) {
					c.fail(fmt.Sprintf("gen %d names prev %v, but gen %d was installed as %v", in.View.Gen, in.Prev, in.Prev.Gen, p.View))
				}
			}
			c.views[in.View.Gen] = CloneInstall(in)
		}
		for _, d := range in.Departed {
			if !c.fenced[[2]uint64{uint64(d), in.View.Gen}] {
				c.fail(fmt.Sprintf("node %s installed gen %d removing failed node %s, which was not fenced for it", n.id, in.View.Gen, d))
			}
		}
		n.lastGen = in.View.Gen
	}
	for _, f := range rd.Fence {
		if !believedQuorate {
			c.fail(fmt.Sprintf("node %s asked to fence %s while its alive set %v is not quorate", n.id, f.Node, n.alive))
		}
		if f.Node == n.id {
			c.fail(fmt.Sprintf("node %s asked to fence itself", n.id))
		}
	}
	if rd.Quorate != nil && *rd.Quorate && !believedQuorate {
		c.fail(fmt.Sprintf("node %s reported quorate with alive set %v", n.id, n.alive))
	}
	if c.failed != "" {
		c.tracef("FAIL: %s", c.failed)
	}
}

// checkQuorateNotStale verifies, once a Ready is carried out, that a node
// reporting quorate does so in a view it may act in: one this incarnation
// installed (a restarted node's persisted view is not: its lock state is
// gone and the others may have moved on without it), and not older than a
// view a peer told it it has installed (the cluster has moved on: it was
// left out, or it still has to catch up).
func (c *cluster) checkQuorateNotStale(n *simNode) {
	if !n.quorate {
		return
	}
	gen := n.a.View().Gen
	switch {
	case n.runInstalls == 0:
		c.fail(fmt.Sprintf("node %s reports quorate in its persisted view gen %d before this run installed any view", n.id, gen))
	case n.heardGen > gen:
		c.fail(fmt.Sprintf("node %s reports quorate in gen %d although a peer told it it has installed gen %d", n.id, gen, n.heardGen))
	}
	if c.failed != "" {
		c.tracef("FAIL: %s", c.failed)
	}
}

func (c *cluster) dumpTrace() string {
	start := max(0, len(c.trace)-traceLines)
	return strings.Join(c.trace[start:], "\n")
}

// converged reports whether every up node installed the same view whose
// members are exactly the up nodes, and nobody is mid-change.
func (c *cluster) converged() bool {
	var want []NodeID
	for _, id := range c.ids {
		if c.nodes[id].up {
			want = append(want, id)
		}
	}
	var gen uint64
	for _, id := range want {
		n := c.nodes[id]
		v := n.a.View()
		if !slices.Equal(v.Members, want) || (gen != 0 && v.Gen != gen) || !n.quorate {
			return false
		}
		gen = v.Gen
		if Phase(n.a) != "idle" {
			return false
		}
	}
	return gen != 0
}

// stoppedNodes lists the up nodes whose lock manager is stopped: they had a
// Stop or Quorate=false (or just started) and no Install since.
func (c *cluster) stoppedNodes() []NodeID {
	var out []NodeID
	for _, id := range c.ids {
		if n := c.nodes[id]; n.up && n.dlmStopped {
			out = append(out, id)
		}
	}
	return out
}

// detectorsSettled reports whether every up node's failure detector tells
// the truth and no detector update is still on its way.
func (c *cluster) detectorsSettled() bool {
	for _, e := range c.events {
		if e.kind == evFD && c.nodes[e.to].up {
			return false
		}
	}
	for _, id := range c.ids {
		if n := c.nodes[id]; n.up && !slices.Equal(n.alive, c.truth(id)) {
			return false
		}
	}
	return true
}

func (c *cluster) describe() string {
	var b strings.Builder
	for _, id := range c.ids {
		n := c.nodes[id]
		if !n.up {
			fmt.Fprintf(&b, "  %s down (gen %d)\n", id, n.lastGen)
			continue
		}
		v := n.a.View()
		fmt.Fprintf(&b, "  %s gen %d %v quorate=%v phase=%s alive=%v restarted=%v promised=%d dlm_stopped=%v (since t=%d, last stop ballot %d)\n",
			id, v.Gen, v.Members, n.quorate, Phase(n.a), n.alive, Restarted(n.a), n.a.HardState().Promised, n.dlmStopped, n.stoppedAt, n.stopped)
	}
	return b.String()
}
