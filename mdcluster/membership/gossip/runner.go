package gossip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/membership/apply"
)

// Hooks are the daemon's part of carrying out the agreement's decisions:
// the lock manager and the state store. The order in which they run, and
// what an Install means for the lock manager, is the apply.Applier's (the
// same code the simulator runs); the Runner sends the messages, runs the
// fences and logs. Each hook but Fence runs on the Runner's goroutine (and
// RecoveryDone also on the goroutine of Runner.LockspaceRecovered's
// caller), so it must return promptly; nil hooks are skipped.
type Hooks struct {
	// Persist stores the hard state; it runs before any message is sent.
	// An error stops the Runner: sending without a durable promise could
	// let this node vote twice.
	Persist func(membership.HardState) error
	// Quorate reports a change of the local quorum status. It stops
	// nothing itself: on a loss, Stop has already run.
	Quorate func(quorate bool)
	// Stop suspends the lockspaces (quorum lost, a view change began, or
	// a stop re-applied after an install).
	Stop func(apply.Stop)
	// Recover installs a view in the lock manager and starts its
	// recovery; report each lockspace's end with Runner.LockspaceRecovered.
	Recover func(apply.Recovery) error
	// RecoveryDone reports that every lockspace recovered into view gen;
	// the Runner tells the agreement right after.
	RecoveryDone func(gen uint64)
	// Fence fences a failed node and returns nil only when it is confirmed
	// fenced (e.g. a fence.Retrier around the configured fence.Levels). It
	// runs on its own goroutine; its result goes back to the agreement.
	Fence func(ctx context.Context, req membership.FenceRequest) error
	// Exited reports that a graceful leave completed.
	Exited func()
}

// RunnerConfig configures a Runner.
type RunnerConfig struct {
	// Agreement configures the state machine.
	Agreement membership.Config
	// Tick is the length of one agreement tick. Default 20 ms, so the
	// default PrepareTimeout of 10 ticks is 200 ms.
	Tick time.Duration
	// Send delivers a message to a peer (e.g. Detector.Send). Errors are
	// logged at debug level; the agreement retransmits what matters.
	Send func(to NodeID, payload []byte) error
	// Hooks receive the decisions.
	Hooks Hooks
	// Logger receives the agreement's decision log; nil uses slog.Default.
	Logger *slog.Logger
}

type inMsg struct {
	from    NodeID
	payload []byte
}

type fenceDone struct {
	node NodeID
	ok   bool
}

// Runner drives one node's Agreement: a single goroutine (Run) owns the
// machine and serialises messages, failure-detector updates, ticks, fence
// results and the application's calls. Every Ready goes through an
// apply.Applier, whose effects are the Runner's (send, fence, log) and the
// Hooks.
type Runner struct {
	cfg  RunnerConfig
	a    *membership.Agreement
	ap   *apply.Applier
	log  *slog.Logger
	msgs chan inMsg
	// ctx is Run's context, for the fences Run's goroutine starts.
	ctx context.Context

	mu       sync.Mutex
	alive    []NodeID
	aliveSet bool
	aliveSig chan struct{}
	// doneGens are views whose recovery finished, for the agreement
	// (queued without blocking: the report may come from Run's own
	// goroutine).
	doneGens []uint64
	doneSig  chan struct{}

	fences  chan fenceDone
	leave   chan struct{}
	view    atomic.Pointer[membership.View]
	quorate atomic.Bool
	dropped atomic.Uint64
}

// NewRunner builds the Agreement for cfg; call Run to start it.
func NewRunner(cfg RunnerConfig) (*Runner, error) {
	if cfg.Send == nil {
		return nil, errors.New("gossip: RunnerConfig.Send is not set")
	}
	if cfg.Tick <= 0 {
		cfg.Tick = 20 * time.Millisecond
	}
	a, err := membership.New(cfg.Agreement)
	if err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	r := &Runner{cfg: cfg, a: a, log: logger.With("node", cfg.Agreement.Self), ctx: context.Background(),
		msgs: make(chan inMsg, 1024), aliveSig: make(chan struct{}, 1), doneSig: make(chan struct{}, 1),
		fences: make(chan fenceDone, 64), leave: make(chan struct{}, 1)}
	r.ap, err = apply.New(apply.Config{Self: cfg.Agreement.Self, Effects: effects{r}})
	if err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	v := a.View()
	r.view.Store(&v)
	return r, nil
}

// Deliver queues a message from a peer. It never blocks: when the queue is
// full the message is dropped (and counted); the protocol retransmits.
func (r *Runner) Deliver(from NodeID, payload []byte) {
	select {
	case r.msgs <- inMsg{from, payload}:
	default:
		r.dropped.Add(1)
	}
}

// SetAlive records the failure detector's latest belief. It never blocks;
// only the newest set is kept.
func (r *Runner) SetAlive(alive []NodeID) {
	r.mu.Lock()
	r.alive, r.aliveSet = append([]NodeID(nil), alive...), true
	r.mu.Unlock()
	select {
	case r.aliveSig <- struct{}{}:
	default:
	}
}

// LockspaceOpened tells the Runner that the lock manager has lockspace
// name, already recovered into generation gen (0: it has yet to recover):
// the agreement hears RecoveryDone for a view only once every such
// lockspace has recovered into it (see apply.Applier.LockspaceOpened). Safe
// from any goroutine; it calls no hook.
func (r *Runner) LockspaceOpened(name string, gen uint64) { r.ap.LockspaceOpened(name, gen) }

// LockspaceRecovered reports that lockspace name finished recovering into
// generation gen (the lock manager's recovery callback). Safe from any
// goroutine; when it completes the pending view, Hooks.RecoveryDone runs on
// the caller's goroutine and the agreement is told.
func (r *Runner) LockspaceRecovered(name string, gen uint64) { r.ap.LockspaceRecovered(name, gen) }

// Lockspaces returns how many lockspaces a view's recovery waits for.
func (r *Runner) Lockspaces() int { return r.ap.Lockspaces() }

// Leave starts a graceful leave (after the daemon stopped I/O and released
// its locks); Hooks.Exited reports its end.
func (r *Runner) Leave() {
	select {
	case r.leave <- struct{}{}:
	default:
	}
}

// View returns the last installed view.
func (r *Runner) View() membership.View { return *r.view.Load() }

// Quorate returns the last quorum status.
func (r *Runner) Quorate() bool { return r.quorate.Load() }

// Dropped counts messages dropped because the queue was full.
func (r *Runner) Dropped() uint64 { return r.dropped.Load() }

// Run drives the agreement until ctx is done or persisting fails.
func (r *Runner) Run(ctx context.Context) error {
	r.ctx = ctx
	t := time.NewTicker(r.cfg.Tick)
	defer t.Stop()
	if err := r.handle(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			r.a.Tick()
		case m := <-r.msgs:
			if err := r.a.Step(m.from, m.payload); err != nil {
				r.log.Warn("refused a membership message", "from", m.from, "err", err)
			}
		case <-r.aliveSig:
			r.mu.Lock()
			alive, ok := r.alive, r.aliveSet
			r.mu.Unlock()
			if ok {
				r.a.SetAlive(alive)
			}
		case f := <-r.fences:
			r.a.FenceResult(f.node, f.ok)
		case <-r.doneSig:
			r.mu.Lock()
			gens := r.doneGens
			r.doneGens = nil
			r.mu.Unlock()
			for _, g := range gens {
				r.a.RecoveryDone(g)
			}
		case <-r.leave:
			r.a.Leave()
		}
		if err := r.handle(); err != nil {
			return err
		}
	}
}

// handle carries out the agreement's current Ready through the Applier.
func (r *Runner) handle() error {
	rd := r.a.Ready()
	if rd.Empty() {
		return nil
	}
	if err := r.ap.Apply(rd); err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	return nil
}

// effects are the Runner's side of apply.Effects: sending, fencing and
// logging are its own; the rest goes to the Hooks.
type effects struct{ r *Runner }

func (e effects) Persist(hs membership.HardState) error {
	if h := e.r.cfg.Hooks.Persist; h != nil {
		return h(hs)
	}
	return nil
}

func (e effects) StopLockManager(st apply.Stop) {
	if h := e.r.cfg.Hooks.Stop; h != nil {
		h(st)
	}
}

func (e effects) Send(m membership.Outgoing) {
	if err := e.r.cfg.Send(m.To, m.Payload); err != nil {
		e.r.log.Debug("membership message not sent", "to", m.To, "err", err)
	}
}

func (e effects) RecoverLockManager(rc apply.Recovery) error {
	v := rc.Install.View
	e.r.view.Store(&v)
	if h := e.r.cfg.Hooks.Recover; h != nil {
		return h(rc)
	}
	return nil
}

// RequestFence runs the fence on its own goroutine: it may take a minute,
// and the agreement must go on answering meanwhile.
func (e effects) RequestFence(req membership.FenceRequest) { go e.r.fence(e.r.ctx, req) }

func (e effects) QuorumChanged(q bool) {
	e.r.quorate.Store(q)
	if h := e.r.cfg.Hooks.Quorate; h != nil {
		h(q)
	}
}

func (e effects) RecoveryDone(gen uint64) {
	if h := e.r.cfg.Hooks.RecoveryDone; h != nil {
		h(gen)
	}
	e.r.mu.Lock()
	e.r.doneGens = append(e.r.doneGens, gen)
	e.r.mu.Unlock()
	select {
	case e.r.doneSig <- struct{}{}:
	default:
	}
}

func (e effects) Exited() {
	if h := e.r.cfg.Hooks.Exited; h != nil {
		h()
	}
}

func (e effects) Log(ev membership.Event) {
	e.r.log.LogAttrs(context.Background(), ev.Level, ev.Msg, ev.Attrs...)
}

func (r *Runner) fence(ctx context.Context, req membership.FenceRequest) {
	ok := false
	if f := r.cfg.Hooks.Fence; f != nil {
		if err := f(ctx, req); err != nil {
			r.log.Warn("fence failed", "victim", req.Node, "gen", req.Gen, "err", err)
		} else {
			ok = true
		}
	} else {
		r.log.Error("no fence hook configured; the failed node stays unfenced and the view is not installed", "victim", req.Node)
	}
	select {
	case r.fences <- fenceDone{req.Node, ok}:
	case <-ctx.Done():
	}
}
