// Package node runs one storage node's cluster machinery: the failure
// detector (memberlist gossip), the view agreement on top of it, the lock
// manager, fencing and the durable state store, wired the way
// docs/membership.md requires.
//
// The agreement decides; this package carries out its decisions in order:
// the hard state is synced to the store before any message leaves; a lost
// quorum or a starting view change stops the DLM at once; a failed node is
// fenced (with a time limit per attempt) before any view without it is
// installed; an installed view runs DLM recovery, and the agreement is told
// when every lockspace has recovered. Every decision is logged with slog,
// with the reason the cluster took it. See docs/node.md.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/membership/gossip"
)

// NodeID is the cluster node ID (ddraid, gossip and DLM use the same one).
type NodeID = membership.NodeID

// dlmGeneration maps an agreed view's generation to the DLM generation it
// is installed as. A dlm.Node starts at generation 1 with its static peer
// list, and the agreement's first view is also generation 1, which the DLM
// would refuse as not newer. Every node applies the same shift, so DLM
// generations stay equal across the cluster and ordered like the views.
func dlmGeneration(viewGen uint64) uint64 { return viewGen + 1 }

func dlmIDs(ids []NodeID) []dlm.NodeID {
	out := make([]dlm.NodeID, len(ids))
	for i, id := range ids {
		out[i] = dlm.NodeID(id)
	}
	return out
}

// Node is one storage node's cluster membership, lock manager and fencing.
// Create it with New; it runs until Close.
type Node struct {
	cfg   Config
	log   *slog.Logger
	store *Store
	dlm   *dlm.Node
	det   *gossip.Detector
	run   *gossip.Runner

	// dlmAdvertise is the DLM address published through gossip (peers.go).
	dlmAdvertise string

	cancel   context.CancelFunc
	runDone  chan struct{}
	joinDone chan struct{}
	exited   chan struct{}
	closed   sync.Once

	mu         sync.Mutex
	spaces     map[string]bool   // lockspaces opened through Open
	recovered  map[string]uint64 // newest DLM generation each lockspace reported
	pending    uint64            // view whose recovery is awaited, 0 if none
	doneGen    uint64            // last view fully recovered here
	dlmStopped bool              // Stop called and no Recover since
	// everRecovered: the DLM has been recovered into some view by this
	// process (before that it holds no state from any view).
	everRecovered bool
	deadAt        map[NodeID]time.Time
	lastAlive     []NodeID
	runErr        error
	exitedShut    bool
	recoverFrom   map[uint64]time.Time // view gen → when its recovery started
}

// New opens the state store, starts the DLM (stopped until the first agreed
// view is installed: before that nothing is quorate), the agreement and the
// failure detector, and starts joining cfg.Seeds in the background.
func New(cfg Config) (*Node, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("node %s: invalid configuration: %w", cfg.ID, err)
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	n := &Node{cfg: cfg, log: lg.With("node", cfg.ID), runDone: make(chan struct{}), joinDone: make(chan struct{}),
		exited: make(chan struct{}), spaces: map[string]bool{}, recovered: map[string]uint64{},
		deadAt: map[NodeID]time.Time{}, recoverFrom: map[uint64]time.Time{}}
	st, err := OpenStore(cfg.DataDir, cfg.ID, lg)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	n.store = st
	hs, found, err := st.LoadHardState()
	if err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	if found {
		n.log.Info("loaded persisted membership state", "installed_gen", hs.Installed.Gen,
			"installed_members", hs.Installed.Members, "promised", hs.Promised)
	} else {
		n.log.Info("no persisted membership state: first start of this node", "data_dir", cfg.DataDir)
	}

	peers := make(map[dlm.NodeID]string, len(cfg.Peers))
	for id, addr := range cfg.Peers {
		peers[dlm.NodeID(id)] = addr
	}
	dn, err := dlm.NewNode(dlm.Config{ID: dlm.NodeID(cfg.ID), Peers: peers, ListenAddr: cfg.DLMListenAddr,
		Listener: cfg.DLMListener, ClusterKey: cfg.ClusterKey, Logger: lg, Transport: cfg.Transport,
		TickInterval: cfg.DLMTick, OnRecovered: n.onRecovered})
	if err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("node %s: starting the lock manager: %w", cfg.ID, err)
	}
	n.dlm = dn
	if n.dlmAdvertise, err = dlmAdvertiseAddr(cfg, dn.Addr()); err != nil {
		dn.Close()
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	// No view yet, so not quorate: nothing may be granted until the first
	// agreed view is installed and recovered.
	dn.Stop()
	n.dlmStopped = true

	run, err := gossip.NewRunner(gossip.RunnerConfig{
		Agreement: membership.Config{Self: cfg.ID, Quorum: cfg.Quorum, State: hs,
			PrepareTimeout: cfg.PrepareTimeout, RetransmitTicks: cfg.RetransmitTicks, FenceRetryTicks: cfg.FenceRetryTicks},
		Tick: cfg.Tick,
		Send: func(to NodeID, p []byte) error { return n.det.Send(to, p) },
		Hooks: gossip.Hooks{
			Persist: n.persist,
			Quorate: n.quorateChanged,
			Stop:    n.stopForChange,
			Install: n.install,
			Fence:   n.fence,
			Exited:  n.onExited,
		},
		Logger: lg,
	})
	if err != nil {
		dn.Close()
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	n.run = run
	det, err := gossip.NewDetector(gossip.Config{Self: cfg.ID, BindAddr: cfg.GossipBindAddr, Port: cfg.GossipPort,
		ClusterKey: cfg.ClusterKey, Profile: cfg.Profile, Logger: lg,
		Meta: gossip.Meta{DLMAddr: n.dlmAdvertise}, OnMeta: n.onMeta}, n.aliveChanged, run.Deliver)
	if err != nil {
		dn.Close()
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	n.det = det
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go n.runAgreement(ctx)
	go n.joinLoop(ctx)
	n.log.Info("node started", "gossip", det.Addr(), "dlm", dn.Addr(), "dlm_advertised", n.dlmAdvertise, "profile", cfg.Profile,
		"quorum", cfg.Quorum.String(), "peers", len(cfg.Peers))
	return n, nil
}

func (n *Node) runAgreement(ctx context.Context) {
	defer close(n.runDone)
	err := n.run.Run(ctx)
	if err == nil || errors.Is(err, context.Canceled) {
		return
	}
	// The agreement cannot go on without durable state; this node must not
	// keep granting locks on a view it can no longer follow.
	n.mu.Lock()
	n.runErr = err
	n.dlmStopped = true
	n.mu.Unlock()
	n.dlm.Stop()
	n.log.Error("membership agreement stopped; the lock manager is stopped and this node needs a restart", "err", err)
}

// joinLoop contacts the seeds until some other node is alive, and again
// whenever this node finds itself alone (e.g. every peer restarted).
func (n *Node) joinLoop(ctx context.Context) {
	defer close(n.joinDone)
	if len(n.cfg.Seeds) == 0 {
		return
	}
	t := time.NewTicker(n.cfg.JoinRetry)
	defer t.Stop()
	for {
		if len(n.det.Alive()) <= 1 {
			if err := n.det.Join(n.cfg.Seeds); err != nil {
				n.log.Debug("joining the cluster: no seed answered yet", "seeds", n.cfg.Seeds, "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (n *Node) emit(e Event) {
	if f := n.cfg.OnEvent; f != nil {
		if e.Time.IsZero() {
			e.Time = time.Now()
		}
		f(e)
	}
}

// aliveChanged is the failure detector's callback (memberlist goroutine).
func (n *Node) aliveChanged(alive []NodeID) {
	now := time.Now()
	n.mu.Lock()
	for _, id := range n.lastAlive {
		if !slices.Contains(alive, id) {
			n.deadAt[id] = now
		}
	}
	for _, id := range alive {
		delete(n.deadAt, id)
	}
	n.lastAlive = slices.Clone(alive)
	n.mu.Unlock()
	n.emit(Event{Kind: EventAlive, Time: now, Nodes: slices.Clone(alive)})
	n.run.SetAlive(alive)
}

func (n *Node) persist(hs membership.HardState) error { return n.store.SaveHardState(hs) }

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

func (n *Node) quorateChanged(q bool) {
	present, need, total, in := n.quorumLine()
	v := n.run.View()
	if !q {
		n.stopDLM()
		n.log.Warn(fmt.Sprintf("lost quorum: %d of %d data nodes alive (need %d of %d data nodes); lock requests wait and array I/O stops until a quorate view is installed",
			present, total, need, total), "gen", v.Gen, "view", v.Members, "alive_in_view", in,
			"quorum", n.cfg.Quorum.Describe(in))
	} else {
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
	n.dlm.Stop()
}

func (n *Node) stopForChange(v membership.View) {
	n.stopDLM()
	n.log.Info("view change began: lock manager stopped until the new view is installed and recovered",
		"ballot", v.Gen, "intended_members", v.Members, "current_view", n.run.View().Gen)
	n.emit(Event{Kind: EventStop, Gen: v.Gen, Nodes: slices.Clone(v.Members)})
}

// install runs DLM recovery for an agreed view (on the agreement's
// goroutine; recovery itself proceeds in the DLM and reports through
// onRecovered).
func (n *Node) install(in membership.Install) {
	// Departed nodes failed and were fenced; nodes that left released their
	// locks already; rejoined nodes restarted and lost their lock state.
	// All of them are recovered the same way: purge what the old view knew
	// of their locks.
	// This node itself may be among the rejoined (it restarted); Reset
	// covers that, and a node does not purge itself.
	purge := slices.DeleteFunc(slices.Concat(in.Departed, in.Left, in.Rejoined), func(id NodeID) bool { return id == n.cfg.ID })
	slices.Sort(purge)
	purge = slices.Compact(purge)
	gen := in.View.Gen
	n.log.Info("installing agreed view: starting lock recovery",
		"gen", gen, "members", in.View.Members, "prev_gen", in.Prev.Gen, "prev_members", in.Prev.Members,
		"departed_fenced", in.Departed, "left", in.Left, "joined", in.Joined, "rejoined", in.Rejoined,
		"reset", in.Reset, "dlm_generation", dlmGeneration(gen))
	n.mu.Lock()
	n.pending = gen
	n.recoverFrom[gen] = time.Now()
	reset := in.Reset
	if reset && !n.everRecovered {
		// Reset drops the lock state of an older view. This lock manager
		// was started by this process and has never held a view, so there
		// is nothing to drop; and dlm's reset also discards the recovery
		// messages of the new generation that peers sent before this node
		// got here, which would leave its recovery waiting forever (see
		// docs/node.md). Without old state, a plain recovery is the same.
		reset = false
		n.log.Info("reset requested, but this lock manager holds no state from an earlier view (fresh start): recovering without reset",
			"gen", gen)
	}
	err := n.dlm.Recover(dlmGeneration(gen), dlmIDs(in.View.Members), dlmIDs(purge), reset)
	if err == nil {
		n.dlmStopped = false
		n.everRecovered = true
	}
	n.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("node %s: view %d: %w", n.cfg.ID, gen, err)
		n.log.Error("lock recovery could not start; this node will not report the view recovered", "gen", gen, "err", err)
	}
	n.emit(Event{Kind: EventInstall, Gen: gen, Nodes: slices.Clone(in.View.Members), Err: err})
	if err == nil {
		n.checkRecovered()
	}
}

// onRecovered is the DLM's report that one lockspace reached a generation.
func (n *Node) onRecovered(name string, gen uint64) {
	n.mu.Lock()
	if gen > n.recovered[name] {
		n.recovered[name] = gen
	}
	n.mu.Unlock()
	n.checkRecovered()
}

// checkRecovered reports RecoveryDone once every lockspace opened through
// Open has recovered into the pending view.
func (n *Node) checkRecovered() {
	n.mu.Lock()
	gen := n.pending
	if gen == 0 {
		n.mu.Unlock()
		return
	}
	want := dlmGeneration(gen)
	for name := range n.spaces {
		if n.recovered[name] < want {
			n.mu.Unlock()
			return
		}
	}
	n.pending = 0
	n.doneGen = gen
	started := n.recoverFrom[gen]
	for g := range n.recoverFrom {
		if g <= gen {
			delete(n.recoverFrom, g)
		}
	}
	spaces := len(n.spaces)
	n.mu.Unlock()
	n.log.Info("lock recovery done: locks are granted again", "gen", gen, "lockspaces", spaces,
		"took", time.Since(started).Round(time.Microsecond))
	n.emit(Event{Kind: EventRecovered, Gen: gen})
	n.run.RecoveryDone(gen)
}

// fence runs the configured fencer for one failed node, with the configured
// time limit. A failure is reported to the agreement, which asks again
// later; the view is not installed meanwhile.
func (n *Node) fence(ctx context.Context, req membership.FenceRequest) error {
	n.mu.Lock()
	failedAt, ok := n.deadAt[req.Node]
	n.mu.Unlock()
	if !ok {
		failedAt = time.Now()
	}
	n.log.Warn("fencing a failed node before its locks are recovered", "victim", req.Node, "gen", req.Gen,
		"failed_at", failedAt.Format(time.RFC3339Nano), "timeout", n.cfg.FenceTimeout)
	fctx, cancel := context.WithTimeout(ctx, n.cfg.FenceTimeout)
	defer cancel()
	start := time.Now()
	res, err := n.cfg.Fencer.Fence(fctx, fence.Request{Node: req.Node, FailedAt: failedAt, Generation: req.Gen})
	if err != nil {
		err = fmt.Errorf("node %s: fencing node %s for view %d: %w", n.cfg.ID, req.Node, req.Gen, err)
		n.log.Warn("fence failed; the view stays uninstalled and the fence is retried", "victim", req.Node,
			"gen", req.Gen, "took", time.Since(start).Round(time.Microsecond), "err", err)
	} else {
		n.log.Info("node fenced", "victim", req.Node, "gen", req.Gen, "method", res.Method, "verified", res.Verified,
			"took", time.Since(start).Round(time.Microsecond))
	}
	n.emit(Event{Kind: EventFence, Gen: req.Gen, Nodes: []NodeID{req.Node}, Err: err})
	return err
}

func (n *Node) onExited() {
	n.mu.Lock()
	if !n.exitedShut {
		n.exitedShut = true
		close(n.exited)
	}
	n.mu.Unlock()
	n.log.Info("graceful leave complete: this node is out of the view")
}

// Open returns a handle to the named lockspace (see dlm.Node.Open). Open
// lockspaces through the Node, not through DLM(): the node reports a view
// recovered only when every lockspace it knows of has recovered.
func (n *Node) Open(name string, opts dlm.OpenOptions) (*dlm.Lockspace, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	ls, err := n.dlm.Open(name, opts)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", n.cfg.ID, err)
	}
	if !n.spaces[name] {
		n.spaces[name] = true
		if !n.dlmStopped {
			// Created after the last Recover: it starts at the current
			// generation and has nothing to recover.
			if g := n.dlm.Generation(); g > n.recovered[name] {
				n.recovered[name] = g
			}
		}
	}
	return ls, nil
}

// DLM returns the node's lock manager, for statistics and inspection.
func (n *Node) DLM() *dlm.Node { return n.dlm }

// ID returns this node's ID.
func (n *Node) ID() NodeID { return n.cfg.ID }

// GossipAddr is this node's gossip endpoint ("host:port"), for other nodes'
// Seeds.
func (n *Node) GossipAddr() string { return n.det.Addr() }

// DLMAddr is the address the DLM transport listens on.
func (n *Node) DLMAddr() net.Addr { return n.dlm.Addr() }

// Join contacts gossip endpoints now (in addition to the background retries
// over Config.Seeds).
func (n *Node) Join(addrs []string) error {
	if err := n.det.Join(addrs); err != nil {
		return fmt.Errorf("node %s: %w", n.cfg.ID, err)
	}
	return nil
}

// Alive returns the failure detector's current alive set.
func (n *Node) Alive() []NodeID { return n.det.Alive() }

// Status is a snapshot of the node's membership.
type Status struct {
	// View is the last installed view.
	View membership.View
	// Quorate is the local quorum status.
	Quorate bool
	// Recovered is the last view whose lock recovery finished here; locks
	// are granted when Recovered == View.Gen, Quorate and not Stopped.
	Recovered uint64
	// Stopped: the lock manager is stopped (a loss of quorum or a view
	// change began) and has not recovered into a view since. After a brief
	// loss of quorum the view may be unchanged; the agreement then installs
	// a new view with the same members, and recovery into it resumes the
	// lock manager.
	Stopped bool
	// Err is set when the agreement stopped (the state store failed).
	Err error
}

// Status returns the node's membership status.
func (n *Node) Status() Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	return Status{View: n.run.View(), Quorate: n.run.Quorate(), Recovered: n.doneGen, Stopped: n.dlmStopped, Err: n.runErr}
}

// Leave leaves the cluster gracefully: the other nodes remove this node from
// the view without fencing it. Call it after releasing every lock and
// stopping array I/O; it returns when a view without this node is
// committed, or with ctx's error. Close the node afterwards.
func (n *Node) Leave(ctx context.Context) error {
	n.run.Leave()
	select {
	case <-n.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("node %s: leaving the cluster: %w", n.cfg.ID, ctx.Err())
	}
}

// Close stops the node without telling anyone (to the others it looks like a
// crash unless Leave completed first): the agreement, gossip, the lock
// manager and the state store, in that order.
func (n *Node) Close() error {
	var err error
	n.closed.Do(func() {
		n.cancel()
		<-n.runDone
		<-n.joinDone
		var errs []error
		if e := n.det.Shutdown(); e != nil {
			errs = append(errs, e)
		}
		n.dlm.Close()
		if e := n.store.Close(); e != nil {
			errs = append(errs, e)
		}
		if len(errs) > 0 {
			err = fmt.Errorf("node %s: close: %w", n.cfg.ID, errors.Join(errs...))
		}
		n.log.Info("node stopped")
	})
	return err
}
