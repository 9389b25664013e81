package dlm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/dlm/transport"
	"github.com/mdcluster/mdcluster/internal/wake"
)

// Config configures a Node.
type Config struct {
	// Logger receives the lock manager's log; nil means slog.Default().
	Logger *slog.Logger
	// ID is this node's ID in the cluster; 0 means 1 (a cluster of one).
	ID NodeID
	// Peers maps other nodes' IDs to their transport addresses. Unless
	// Managed, they are also the initial members (a static cluster). More
	// can be given later with Node.SetPeer. With no peers and no ListenAddr
	// or Listener the node is a cluster of one: every resource is mastered
	// here and no message is ever sent.
	Peers map[NodeID]string
	// Managed says a membership layer drives the node through its
	// Controller: the node starts stopped, at generation 0, with itself as
	// its only member, and Peers is only the address book of the nodes that
	// may join. Lock calls wait until the first agreed view is installed
	// with Controller().Recover(1, members, nil, false) (any generation
	// above 0 will do), so view generations and DLM generations can be the
	// same numbers. Without Managed the node starts running at generation
	// 1 with itself and Peers as members, which is what a cluster of one or
	// a static cluster wants.
	Managed bool
	// ListenAddr is where this node accepts its peers (e.g. "10.0.0.1:7410").
	// With it (or Listener) the node has a transport even without Peers, so
	// that peers can be added later.
	ListenAddr string
	// Listener, if set, is used instead of ListenAddr (tests listen on port 0
	// first to learn every address).
	Listener net.Listener
	// ClusterKey is the secret every node of the cluster shares; peers that
	// cannot prove they know it are refused. At least 16 bytes.
	ClusterKey []byte
	// Transport tunes the node-to-node transport; zero fields take its
	// defaults. Its identity, addresses, key and handler come from the
	// fields above.
	Transport transport.Config
	// TickInterval is how often cached directory information ages (0: 1s).
	TickInterval time.Duration
	// DeferDelay bounds how long a message nobody waits for (an unlock, a
	// down-conversion) is held for a later message to the same node to
	// carry it (0: 200µs). Go's timers may round sub-millisecond delays up
	// to a millisecond in an idle process; a node waiting on such a message
	// gets it at once anyway (see docs/dlm.md).
	DeferDelay time.Duration

	// MaxEarly bounds the messages held for lockspaces not yet opened here,
	// over all lockspaces (0: DefaultMaxEarly); MaxEarlyPerPeer those from
	// one node (0: DefaultMaxEarlyPerPeer), and MaxEarlyBytes their
	// payloads in total (0: DefaultMaxEarlyBytes). Beyond them a message is
	// dropped, counted (NodeStats.EarlyDropped) and logged once per
	// lockspace at Warn.
	MaxEarly        int
	MaxEarlyPerPeer int
	MaxEarlyBytes   int
	// Space bounds each lockspace's state that other nodes create here:
	// remote locks and directory entries per node, held messages (see
	// SpaceConfig; Self, LVBLen, TossLimit and CacheTicks are ignored).
	Space SpaceConfig
}

// Defaults of the early-message bounds.
const (
	DefaultMaxEarly        = 1 << 16
	DefaultMaxEarlyPerPeer = 1 << 14
	DefaultMaxEarlyBytes   = 64 << 20
)

// NodeStats are a Node's counters of messages held for lockspaces not yet
// opened here. Each lockspace has its own (Lockspace.Stats).
type NodeStats struct {
	EarlyHeld    int    // messages held now
	EarlyBytes   int    // their payload bytes
	EarlyDropped uint64 // messages dropped for a bound
}

// Defaults of Config's tunables; zero fields of a Config get them.
const (
	// DefaultTickInterval is how often cached directory information ages:
	// slow enough to cost nothing, fast enough that a master nobody uses
	// is forgotten within seconds.
	DefaultTickInterval = time.Second
	// DefaultDeferDelay bounds how long a message nobody waits for is held
	// for a carrier: far below a network round trip, so holding it back
	// never costs a waiter noticeably.
	DefaultDeferDelay = 200 * time.Microsecond
)

// DefaultConfig returns a usable configuration of a cluster of one with
// every default spelled out: ID 1, DefaultTickInterval, DefaultDeferDelay,
// the transport's defaults (transport.DefaultConfig) and slog.Default()
// for logging (Logger nil). To join peers, set ID, Peers, ListenAddr (or
// Listener) and ClusterKey; the defaults stay valid. Zero fields of a
// Config built by hand mean the same defaults, so DefaultConfig is a
// starting point to read and adjust rather than a requirement.
func DefaultConfig() Config {
	return Config{
		ID:           1,
		TickInterval: DefaultTickInterval,
		DeferDelay:   DefaultDeferDelay,
		Transport:    transport.DefaultConfig(),
	}
}

// Node is this process's entry to the lock manager. It hosts the lockspaces
// the node takes part in; each Open of a lockspace returns a new handle (an
// owner of locks, like a process that opened a Linux lockspace).
//
// The members start as this node and Config.Peers, at generation 1 (or,
// with Config.Managed, as this node alone at generation 0, stopped). A
// membership layer changes them through the node's Controller, which is
// kept apart from Node so that code that only takes locks cannot stop the
// cluster by accident (mdcluster/node drives it from the agreed views).
// Every member of the view is a member of every lockspace: messages for a
// lockspace not yet opened here wait until it is, and a lockspace's
// recovery into a view ends only once every member has opened it. A
// lockspace opened after this node recovered into the current view joins
// that view's recovery (the others are waiting for its part).
type Node struct {
	cfg Config
	log *slog.Logger
	id  NodeID
	tr  *transport.Transport // nil when neither a listener nor peers are configured
	// peers is the address book behind the transport's peer set (peers.go).
	peers peerTable

	mu     sync.Mutex
	spaces map[string]*space
	byID   map[transport.LockspaceID]*space
	// lookup is byID for the transport's handler, read without mu: a
	// copy published after each Open has replayed its early messages.
	lookup atomic.Pointer[map[transport.LockspaceID]*space]
	early  map[transport.LockspaceID][]earlyMsg
	// Early messages held, in total, by peer and in bytes (Config.MaxEarly...).
	earlyN, earlyBytes int
	earlyBy            map[NodeID]int
	earlyDropped       uint64
	members            []NodeID
	gen                uint64 // generation of members
	halted             bool   // Stop was called and no Recover yet
	// viewRecovered says the current generation was installed by
	// Controller.Recover (not the static start of an unmanaged node): a
	// lockspace created now joins that generation's recovery.
	viewRecovered bool
	closed        bool
	stop          chan struct{}
	stopped       chan struct{}
	ctl           Controller
	// deferDelay bounds how long a message nobody waits for is held for a
	// later message to the same node to carry it.
	deferDelay time.Duration

	// parked lists the lockspaces holding replies made by the transport's
	// reader, sent when the reader ends its batch (batchDone).
	parkMu sync.Mutex
	parked []*space
	// parkedAny is set while parked is not empty: batchDone's quick check.
	parkedAny atomic.Bool
}

type earlyMsg struct {
	from    NodeID
	gen     uint64
	payload []byte
}

// NewNode starts a node: with peers configured it listens for them and
// connects to them in the background.
func NewNode(cfg Config) (*Node, error) {
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	if cfg.ID == 0 {
		cfg.ID = 1
	}
	n := &Node{cfg: cfg, log: lg.With("node", cfg.ID), id: cfg.ID, spaces: make(map[string]*space),
		byID: map[transport.LockspaceID]*space{}, early: map[transport.LockspaceID][]earlyMsg{},
		members: []NodeID{cfg.ID}, gen: 1, stop: make(chan struct{}), stopped: make(chan struct{})}
	if cfg.Managed {
		n.gen, n.halted = 0, true
	}
	n.earlyBy = map[NodeID]int{}
	if n.cfg.MaxEarly <= 0 {
		n.cfg.MaxEarly = DefaultMaxEarly
	}
	if n.cfg.MaxEarlyPerPeer <= 0 {
		n.cfg.MaxEarlyPerPeer = DefaultMaxEarlyPerPeer
	}
	if n.cfg.MaxEarlyBytes <= 0 {
		n.cfg.MaxEarlyBytes = DefaultMaxEarlyBytes
	}
	n.ctl.init(n)
	n.lookup.Store(&map[transport.LockspaceID]*space{})
	n.deferDelay = cfg.DeferDelay
	if n.deferDelay <= 0 {
		n.deferDelay = DefaultDeferDelay
	}
	// A node given no peers but a place to listen gets a transport too:
	// its peers may be added later (SetPeer).
	if len(cfg.Peers) > 0 || cfg.ListenAddr != "" || cfg.Listener != nil {
		tc := cfg.Transport
		tc.NodeID = transport.NodeID(cfg.ID)
		tc.ListenAddr, tc.Listener, tc.ClusterKey = cfg.ListenAddr, cfg.Listener, cfg.ClusterKey
		tc.Peers = map[transport.NodeID]string{}
		for id, addr := range cfg.Peers {
			if id == 0 || id == cfg.ID {
				return nil, fmt.Errorf("new node %d: %w: peer ID %d", cfg.ID, ErrInvalid, id)
			}
			tc.Peers[transport.NodeID(id)] = addr
			if !cfg.Managed {
				n.members = append(n.members, id)
			}
		}
		tc.Handler = n.receive
		tc.BatchDone = n.batchDone
		// Under membership control a message belongs to a view: one queued
		// for a node that restarted and was readmitted in the current view
		// is for its new run (recovery's messages in particular, which
		// nothing resends), so the transport keeps it.
		tc.KeepCurrentGeneration = cfg.Managed
		tc.Logger = n.log
		tr, err := transport.New(tc)
		if err != nil {
			return nil, fmt.Errorf("new node %d: %w", cfg.ID, err)
		}
		n.tr = tr
	}
	slices.Sort(n.members)
	n.initPeers(cfg.Peers)
	tick := cfg.TickInterval
	if tick <= 0 {
		tick = DefaultTickInterval
	}
	go n.ticker(tick)
	go n.ctl.notifier()
	return n, nil
}

// ID returns this node's ID.
func (n *Node) ID() NodeID { return n.id }

// Addr returns the address the node's transport listens on (nil for a
// cluster of one).
func (n *Node) Addr() net.Addr {
	if n.tr == nil {
		return nil
	}
	return n.tr.Addr()
}

func (n *Node) ticker(every time.Duration) {
	defer close(n.stopped)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		n.mu.Lock()
		spaces := slices.Collect(maps.Values(n.spaces))
		n.mu.Unlock()
		for _, sp := range spaces {
			sp.mu.Lock()
			sp.sp.Tick()
			sp.flush()
			sp.mu.Unlock()
		}
	}
}

// lockspaceID names a lockspace on the wire: a hash of its name.
func lockspaceID(name string) transport.LockspaceID {
	h := fnv.New32a()
	h.Write([]byte(name))
	return transport.LockspaceID(h.Sum32())
}

// receive is the transport's handler: a message for one of our lockspaces.
func (n *Node) receive(from transport.NodeID, ls transport.LockspaceID, gen uint64, payload []byte) {
	if sp := (*n.lookup.Load())[ls]; sp != nil {
		sp.mu.Lock()
		n.stepFrom(sp, from, gen, payload)
		sp.mu.Unlock()
		return
	}
	n.mu.Lock()
	sp := n.byID[ls]
	if sp == nil {
		if n.closed {
			n.mu.Unlock()
			return
		}
		if n.earlyN >= n.cfg.MaxEarly || n.earlyBy[NodeID(from)] >= n.cfg.MaxEarlyPerPeer ||
			n.earlyBytes+len(payload) > n.cfg.MaxEarlyBytes {
			n.earlyDropped++
			first := n.earlyDropped&(n.earlyDropped-1) == 0 // log the 1st, 2nd, 4th, 8th... drop
			n.mu.Unlock()
			if first {
				n.log.Warn("dropping message for a lockspace not opened here: early-message bound reached",
					"lockspace_id", ls, "from", from, "dropped", n.earlyDropped)
			}
			return
		}
		n.early[ls] = append(n.early[ls], earlyMsg{NodeID(from), gen, bytes.Clone(payload)})
		n.earlyN++
		n.earlyBy[NodeID(from)]++
		n.earlyBytes += len(payload)
		n.mu.Unlock()
		return
	}
	n.mu.Unlock()
	sp.mu.Lock()
	n.stepFrom(sp, from, gen, payload)
	sp.mu.Unlock()
}

// stepFrom applies a message the transport's reader handed over: its
// replies are parked until the reader's batch ends when more frames of the
// batch follow (the replies to all of them then leave together), and sent
// at once after the last one, as for a lone request: parking it would only
// put the reply behind the local wake-ups the step makes. Called with
// sp.mu held.
func (n *Node) stepFrom(sp *space, from transport.NodeID, gen uint64, payload []byte) {
	if n.tr != nil && n.tr.MoreFrames(from) {
		sp.stepParked(NodeID(from), gen, payload)
		return
	}
	sp.step(NodeID(from), gen, payload)
}

// batchDone is the transport's end of a reader's batch: the replies the
// lockspaces parked while it handled the batch's frames leave now, one
// frame per node and lockspace.
func (n *Node) batchDone(transport.NodeID) {
	if !n.parkedAny.Load() {
		return
	}
	n.parkMu.Lock()
	parked := n.parked
	n.parked = nil
	n.parkedAny.Store(false)
	n.parkMu.Unlock()
	for i, sp := range parked {
		sp.mu.Lock()
		sp.isParked = false
		sp.sendDue()
		sp.mu.Unlock()
		parked[i] = nil
	}
	if len(parked) > 0 && cap(parked) <= 64 {
		n.parkMu.Lock()
		if n.parked == nil {
			n.parked = parked[:0]
		}
		n.parkMu.Unlock()
	}
}

// OpenOptions are the parameters of a lockspace, fixed when it is created;
// every later Open must agree with them.
type OpenOptions struct {
	// LVBLen is the lock value block length, a positive multiple of 8; zero
	// means DefaultLVBLen.
	LVBLen int
	// Recovery, if set, receives this handle's recovery events: the
	// lockspace stopping for a membership change, the nodes that departed
	// and the end of recovery (see RecoveryHandler). Unlike LVBLen it is
	// per handle, not fixed with the lockspace: every open handle with a
	// handler gets every event, on the lockspace's callback goroutine, in
	// order with its locks' callbacks, from the time it is opened until it
	// is released. A handle opened while the lockspace is stopped starts
	// with RecoverPrepare (and RecoverDeparted, if a recovery with departed
	// nodes is already under way), so each handler sees whole sequences.
	Recovery RecoveryHandler
}

// MaxLockspaceName is the longest lockspace name (Linux: DLM_LOCKSPACE_LEN).
const MaxLockspaceName = 64

// Open returns a new handle to the named lockspace, creating the lockspace on
// first use. Locks taken through the handle belong to it: Release drops them.
func (n *Node) Open(name string, opts OpenOptions) (*Lockspace, error) {
	if name == "" || len(name) > MaxLockspaceName {
		return nil, fmt.Errorf("open lockspace %q: %w: name must be 1..%d bytes", name, ErrInvalid, MaxLockspaceName)
	}
	lvbLen := opts.LVBLen
	if lvbLen == 0 {
		lvbLen = DefaultLVBLen
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("open lockspace %q: %w: node closed", name, ErrReleased)
	}
	sp := n.spaces[name]
	if sp == nil {
		id := lockspaceID(name)
		if other := n.byID[id]; other != nil {
			return nil, fmt.Errorf("open lockspace %q: %w: its wire ID collides with lockspace %q", name, ErrInvalid, other.name)
		}
		sc := n.cfg.Space
		sc.Self, sc.LVBLen, sc.TossLimit, sc.CacheTicks = n.id, lvbLen, 0, 0
		s, err := NewSpace(sc)
		if err != nil {
			return nil, fmt.Errorf("open lockspace %q: %w", name, err)
		}
		gen := n.gen
		sp = &space{name: name, id: id, node: n, sp: s, log: n.log.With("lockspace", name)}
		if n.tr != nil {
			n.tr.SetGeneration(id, gen)
		}
		joined := false
		if n.viewRecovered {
			// The current view was installed by a recovery, in which every
			// member that had this lockspace open counts this node as a
			// member of it and waits for its part (directory names, locks
			// done). Opened only now, the lockspace joins that recovery as
			// a member holding nothing; the messages the others sent it
			// meanwhile were kept as early ones and are replayed below.
			if err := s.Recover(gen, n.members, nil, false); err != nil {
				return nil, fmt.Errorf("open lockspace %q: join the recovery of generation %d: %w", name, gen, err)
			}
			joined = true
			sp.resume = make(chan struct{})
			sp.recPhase = recRecovering // prepGen 0: it was in no view before
			if n.halted {
				// Stopped for the next change meanwhile: this recovery
				// does its part but grants nothing; the next Recover
				// takes the lockspace along.
				s.Stop()
				sp.recPhase, sp.prepGen = recStopped, gen
			}
			sp.mu.Lock()
			sp.flush()
			sp.mu.Unlock()
		} else {
			if err := s.SetMembers(gen, n.members); err != nil {
				return nil, fmt.Errorf("open lockspace %q: %w", name, err)
			}
			if n.halted {
				s.Stop()
				sp.resume = make(chan struct{})
				sp.recPhase, sp.prepGen = recStopped, gen
			}
		}
		n.spaces[name] = sp
		n.byID[id] = sp
		sp.log.Debug("lockspace created", "lvb_len", lvbLen, "members", n.members, "generation", gen,
			"stopped", n.halted, "joined_recovery", joined)
		if early := n.early[id]; len(early) > 0 {
			delete(n.early, id)
			for _, m := range early {
				n.earlyN--
				n.earlyBytes -= len(m.payload)
				if n.earlyBy[m.from]--; n.earlyBy[m.from] <= 0 {
					delete(n.earlyBy, m.from)
				}
			}
			sp.mu.Lock()
			for _, m := range early {
				sp.step(m.from, m.gen, m.payload)
			}
			sp.mu.Unlock()
		}
		// Published only now, so no message overtakes the early ones.
		m := maps.Clone(n.byID)
		n.lookup.Store(&m)
	} else if sp.sp.LVBLen() != lvbLen {
		return nil, fmt.Errorf("open lockspace %q: %w: LVB length %d, the lockspace uses %d",
			name, ErrInvalid, lvbLen, sp.sp.LVBLen())
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.nextOwner++
	sp.handles++
	if sp.handles == 1 {
		sp.startDispatcher()
	}
	ls := &Lockspace{sp: sp, owner: sp.nextOwner}
	if sp.open == nil {
		sp.open = make(map[*Lockspace]struct{})
	}
	sp.open[ls] = struct{}{}
	if opts.Recovery != nil {
		sp.addHandler(ls, opts.Recovery)
	}
	return ls, nil
}

// Close releases every handle of every lockspace (their callbacks already
// queued are still delivered), stops the node's goroutines and closes the
// transport. It returns the transport's close error, if any; closing a
// closed node does nothing and returns nil, so deferred and explicit
// closes may both run.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	spaces := n.spaces
	n.spaces = map[string]*space{}
	n.mu.Unlock()
	close(n.stop)
	<-n.stopped
	for _, sp := range spaces {
		sp.mu.Lock()
		hs := make([]*Lockspace, 0, len(sp.open))
		for h := range sp.open {
			hs = append(hs, h)
		}
		sp.mu.Unlock()
		for _, h := range hs {
			_ = h.Release()
		}
		if n.tr != nil {
			sp.sendHeld() // the releases' unlocks, for a graceful goodbye
		}
	}
	n.ctl.close()
	if n.tr != nil {
		if err := n.tr.Close(); err != nil {
			return fmt.Errorf("close node %d: %w", n.id, err)
		}
	}
	return nil
}

// space is the node's copy of one lockspace: the core and the machinery
// around it. mu guards the core and every Lock handle's fields.
type space struct {
	name string
	id   transport.LockspaceID
	node *Node
	log  *slog.Logger

	mu        sync.Mutex
	sp        *Space
	nextOwner OwnerID
	handles   int
	open      map[*Lockspace]struct{}

	// Callbacks for user code (async completions, blocking handlers) run on
	// one dispatcher goroutine, in the order the core produced them.
	dq     []event
	dqBell chan struct{}
	dqStop chan struct{}
	dqDone chan struct{}

	// resume is closed when recovery ends; nil while running.
	resume chan struct{}

	// Recovery events (see recovery_events.go and controller.go): the
	// handlers of the open handles in the order they were opened, where
	// the lockspace is in the Prepare/Departed/Done sequence, the
	// generation RecoverPrepare reported, and the departed nodes of the
	// recovery under way (for handles opened during it).
	handlers    []handleRecovery
	recPhase    recPhase
	prepGen     uint64
	recDeparted []NodeID

	// Outgoing batches per node, and the timer that sends messages held
	// for a carrier (see send).
	batches    []outBatch
	deferTimer *time.Timer
	deferArmed bool
	// parking: the messages being produced are for a reader's batch and
	// wait for its end (stepParked); isParked: the space is listed in
	// node.parked.
	parking  bool
	isParked bool
}

// awaitResume waits, with mu released, until the lockspace resumes after a
// membership change or ctx ends. Called with mu held; returns with it held.
// op and resource name the call, for the error.
func (sp *space) awaitResume(ctx context.Context, op, resource string) error {
	for sp.sp.Stopped() {
		ch := sp.resume
		if ch == nil {
			ch = make(chan struct{})
			sp.resume = ch
		}
		sp.mu.Unlock()
		select {
		case <-ch:
			sp.mu.Lock()
		case <-ctx.Done():
			sp.mu.Lock()
			return fmt.Errorf("%s %q: waiting for recovery: %w", op, resource, ctxErr(ctx.Err()))
		}
	}
	return nil
}

type event struct {
	lk   *Lock
	kind CallbackKind
	mode Mode
	err  error
	done func(*Lock, error)
	rec  *recoveryEvent // for kind recoveryCallback
}

// startDispatcher starts the callback goroutine; called with mu held when
// the first handle opens. A previous dispatcher still draining is waited for,
// so callbacks never run on two goroutines at once.
func (sp *space) startDispatcher() {
	prev := sp.dqDone
	sp.dqBell = make(chan struct{}, 1)
	sp.dqStop = make(chan struct{})
	sp.dqDone = make(chan struct{})
	go sp.dispatch(prev, sp.dqBell, sp.dqStop, sp.dqDone)
}

// stopDispatcher lets the dispatcher deliver what is queued and exit; called
// with mu held when the last handle is released.
func (sp *space) stopDispatcher() { close(sp.dqStop) }

func (sp *space) dispatch(prev, bell, stop, done chan struct{}) {
	defer close(done)
	if prev != nil {
		<-prev
	}
	var batch []event
	for {
		stopping := false
		select {
		case <-bell:
		case <-stop:
			stopping = true
		}
		for {
			sp.mu.Lock()
			batch, sp.dq = sp.dq, batch[:0]
			sp.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			for i := range batch {
				ev := &batch[i]
				switch ev.kind {
				case Completion:
					ev.done(ev.lk, ev.err)
				case Blocking:
					if h := ev.lk.onBlock; h != nil {
						h(ev.lk, ev.mode)
					}
				case recoveryCallback:
					ev.rec.deliver()
				}
				*ev = event{}
			}
		}
		if stopping {
			return
		}
	}
}

func (sp *space) enqueue(ev event) {
	sp.dq = append(sp.dq, ev)
	select {
	case sp.dqBell <- struct{}{}:
	default:
	}
}

// step applies a received message; called with mu held.
func (sp *space) step(from NodeID, gen uint64, payload []byte) {
	if err := sp.sp.Step(from, gen, payload); err != nil {
		sp.log.Warn("dropping malformed lock message", "from", from, "err", err)
		return
	}
	sp.flush()
}

// stepParked applies a message the transport's reader handed over: like
// step, except that the messages it produces are parked in their batches
// until the reader has handled every frame it holds (Node.batchDone), so
// the replies to a burst of requests leave together. Anything else that
// sends to the same node meanwhile takes them along. Called with mu held.
func (sp *space) stepParked(from NodeID, gen uint64, payload []byte) {
	if err := sp.sp.Step(from, gen, payload); err != nil {
		sp.log.Warn("dropping malformed lock message", "from", from, "err", err)
		return
	}
	sp.parking = true
	sp.flush()
	sp.parking = false
	if !sp.isParked {
		for i := range sp.batches {
			if sp.batches[i].send {
				sp.isParked = true
				sp.node.parkMu.Lock()
				sp.node.parked = append(sp.node.parked, sp)
				sp.node.parkedAny.Store(true)
				sp.node.parkMu.Unlock()
				break
			}
		}
	}
}

// flush sends the messages the Space produced and hands its callbacks to
// their lock handles. Called with mu held after every step, so messages leave
// in the order they were made.
func (sp *space) flush() {
	out, cbs := sp.sp.Ready()
	if gen, ok := sp.sp.TakeRecovered(); ok {
		sp.recovered(gen)
	}
	if len(out) > 0 {
		sp.send(out)
	}
	sp.apply(cbs)
}

// sendDue sends every batch that has a message that must go now. Called
// with mu held.
func (sp *space) sendDue() {
	for i := range sp.batches {
		if b := &sp.batches[i]; b.send {
			sp.sendBatch(b)
		}
	}
}

// maxBatch bounds the payload of one frame of batched messages.
const maxBatch = 32 << 10

// outBatch gathers the messages for one node that leave in one frame.
type outBatch struct {
	to   NodeID
	gen  uint64
	buf  []byte
	send bool // something in buf must go now, not just when carried
}

// send hands the Space's messages to the transport, batching: everything
// for one node in one call goes in one frame, and messages nobody waits for
// (Outgoing.Defer) wait in their node's batch for the next message to that
// node, a Flush, or the deferral timer, whichever comes first. Order per node
// is kept. Called with mu held.
func (sp *space) send(out []Outgoing) {
	gen := sp.sp.Generation()
	for _, o := range out {
		b := sp.batchFor(o.To, gen)
		if o.Flush {
			b.send = b.send || len(b.buf) > 0
			continue
		}
		if len(b.buf) > 0 && len(b.buf)+len(o.Payload) > maxBatch {
			sp.sendBatch(b)
		}
		b.buf = append(b.buf, o.Payload...)
		b.send = b.send || !o.Defer
	}
	held := false
	for i := range sp.batches {
		b := &sp.batches[i]
		if b.send && !sp.parking {
			sp.sendBatch(b)
		} else if len(b.buf) > 0 && !b.send {
			held = true
		}
	}
	if held && !sp.deferArmed {
		// Armed only when idle and never stopped early: arming a timer
		// that becomes the earliest one wakes an idle thread.
		sp.deferArmed = true
		if sp.deferTimer == nil {
			sp.deferTimer = time.AfterFunc(sp.node.deferDelay, sp.sendHeld)
		} else {
			sp.deferTimer.Reset(sp.node.deferDelay)
		}
	}
}

// batchFor returns to's batch, first sending what it holds from an older
// generation. Called with mu held.
func (sp *space) batchFor(to NodeID, gen uint64) *outBatch {
	for i := range sp.batches {
		if b := &sp.batches[i]; b.to == to {
			if b.gen != gen && len(b.buf) > 0 {
				sp.sendBatch(b)
			}
			b.gen = gen
			return b
		}
	}
	sp.batches = append(sp.batches, outBatch{to: to, gen: gen})
	return &sp.batches[len(sp.batches)-1]
}

// sendBatch sends b's messages as one frame. Called with mu held.
func (sp *space) sendBatch(b *outBatch) {
	if err := sp.node.tr.Send(transport.NodeID(b.to), sp.id, b.gen, b.buf); err != nil {
		level := slog.LevelError
		if errors.Is(err, transport.ErrClosed) {
			level = slog.LevelDebug // the node is closing
		}
		sp.log.Log(context.Background(), level, "cannot send lock messages", "to", b.to, "bytes", len(b.buf), "err", err)
	}
	b.buf, b.send = b.buf[:0], false
}

// sendHeld is the deferral timer: it sends the messages still waiting for
// a carrier.
func (sp *space) sendHeld() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.deferArmed = false
	for i := range sp.batches {
		if b := &sp.batches[i]; len(b.buf) > 0 {
			sp.sendBatch(b)
		}
	}
}

// apply hands callbacks to their lock handles.
func (sp *space) apply(cbs []Callback) {
	for _, cb := range cbs {
		lk := cb.Tag.(*Lock)
		if cb.Kind == Blocking {
			if lk.onBlock != nil && !lk.gone {
				sp.enqueue(event{lk: lk, kind: Blocking, mode: cb.Mode})
			}
			continue
		}
		lk.mode = cb.Mode
		lk.sbflags = cb.Flags
		lk.lvbseq = cb.LVBSeq
		lk.pending = false
		if cb.Mode == ModeIV {
			lk.gone = true
		}
		var err error
		if cb.Status != StatusOK && !(cb.Status == StatusUnlock && lk.unlocking) {
			err = lk.failure(cb.Status)
		}
		lk.byContext = false
		lk.unlocking = false
		if lk.stopAfter != nil {
			lk.stopAfter()
			lk.stopAfter = nil
		}
		if lk.inflight {
			lk.ls.untrack(lk)
		}
		lk.result = err
		switch {
		case lk.waiter:
			lk.waiter = false
			lk.waitW.Wake()
		case lk.done != nil:
			done := lk.done
			lk.done = nil
			sp.enqueue(event{lk: lk, kind: Completion, err: err, done: done})
		}
	}
}

// Lockspace is one handle to a lockspace on this node. It owns the locks
// taken through it. It is safe for concurrent use.
type Lockspace struct {
	sp       *space
	owner    OwnerID
	released atomic.Bool
	// pending lists this handle's locks with an operation still pending
	// after the call that started it returned, so Release can end them.
	// Guarded by sp.mu.
	pending *Lock
}

// Name returns the lockspace's name ("" for a zero or nil Lockspace).
func (ls *Lockspace) Name() string {
	if ls == nil || ls.sp == nil {
		return ""
	}
	return ls.sp.name
}

// LVBLen returns the lockspace's lock value block length (0 for a zero or
// nil Lockspace).
func (ls *Lockspace) LVBLen() int {
	if ls == nil || ls.sp == nil {
		return 0
	}
	return ls.sp.sp.LVBLen()
}

// Lock is a handle to one lock. Its accessors report the state as of the last
// completed operation.
type Lock struct {
	ls       *Lockspace
	proc     Proc
	resource string
	onBlock  func(*Lock, Mode)

	// Guarded by ls.sp.mu. The synchronous caller itself reads result and
	// takes waitW back without it once woken: the wake-up was sent after
	// they were last written.
	mode      Mode
	sbflags   StatusFlags
	lvbseq    uint32
	lvb       []byte
	pending   bool
	gone      bool
	unlocking bool
	inflight  bool // on the handle's pending list
	done      func(*Lock, error)
	stopAfter func() bool
	waiter    bool         // a synchronous caller waits on waitW
	byContext bool         // a context's end cancelled the pending operation (see failure)
	waitW     *wake.Waiter // taken from internal/wake's pool for a synchronous call
	// The handle's list of locks with an operation pending (inflight).
	prevPending, nextPending *Lock
	result                   error  // outcome of the latest completed operation
	op                       uint64 // counts operations, so a stale deadline cannot cancel a later one
}

// LockRequest is the full form of a lock request.
type LockRequest struct {
	Resource string
	Mode     Mode
	Flags    Flags
	// OnBlock, when set, is called (on the lockspace's callback goroutine)
	// with the blocked mode when this lock blocks another request. It may
	// make locking calls but should not block for long.
	OnBlock func(l *Lock, blocked Mode)
	// LVB, when set, is the lock's initial value block (Linux: the buffer
	// sb_lvbptr points to when dlm_lock is called); it must be exactly the
	// lockspace's LVB length and is copied. What happens to it follows
	// Linux's LVB rules:
	//
	//   - With ValBlk, the grant reads the resource's value into the
	//     lock's block (a new request always reads, whatever its mode), so
	//     the supplied bytes are replaced by the current value.
	//   - Without ValBlk, the grant leaves the block alone: it keeps the
	//     supplied value, and a later Unlock or Convert with ValBlk from PW
	//     or EX writes it to the resource. This is how a lock is taken "with
	//     a value": Lock in EX with LVB, then Unlock or down-Convert with
	//     ValBlk.
	//
	// Without LVB, a lock with ValBlk gets a zeroed block of the right
	// length and one without gets none (until SetLVB or a ValBlk call).
	LVB []byte
}

// errNoLockspace is the error of a call on a zero or nil Lockspace.
var errNoLockspace = fmt.Errorf("%w: lockspace handle not from Node.Open", ErrInvalid)

func (ls *Lockspace) check() error {
	if ls == nil || ls.sp == nil {
		return errNoLockspace
	}
	if ls.released.Load() {
		return ErrReleased
	}
	return nil
}

// Lock requests a lock and waits until it is granted, refused (NoQueue:
// ErrAgain) or cancelled. When ctx ends while the request waits, the request
// is cancelled and Lock returns an error matching both ErrTimeout and
// context.DeadlineExceeded (deadline) or ErrCancel and context.Canceled.
// On any error the returned *Lock is nil: a request that failed leaves no
// lock behind.
func (ls *Lockspace) Lock(ctx context.Context, resource string, mode Mode, flags Flags) (*Lock, error) {
	return ls.Acquire(ctx, LockRequest{Resource: resource, Mode: mode, Flags: flags})
}

// Acquire is Lock with the full request.
func (ls *Lockspace) Acquire(ctx context.Context, req LockRequest) (*Lock, error) {
	lk, wait, err := ls.start(ctx, req, nil)
	if err != nil {
		return nil, err
	}
	if wait {
		err = lk.awaitDone(ctx)
	} else {
		err = lk.result
	}
	if err != nil {
		return nil, err
	}
	return lk, nil
}

// LockAsync requests a lock without waiting. done is called once, on the
// lockspace's callback goroutine, when the request completes (nil error when
// granted). An error returned by LockAsync itself means the request was
// refused outright; then the returned *Lock is nil and done is never
// called. When ctx ends first, the request is cancelled: done gets an error
// matching ErrTimeout and context.DeadlineExceeded, or ErrCancel and
// context.Canceled.
func (ls *Lockspace) LockAsync(ctx context.Context, req LockRequest, done func(*Lock, error)) (*Lock, error) {
	if done == nil {
		return nil, fmt.Errorf("lock %q: %w: nil completion callback", req.Resource, ErrInvalid)
	}
	lk, _, err := ls.start(ctx, req, done)
	return lk, err
}

// start starts a lock request. For a synchronous one (done == nil) it also
// readies the wait, and wait says whether there is one (else the outcome is
// in lk.result already).
func (ls *Lockspace) start(ctx context.Context, req LockRequest, done func(*Lock, error)) (lk *Lock, wait bool, err error) {
	if err := ls.check(); err != nil {
		return nil, false, fmt.Errorf("lock %q: %w", req.Resource, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, false, fmt.Errorf("lock %q: %w", req.Resource, ctxErr(err))
	}
	sp := ls.sp
	lk = &Lock{ls: ls, resource: req.Resource, onBlock: req.OnBlock, mode: ModeIV}
	switch {
	case req.LVB != nil:
		if n := sp.sp.LVBLen(); len(req.LVB) != n {
			return nil, false, fmt.Errorf("lock %q: %w: LVB is %d bytes, lockspace uses %d", req.Resource, ErrInvalid, len(req.LVB), n)
		}
		lk.lvb = bytes.Clone(req.LVB)
	case req.Flags&ValBlk != 0:
		lk.lvb = make([]byte, sp.sp.LVBLen())
	}
	sp.mu.Lock()
	if err := sp.awaitResume(ctx, "lock", req.Resource); err != nil {
		sp.mu.Unlock()
		return nil, false, err
	}
	if ls.released.Load() {
		sp.mu.Unlock()
		return nil, false, fmt.Errorf("lock %q: %w", req.Resource, ErrReleased)
	}
	lk.pending = true
	lk.done = done
	lk.op++
	err = sp.sp.Lock(&lk.proc, Request{
		Resource: req.Resource, Mode: req.Mode, Flags: req.Flags, LVB: lk.lvb,
		Owner: ls.owner, Blocking: req.OnBlock != nil, Tag: lk,
	})
	if err != nil {
		sp.mu.Unlock()
		return nil, false, err
	}
	sp.flush()
	if lk.pending {
		ls.track(ctx, lk)
	}
	if done == nil {
		wait = lk.prepareWait(ctx)
	}
	sp.mu.Unlock()
	return lk, wait, nil
}

// track notes a lock whose operation is still pending after its call
// returned: Release must be able to end it, and ctx's end cancels it.
// Called with mu held.
func (ls *Lockspace) track(ctx context.Context, lk *Lock) {
	lk.inflight = true
	lk.prevPending, lk.nextPending = nil, ls.pending
	if ls.pending != nil {
		ls.pending.prevPending = lk
	}
	ls.pending = lk
	if lk.done != nil && ctx.Done() != nil {
		op := lk.op
		lk.stopAfter = context.AfterFunc(ctx, func() { lk.cancelWith(op, ctx.Err()) })
	}
}

// untrack takes a lock off the pending list. Called with mu held.
func (ls *Lockspace) untrack(lk *Lock) {
	lk.inflight = false
	if lk.prevPending != nil {
		lk.prevPending.nextPending = lk.nextPending
	} else {
		ls.pending = lk.nextPending
	}
	if lk.nextPending != nil {
		lk.nextPending.prevPending = lk.prevPending
	}
	lk.prevPending, lk.nextPending = nil, nil
}

// prepareWait readies a synchronous call to wait for the lock's pending
// operation, in the same critical section that started it; it reports false
// (and returns the waiter, giving up its claim) if the operation is already
// over. Called with mu held.
func (lk *Lock) prepareWait(ctx context.Context) bool {
	if !lk.pending {
		lk.putWaiter()
		return false
	}
	lk.getWaiter(ctx.Done() != nil)
	lk.waiter = true
	return true
}

// awaitDone blocks, without mu, until the operation prepareWait readied the
// lock for completes, and returns its outcome. Whoever completes it (the
// transport's reader goroutine handling the reply, a local completion, a
// cancellation) wakes the waiter; see internal/wake for why that is not a
// channel.
func (lk *Lock) awaitDone(ctx context.Context) error {
	w := lk.waitW
	if !w.Wait(ctx) {
		lk.cancelWith(lk.opNow(), ctx.Err())
		w.Wait(context.Background())
	}
	// Wake was called after the outcome was recorded (under mu, by apply),
	// and the wait saw it through an atomic: these reads come after those
	// writes.
	err := lk.result
	lk.waitW = nil
	wake.Put(w)
	return err
}

// getWaiter returns the lock's waiter, taking an idle one if it has none:
// for a wait whose context can end, a channel-backed one (the wait selects
// on the context; an eventfd-backed one would need context.AfterFunc, which
// measured dearer than the thread wake-up it saves, BENCHMARKS.md), else one
// from wake.Get. Called with mu held.
func (lk *Lock) getWaiter(cancellable bool) *wake.Waiter {
	if lk.waitW == nil {
		if cancellable {
			lk.waitW = wake.GetChannel()
		} else {
			lk.waitW = wake.Get()
		}
	}
	return lk.waitW
}

// putWaiter gives back the lock's unused waiter, if it has one. Called
// with mu held.
func (lk *Lock) putWaiter() {
	w := lk.waitW
	if w == nil {
		return
	}
	lk.waitW = nil
	wake.Put(w)
}

func (lk *Lock) opNow() uint64 {
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return lk.op
}

// cancelWith cancels operation op of the lock, if it is still the pending
// one, because a context ended with cause (its Err): the operation
// completes with the matching status (StatusTimeout or StatusCancel), and
// its error also matches cause.
func (lk *Lock) cancelWith(op uint64, cause error) {
	sp := lk.ls.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if lk.pending && !lk.gone && lk.op == op {
		lk.byContext = true
		_ = sp.sp.Cancel(&lk.proc, ctxStatus(cause))
		sp.flush()
	}
}

// Stats returns the node's counters of messages held for lockspaces not yet
// opened here.
func (n *Node) Stats() NodeStats {
	n.mu.Lock()
	defer n.mu.Unlock()
	return NodeStats{EarlyHeld: n.earlyN, EarlyBytes: n.earlyBytes, EarlyDropped: n.earlyDropped}
}

// Stats returns the lockspace's counters and the size of the state other
// nodes hold here (see SpaceStats), or zero on a zero or released handle.
func (ls *Lockspace) Stats() SpaceStats {
	if ls == nil || ls.sp == nil {
		return SpaceStats{}
	}
	ls.sp.mu.Lock()
	defer ls.sp.mu.Unlock()
	return ls.sp.sp.Stats()
}
