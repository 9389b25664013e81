package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/intent"
)

// Config configures a Guard.
type Config struct {
	// Duration is the lease (see State). Required.
	Duration time.Duration
	// RenewEvery is the periodic re-read interval of Run; default and
	// maximum Duration/2.
	RenewEvery time.Duration
	// StopWait is how long a new request waits for the lease to come
	// back before it fails (Wait); 0 fails at once.
	StopWait time.Duration
	// Read reads the highest valid stamp (typically Stamper.Highest).
	// Required.
	Read func() (Record, error)
	// Clock is the local monotonic clock; nil means time since New.
	Clock func() time.Duration
	// Watchdog, if set, is pinged by Run while the renewal machinery is
	// alive (a read completed within the last lease), so a node whose
	// process or disk I/O hangs is reset (see Run).
	Watchdog Watchdog
	// Logger receives stop and resume transitions; nil means slog.Default().
	Logger *slog.Logger
}

// Guard is one node's lease on one array: the State, the clock, the stamp
// reads and the waiting. It implements raid.IOGate (Wait, Check). Safe for
// concurrent use.
type Guard struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	st       *State
	changed  chan struct{} // closed and replaced on every state change
	lastDone time.Duration // when the newest read completed
	anyDone  bool
	stopped  error // the last reason logged, to log transitions once
}

// New returns a guard with I/O stopped until SetView and a good read.
func New(cfg Config) (*Guard, error) {
	st, err := NewState(cfg.Duration)
	if err != nil {
		return nil, err
	}
	if cfg.Read == nil {
		return nil, errors.New("storage lease: no stamp reader")
	}
	if cfg.RenewEvery <= 0 || cfg.RenewEvery > cfg.Duration/2 {
		cfg.RenewEvery = cfg.Duration / 2
	}
	if cfg.Clock == nil {
		t0 := time.Now()
		cfg.Clock = func() time.Duration { return time.Since(t0) }
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	return &Guard{cfg: cfg, log: lg, st: st, changed: make(chan struct{}), stopped: ErrNoLeaseYet}, nil
}

// notify wakes waiters and logs a stop/resume transition (mu held).
func (g *Guard) notify() {
	close(g.changed)
	g.changed = make(chan struct{})
	err := g.st.Check(g.cfg.Clock())
	switch {
	case err == nil && g.stopped != nil:
		g.log.Info("storage lease: array I/O allowed")
	case err != nil && (g.stopped == nil || !errors.Is(err, unwrapReason(g.stopped))):
		g.log.Warn("storage lease: array I/O stopped", "reason", err)
	}
	g.stopped = err
}

func unwrapReason(err error) error {
	for _, r := range []error{ErrNoQuorum, ErrFenced, ErrUnreadable, ErrExpired, ErrNoLeaseYet} {
		if errors.Is(err, r) {
			return r
		}
	}
	return err
}

// SetView tells the guard the node's agreed view generation and whether it
// is quorate (the node runtime calls it on every view change, before the
// view's own fencing stamps anything).
func (g *Guard) SetView(gen uint64, quorate bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.st.SetView(gen, quorate)
	g.notify()
}

// Renew re-reads the stamp now and applies the result. It returns the
// lease's verdict afterwards (nil: I/O may go on).
func (g *Guard) Renew() error {
	start := g.cfg.Clock()
	rec, err := g.cfg.Read()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.lastDone, g.anyDone = g.cfg.Clock(), true
	g.st.Renewed(start, rec, err)
	g.notify()
	return g.st.Check(g.cfg.Clock())
}

// Check implements raid.IOGate: nil while the lease holds, else why not.
func (g *Guard) Check() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.st.Check(g.cfg.Clock())
}

// Wait implements raid.IOGate: it returns nil as soon as the lease holds,
// or the reason it does not once StopWait has passed.
func (g *Guard) Wait() error {
	var timer *time.Timer
	for {
		g.mu.Lock()
		err := g.st.Check(g.cfg.Clock())
		ch := g.changed
		g.mu.Unlock()
		if err == nil {
			if timer != nil {
				timer.Stop()
			}
			return nil
		}
		if timer == nil {
			if g.cfg.StopWait <= 0 {
				return err
			}
			timer = time.NewTimer(g.cfg.StopWait)
		}
		select {
		case <-ch:
		case <-timer.C:
			return fmt.Errorf("%w (waited %v)", err, g.cfg.StopWait)
		}
	}
}

// Run re-reads the stamp every RenewEvery until ctx is done, and pings
// the watchdog. The watchdog is pinged from a separate loop, and only
// while some read has completed within the last lease: if reads hang
// (a dead path, a hung process), pings stop and the watchdog resets the
// node, which also ends any device write still queued. A node that is
// merely stopped (fenced, no quorum) keeps pinging: its gate holds.
func (g *Guard) Run(ctx context.Context) {
	var wg sync.WaitGroup
	if g.cfg.Watchdog != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(g.cfg.RenewEvery / 2)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				if g.Alive() {
					if err := g.cfg.Watchdog.Ping(); err != nil {
						g.log.Error("storage lease: watchdog ping failed", "err", err)
					}
				}
			}
		}()
	}
	t := time.NewTicker(g.cfg.RenewEvery)
	defer t.Stop()
	for {
		g.Renew()
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-t.C:
		}
	}
}

// Alive says whether a stamp read completed within the last lease: the
// condition for pinging the watchdog.
func (g *Guard) Alive() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.anyDone && g.cfg.Clock()-g.lastDone < g.cfg.Duration
}

// Owner wraps the bitmap slot's intent.Ownership so that every bitmap
// flush first re-reads the stamp: the flush goes ahead only if the slot is
// still owned and the fresh read leaves the lease holding.
type Owner struct {
	intent.Ownership
	Guard *Guard
}

// Check implements intent.Ownership.
func (o Owner) Check() error {
	if err := o.Ownership.Check(); err != nil {
		return err
	}
	return o.Guard.Renew()
}
