// Command mdcluster-demo is the product's demo (make demo): in a temporary
// directory, three mdclusterd processes on 127.0.0.1, a clustered raid1
// over file-backed members created with mdadm-go on node 1 and assembled
// on nodes 2 and 3, a known data set written through node 1's NBD export
// with nbdcopy, node 2 killed with SIGKILL while fio writes through its
// export (detection, fencing, the resync of its dirty chunks by a
// survivor), a member replaced from node 1 (fail, remove, add: confirmed by
// every node, rebuilt), and the data verified on the members and through
// an export. It exits non-zero if any check fails.
//
// Usage: mdcluster-demo [-bin DIR] [-keep]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/mdcluster/mdcluster/internal/clusterdemo"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding mdclusterd and mdadm-go")
	keep := flag.Bool("keep", false, "keep the temporary directory (logs, configs, member files)")
	flag.Parse()
	os.Exit(run(*bin, *keep))
}

func run(bin string, keep bool) int {
	for _, tool := range []string{"nbdcopy", "fio"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "mdcluster-demo: %s not found (make deps installs libnbd-bin and fio)\n", tool)
			return 1
		}
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "mdcluster-demo: must run as root (the control socket serves only uid 0)")
		return 1
	}
	bin, _ = filepath.Abs(bin)
	dir, err := os.MkdirTemp("", "mdcluster-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "mdcluster-demo:", err)
		return 1
	}
	c, err := clusterdemo.Setup(dir, bin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mdcluster-demo:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	var r clusterdemo.Result
	err = clusterdemo.Core(ctx, c, &r)
	if err == nil {
		err = clusterdemo.Full(ctx, c, &r)
	}
	if err == nil {
		err = clusterdemo.Shutdown(ctx, c, &r)
	}
	c.Stop() // whatever still runs after a failure
	fmt.Println()
	fmt.Println("== summary ==")
	for _, ck := range r.Checks {
		fmt.Println("  ok  ", ck)
	}
	ms := func(d time.Duration) string {
		if d == 0 {
			return "-"
		}
		return d.Round(time.Millisecond).String()
	}
	fmt.Printf("  create on node 1 (incl. the others attaching): %s; assemble on nodes 2+3: %s\n", ms(r.Create), ms(r.Assemble))
	fmt.Printf("  nbdcopy 32 MiB in through node 1: %s; whole array out through node 3: %s\n", ms(r.Write), ms(r.ReadBack))
	fmt.Printf("  kill -9 node 2 -> survivors' view without it: %s; -> fenced: %s; -> its slot's dirty chunks resynced by a survivor: %s\n",
		ms(r.KillToDeparted), ms(r.KillToFenced), ms(r.KillToSlotResynced))
	fmt.Printf("  --add c.img confirmed by every node: %s; rebuild: %s\n", ms(r.AddConfirmed), ms(r.Rebuild))
	fmt.Printf("  node 2 restart -> back in the view and assembled: %s\n", ms(r.Rejoin))
	for _, s := range r.Skipped {
		fmt.Println("  skipped:", s)
	}
	fmt.Printf("  total %s\n", ms(time.Since(start)))
	if err != nil {
		fmt.Printf("\nFAILED: %v\n(logs kept in %s)\n", err, dir)
		return 1
	}
	if keep {
		fmt.Printf("  logs, configs and member files kept in %s\n", dir)
	} else {
		os.RemoveAll(dir)
	}
	fmt.Println("PASS")
	return 0
}
