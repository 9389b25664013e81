package clusterdemo

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestDemoCore runs the demo's core with real processes: three mdclusterd
// from configuration files (seed addresses only), a clustered raid1
// created with mdadm-go on node 1 and assembled on nodes 2 and 3, a data
// set written through node 1's NBD export with nbdcopy and read back
// through node 3's; then SIGTERM to node 3 while its array runs: it
// quiesces the array (export closed, array stopped, slot released) and
// leaves gracefully (exit 0), and nodes 1 and 2 keep serving.
func TestDemoCore(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the control socket serves only uid 0")
	}
	if _, err := exec.LookPath("nbdcopy"); err != nil {
		t.Skip("nbdcopy not installed (make deps)")
	}
	bin := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	args := []string{"build", "-o", bin + "/"}
	if raceEnabled {
		args = append(args, "-race") // the daemons too, under go test -race
	}
	build := exec.Command(gobin, append(args, "github.com/mdcluster/mdcluster/cmd/mdclusterd", "github.com/mdcluster/mdcluster/cmd/mdadm-go")...)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	dir := t.TempDir()
	var log strings.Builder
	c, err := Setup(dir, bin, &log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Stop()
		t.Log("\n" + log.String())
		if t.Failed() {
			for _, d := range c.Nodes {
				b, _ := os.ReadFile(d.Log)
				lines := strings.Split(string(b), "\n")
				t.Logf("--- node %d log (last 40 lines):\n%s", d.ID, strings.Join(lines[max(0, len(lines)-40):], "\n"))
				if i := strings.Index(string(b), "WARNING: DATA RACE"); i >= 0 {
					t.Logf("--- node %d: race report:\n%s", d.ID, string(b[i:min(len(b), i+20000)]))
				}
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	var r Result
	if err := Core(ctx, c, &r); err != nil {
		t.Fatal(err)
	}
	n3 := c.Nodes[2]
	if err := n3.Term(15 * time.Second); err != nil {
		t.Fatalf("node 3: SIGTERM with md0 running: %v (want exit 0 after a graceful leave)", err)
	}
	if len(n3.Grep("array quiesced")) == 0 || len(n3.Grep("left the cluster gracefully")) == 0 {
		t.Fatalf("node 3's log lacks the quiesce or the graceful leave (%s)", n3.Log)
	}
	if err := c.WaitView(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join(dir, "fence.log")); err == nil {
		t.Fatal("a node was fenced after node 3's graceful leave")
	}
	// Node 1 still serves: the data set reads back through its export.
	back := filepath.Join(dir, "readback1.bin")
	if _, err := Run(ctx, "nbdcopy", c.Nodes[0].URI(), back); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(back)
	want, _ := os.ReadFile(filepath.Join(dir, "dataset.bin"))
	if len(got) < DataSize || string(got[:DataSize]) != string(want) {
		t.Fatal("after node 3 left, node 1's export does not return the data set")
	}
	out, err := c.Mdadm(ctx, c.Nodes[0], "--detail", "/dev/md0")
	if err != nil || !strings.Contains(out, "Active Devices : 2") || !strings.Contains(out, "Cluster Name : demo") {
		t.Fatalf("node 1 --detail: %v\n%s", err, out)
	}
	out, err = c.Mdadm(ctx, c.Nodes[1], "--status")
	if err != nil || !strings.Contains(out, "md0 : active raid1") || !strings.Contains(out, "[2/2] [UU]") {
		t.Fatalf("node 2 --status: %v\n%s", err, out)
	}
	if out, err := c.Mdadm(ctx, c.Nodes[0], "--detail", "/dev/md9"); err == nil {
		t.Fatalf("--detail of an array that does not exist succeeded:\n%s", out)
	}
	if out, err := c.Mdadm(ctx, c.Nodes[0], "--create", "/dev/md0", "--level=1", "--raid-devices=2",
		filepath.Join(c.Disks, "a.img"), filepath.Join(c.Disks, "b.img")); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("a second create of /dev/md0: %v\n%s", err, out)
	}
	c.Stop()
	for _, d := range c.Nodes {
		if l := d.Grep("DATA RACE"); len(l) > 0 {
			// The log goes with the test's temporary directory: show the
			// report here.
			b, _ := os.ReadFile(d.Log)
			report := string(b)
			if i := strings.Index(report, "WARNING: DATA RACE"); i >= 0 {
				report = report[i:]
			}
			if len(report) > 20000 {
				report = report[:20000]
			}
			t.Errorf("node %d: the race detector reported a data race:\n%s", d.ID, report)
		}
	}
	t.Logf("create %v, assemble %v, write %v, read back %v", r.Create, r.Assemble, r.Write, r.ReadBack)
}
