package clusterdemo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// RepeatEnv names the environment variable that enables
// TestDemoTimingsRepeated and sets its repetitions (e.g. 10).
const RepeatEnv = "MDCLUSTER_DEMO_REPEAT"

// TestDemoTimingsRepeated measures, over N repetitions in one run of three
// mdclusterd processes (storage-LAN profile, loopback, file members,
// clustered raid1), the two timings the daemon promises:
//
//   - add spare: `mdadm-go /dev/md0 --add X` on node 1 returns once every
//     node has confirmed the new disk (NEWDISK), before any rebuild. The
//     array is fully in sync, so X joins as a spare and nothing rebuilds;
//     it is removed again before the next repetition.
//   - kill -9: node 2 writes through its export with fio; once its bitmap
//     slot marks dirty chunks on disk it is killed with SIGKILL. Timed
//     from the kill to the survivors' view without it, to its fencing, to
//     a survivor starting the resync of the dirty chunks of its slot (it
//     holds the slot, recovered), and to the end of that resync. Node 2 is
//     restarted and reassembles md0 before the next repetition.
//
// It prints the median, min and max of each. The spares are added first
// on purpose: each add used to make some nodes attach a phantom array
// (the added device's candidate UUID) whose lockspace a restarted node
// never opened, so the survivors' lock recovery of the view readmitting
// it never finished (fixed in the array layer's scanner). Times after the
// kill come from the daemons' and the fence agent's log timestamps. Slow
// (about 5 s a repetition), so it runs only with MDCLUSTER_DEMO_REPEAT=N.
func TestDemoTimingsRepeated(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv(RepeatEnv))
	if n <= 0 {
		t.Skipf("set %s=N to run N repetitions", RepeatEnv)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the control socket serves only uid 0")
	}
	for _, tool := range []string{"nbdcopy", "fio"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (make deps)", tool)
		}
	}
	bin := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	build := exec.Command(gobin, "build", "-o", bin+"/", "github.com/mdcluster/mdcluster/cmd/mdclusterd", "github.com/mdcluster/mdcluster/cmd/mdadm-go")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	// MDCLUSTER_DEMO_DIR keeps the cluster's directory (logs, configs,
	// images) for a look afterwards.
	dir := os.Getenv("MDCLUSTER_DEMO_DIR")
	if dir == "" {
		dir = t.TempDir()
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	c, err := Setup(dir, bin, &log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Stop()
		if t.Failed() {
			t.Log("\n" + log.String())
			for _, d := range c.Nodes {
				b, _ := os.ReadFile(d.Log)
				lines := strings.Split(string(b), "\n")
				t.Logf("--- node %d log (last 40 lines):\n%s", d.ID, strings.Join(lines[max(0, len(lines)-40):], "\n"))
			}
		}
	}()
	// MDCLUSTER_DEMO_LOG_LEVEL=debug makes the daemons log at that level.
	if lvl := os.Getenv("MDCLUSTER_DEMO_LOG_LEVEL"); lvl != "" {
		for _, d := range c.Nodes {
			f, err := os.OpenFile(d.Config, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(f, "[log]\nlevel = %q\n", lvl)
			f.Close()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(n)*40*time.Second+time.Minute)
	defer cancel()
	var r Result
	if err := Core(ctx, c, &r); err != nil {
		t.Fatal(err)
	}
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	a := filepath.Join(c.Disks, "a.img")

	killPhase := func() {
		// kill -9 of a writing node, then restart it.
		var departed, fenced, resyncing, resynced []time.Duration
		for i := 0; i < n; i++ {
			before := map[*Daemon]int{n1: len(n1.Grep("nodes departed", "nodes=[2]")), n3: len(n3.Grep("nodes departed", "nodes=[2]"))}
			startsBefore := map[*Daemon]int{n1: len(n1.Grep(slotResyncStart)), n3: len(n3.Grep(slotResyncStart))}
			endsBefore := map[*Daemon]int{n1: len(n1.Grep(slotResyncEnd)), n3: len(n3.Grep(slotResyncEnd))}
			fencesBefore := strings.Count(readFile(filepath.Join(dir, "fence.log")), "fenced node 2")

			fio := exec.Command("fio", "--name=node2", "--ioengine=nbd", "--uri="+n2.URI(), "--rw=randwrite", "--bs=64k",
				fmt.Sprintf("--offset=%d", DataSize), fmt.Sprintf("--size=%d", 24<<20), "--time_based", "--runtime=60", "--iodepth=4")
			fl, err := os.Create(filepath.Join(dir, fmt.Sprintf("fio-%d.log", i)))
			if err != nil {
				t.Fatal(err)
			}
			fio.Stdout, fio.Stderr = fl, fl
			if err := fio.Start(); err != nil {
				t.Fatal(err)
			}
			fioDone := make(chan struct{})
			go func() { fio.Wait(); fl.Close(); close(fioDone) }()
			for deadline := time.Now().Add(15 * time.Second); ; {
				dirty, err := c.SlotDirty(ctx, a, 1)
				if err != nil {
					t.Fatal(err)
				}
				if dirty > 0 {
					break
				}
				if time.Now().After(deadline) {
					fio.Process.Signal(syscall.SIGKILL)
					<-fioDone
					t.Fatalf("repetition %d: node 2's slot shows no dirty chunk while fio writes", i)
				}
				time.Sleep(20 * time.Millisecond)
			}
			kill := time.Now()
			n2.Kill()
			fio.Process.Signal(syscall.SIGKILL)
			<-fioDone

			line := waitNth(ctx, t, []*Daemon{n1}, before, "nodes departed", "nodes=[2]")
			departed = append(departed, since(kill, line))
			for {
				if s := readFile(filepath.Join(dir, "fence.log")); strings.Count(s, "fenced node 2") > fencesBefore {
					ls := strings.Split(strings.TrimSpace(s), "\n")
					fenced = append(fenced, since(kill, ls[len(ls)-1]))
					break
				}
				if ctx.Err() != nil {
					t.Fatalf("repetition %d: node 2 was not fenced", i)
				}
				time.Sleep(20 * time.Millisecond)
			}
			line = waitNth(ctx, t, []*Daemon{n1, n3}, startsBefore, slotResyncStart)
			resyncing = append(resyncing, since(kill, line))
			line = waitNth(ctx, t, []*Daemon{n1, n3}, endsBefore, slotResyncEnd)
			resynced = append(resynced, since(kill, line))

			restart := time.Now()
			if err := c.Start(n2); err != nil {
				t.Fatal(err)
			}
			vctx, vcancel := context.WithTimeout(ctx, time.Minute)
			err = c.WaitView(vctx, 3)
			vcancel()
			if err != nil {
				t.Fatalf("repetition %d: node 2 restarted at %s: %v", i, restart.UTC().Format(time.RFC3339Nano), err)
			}
			// md0 is in node 2's configuration: it is assembled at start.
			for {
				if _, err := c.Mdadm(ctx, n2, "--detail", "/dev/md0"); err == nil {
					break
				}
				if ctx.Err() != nil {
					t.Fatalf("repetition %d: node 2 did not reassemble md0", i)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if _, err := c.Mdadm(ctx, n1, "--wait", "/dev/md0"); err != nil && !strings.Contains(err.Error(), "exit status 1") {
				t.Fatal(err)
			}
		}
		report(t, "kill -9 of a writing node -> survivors' view without it", departed)
		report(t, "kill -9 -> fenced", fenced)
		report(t, "kill -9 -> a survivor holds its slot and resyncs its dirty chunks", resyncing)
		report(t, "kill -9 -> its dirty chunks resynced", resynced)
	}
	addPhase := func() {
		// Add spare, confirmed on every node, then removed again.
		var add []time.Duration
		for i := 0; i < n; i++ {
			img, err := c.Image(fmt.Sprintf("spare%d.img", i), ImageSize)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			out, err := c.Mdadm(ctx, n1, "/dev/md0", "--add", img)
			d := time.Since(start)
			if err != nil {
				t.Fatalf("repetition %d: %v", i, err)
			}
			if !strings.Contains(out, "added "+img) {
				t.Fatalf("repetition %d: --add said %q", i, out)
			}
			add = append(add, d)
			// Every node lists the spare.
			for _, dn := range c.Nodes {
				out, err := c.Mdadm(ctx, dn, "--detail", "/dev/md0")
				if err != nil || !strings.Contains(out, "spare   "+img) {
					t.Fatalf("repetition %d: node %d does not list %s as a spare: %v\n%s", i, dn.ID, img, err, out)
				}
			}
			if out, err := c.Mdadm(ctx, n1, "/dev/md0", "--remove", img); err != nil {
				t.Fatalf("repetition %d: removing the spare: %v\n%s", i, err, out)
			}
		}
		report(t, "add spare: mdadm-go --add returns, confirmed by every node", add)
	}
	addPhase()
	killPhase()
}

// The survivors' log lines at the start and end of a recovered slot's
// resync (mdcluster/array).
const (
	slotResyncStart = "resyncing the dirty chunks of a recovered bitmap slot"
	slotResyncEnd   = "resynced the chunks a bitmap slot marked"
)

func readFile(p string) string { b, _ := os.ReadFile(p); return string(b) }

// waitNth waits until one of ds logs a line with words beyond the count
// it had before, and returns the first such line.
func waitNth(ctx context.Context, t *testing.T, ds []*Daemon, before map[*Daemon]int, words ...string) string {
	t.Helper()
	for {
		for _, d := range ds {
			if l := d.Grep(words...); len(l) > before[d] {
				return l[before[d]]
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no new log line with %q", words)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// report prints median, min and max of ds (and every value).
func report(t *testing.T, what string, ds []time.Duration) {
	t.Helper()
	s := slices.Clone(ds)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	var all []string
	for _, d := range ds {
		all = append(all, d.Round(time.Millisecond).String())
	}
	msg := fmt.Sprintf("%s: median %v, min %v, max %v over %d (%s)", what, med.Round(time.Millisecond),
		s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), len(s), strings.Join(all, " "))
	t.Log(msg)
	fmt.Println(msg)
}
