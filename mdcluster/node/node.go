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
	ctl   *dlm.Controller // the DLM's membership controls (Stop, Recover)
	det   *gossip.Detector
	run   *gossip.Runner

	// dlmAdvertise is the DLM address published through gossip (peers.go).
	dlmAdvertise string

	cancel   context.CancelFunc
	runDone  chan struct{}
	joinDone chan struct{}
	exited   chan struct{}
	closed   sync.Once

	mu          sync.Mutex
	doneGen     uint64 // last view fully recovered here
	dlmStopped  bool   // Stop called and no Recover since
	deadAt      map[NodeID]time.Time
	lastAlive   []NodeID
	hidden      []NodeID // HideNodes: nodes this node treats as dead
	runErr      error
	exitedShut  bool
	recoverFrom map[uint64]time.Time // view gen → when its recovery started
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
		exited: make(chan struct{}),
		deadAt: map[NodeID]time.Time{}, recoverFrom: map[uint64]time.Time{}}
	st, err := openStore(cfg, lg)
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
	// Managed: the DLM starts stopped at generation 0 with no peer in its
	// view (no view yet, so not quorate: nothing may be granted before the
	// first agreed view is installed and recovered), and recovers into
	// each view under the view's own generation.
	dn, err := dlm.NewNode(dlm.Config{ID: dlm.NodeID(cfg.ID), Peers: peers, ListenAddr: cfg.DLMListenAddr,
		Listener: cfg.DLMListener, ClusterKey: cfg.ClusterKey, Logger: lg, Transport: cfg.Transport,
		TickInterval: cfg.DLMTick, Managed: true})
	if err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("node %s: starting the lock manager: %w", cfg.ID, err)
	}
	n.dlm = dn
	n.ctl = dn.Controller()
	if n.dlmAdvertise, err = dlmAdvertiseAddr(cfg, dn.Addr()); err != nil {
		_ = dn.Close()
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	n.dlmStopped = true

	startupFence := 0
	if cfg.StartupFenceAfter > 0 && cfg.Tick > 0 {
		startupFence = int((cfg.StartupFenceAfter + cfg.Tick - 1) / cfg.Tick)
	}
	run, err := gossip.NewRunner(gossip.RunnerConfig{
		Agreement: membership.Config{Self: cfg.ID, Quorum: cfg.Quorum, State: hs,
			PrepareTimeout: cfg.PrepareTimeout, RetransmitTicks: cfg.RetransmitTicks, FenceRetryTicks: cfg.FenceRetryTicks,
			StartupFenceAfter: startupFence},
		Tick: cfg.Tick,
		Send: func(to NodeID, p []byte) error { return n.det.Send(to, p) },
		Hooks: gossip.Hooks{
			Persist:      n.persist,
			Quorate:      n.quorateChanged,
			Stop:         n.stopLockManager,
			Recover:      n.recoverView,
			RecoveryDone: n.recoveryDone,
			Fence:        n.fence,
			Exited:       n.onExited,
		},
		Logger: lg,
	})
	if err != nil {
		dn.Close()
		_ = st.Close()
		return nil, fmt.Errorf("node %s: %w", cfg.ID, err)
	}
	n.run = run
	// Recovery reports go to the applier in order, on the controller's
	// goroutine; registered once the Runner exists to take them.
	n.ctl.OnRecovered(n.onRecovered)
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
	n.ctl.Stop()
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
	if len(n.hidden) > 0 {
		alive = slices.DeleteFunc(slices.Clone(alive), func(id NodeID) bool { return slices.Contains(n.hidden, id) })
	}
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
	// A new lockspace has recovered into no view yet: created after the
	// last Recover, it joins that view's recovery (the other members wait
	// for its part, see dlm.Node.Open) and reports the generation through
	// OnRecovered when it ends; created while stopped, it is taken along
	// by the next Recover. Either way it counts as recovered into nothing
	// until it reports. (Only a lockspace's first Open counts; the applier
	// ignores the others, and a report that comes first is kept.)
	n.run.LockspaceOpened(name, 0)
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

// HideNodes makes this node treat the given nodes as dead from now on,
// whatever its failure detector says; HideNodes(nil) shows them again. It
// is fault injection for tests: a false suspicion under load, where a live
// node is left out of a view and readmitted without restarting (hide it on
// the others and them on it, for a while). Gossip and lock traffic still
// flow; only the alive set the agreement sees changes.
func (n *Node) HideNodes(ids []NodeID) {
	n.mu.Lock()
	n.hidden = slices.Clone(ids)
	n.mu.Unlock()
	n.aliveChanged(n.det.Alive())
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
