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
)

// Hooks are the daemon's reactions to the agreement's decisions. Each runs
// on the Runner's goroutine (except Fence), so it must return promptly;
// nil hooks are skipped.
type Hooks struct {
	// Persist stores the hard state; it runs before any message is sent.
	// An error stops the Runner: sending without a durable promise could
	// let this node vote twice.
	Persist func(membership.HardState) error
	// Quorate reports a change of the local quorum status; false means stop
	// granting locks and stop array I/O now.
	Quorate func(quorate bool)
	// Stop suspends the lockspaces: a view change began.
	Stop func(membership.View)
	// Install installs a view: run DLM recovery, then call
	// Runner.RecoveryDone(view.Gen).
	Install func(membership.Install)
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
// results and the application's calls.
type Runner struct {
	cfg  RunnerConfig
	a    *membership.Agreement
	log  *slog.Logger
	msgs chan inMsg

	mu       sync.Mutex
	alive    []NodeID
	aliveSet bool
	aliveSig chan struct{}

	fences  chan fenceDone
	recDone chan uint64
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
	r := &Runner{cfg: cfg, a: a, log: logger.With("node", cfg.Agreement.Self),
		msgs: make(chan inMsg, 1024), aliveSig: make(chan struct{}, 1),
		fences: make(chan fenceDone, 64), recDone: make(chan uint64, 16), leave: make(chan struct{}, 1)}
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

// RecoveryDone reports that DLM recovery for gen finished on this node.
func (r *Runner) RecoveryDone(gen uint64) { r.recDone <- gen }

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
	t := time.NewTicker(r.cfg.Tick)
	defer t.Stop()
	if err := r.handle(ctx); err != nil {
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
		case g := <-r.recDone:
			r.a.RecoveryDone(g)
		case <-r.leave:
			r.a.Leave()
		}
		if err := r.handle(ctx); err != nil {
			return err
		}
	}
}

// handle carries out one Ready in the order the agreement requires:
// persist, stop, send, then install, fence and the rest.
func (r *Runner) handle(ctx context.Context) error {
	rd := r.a.Ready()
	h := r.cfg.Hooks
	for _, e := range rd.Log {
		r.log.LogAttrs(ctx, e.Level, e.Msg, e.Attrs...)
	}
	if rd.State != nil && h.Persist != nil {
		if err := h.Persist(*rd.State); err != nil {
			return fmt.Errorf("gossip: node %s: persisting membership state: %w", r.cfg.Agreement.Self, err)
		}
	}
	if rd.Quorate != nil && !*rd.Quorate {
		r.quorate.Store(false)
		if h.Quorate != nil {
			h.Quorate(false)
		}
	}
	if rd.Stop != nil && h.Stop != nil {
		h.Stop(*rd.Stop)
	}
	for _, m := range rd.Messages {
		if err := r.cfg.Send(m.To, m.Payload); err != nil {
			r.log.Debug("membership message not sent", "to", m.To, "err", err)
		}
	}
	for _, in := range rd.Install {
		v := in.View
		r.view.Store(&v)
		if h.Install != nil {
			h.Install(in)
		}
	}
	// One Ready can install a view and also stop for a newer proposal, or
	// install a view this node is not quorate in: the stop comes after the
	// install then, and must be applied again (a stop during recovery
	// outlasts it).
	if n := len(rd.Install); n > 0 {
		last := rd.Install[n-1].View.Gen
		if rd.Stop != nil && rd.Stop.Gen > last && h.Stop != nil {
			h.Stop(*rd.Stop)
		}
		if !r.a.Quorate() && h.Quorate != nil {
			r.quorate.Store(false)
			h.Quorate(false)
		}
	}
	for _, f := range rd.Fence {
		go r.fence(ctx, f)
	}
	if rd.Quorate != nil && *rd.Quorate {
		r.quorate.Store(true)
		if h.Quorate != nil {
			h.Quorate(true)
		}
	}
	if rd.Exited && h.Exited != nil {
		h.Exited()
	}
	return nil
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
