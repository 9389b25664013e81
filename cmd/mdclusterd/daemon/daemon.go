// Package daemon is mdclusterd's runtime: it starts the node runtime
// (membership, quorum, fencing, DLM, state store) from a checked
// configuration, serves the control socket and the metrics endpoint,
// talks to systemd, and stops gracefully. The array layer (array manager,
// RAID engine, NBD export) plugs in through ArrayLayer.
//
// Start brings everything up in an order that can be undone: a daemon
// that fails to start leaves no socket, listener or goroutine behind.
// Run then waits for SIGTERM/SIGINT or a `leave` request and carries out
// the graceful stop: the array layer quiesces, the node leaves the view
// (bounded by shutdown.leave_timeout), then everything closes. A second
// signal during the leave stops at once.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/internal/sdnotify"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/node"
)

// Options are what Start needs besides the configuration.
type Options struct {
	// Config is the checked configuration (config.Load).
	Config *config.Config
	// Logger receives the daemon's log; nil means NewLogger(Config.Log,
	// os.Stderr).
	Logger *slog.Logger
	// Arrays is the array layer; nil means NoArrays.
	Arrays ArrayLayer
	// Notify sends states to systemd; nil means sdnotify.Notify.
	Notify func(states ...string) (bool, error)
}

// NewLogger builds the daemon's slog logger from the [log] section: text
// or JSON lines to w, at the configured level.
func NewLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level)) // checked by config
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// Daemon is a running mdclusterd.
type Daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	metrics *Metrics
	arrays  ArrayLayer
	notify  func(states ...string) (bool, error)
	fencer  *recordingFencer
	stamper *stamperSlot
	// nodeRef is the node (Node). Atomic: the node's own goroutines
	// (onEvent) run from node.New on, before Start has stored it.
	nodeRef atomic.Pointer[node.Node]
	control *controlServer
	mserver *metricsServer
	started time.Time

	leaving   atomic.Bool
	leaveReq  chan struct{}
	leaveDone chan struct{}
	leaveErr  error
	leaveTook time.Duration

	closeOnce sync.Once
	// viewMu orders tellView's calls: events come from more than one
	// goroutine, and each call reads the node's status afresh under it, so
	// the last call the array layer sees carries the newest quorum.
	viewMu sync.Mutex
}

// Start brings the daemon up: control socket, metrics endpoint, data
// directory, node runtime, array layer; then it serves requests and tells
// systemd READY=1. On error everything started so far is stopped again.
func Start(ctx context.Context, opts Options) (d *Daemon, err error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, errors.New("daemon: no configuration")
	}
	d = &Daemon{cfg: cfg, log: opts.Logger, arrays: opts.Arrays, notify: opts.Notify, metrics: newMetrics(),
		stamper: &stamperSlot{}, leaveReq: make(chan struct{}, 1), leaveDone: make(chan struct{})}
	if d.log == nil {
		d.log = NewLogger(cfg.Log, os.Stderr)
	}
	if d.arrays == nil {
		d.arrays = NoArrays{}
	}
	if d.notify == nil {
		d.notify = sdnotify.Notify
	}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	cln, err := listenControl(cfg.Control.Socket)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { _ = cln.Close() })
	var mln net.Listener
	if cfg.Metrics.Listen != "" {
		if mln, err = listenMetrics(cfg.Metrics.Listen); err != nil {
			return nil, err
		}
		undo = append(undo, func() { _ = mln.Close() })
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}

	d.fencer = &recordingFencer{f: buildFencer(cfg.Fencing.Levels, d.stamper, cfg.Lease.FenceWait()), m: d.metrics}
	for i, lv := range cfg.Fencing.Levels {
		if lv.Stamp {
			d.log.Warn("fencing level uses the storage generation stamp; it fails until the array layer provides member devices to stamp",
				"level", i+1)
		}
	}
	nc := nodeProfile(cfg.Profile)
	nc.ID = cfg.NodeID
	nc.Quorum = cfg.Quorum
	nc.DLMListenAddr = cfg.DLM.ListenAddr
	nc.DLMAdvertiseAddr = cfg.DLM.AdvertiseAddr
	nc.GossipBindAddr, nc.GossipPort, nc.Seeds = cfg.Gossip.BindAddr, cfg.Gossip.Port, cfg.Gossip.Seeds
	nc.ClusterKey = cfg.ClusterKey
	nc.DataDir = cfg.DataDir
	nc.Fencer = d.fencer
	nc.FenceTimeout = cfg.Fencing.Timeout
	nc.Logger = d.log
	nc.OnEvent = d.onEvent
	n, err := node.New(nc)
	if err != nil {
		return nil, fmt.Errorf("starting the node: %w", err)
	}
	d.nodeRef.Store(n)
	d.started = time.Now()
	undo = append(undo, func() { _ = n.Close() })

	d.metrics.Registry.MustRegister(newMembershipCollector(func() (ctl.Status, bool) { return d.Status(), true }),
		newTransportCollector(n.DLM().TransportStats))
	env := ArrayEnv{Node: n, Store: n.Store(), Config: cfg, Logger: d.log, Metrics: d.metrics.Registry,
		Locker: d.metrics.Locker, SetStamper: d.stamper.set}
	if err := d.arrays.Start(ctx, env); err != nil {
		return nil, fmt.Errorf("starting the array layer: %w", err)
	}
	undo = append(undo, func() { _ = d.arrays.Close() })

	d.control = newControlServer(cln, cfg.Control, d.log, d.metrics, d.handle)
	d.control.serve()
	if mln != nil {
		d.mserver = serveMetrics(mln, d.metrics, cfg.Metrics.MaxConnections, d.log)
	}
	d.log.Info("mdclusterd started", "config", cfg.Path, "node", cfg.NodeID, "profile", string(cfg.Profile),
		"control_socket", cfg.Control.Socket, "gossip", n.GossipAddr(), "dlm", n.DLMAddr().String(),
		"dlm_advertised", n.DLMAdvertiseAddr(), "quorum", cfg.Quorum.String())
	if sent, err := d.notify(sdnotify.Ready, sdnotify.Status("started; joining the cluster")); err != nil {
		d.log.Warn("could not tell systemd that the daemon is ready", "err", err)
	} else if sent {
		d.log.Debug("told systemd READY=1")
	}
	return d, nil
}

// Node returns the node runtime (for the array layer and tests).
func (d *Daemon) Node() *node.Node { return d.nodeRef.Load() }

// Metrics returns the daemon's metrics (its Registry is the seam for the
// array layer's collectors).
func (d *Daemon) Metrics() *Metrics { return d.metrics }

// ControlSocket returns the control socket's path.
func (d *Daemon) ControlSocket() string { return d.cfg.Control.Socket }

// MetricsAddr returns the metrics endpoint's address ("" when disabled).
func (d *Daemon) MetricsAddr() string {
	if d.mserver == nil {
		return ""
	}
	return d.mserver.ln.Addr().String()
}

// onEvent counts the node's membership events and keeps systemd's status
// line current. It runs on the agreement's goroutine: it only counts and
// sends one datagram.
func (d *Daemon) onEvent(e node.Event) {
	d.tellView(e)
	switch e.Kind {
	case node.EventInstall:
		if e.Err == nil {
			d.metrics.viewInstalls.Inc()
		}
	case node.EventRecovered:
		d.metrics.recoveries.Inc()
	case node.EventStop:
		d.metrics.lockMgrStops.Inc()
	case node.EventQuorum:
		if !e.Quorate {
			d.metrics.quorumLost.Inc()
		}
	default:
		return
	}
	n := d.nodeRef.Load()
	if n == nil {
		return
	}
	st := n.Status()
	q := "quorate"
	if !st.Quorate {
		q = "not quorate"
	}
	_, _ = d.notify(sdnotify.Status(fmt.Sprintf("view %d with %d members, %s", st.View.Gen, len(st.View.Members), q)))
}

// tellView passes the view and quorum to an array layer that watches
// them (the storage lease), on an install and on a quorum change. It does
// not pass a view change's ballot early: the view finally chosen may carry
// a lower generation that leaves this node out, and a lease raised to the
// ballot would then ignore that view's fence.
func (d *Daemon) tellView(e node.Event) {
	obs, ok := d.arrays.(ViewObserver)
	n := d.nodeRef.Load()
	if !ok || n == nil {
		return
	}
	switch e.Kind {
	case node.EventInstall, node.EventRecovered, node.EventQuorum:
		d.viewMu.Lock()
		defer d.viewMu.Unlock()
		st := n.Status()
		obs.SetView(st.View.Gen, st.Quorate)
	}
}

// Run waits for SIGTERM or SIGINT on sigs, or a `leave` request, and stops
// the daemon gracefully: the array layer quiesces, the node leaves the
// cluster (bounded by shutdown.leave_timeout), and everything closes. A
// second signal while leaving stops at once. The error says why the leave
// was not graceful (the daemon is stopped either way).
func (d *Daemon) Run(sigs <-chan os.Signal) error {
	var reason string
	select {
	case s := <-sigs:
		reason = "signal " + s.String()
	case <-d.leaveReq:
		reason = "leave requested on the control socket"
	}
	d.leaving.Store(true)
	d.log.Info("stopping: leaving the cluster gracefully", "reason", reason, "leave_timeout", d.cfg.Shutdown.LeaveTimeout)
	if _, err := d.notify(sdnotify.Stopping, sdnotify.Status("leaving the cluster")); err != nil {
		d.log.Warn("could not tell systemd that the daemon is stopping", "err", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.Shutdown.LeaveTimeout)
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- d.leave(ctx) }()
	var err error
	select {
	case err = <-done:
	case s := <-sigs:
		d.log.Warn("second signal: stopping at once; the others will see a failure and fence this node", "signal", s.String())
		cancel()
		if err = <-done; err == nil {
			err = errors.New("stopped at once by a second signal")
		}
	}
	d.leaveTook = time.Since(start)
	d.leaveErr = err
	close(d.leaveDone)
	if err != nil {
		d.log.Error("the graceful leave did not complete; stopping anyway (the other nodes will fence this one)", "err", err,
			"took", d.leaveTook.Round(time.Millisecond))
	}
	d.Close()
	return err
}

// leave is the graceful part of the stop.
func (d *Daemon) leave(ctx context.Context) error {
	if err := d.arrays.Quiesce(ctx); err != nil {
		// Array I/O may still be running: leaving now would let the
		// others take over without fencing a node that may write.
		return fmt.Errorf("the array layer did not quiesce, so the node does not leave gracefully: %w", err)
	}
	if v := d.Node().Status().View; len(v.Members) == 1 && v.Members[0] == d.cfg.NodeID {
		// Nobody remains to install a view without this node, so the
		// agreement's leave could never complete; nobody is there to
		// fence it either. Restarted, it finds its view again.
		d.log.Info("this node is the only member of the view: nothing to leave", "gen", v.Gen)
		return nil
	}
	start := time.Now()
	if err := d.Node().Leave(ctx); err != nil {
		return fmt.Errorf("leaving the cluster within shutdown.leave_timeout (%v): %w", d.cfg.Shutdown.LeaveTimeout, err)
	}
	d.log.Info("left the cluster gracefully", "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// Close stops everything at once without leaving the cluster (to the
// others it looks like a crash): the control socket and metrics endpoint,
// the array layer, then the node. Run calls it after the leave; it is safe
// to call more than once.
func (d *Daemon) Close() {
	d.closeOnce.Do(func() {
		if d.control != nil {
			d.control.close(2 * time.Second)
		}
		if d.mserver != nil {
			d.mserver.close()
		}
		if err := d.arrays.Close(); err != nil {
			d.log.Error("closing the array layer", "err", err)
		}
		if err := d.Node().Close(); err != nil {
			d.log.Error("closing the node", "err", err)
		}
		d.log.Info("mdclusterd stopped")
	})
}

// handle dispatches one control request.
func (d *Daemon) handle(ctx context.Context, req ctl.Request) (any, error) {
	switch req.Command {
	case ctl.CmdStatus:
		if err := ctl.DecodeArgs(req.Args, &struct{}{}); err != nil {
			return nil, ctl.Errorf(ctl.CodeBadRequest, "status: %v (status takes no arguments)", err)
		}
		return d.Status(), nil
	case ctl.CmdLocks:
		var a ctl.LocksArgs
		if err := ctl.DecodeArgs(req.Args, &a); err != nil {
			return nil, ctl.Errorf(ctl.CodeBadRequest, "locks: %v", err)
		}
		return d.Locks(a.Lockspace)
	case ctl.CmdLeave:
		if err := ctl.DecodeArgs(req.Args, &struct{}{}); err != nil {
			return nil, ctl.Errorf(ctl.CodeBadRequest, "leave: %v (leave takes no arguments)", err)
		}
		return d.leaveCommand(ctx)
	}
	if slices.Contains(ctl.ArrayCommands, req.Command) {
		if d.leaving.Load() {
			return nil, ctl.Errorf(ctl.CodeUnavailable, "%s: mdclusterd is leaving the cluster", req.Command)
		}
		return d.arrays.Command(ctx, req.Command, req.Args)
	}
	return nil, ctl.Errorf(ctl.CodeUnknownCommand, "unknown command %q (this mdclusterd knows %s)", req.Command,
		strings.Join(append([]string{ctl.CmdStatus, ctl.CmdLocks, ctl.CmdLeave}, ctl.ArrayCommands...), ", "))
}

// leaveCommand starts the graceful stop (if nothing else has) and waits
// for the leave's outcome.
func (d *Daemon) leaveCommand(ctx context.Context) (any, error) {
	select {
	case d.leaveReq <- struct{}{}:
	default:
	}
	select {
	case <-d.leaveDone:
	case <-ctx.Done():
		return nil, ctl.Errorf(ctl.CodeUnavailable, "leave: the daemon stopped before the leave completed")
	}
	if d.leaveErr != nil {
		return nil, ctl.Errorf(ctl.CodeFailed, "leave: %v", d.leaveErr)
	}
	return ctl.LeaveResult{Seconds: d.leaveTook.Seconds()}, nil
}

// quorumSummary is the status's one-line quorum explanation: the data-node
// arithmetic of view gen (ev), unless the arithmetic passes while the
// agreement says this node is not quorate (it is rejoining after a
// restart, the cluster has moved to a newer view, or it is leaving). A bare
// "quorate" there would contradict the Quorate line printed above it.
func quorumSummary(ev ddraid.Status, quorate bool, gen uint64) string {
	if !ev.Quorate || quorate {
		return ev.String()
	}
	return fmt.Sprintf("%d of %d data nodes of view %d present (need %d), but this node is not quorate in it: it is rejoining after a restart, the cluster has moved to a newer view, or it is leaving (the node's log says which)",
		ev.Present, ev.DataNodes, gen, ev.Need)
}

// Status reports the node as the `status` command shows it.
func (d *Daemon) Status() ctl.Status {
	n := d.Node()
	st := n.Status()
	alive := n.Alive()
	q := d.cfg.Quorum
	var present []ddraid.NodeID
	for _, id := range st.View.Members {
		if slices.Contains(alive, id) {
			present = append(present, id)
		}
	}
	ev := q.Evaluate(present)
	s := ctl.Status{
		Node: ctl.NodeInfo{ID: uint32(d.cfg.NodeID), Profile: string(d.cfg.Profile), GossipAddr: n.GossipAddr(),
			DLMAddr: n.DLMAddr().String(), DLMAdvertised: n.DLMAdvertiseAddr(), Started: d.started},
		State: "running",
		View:  ctl.View{Generation: st.View.Gen, Members: ids32(st.View.Members)},
		Quorum: ctl.Quorum{ExpectedVotes: ev.DataNodes, TotalVotes: ev.Present, Quorum: ev.Need,
			TieBreaker: uint32(q.TieBreaker), TieBreakerPresent: ev.TieBreakerPresent, Quorate: st.Quorate, Summary: quorumSummary(ev, st.Quorate, st.View.Gen),
			DataNodes: ids32(q.DataNodes), NonDataNodes: ids32(q.NonDataNodes)},
		RecoveredGeneration: st.Recovered,
		LockManagerStopped:  st.Stopped,
		Lockspaces:          n.DLM().Lockspaces(),
	}
	if d.leaving.Load() {
		s.State = "leaving"
	}
	if st.Err != nil {
		s.Error = st.Err.Error()
	}
	s.Fencing, s.FencingDropped = d.fencer.History()
	all := map[ddraid.NodeID]bool{d.cfg.NodeID: true}
	for _, set := range [][]ddraid.NodeID{st.View.Members, alive, q.DataNodes, q.NonDataNodes} {
		for _, id := range set {
			all[id] = true
		}
	}
	ids := make([]ddraid.NodeID, 0, len(all))
	for id := range all {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	addrs := n.DLM().PeerAddrs()
	for _, id := range ids {
		m := ctl.Member{ID: uint32(id), Self: id == d.cfg.NodeID, DataNode: q.IsDataNode(id),
			InView: st.View.Contains(id), Alive: slices.Contains(alive, id)}
		if m.DataNode {
			m.Votes = 1
		}
		if !m.Self {
			m.DLMAddr = addrs[dlm.NodeID(id)]
			if ps, ok := n.DLM().PeerStatus(dlm.NodeID(id)); ok {
				m.DLMConnected = ps.Connected
			}
		}
		s.Members = append(s.Members, m)
	}
	if s.Fencing == nil {
		s.Fencing = []ctl.FenceRecord{}
	}
	return s
}

func ids32(ids []membership.NodeID) []uint32 {
	out := make([]uint32, len(ids))
	for i, id := range ids {
		out[i] = uint32(id)
	}
	return out
}

// Locks dumps one lockspace, or all of them when name is empty.
func (d *Daemon) Locks(name string) (ctl.Locks, error) {
	dn := d.Node().DLM()
	names := dn.Lockspaces()
	if name != "" {
		if !slices.Contains(names, name) {
			return ctl.Locks{}, ctl.Errorf(ctl.CodeFailed, "locks: no lockspace %q on node %d (open: %s)", name, d.cfg.NodeID,
				strings.Join(names, ", "))
		}
		names = []string{name}
	}
	out := ctl.Locks{Node: uint32(d.cfg.NodeID), Lockspaces: []ctl.Lockspace{}}
	for _, ls := range names {
		dump, ok := dn.DumpLockspace(ls)
		if !ok {
			continue
		}
		l := ctl.Lockspace{Name: ls, Resources: []ctl.Resource{}}
		for _, r := range dump {
			res := ctl.Resource{Name: r.Name, Master: uint32(r.Master), LVBSeq: r.LVBSeq, ValNotValid: r.ValNotValid, Idle: r.Idle,
				Granted: lockRows(r.Granted), Converting: lockRows(r.Converting), Waiting: lockRows(r.Waiting)}
			if r.LVB != nil {
				res.LVB = fmt.Sprintf("%x", r.LVB)
			}
			l.Resources = append(l.Resources, res)
		}
		out.Lockspaces = append(out.Lockspaces, l)
	}
	return out, nil
}

func lockRows(in []dlm.LockInfo) []ctl.Lock {
	var out []ctl.Lock
	for _, li := range in {
		l := ctl.Lock{ID: fmt.Sprintf("%08x", uint64(li.ID)), Node: uint32(li.Node), Owner: uint32(li.Owner),
			Mode: li.Granted.String(), Orphan: li.Orphan}
		if li.Requested != dlm.ModeIV {
			l.Requested = li.Requested.String()
		}
		if li.Flags != 0 {
			l.Flags = li.Flags.String()
		}
		out = append(out, l)
	}
	return out
}

var _ fence.Fencer = (*recordingFencer)(nil)

// nodeProfile is the node runtime's configuration for a profile of the
// configuration file (its timings; the caller fills in the rest).
func nodeProfile(p config.Profile) node.Config {
	switch p {
	case config.ProfileStorageLAN:
		return node.StorageLANConfig()
	case config.ProfileVM:
		return node.VMConfig()
	}
	return node.DefaultLANConfig()
}
