package crashtest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/raid"
)

// Environment of the parent test.
const (
	seedEnv = "RAID_CRASH_SEED" // replay a run
	logsEnv = "RAID_CRASH_LOGS" // on failure, copy every node's whole log into this directory
	soakEnv = "RAID_CRASH_SOAK" // kill points per array (default: the short run)
)

// killClasses are the device operations the victim is stopped at (see
// probe): before its write-intent bit is durable (set-write, set-sync),
// after (the data writes), during the data write with one copy written and
// the other not (data-c0/c1, fua-c0/c1: the other copy still goes through),
// at a flush, during the bitmap daemon's clearing (clear-sync is the
// preflush or the sync after a cleared page, clear-write the cleared page;
// "@m1" picks the second member's, when the first already has the cleared
// page), and at whatever operation comes next (any). Kill points of class
// "time" kill at a seeded random moment instead.
var killClasses = []string{"set-write", "set-sync", "data-c0", "data-c1", "fua-c0", "fua-c1", "flush-sync",
	"clear-sync", "clear-write", "clear-sync@m1", "clear-write@m1", "any"}

// TestCrash is the engine's crash test on real processes: three nodes
// (mdcluster/node over TCP on 127.0.0.1, each its own process), one array
// over member files opened with O_DIRECT, each node's path to them a
// volatile write-back cache that dies with the process. All three write
// their own chunks with versioned blocks; one node at a time is stopped
// at a chosen device operation and killed with SIGKILL. Before the
// survivors may recover its slot, the parent reads the dead slot's bits
// from the members and checks that every chunk of the dead node's whose
// copies differ on disk is marked. Then exactly one survivor must resync
// exactly those chunks (its bytes copied and written are counted), after
// which the dead slot is clean, every copy of every block is identical,
// every block holds what some write put there, and every acknowledged
// write that was FUA or followed by an acknowledged flush is there (or a
// later one). The victim restarts, rejoins, writes again, and the next
// kill point follows, rotating the victim through all three nodes.
//
// The "-aio" subtests run the same over the engine's production write
// path: the members are the files themselves (aioDev: a *raid.DirectFile
// with the probe around its own methods), so the engine submits every
// plain data write's mirror copies with Linux native AIO, and the
// survivors report their engines' AIO write counts (the run fails if
// there were none). There is no volatile cache on this path, and a
// SIGKILL cannot stop AIO already submitted: the kernel completes it
// before the process is gone. So most of these kill points (aio-c0,
// aio-c1) stop the victim once a request's batch is in the kernel and
// before the engine has reaped it (raid.AIOObserver; only that request
// waits, the node's other writers run on until the kill), and after the
// kill the parent puts back, on one copy, what that write overwrote (the
// probe read it just before submission): the state a power failure with
// the write in flight may leave, one copy new and one old. That copy must
// then differ from the other, its chunk must be marked in the dead slot
// (the intent bit was durable before the data went out), recovery must
// resync it, and no acknowledged durable write may be lost, which an
// engine that acknowledged, ended the write intent or let its caller
// flush and move on before reaping both copies fails. The other kill
// points stop it at the blocking kinds as above (intent, FUA, flush,
// bitmap daemon) or at a random moment under load, with AIO writes in
// flight that then complete.
//
// RAID_CRASH_SEED=S replays a run's choices (process scheduling still
// varies); RAID_CRASH_SOAK=N runs N kill points per array instead of the
// short run.
func TestCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("starts node processes")
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(seedEnv); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", seedEnv, s, err)
		}
		seed = v
	}
	t.Logf("%s=%d", seedEnv, seed)
	short := map[string]int{"raid1": 27, "raid10": 10, "raid1-aio": 12, "raid10-aio": 8}
	soak := 0
	if s := os.Getenv(soakEnv); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			t.Fatalf("%s=%q: want a number of kill points", soakEnv, s)
		}
		soak = v
	}
	for _, sp := range []spec{
		{Level: "raid1", Disks: 2, DevSectors: 6 << 11},
		{Level: "raid10", Disks: 4, Layout: 0x102, ChunkSectors: 128, DevSectors: 4 << 11},
		{Level: "raid1", Disks: 2, DevSectors: 6 << 11, AIO: true},
		{Level: "raid10", Disks: 4, Layout: 0x102, ChunkSectors: 128, DevSectors: 4 << 11, AIO: true},
	} {
		name := sp.name()
		t.Run(name, func(t *testing.T) {
			n := short[name]
			if soak > 0 {
				n = soak
			}
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("replay: %s=%d go test -race -count=1 -run 'TestCrash/%s$' ./mdcluster/raid/crashtest/", seedEnv, seed, name)
				}
			})
			runCrash(t, sp, seed, n)
		})
	}
}

// name is the subtest's: the level, and "-aio" for the AIO variant.
func (s spec) name() string {
	if s.AIO {
		return s.Level + "-aio"
	}
	return s.Level
}

// aioKillClasses are the AIO variant's kill classes besides its AIO
// writes in flight (aio-c0, aio-c1): its plain data writes all go by AIO,
// so data-c0/c1 never occur, and its members have no cache to lose.
var aioKillClasses = []string{"set-write", "set-sync", "fua-c0", "fua-c1", "flush-sync", "clear-sync", "clear-write", "any"}

// killPoint is where one victim dies.
type killPoint struct {
	victim int
	class  string        // a killClasses entry, or "time"
	after  int64         // device operations to let pass first
	delay  time.Duration // for "time"
}

func (k killPoint) String() string {
	if k.class == "time" {
		return fmt.Sprintf("node %d at %v", k.victim, k.delay)
	}
	return fmt.Sprintf("node %d at the first %s after %d ops", k.victim, k.class, k.after)
}

// plan chooses n kill points from the seed; aio plans the AIO variant's.
func plan(rng *rand.Rand, n int, aio bool) []killPoint {
	var ks []killPoint
	classes := slices.Clone(killClasses)
	if aio {
		classes = slices.Clone(aioKillClasses)
	}
	rng.Shuffle(len(classes), func(i, j int) { classes[i], classes[j] = classes[j], classes[i] })
	classed, other := 0, 0
	for i := range n {
		k := killPoint{class: "time"}
		// Every eighth at a random moment, the others at the classes in
		// turn (27 kill points: each class twice); the order is shuffled
		// below. In the AIO variant two of every three classed kill
		// points are an AIO write in flight, alternating the copy that
		// misses it (12 kill points: 8 of them).
		if i%8 != 7 {
			switch {
			case aio && classed%3 != 2:
				k.class = fmt.Sprintf("aio-c%d", (classed-classed/3)%2)
			default:
				k.class = classes[other%len(classes)]
				other++
			}
			k.after = int64(rng.IntN(100))
			classed++
		} else {
			k.delay = time.Duration(50+rng.IntN(450)) * time.Millisecond
		}
		ks = append(ks, k)
	}
	rng.Shuffle(len(ks), func(i, j int) { ks[i], ks[j] = ks[j], ks[i] })
	victims := []int{3, 1, 2} // node 1 is the view's coordinator
	for i := range ks {
		ks[i].victim = victims[i%len(victims)]
	}
	return ks
}

// ---- the parent's side of a node process ----

type child struct {
	t     *testing.T
	c     *cluster
	id    int
	epoch uint64
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	eof   chan struct{} // closed once the process is gone and reaped
	aio   uint64        // its engine's AIO writes as of its last "quiesced"
	ours  atomic.Bool   // the parent killed it (any other death disturbs the run)
	log   string        // its stderr
	dlm   string
	gsp   string
}

func (ch *child) send(format string, a ...any) {
	ch.t.Helper()
	if _, err := fmt.Fprintf(ch.stdin, format+"\n", a...); err != nil {
		ch.c.fatalf("node %d: writing to the child: %v", ch.id, err)
	}
}

// expect returns the next line starting with prefix; an "error:" line, an
// exit or the guard fails the test.
func (ch *child) expect(prefix string, limit time.Duration) string {
	ch.t.Helper()
	return ch.expectOr(prefix, limit, "")
}

// expectOr is expect with what a timeout means.
func (ch *child) expectOr(prefix string, limit time.Duration, why string) string {
	ch.t.Helper()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for {
		ch.c.checkDisturbed()
		select {
		case <-ch.c.distCh:
			ch.c.checkDisturbed()
		case l, ok := <-ch.lines:
			ch.c.checkDisturbed()
			if !ok {
				ch.c.fatalf("node %d exited while waiting for %q", ch.id, prefix)
			}
			if strings.HasPrefix(l, "error:") {
				ch.c.fatalf("node %d: %s", ch.id, l)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
			ch.t.Logf("node %d: unexpected line %q while waiting for %q", ch.id, l, prefix)
		case <-timer.C:
			ch.c.fatalf("node %d: no %q within %v%s", ch.id, prefix, limit, why)
		}
	}
}

// kill sends SIGKILL, lets the reader drain what the process printed, and
// reaps it (a zombie would still answer the fencer's probe).
func (ch *child) kill() {
	ch.ours.Store(true)
	_ = ch.cmd.Process.Signal(syscall.SIGKILL)
	<-ch.eof
	for l := range ch.lines {
		if strings.HasPrefix(l, "error:") {
			ch.c.fatalf("node %d before it was killed: %s", ch.id, l)
		}
	}
}

// ---- the cluster ----

// blockExp is what a block must hold: at least durable (the last version
// acknowledged as FUA or followed by an acknowledged flush), and exactly
// acked (the last acknowledged) once its node is quiesced.
type blockExp struct{ durable, acked uint64 }

type ackRec struct{ blk, n, ver uint64 }

type cluster struct {
	t      *testing.T
	sp     spec
	geo    raid.Geometry
	layout bitmap.Layout
	dir    string
	seed   uint64
	kids   map[int]*child
	dirs   map[int]string
	ports  map[int]string // gossip ports, kept across restarts
	epochs map[int]uint64

	victim atomic.Int32 // the node being killed now (its fence is expected)
	// inView[id] is set once node id's current process is in the view of
	// all three; a view without it is then a disturbance.
	inView [nodes + 1]atomic.Bool
	// distCh is closed when something other than the test killed a node:
	// a node's fencer killed a live node it suspected (a stalled host).
	distCh  chan struct{}
	distMsg atomic.Pointer[string]
	failed  atomic.Pointer[string] // a failure a reader saw (a node crashed)

	mu     sync.Mutex
	blocks []blockExp
	pend   map[[2]int][]ackRec // (node, writer): acknowledged, not yet durable
	acks   int
}

func newCluster(t *testing.T, sp spec, seed uint64) (c *cluster) {
	dir := t.TempDir()
	sp.DataOff, sp.BitmapStart, sp.Slots, sp.BitmapChunk, sp.DaemonSleep = 1<<20, 8192, 4, 64<<10, 10
	g, err := sp.geometry()
	if err != nil {
		t.Fatal(err)
	}
	sb, l, err := sp.bitmap(g)
	if err != nil {
		t.Fatal(err)
	}
	for i := range sp.Disks {
		p := filepath.Join(dir, fmt.Sprintf("member%d.img", i))
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(sp.DataOff + g.DevSize()); err != nil {
			t.Fatal(err)
		}
		if err := bitmap.Format(f, sb, l, false); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		sp.Files = append(sp.Files, p)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs()
		}
	})
	c = &cluster{t: t, sp: sp, geo: g, layout: l, dir: dir, seed: seed,
		kids: map[int]*child{}, dirs: map[int]string{}, ports: map[int]string{}, epochs: map[int]uint64{},
		blocks: make([]blockExp, g.Size()/pageSize), pend: map[[2]int][]ackRec{}, distCh: make(chan struct{})}
	return c
}

// dumpLogs shows the end of every node's log, and copies the whole logs
// where logsEnv says.
func (c *cluster) dumpLogs() {
	t := c.t
	if dst := os.Getenv(logsEnv); dst != "" {
		logs, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
		for _, l := range logs {
			if b, err := os.ReadFile(l); err == nil {
				_ = os.WriteFile(filepath.Join(dst, filepath.Base(c.dir)+"-"+filepath.Base(l)), b, 0o644)
			}
		}
		t.Logf("node logs copied to %s", dst)
	}
	for id, ch := range c.kids {
		b, _ := os.ReadFile(ch.log)
		lines := strings.Split(string(b), "\n")
		t.Logf("---- node %d (epoch %d) log, last lines ----\n%s", id, ch.epoch, strings.Join(lines[max(0, len(lines)-60):], "\n"))
	}
}

// spawn starts node id's process (a new epoch of its writers) and returns
// once it printed its DLM address.
func (c *cluster) spawn(id int) *child {
	t := c.t
	if c.dirs[id] == "" {
		c.dirs[id] = filepath.Join(c.dir, fmt.Sprintf("node%d", id))
		c.ports[id] = "0"
	}
	c.epochs[id]++
	ch := &child{t: t, c: c, id: id, epoch: c.epochs[id], lines: make(chan string, 1024), eof: make(chan struct{}),
		log: filepath.Join(c.dir, fmt.Sprintf("node%d.%d.log", id, c.epochs[id]))}
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.Itoa(id), childDirEnv+"="+c.dirs[id], childSpecEnv+"="+c.sp.String(),
		childSeedEnv+"="+strconv.FormatUint(c.seed^uint64(id)<<48^ch.epoch<<32, 10),
		childEpoch+"="+strconv.FormatUint(ch.epoch, 10), childGossip+"="+c.ports[id])
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(ch.log)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	ch.cmd, ch.stdin = cmd, stdin
	go c.read(ch, stdout)
	c.kids[id] = ch
	t.Cleanup(ch.stop)
	ch.dlm = strings.TrimPrefix(ch.expect("dlm ", 30*time.Second), "dlm ")
	return ch
}

// read turns a child's stdout into lines, recording acknowledgements as
// they arrive (in order, so a "flushed" covers exactly the acks before it).
func (c *cluster) read(ch *child, r io.Reader) {
	defer close(ch.eof)
	defer close(ch.lines)
	defer func() {
		// Reap at once: the fencers wait for the process to be gone.
		_ = ch.cmd.Wait()
		if ch.ours.Load() {
			return
		}
		if ws, ok := ch.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			c.disturb(fmt.Sprintf("node %d (epoch %d) was killed, not by the test (a fence)", ch.id, ch.epoch))
			return
		}
		// A node that exits by itself crashed: that fails the test.
		b, _ := os.ReadFile(ch.log)
		tail := string(b[max(0, len(b)-4000):])
		c.fail(fmt.Sprintf("node %d (epoch %d) exited by itself (%v); the end of its log:\n%s", ch.id, ch.epoch, ch.cmd.ProcessState, tail))
	}()
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := sc.Text()
		f := strings.Fields(l)
		switch {
		case len(f) == 6 && f[0] == "ack":
			var v [5]uint64
			for i := range v {
				v[i], _ = strconv.ParseUint(f[i+1], 10, 64)
			}
			w, blk, n, ver, fua := int(v[0]), v[1], v[2], v[3], v[4] == 1
			c.mu.Lock()
			c.acks++
			for b := blk; b < blk+n; b++ {
				c.blocks[b].acked = ver
				if fua {
					c.blocks[b].durable = ver
				}
			}
			if !fua {
				k := [2]int{ch.id, w}
				c.pend[k] = append(c.pend[k], ackRec{blk, n, ver})
			}
			c.mu.Unlock()
		case len(f) == 2 && f[0] == "flushed":
			w, _ := strconv.Atoi(f[1])
			c.mu.Lock()
			c.durable(ch.id, w)
			c.mu.Unlock()
		case len(f) == 3 && f[0] == "install":
			members := "," + f[2] + ","
			for id := 1; id <= nodes; id++ {
				if c.inView[id].Load() && int32(id) != c.victim.Load() && !strings.Contains(members, ","+strconv.Itoa(id)+",") {
					c.disturb(fmt.Sprintf("node %d installed view %s without node %d, which the test did not kill (a false suspicion: the host stalled)", ch.id, f[1], id))
				}
			}
		case len(f) == 3 && f[0] == "fencing":
			if v, _ := strconv.Atoi(f[1]); int32(v) != c.victim.Load() {
				c.disturb(fmt.Sprintf("node %d fenced node %s, which the test did not kill (a false suspicion: the host stalled)", ch.id, f[1]))
			}
		case len(f) > 0 && f[0] == "sibling":
			// the other copy of a paused data write, let through
		default:
			ch.lines <- l
		}
	}
}

// stop kills the process if it still runs (cleanup).
func (ch *child) stop() {
	ch.ours.Store(true)
	_ = ch.cmd.Process.Signal(syscall.SIGKILL)
	<-ch.eof
}

// disturbed is the panic that ends a cluster's run when a node died
// without the test killing it; runCrash starts a new cluster.
type disturbed struct{ msg string }

func (c *cluster) disturb(msg string) {
	if c.distMsg.CompareAndSwap(nil, &msg) {
		close(c.distCh)
	}
}

// fail records a failure seen by a reader goroutine; the test goroutine
// fails with it at its next wait.
func (c *cluster) fail(msg string) {
	c.failed.Store(&msg)
	c.disturb(msg)
}

// checkDisturbed fails the test with what a reader saw, or panics with
// disturbed if the run was disturbed.
func (c *cluster) checkDisturbed() {
	c.t.Helper()
	if m := c.failed.Load(); m != nil {
		c.t.Fatal(*m)
	}
	if m := c.distMsg.Load(); m != nil {
		panic(disturbed{*m})
	}
}

// fatalf fails the test, unless the failure comes from a disturbance
// (which may be reported a moment after its effects are seen).
func (c *cluster) fatalf(format string, a ...any) {
	c.t.Helper()
	select {
	case <-c.distCh:
	case <-time.After(300 * time.Millisecond):
	}
	c.checkDisturbed()
	c.t.Fatalf(format, a...)
}

// durable marks node id's writer w's acknowledged writes durable (mu held).
func (c *cluster) durable(id, w int) {
	k := [2]int{id, w}
	for _, a := range c.pend[k] {
		for b := a.blk; b < a.blk+a.n; b++ {
			c.blocks[b].durable = max(c.blocks[b].durable, a.ver)
		}
	}
	c.pend[k] = nil
}

func (c *cluster) pids() string {
	var s []string
	for _, id := range slices.Sorted(mapKeys(c.kids)) {
		s = append(s, fmt.Sprintf("%d=%d", id, c.kids[id].cmd.Process.Pid))
	}
	return strings.Join(s, ",")
}

func mapKeys[V any](m map[int]V) func(func(int) bool) {
	return func(yield func(int) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// peers lists the DLM addresses of the running nodes other than id.
func (c *cluster) peers(id int) string {
	var s []string
	for _, k := range slices.Sorted(mapKeys(c.kids)) {
		if k != id {
			s = append(s, fmt.Sprintf("%d=%s", k, c.kids[k].dlm))
		}
	}
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ",")
}

// boot starts (or restarts) node id with the others already running: it
// gets their addresses and processes, joins gossip through one of them,
// waits for the view of all three, opens the array (the ownership driver's
// Join) and starts writing.
func (c *cluster) boot(id int) {
	ch := c.spawn(id)
	ch.send("peers %s pids %s", c.peers(id), c.pids())
	ch.gsp = strings.TrimPrefix(ch.expect("gossip ", 30*time.Second), "gossip ")
	_, port, _ := strings.Cut(ch.gsp, ":")
	c.ports[id] = port
	for k, o := range c.kids {
		if k != id {
			o.send("pid %d %d", id, ch.cmd.Process.Pid)
			o.expect("pid ok", 10*time.Second)
		}
	}
	for k, o := range c.kids {
		if k != id {
			ch.send("join %s", o.gsp)
			break
		}
	}
	ch.send("waitview 1,2,3")
	c.expectView(ch)
	c.inView[id].Store(true)
	ch.send("array")
	ch.expect("joined ", 40*time.Second)
	ch.send("write")
	ch.expect("writing", 10*time.Second)
}

// expectView waits for node ch to be in a recovered view of all three.
// A view that does not form within the child's 30 s is counted as a
// disturbance, like a false suspicion: it is the membership layer's
// trouble on a loaded host (its own tests cover it), not the engine's.
func (c *cluster) expectView(ch *child) {
	l := ch.expect("", 40*time.Second)
	for !strings.HasPrefix(l, "view ") && !strings.HasPrefix(l, "noview ") {
		ch.t.Logf("node %d: unexpected line %q while waiting for its view", ch.id, l)
		l = ch.expect("", 40*time.Second)
	}
	if strings.HasPrefix(l, "noview ") {
		c.disturb(fmt.Sprintf("node %d (epoch %d) saw no view of all three: %s", ch.id, ch.epoch, l))
		c.checkDisturbed()
	}
}

// start forms the first view of three fresh nodes and starts them writing.
func (c *cluster) start() {
	for id := 1; id <= nodes; id++ {
		c.spawn(id)
	}
	for id := 1; id <= nodes; id++ {
		ch := c.kids[id]
		ch.send("peers %s pids %s", c.peers(id), c.pids())
	}
	for id := 1; id <= nodes; id++ {
		ch := c.kids[id]
		ch.gsp = strings.TrimPrefix(ch.expect("gossip ", 30*time.Second), "gossip ")
		_, c.ports[id], _ = strings.Cut(ch.gsp, ":")
	}
	for id := 2; id <= nodes; id++ {
		c.kids[id].send("join %s", c.kids[1].gsp)
	}
	for id := 1; id <= nodes; id++ {
		c.kids[id].send("waitview 1,2,3")
	}
	for id := 1; id <= nodes; id++ {
		c.expectView(c.kids[id])
		c.inView[id].Store(true)
	}
	for id := 1; id <= nodes; id++ {
		c.kids[id].send("array")
	}
	for id := 1; id <= nodes; id++ {
		c.kids[id].expect("joined ", 40*time.Second)
	}
	for id := 1; id <= nodes; id++ {
		c.kids[id].send("write")
		c.kids[id].expect("writing", 10*time.Second)
	}
}

// ---- what is on the disk ----

// image is the members' data areas and the union of each slot's bits
// over the members, read from the files with O_DIRECT.
type image struct {
	data  [][]byte
	slots []map[uint64]bool
}

func (c *cluster) readImage() image {
	t := c.t
	var im image
	for s := 0; s < c.layout.Slots; s++ {
		im.slots = append(im.slots, map[uint64]bool{})
	}
	for _, p := range c.sp.Files {
		f, err := raid.OpenDirect(p)
		if err != nil {
			t.Fatal(err)
		}
		b := alignedBuf(int(c.geo.DevSize()))
		if _, err := f.ReadAt(b, c.sp.DataOff); err != nil {
			t.Fatal(err)
		}
		im.data = append(im.data, b)
		for s := 0; s < c.layout.Slots; s++ {
			sl, err := bitmap.ReadSlot(f, c.layout, s)
			if err != nil {
				t.Fatalf("%s: slot %d: %v", p, s, err)
			}
			for _, ch := range sl.DirtyChunks() {
				im.slots[s][ch] = true
			}
		}
		f.Close()
	}
	return im
}

// copies returns every copy of the 4 KiB array block blk.
func (c *cluster) copies(im image, blk uint64) [][]byte {
	locs, _ := c.geo.Locate(int64(blk)*pageSize, nil)
	out := make([][]byte, len(locs))
	for i, l := range locs {
		out[i] = im.data[l.Member][l.Off : l.Off+pageSize]
	}
	return out
}

// differing returns the chunks of node id whose copies differ somewhere.
func (c *cluster) differing(im image, id int) []uint64 {
	per := uint64(c.sp.BitmapChunk / pageSize)
	var out []uint64
	for ch := uint64(0); ch < uint64(len(c.blocks))/per; ch++ {
		if nd, _ := chunkOwner(ch); nd != id {
			continue
		}
		for b := ch * per; b < (ch+1)*per; b++ {
			cs := c.copies(im, b)
			if !allEqual(cs) {
				out = append(out, ch)
				break
			}
		}
	}
	return out
}

func allEqual(cs [][]byte) bool {
	for _, x := range cs[1:] {
		if !bytes.Equal(cs[0], x) {
			return false
		}
	}
	return true
}

func sortedKeys(m map[uint64]bool) []uint64 {
	var out []uint64
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// verify checks, with every live node quiesced, that every copy of every
// block is identical, that each block holds a whole version some write
// put there, at least its last durable one, and exactly its last
// acknowledged one on a live node. The dead node's blocks then take what
// is on disk as their new baseline.
func (c *cluster) verify(im image, dead int, at string) {
	t := c.t
	c.mu.Lock()
	per := uint64(c.sp.BitmapChunk / pageSize)
	bad := 0
	for b := range uint64(len(c.blocks)) {
		nd, _ := chunkOwner(b / per)
		cs := c.copies(im, b)
		if !allEqual(cs) {
			t.Logf("%s: chunk %d (node %d) block %d: the copies differ after recovery", at, b/per, nd, b)
			bad++
		}
		v, err := decodeBlock(cs[0], b)
		exp := &c.blocks[b]
		switch {
		case err != nil:
			t.Logf("%s: chunk %d (node %d): %v", at, b/per, nd, err)
			bad++
		case v < exp.durable:
			t.Logf("%s: chunk %d (node %d) block %d holds version %s, older than the durable acknowledged %s: an acknowledged write was lost",
				at, b/per, nd, b, verString(v), verString(exp.durable))
			bad++
		case nd != dead && v != exp.acked:
			t.Logf("%s: chunk %d (node %d, live and flushed) block %d holds version %s, its last acknowledged write is %s",
				at, b/per, nd, b, verString(v), verString(exp.acked))
			bad++
		case nd == dead:
			exp.durable, exp.acked = v, v
		}
		if bad > 10 {
			break
		}
	}
	c.mu.Unlock() // not deferred: fatalf must not run (nor exit) holding it
	if bad > 0 {
		c.fatalf("%s: %d bad blocks", at, bad)
	}
}

// ---- the run ----

// outcome is one kill point's figures.
type outcome struct {
	kp       killPoint
	paused   string // the operation the victim stopped at
	dirty    int    // chunks the dead slot marked on disk
	torn     int    // of the victim's chunks, those whose copies differed on disk
	resynced int64  // array bytes the survivors' resync copied
	detect   time.Duration
	recover  time.Duration
	acks     int    // writes acknowledged by all nodes since the previous kill point
	inflight bool   // the victim died with an AIO write in flight, one copy rolled back
	aio      uint64 // the survivors' AIO writes since they last reported
}

// run starts the cluster and runs kill points until they are done or
// something other than the test killed a node.
func (c *cluster) run(kps []killPoint, outs *[]outcome) (d *disturbed) {
	defer func() {
		if r := recover(); r != nil {
			dd, ok := r.(disturbed)
			if !ok {
				panic(r)
			}
			d = &dd
		}
	}()
	t := c.t
	start := time.Now()
	c.start()
	t.Logf("%s over %d members (%v), 3 nodes formed and writing in %v", c.sp.Level, c.sp.Disks, c.geo, time.Since(start).Round(time.Millisecond))
	for _, kp := range kps {
		o := c.killAndRecover(len(*outs), kp)
		c.boot(kp.victim)
		c.victim.Store(0)
		c.mu.Lock()
		o.acks, c.acks = c.acks, 0
		c.mu.Unlock()
		*outs = append(*outs, o)
	}
	return nil
}

func runCrash(t *testing.T, sp spec, seed uint64, n int) {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	kps := plan(rng, n, sp.AIO)
	start := time.Now()
	var outs []outcome
	var disturbances []string
	for len(outs) < len(kps) {
		if len(disturbances) > 6 {
			t.Fatalf("the clusters were disturbed %d times (%s): the host is too loaded for the fast failure detector", len(disturbances), strings.Join(disturbances, "; "))
		}
		c := newCluster(t, sp, seed+uint64(len(disturbances)))
		if d := c.run(kps[len(outs):], &outs); d != nil {
			// A node's fencer killed a node it only suspected: a real
			// fence would have too. The kill point in progress does not
			// count; a fresh cluster goes on with it.
			t.Logf("DISTURBED at kill point %d: %s; starting a new cluster", len(outs), d.msg)
			disturbances = append(disturbances, d.msg)
			for _, ch := range c.kids {
				ch.stop()
			}
		}
	}
	// Coverage: the run must have met the states it claims to test.
	dirty, torn := 0, 0
	var bytes int64
	for _, o := range outs {
		if o.dirty > 0 {
			dirty++
		}
		if o.torn > 0 {
			torn++
		}
		bytes += o.resynced
	}
	elapsed := time.Since(start)
	acks := 0
	for _, o := range outs {
		acks += o.acks
	}
	t.Logf("%d kill points in %v: %d with dirty chunks on disk, %d with copies differing on disk, %d chunks (%d KiB) resynced in all; %d writes acknowledged; %d clusters disturbed (DISTURBED lines above)",
		len(outs), elapsed.Round(time.Millisecond), dirty, torn, bytes/(64<<10), bytes>>10, acks, len(disturbances))
	if dirty == 0 || torn == 0 {
		t.Errorf("no kill point found dirty chunks (%d) or differing copies (%d) on disk: the test did not exercise recovery", dirty, torn)
	}
	if sp.AIO {
		inflight, planned := 0, 0
		var aio uint64
		for _, o := range outs {
			if o.inflight {
				inflight++
			}
			if strings.HasPrefix(o.kp.class, "aio-") {
				planned++
			}
			aio += o.aio
		}
		t.Logf("AIO: %d kill points with an AIO write in flight (%d planned), %d AIO member writes reported by the survivors", inflight, planned, aio)
		if aio == 0 {
			t.Errorf("the survivors' engines reported no AIO writes: the AIO variant did not exercise the AIO write path")
		}
		if inflight < planned {
			t.Errorf("only %d of the %d AIO kill points stopped the victim with an AIO write in flight", inflight, planned)
		}
	}
}

// rollBack puts back, on the member, what the victim's paused AIO write
// overwrote (its probe recorded it before submitting the batch), and
// returns that record.
func (c *cluster) rollBack(victim int, at string) *undoRec {
	path := filepath.Join(c.dirs[victim], undoFile)
	r, err := readUndo(path)
	if err != nil {
		c.fatalf("%s: the victim paused with an AIO write in flight but left no record of it: %v", at, err)
	}
	f, err := raid.OpenDirect(c.sp.Files[r.member])
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(r.old, r.off); err != nil {
		c.t.Fatalf("%s: rolling back member %d %d+%d: %v", at, r.member, r.off, r.n, err)
	}
	if err := os.Remove(path); err != nil {
		c.t.Fatal(err)
	}
	return r
}

// killAndRecover runs one kill point: stop the victim where kp says, kill
// it, check the disk against its slot, let the survivors recover, check
// what they resynced and the whole array.
func (c *cluster) killAndRecover(i int, kp killPoint) outcome {
	t := c.t
	o := outcome{kp: kp}
	at := fmt.Sprintf("kill point %d (%s)", i, kp)
	victim := c.kids[kp.victim]
	c.victim.Store(int32(kp.victim))
	c.inView[kp.victim].Store(false)
	var survivors []*child
	for _, id := range slices.Sorted(mapKeys(c.kids)) {
		if id != kp.victim {
			survivors = append(survivors, c.kids[id])
		}
	}
	for _, s := range survivors {
		s.send("hold")
		s.expect("held", 10*time.Second)
	}
	if kp.class == "time" {
		time.Sleep(kp.delay)
		o.paused = "random time"
	} else {
		victim.send("arm %s %d", kp.class, kp.after)
		victim.expect("armed", 10*time.Second)
		o.paused = strings.TrimPrefix(victim.expectOr("paused ", 30*time.Second,
			fmt.Sprintf(": %s: the victim issued no %s operation", at, kp.class)), "paused ")
		time.Sleep(20 * time.Millisecond) // the other copies of a paused data write
	}
	t0 := time.Now()
	victim.kill()
	// The kernel completed the victim's AIO writes in flight before the
	// process was gone; a power failure could have kept any of them off
	// the medium. Put back what the paused one overwrote on its copy.
	var undo *undoRec
	if strings.HasSuffix(o.paused, " in flight") {
		undo = c.rollBack(kp.victim, at)
		o.inflight = true
	}
	c.mu.Lock()
	for w := range writersPerNode {
		c.pend[[2]int{kp.victim, w}] = nil // acknowledged, never flushed: may be lost
	}
	c.mu.Unlock()
	delete(c.kids, kp.victim)

	// The survivors' lock managers recover without the victim; their slot
	// recoveries wait (held) while the disk is read.
	for _, s := range survivors {
		s.expect("pending ", 30*time.Second)
	}
	o.detect = time.Since(t0)
	im := c.readImage()
	slot := kp.victim - 1
	dirty := sortedKeys(im.slots[slot])
	torn := c.differing(im, kp.victim)
	o.dirty, o.torn = len(dirty), len(torn)
	for _, ch := range torn {
		if !im.slots[slot][ch] {
			c.fatalf("%s: chunk %d's copies differ on disk but the dead node's slot does not mark it (slot marks %v)", at, ch, dirty)
		}
	}
	if undo != nil {
		// The rolled-back copy holds an older version than the other:
		// its chunk must be among those whose copies differ.
		v, _, _, ok := c.geo.Virt(undo.member, undo.off-c.sp.DataOff)
		ch := uint64(v / c.sp.BitmapChunk)
		if !ok || !slices.Contains(torn, ch) {
			c.fatalf("%s: the AIO write in flight at member %d %d+%d was rolled back on that copy, yet its chunk's copies do not differ (differing: %v)",
				at, undo.member, undo.off, undo.n, torn)
		}
	}

	// Recover: exactly one survivor must resync exactly those chunks.
	t1 := time.Now()
	for _, s := range survivors {
		s.send("recover")
		s.expect("released ", 10*time.Second)
	}
	winners := 0
	for _, s := range survivors {
		f := strings.Fields(s.expect("recovered ", 60*time.Second))
		slots := f[2]
		copied, _ := strconv.ParseInt(f[3], 10, 64)
		written, _ := strconv.ParseInt(f[4], 10, 64)
		o.resynced += copied
		if slots == "-" {
			if copied != 0 || written != 0 {
				c.fatalf("%s: node %d recovered no slot but its resync copied %d bytes and wrote %d", at, s.id, copied, written)
			}
			continue
		}
		for _, rec := range strings.Split(slots, ";") {
			sl, list, _ := strings.Cut(rec, ":")
			if sl != strconv.Itoa(slot) {
				c.fatalf("%s: node %d recovered slot %s, only slot %d's node died", at, s.id, sl, slot)
			}
			var got []uint64
			for _, x := range strings.Split(list, ",") {
				if x != "" {
					v, _ := strconv.ParseUint(x, 10, 64)
					got = append(got, v)
				}
			}
			if !slices.Equal(got, dirty) {
				c.fatalf("%s: node %d resynced chunks %v, the dead slot marked %v on disk", at, s.id, got, dirty)
			}
		}
		winners++
		want := int64(len(dirty)) * c.sp.BitmapChunk
		if copied != want || written != want*int64(c.geo.Copies()-1) {
			c.fatalf("%s: node %d's resync copied %d bytes and wrote %d; the dead slot's %d chunks need exactly %d and %d",
				at, s.id, copied, written, len(dirty), want, want*int64(c.geo.Copies()-1))
		}
	}
	if len(dirty) > 0 && winners != 1 {
		c.fatalf("%s: %d survivors recovered the dead slot, want exactly one", at, winners)
	}
	o.recover = time.Since(t1)

	// Quiesce the survivors (every acknowledged write is then durable)
	// and check the whole array.
	for _, s := range survivors {
		s.send("quiesce")
	}
	for _, s := range survivors {
		f := strings.Fields(s.expect("quiesced", 30*time.Second))
		if len(f) == 3 {
			n, _ := strconv.ParseUint(f[1], 10, 64)
			o.aio += n - s.aio
			s.aio = n
		}
		c.mu.Lock()
		for w := range writersPerNode {
			c.durable(s.id, w)
		}
		c.mu.Unlock()
	}
	im = c.readImage()
	if d := sortedKeys(im.slots[slot]); len(d) > 0 {
		c.fatalf("%s: the dead node's slot still marks %v after recovery", at, d)
	}
	c.verify(im, kp.victim, at)
	for _, s := range survivors {
		s.send("resume")
		s.expect("writing", 10*time.Second)
	}
	aio := ""
	if c.sp.AIO {
		aio = fmt.Sprintf("; survivors' AIO writes %d", o.aio)
	}
	t.Logf("%-48s stopped at %-40s dirty %2d, copies differing %2d, resynced %4d KiB; recovery pending after %v, done in %v%s",
		kp.String(), o.paused, o.dirty, o.torn, o.resynced>>10, o.detect.Round(time.Millisecond), o.recover.Round(time.Millisecond), aio)
	return o
}
