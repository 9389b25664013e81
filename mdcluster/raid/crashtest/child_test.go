package crashtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap/ownership"
	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// The child is one node: this test binary re-executed with childEnv set
// to its node ID. It speaks a line protocol on stdin/stdout with the
// parent (crash_test.go):
//
//	→ dlm <addr>                 its DLM listener (a new port every start)
//	← peers id=addr,... pids id=pid,...
//	→ gossip <addr>              its node is running
//	← join <addr> | waitview <ids> (→ view <gen>)
//	← array                      engine + ownership driver, Join (→ joined ...)
//	← write | quiesce | resume   the writers (→ writing | quiesced <aio writes>
//	                             <aio fallbacks> | writing)
//	← arm <class> <n>            pause the device I/O at the first operation
//	                             of class after n more (→ armed; later paused ...)
//	← hold | recover             hold slot recoveries until recover
//	                             (→ held; pending ...; released; recovered ...)
//	← pid <id> <pid>             the fencer's process table (→ pid ok)
//
// and prints, as they happen, "ack <writer> <block> <blocks> <version>
// <fua>" for every acknowledged write, "flushed <writer>" for every
// acknowledged flush, "install <gen> <members>" for every view it
// installs, "fencing <node> <pid>" before its fencer kills a node, and
// "error: ..." when something is wrong.
const (
	childEnv     = "RAID_CRASH_CHILD"
	childDirEnv  = "RAID_CRASH_DIR"
	childSpecEnv = "RAID_CRASH_SPEC"
	childSeedEnv = "RAID_CRASH_CHILD_SEED"
	childEpoch   = "RAID_CRASH_EPOCH"
	childGossip  = "RAID_CRASH_GOSSIP_PORT"
)

var clusterKey = []byte("raid crash test cluster key 0123")

// TestCrashChild is not a test: it is one node of TestCrash.
func TestCrashChild(t *testing.T) {
	id := os.Getenv(childEnv)
	if id == "" {
		t.Skip("only runs as a node of TestCrash")
	}
	if err := runChild(id); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

type out struct {
	mu sync.Mutex
	w  io.Writer
}

func (o *out) printf(format string, a ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, format+"\n", a...)
}

// pidFencer is the nodes' power fence: it kills the node's process with
// SIGKILL (after checking that the process is that node of this test, so
// a stale entry can never hit anything else) and confirms once the parent
// has reaped it. A real fence agent powers the node off; a node that was only
// suspected (a busy host) is killed too, as it would be in production, and
// the parent sees the "fencing" line.
type pidFencer struct {
	o    *out
	mu   sync.Mutex
	pids map[node.NodeID]int
}

func (f *pidFencer) set(id node.NodeID, pid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pids[id] = pid
}

// ours reports whether pid is node id's process of this test.
func ours(pid int, id node.NodeID) bool {
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return false
	}
	for _, kv := range strings.Split(string(env), "\x00") {
		if kv == childEnv+"="+id.String() {
			return true
		}
	}
	return false
}

func (f *pidFencer) Fence(ctx context.Context, req fence.Request) (fence.Result, error) {
	f.mu.Lock()
	pid, ok := f.pids[req.Node]
	f.mu.Unlock()
	if !ok {
		return fence.Result{}, fmt.Errorf("pid fencer: no process known for node %s: %w", req.Node, fence.ErrFailed)
	}
	if ours(pid, req.Node) {
		f.o.printf("fencing %s %d", req.Node, pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return fence.Result{Node: req.Node, Method: "pid-killed", FencedAt: time.Now(), Verified: true}, nil
		}
		select {
		case <-ctx.Done():
			return fence.Result{}, fmt.Errorf("pid fencer: process %d of node %s still exists: %w", pid, req.Node, fence.ErrTimeout)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func parseMap(s string) (map[node.NodeID]string, error) {
	m := map[node.NodeID]string{}
	if s == "-" {
		return m, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		id, err := strconv.ParseUint(k, 10, 32)
		if !ok || err != nil {
			return nil, fmt.Errorf("bad entry %q", kv)
		}
		m[node.NodeID(id)] = v
	}
	return m, nil
}

func idList[T ~uint32](ids []T) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.FormatUint(uint64(id), 10)
	}
	return strings.Join(s, ",")
}

// recoveryGate runs the slot recoveries the lock manager's events start
// (ownership.Config.Go), or holds them while the parent reads the dead
// slot from the disk.
type recoveryGate struct {
	o       *out
	mu      sync.Mutex
	hold    bool
	pending []func()
}

func (g *recoveryGate) Go(f func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.hold {
		g.pending = append(g.pending, f)
		g.o.printf("pending %d", len(g.pending))
		return
	}
	go f()
}

// forward hands the lockspace's recovery events to the driver (once it is
// set, by the "array" command) and suspends read balancing during recovery,
// as md-cluster does between recover_prep and recover_done.
type forward struct {
	drv atomic.Pointer[ownership.Driver]
	e   atomic.Pointer[raid.Engine]
}

func (f *forward) RecoverPrepare(gen uint64) {
	if e := f.e.Load(); e != nil {
		e.SuspendReadBalancing(true)
	}
	if d := f.drv.Load(); d != nil {
		d.RecoverPrepare(gen)
	}
}

func (f *forward) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	if d := f.drv.Load(); d != nil {
		d.RecoverDeparted(gen, nodes)
	}
}

func (f *forward) RecoverDone(gen uint64, members []dlm.NodeID, self dlm.NodeID) {
	if d := f.drv.Load(); d != nil {
		d.RecoverDone(gen, members, self)
	}
	if e := f.e.Load(); e != nil {
		e.SuspendReadBalancing(false)
	}
}

// array is the node's array: the engine over its view of the members, the
// ownership driver, the bitmap daemon and the writers.
type array struct {
	o     *out
	id    int
	sp    spec
	geo   raid.Geometry
	e     *raid.Engine
	drv   *ownership.Driver
	probe *probe
	epoch uint64
	seed  uint64

	mu      sync.Mutex
	stop    chan struct{}
	wg      sync.WaitGroup
	writers []*writer
}

func runChild(idStr string) error {
	o := &out{w: os.Stdout}
	id64, err := strconv.ParseUint(idStr, 10, 32)
	if err != nil {
		return fmt.Errorf("bad node ID %q", idStr)
	}
	id := node.NodeID(id64)
	sp, err := parseSpec(os.Getenv(childSpecEnv))
	if err != nil {
		return err
	}
	seed, _ := strconv.ParseUint(os.Getenv(childSeedEnv), 10, 64)
	epoch, _ := strconv.ParseUint(os.Getenv(childEpoch), 10, 64)
	gossipPort, _ := strconv.Atoi(os.Getenv(childGossip))
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	o.printf("dlm %s", ln.Addr())
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() {
		return errors.New("stdin closed before the peer list")
	}
	f := strings.Fields(in.Text())
	if len(f) != 4 || f[0] != "peers" || f[2] != "pids" {
		return fmt.Errorf("bad peer line %q", in.Text())
	}
	addrs, err := parseMap(f[1])
	if err != nil {
		return err
	}
	pidStr, err := parseMap(f[3])
	if err != nil {
		return err
	}
	fencer := &pidFencer{o: o, pids: map[node.NodeID]int{}}
	for k, v := range pidStr {
		pid, _ := strconv.Atoi(v)
		fencer.set(k, pid)
	}
	cfg := node.StorageLANConfig()
	cfg.ID, cfg.ClusterKey, cfg.DataDir, cfg.DLMListener = id, clusterKey, os.Getenv(childDirEnv), ln
	cfg.GossipPort = gossipPort
	cfg.Quorum = ddraid.Config{DataNodes: []node.NodeID{1, 2, 3}, Quorum: 2}
	cfg.Fencer = fencer
	cfg.FenceTimeout = 5 * time.Second
	cfg.Logger = logger
	cfg.OnEvent = func(e node.Event) {
		if e.Kind == node.EventInstall {
			o.printf("install %d %s", e.Gen, idList(e.Nodes))
		}
	}
	cfg.Peers = map[node.NodeID]string{}
	for k, v := range addrs {
		if k != id {
			cfg.Peers[k] = v
		}
	}
	n, err := node.New(cfg)
	if err != nil {
		return err
	}
	defer n.Close()
	fwd := &forward{}
	o.printf("gossip %s", n.GossipAddr())

	gate := &recoveryGate{o: o}
	var arr *array
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "join":
			if err := n.Join(f[1:]); err != nil {
				o.printf("error: join: %v", err)
			}
		case "waitview":
			deadline := time.Now().Add(30 * time.Second)
			for {
				st := n.Status()
				if idList(st.View.Members) == f[1] && st.Quorate && st.Recovered == st.View.Gen && !st.Stopped {
					o.printf("view %d", st.View.Gen)
					break
				}
				if time.Now().After(deadline) {
					o.printf("noview %s within 30 s: %+v", f[1], st)
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
		case "pid":
			k, _ := strconv.ParseUint(f[1], 10, 32)
			pid, _ := strconv.Atoi(f[2])
			fencer.set(node.NodeID(k), pid)
			o.printf("pid ok")
		case "array":
			// The array's lockspace is opened only now, once the node is in
			// a view, as the daemon does when it assembles an array: after
			// a restart this lockspace joins the recovery the others
			// started when the view readmitted this node.
			ls, err := n.Open("md0", dlm.OpenOptions{LVBLen: ownership.LVBSize, Recovery: fwd})
			if err != nil {
				o.printf("error: array: open lockspace: %v", err)
				continue
			}
			a, err := openArray(o, ls, fwd, int(id), sp, gate, seed, epoch, logger)
			if err != nil {
				o.printf("error: array: %v", err)
				continue
			}
			arr = a
		case "write", "resume":
			arr.startWriters()
			o.printf("writing")
		case "quiesce":
			if err := arr.quiesce(); err != nil {
				o.printf("error: quiesce: %v", err)
				continue
			}
			st := arr.e.Stats()
			o.printf("quiesced %d %d", st.AIOWrites, st.AIOFallbacks)
		case "arm":
			after, _ := strconv.ParseInt(f[2], 10, 64)
			arr.probe.arm(f[1], after)
			o.printf("armed")
		case "hold":
			gate.mu.Lock()
			gate.hold = true
			gate.mu.Unlock()
			o.printf("held")
		case "recover":
			gate.mu.Lock()
			gate.hold = false
			fs := gate.pending
			gate.pending = nil
			gate.mu.Unlock()
			o.printf("released %d", len(fs))
			go arr.recoverHeld(fs)
		default:
			o.printf("error: unknown command %q", f[0])
		}
	}
	return nil
}

// undoFile, in a node's directory, is what an AIO pause's write overwrote.
const undoFile = "undo"

// openArray builds the node's array the way docs/raid.md wires it: the
// engine over the members (each behind this process's volatile cache, or
// in the AIO variant the files themselves),
// the ownership driver over the engine's bitmap mirrors, the engine as
// the driver's Array, Join, then the engine writes under the driver's
// write-intent bitmap; a goroutine is md's bitmap daemon.
func openArray(o *out, ls *dlm.Lockspace, fwd *forward, id int, sp spec, gate *recoveryGate, seed, epoch uint64, logger *slog.Logger) (*array, error) {
	g, err := sp.geometry()
	if err != nil {
		return nil, err
	}
	_, layout, err := sp.bitmap(g)
	if err != nil {
		return nil, err
	}
	a := &array{o: o, id: id, sp: sp, geo: g, epoch: epoch, seed: seed}
	a.probe = &probe{geo: g, dataOff: sp.DataOff, report: o.printf, undoPath: filepath.Join(os.Getenv(childDirEnv), undoFile)}
	members := make([]raid.Member, len(sp.Files))
	for i, path := range sp.Files {
		df, err := raid.OpenDirect(path)
		if err != nil {
			return nil, err
		}
		var dev raid.Device = &cacheDev{f: df, member: i, probe: a.probe, pages: map[int64][]byte{},
			rng: rand.New(rand.NewPCG(seed, uint64(i)))}
		if sp.AIO {
			dev = &aioDev{DirectFile: df, member: i, probe: a.probe}
		}
		members[i] = raid.Member{Device: dev, DataOffset: sp.DataOff}
	}
	a.e, err = raid.New(raid.Config{Geometry: g, Members: members, BitmapChunkSize: sp.BitmapChunk, RequireIntent: true,
		Logger: logger, OnMemberFailed: func(m int, err error) { o.printf("error: member %d failed: %v", m, err) }})
	if err != nil {
		return nil, err
	}
	fwd.e.Store(a.e)
	a.drv, err = ownership.New(ownership.Config{Lockspace: ls, Node: dlm.NodeID(id), Layout: layout, Mirrors: a.e.BitmapMirrors(),
		Array: a.e, DaemonSleep: time.Duration(sp.DaemonSleep) * time.Millisecond, Logger: logger, Go: gate.Go})
	if err != nil {
		return nil, err
	}
	fwd.drv.Store(a.drv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.drv.Join(ctx); err != nil {
		return nil, err
	}
	a.e.SetIntent(a.drv.Intent())
	go func() {
		for range time.Tick(3 * time.Millisecond) {
			if _, err := a.drv.Intent().Tick(a.e.Clock().Now()); err != nil {
				o.printf("error: bitmap daemon: %v", err)
				return
			}
		}
	}()
	for w := range writersPerNode {
		wr := &writer{a: a, idx: w, rng: rand.New(rand.NewPCG(seed, uint64(100+w)))}
		for c := uint64(0); c < uint64(g.Size()/sp.BitmapChunk); c++ {
			if nd, ww := chunkOwner(c); nd == id && ww == w {
				wr.chunks = append(wr.chunks, c)
			}
		}
		a.writers = append(a.writers, wr)
	}
	o.printf("joined %d", len(a.drv.Recoveries()))
	return a, nil
}

// recoverHeld runs the recoveries held since "hold", one after the other,
// and reports what they did: the chunks of each slot recovered, the
// engine's resync bytes (array bytes copied) and the bytes its resync
// wrote to the members.
func (a *array) recoverHeld(fs []func()) {
	recs0 := len(a.drv.Recoveries())
	bytes0 := a.e.Stats().ResyncBytes
	written0 := a.probe.resyncWritten.Load()
	for _, f := range fs {
		f()
	}
	var slots []string
	var errs []string
	for _, r := range a.drv.Recoveries()[recs0:] {
		s := make([]string, len(r.Chunks))
		for i, c := range r.Chunks {
			s[i] = strconv.FormatUint(c, 10)
		}
		slots = append(slots, fmt.Sprintf("%d:%s", r.Slot, strings.Join(s, ",")))
		if r.Err != nil {
			errs = append(errs, strconv.Quote(r.Err.Error()))
		}
	}
	if len(slots) == 0 {
		slots = []string{"-"}
	}
	if len(errs) > 0 {
		a.o.printf("error: slot recovery: %s", strings.Join(errs, "; "))
	}
	a.o.printf("recovered %d %s %d %d", len(fs), strings.Join(slots, ";"), a.e.Stats().ResyncBytes-bytes0, a.probe.resyncWritten.Load()-written0)
}

func (a *array) startWriters() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stop = make(chan struct{})
	for _, w := range a.writers {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			w.run(a.stop)
		}()
	}
}

// quiesce stops the writers and flushes: every write acknowledged before
// "quiesced" is durable.
func (a *array) quiesce() error {
	a.mu.Lock()
	close(a.stop)
	a.mu.Unlock()
	a.wg.Wait()
	return a.e.Flush()
}

// writer writes its own chunks: a few hot chunks at a time (the others go
// idle, so the bitmap daemon clears their bits), one to four blocks per
// write, a third of them FUA, a flush after about every twelfth, and
// reads some back through the engine.
type writer struct {
	a      *array
	idx    int
	rng    *rand.Rand
	chunks []uint64
	seq    uint64
	hot    int
}

func (w *writer) run(stop <-chan struct{}) {
	a := w.a
	perChunk := a.sp.BitmapChunk / pageSize
	buf := alignedBuf(4 * pageSize)
	rb := alignedBuf(4 * pageSize)
	for n := 0; ; n++ {
		select {
		case <-stop:
			return
		default:
		}
		if n%24 == 0 {
			w.hot = w.rng.IntN(len(w.chunks))
		}
		c := w.chunks[(w.hot+w.rng.IntN(3))%len(w.chunks)]
		nb := 1 + w.rng.IntN(4)
		blk := c*uint64(perChunk) + uint64(w.rng.IntN(int(perChunk)-nb+1))
		w.seq++
		ver := a.epoch<<32 | w.seq
		for i := range nb {
			fillBlock(buf[i*pageSize:(i+1)*pageSize], blk+uint64(i), ver)
		}
		var flags nbd.IOFlags
		fua := w.rng.IntN(3) == 0
		if fua {
			flags = nbd.FUA
		}
		off := int64(blk) * pageSize
		if err := a.e.WriteAt(buf[:nb*pageSize], off, flags); err != nil {
			a.o.printf("error: write of blocks %d+%d: %v", blk, nb, err)
			return
		}
		f := 0
		if fua {
			f = 1
		}
		a.o.printf("ack %d %d %d %d %d", w.idx, blk, nb, ver, f)
		if w.rng.IntN(12) == 0 {
			if err := a.e.Flush(); err != nil {
				a.o.printf("error: flush: %v", err)
				return
			}
			a.o.printf("flushed %d", w.idx)
		}
		if w.rng.IntN(8) == 0 {
			if _, err := a.e.ReadAt(rb[:nb*pageSize], off); err != nil {
				a.o.printf("error: read of blocks %d+%d: %v", blk, nb, err)
				return
			}
			for i := range nb {
				got, err := decodeBlock(rb[i*pageSize:(i+1)*pageSize], blk+uint64(i))
				if err != nil || got != ver {
					a.o.printf("error: read back block %d: version %s, %v; wrote %s", blk+uint64(i), verString(got), err, verString(ver))
					return
				}
			}
		}
		// A pause between writes keeps three processes (under -race too)
		// from starving each other's failure detectors on a small host.
		time.Sleep(time.Duration(1+w.rng.IntN(6)) * time.Millisecond)
	}
}
