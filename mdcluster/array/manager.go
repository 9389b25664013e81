package array

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/bitmap/intent"
	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// Cluster is what the manager needs from the node runtime: this node's ID,
// lockspaces (opened through the runtime so that its view changes recover
// them), the current view, and the durable store the journal lives in.
// NodeCluster adapts *node.Node.
type Cluster interface {
	// Self is this node's ID; it owns bitmap slot Self-1.
	Self() dlm.NodeID
	// Open opens a handle to the named lockspace.
	Open(name string, opts dlm.OpenOptions) (*dlm.Lockspace, error)
	// Members is the current agreed view (nil if none yet).
	Members() []dlm.NodeID
	// Store is the node's durable state store.
	Store() store.Store
}

type nodeCluster struct{ n *node.Node }

// NodeCluster adapts the node runtime to Cluster.
func NodeCluster(n *node.Node) Cluster { return nodeCluster{n} }

func (c nodeCluster) Self() dlm.NodeID { return dlm.NodeID(c.n.ID()) }
func (c nodeCluster) Open(name string, opts dlm.OpenOptions) (*dlm.Lockspace, error) {
	return c.n.Open(name, opts)
}
func (c nodeCluster) Store() store.Store { return c.n.Store() }
func (c nodeCluster) Members() []dlm.NodeID {
	v := c.n.Status().View.Members
	out := make([]dlm.NodeID, len(v))
	for i, id := range v {
		out[i] = dlm.NodeID(id)
	}
	return out
}

// Defaults of Config's bounds.
const (
	DefaultAssembleTimeout = 2 * time.Minute
	// DefaultRejoinLimit is Config.RejoinLimit's default.
	DefaultRejoinLimit     = 5 * time.Minute
	DefaultResyncLockWait  = 5 * time.Second
	DefaultResyncRetry     = time.Second
	DefaultResyncWindow    = 32 << 20 // md's CLUSTER_RESYNC_WINDOW for raid1
	DefaultNewDiskTimeout  = 5 * time.Second
	DefaultApplyRetryLimit = 30 * time.Second
	DefaultSlotProbeLimit  = 30 * time.Second
)

// Config configures a Manager.
type Config struct {
	// Cluster is the node runtime (NodeCluster(n)). Required for a
	// clustered array; an array with an internal bitmap or none runs
	// without it (but still journals in Store).
	Cluster Cluster
	// Store overrides Cluster.Store() for the journal.
	Store store.Store
	// UUID selects the array. Zero: the array of the first device among
	// Devices that carries an md superblock.
	UUID [16]byte
	// Devices are the paths (or shell globs, e.g. "/dev/disk/by-id/wwn-*")
	// where this node looks for members. Members are found by the UUIDs in
	// their superblocks, never by position: the same disk may have
	// another name on another node.
	Devices []string
	// Open opens a device (nil: OpenFile read-write).
	Open func(path string) (Member, error)
	// Engine is the data path (required).
	Engine Engine
	// Logger receives the manager's decisions (nil: slog.Default()).
	Logger *slog.Logger

	// LockTimeout, ReceiveTimeout and SendTimeout bound the broadcast (see
	// broadcast.Config) and this manager's own lock calls (no-new-dev).
	LockTimeout, ReceiveTimeout, SendTimeout time.Duration
	// AssembleTimeout bounds Assemble and Create (0: 2 minutes).
	AssembleTimeout time.Duration
	// RejoinLimit bounds how long a node that lost its locks (the cluster
	// excluded it and readmitted it clean) keeps trying to re-join the
	// array before it gives up and marks the array failed here (0: 5
	// minutes). Each attempt is an Assemble, bounded by AssembleTimeout.
	RejoinLimit time.Duration
	// ResyncLockWait bounds one attempt to take the cluster's resync lock
	// (0: 5 s); while another node resyncs, this node's sync work is
	// PENDING and retried every ResyncRetry (0: 1 s).
	ResyncLockWait, ResyncRetry time.Duration
	// ResyncWindow is the size of each announced resync window in bytes
	// (0: md's 32 MiB).
	ResyncWindow int64
	// NewDiskTimeout bounds how long a receiver of NEWDISK waits for an
	// explicit ClusterConfirm when the device is not among its Devices
	// and OnNewDisk is set (md's NEW_DEV_TIMEOUT; 0: 5 s).
	NewDiskTimeout time.Duration
	// OnNewDisk, if set, is told when another node adds a device this node
	// cannot find among Devices (md's ADD_DEVICE uevent): it may answer
	// with ClusterConfirm before NewDiskTimeout, naming the device's path
	// here or "missing".
	OnNewDisk func(deviceUUID [16]byte, raidSlot uint32)
	// ApplyRetryLimit is how long a node that could not apply a change it
	// received keeps retrying before it stops its array rather than serve
	// a member set that differs from the others' (0: 30 s).
	ApplyRetryLimit time.Duration
	// SlotProbeLimit bounds how long the receivers of BITMAP_NEEDS_SYNC
	// keep probing the leaver's slot until it is released (0: 30 s).
	SlotProbeLimit time.Duration
	// DaemonSleep overrides the bitmap's daemon_sleep (tests).
	DaemonSleep time.Duration
	// Rand is where new device UUIDs come from (nil: crypto/rand).
	Rand io.Reader
	// Now is the clock for superblock times (nil: time.Now).
	Now func() time.Time
	// WrapBitmapOwner, if set, wraps the bitmap slot's ownership that the
	// write intent checks before every bitmap flush (the daemon's storage
	// lease: lease.Owner re-reads the generation stamp there, so a fenced
	// node writes no bitmap either).
	WrapBitmapOwner func(intent.Ownership) intent.Ownership
	// ParallelMirrors runs the bitmap's per-mirror I/O (flushes, dead
	// slots' reads and clears): intent.ParallelGo in the daemon, so each
	// costs the slowest mirror's latency instead of the sum. nil runs it
	// one mirror after the other, in order, which the crash tests' counted
	// I/O operations need (intent.Config.Parallel).
	ParallelMirrors func(n int, f func(i int))
	// SharedDevices opens block devices without O_EXCL (OpenShared) when
	// Open is nil: for several nodes under one kernel, never on a real
	// node, where O_EXCL keeps a local md array or file system off the
	// members.
	SharedDevices bool

	// crashAt, when set, is asked at every named step of a change; true
	// makes the manager stop dead there, as if its process was killed
	// (tests of the journal's crash recovery).
	crashAt func(step string) bool
	// beforeStart is called during Assemble after the broadcast join and
	// before the engine starts (tests of messages that arrive meanwhile).
	beforeStart func()
	// probe opens a device read-only, without claiming it, to read its
	// superblock; nil (a caller-supplied Open) probes through Open.
	probe func(path string) (Member, error)
}

func (c *Config) fill() error {
	if c.Engine == nil {
		return errors.New("array manager: Config.Engine is required")
	}
	if len(c.Devices) == 0 {
		return errors.New("array manager: Config.Devices is empty: no place to look for members")
	}
	if c.Store == nil && c.Cluster != nil {
		c.Store = c.Cluster.Store()
	}
	if c.Store == nil {
		return errors.New("array manager: no store for the journal (Config.Store or Config.Cluster)")
	}
	if c.Open == nil {
		open := OpenFile
		if c.SharedDevices {
			open = OpenShared
		}
		c.Open = func(p string) (Member, error) { return open(p, true) }
		c.probe = func(p string) (Member, error) { return open(p, false) }
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.LockTimeout == 0 {
		c.LockTimeout = broadcast.DefaultLockTimeout
	}
	if c.ReceiveTimeout == 0 {
		c.ReceiveTimeout = broadcast.DefaultReceiveTimeout
	}
	if c.SendTimeout == 0 {
		c.SendTimeout = 3*c.LockTimeout + c.ReceiveTimeout
	}
	if c.RejoinLimit == 0 {
		c.RejoinLimit = DefaultRejoinLimit
	}
	if c.AssembleTimeout == 0 {
		c.AssembleTimeout = DefaultAssembleTimeout
	}
	if c.ResyncLockWait == 0 {
		c.ResyncLockWait = DefaultResyncLockWait
	}
	if c.ResyncRetry == 0 {
		c.ResyncRetry = DefaultResyncRetry
	}
	if c.ResyncWindow == 0 {
		c.ResyncWindow = DefaultResyncWindow
	}
	if c.ResyncWindow < superblock.SectorSize || c.ResyncWindow%superblock.SectorSize != 0 {
		return fmt.Errorf("array manager: ResyncWindow %d is not a positive number of sectors", c.ResyncWindow)
	}
	if c.NewDiskTimeout == 0 {
		c.NewDiskTimeout = DefaultNewDiskTimeout
	}
	if c.ApplyRetryLimit == 0 {
		c.ApplyRetryLimit = DefaultApplyRetryLimit
	}
	if c.SlotProbeLimit == 0 {
		c.SlotProbeLimit = DefaultSlotProbeLimit
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	for _, d := range []time.Duration{c.LockTimeout, c.ReceiveTimeout, c.SendTimeout, c.AssembleTimeout, c.ResyncLockWait,
		c.ResyncRetry, c.NewDiskTimeout, c.ApplyRetryLimit, c.SlotProbeLimit} {
		if d < 0 {
			return errors.New("array manager: negative timeout")
		}
	}
	return nil
}

// Phase is where a Manager is in its life.
type Phase int

// Phases.
const (
	// PhaseStopped: not assembled (or stopped).
	PhaseStopped Phase = iota
	// PhaseAssembling: the lockspace is open and the node receives
	// broadcasts; the engine is not started yet.
	PhaseAssembling
	// PhaseRunning: assembled; the engine serves the array.
	PhaseRunning
	// PhaseStopping: Stop is under way.
	PhaseStopping
	// PhaseFailed: the node could not follow the array (it could not
	// apply a change every other node applied) and stopped its engine.
	PhaseFailed
)

var phaseNames = [...]string{"stopped", "assembling", "running", "stopping", "failed"}

// String returns the phase's name.
func (p Phase) String() string {
	if p >= 0 && int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("phase(%d)", int(p))
}

// Errors the manager returns (wrapped with details; test with errors.Is).
var (
	// ErrNotRunning: the operation needs an assembled array.
	ErrNotRunning = errors.New("array not running")
	// ErrDeviceNotSeen: some node cannot see the device being added; the
	// add was undone everywhere.
	ErrDeviceNotSeen = errors.New("device not seen by every node")
	// ErrDeviceNotFound: this node cannot find the device among its
	// configured paths (a receiver's answer to NEWDISK).
	ErrDeviceNotFound = errors.New("device not found among the configured paths")
	// ErrMemberNotSeen: this node does not see a member the array lists
	// as working, so it must not run the array (its writes would miss
	// that mirror); the node refuses to assemble, or stops its array when
	// a change makes it so.
	ErrMemberNotSeen = errors.New("working member not seen by this node")
	// ErrRefusedChange: the change is not allowed (it would leave the
	// array without a copy, the device is busy, ...). Nothing changed.
	ErrRefusedChange = errors.New("change refused")
	// ErrInUseByOthers: the change needs this node to be the only one
	// using the array (md: "can't change bitmap to none since the array is
	// in use by more than one node").
	ErrInUseByOthers = errors.New("array in use by more than one node")
	// ErrUnsupported: a message type this node does not act on.
	ErrUnsupported = errors.New("not supported by this node")
	// errCrashed: the test crash hook fired; the manager is dead.
	errCrashed = errors.New("array manager: crashed (test)")
)

// Manager is one node's control plane for one array: it assembles the
// array from the members it finds, keeps its member set in step with every
// other node's through md-cluster's broadcast, makes the configuration
// changes (add, fail, remove, re-add, bitmap), journals each one before it
// broadcasts it, and coordinates resync and recovery so that one node at a
// time copies data while the others keep their writes out of its window.
//
// Concurrency: local changes are serialised by opMu, which is held across
// broadcasts; the broadcast's receive side (Receive) and the recovery
// events never take it, so this node keeps answering other senders while
// its own changes wait for the token. State is guarded by mu, which is
// never held across a broadcast or a lock wait.
type Manager struct {
	cfg  Config
	log  *slog.Logger
	self dlm.NodeID

	opMu   sync.Mutex // local changes, journal recovery, post-departure fixes
	syncMu sync.Mutex // one local sync (resync, recovery, slot resync) at a time

	mu         sync.Mutex
	phase      Phase
	uuid       [16]byte
	jr         store.Journal
	st         *arrayState
	engineOn   bool
	devs       map[string]Member // opened devices by path
	paths      map[Member]string
	pinned     map[string]int          // paths a local add or re-add holds open (claimLocked)
	candidates map[[16]byte]*candidate // NEWDISK devices awaiting METADATA_UPDATED, by device UUID
	confirmW   *confirmWait            // a NEWDISK waiting for ClusterConfirm
	remote     remoteSync
	view       []dlm.NodeID
	departed   []dlm.NodeID // since the last RecoverDone
	needCR     bool         // no-new-dev must be re-taken in CR
	diverged   time.Time    // first failed apply since the last good one
	local      localSync
	ownedRetry bool // an ownership slot resync failed: Reprobe later
	// allowUnseen lets reloads accept working members this node does not
	// see, while a forced assemble fails them (AssembleOptions).
	allowUnseen bool
	failReason  string
	dead        bool
	// rejoining is set while a re-join after lost locks is under way
	// (see rejoin); rejoinCancel ends it, rejoinWG waits for it.
	rejoining    bool
	rejoinCancel context.CancelFunc
	rejoinWG     sync.WaitGroup
	// rejoins counts completed re-joins after lost locks.
	rejoins    int
	standalone bool

	attached *dlm.Lockspace // held while attached (see Attach)
	ls       *dlm.Lockspace
	fan      *fanout
	bus      *broadcast.Broadcaster
	own      *ownership.Driver
	noNewDev dlm.LockHandle
	in       *intentRef

	ctx        context.Context
	cancel     context.CancelFunc
	loopCancel context.CancelFunc
	wg         sync.WaitGroup
	runEnd     chan struct{}
	kick       chan struct{} // wakes the syncer
	maint      chan struct{} // wakes the maintenance loop
	tasks      []maintTask
}

// candidate is a device another node is adding (NEWDISK) that this node
// found and confirmed.
type candidate struct {
	From       dlm.NodeID
	Dev        uint32
	UUID       [16]byte
	Path       string
	BaseEvents uint64
	At         time.Time
}

// confirmWait is a NEWDISK receive waiting for ClusterConfirm.
type confirmWait struct {
	uuid [16]byte
	slot uint32
	done chan string // the path, or "" for missing
}

// remoteSync is what this node knows of another node's resync.
type remoteSync struct {
	From   dlm.NodeID
	Window Window
	// Kind and Target describe the remote sync (RESYNCING_START's
	// payload); Target is the recovering device, or noTarget.
	Kind   SyncKind
	Target uint32
	// Seen counts RESYNCING messages, so that a value block read after one
	// cannot replace a newer message's window.
	Seen uint64
	// Hints remembers how far departed or stopped nodes got, by work key:
	// a taker resumes there.
	Hints map[string]uint64
}

// localSync is this node's own sync, for Status.
type localSync struct {
	Pending bool
	Running bool
	Kind    SyncKind
	Target  uint32
	Lo, Hi  uint64
	Total   uint64
}

const noTarget = ^uint32(0)

// New returns a manager; nothing is read or locked until Assemble or
// Create.
func New(cfg Config) (*Manager, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	var self dlm.NodeID
	if cfg.Cluster != nil {
		self = cfg.Cluster.Self()
	}
	return &Manager{cfg: cfg, log: cfg.Logger.With("node", self), self: self, devs: map[string]Member{},
		paths: map[Member]string{}, pinned: map[string]int{}, candidates: map[[16]byte]*candidate{}, remote: remoteSync{Hints: map[string]uint64{}},
		kick: make(chan struct{}, 1), maint: make(chan struct{}, 1)}, nil
}

// LockspaceName is the array's lockspace name: its UUID as the kernel
// prints it (%pU), which is what md-cluster names the lockspace.
func LockspaceName(uuid [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", uuid[0:4], uuid[4:6], uuid[6:8], uuid[8:10], uuid[10:16])
}

// --- devices ---

// found is a device among the configured paths with a superblock.
type found struct {
	Path   string
	Member Member
	Super  *superblock.Superblock
}

// expand returns the configured paths with globs expanded, sorted, without
// duplicates.
func (m *Manager) expand() []string {
	var out []string
	for _, p := range m.cfg.Devices {
		if hasMeta(p) {
			g, err := filepath.Glob(p)
			if err != nil {
				m.log.Warn("bad device pattern", "pattern", p, "err", err)
				continue
			}
			out = append(out, g...)
			continue
		}
		out = append(out, p)
	}
	sort.Strings(out)
	return slices.Compact(out)
}

func hasMeta(p string) bool {
	for _, c := range p {
		if c == '*' || c == '?' || c == '[' {
			return true
		}
	}
	return false
}

// deviceLocked returns the open (claimed) Member for path, opening it
// once. mu held. A device stays open while this node's state binds it,
// while it is a candidate of an add, or while a local add or re-add holds
// it (claimLocked); releaseUnusedLocked closes the rest.
func (m *Manager) deviceLocked(path string) (Member, error) {
	if d := m.devs[path]; d != nil {
		return d, nil
	}
	d, err := m.cfg.Open(path)
	if err != nil {
		return nil, err
	}
	m.devs[path], m.paths[d] = d, path
	return d, nil
}

// claimLocked opens path like deviceLocked and holds it open until the
// matching unclaim, whatever the reloads meanwhile find on it: an add or
// re-add writes to the device before any node's state binds it. mu held.
func (m *Manager) claimLocked(path string) (Member, error) {
	d, err := m.deviceLocked(path)
	if err != nil {
		return nil, err
	}
	m.pinned[path]++
	return d, nil
}

// unclaim ends a claimLocked; the device is closed unless the state now
// binds it (or a candidate or another claim still needs it).
func (m *Manager) unclaim(path string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pinned[path]--; m.pinned[path] <= 0 {
		delete(m.pinned, path)
	}
	m.releaseUnusedLocked()
}

// releaseUnusedLocked closes every open device this node has no use for:
// not bound by the current state, not a candidate of another node's add,
// not held by a local add or re-add. A member removed cluster-wide (or a
// stale or removed device the scan came across) is thus let go of on
// every node as soon as it re-reads the members, so that it can be zeroed,
// re-added or used elsewhere on the node: for block devices the exclusive
// claim (O_EXCL) goes with the descriptor. Its superblock may still carry
// the array's UUID; scans only probe such devices read-only (see
// scanLocked), so the next reload does not claim it back. mu held.
func (m *Manager) releaseUnusedLocked() {
	keep := map[Member]bool{}
	if m.st != nil {
		for _, r := range m.st.Members {
			keep[r.Member] = true
		}
	}
	for _, c := range m.candidates {
		if d := m.devs[c.Path]; d != nil {
			keep[d] = true
		}
	}
	for p, d := range m.devs {
		if keep[d] || m.pinned[p] > 0 {
			continue
		}
		if c, ok := d.(io.Closer); ok {
			if err := c.Close(); err != nil {
				m.log.Warn("closing a device no longer used", "path", p, "err", err)
			}
		}
		delete(m.devs, p)
		delete(m.paths, d)
		m.log.Info("device released: not a member here any more", "path", p)
	}
}

// scanLocked reads the superblock of every configured device. mu held.
// A device this node has open (a bound member, a candidate, a device an
// add or re-add holds) is read through that handle; any other is probed
// through a read-only open that is closed again at once, and returned
// with a nil Member: only its superblock is of use. Nothing is claimed
// here: claiming every device the search globs match would lock other
// arrays' members (and free devices) away from everyone else on the
// node, and claiming every device that carries the array's UUID would
// keep a removed member (whose superblock still names the array) claimed
// until the array stops. What the state binds is claimed by
// readStateLocked; a device another node adds, by findDeviceLocked.
func (m *Manager) scanLocked() []found {
	var out []found
	for _, p := range m.expand() {
		d := m.devs[p]
		if d == nil {
			sb, ok := m.probeLocked(p)
			if ok {
				out = append(out, found{Path: p, Super: sb})
			}
			continue
		}
		sectors, err := memberSectors(d)
		if err != nil {
			continue
		}
		sb, err := superblock.Probe(d, sectors)
		if err != nil {
			continue
		}
		out = append(out, found{Path: p, Member: d, Super: sb})
	}
	return out
}

// openProbe opens path for reading without claiming it (Config.probe, or
// Open when the caller supplied Open); the caller closes it.
func (m *Manager) openProbe(p string) (Member, error) {
	if m.cfg.probe != nil {
		return m.cfg.probe(p)
	}
	return m.cfg.Open(p)
}

func closeMember(d Member) {
	if c, ok := d.(io.Closer); ok {
		_ = c.Close()
	}
}

// probeLocked reads the superblock of path through a read-only open that
// is closed again at once.
func (m *Manager) probeLocked(p string) (*superblock.Superblock, bool) {
	d, err := m.openProbe(p)
	if err != nil {
		m.log.Debug("configured device not usable", "path", p, "err", err)
		return nil, false
	}
	defer closeMember(d)
	sectors, err := memberSectors(d)
	if err != nil {
		return nil, false
	}
	sb, err := superblock.Probe(d, sectors)
	if err != nil {
		return nil, false
	}
	return sb, true
}

// findDeviceLocked looks for the device with device UUID dev among the
// configured paths, carrying the array's UUID or its candidate UUID, and
// claims it (another node adds or re-adds it: this node binds it once the
// add commits).
func (m *Manager) findDeviceLocked(dev [16]byte) (found, bool) {
	for _, f := range m.scanLocked() {
		if !MatchesNewDisk(f.Super, m.uuid, dev) {
			continue
		}
		if f.Member == nil {
			d, err := m.deviceLocked(f.Path)
			if err != nil {
				m.log.Warn("device being added found but not usable here", "path", f.Path, "err", err)
				continue
			}
			f.Member = d
		}
		return f, true
	}
	return found{}, false
}

// inspectArrayLocked inspects every configured device that carries the
// array's UUID: the open ones through their handles (first, so that they
// win over another path to the same device), the others through
// read-only handles that are closed before it returns. claim says which
// of those the result uses (and so must be claimed): they are opened
// for good and the inspection is done again. A device that cannot be
// claimed (another exclusive opener holds it) is left out, as a device
// that cannot be opened. mu held.
func (m *Manager) inspectArrayLocked(claim func(insp *Inspection, paths map[Member]string) []Member) (*Inspection, map[Member]string, error) {
	skip := map[string]bool{}
	for attempt := 0; ; attempt++ {
		var ms, temps []Member
		paths := maps.Clone(m.paths)
		isTemp := map[Member]bool{}
		var later []found
		for _, f := range m.scanLocked() {
			if f.Super.SetUUID != m.uuid || skip[f.Path] {
				continue
			}
			if f.Member != nil {
				ms = append(ms, f.Member)
				continue
			}
			later = append(later, f)
		}
		for _, f := range later {
			d, err := m.openProbe(f.Path)
			if err != nil {
				continue
			}
			temps = append(temps, d)
			isTemp[d], paths[d] = true, f.Path
			ms = append(ms, d)
		}
		release := func() {
			for _, d := range temps {
				closeMember(d)
			}
		}
		if len(ms) == 0 {
			return nil, nil, fmt.Errorf("no device among %v carries array %s", m.cfg.Devices, bitmap.FormatUUID(m.uuid))
		}
		insp, err := Inspect(ms, InspectOptions{UUID: m.uuid})
		if err != nil {
			release()
			return nil, nil, err
		}
		var need []string
		for _, d := range claim(insp, paths) {
			if isTemp[d] {
				need = append(need, paths[d])
			}
		}
		release()
		if len(need) == 0 {
			return insp, paths, nil
		}
		if attempt > 8 {
			return nil, nil, fmt.Errorf("the array's devices keep changing while they are read (%v)", need)
		}
		for _, p := range need {
			if _, err := m.deviceLocked(p); err != nil {
				m.log.Warn("a device of the array cannot be claimed: left out", "path", p, "err", err)
				skip[p] = true
			}
		}
	}
}

// readStateLocked inspects the devices that carry the array's UUID and
// claims the ones the resulting state binds.
func (m *Manager) readStateLocked() (*arrayState, error) {
	var st *arrayState
	var stErr error
	_, _, err := m.inspectArrayLocked(func(insp *Inspection, paths map[Member]string) []Member {
		st, stErr = stateFromInspection(insp, paths)
		if stErr != nil {
			return nil
		}
		var out []Member
		for _, r := range st.Members {
			out = append(out, r.Member)
		}
		return out
	})
	if err != nil {
		return nil, err
	}
	return st, stErr
}

// reloadLocked re-reads the members and brings this node's state, and its
// engine if started, to what they say. A failure leaves both as they
// were (failures of members already applied to the engine stay applied:
// a member that failed must never get I/O again). mu held.
func (m *Manager) reloadLocked(minEvents uint64, why string) error {
	next, err := m.readStateLocked()
	if err != nil {
		return fmt.Errorf("reload superblocks (%s): %w", why, err)
	}
	if err := checkAppliedSeen(broadcast.Message{Type: broadcast.MetadataUpdated, Low: minEvents}, next, m.allowUnseen); err != nil {
		return fmt.Errorf("reload superblocks (%s): %w", why, err)
	}
	if m.engineOn {
		if err := m.applyEngineLocked(next); err != nil {
			return fmt.Errorf("reload superblocks (%s): %w", why, err)
		}
	}
	old := m.st
	m.st = next
	for u, c := range m.candidates {
		if mem := memberByUUID(next, u); mem != nil {
			m.log.Info("candidate device is now a member", "dev", mem.Dev, "path", mem.Path, "from", c.From)
			delete(m.candidates, u)
		}
	}
	m.logChanges(old, next, why)
	m.diverged = time.Time{}
	m.releaseUnusedLocked()
	return nil
}

func memberByUUID(st *arrayState, u [16]byte) *memberRec {
	for _, r := range st.Members {
		if r.DeviceUUID == u {
			return r
		}
	}
	return nil
}

// logChanges logs what a reload changed.
func (m *Manager) logChanges(old, next *arrayState, why string) {
	if old == nil {
		m.log.Info("array state read", "why", why, "events", next.Events(), "members", next.statuses(), "not_used", next.Rejected)
		return
	}
	if old.Events() == next.Events() && slices.Equal(old.statuses(), next.statuses()) {
		return
	}
	m.log.Info("array state changed", "why", why, "events", fmt.Sprintf("%d->%d", old.Events(), next.Events()), "members", next.statuses())
}

// applyEngineLocked carries out planEngine(m.st, next); on a failure the
// steps already taken are undone (except failures). mu held.
func (m *Manager) applyEngineLocked(next *arrayState) error {
	ops := planEngine(m.st, next)
	var done []engineOp
	for _, op := range ops {
		var err error
		switch op.Kind {
		case opFail:
			err = m.cfg.Engine.FailMember(op.Member.Dev)
		case opSet:
			err = m.cfg.Engine.SetMember(op.Member)
		case opRemove:
			err = m.cfg.Engine.RemoveMember(op.Member.Dev)
		}
		if err != nil {
			m.undoEngineLocked(done)
			return fmt.Errorf("engine: %s member %d: %w", op.Kind, op.Member.Dev, err)
		}
		if op.Kind != opFail {
			done = append(done, op)
		}
	}
	return nil
}

// undoEngineLocked reverts set and remove steps, newest first.
func (m *Manager) undoEngineLocked(done []engineOp) {
	for i := len(done) - 1; i >= 0; i-- {
		op := done[i]
		var prev *memberRec
		if m.st != nil {
			prev = m.st.Members[op.Member.Dev]
		}
		var err error
		switch {
		case op.Kind == opSet && prev == nil:
			err = m.cfg.Engine.RemoveMember(op.Member.Dev)
		case op.Kind == opSet || op.Kind == opRemove:
			if prev != nil {
				err = m.cfg.Engine.SetMember(engineMember(prev))
			}
		}
		if err != nil {
			m.log.Error("engine: undoing a partly applied change failed", "op", op.Kind, "dev", op.Member.Dev, "err", err)
		}
	}
}

// --- status ---

// ArrayStatus is a snapshot of the manager (what mdadm --detail and
// /proc/mdstat show).
type ArrayStatus struct {
	// Phase is where the manager is.
	Phase Phase
	// UUID is the array's UUID.
	UUID [16]byte
	// Events is the superblock event count this node last read.
	Events uint64
	// Members are the members this node has bound.
	Members []MemberStatus
	// NotUsed explains the devices with the array's UUID that are not
	// used.
	NotUsed []string
	// Bitmap is the array's bitmap mode; Nodes its slot count.
	Bitmap BitmapMode
	// Nodes is the slot count of a clustered bitmap.
	Nodes int
	// Clean: no resync owed (resync_offset = MaxSector).
	Clean bool
	// Sync describes this node's own sync (md: "resync", "recovery"),
	// Pending that it has sync work but waits for the cluster's resync
	// lock (md: "PENDING"), Remote that another node is syncing (md:
	// "REMOTE").
	Sync SyncStatus
	// FailReason says why the node stopped following the array
	// (PhaseFailed).
	FailReason string
	// Rejoining: this node lost its locks (the cluster excluded it and
	// readmitted it clean) and is re-joining the array; its array I/O
	// fails with ErrEngineStopped until it runs again.
	Rejoining bool
	// Rejoins counts the re-joins after lost locks this manager completed.
	Rejoins int
}

// SyncStatus is the sync part of ArrayStatus.
type SyncStatus struct {
	// Running: this node syncs (md: "resync" / "recovery").
	Running bool
	// Pending: this node has sync work and waits for the resync lock
	// (md: "PENDING").
	Pending bool
	// Kind is the local sync's kind.
	Kind SyncKind
	// Target is the device being recovered (recovery).
	Target uint32
	// Window is this node's current window; Done/Total its progress in
	// sectors.
	Window Window
	// Done and Total: progress of the local sync in sectors.
	Done, Total uint64
	// Remote is another node's announced window (zero if none), RemoteFrom
	// that node.
	Remote Window
	// RemoteFrom is the node that announced Remote (md: "REMOTE").
	RemoteFrom dlm.NodeID
}

// Status returns the manager's state.
func (m *Manager) Status() ArrayStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := ArrayStatus{Phase: m.phase, UUID: m.uuid, FailReason: m.failReason, Rejoining: m.rejoining, Rejoins: m.rejoins}
	if m.st != nil {
		s.Events, s.Members, s.NotUsed = m.st.Events(), m.st.statuses(), slices.Clone(m.st.Rejected)
		s.Clean = m.st.Shared.Clean()
		s.Bitmap, s.Nodes = BitmapNone, m.st.Nodes
		if m.st.HasBitmap {
			s.Bitmap = BitmapInternal
			if m.st.Clustered {
				s.Bitmap = BitmapClustered
			}
		}
	}
	s.Sync = SyncStatus{Running: m.local.Running, Pending: m.local.Pending, Kind: m.local.Kind, Target: m.local.Target,
		Window: Window{Lo: m.local.Lo, Hi: m.local.Hi}, Remote: m.remote.Window, RemoteFrom: m.remote.From}
	if m.local.Running {
		s.Sync.Total = m.local.Total
		s.Sync.Done = m.local.Lo
	}
	return s
}

// BroadcastStats returns the counters of the array's broadcast on this
// node; false when the manager has no broadcast (not assembled here, or
// stopped). The counters start again at zero with every assemble.
func (m *Manager) BroadcastStats() (broadcast.Stats, bool) {
	m.mu.Lock()
	bus := m.bus
	m.mu.Unlock()
	if bus == nil {
		return broadcast.Stats{}, false
	}
	return bus.Stats(), true
}

// Members returns the members this node has bound, by device number.
func (m *Manager) Members() []MemberStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st.statuses()
}

// UUID returns the array's UUID (zero before Assemble or Create).
func (m *Manager) UUID() [16]byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.uuid
}

// --- crash points (tests) ---

// point is a named step of a change. With the test hook set, it may
// declare the manager dead there: it stops everything without another
// lock call or disk write, as a killed process would.
func (m *Manager) point(step string) error {
	m.mu.Lock()
	dead := m.dead
	m.mu.Unlock()
	if dead {
		return errCrashed
	}
	if f := m.cfg.crashAt; f != nil && f(step) {
		m.log.Warn("test crash point reached: the manager stops dead", "step", step)
		m.kill()
		return errCrashed
	}
	return nil
}

func (m *Manager) isDead() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dead
}

// kill stops the manager as a crash would: no lock is released, nothing
// more is written, goroutines end as their waits fail. Tests then crash
// the node's lock manager too.
func (m *Manager) kill() {
	m.mu.Lock()
	if m.dead {
		m.mu.Unlock()
		return
	}
	m.dead = true
	cancel := m.cancel
	own := m.own
	rcancel := m.rejoinCancel
	m.mu.Unlock()
	if rcancel != nil {
		rcancel()
	}
	if cancel != nil {
		cancel()
	}
	_ = m.cfg.Engine.Stop()
	m.releaseIO()
	if own != nil {
		own.Close()
	}
}

// waitDead waits for the goroutines of a killed manager and closes its
// devices.
func (m *Manager) waitDead() {
	m.rejoinWG.Wait()
	m.wg.Wait()
	m.mu.Lock()
	runEnd := m.runEnd
	m.mu.Unlock()
	if runEnd != nil {
		<-runEnd
	}
	m.closeDevices()
}

func (m *Manager) closeDevices() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for p, d := range m.devs {
		if c, ok := d.(io.Closer); ok {
			_ = c.Close()
		}
		delete(m.devs, p)
		delete(m.paths, d)
	}
}

// --- the intent reference ---

// intentRef is the engine's WriteIntent: the ownership driver's write
// intent once this node has joined its bitmap slot; writes are refused
// before. (The engine is started before the slot is joined so that the
// slot's own dirty bits can be resynced while joining.)
type intentRef struct {
	mu sync.Mutex
	in *intent.Intent
}

func (r *intentRef) get() (*intent.Intent, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.in == nil {
		return nil, errors.New("write intent: this node has not joined its bitmap slot yet")
	}
	return r.in, nil
}

func (r *intentRef) set(in *intent.Intent) {
	r.mu.Lock()
	r.in = in
	r.mu.Unlock()
}

func (r *intentRef) StartWrite(off, n int64) error {
	in, err := r.get()
	if err != nil {
		return err
	}
	return in.StartWrite(off, n)
}

func (r *intentRef) EndWrite(off, n int64, now time.Duration) {
	if in, err := r.get(); err == nil {
		in.EndWrite(off, n, now)
	}
}

func (r *intentRef) Tick(now time.Duration) (int, error) {
	in, err := r.get()
	if err != nil {
		return 0, nil
	}
	return in.Tick(now)
}

// --- recovery event fan-out ---

// fanout hands the lockspace's recovery events to the broadcaster, the
// ownership driver and the manager, in that order: one lockspace handle
// has one handler, and all three hold locks through it.
type fanout struct {
	mu sync.Mutex
	hs []dlm.RecoveryHandler
}

func (f *fanout) add(h dlm.RecoveryHandler) {
	f.mu.Lock()
	f.hs = append(f.hs, h)
	f.mu.Unlock()
}

func (f *fanout) get() []dlm.RecoveryHandler {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.hs)
}

func (f *fanout) RecoverPrepare(gen uint64) {
	for _, h := range f.get() {
		h.RecoverPrepare(gen)
	}
}

func (f *fanout) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	for _, h := range f.get() {
		h.RecoverDeparted(gen, nodes)
	}
}

func (f *fanout) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	for _, h := range f.get() {
		h.RecoverDone(gen, members, self)
	}
}

// stateCopy returns the current state (tests).
func (m *Manager) stateCopy() *arrayState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st
}
