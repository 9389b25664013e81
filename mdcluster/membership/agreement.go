package membership

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"

	"github.com/mdcluster/mdcluster/ddraid"
)

// Config configures one node's Agreement. Tick-based durations are counted
// in calls to Tick; the driver picks the tick length (the daemon uses a few
// tens of milliseconds).
type Config struct {
	// Self is this node. It must not be ddraid.NoNode.
	Self NodeID
	// Quorum is the cluster's ddraid quorum configuration. Only its data
	// nodes count towards quorum; other nodes may be members too.
	Quorum ddraid.Config
	// State is the hard state persisted by the previous run of this node
	// (zero for a node that never ran). A node that restarts while it was a
	// member announces that it lost its lock state and is readmitted clean.
	State HardState
	// PrepareTimeout is how many ticks a coordinator waits for all answers
	// to one phase before it drops the silent nodes and retries under a
	// higher ballot. Default 10.
	PrepareTimeout int
	// RetransmitTicks is how often unanswered PREPARE, ACCEPT and COMMIT
	// messages are sent again (the transport may drop them). Default 2.
	RetransmitTicks int
	// FenceRetryTicks is the wait before a failed fence is asked for again.
	// Default 5.
	FenceRetryTicks int
	// SilentTicks is how often the coordinator asks (with a HELLO) a node
	// that stayed silent through a phase whether it is there. Such a node
	// is left out of new proposals, although the failure detector still
	// lists it, until it sends an agreement message (any: the answer to
	// that HELLO, or its own); it is removed once and does not come and
	// go. Default 5*PrepareTimeout.
	SilentTicks int
	// HelloTicks is how often a leaving node repeats its LEAVE and a
	// restarted node its HELLO. Default 5.
	HelloTicks int
	// StartupFenceAfter is how long, after a restart as a member of its
	// persisted view, this node (as coordinator) waits for the other
	// members of that view to come back before it proposes a view without
	// them, which fences them (dlm_controld's post_join_delay). A whole
	// cluster that restarts together then forms its first view with every
	// member instead of fencing the slowest to boot; one that does not
	// come back within it is fenced before any view leaving it out is
	// installed. Zero or negative: no wait (node.DefaultLANConfig and
	// StorageLANConfig wait 3 × PrepareTimeout).
	StartupFenceAfter int
}

func (c *Config) setDefaults() {
	if c.PrepareTimeout <= 0 {
		c.PrepareTimeout = 10
	}
	if c.RetransmitTicks <= 0 {
		c.RetransmitTicks = 2
	}
	if c.FenceRetryTicks <= 0 {
		c.FenceRetryTicks = 5
	}
	if c.SilentTicks <= 0 {
		c.SilentTicks = 5 * c.PrepareTimeout
	}
	if c.HelloTicks <= 0 {
		c.HelloTicks = 5
	}
	if c.StartupFenceAfter < 0 {
		c.StartupFenceAfter = 0
	}
}

type phase int

const (
	idle phase = iota
	preparing
	accepting
	fencing
)

func (p phase) String() string {
	return [...]string{"idle", "preparing", "accepting", "fencing"}[p]
}

type report struct {
	installed Proposal
	accepted  *Accepted
	restarted bool
	leaving   bool
}

type fenceState struct {
	done, outstanding bool
	retryAt           int64
	attempts          int
}

// commitState tracks the last view this node committed as coordinator:
// who has installed it and who finished recovery for it.
type commitState struct {
	acceptors   []NodeID
	ballot      uint64
	value, base Proposal
	acked       map[NodeID]bool
	done        map[NodeID]bool
	lastSend    int64
	allDone     bool
}

// Agreement is one node's view-agreement state machine. See the package
// documentation and docs/membership.md for the protocol. It is not safe for
// concurrent use: the driver serialises all calls.
type Agreement struct {
	cfg   Config
	hs    HardState
	dirty bool
	tick  int64
	stats Stats

	alive     []NodeID // failure detector's belief, sorted, includes self
	restarted bool     // this run started from a state in which self was a member
	// rejoining: this run started as a member of its persisted view and
	// has installed no view since. That view is not one it may act in (its
	// lock state is gone, and the cluster may have moved on without it), so
	// it is not quorate until a view is installed.
	rejoining bool
	// peerGen is the newest generation this node has learned was installed
	// or chosen elsewhere: the sender's installed generation that every
	// message carries, and the chosen views an ACCEPT, COMMIT or PREPARED
	// names. Once it is above this node's installed view, the cluster has
	// moved on (without this node, or this node missed the commit) and the
	// node is not quorate until it installs a view at least that new.
	peerGen  uint64
	leaving  bool
	left     bool
	excluded bool // a newer view without this node exists
	// behind is the newest generation a peer said (in a HELLO) it has
	// installed, when that is newer than this node's own view: the cluster
	// moved on without this node and it missed the COMMIT that removed it.
	behind uint64
	// selfFenced is the generation of a view this coordinator completed
	// although it named this node as failed (see onAccepted).
	selfFenced uint64
	stopped    uint64 // ballot of the last Stop emitted
	quorate    bool
	// suspended is this machine's record of the driver's lock manager:
	// stopped (since start, a Stop or a loss of quorum) and not resumed by
	// an Install since. It follows the machine's own order of events: a
	// Stop or a loss of quorum sets it, an Install clears it only if the
	// node is quorate after it. Where an Install and a later stop share one
	// Ready, the driver carries out the Install after the stop and must
	// stop again (Ready.StopAfterInstall), so the record and the lock
	// manager agree. The lock manager resumes only through an Install, and
	// recovery needs every member, so a member in this state asks for a new
	// view (see wantsView).
	suspended bool
	// afterInstall says why the lock manager is stopped again after the
	// last Install of the Ready being built (Ready.StopAfterInstall).
	afterInstall StopAfterInstall
	// quietSince is the tick of the last sign that a change is under way
	// (a PREPARE or ACCEPT this node answered, a Stop) or that quorum came
	// back; a suspended member waits 2*PrepareTimeout ticks from it before
	// it asks for a new view, so it does not disturb a change in progress.
	quietSince int64
	committer  NodeID // who committed our installed view (DONE goes there)

	// Coordinator state.
	phase          phase
	ballot         uint64
	maxSeen        uint64
	targets        []NodeID
	answers        map[NodeID]report
	acks           map[NodeID]bool
	value, base    Proposal
	adopted        bool
	phaseStart     int64
	lastSend       int64
	retryAt        int64
	deferUntil     int64
	fences         map[NodeID]*fenceState
	commit         *commitState
	silent         map[NodeID]int64 // node left out for silence → tick of its next HELLO
	leavers        map[NodeID]bool
	leaveGen       map[NodeID]uint64 // leaver → generation its LEAVE was sent from
	restartedPeer  map[NodeID]bool
	readmitted     map[NodeID]uint64 // node → generation of the view that last (re)admitted it
	lagging        map[NodeID]bool   // members that said they missed a view
	stoppedPeer    map[NodeID]uint64 // member → generation in which it said its lock manager is stopped
	acceptedAt     int64             // tick at which the pending accepted value was accepted
	acceptedRun    uint64            // generation of the last value this run (not an earlier one) accepted
	lastNotQuorate string
	// bootPromised is the ballot promised in the persisted state this run
	// started from: an earlier run of this node answered no ballot above
	// it (the promise is durable before the answer is sent).
	bootPromised uint64
	// startupMembers are the other members of the persisted view this node
	// restarted in; until they are all seen, StartupFenceAfter ticks have
	// passed or a newer view is installed, no view leaving one of them out
	// is proposed.
	startupMembers []NodeID
	startupWaitLog bool

	ready Ready
	inbox [][]byte
}

// New validates cfg and returns the node's machine. The failure detector's
// belief starts as just Self; call SetAlive once it knows more.
func New(cfg Config) (*Agreement, error) {
	if cfg.Self == ddraid.NoNode {
		return nil, errors.New("membership: Config.Self is not set")
	}
	if err := cfg.Quorum.Validate(); err != nil {
		return nil, fmt.Errorf("membership: node %s: quorum configuration: %w", cfg.Self, err)
	}
	if err := checkProposal(cfg.State.Installed, true); err != nil {
		return nil, fmt.Errorf("membership: node %s: persisted view: %w", cfg.Self, err)
	}
	if a := cfg.State.Accepted; a != nil {
		if err := checkAccepted(*a); err != nil {
			return nil, fmt.Errorf("membership: node %s: persisted accepted proposal: %w", cfg.Self, err)
		}
	}
	cfg.setDefaults()
	a := &Agreement{
		cfg:           cfg,
		hs:            cloneHardState(cfg.State),
		alive:         []NodeID{cfg.Self},
		answers:       map[NodeID]report{},
		acks:          map[NodeID]bool{},
		silent:        map[NodeID]int64{},
		leavers:       map[NodeID]bool{},
		leaveGen:      map[NodeID]uint64{},
		restartedPeer: map[NodeID]bool{},
		readmitted:    map[NodeID]uint64{},
		lagging:       map[NodeID]bool{},
		stoppedPeer:   map[NodeID]uint64{},
		suspended:     true, // the driver starts its lock manager stopped
	}
	a.maxSeen = max(a.hs.Promised, a.hs.Installed.Gen)
	a.bootPromised = a.hs.Promised
	if a.hs.Installed.Gen > 0 && contains(a.hs.Installed.Members, cfg.Self) {
		a.restarted, a.rejoining = true, true
		if cfg.StartupFenceAfter > 0 {
			a.startupMembers = minus(a.hs.Installed.Members, []NodeID{cfg.Self})
		}
		a.log(slog.LevelWarn, "restarted as a member of a persisted view; lock state is lost, asking to be readmitted clean; not quorate until a view is installed",
			slog.Uint64("gen", a.hs.Installed.Gen))
	}
	return a, nil
}

// View returns the last installed view (generation 0 if none).
func (a *Agreement) View() View {
	v := a.hs.Installed.View()
	v.Members = slices.Clone(v.Members)
	return v
}

// HardState returns a copy of the state the driver must persist.
func (a *Agreement) HardState() HardState { return cloneHardState(a.hs) }

// Stats returns the drop counters.
func (a *Agreement) Stats() Stats { return a.stats }

// Coordinating reports whether this node currently considers itself the
// coordinator (lowest live node of a quorate alive set).
func (a *Agreement) Coordinating() bool { return a.isCoordinator() }

// Quorate reports the local quorum status last announced in Ready.Quorate.
func (a *Agreement) Quorate() bool { return a.quorate }

// Ready returns what the driver must do now and clears it.
func (a *Agreement) Ready() Ready {
	r := a.ready
	if a.dirty {
		st := cloneHardState(a.hs)
		r.State = &st
		a.dirty = false
	}
	a.ready = Ready{}
	if len(r.Install) > 0 && a.suspended {
		// The driver acts on Stop and Quorate=false before Install; a stop
		// that came after the last Install (or a quorum still missing
		// after it) must outlast that Install's recovery.
		sa := a.afterInstall
		if sa.Change != nil {
			sa.Change = &View{Gen: sa.Change.Gen, Members: slices.Clone(sa.Change.Members)}
		}
		r.StopAfterInstall = &sa
	}
	a.afterInstall = StopAfterInstall{}
	return r
}

// LockManagerStopped reports whether this node's lock manager is stopped
// once the driver has carried out the Readies taken so far: since it
// started, or since a Stop or a loss of quorum, no Install has resumed it
// (an Install resumes it only if the node is quorate after it, and not if
// a stop came after it in the same Ready: see Ready.StopAfterInstall). A
// quorate member in this state asks for a new view to resume through
// (HELLO with the stopped flag, see docs/membership.md). Call it right
// after Ready: events after that are not carried out yet.
func (a *Agreement) LockManagerStopped() bool { return a.suspended }

// SetAlive replaces the failure detector's belief of which nodes are alive.
// Self is always counted as alive (until it has left). Losing quorum takes
// effect at once: Ready.Quorate becomes false in the same call.
func (a *Agreement) SetAlive(alive []NodeID) {
	al := normalize(alive)
	if !a.left && !contains(al, a.cfg.Self) {
		al = normalize(append(al, a.cfg.Self))
	}
	if !slices.Equal(al, a.alive) {
		a.log(slog.LevelDebug, "failure detector changed", slog.Any("alive", al))
	}
	a.alive = al
	for _, m := range []map[NodeID]bool{a.leavers, a.restartedPeer, a.lagging} {
		for id := range m {
			if !contains(al, id) {
				delete(m, id)
			}
		}
	}
	for id := range a.silent {
		if !contains(al, id) {
			delete(a.silent, id)
		}
	}
	for id := range a.stoppedPeer {
		if !contains(al, id) {
			delete(a.stoppedPeer, id)
		}
	}
	a.updateQuorum()
	a.checkRole()
	a.run()
}

// Tick advances the machine's clock by one tick: timeouts, retransmissions,
// fence retries, and starting a change when one is due.
func (a *Agreement) Tick() {
	a.tick++
	if a.left {
		return
	}
	h := int64(a.cfg.HelloTicks)
	if a.leaving && a.tick%h == 0 {
		a.broadcastLeave()
	}
	if acc := a.hs.Accepted; acc != nil && acc.Value.Gen > a.hs.Installed.Gen &&
		a.tick-a.acceptedAt >= 2*int64(a.cfg.PrepareTimeout) && a.tick%h == 0 && !a.isCoordinator() {
		// Accepted a view long ago and never saw it committed: its
		// coordinator may have died after committing to the others. Ask
		// to be brought up to date.
		for _, id := range a.alive {
			if id != a.cfg.Self {
				a.send(id, message{Type: mHello})
			}
		}
	}
	if a.wantsView() && a.tick%h == 0 && !a.isCoordinator() {
		// Stopped (lost quorum, or a change stopped it and was abandoned)
		// and nothing under way: the view is unchanged, so the
		// coordinator sees no reason for a change. Ask for one: this
		// node can resume only by recovering a new view together with
		// every member.
		for _, id := range a.alive {
			if id != a.cfg.Self {
				a.send(id, message{Type: mHello, Stopped: true})
			}
		}
	}
	if c := a.believedCoordinator(); a.tick%h == 0 && c != ddraid.NoNode && c != a.cfg.Self &&
		contains(a.hs.Installed.Members, a.cfg.Self) && !contains(a.hs.Installed.Members, c) &&
		a.tick-a.quietSince >= 2*int64(a.cfg.PrepareTimeout) {
		// The node this one takes for the coordinator is not a member of
		// its view, and no change has been under way for a while. It may
		// not know that view: it was cut off, and the COMMIT that removed
		// it (sent to the members only) never reached it. Then it holds
		// an older view with the same members it sees alive, finds
		// nothing to change, and nobody else may coordinate. Tell it this
		// node's generation: it runs a change that readmits it.
		a.send(c, message{Type: mHello})
	}
	if a.restarted && a.tick%h == 0 {
		// Tell everyone: any of them may be (or become) the coordinator,
		// and each must forget that an earlier run of this node was leaving.
		for _, id := range a.alive {
			if id != a.cfg.Self {
				a.send(id, message{Type: mHello, Restarted: true})
			}
		}
	}
	a.checkRole()
	switch a.phase {
	case preparing, accepting:
		a.phaseTick()
	case fencing:
		a.requestFences()
	}
	a.commitTick()
	for _, id := range sortedKeys(a.silent) {
		if a.tick >= a.silent[id] {
			// Still left out: it is readmitted only once it says something
			// (any message does, see handle). Ask it, so that a node that
			// was merely slow answers; one that never answers costs one
			// HELLO every SilentTicks and no view change.
			a.silent[id] = a.tick + int64(a.cfg.SilentTicks)
			a.send(id, message{Type: mHello})
		}
	}
	a.run()
}

// Step processes one message from a peer. A payload that does not decode
// is refused with an error and changes nothing.
func (a *Agreement) Step(from NodeID, payload []byte) error {
	if from == ddraid.NoNode {
		a.stats.Malformed++
		return fmt.Errorf("membership: node %s: message from node 0: %w", a.cfg.Self, ErrMalformed)
	}
	m, err := decodeMessage(payload)
	if err != nil {
		a.stats.Malformed++
		return fmt.Errorf("membership: node %s: from %s: %w", a.cfg.Self, from, err)
	}
	a.handle(from, m)
	a.notePeerGen(from, m)
	a.run()
	return nil
}

// notePeerGen learns from a peer's message which generations exist
// elsewhere: the sender's installed view, and the chosen views it names.
// It runs after the message was handled, so a COMMIT that this node
// installs does not count as news. A generation above this node's view
// means it was left behind: it stops calling itself quorate in that view
// (see updateQuorum) until it installs one at least that new.
func (a *Agreement) notePeerGen(from NodeID, m message) {
	g := genIn(m)
	in := a.hs.Installed.Gen
	if g <= in || g <= a.peerGen {
		return
	}
	first := a.peerGen <= in
	a.peerGen = g
	if first && !a.left {
		a.log(slog.LevelWarn, "the cluster has moved to a newer view than this node's: this node was left behind; not quorate until it installs a view that includes it",
			slog.Any("node", from), slog.Uint64("cluster_gen", g), slog.Uint64("gen", in), slog.String("type", m.Type.String()))
	}
	a.updateQuorum()
}

// genIn is the newest generation message m shows installed or chosen
// somewhere: the sender's installed view, and the chosen views it names.
func genIn(m message) uint64 {
	g := m.Gen
	switch m.Type {
	case mPrepared:
		g = max(g, m.Installed.Gen)
	case mAccept:
		g = max(g, m.Base.Gen)
	case mCommit:
		g = max(g, m.Base.Gen, m.Value.Gen)
	}
	return g
}

// knownGen is the newest generation this node knows exists elsewhere,
// counting message m that is being handled (notePeerGen notes it only
// after).
func (a *Agreement) knownGen(m message) uint64 { return max(a.peerGen, genIn(m)) }

// superseded reports whether view gen is older than knownGen(m).
// Installed, such a view would leave the node not quorate (updateQuorum)
// while its DLM recovery, which may grant at once, resumes the lock
// manager for the length of the Ready: the same reason not to install it
// as a view in which too few members are alive.
func (a *Agreement) superseded(gen uint64, m message) bool { return gen < a.knownGen(m) }

// FenceResult reports the outcome of a Ready.Fence request. A failure is
// asked for again after FenceRetryTicks; nothing is installed until every
// failed node of the change has been fenced.
func (a *Agreement) FenceResult(node NodeID, ok bool) {
	f := a.fences[node]
	if a.phase != fencing || f == nil || !f.outstanding {
		a.log(slog.LevelWarn, "fence result for a fence not pending, ignored", slog.Any("node", node), slog.Bool("ok", ok))
		a.run()
		return
	}
	f.outstanding = false
	if ok {
		f.done = true
		a.log(slog.LevelInfo, "node fenced", slog.Any("node", node), slog.Uint64("gen", a.value.Gen), slog.Int("attempt", f.attempts))
		if a.allFenced() {
			a.commitValue()
		}
	} else {
		f.retryAt = a.tick + int64(a.cfg.FenceRetryTicks)
		a.log(slog.LevelWarn, "fencing failed; will retry, and nothing is installed until it succeeds",
			slog.Any("node", node), slog.Uint64("gen", a.value.Gen), slog.Int("attempt", f.attempts),
			slog.Int("retry_in_ticks", a.cfg.FenceRetryTicks))
	}
	a.run()
}

// RecoveryDone reports that DLM recovery for view gen finished on this
// node. The coordinator that committed the view collects these to log when
// the whole cluster has resumed.
func (a *Agreement) RecoveryDone(gen uint64) {
	if gen != a.hs.Installed.Gen || a.committer == ddraid.NoNode {
		a.log(slog.LevelDebug, "recovery done for a view that is not current, ignored", slog.Uint64("gen", gen))
	} else {
		a.send(a.committer, message{Type: mDone, ViewGen: gen})
	}
	a.run()
}

// Leave starts a graceful leave. The driver calls it after it has stopped
// I/O and released this node's locks: the node is then removed from the
// view without being fenced. It keeps answering the protocol until a
// committed view without it arrives (Ready.Exited); only then may it stop.
func (a *Agreement) Leave() {
	if a.leaving || a.left {
		a.run()
		return
	}
	if !contains(a.hs.Installed.Members, a.cfg.Self) {
		a.left = true
		a.ready.Exited = true
		a.log(slog.LevelInfo, "left (was not a member of any view)")
		a.updateQuorum()
		a.run()
		return
	}
	a.leaving = true
	a.abort("leaving the cluster")
	a.log(slog.LevelInfo, "leaving gracefully", slog.Uint64("gen", a.hs.Installed.Gen))
	a.updateQuorum()
	a.broadcastLeave()
	a.run()
}

// run delivers self-addressed messages and starts a change when one is due,
// until nothing more happens.
func (a *Agreement) run() {
	for range 64 {
		a.drain()
		before := a.phase
		a.maybeStart()
		if a.phase == before && len(a.inbox) == 0 {
			return
		}
	}
}

func (a *Agreement) drain() {
	for len(a.inbox) > 0 {
		p := a.inbox[0]
		a.inbox = a.inbox[1:]
		m, err := decodeMessage(p)
		if err != nil {
			panic(fmt.Sprintf("membership: own message does not decode: %v", err)) // a bug in encodeMessage
		}
		a.handle(a.cfg.Self, m)
	}
}

func (a *Agreement) send(to NodeID, m message) {
	m.Gen = a.hs.Installed.Gen
	p := encodeMessage(m)
	if to == a.cfg.Self {
		a.inbox = append(a.inbox, p)
		return
	}
	a.ready.Messages = append(a.ready.Messages, Outgoing{To: to, Payload: p})
}

func (a *Agreement) log(level slog.Level, msg string, attrs ...slog.Attr) {
	a.ready.Log = append(a.ready.Log, Event{Level: level, Msg: msg, Attrs: attrs})
}

func (a *Agreement) stale(from NodeID, m message, why string) {
	a.stats.Stale++
	a.log(slog.LevelDebug, "dropped stale message", slog.String("type", m.Type.String()), slog.Any("from", from),
		slog.Uint64("sender_gen", m.Gen), slog.Uint64("ballot", m.Ballot), slog.String("why", why))
}

func (a *Agreement) handle(from NodeID, m message) {
	if _, ok := a.silent[from]; ok && from != a.cfg.Self {
		delete(a.silent, from)
		a.log(slog.LevelInfo, "heard from a node left out for silence; readmitting it", slog.Any("node", from))
	}
	switch m.Type {
	case mPrepare:
		a.onPrepare(from, m)
	case mPrepared:
		a.onPrepared(from, m)
	case mAccept:
		a.onAccept(from, m)
	case mAccepted:
		a.onAccepted(from, m)
	case mNack:
		a.onNack(from, m)
	case mCommit:
		a.onCommit(from, m)
	case mCommitted, mDone:
		a.onAck(from, m)
	case mLeave:
		a.onLeave(from, m)
	case mHello:
		a.onHello(from, m)
	}
}

// ---- acceptor side ----

// promiseOK decides whether this node may answer ballot b from a
// coordinator: never below its promise, and a ballot equal to its promise
// only for the coordinator it promised it to.
func (a *Agreement) promiseOK(from NodeID, b uint64) bool {
	return b > a.hs.Promised || (b == a.hs.Promised && a.hs.PromisedTo == from)
}

func (a *Agreement) promise(from NodeID, b uint64) {
	if b > a.hs.Promised {
		a.hs.Promised, a.hs.PromisedTo = b, from
		a.dirty = true
	}
	a.maxSeen = max(a.maxSeen, b)
}

func (a *Agreement) onPrepare(from NodeID, m message) {
	if a.left {
		a.stale(from, m, "this node has left")
		return
	}
	if from < a.cfg.Self {
		// A lower node coordinates: let it, instead of duelling with it
		// (even if this ballot is refused, it will retry higher).
		a.deferUntil = a.tick + 2*int64(a.cfg.PrepareTimeout)
		if a.phase != idle {
			a.abort(fmt.Sprintf("node %s, lower than this one, is coordinating", from))
		}
	}
	if !a.promiseOK(from, m.Ballot) {
		a.stale(from, m, "ballot below this node's promise")
		a.send(from, message{Type: mNack, Ballot: m.Ballot, Promised: a.hs.Promised})
		return
	}
	a.promise(from, m.Ballot)
	a.quietSince = a.tick
	if contains(m.Intended, a.cfg.Self) || contains(a.hs.Installed.Members, a.cfg.Self) {
		a.stopFor(m.Ballot, m.Intended)
	}
	a.send(from, message{Type: mPrepared, Ballot: m.Ballot, Installed: a.hs.Installed,
		Accepted: a.hs.Accepted, Restarted: a.restarted, Leaving: a.leaving})
}

func (a *Agreement) stopFor(ballot uint64, members []NodeID) {
	if ballot <= a.stopped {
		return
	}
	a.stopped = ballot
	a.suspended, a.quietSince = true, a.tick
	a.ready.Stop = &View{Gen: ballot, Members: slices.Clone(members)}
	if len(a.ready.Install) > 0 {
		a.afterInstall.Change = &View{Gen: ballot, Members: slices.Clone(members)}
	}
	a.log(slog.LevelInfo, "view change began; stopping lock traffic", slog.Uint64("ballot", ballot), slog.Any("intended", members))
}

func (a *Agreement) onAccept(from NodeID, m message) {
	if a.left {
		a.stale(from, m, "this node has left")
		return
	}
	if !a.promiseOK(from, m.Ballot) {
		a.stale(from, m, "ballot below this node's promise")
		a.send(from, message{Type: mNack, Ballot: m.Ballot, Promised: a.hs.Promised})
		return
	}
	if !a.aliveQuorate() {
		a.log(slog.LevelWarn, "not accepting a proposal while this node's alive set is not quorate",
			slog.Uint64("ballot", m.Ballot), slog.String("quorum", a.cfg.Quorum.Describe(a.alive)))
		return
	}
	a.promise(from, m.Ballot)
	a.quietSince = a.tick
	if contains(m.Base.Members, a.cfg.Self) && m.Base.Gen > a.hs.Installed.Gen {
		// We missed the commit of the view this proposal builds on: it is
		// chosen (it was installed somewhere), so install it first and
		// do not skip it, unless this node is not quorate in it (too few
		// of its members alive): installed now, it would start DLM
		// recovery, which may grant at once, in a view in which this node
		// must not (the Stop for this proposal comes only after the
		// Install in the driver's order). The same rule as onCommit. The
		// base is then installed with the value, at its COMMIT (which
		// carries the base too), just before the value, once this node is
		// quorate in that: accepting does not need it installed.
		switch live := intersect(m.Base.Members, a.alive); {
		case a.superseded(m.Base.Gen, m):
			a.log(slog.LevelInfo, "not installing the missed predecessor of a proposal now: a newer view exists; it is installed with the proposal's commit",
				slog.Uint64("ballot", m.Ballot), slog.Uint64("base_gen", m.Base.Gen), slog.Uint64("cluster_gen", a.knownGen(m)))
		case !a.cfg.Quorum.Quorate(live):
			a.log(slog.LevelInfo, "not installing the missed predecessor of a proposal now: this node is not quorate in it; it is installed with the proposal's commit",
				slog.Uint64("ballot", m.Ballot), slog.Uint64("base_gen", m.Base.Gen), slog.String("quorum", a.cfg.Quorum.Describe(live)))
		default:
			a.install(m.Base, 0, from)
		}
	}
	if acc := a.hs.Accepted; acc == nil || acc.Ballot != m.Ballot || !acc.Value.equal(m.Value) {
		a.hs.Accepted = &Accepted{Ballot: m.Ballot, Value: m.Value, Base: m.Base}
		a.dirty = true
		a.acceptedAt = a.tick
	}
	a.acceptedRun = m.Value.Gen
	if contains(m.Value.Members, a.cfg.Self) {
		a.stopFor(m.Ballot, m.Value.Members)
	}
	a.send(from, message{Type: mAccepted, Ballot: m.Ballot})
}

func (a *Agreement) onCommit(from NodeID, m message) {
	v := m.Value
	switch {
	case v.Gen < a.hs.Installed.Gen:
		a.stale(from, m, "view older than the installed one")
		return
	case v.Gen == a.hs.Installed.Gen:
		a.send(from, message{Type: mCommitted, ViewGen: v.Gen}) // duplicate: acknowledge again
		return
	case a.left:
		return
	}
	if !contains(v.Members, a.cfg.Self) {
		if a.leaving {
			// Out of the newest view: as a graceful leaver (Left) or, if it
			// was cut off before, as a failed node already fenced. Either
			// way it holds nothing any more.
			a.exit(v.Gen)
			a.send(from, message{Type: mCommitted, ViewGen: v.Gen})
			return
		}
		if !a.excluded {
			a.excluded = true
			a.log(slog.LevelWarn, "a newer view leaves this node out; stopping until readmitted",
				slog.Uint64("gen", v.Gen), slog.Any("members", v.Members))
			a.updateQuorum()
		}
		return
	}
	if !a.aliveQuorate() {
		a.log(slog.LevelWarn, "not installing a view while this node's alive set is not quorate",
			slog.Uint64("gen", v.Gen), slog.String("quorum", a.cfg.Quorum.Describe(a.alive)))
		return
	}
	if live := intersect(v.Members, a.alive); !a.cfg.Quorum.Quorate(live) {
		// Installed now, the view would start DLM recovery (which may
		// grant at once) in the same Ready that reports quorum lost. Wait
		// unacknowledged: the COMMIT is repeated until this node installs
		// it, once it sees enough of the view's members.
		a.log(slog.LevelWarn, "not installing a view in which this node is not quorate",
			slog.Uint64("gen", v.Gen), slog.String("quorum", a.cfg.Quorum.Describe(live)))
		return
	}
	if a.superseded(v.Gen, m) {
		// The cluster is past this view already: installed, it would
		// leave this node not quorate (left behind) while its recovery
		// resumed the lock manager. Wait unacknowledged, as above: the
		// newer view's COMMIT (which carries its base) or its exclusion
		// reaches this node, or it asks to be readmitted.
		a.log(slog.LevelInfo, "not installing a view the cluster has moved past",
			slog.Uint64("gen", v.Gen), slog.Uint64("cluster_gen", a.knownGen(m)))
		return
	}
	if contains(m.Base.Members, a.cfg.Self) && m.Base.Gen > a.hs.Installed.Gen {
		a.install(m.Base, 0, from)
	}
	a.install(v, m.Ballot, from)
	a.send(from, message{Type: mCommitted, ViewGen: v.Gen})
}

// install makes p this node's view. p is chosen (a quorate set of data
// nodes accepted it), so installing it is always consistent with every other
// node; what remains local is whether this node continues from p.Prev or
// must reset.
//
// It resets whenever its installed view is not p.Prev, also when it has
// installed none at all (only the very first view, whose Prev is generation
// 0, continues from nothing). A node that never installed a view may still
// have been a member of one (it accepted it, or an adopted value named it,
// and its COMMIT never arrived) and been fenced when a later view removed
// it; it cannot tell, and the view readmitting it must reset it. A node
// with no lock state loses nothing by the reset.
func (a *Agreement) install(p Proposal, ballot uint64, from NodeID) {
	prev := a.hs.Installed
	reset := a.restarted || prev.Gen != p.Prev.Gen
	a.hs.Installed = p
	if b := max(ballot, p.Gen); b > a.hs.Promised {
		a.hs.Promised, a.hs.PromisedTo = b, from
	}
	a.maxSeen = max(a.maxSeen, a.hs.Promised)
	a.dirty = true
	a.committer = from
	// The restart is dealt with by a view that lists this node as
	// Rejoined, or that joins it anew, but only if this run, and no
	// earlier one, took part in choosing that view: otherwise the others
	// may have installed it, and sent its DLM recovery traffic, to the
	// previous run (lost with it), so this node still asks to be
	// readmitted as Rejoined. That this run accepted it proves nothing: a
	// duplicate or late ACCEPT of a ballot the previous run had already
	// accepted reaches the new run too. A view's first PREPARE is its
	// generation's ballot, and every member of a view answered it, so a
	// view whose generation is above the ballot this run's persisted
	// state promised was prepared by this run, and installed nowhere
	// before this run began.
	if a.restarted && (contains(p.Rejoined, a.cfg.Self) ||
		(!contains(p.Prev.Members, a.cfg.Self) && a.acceptedRun == p.Gen && p.Gen > a.bootPromised)) {
		a.restarted = false
	}
	a.excluded = false
	a.rejoining = false
	// Any view installed after the restart supersedes the persisted one
	// the start-up wait was about: the cluster is running again and who
	// was left out of it (fenced first) was settled by whoever proposed
	// it. Waiting on would only hold back this node's proposals when it
	// coordinates, e.g. failover after the coordinator that readmitted it
	// fails.
	a.startupMembers = nil
	// A node this view let go stays a leaver: its process may stay alive
	// in gossip for a moment after it learns it is out (it shuts down only
	// then), and it must not be proposed back meanwhile: that view would
	// count a node that is about to vanish, and its exit would then look
	// like a failure to be fenced. It is forgotten as a leaver when gossip
	// drops it (SetAlive), when it restarts (a HELLO with Restarted) or
	// when a newer view readmits it (noteReadmitted).
	for id, g := range a.stoppedPeer {
		if g < p.Gen {
			delete(a.stoppedPeer, id) // this view lets it resume
		}
	}
	a.noteReadmitted(p)
	in := Install{View: p.View(), Prev: p.Prev, Departed: p.Departed(), Left: p.Left,
		Joined: p.Joined(), Rejoined: p.Rejoined, Reset: reset}
	a.ready.Install = append(a.ready.Install, cloneInstall(in))
	a.log(slog.LevelInfo, "installed view", slog.Uint64("gen", p.Gen), slog.Any("members", p.Members),
		slog.Uint64("prev_gen", p.Prev.Gen), slog.Any("departed", in.Departed), slog.Any("left", p.Left),
		slog.Any("joined", in.Joined), slog.Any("rejoined", p.Rejoined), slog.Bool("reset", reset),
		slog.String("quorum", a.cfg.Quorum.Describe(p.Members)))
	a.updateQuorum()
	// The driver resumes its lock manager through this Install, unless the
	// node is not quorate after it (a leaver, or a view in which too few of
	// the members are alive): then it stops it again.
	a.suspended = !a.quorate
	a.afterInstall = StopAfterInstall{NotQuorate: !a.quorate}
}

// noteReadmitted records that view p (re)admitted its joiners and rejoined
// members, so that their restart notices sent before they saw p are not
// acted on twice. The coordinator records it at commit too, since it need not
// be a member of what it commits.
//
// A node that a view newer than its LEAVE (re)admits is no longer leaving
// either: a leave announced by an earlier run of a restarted node must not
// remove it again (a node still leaving repeats its LEAVE).
func (a *Agreement) noteReadmitted(p Proposal) {
	for _, id := range append(p.Joined(), p.Rejoined...) {
		delete(a.restartedPeer, id)
		if g, ok := a.leaveGen[id]; ok && p.Gen > g {
			delete(a.leavers, id)
			delete(a.leaveGen, id)
		}
		a.readmitted[id] = max(a.readmitted[id], p.Gen)
	}
}

func (a *Agreement) onLeave(from NodeID, m message) {
	if m.Gen < a.hs.Installed.Gen {
		a.stale(from, m, "leaver is behind this node's view")
		return
	}
	if !contains(a.hs.Installed.Members, from) || a.leavers[from] {
		return
	}
	a.leavers[from] = true
	a.leaveGen[from] = m.Gen
	a.log(slog.LevelInfo, "node announced a graceful leave", slog.Any("node", from), slog.Uint64("gen", m.Gen))
}

func (a *Agreement) onHello(from NodeID, m message) {
	// HELLO carries no state that is applied; it only asks the coordinator
	// to (re)admit the sender, bring it up to date or give it a view to
	// resume through, so it is accepted from any generation, except when
	// the sender has since acknowledged a newer view this node committed
	// (the HELLO was delayed, and acting on it would cost a needless view
	// change).
	if c := a.commit; !m.Restarted && c != nil && m.Gen < c.value.Gen &&
		(c.acked[from] || (c.value.Gen == a.hs.Installed.Gen && contains(a.commitTargets(), from))) {
		// Sent before the sender installed the view this node committed,
		// or while this node's COMMIT of its current view, repeated until
		// acknowledged, is still on its way to it: either way it needs no
		// change to catch up.
		a.stale(from, m, "the sender has since installed, or is being sent, a newer view")
		return
	}
	if from != a.cfg.Self && from == a.believedCoordinator() && !m.Restarted && !m.Stopped {
		// The coordinator asks whether this node is there (it was left out
		// for silence): answering is what readmits it. The coordinator
		// itself never answers (it is nobody's coordinator but its own), so
		// this cannot ping-pong.
		a.send(from, message{Type: mHello})
	}
	if m.Gen > a.hs.Installed.Gen && m.Gen > a.behind {
		// The sender installed a view this node never did: this node was
		// cut off and missed it (see needChange).
		a.behind = m.Gen
		a.maxSeen = max(a.maxSeen, m.Gen)
		a.log(slog.LevelInfo, "a peer installed a newer view than this node's; this node missed it",
			slog.Any("node", from), slog.Uint64("sender_gen", m.Gen), slog.Uint64("gen", a.hs.Installed.Gen))
	}
	if m.Stopped && !m.Restarted && m.Gen >= a.hs.Installed.Gen {
		if g, ok := a.stoppedPeer[from]; !ok || g < m.Gen {
			a.stoppedPeer[from] = m.Gen
			a.log(slog.LevelInfo, "member's lock manager is stopped since its last view; it needs a new view to resume",
				slog.Any("node", from), slog.Uint64("sender_gen", m.Gen))
		}
		return
	}
	if !m.Restarted && contains(a.hs.Installed.Members, from) && m.Gen < a.hs.Installed.Gen && !a.lagging[from] {
		a.lagging[from] = true
		a.log(slog.LevelInfo, "member missed a view; it will be brought up to date",
			slog.Any("node", from), slog.Uint64("sender_gen", m.Gen), slog.Uint64("gen", a.hs.Installed.Gen))
	}
	if !m.Restarted {
		return
	}
	if m.Gen < a.readmitted[from] {
		a.stale(from, m, "restart already handled by a newer view")
		return
	}
	delete(a.leavers, from) // a restarted node is no longer leaving
	if contains(a.hs.Installed.Members, from) && !a.restartedPeer[from] {
		a.restartedPeer[from] = true
		a.log(slog.LevelInfo, "member restarted and lost its lock state; it will be readmitted clean",
			slog.Any("node", from), slog.Uint64("sender_gen", m.Gen))
	}
}

func (a *Agreement) broadcastLeave() {
	for _, id := range normalize(append(slices.Clone(a.alive), a.hs.Installed.Members...)) {
		if id != a.cfg.Self {
			a.send(id, message{Type: mLeave})
		}
	}
}

// ---- coordinator side ----

func (a *Agreement) aliveQuorate() bool { return a.cfg.Quorum.Quorate(a.alive) }

// candidates are the nodes that may coordinate: alive and not known to be
// leaving. A leaving node still counts itself, so that as the lowest node it
// coordinates its own removal rather than leave the others waiting for it.
func (a *Agreement) candidates() []NodeID {
	var out []NodeID
	for _, id := range a.alive {
		if a.leavers[id] || (id == a.cfg.Self && a.left) {
			continue
		}
		out = append(out, id)
	}
	return out
}

func (a *Agreement) exit(gen uint64) {
	if a.left {
		return
	}
	a.left = true
	a.leaving = false
	a.ready.Exited = true
	a.abort("left the cluster")
	a.log(slog.LevelInfo, "graceful leave complete", slog.Uint64("gen", gen))
	a.updateQuorum()
}

func (a *Agreement) believedCoordinator() NodeID {
	if c := a.candidates(); len(c) > 0 {
		return c[0]
	}
	return ddraid.NoNode
}

func (a *Agreement) isCoordinator() bool {
	return !a.left && a.aliveQuorate() && a.believedCoordinator() == a.cfg.Self
}

func (a *Agreement) checkRole() {
	if a.phase != idle && !a.isCoordinator() {
		a.abort("no longer the coordinator: " + a.cfg.Quorum.Describe(a.alive))
	}
}

// target is who the coordinator proposes: the candidates that answered
// lately, without itself if it is leaving.
func (a *Agreement) target() []NodeID {
	var out []NodeID
	for _, id := range a.candidates() {
		if _, s := a.silent[id]; !s && !(id == a.cfg.Self && a.leaving) {
			out = append(out, id)
		}
	}
	return out
}

// wantsView reports whether this node needs a new view only to resume its
// lock manager: it is a quorate member whose lock manager is stopped
// (suspended: a quorum loss, or a Stop for a change that did not complete,
// with no Install resuming it since; also a Stop in the very Ready of its
// last Install), nothing has been under way for 2*PrepareTimeout ticks, and
// no other reason for a change already covers it (a restarted node asks
// with its own HELLO).
func (a *Agreement) wantsView() bool {
	return a.suspended && a.quorate && !a.restarted &&
		a.tick-a.quietSince >= 2*int64(a.cfg.PrepareTimeout)
}

func (a *Agreement) needChange(target []NodeID) (bool, string) {
	in := a.hs.Installed
	switch {
	case in.Gen == 0:
		return true, "no view installed yet"
	case !slices.Equal(target, in.Members):
		return true, "alive nodes differ from the view"
	case a.restarted:
		return true, "this node restarted"
	case a.leaving:
		return true, "this node is leaving"
	case a.hs.Accepted != nil && a.hs.Accepted.Value.Gen > in.Gen:
		return true, "an accepted proposal is not installed"
	case a.excluded:
		// A newer view removed this node (and fenced it, unless it was
		// the coordinator completing it). Its installed view may still
		// list exactly the nodes it sees alive, so the comparison above
		// finds nothing: without this, a removed node that is the lowest
		// alive one would coordinate nothing, and nobody else may.
		return true, "a newer view leaves this node out"
	case a.behind > in.Gen:
		return true, fmt.Sprintf("a peer installed view %d, newer than this node's; this node was left out", a.behind)
	case a.wantsView():
		return true, "this node's lock manager is stopped since its last view (quorum loss or an abandoned change); it resumes only through a new view"
	}
	for _, id := range sortedKeys(a.restartedPeer) {
		if contains(in.Members, id) {
			return true, fmt.Sprintf("member %s restarted", id)
		}
	}
	for _, id := range sortedKeys(a.lagging) {
		if contains(in.Members, id) && contains(target, id) {
			return true, fmt.Sprintf("member %s missed a view", id)
		}
	}
	for _, id := range sortedKeys(a.stoppedPeer) {
		// Only a request made in the installed view (or a newer one) counts:
		// any newer view already let the member resume.
		if g := a.stoppedPeer[id]; g >= in.Gen && contains(target, id) {
			return true, fmt.Sprintf("member %s is stopped since view %d; it resumes only through a new view", id, g)
		}
	}
	return false, ""
}

func (a *Agreement) maybeStart() {
	if a.phase != idle || !a.isCoordinator() || a.tick < a.deferUntil || a.tick < a.retryAt {
		return
	}
	target := a.target()
	need, why := a.needChange(target)
	if !need {
		return
	}
	if missing := a.startupMissing(target); len(missing) > 0 {
		if !a.startupWaitLog {
			a.startupWaitLog = true
			a.log(slog.LevelInfo, "restarted: waiting for the other members of the persisted view before fencing them",
				slog.Any("missing", missing), slog.Int("ticks", a.cfg.StartupFenceAfter), slog.Uint64("gen", a.hs.Installed.Gen))
		}
		return
	}
	if !a.cfg.Quorum.Quorate(target) {
		if d := a.cfg.Quorum.Describe(target); d != a.lastNotQuorate {
			a.lastNotQuorate = d
			a.log(slog.LevelWarn, "cannot propose a view: responsive nodes are not quorate",
				slog.Any("target", target), slog.String("quorum", d))
		}
		return
	}
	a.lastNotQuorate = ""
	a.ballot = max(a.maxSeen, a.hs.Promised, a.hs.Installed.Gen) + 1
	if acc := a.hs.Accepted; acc != nil {
		a.ballot = max(a.ballot, acc.Ballot+1)
	}
	a.maxSeen = a.ballot
	a.phase = preparing
	a.targets = target
	a.answers = map[NodeID]report{}
	a.acks = map[NodeID]bool{}
	a.phaseStart, a.lastSend = a.tick, a.tick
	a.log(slog.LevelInfo, "proposing a view change", slog.Uint64("ballot", a.ballot), slog.String("why", why),
		slog.Uint64("gen", a.hs.Installed.Gen), slog.Any("members", a.hs.Installed.Members), slog.Any("target", target))
	for _, id := range target {
		a.send(id, message{Type: mPrepare, Ballot: a.ballot, Intended: target})
	}
}

// startupMissing returns the members of the persisted view this node
// restarted in that target leaves out, while the start-up wait lasts
// (Config.StartupFenceAfter); once they have all been seen, or the wait is
// over, it is nil for good.
func (a *Agreement) startupMissing(target []NodeID) []NodeID {
	if a.startupMembers == nil {
		return nil
	}
	missing := minus(a.startupMembers, target)
	if len(missing) == 0 || a.tick >= int64(a.cfg.StartupFenceAfter) {
		if len(missing) > 0 {
			a.log(slog.LevelWarn, "members of the persisted view did not come back in time; they will be fenced",
				slog.Any("missing", missing), slog.Int("ticks", a.cfg.StartupFenceAfter))
		}
		a.startupMembers = nil
		return nil
	}
	return missing
}

func (a *Agreement) abort(why string) {
	if a.phase == idle {
		return
	}
	a.log(slog.LevelInfo, "abandoning view change", slog.Uint64("ballot", a.ballot),
		slog.String("phase", a.phase.String()), slog.String("why", why))
	a.phase = idle
	a.fences = nil
	a.retryAt = a.tick + 1
}

func (a *Agreement) onPrepared(from NodeID, m message) {
	if a.phase != preparing || m.Ballot != a.ballot {
		a.stale(from, m, "answer to a ballot not in its prepare phase")
		return
	}
	if !contains(a.targets, from) {
		return
	}
	a.answers[from] = report{installed: m.Installed, accepted: m.Accepted, restarted: m.Restarted}
	if len(a.answers) == len(a.targets) {
		a.decide()
	}
}

// decide picks the value once every target promised: the accepted proposal
// with the highest ballot if it is newer than every installed view (it may
// have been chosen, so it must be completed, Paxos-style), otherwise a fresh
// view of the targets that succeeds the newest installed view.
func (a *Agreement) decide() {
	var newest Proposal
	var highest *Accepted
	for _, id := range a.targets {
		r := a.answers[id]
		if r.installed.Gen > newest.Gen {
			newest = r.installed
		}
		if r.accepted != nil && (highest == nil || r.accepted.Ballot > highest.Ballot) {
			highest = r.accepted
		}
	}
	a.noteReadmitted(newest)
	for _, id := range a.targets {
		r := a.answers[id]
		// Whether a target lost its state is taken from its answer in
		// this round only (a HELLO merely prompts the change): an answer
		// older than the view that readmitted it does not count, and a
		// target that says it did not restart is not marked.
		if r.restarted && r.installed.Gen >= a.readmitted[id] {
			a.restartedPeer[id] = true
		} else {
			delete(a.restartedPeer, id)
		}
		delete(a.lagging, id) // the accept phase brings it up to date
		if r.leaving && !a.leavers[id] {
			a.leavers[id] = true
			a.log(slog.LevelInfo, "node is leaving gracefully", slog.Any("node", id))
		}
	}
	if a.leaving && !contains(newest.Members, a.cfg.Self) {
		// Cut off before it left: the cluster moved on without it (and
		// fenced it), so there is nothing left to hand over.
		a.exit(newest.Gen)
		return
	}
	if highest != nil && highest.Value.Gen > newest.Gen {
		a.value, a.base, a.adopted = highest.Value, highest.Base, true
		a.log(slog.LevelInfo, "adopting a proposal a previous coordinator left unfinished",
			slog.Uint64("ballot", a.ballot), slog.Uint64("gen", a.value.Gen), slog.Any("members", a.value.Members),
			slog.Uint64("accepted_ballot", highest.Ballot))
	} else {
		if a.ballot <= newest.Gen {
			a.maxSeen = max(a.maxSeen, newest.Gen)
			a.abort("ballot not above the newest installed view")
			return
		}
		var members, left, rejoined []NodeID
		for _, id := range a.targets {
			if !a.leavers[id] {
				members = append(members, id)
			}
		}
		for _, id := range minus(newest.Members, members) {
			if a.leavers[id] || (id == a.cfg.Self && a.leaving) {
				left = append(left, id)
			}
		}
		for _, id := range intersect(newest.Members, members) {
			if a.restartedPeer[id] {
				rejoined = append(rejoined, id)
			}
		}
		if !a.cfg.Quorum.Quorate(members) {
			a.abort("the view without the leaving nodes would not be quorate: " + a.cfg.Quorum.Describe(members))
			a.retryAt = a.tick + int64(a.cfg.PrepareTimeout)
			return
		}
		a.value = Proposal{Gen: a.ballot, Members: members, Prev: newest.View(), Left: left, Rejoined: rejoined}
		a.base, a.adopted = newest, false
	}
	a.phase = accepting
	a.acks = map[NodeID]bool{}
	a.phaseStart, a.lastSend = a.tick, a.tick
	for _, id := range a.targets {
		a.send(id, message{Type: mAccept, Ballot: a.ballot, Value: a.value, Base: a.base})
	}
}

func (a *Agreement) onAccepted(from NodeID, m message) {
	if a.phase != accepting || m.Ballot != a.ballot {
		a.stale(from, m, "answer to a ballot not in its accept phase")
		return
	}
	if !contains(a.targets, from) {
		return
	}
	a.acks[from] = true
	if len(a.acks) < len(a.targets) {
		return
	}
	// Every target (a quorate set) accepted: the value is chosen.
	failed := a.value.Departed()
	if contains(failed, a.cfg.Self) {
		// An adopted value can name this coordinator as failed (it was cut
		// off when the value was proposed). It does not fence itself: it
		// stops its own I/O now (Quorate=false, acted on before the commit
		// is sent) and rejoins with a reset later.
		//
		// The line is logged for every view completed this way, also when
		// the node is stopped already (excluded by an earlier view, which
		// it may itself have completed this way): the "view chosen" line
		// below lists nobody to fence, and this line is the only record
		// of who stands in for that fence, for operators and for the
		// simulator's fence-before-install check alike.
		failed = minus(failed, []NodeID{a.cfg.Self})
		a.selfFenced = a.value.Gen
		a.log(slog.LevelWarn, SelfFenceLog+"; stopping its own I/O instead of fencing itself",
			slog.Uint64("gen", a.value.Gen), slog.Bool("already_stopped", a.excluded))
		if !a.excluded {
			a.excluded = true
			a.updateQuorum()
		}
	}
	a.log(slog.LevelInfo, "view chosen", slog.Uint64("gen", a.value.Gen), slog.Any("members", a.value.Members),
		slog.Uint64("ballot", a.ballot), slog.Any("to_fence", failed), slog.Bool("adopted", a.adopted))
	if len(failed) == 0 {
		a.commitValue()
		return
	}
	a.phase = fencing
	a.fences = map[NodeID]*fenceState{}
	for _, id := range failed {
		a.fences[id] = &fenceState{}
	}
	a.requestFences()
}

func (a *Agreement) requestFences() {
	if !a.aliveQuorate() {
		return // only a quorate partition fences; checkRole aborts the change
	}
	for _, id := range sortedKeys(a.fences) {
		f := a.fences[id]
		if f.done || f.outstanding || a.tick < f.retryAt {
			continue
		}
		f.outstanding = true
		f.attempts++
		a.ready.Fence = append(a.ready.Fence, FenceRequest{Node: id, Gen: a.value.Gen})
		a.log(slog.LevelInfo, "fencing failed node before installing the view", slog.Any("node", id),
			slog.Uint64("gen", a.value.Gen), slog.Int("attempt", f.attempts))
	}
}

func (a *Agreement) allFenced() bool {
	for _, f := range a.fences {
		if !f.done {
			return false
		}
	}
	return true
}

func (a *Agreement) commitValue() {
	a.commit = &commitState{acceptors: a.targets, ballot: a.ballot, value: a.value, base: a.base,
		acked: map[NodeID]bool{}, done: map[NodeID]bool{}, lastSend: a.tick}
	a.phase = idle
	a.fences = nil
	a.noteReadmitted(a.value)
	a.log(slog.LevelInfo, "committing view", slog.Uint64("gen", a.value.Gen), slog.Any("members", a.value.Members))
	for _, id := range a.commitTargets() {
		a.send(id, message{Type: mCommit, Ballot: a.ballot, Value: a.value, Base: a.base})
	}
}

// commitTargets are the members, the leavers (so they know they are out)
// and every acceptor (an acceptor left out of an adopted view learns it).
func (a *Agreement) commitTargets() []NodeID {
	v := a.commit.value
	return normalize(append(append(append([]NodeID(nil), v.Members...), v.Left...), a.commit.acceptors...))
}

func (a *Agreement) commitTick() {
	c := a.commit
	if c == nil || a.tick-c.lastSend < int64(a.cfg.RetransmitTicks) {
		return
	}
	c.lastSend = a.tick
	for _, id := range a.commitTargets() {
		if !c.acked[id] && contains(a.alive, id) {
			a.send(id, message{Type: mCommit, Ballot: c.ballot, Value: c.value, Base: c.base})
		}
	}
}

func (a *Agreement) onAck(from NodeID, m message) {
	c := a.commit
	if c == nil || m.ViewGen != c.value.Gen {
		a.stale(from, m, "acknowledges a view this node is not committing")
		return
	}
	c.acked[from] = true
	if m.Type != mDone {
		return
	}
	c.done[from] = true
	if !c.allDone && len(intersect(c.value.Members, sortedKeys(c.done))) == len(c.value.Members) {
		c.allDone = true
		a.log(slog.LevelInfo, "recovery finished on every member", slog.Uint64("gen", c.value.Gen))
	}
}

func (a *Agreement) onNack(from NodeID, m message) {
	a.maxSeen = max(a.maxSeen, m.Promised)
	if (a.phase == preparing || a.phase == accepting) && m.Ballot == a.ballot {
		a.abort(fmt.Sprintf("ballot refused by node %s, which promised ballot %d", from, m.Promised))
		return
	}
	a.stale(from, m, "refusal of a ballot no longer pending")
}

func (a *Agreement) phaseTick() {
	var missing []NodeID
	for _, id := range a.targets {
		_, answered := a.answers[id]
		if a.phase == accepting {
			answered = a.acks[id]
		}
		if !answered {
			missing = append(missing, id)
		}
	}
	if a.tick-a.phaseStart >= int64(a.cfg.PrepareTimeout) {
		for _, id := range missing {
			a.silent[id] = a.tick + int64(a.cfg.SilentTicks)
		}
		a.log(slog.LevelWarn, "nodes stayed silent; leaving them out and retrying under a higher ballot",
			slog.Any("silent", missing), slog.Uint64("ballot", a.ballot), slog.String("phase", a.phase.String()))
		a.abort("silent nodes")
		a.retryAt = a.tick
		return
	}
	if a.tick-a.lastSend < int64(a.cfg.RetransmitTicks) {
		return
	}
	a.lastSend = a.tick
	for _, id := range missing {
		if a.phase == preparing {
			a.send(id, message{Type: mPrepare, Ballot: a.ballot, Intended: a.targets})
		} else {
			a.send(id, message{Type: mAccept, Ballot: a.ballot, Value: a.value, Base: a.base})
		}
	}
}

func (a *Agreement) updateQuorum() {
	in := a.hs.Installed
	q := !a.left && !a.leaving && !a.excluded && !a.rejoining && a.peerGen <= in.Gen &&
		in.Gen > 0 && contains(in.Members, a.cfg.Self) && a.cfg.Quorum.Quorate(intersect(in.Members, a.alive))
	if q == a.quorate {
		return
	}
	a.quorate = q
	a.ready.Quorate = &q
	level := slog.LevelInfo
	if !q {
		level = slog.LevelWarn
		a.suspended = true // the driver stops its lock manager
		if len(a.ready.Install) > 0 {
			a.afterInstall.NotQuorate = true // after this Ready's Install, too
		}
	} else {
		a.quietSince = a.tick // give a change under way time before asking for one
	}
	a.log(level, "quorum status changed", slog.Bool("quorate", q), slog.Uint64("gen", in.Gen),
		slog.String("quorum", a.cfg.Quorum.Describe(intersect(in.Members, a.alive))),
		slog.Bool("leaving", a.leaving || a.left), slog.Bool("excluded", a.excluded),
		slog.Bool("rejoining", a.rejoining), slog.Uint64("cluster_gen", max(a.peerGen, in.Gen)))
}

func sortedKeys[V any](m map[NodeID]V) []NodeID {
	return slices.Sorted(maps.Keys(m))
}

func cloneProposal(p Proposal) Proposal {
	return Proposal{Gen: p.Gen, Members: slices.Clone(p.Members),
		Prev: View{Gen: p.Prev.Gen, Members: slices.Clone(p.Prev.Members)},
		Left: slices.Clone(p.Left), Rejoined: slices.Clone(p.Rejoined)}
}

func cloneHardState(h HardState) HardState {
	out := HardState{Promised: h.Promised, PromisedTo: h.PromisedTo, Installed: cloneProposal(h.Installed)}
	if h.Accepted != nil {
		out.Accepted = &Accepted{Ballot: h.Accepted.Ballot, Value: cloneProposal(h.Accepted.Value), Base: cloneProposal(h.Accepted.Base)}
	}
	return out
}

func cloneInstall(in Install) Install {
	return Install{View: View{Gen: in.View.Gen, Members: slices.Clone(in.View.Members)},
		Prev:     View{Gen: in.Prev.Gen, Members: slices.Clone(in.Prev.Members)},
		Departed: slices.Clone(in.Departed), Left: slices.Clone(in.Left), Joined: slices.Clone(in.Joined),
		Rejoined: slices.Clone(in.Rejoined), Reset: in.Reset}
}
