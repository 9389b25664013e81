package arrays

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/lease"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// Storage fencing in the array layer (docs/quorum-and-fencing.md):
//
//   - every array's RAID engine has a lease.Guard as its Gate: I/O stops
//     when the node is not quorate, when the generation stamp on the
//     members is newer than the node's view, or when no stamp read has
//     succeeded for a lease;
//   - the guard re-reads the stamp when the engine starts, before every
//     bitmap flush (leaseOwner), and every half lease (Guard.Run) while
//     the array runs;
//   - the daemon reports view installs and quorum changes through
//     SetView, which reaches every guard;
//   - Stamp (fence.GenerationStamper) is what the configured stamp
//     fencing level calls: it stamps the new generation on every array
//     this node knows;
//   - an optional watchdog is pinged only while every running array's
//     stamp reads complete.

// leaseOwner is the bitmap slot's ownership as the write intent checks it
// before every flush: the slot must still be owned, and the stamp is
// re-read first (a renewal, as lease.Owner does). Unlike lease.Owner it
// refuses the flush only when the stamp shows this node fenced: a refused
// flush stops the write intent for good (the array must be assembled
// again), which a fenced node needs, while a node that merely lost quorum
// or could not read the stamp must resume when that passes; its data I/O
// is stopped by the gate meanwhile, and a bitmap write alone changes no
// data. A fenced verdict is final only after the lease's StopWait without
// a view as new as the stamp (see Check).
type leaseOwner struct {
	intent.Ownership
	guard *lease.Guard
}

// Check implements intent.Ownership.
func (o leaseOwner) Check() error {
	if err := o.Ownership.Check(); err != nil {
		return err
	}
	if err := o.guard.Renew(); !errors.Is(err, lease.ErrFenced) {
		return nil
	}
	// A stamp newer than this node's view is what a fenced node reads,
	// but also what every survivor reads between the fencer's stamp and
	// its own install of the new view (the fence runs before any node
	// installs it). Refusing at once would stop a survivor's write intent
	// for good; so wait, as the data path's requests do (the gate's
	// StopWait), for a view at least as new, and refuse only if none
	// comes: then this node is the one fenced.
	if o.guard.Wait() == nil {
		return nil
	}
	if err := o.guard.Renew(); errors.Is(err, lease.ErrFenced) {
		return err
	}
	return nil
}

// leaseState is the view as the daemon last reported it.
type leaseState struct {
	gen     uint64
	quorate bool
}

// SetView implements daemon.ViewObserver: the node's view generation and
// quorum, passed to every guard. When the view moved on or quorum came
// back, the running arrays re-read their stamp at once (in the
// background: SetView must not block), so that a node stopped by the
// stamp of the view it now has resumes without waiting for the next
// periodic read.
func (l *Layer) SetView(gen uint64, quorate bool) {
	l.mu.Lock()
	renew := gen > l.view.gen || (quorate && !l.view.quorate)
	l.view.gen = max(l.view.gen, gen)
	l.view.quorate = quorate
	var running []*lease.Guard
	for _, a := range l.arrays {
		if a.guard != nil {
			// Under l.mu, so that the guards see the views in the order
			// the layer does: two callers applying their copies outside
			// it could leave a guard with the older one (quorate false
			// for good on a quorate node).
			l.syncViewLocked(a)
			if a.running {
				running = append(running, a.guard)
			}
		}
	}
	l.mu.Unlock()
	if renew {
		for _, g := range running {
			go g.Renew()
		}
	}
}

// register adds array a to the layer as array u and gives its guard the
// current view.
func (l *Layer) register(u [16]byte, a *arr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.arrays[u] = a
	l.syncViewLocked(a)
}

// syncViewLocked gives array a's guard the layer's current view. It runs
// whenever the view changes and when an array is registered in l.arrays: a
// view that arrived between the guard's creation and its registration
// would otherwise never reach it. l.mu held.
func (l *Layer) syncViewLocked(a *arr) {
	if a.guard != nil {
		a.guard.SetView(l.view.gen, l.view.quorate)
	}
}

// newGuard builds array a's lease guard over the engine's devices.
func (l *Layer) newGuard(a *arr) (*lease.Guard, error) {
	lc := l.env.Config.Lease
	a.stamper = &lease.Stamper{Array: a.uuid, Node: uint32(l.nodeID()), Members: func() []lease.Device {
		return leaseDevices(a.eng.Devices())
	}}
	g, err := lease.New(lease.Config{Duration: lc.Duration, StopWait: lc.StopWait, Read: a.stamper.Highest,
		Logger: l.log.With("uuid", bitmap.FormatUUID(a.uuid))})
	if err != nil {
		return nil, fmt.Errorf("storage lease of %s: %w", bitmap.FormatUUID(a.uuid), err)
	}
	l.mu.Lock()
	v := l.view
	l.mu.Unlock()
	g.SetView(v.gen, v.quorate)
	return g, nil
}

func leaseDevices(ds []raid.Device) []lease.Device {
	out := make([]lease.Device, len(ds))
	for i, d := range ds {
		out[i] = d
	}
	return out
}

// startLease runs a's guard while the array runs here.
func (l *Layer) startLease(a *arr) {
	if a.guard == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.mu.Lock()
	if a.leaseStop != nil {
		a.leaseStop()
	}
	a.leaseStop = cancel
	l.mu.Unlock()
	go a.guard.Run(ctx)
}

// stopLease stops a's guard's renewals.
func (l *Layer) stopLease(a *arr) {
	l.mu.Lock()
	stop := a.leaseStop
	a.leaseStop = nil
	l.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// Stamp implements fence.GenerationStamper for the stamp fencing level:
// it writes generation gen on the in-use members of every array this node
// knows (through the running engine's devices, or opened for the stamp
// if the array does not run here) and returns once every one holds it.
// Every node still in an older view, this one included, stops its array
// I/O at its next stamp read until it installs view gen (the fence runs
// before the install); the stamp fencing level then waits out the lease.
// With no array known there is nothing of ours on the shared storage to
// fence.
func (l *Layer) Stamp(ctx context.Context, gen uint64) error {
	l.mu.Lock()
	as := make([]*arr, 0, len(l.arrays))
	for _, a := range l.arrays {
		as = append(as, a)
	}
	l.mu.Unlock()
	if len(as) == 0 {
		l.log.Warn("storage fence: no array known here, nothing to stamp", "generation", gen)
	}
	// Every array in parallel (and each array's members, lease.Stamper):
	// the fence's wait runs from the last stamp made durable.
	errs := make([]error, len(as))
	var wg sync.WaitGroup
	for i, a := range as {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.stampArray(ctx, a, gen); err != nil {
				errs[i] = fmt.Errorf("array %s: %w", bitmap.FormatUUID(a.uuid), err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// stampArray stamps one array's in-use members.
func (l *Layer) stampArray(ctx context.Context, a *arr, gen uint64) error {
	devs := leaseDevices(a.eng.Devices())
	if len(devs) == 0 {
		for _, path := range l.inUsePaths(a) {
			var d lease.Device
			var c io.Closer
			if df, err := raid.OpenDirect(path); err == nil {
				d, c = df, df
			} else if fm, ferr := array.OpenFile(path, true); ferr == nil {
				d, c = fm, fm // no direct I/O here (tmpfs): buffered, then synced
			} else {
				return fmt.Errorf("open member %s to stamp it: %w", path, errors.Join(err, ferr))
			}
			defer c.Close()
			devs = append(devs, d)
		}
	}
	if len(devs) == 0 {
		return nil // no member in use: nothing anyone can write
	}
	st := lease.Stamper{Array: a.uuid, Node: uint32(l.nodeID()), Members: func() []lease.Device { return devs }}
	if err := st.Stamp(ctx, gen); err != nil {
		return err
	}
	l.log.Info("storage fence: generation stamped on the array's members", "uuid", bitmap.FormatUUID(a.uuid),
		"generation", gen, "members", len(devs))
	return nil
}

// inUsePaths are the paths of array a's in-use members (in sync or
// recovering) as this node finds them, for an array that does not run
// here: the manager's members if it has read them, else the devices under
// [devices] search whose superblock carries the array's UUID and an active
// role in the role table of the newest superblock among them (a member
// failed since keeps an old superblock of its own, so its own table is not
// trusted).
func (l *Layer) inUsePaths(a *arr) []string {
	var out []string
	if a.mgr != nil {
		for _, s := range a.mgr.Members() {
			if s.State == array.MemberInSync || s.State == array.MemberRecovering {
				out = append(out, s.Path)
			}
		}
		if len(out) > 0 {
			return out
		}
	}
	sbs := l.probe()
	var newest *superblock.Superblock
	for _, sb := range sbs {
		if sb.SetUUID == a.uuid && (newest == nil || sb.Events > newest.Events) {
			newest = sb
		}
	}
	if newest == nil {
		return nil
	}
	for p, sb := range sbs {
		if sb.SetUUID != a.uuid || int(sb.DevNumber) >= len(newest.DevRoles) {
			continue
		}
		if r := newest.DevRoles[sb.DevNumber]; r <= superblock.RoleMax {
			out = append(out, p)
		}
	}
	return out
}

func (l *Layer) nodeID() uint32 {
	if l.env.Node == nil {
		return l.testNodeID
	}
	return uint32(l.env.Node.ID())
}

// feedWatchdog pings the watchdog every half renewal interval while
// every running array's guard has completed a stamp read within its lease
// (with no array running, while the process runs). It stops with l.stop
// and disarms the watchdog.
func (l *Layer) feedWatchdog(wd lease.Watchdog, every time.Duration) {
	defer l.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			if err := wd.Close(); err != nil {
				l.log.Warn("watchdog: disarming", "err", err)
			}
			return
		case <-t.C:
		}
		alive := true
		l.mu.Lock()
		for _, a := range l.arrays {
			if a.guard != nil && a.running && !a.guard.Alive() {
				alive = false
			}
		}
		l.mu.Unlock()
		if alive {
			if err := wd.Ping(); err != nil {
				l.log.Error("watchdog ping failed", "err", err)
			}
		}
	}
}
