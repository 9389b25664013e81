package clusterdemo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// Sizes of the demo.
const (
	ImageSize = 64 << 20 // each member file
	DataSize  = 32 << 20 // the known data set node 1 writes
)

// Result collects what the story measured.
type Result struct {
	Create, Assemble, Write, ReadBack time.Duration
	KillToDeparted, KillToFenced      time.Duration
	KillToSlotResynced                time.Duration
	AddConfirmed, Rebuild             time.Duration
	Rejoin                            time.Duration
	Checks                            []string
	Skipped                           []string
}

func (r *Result) check(format string, args ...any) {
	r.Checks = append(r.Checks, fmt.Sprintf(format, args...))
}

// dataset writes the known data set (deterministic) to path.
func dataset(path string) ([]byte, error) {
	b := make([]byte, DataSize)
	rnd := rand.NewChaCha8([32]byte{'m', 'd', 'c', 'l', 'u', 's', 't', 'e', 'r'})
	rnd.Read(b)
	return b, os.WriteFile(path, b, 0o600)
}

// memberData reads the data area of a member image directly.
func memberData(path string) ([]byte, *superblock.Superblock, error) {
	m, err := array.OpenFile(path, false)
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	size, err := m.Size()
	if err != nil {
		return nil, nil, err
	}
	sb, err := superblock.Probe(m, uint64(size)/superblock.SectorSize)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	b := make([]byte, sb.Size*superblock.SectorSize)
	if _, err := m.ReadAt(b, int64(sb.DataOffset)*superblock.SectorSize); err != nil && err != io.EOF {
		return nil, nil, err
	}
	return b, sb, nil
}

func short(b []byte) string { s := sha256.Sum256(b); return fmt.Sprintf("%x", s[:6]) }

// mirrorsEqual compares the data areas of the given members.
func mirrorsEqual(paths ...string) (string, error) {
	var first []byte
	var sums []string
	for i, p := range paths {
		b, _, err := memberData(p)
		if err != nil {
			return "", err
		}
		sums = append(sums, filepath.Base(p)+" sha256 "+short(b))
		if i == 0 {
			first = b
			continue
		}
		if !bytes.Equal(first, b) {
			n := 0
			for k := range b {
				if b[k] != first[k] {
					n++
				}
			}
			return "", fmt.Errorf("mirrors differ: %s and %s differ in %d bytes", paths[0], p, n)
		}
	}
	return strings.Join(sums, ", "), nil
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// Core starts three daemons, creates a clustered raid1 on node 1,
// assembles it on nodes 2 and 3, writes the known data set through node
// 1's export with nbdcopy and reads it back through node 3's.
func Core(ctx context.Context, c *Cluster, r *Result) error {
	a, err := c.Image("a.img", ImageSize)
	if err != nil {
		return err
	}
	b, err := c.Image("b.img", ImageSize)
	if err != nil {
		return err
	}
	c.Say("member files: %s, %s (%d MiB each); configs %s, %s, %s", a, b, ImageSize>>20,
		c.Nodes[0].Config, c.Nodes[1].Config, c.Nodes[2].Config)
	for _, d := range c.Nodes {
		if err := c.Start(d); err != nil {
			return err
		}
	}
	if err := c.WaitView(ctx, 3); err != nil {
		return err
	}
	c.Say("3 mdclusterd running; every node reports a quorate view of 3")
	t := time.Now()
	out, err := c.Mdadm(ctx, c.Nodes[0], "--create", "/dev/md0", "--level=1", "--raid-devices=2", "--bitmap=clustered",
		"--nodes=4", "--bitmap-chunk=1M", "--home-cluster=demo", a, b)
	if err != nil {
		return err
	}
	r.Create = time.Since(t)
	c.Say("node 1: mdadm-go --create /dev/md0 --level=1 --raid-devices=2 --bitmap=clustered --nodes=4 --bitmap-chunk=1M a.img b.img (%v)\n%s", r.Create.Round(time.Millisecond), indent(out))
	t = time.Now()
	for _, d := range c.Nodes[1:] {
		out, err := c.Mdadm(ctx, d, "--assemble", "/dev/md0")
		if err != nil {
			return err
		}
		c.Say("node %d: mdadm-go --assemble /dev/md0\n%s", d.ID, indent(out))
	}
	r.Assemble = time.Since(t)
	out, err = c.Mdadm(ctx, c.Nodes[2], "--detail", "/dev/md0")
	if err != nil {
		return err
	}
	c.Say("node 3: mdadm-go --detail /dev/md0\n%s", indent(out))
	src := filepath.Join(c.Dir, "dataset.bin")
	want, err := dataset(src)
	if err != nil {
		return err
	}
	t = time.Now()
	if _, err := Run(ctx, "nbdcopy", "--flush", src, c.Nodes[0].URI()); err != nil {
		return err
	}
	r.Write = time.Since(t)
	c.Say("node 1: nbdcopy dataset.bin (%d MiB, sha256 %s) -> %s (%v)", DataSize>>20, short(want), c.Nodes[0].URI(), r.Write.Round(time.Millisecond))
	t = time.Now()
	back := filepath.Join(c.Dir, "readback3.bin")
	if _, err := Run(ctx, "nbdcopy", c.Nodes[2].URI(), back); err != nil {
		return err
	}
	r.ReadBack = time.Since(t)
	got, err := os.ReadFile(back)
	if err != nil {
		return err
	}
	if len(got) < DataSize || !bytes.Equal(got[:DataSize], want) {
		return fmt.Errorf("read back through node 3's export: the data set differs (sha256 %s, want %s)", short(got[:min(len(got), DataSize)]), short(want))
	}
	c.Say("node 3: nbdcopy %s -> readback3.bin: first %d MiB identical to the data set (%v)", c.Nodes[2].URI(), DataSize>>20, r.ReadBack.Round(time.Millisecond))
	r.check("data set written through node 1's export reads back identical through node 3's")
	// The daemons' own account of it, from a live scrape of /metrics.
	for _, m := range []struct {
		d      *Daemon
		series string
		min    float64
	}{
		{c.Nodes[0], `mdcluster_array_running{array="/dev/md0"}`, 1},
		{c.Nodes[0], `mdcluster_array_members{array="/dev/md0",state="in_sync"}`, 2},
		{c.Nodes[0], `mdcluster_array_io_written_bytes_total{array="/dev/md0"}`, DataSize},
		{c.Nodes[2], `mdcluster_array_io_read_bytes_total{array="/dev/md0"}`, DataSize},
		{c.Nodes[0], `mdcluster_broadcast_sends_total{array="/dev/md0"}`, 0},
	} {
		v, ok, err := c.Metric(ctx, m.d, m.series)
		if err != nil {
			return err
		}
		if !ok || v < m.min {
			return fmt.Errorf("node %d /metrics: %s = %v (present %v), want at least %v", m.d.ID, m.series, v, ok, m.min)
		}
	}
	c.Say("node 1 and node 3 /metrics: array running, 2 members in sync, the data set counted as written on node 1 and read on node 3")
	r.check("the daemons' /metrics count the array's members and the data set's bytes")
	return nil
}

// Full runs the whole story after Core.
func Full(ctx context.Context, c *Cluster, r *Result) error {
	a, b := filepath.Join(c.Disks, "a.img"), filepath.Join(c.Disks, "b.img")
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	// Node 2 writes through its own export (to the second half, away from
	// the data set) and is killed while it writes.
	fio := exec.Command("fio", "--name=node2", "--ioengine=nbd", "--uri="+n2.URI(), "--rw=randwrite", "--bs=64k",
		fmt.Sprintf("--offset=%d", DataSize), fmt.Sprintf("--size=%d", 24<<20), "--time_based", "--runtime=60", "--iodepth=4")
	fioLog := filepath.Join(c.Dir, "fio-node2.log")
	fl, err := os.Create(fioLog)
	if err != nil {
		return err
	}
	fio.Stdout, fio.Stderr = fl, fl
	if err := fio.Start(); err != nil {
		fl.Close()
		return err
	}
	fioDone := make(chan struct{})
	go func() { fio.Wait(); fl.Close(); close(fioDone) }()
	// Kill it once its bitmap slot (slot 1) marks chunks dirty on disk.
	var dirty int
	for deadline := time.Now().Add(15 * time.Second); ; {
		if dirty, err = c.SlotDirty(ctx, a, 1); err != nil {
			return err
		}
		if dirty > 0 {
			break
		}
		if time.Now().After(deadline) {
			fio.Process.Signal(syscall.SIGKILL)
			<-fioDone
			b, _ := os.ReadFile(fioLog)
			return fmt.Errorf("node 2's bitmap slot shows no dirty chunk while fio writes through its export: %s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.Say("node 2: fio writing 64 KiB random writes through %s (32-56 MiB of the array); mdadm-go --examine-bitmap a.img: slot 1 (node 2) has %d dirty chunks", n2.URI(), dirty)
	kill := time.Now()
	n2.Kill()
	c.Say("node 2: kill -9 (while fio writes through its export)")
	fio.Process.Signal(syscall.SIGKILL)
	<-fioDone
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	line, err := n1.WaitLog(wctx, "nodes departed", "nodes=[2]")
	if err != nil {
		return err
	}
	r.KillToDeparted = since(kill, line)
	c.Say("node 1 log: %s", line)
	for {
		if bs, _ := os.ReadFile(filepath.Join(c.Dir, "fence.log")); strings.Contains(string(bs), "fenced node 2") {
			r.KillToFenced = since(kill, string(bs))
			c.Say("fence agent: %s", strings.TrimSpace(string(bs)))
			break
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("node 2 was not fenced")
		case <-time.After(50 * time.Millisecond):
		}
	}
	// One survivor takes node 2's bitmap slot and resyncs the chunks it marked.
	var who *Daemon
	for who == nil {
		for _, d := range []*Daemon{n1, n3} {
			if l := d.Grep("resynced the chunks a bitmap slot marked"); len(l) > 0 {
				who, line = d, l[0]
			}
		}
		if who != nil {
			break
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("no survivor resynced node 2's dirty chunks (see %s, %s)", n1.Log, n3.Log)
		case <-time.After(50 * time.Millisecond):
		}
	}
	r.KillToSlotResynced = since(kill, line)
	c.Say("node %d log: %s", who.ID, line)
	for _, d := range []*Daemon{n1, n3} {
		for _, l := range d.Grep("slot of the node that left") {
			c.Say("node %d log: %s", d.ID, l)
		}
	}
	if _, err := c.Mdadm(ctx, n1, "--wait", "/dev/md0"); err != nil && !strings.Contains(err.Error(), "exit status 1") {
		return err
	}
	sums, err := mirrorsEqual(a, b)
	if err != nil {
		return err
	}
	if dirty, err = c.SlotDirty(ctx, a, 1); err != nil {
		return err
	}
	if dirty != 0 {
		return fmt.Errorf("node 2's bitmap slot still marks %d dirty chunks after its recovery", dirty)
	}
	c.Say("mirrors after the resync of node 2's dirty chunks: identical (%s); node 2's slot now 0 dirty", sums)
	r.check("after kill -9 of a writing node, a survivor resynced its dirty chunks and the mirrors are identical")

	// Replace a member: fail and remove b.img, add c.img from node 1.
	cimg, err := c.Image("c.img", ImageSize)
	if err != nil {
		return err
	}
	out, err := c.Mdadm(ctx, n1, "/dev/md0", "--fail", b, "--remove", b)
	if err != nil {
		return err
	}
	c.Say("node 1: mdadm-go /dev/md0 --fail b.img --remove b.img\n%s", indent(out))
	t := time.Now()
	out, err = c.Mdadm(ctx, n1, "/dev/md0", "--add", cimg)
	if err != nil {
		return err
	}
	r.AddConfirmed = time.Since(t)
	c.Say("node 1: mdadm-go /dev/md0 --add c.img: confirmed by every node (%v)\n%s", r.AddConfirmed.Round(time.Millisecond), indent(out))
	for _, l := range n3.Grep("device being added found here: confirmed") {
		c.Say("node 3 log: %s", l)
	}
	if _, err := c.Mdadm(ctx, n1, "--wait", "/dev/md0"); err != nil && !strings.Contains(err.Error(), "exit status 1") {
		return err
	}
	for _, d := range []*Daemon{n1, n3} {
		for _, l := range d.Grep("recovery complete") {
			c.Say("node %d log: %s", d.ID, l)
		}
	}
	r.Rebuild = time.Since(t) - r.AddConfirmed
	out, err = c.Mdadm(ctx, n3, "--detail", "/dev/md0")
	if err != nil {
		return err
	}
	c.Say("node 3: mdadm-go --detail /dev/md0\n%s", indent(out))
	if !strings.Contains(out, "c.img") {
		return fmt.Errorf("node 3's --detail does not show c.img")
	}
	// Verify: the members directly, and through an export.
	want, err := os.ReadFile(filepath.Join(c.Dir, "dataset.bin"))
	if err != nil {
		return err
	}
	sums, err = mirrorsEqual(a, cimg)
	if err != nil {
		return err
	}
	c.Say("members read directly: a.img and c.img identical (%s)", sums)
	for _, p := range []string{a, cimg} {
		got, _, err := memberData(p)
		if err != nil {
			return err
		}
		if !bytes.Equal(got[:DataSize], want) {
			return fmt.Errorf("%s: the data set differs on the member", p)
		}
	}
	r.check("members a.img and c.img (rebuilt) hold identical data and the data set")
	back := filepath.Join(c.Dir, "readback1.bin")
	if _, err := Run(ctx, "nbdcopy", n1.URI(), back); err != nil {
		return err
	}
	got, err := os.ReadFile(back)
	if err != nil {
		return err
	}
	if !bytes.Equal(got[:DataSize], want) {
		return fmt.Errorf("read back through node 1's export after the rebuild: the data set differs")
	}
	c.Say("node 1: nbdcopy %s -> readback1.bin: the data set is intact", n1.URI())
	r.check("the data set reads back through node 1's export after the rebuild")

	// Node 2 comes back, assembles the array again and reads it.
	t = time.Now()
	if err := c.Start(n2); err != nil {
		return err
	}
	if err := c.WaitView(ctx, 3); err != nil {
		return err
	}
	// Its configuration lists md0 ([[array]] name = "md0"): the daemon
	// assembles it at start.
	for {
		out, err = c.Mdadm(ctx, n2, "--detail", "/dev/md0")
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("node 2 did not assemble md0 from its configuration: %w", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	r.Rejoin = time.Since(t)
	c.Say("node 2 restarted: back in a view of 3, md0 assembled from its configuration at start (%v)", r.Rejoin.Round(time.Millisecond))
	if l := n2.Grep("array running: exported over NBD"); len(l) > 0 {
		c.Say("node 2 log: %s", l[len(l)-1])
	}
	back = filepath.Join(c.Dir, "readback2.bin")
	if _, err := Run(ctx, "nbdcopy", n2.URI(), back); err != nil {
		return err
	}
	if got, err = os.ReadFile(back); err != nil {
		return err
	}
	if !bytes.Equal(got[:DataSize], want) {
		return fmt.Errorf("read back through the restarted node 2's export: the data set differs")
	}
	c.Say("node 2: nbdcopy %s -> readback2.bin: the data set is intact", n2.URI())
	r.check("the killed node, restarted, rejoins, assembles and reads the data set through its export")
	if sums, err = mirrorsEqual(a, cimg); err != nil {
		return err
	}
	r.check("final: members a.img and c.img identical (%s)", sums)
	return nil
}

// Shutdown stops the arrays (mdadm-go --stop on every node: the export
// closes, the bitmap is flushed, the node leaves the array's broadcast and
// releases its slot clean), then the daemons: node 3 leaves the cluster
// gracefully; nodes 1 and 2 are then the last two of a 2-of-3 quorum, and
// whichever leaves first would leave the other without quorum, so their
// leaves cannot complete (docs/daemon.md): they stop after
// shutdown.leave_timeout with status 1, which is expected here.
func Shutdown(ctx context.Context, c *Cluster, r *Result) error {
	for i := len(c.Nodes) - 1; i >= 0; i-- {
		d := c.Nodes[i]
		if !d.Running() {
			continue
		}
		if _, err := c.Mdadm(ctx, d, "--stop", "/dev/md0"); err != nil {
			return err
		}
		c.Say("node %d: mdadm-go --stop /dev/md0: stopped (export closed, bitmap flushed, its slot released clean)", d.ID)
	}
	for _, p := range []string{"a.img", "c.img"} {
		_, sb, err := memberData(filepath.Join(c.Disks, p))
		if err != nil {
			return err
		}
		if !sb.Clean() {
			return fmt.Errorf("%s: the array is not clean after every node stopped it", p)
		}
	}
	r.check("after --stop on every node the superblocks say clean")
	n3 := c.Nodes[2]
	if n3.Running() {
		t := time.Now()
		if err := n3.Term(20 * time.Second); err != nil {
			return fmt.Errorf("node 3: SIGTERM: %w (see %s)", err, n3.Log)
		}
		c.Say("node 3: SIGTERM: left the cluster gracefully, exit 0 (%v)", time.Since(t).Round(time.Millisecond))
		r.check("node 3 left the cluster gracefully on SIGTERM")
	}
	for _, d := range c.Nodes[:2] {
		if d.Running() {
			d.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, d := range c.Nodes[:2] {
		if d.Running() {
			err := d.Term(20 * time.Second)
			c.Say("node %d: SIGTERM: %v (the last two of a 2-of-3 quorum cannot leave gracefully: stopped after leave_timeout, expected)", d.ID, errOr(err, "exit 0"))
		}
	}
	return nil
}

func errOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

var dirtyRE = regexp.MustCompile(`(\d+) dirty`)

// SlotDirty returns the dirty chunks of a clustered bitmap slot as
// mdadm-go --examine-bitmap reads them from member path.
func (c *Cluster) SlotDirty(ctx context.Context, path string, slot int) (int, error) {
	out, err := Run(ctx, filepath.Join(c.Bin, "mdadm-go"), "--examine-bitmap", path)
	if err != nil {
		return 0, err
	}
	parts := strings.Split(out, "Node Slot : ")
	for _, p := range parts[1:] {
		if !strings.HasPrefix(p, strconv.Itoa(slot)+"\n") {
			continue
		}
		m := dirtyRE.FindStringSubmatch(p)
		if m == nil {
			break
		}
		return strconv.Atoi(m[1])
	}
	return 0, fmt.Errorf("mdadm-go --examine-bitmap %s: no slot %d in:\n%s", path, slot, out)
}

var stampRE = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z`)

// since is the time from t to the first timestamp in a log line (the
// daemons' slog time=..., the fence agent's date -u), or to now if the
// line has none.
func since(t time.Time, line string) time.Duration {
	if m := stampRE.FindString(line); m != "" {
		if at, err := time.Parse(time.RFC3339Nano, m); err == nil {
			return at.Sub(t)
		}
	}
	return time.Since(t)
}
