// Package arrays is mdclusterd's array layer (daemon.ArrayLayer): one
// array.Manager per array found among the configured devices, the RAID
// engine (array.RAIDEngine over mdcluster/raid) as the data path, gated by
// the storage lease (mdcluster/lease), and an NBD export per running array
// on a unix socket.
//
// Every array found among [devices] search is attached (its lockspace
// joined) whether or not it runs here: the lock manager grants locks in a
// lockspace only once every node of the view has opened it, so a create or
// assemble on one node needs the others attached. A scanner does that
// when the lock manager holds messages for a lockspace not opened here
// (another node opened an array's lockspace: it created or assembled the
// array, or recovers it into a view with this node), checked every
// scanPoll, and every scanFallback in any case.
package arrays

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd/kernel"
	"github.com/mdcluster/mdcluster/mdcluster/lease"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// The scanner's timings. Reading every device's superblock is I/O on
// every device of the search globs (an open, a size query and up to three
// superblock reads each); it used to run every 300 ms, which on a small
// or emulated machine took CPU and disk time from everything else. Now
// the trigger is the lock manager's count of messages held for lockspaces
// not opened here (dlm.NodeStats.EarlyHeld), an in-memory read every
// scanPoll: another node that opens an array's lockspace sends this node
// its lock traffic for it, which waits there until this node attaches.
// scanFallback is the periodic scan that catches anything else (an array
// whose first messages were dropped at the early-message bound, or a
// node without a lock manager in tests).
const (
	scanPoll     = 100 * time.Millisecond
	scanFallback = 3 * time.Second
)

// DefaultClusterName is the clustered bitmap's cluster name when
// --home-cluster is not given.
const DefaultClusterName = "mdcluster"

// Layer implements daemon.ArrayLayer.
type Layer struct {
	env daemon.ArrayEnv
	log *slog.Logger

	// opMu serialises create against the scanner, so that the scanner
	// never builds a second manager for an array being created.
	opMu sync.Mutex

	mu     sync.Mutex
	arrays map[[16]byte]*arr
	closed bool
	seq    uint64     // arrays started so far (arr.startSeq)
	view   leaseState // the node's view, for the leases
	// testNodeID is the node ID when there is no node (tests).
	testNodeID uint32

	stop chan struct{}
	wg   sync.WaitGroup

	// earlyHeld returns the lock manager's count of messages held for
	// lockspaces not opened here (nil: no node, only the fallback scan);
	// scanNow is the scan the scanner runs (l.scan); tests replace both,
	// and the timings.
	earlyHeld            func() int
	scanNow              func(context.Context)
	pollEvery, fallEvery time.Duration
}

// arr is one array known to this node.
type arr struct {
	uuid [16]byte
	mgr  *array.Manager
	eng  *array.RAIDEngine
	// guard is the storage lease (nil when [lease] is disabled), stamper
	// its reader over the engine's devices; leaseStop ends its renewals.
	guard     *lease.Guard
	stamper   *lease.Stamper
	leaseStop context.CancelFunc
	// md is the md device name ("/dev/md0") once it runs here.
	md      string
	running bool
	// startSeq orders the running arrays by when they started here:
	// the status view lists the newest first, as /proc/mdstat does.
	startSeq uint64
	srv      *nbd.Server
	lns      []net.Listener
	socket   string
	// kdev is the export attached as /dev/nbdN (export.nbd_device).
	kdev *kernel.Attachment
}

// New returns the array layer.
func New() *Layer {
	l := &Layer{arrays: map[[16]byte]*arr{}, stop: make(chan struct{}), pollEvery: scanPoll, fallEvery: scanFallback}
	l.scanNow = l.scan
	return l
}

var _ daemon.ArrayLayer = (*Layer)(nil)

// Start implements daemon.ArrayLayer: it starts the scanner and assembles
// the configured arrays that are found (one not found is logged, not an
// error: it may be created later).
func (l *Layer) Start(ctx context.Context, env daemon.ArrayEnv) error {
	l.env, l.log = env, env.Logger.With("layer", "array")
	if env.Metrics != nil {
		if err := env.Metrics.Register(newArrayCollector(l)); err != nil {
			return fmt.Errorf("array metrics: %w", err)
		}
	}
	if env.Node != nil {
		st := env.Node.Status()
		l.SetView(st.View.Gen, st.Quorate)
	}
	if env.SetStamper != nil {
		env.SetStamper(l)
	}
	if lc := env.Config.Lease; lc.Enabled && lc.Watchdog != "" {
		wd, got, err := lease.OpenWatchdog(lc.Watchdog, lc.WatchdogTimeout)
		if err != nil {
			return fmt.Errorf("storage lease: %w", err)
		}
		if got > lc.WatchdogTimeout {
			wd.Close()
			return fmt.Errorf("storage lease: watchdog %s set its timeout to %v, above lease.watchdog_timeout %v", lc.Watchdog, got, lc.WatchdogTimeout)
		}
		l.log.Info("watchdog armed: fed while every running array's stamp reads complete", "device", lc.Watchdog, "timeout", got)
		l.wg.Add(1)
		go l.feedWatchdog(wd, lc.Duration/4)
	}
	if env.Node != nil && l.earlyHeld == nil {
		d := env.Node.DLM()
		l.earlyHeld = func() int { return d.Stats().EarlyHeld }
	}
	l.scan(ctx)
	l.wg.Add(1)
	go l.scanner()
	for _, c := range env.Config.Arrays {
		id := c.Name
		if id == "" {
			id = c.UUID
		}
		u, ok := l.findConfigured(c)
		if !ok {
			l.log.Warn("configured array not found among the devices: not assembled (create or assemble it later)", "array", id,
				"search", env.Config.Devices.Search)
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		_, err := l.assemble(actx, u, "/dev/md/"+shortName(l.nameOf(u), id), false)
		cancel()
		if err != nil {
			l.log.Error("configured array not assembled", "array", id, "err", err)
		}
	}
	return nil
}

func (l *Layer) scanner() {
	defer l.wg.Done()
	t := time.NewTicker(l.pollEvery)
	defer t.Stop()
	last := time.Now()
	lastEarly := 0
	if l.earlyHeld != nil {
		lastEarly = l.earlyHeld()
	}
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		early := 0
		if l.earlyHeld != nil {
			early = l.earlyHeld()
		}
		due := scanDue(time.Since(last), l.fallEvery, early, lastEarly)
		lastEarly = early
		if !due {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		l.scanNow(ctx)
		cancel()
		last = time.Now()
	}
}

// scanDue says whether the scanner scans now: the lock manager's count of
// messages held for lockspaces not opened here rose since the last poll
// (new messages for an array not attached here; a count that stays the
// same, or falls as a lockspace opened here takes its messages, brings
// nothing new), or fallback has passed since the last scan.
func scanDue(since, fallback time.Duration, early, lastEarly int) bool {
	return early > lastEarly || since >= fallback
}

// probe reads the md superblock of every device under the search globs.
func (l *Layer) probe() map[string]*superblock.Superblock {
	out := map[string]*superblock.Superblock{}
	for _, g := range l.env.Config.Devices.Search {
		paths, _ := filepath.Glob(g)
		for _, p := range paths {
			if sb := readSuper(p); sb != nil {
				out[p] = sb
			}
		}
	}
	return out
}

func readSuper(p string) *superblock.Superblock {
	m, err := array.OpenFile(p, false)
	if err != nil {
		return nil
	}
	defer m.Close()
	size, err := m.Size()
	if err != nil {
		return nil
	}
	sb, err := superblock.Probe(m, uint64(size)/superblock.SectorSize)
	if err != nil {
		return nil
	}
	return sb
}

// scan attaches every array found that is not known yet.
func (l *Layer) scan(ctx context.Context) {
	if !l.opMu.TryLock() {
		return
	}
	defer l.opMu.Unlock()
	seen := map[[16]byte]bool{}
	for _, sb := range l.probe() {
		seen[sb.SetUUID] = true
	}
	l.mu.Lock()
	dropCandidates(seen, func(u [16]byte) bool { _, ok := l.arrays[u]; return ok })
	l.mu.Unlock()
	for u := range seen {
		if _, err := l.ensure(ctx, u); err != nil {
			l.log.Debug("attach", "uuid", bitmap.FormatUUID(u), "err", err)
		}
	}
}

// dropCandidates removes from seen the UUIDs that are the candidate UUID
// of an array attached here (attached reports that). A device being added
// carries its array's candidate UUID until the add commits; attaching
// that as an array would open a lockspace that only the nodes that
// scanned at that moment have, and the lock manager's recovery of the
// next view waits for every member to open it: forever, once a node has
// restarted since. (A node that starts while an add is in flight sees
// both for the first time in one scan and cannot tell them apart; that
// window is an add's.)
func dropCandidates(seen map[[16]byte]bool, attached func([16]byte) bool) {
	for u := range seen {
		if attached(array.CandidateUUID(u)) && !attached(u) {
			delete(seen, u)
		}
	}
}

// ensure returns the array's entry, creating its manager and attaching it.
func (l *Layer) ensure(ctx context.Context, u [16]byte) (*arr, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, ctl.Errorf(ctl.CodeUnavailable, "the array layer is stopping")
	}
	a := l.arrays[u]
	l.mu.Unlock()
	if a != nil {
		return a, nil
	}
	a, err := l.newArr(u)
	if err != nil {
		return nil, err
	}
	if err := a.mgr.Attach(ctx); err != nil {
		return nil, fmt.Errorf("attach %s: %w", bitmap.FormatUUID(u), err)
	}
	l.register(u, a)
	l.log.Info("array found among the devices: attached to its lockspace", "uuid", bitmap.FormatUUID(u))
	return a, nil
}

func (l *Layer) newArr(u [16]byte) (*arr, error) {
	a, err := l.newEngine(u)
	if err != nil {
		return nil, err
	}
	cfg := array.Config{Cluster: array.NodeCluster(l.env.Node), Devices: l.env.Config.Devices.Search, Engine: a.eng,
		UUID: u, Logger: l.log, ResyncWindow: 4 << 20,
		ResyncLockWait: time.Second, ResyncRetry: 300 * time.Millisecond, DaemonSleep: time.Second,
		SharedDevices: l.env.Config.Devices.Shared, RejoinLimit: l.env.Config.RAID.RejoinLimit,
		ParallelMirrors: intent.ParallelGo}
	if g := a.guard; g != nil {
		// Every bitmap flush re-reads the stamp first (leaseOwner).
		cfg.WrapBitmapOwner = func(o intent.Ownership) intent.Ownership { return leaseOwner{Ownership: o, guard: g} }
	}
	m, err := array.New(cfg)
	if err != nil {
		return nil, err
	}
	a.mgr = m
	return a, nil
}

// setUUID gives an array created here its UUID, which did not exist when
// its engine and lease guard were built: the guard's stamp reads must
// compare against it, or the first stamp fence (which writes the array's
// UUID with the generation) would read as "another array's" stamp here
// and stop this node's I/O on the array for good. Called before the
// array runs (no stamp read happens concurrently).
func (a *arr) setUUID(u [16]byte) {
	a.uuid = u
	if a.stamper != nil {
		a.stamper.Array = u
	}
}

// newEngine builds array u's data path: the RAID engine with the
// configured speed limits and, with the lease enabled, its guard as the
// gate, renewed whenever the engine starts (before any I/O).
func (l *Layer) newEngine(u [16]byte) (*arr, error) {
	a := &arr{uuid: u}
	rc := l.env.Config.RAID
	ec := array.RAIDEngineConfig{SpeedLimitMin: rc.SpeedLimitMin, SpeedLimitMax: rc.SpeedLimitMax, HoldWait: rc.HoldWait,
		TickInterval: 500 * time.Millisecond, Logger: l.log.With("uuid", bitmap.FormatUUID(u))}
	if l.env.Config.Lease.Enabled {
		g, err := l.newGuard(a)
		if err != nil {
			return nil, err
		}
		a.guard, ec.Gate = g, g
		ec.OnStart = func() {
			if err := g.Renew(); err != nil {
				l.log.Warn("storage lease: array I/O stopped at start", "uuid", bitmap.FormatUUID(u), "err", err)
			}
		}
	}
	a.eng = array.NewRAIDEngine(ec)
	return a, nil
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	h := strings.NewReplacer(":", "", "-", "").Replace(s)
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 16 {
		return u, fmt.Errorf("bad UUID %q", s)
	}
	copy(u[:], b)
	return u, nil
}

// shortName is the md name without its "host:" prefix.
func shortName(stored, fallback string) string {
	if i := strings.LastIndexByte(stored, ':'); i >= 0 {
		stored = stored[i+1:]
	}
	if stored == "" {
		return fallback
	}
	return stored
}

// nameOf returns the stored name of array u from any of its members.
func (l *Layer) nameOf(u [16]byte) string {
	for _, sb := range l.probe() {
		if sb.SetUUID == u {
			return sb.Name()
		}
	}
	return ""
}

// findConfigured finds a configured array among the devices.
func (l *Layer) findConfigured(c config.Array) ([16]byte, bool) {
	if c.UUID != "" {
		u, err := parseUUID(c.UUID)
		if err != nil {
			return u, false
		}
		for _, sb := range l.probe() {
			if sb.SetUUID == u {
				return u, true
			}
		}
		return u, false
	}
	return l.findByName(c.Name)
}

func (l *Layer) findByName(name string) ([16]byte, bool) {
	var found [][16]byte
	for _, sb := range l.probe() {
		if shortName(sb.Name(), "") == name {
			found = append(found, sb.SetUUID)
		}
	}
	sort.Slice(found, func(i, j int) bool { return string(found[i][:]) < string(found[j][:]) })
	if len(found) == 0 {
		return [16]byte{}, false
	}
	return found[0], true
}

// exportFor returns the export socket (and TCP address) configured for the
// array, or a default next to the control socket.
func (l *Layer) exportFor(u [16]byte, md string) (string, string) {
	name := shortName(l.nameOf(u), "")
	for _, c := range l.env.Config.Arrays {
		if c.UUID != "" {
			if cu, err := parseUUID(c.UUID); err == nil && cu == u {
				return c.ExportSocket, c.ExportTCP
			}
		} else if c.Name != "" && (c.Name == name || c.Name == filepath.Base(md)) {
			return c.ExportSocket, c.ExportTCP
		}
	}
	return filepath.Join(filepath.Dir(l.env.Config.Control.Socket), filepath.Base(md)+".nbd"), ""
}

// assemble starts array u here and exports it.
// assemble assembles array u here as md; force (--force or --run) fails
// the working members this node does not see instead of refusing
// (array.AssembleOptions).
func (l *Layer) assemble(ctx context.Context, u [16]byte, md string, force bool) (*arr, error) {
	a, err := l.ensure(ctx, u)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	running := a.running
	l.mu.Unlock()
	if running {
		return nil, ctl.Errorf(ctl.CodeFailed, "%s is already in use.", md)
	}
	if err := a.mgr.AssembleWith(ctx, array.AssembleOptions{FailUnseen: force}); err != nil {
		return nil, err
	}
	if err := l.started(a, md); err != nil {
		return nil, err
	}
	return a, nil
}

// started records a running array and starts its export.
func (l *Layer) started(a *arr, md string) error {
	info, err := l.info(a)
	if err != nil {
		return err
	}
	sock, tcp := l.exportFor(a.uuid, md)
	if got, want := a.eng.Size(), int64(info.Info.ArraySectors)*superblock.SectorSize; got != want {
		return fmt.Errorf("export %s: the engine has %d bytes, the superblock says %d", md, got, want)
	}
	l.startLease(a)
	be := a.eng
	name := filepath.Base(md)
	srv, err := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: name, Description: "mdcluster array " + md, Backend: be}},
		DefaultExport: name, Logger: l.log.With("export", name)})
	if err != nil {
		return fmt.Errorf("export %s: %w", md, err)
	}
	var lns []net.Listener
	ln, err := nbd.ListenUnix(sock)
	if err != nil {
		return fmt.Errorf("export %s on %s: %w", md, sock, err)
	}
	lns = append(lns, ln)
	if tcp != "" {
		tl, err := net.Listen("tcp", tcp)
		if err != nil {
			ln.Close()
			return fmt.Errorf("export %s on %s: %w", md, tcp, err)
		}
		lns = append(lns, tl)
	}
	for _, ln := range lns {
		go srv.Serve(ln)
	}
	kdev, err := l.attachKernel(a, srv, name, md)
	if err != nil {
		srv.Close()
		return err
	}
	l.mu.Lock()
	a.md, a.running, a.srv, a.lns, a.socket, a.kdev = md, true, srv, lns, sock, kdev
	l.seq++
	a.startSeq = l.seq
	l.mu.Unlock()
	l.log.Info("array running: exported over NBD", "array", md, "uuid", bitmap.FormatUUID(a.uuid), "socket", sock,
		"size", be.Size(), "lease", a.guard != nil)
	return nil
}

// stopArr stops the export and the array here.
func (l *Layer) stopArr(ctx context.Context, a *arr) error {
	l.mu.Lock()
	srv, kdev := a.srv, a.kdev
	a.srv, a.running, a.kdev = nil, false, nil
	l.mu.Unlock()
	var errs []error
	if kdev != nil {
		errs = append(errs, kdev.Detach())
	}
	if srv != nil {
		errs = append(errs, srv.Close())
	}
	// A manager re-joining after lost locks (Rejoining) is stopped too:
	// Stop ends the re-join first.
	ms := a.mgr.Status()
	if st := ms.Phase; st == array.PhaseRunning || st == array.PhaseFailed || ms.Rejoining {
		errs = append(errs, a.mgr.Stop(ctx))
	} else {
		errs = append(errs, a.mgr.Detach())
	}
	l.stopLease(a)
	l.mu.Lock()
	delete(l.arrays, a.uuid)
	l.mu.Unlock()
	return errors.Join(errs...)
}

// info inspects the array's members as this node has them.
func (l *Layer) info(a *arr) (*array.Inspection, error) {
	var ms []array.Member
	for _, s := range a.mgr.Members() {
		m, err := array.OpenFile(s.Path, false)
		if err != nil {
			continue
		}
		defer m.Close()
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("no member of %s readable", bitmap.FormatUUID(a.uuid))
	}
	ins, err := array.Inspect(ms, array.InspectOptions{UUID: a.uuid})
	if err != nil {
		return nil, err
	}
	if ins.Info == nil {
		return nil, fmt.Errorf("no superblock of %s readable", bitmap.FormatUUID(a.uuid))
	}
	return ins, nil
}

// Quiesce implements daemon.ArrayLayer: exports stop, every running array
// stops (flush, leave the broadcast, release the slot clean), every
// attached one detaches.
func (l *Layer) Quiesce(ctx context.Context) error {
	as := l.shutDown()
	done := make(chan error, 1)
	go func() {
		var errs []error
		for _, a := range as {
			if err := l.stopArr(ctx, a); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", bitmap.FormatUUID(a.uuid), err))
			} else if a.md != "" {
				l.log.Info("array quiesced: export closed, array stopped, slot released", "uuid", bitmap.FormatUUID(a.uuid), "array", a.md)
			}
		}
		done <- errors.Join(errs...)
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("quiescing the arrays: %w", ctx.Err())
	}
}

// shutDown marks the layer closed (no new array starts), waits for its
// background work to end and returns every array it had. Quiesce and Close
// both begin with it; calling it twice is harmless.
func (l *Layer) shutDown() []*arr {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.stop)
	}
	as := make([]*arr, 0, len(l.arrays))
	for _, a := range l.arrays {
		as = append(as, a)
	}
	l.mu.Unlock()
	l.wg.Wait()
	return as
}

// Close implements daemon.ArrayLayer.
func (l *Layer) Close() error {
	as := l.shutDown()
	for _, a := range as {
		l.mu.Lock()
		srv, kdev := a.srv, a.kdev
		a.srv, a.running, a.kdev = nil, false, nil
		l.mu.Unlock()
		if kdev != nil {
			kdev.Detach()
		}
		if srv != nil {
			srv.Close()
		}
		a.eng.Stop()
		l.stopLease(a)
	}
	return nil
}

// Command implements daemon.ArrayLayer.
func (l *Layer) Command(ctx context.Context, command string, raw json.RawMessage) (any, error) {
	switch command {
	case ctl.CmdArrayCreate:
		var args ctl.CreateArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		return l.create(ctx, args)
	case ctl.CmdArrayAssemble:
		var args ctl.AssembleArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		return l.cmdAssemble(ctx, args)
	case ctl.CmdArrayAdd, ctl.CmdArrayAddSpare, ctl.CmdArrayRemove, ctl.CmdArrayFail, ctl.CmdArrayReAdd:
		var args ctl.DevicesArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		return l.devices(ctx, command, args)
	case ctl.CmdArrayClusterConfirm:
		var args ctl.ClusterConfirmArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		a, err := l.byMd(args.Array)
		if err != nil {
			return nil, err
		}
		var res ctl.DevicesResult
		for _, c := range args.Confirms {
			o := ctl.DeviceOutcome{Device: c.Device, Action: "confirmed"}
			if err := a.mgr.ClusterConfirm(uint32(c.Slot), c.Device); err != nil {
				o.Action, o.Error = "", err.Error()
			}
			res.Devices = append(res.Devices, o)
		}
		return res, nil
	case ctl.CmdArrayStop, ctl.CmdArrayReadwrite, ctl.CmdArrayWait, ctl.CmdArrayDetail:
		var args ctl.ArrayArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		a, err := l.byMd(args.Array)
		if err != nil {
			return nil, err
		}
		switch command {
		case ctl.CmdArrayStop:
			return struct{}{}, l.stopArr(ctx, a)
		case ctl.CmdArrayReadwrite:
			return struct{}{}, nil // arrays always run read-write here
		case ctl.CmdArrayWait:
			return l.wait(ctx, a)
		default:
			return l.detail(a)
		}
	case ctl.CmdArrayGrow:
		var args ctl.GrowArgs
		if err := decode(raw, &args); err != nil {
			return nil, err
		}
		a, err := l.byMd(args.Array)
		if err != nil {
			return nil, err
		}
		return struct{}{}, a.mgr.SetBitmap(ctx, array.BitmapSpec{Mode: array.BitmapMode(args.Bitmap), Nodes: args.Nodes,
			ClusterName: DefaultClusterName, Chunk: args.BitmapChunk})
	case ctl.CmdArrayList:
		return l.list(), nil
	}
	return nil, ctl.Errorf(ctl.CodeUnknownCommand, "%s: unknown array command", command)
}

func decode(raw json.RawMessage, v any) error {
	if len(raw) == 0 {
		return nil
	}
	d := json.NewDecoder(strings.NewReader(string(raw)))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return ctl.Errorf(ctl.CodeBadRequest, "bad arguments: %v", err)
	}
	return nil
}

// byMd finds a running array by its md device ("/dev/md0", "md0") or name.
func (l *Layer) byMd(md string) (*arr, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, a := range l.arrays {
		if a.running && (a.md == md || filepath.Base(a.md) == filepath.Base(md)) {
			return a, nil
		}
	}
	return nil, ctl.Errorf(ctl.CodeFailed, "%s does not appear to be an md device", md)
}

func (l *Layer) create(ctx context.Context, args ctl.CreateArgs) (any, error) {
	if _, err := l.byMd(args.Array); err == nil {
		return nil, ctl.Errorf(ctl.CodeFailed, "%s is already in use.", args.Array)
	}
	l.opMu.Lock()
	defer l.opMu.Unlock()
	name := args.Name
	if name == "" {
		name = filepath.Base(args.Array)
	}
	cluster := args.HomeCluster
	if cluster == "" && args.Bitmap == ctl.BitmapClustered {
		cluster = DefaultClusterName
	}
	homehost := args.Homehost
	if homehost == "" {
		homehost, _ = os.Hostname()
	}
	spec := array.CreateSpec{Level: args.Level, RaidDevices: args.RaidDevices, Layout: args.Layout, ChunkSize: args.ChunkSize,
		Bitmap: array.BitmapMode(args.Bitmap), BitmapChunk: args.BitmapChunk, Nodes: args.Nodes, ClusterName: cluster,
		Name: name, Homehost: homehost, AssumeClean: args.AssumeClean, Force: args.Force}
	if spec.Bitmap == "" {
		spec.Bitmap = array.BitmapInternal
	}
	a, err := l.newArr([16]byte{})
	if err != nil {
		return nil, err
	}
	c, err := a.mgr.Create(ctx, spec, args.Devices)
	if err != nil {
		return nil, err
	}
	a.setUUID(c.Info.UUID)
	l.register(a.uuid, a)
	if err := l.started(a, args.Array); err != nil {
		return nil, err
	}
	return ctl.CreateResult{Array: args.Array, Started: true}, nil
}

func (l *Layer) cmdAssemble(ctx context.Context, args ctl.AssembleArgs) (any, error) {
	var u [16]byte
	var ok bool
	switch {
	case args.UUID != "":
		var err error
		if u, err = parseUUID(args.UUID); err != nil {
			return nil, ctl.Errorf(ctl.CodeBadRequest, "%v", err)
		}
		ok = true
	case args.Name != "":
		u, ok = l.findByName(args.Name)
	case len(args.Devices) > 0:
		for _, d := range args.Devices {
			if sb := readSuper(d); sb != nil {
				u, ok = sb.SetUUID, true
				break
			}
		}
	case args.Array != "":
		n := strings.TrimPrefix(strings.TrimPrefix(args.Array, "/dev/md/"), "/dev/")
		if u, ok = l.findByName(n); !ok {
			for _, c := range l.env.Config.Arrays {
				if c.Name == n || c.Name == filepath.Base(args.Array) {
					u, ok = l.findConfigured(c)
				}
			}
		}
	}
	if !ok {
		return nil, ctl.Errorf(ctl.CodeFailed, "%s not identified in config file.", args.Array)
	}
	md := args.Array
	if md == "" {
		md = "/dev/md/" + shortName(l.nameOf(u), "0")
	}
	a, err := l.assemble(ctx, u, md, args.Force || args.Run)
	if err != nil {
		return nil, err
	}
	st := a.mgr.Status()
	ins, _ := l.info(a)
	as := ctl.Assembled{Array: md, Started: true}
	if ins != nil {
		as.RaidDevices = ins.Info.RaidDisks
	}
	for _, m := range st.Members {
		switch m.State {
		case array.MemberInSync, array.MemberRecovering:
			as.Drives++
		case array.MemberSpare:
			as.Spares++
		}
	}
	return ctl.AssembleResult{Arrays: []ctl.Assembled{as}}, nil
}

// member finds a member by its path here.
func member(a *arr, dev string) (array.MemberStatus, bool) {
	want, _ := filepath.Abs(dev)
	if r, err := filepath.EvalSymlinks(want); err == nil {
		want = r
	}
	for _, m := range a.mgr.Members() {
		p := m.Path
		if r, err := filepath.EvalSymlinks(p); err == nil {
			p = r
		}
		if p == want || m.Path == dev {
			return m, true
		}
	}
	return array.MemberStatus{}, false
}

func (l *Layer) devices(ctx context.Context, command string, args ctl.DevicesArgs) (any, error) {
	a, err := l.byMd(args.Array)
	if err != nil {
		return nil, err
	}
	var res ctl.DevicesResult
	for _, d := range args.Devices {
		var targets []array.MemberStatus
		if d == "failed" || d == "faulty" {
			for _, m := range a.mgr.Members() {
				if m.State == array.MemberFaulty {
					targets = append(targets, m)
				}
			}
		}
		switch command {
		case ctl.CmdArrayAdd, ctl.CmdArrayAddSpare, ctl.CmdArrayReAdd:
			o := ctl.DeviceOutcome{Device: d, Action: "added"}
			var err error
			if command == ctl.CmdArrayReAdd {
				o.Action = "re-added"
				_, err = a.mgr.ReAdd(ctx, d)
			} else {
				_, err = a.mgr.AddSpare(ctx, d)
			}
			if err != nil {
				o.Action, o.Error = "", fmt.Sprintf("add new device failed for %s as -1: %v", d, err)
			}
			res.Devices = append(res.Devices, o)
			continue
		}
		if d != "failed" && d != "faulty" {
			m, ok := member(a, d)
			if !ok {
				// mdadm's words: the kernel answers ENODEV to setting a
				// non-member faulty and ENXIO to removing it.
				msg := fmt.Sprintf("hot remove failed for %s: No such device or address", d)
				if command == ctl.CmdArrayFail {
					msg = fmt.Sprintf("set device faulty failed for %s:  No such device", d)
				}
				res.Devices = append(res.Devices, ctl.DeviceOutcome{Device: d, Error: msg})
				continue
			}
			targets = append(targets, m)
		}
		for _, m := range targets {
			o := ctl.DeviceOutcome{Device: m.Path}
			var err error
			if command == ctl.CmdArrayFail {
				o.Action = "failed"
				err = a.mgr.Fail(ctx, m.Dev)
			} else {
				o.Action = "removed"
				err = a.mgr.Remove(ctx, m.Dev)
			}
			if err != nil {
				// mdadm 4.2's texts (two spaces after the colon for
				// --fail); a refused change is the kernel's EBUSY, and
				// the manager's reason goes to the log.
				format := "hot remove failed for %s: %s"
				if command == ctl.CmdArrayFail {
					format = "set device faulty failed for %s:  %s"
				}
				why := err.Error()
				if o.Busy = errors.Is(err, array.ErrRefusedChange); o.Busy {
					why = "Device or resource busy"
					l.log.Info("member change refused", "array", args.Array, "device", m.Path, "command", command, "err", err)
				}
				o.Action, o.Error = "", fmt.Sprintf(format, m.Path, why)
			}
			res.Devices = append(res.Devices, o)
		}
	}
	return res, nil
}

// syncing reports whether any resync or recovery runs or is owed: a
// spare waiting to be activated into an empty slot (raidDisks slots) is
// a recovery owed, as md's is once --add returns.
func syncing(st array.ArrayStatus, raidDisks int) bool {
	if st.Sync.Running || st.Sync.Pending || st.Sync.Remote.Active() || !st.Clean {
		return true
	}
	inSlot, spares := 0, 0
	for _, m := range st.Members {
		switch m.State {
		case array.MemberRecovering:
			return true
		case array.MemberInSync:
			inSlot++
		case array.MemberSpare:
			spares++
		}
	}
	return spares > 0 && inSlot < raidDisks
}

func (l *Layer) wait(ctx context.Context, a *arr) (any, error) {
	raidDisks := 0
	if ins, err := l.info(a); err == nil {
		raidDisks = ins.Info.RaidDisks
	}
	if !syncing(a.mgr.Status(), raidDisks) {
		return ctl.WaitResult{}, nil
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for syncing(a.mgr.Status(), raidDisks) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
	return ctl.WaitResult{Waited: true}, nil
}

func syncOf(st array.ArrayStatus, totalKiB uint64) *ctl.Sync {
	switch {
	case st.Sync.Running:
		return &ctl.Sync{Action: st.Sync.Kind.String(), DoneKiB: st.Sync.Done / 2, TotalKiB: st.Sync.Total / 2}
	case st.Sync.Remote.Active():
		return &ctl.Sync{Action: "resync", Special: "REMOTE", TotalKiB: totalKiB}
	case st.Sync.Pending:
		return &ctl.Sync{Action: st.Sync.Kind.String(), Special: "PENDING", TotalKiB: totalKiB}
	}
	return nil
}

func (l *Layer) detail(a *arr) (any, error) {
	ins, err := l.info(a)
	if err != nil {
		return nil, err
	}
	st := a.mgr.Status()
	inf := ins.Info
	d := ctl.Detail{Array: a.md, Version: "1.2", Created: inf.Created, Updated: inf.Updated, Level: int(inf.Level),
		ArrayKiB: inf.ArraySectors / 2, UsedDevKiB: inf.DevSectors / 2, RaidDevices: inf.RaidDisks,
		Bitmap: string(st.Bitmap), State: "clean", Name: inf.Name, UUID: bitmap.FormatUUID(a.uuid), Events: st.Events,
		ConsistencyPolicy: "bitmap"}
	if inf.Level == superblock.LevelRAID10 {
		d.Layout, d.ChunkKiB = inf.Layout, int(inf.ChunkSectors/2)
	}
	if st.Bitmap == array.BitmapNone {
		d.ConsistencyPolicy = "resync"
	}
	if st.Bitmap == array.BitmapClustered {
		d.ClusterName = inf.ClusterName
	}
	if !st.Clean {
		d.State = "active"
	}
	d.Sync = syncOf(st, inf.ArraySectors/2)
	slots := make([]*array.MemberStatus, inf.RaidDisks)
	var others []array.MemberStatus
	ms := st.Members
	sort.Slice(ms, func(i, j int) bool { return ms[i].Dev < ms[j].Dev })
	for i := range ms {
		m := ms[i]
		d.TotalDevices++
		switch m.State {
		case array.MemberInSync, array.MemberRecovering:
			if m.Slot >= 0 && m.Slot < len(slots) {
				slots[m.Slot] = &ms[i]
				d.WorkingDevices++
				if m.State == array.MemberInSync {
					d.ActiveDevices++
				}
				continue
			}
		case array.MemberSpare:
			d.WorkingDevices++
			d.SpareDevices++
		case array.MemberFaulty:
			d.FailedDevices++
		}
		others = append(others, m)
	}
	for i, m := range slots {
		if m == nil {
			d.Degraded = true
			d.Devices = append(d.Devices, ctl.DetailDevice{Number: -1, RaidDevice: i, Removed: true})
			continue
		}
		// md counts only in-sync members active: a recovering one is
		// a "spare rebuilding" in --detail.
		dd := ctl.DetailDevice{Number: int(m.Dev), RaidDevice: i, Device: m.Path}
		if m.State == array.MemberInSync {
			dd.Active, dd.InSync = true, true
		} else {
			d.Degraded = true
		}
		d.Devices = append(d.Devices, dd)
	}
	for _, m := range others {
		dd := ctl.DetailDevice{Number: int(m.Dev), RaidDevice: -1, Device: m.Path, Faulty: m.State == array.MemberFaulty}
		d.Devices = append(d.Devices, dd)
	}
	d.Failed = d.ActiveDevices == 0
	if st.Sync.Running && st.Sync.Kind == array.SyncResync && d.State == "clean" {
		d.State = "active"
	}
	return d, nil
}

// mdstatBitmap is the status view's bitmap line for a: md's in-memory
// counter pages (2048 16-bit counters to a 4 KiB page) for the bitmap's
// chunks, of which md holds only those with chunks in use; here, the
// pages with a dirty chunk in the on-disk bitmap (md frees a page some
// time after its last chunk is clean, so an idle array shows 0 pages in
// both). nil without a bitmap.
func (l *Layer) mdstatBitmap(a *arr) *ctl.MdstatBitmap {
	ins, err := l.info(a)
	if err != nil || ins.Freshest < 0 {
		return nil
	}
	bs := ins.Members[ins.Freshest].Bitmap
	if len(bs) == 0 || bs[0] == nil {
		return nil
	}
	const perPage = 2048
	sb := bs[0].Super
	used := map[uint64]bool{}
	for _, sl := range bs {
		if sl == nil {
			continue
		}
		for _, c := range sl.DirtyChunks() {
			used[c/perPage] = true
		}
	}
	return &ctl.MdstatBitmap{Pages: uint64(len(used)), TotalPages: (sb.Bits() + perPage - 1) / perPage, ChunkBytes: uint64(sb.ChunkSize)}
}

func (l *Layer) list() ctl.ArrayList {
	l.mu.Lock()
	var as []*arr
	for _, a := range l.arrays {
		if a.running {
			as = append(as, a)
		}
	}
	l.mu.Unlock()
	// /proc/mdstat lists the newest array first, and an array's members
	// newest first (the kernel adds to the head of both lists); device
	// numbers are given out in the order members join.
	sort.Slice(as, func(i, j int) bool { return as[i].startSeq > as[j].startSeq })
	out := ctl.ArrayList{Arrays: []ctl.ArrayStatus{}}
	for _, a := range as {
		dv, err := l.detail(a)
		if err != nil {
			continue
		}
		d := dv.(ctl.Detail)
		s := ctl.ArrayStatus{Name: filepath.Base(a.md), Active: true, Level: d.Level, BlocksKiB: d.ArrayKiB, Version: d.Version,
			ChunkKiB: d.ChunkKiB, Layout: d.Layout, RaidDevices: d.RaidDevices, Sync: d.Sync}
		for _, dd := range d.Devices {
			if dd.Removed {
				s.Slots = append(s.Slots, false)
				continue
			}
			if dd.RaidDevice >= 0 {
				s.Slots = append(s.Slots, dd.InSync)
			}
			s.Members = append(s.Members, ctl.MdstatMember{Name: filepath.Base(dd.Device), Number: dd.Number,
				Faulty: dd.Faulty, Spare: dd.RaidDevice < 0 && !dd.Faulty})
		}
		sort.SliceStable(s.Members, func(i, j int) bool { return s.Members[i].Number > s.Members[j].Number })
		s.Bitmap = l.mdstatBitmap(a)
		out.Arrays = append(out.Arrays, s)
	}
	return out
}
