// Command mdclusterd is the mdcluster daemon: one per storage node. It
// reads its configuration (TOML, see docs/daemon.md), starts the node
// runtime (membership, quorum, fencing, the distributed lock manager and
// the state store), serves the control socket that mdadm-go talks to and
// the Prometheus metrics endpoint, and leaves the cluster gracefully on
// SIGTERM or SIGINT (a second signal stops at once).
//
// Usage:
//
//	mdclusterd [-c FILE] [--check-config]
//
// --check-config reads and checks the configuration, prints every problem
// as "mdclusterd: FILE:LINE: FIELD: what is wrong", and exits 0 if there
// is none, 1 otherwise; it creates and starts nothing.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/arrays"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
)

// DefaultConfigPath is read when -c is not given.
const DefaultConfigPath = "/etc/mdcluster/mdclusterd.toml"

// arrayLayer is the array layer the daemon runs with: the array manager
// (cmd/mdclusterd/arrays). The tests may set their own.
var arrayLayer daemon.ArrayLayer = arrays.New()

func main() {
	if os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) < minGOMAXPROCS {
		runtime.GOMAXPROCS(minGOMAXPROCS)
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// minGOMAXPROCS is the fewest Ps the daemon runs with, whatever the CPU
// count (an explicit GOMAXPROCS in the environment wins). Its data path
// blocks in system calls: an O_DIRECT pwrite to each mirror, one
// goroutine each. With a single P (a one-CPU machine) the goroutine
// blocked in the first pwrite keeps the P until the runtime's monitor
// takes it back, 20 µs to 10 ms later, so the second mirror's write waits
// behind the first instead of beside it. In a one-vCPU VM (docs/vmtest.md,
// the side-by-side benchmark, BENCHMARKS.md) one P lost up to 60 % of the
// 4 KiB depth-1 writes in some rounds and nothing measurable in others.
// More Ps cost nothing while they have no work.
const minGOMAXPROCS = 4

// run is the whole program; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("mdclusterd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", DefaultConfigPath, "configuration file")
	fs.StringVar(path, "c", DefaultConfigPath, "configuration file (short for -config)")
	check := fs.Bool("check-config", false, "check the configuration and exit: 0 if it is valid, 1 if not")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: mdclusterd [-c FILE] [--check-config]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mdclusterd: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintf(stderr, "mdclusterd: %s\n", line)
		}
		return 1
	}
	if *check {
		fmt.Fprintf(stdout, "mdclusterd: %s: configuration is valid (node %d, %s, %s)\n", cfg.Path, cfg.NodeID, cfg.Profile, cfg.Quorum.String())
		return 0
	}
	// Signals are caught before anything starts, so a SIGTERM during the
	// start is acted on as soon as the daemon runs.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	d, err := daemon.Start(context.Background(), daemon.Options{Config: cfg, Arrays: arrayLayer})
	if err != nil {
		fmt.Fprintf(stderr, "mdclusterd: %s: %v\n", cfg.Path, err)
		return 1
	}
	if err := d.Run(sigs); err != nil {
		return 1
	}
	return 0
}
