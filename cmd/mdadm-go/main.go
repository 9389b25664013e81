// Command mdadm-go is mdcluster's administration tool. It follows mdadm's
// command-line syntax and prints mdadm's text wherever mdadm has one, so
// that scripts and people used to mdadm can use it unchanged.
//
// Supported so far:
//
//	mdadm-go --examine DEVICE...          (-E) print each member's md superblock
//	mdadm-go --examine-bitmap DEVICE...   (-X) print the write-intent bitmap
//
// DEVICE may be a member block device, a loop device or a plain image file.
// Exit status follows mdadm: 0 success, 1 a device could not be examined,
// 2 bad usage.
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
