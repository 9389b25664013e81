// Command mdadm-go is mdcluster's administration tool. It follows mdadm's
// command-line syntax and prints mdadm's text wherever mdadm has one, so
// that scripts and people used to mdadm can use it unchanged.
//
// --examine (-E) and --examine-bitmap (-X) read member devices directly.
// Every other verb (--create, --assemble, --add/--remove/--fail/...,
// --detail, --stop, --readwrite, --wait, --grow, and mdcluster's own
// --status, --cluster and --locks) is a request to the local mdclusterd
// over its control socket (--socket, $MDCLUSTER_SOCKET, or
// /run/mdcluster/mdclusterd.sock). docs/cli.md lists every verb, its
// options and exit statuses, and where mdadm-go differs from mdadm.
//
// Exit status follows mdadm: 0 success, 1 the operation failed (or the
// daemon could not be reached), 2 bad usage (nothing was sent).
package main

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func main() {
	host, _ := os.Hostname()
	os.Exit(run(os.Args[1:], &env{
		stdout:   os.Stdout,
		stderr:   os.Stderr,
		prog:     "mdadm-go",
		hostname: host,
		location: time.Local,
		getenv:   os.Getenv,
		// --wait draws its progress bar only on a terminal.
		isTerminal: isTerminal(os.Stdout),
	}))
}
